"""Reading PEFT LoRA adapters: the one place analysis/ does it (docs/geometry.md).

An adapter is a folder written by peft's `save_pretrained`: `adapter_config.json`
(r, lora_alpha, use_rslora, rank_pattern, alpha_pattern) and
`adapter_model.safetensors` with keys such as
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (r x d_in) and
`...lora_B.weight` (d_out x r). Module names are normalised to
`layers.<i>.<proj>`.

One convention for every reader in analysis/ (geometry, LMC, eval and
functional fingerprints):

- factor order (B, A): B d_out x r, A r x d_in, dW = s * B @ A;
- scale s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
  (`lora_scale`, peft's rule), per module with rank_pattern / alpha_pattern;
- `content_hash(folder)`: sha256 over config and weights bytes, 16 hex
  digits, the cache key of everything computed from an adapter.

`read_adapter_spec` reads the config and the safetensors header only (names,
shapes); `load_factors` reads some modules' tensors; `read_lora_factors` reads
all of them. Every problem a user can cause raises `WsgError` naming the
file, module and shapes (exit code 2 at the CLI, no traceback).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

from ..core import rundir
from ..core.errors import WsgError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# `...layers.<i>.<path.>proj.lora_A[.<adapter name>].weight`; the optional
# adapter-name segment covers state dicts saved straight from a live model.
_KEY = re.compile(
    r"^(?P<full>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:[A-Za-z_]\w*\.)*?(?P<proj>[A-Za-z_]\w*))"
    r"\.lora_(?P<ab>[AB])(?:\.[A-Za-z_]\w*)?\.weight$"
)
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA module of one adapter: where its factors are and its scale."""

    module: str  # normalised `layers.<i>.<proj>`
    layer: int
    proj: str
    key_a: str  # full safetensors keys
    key_b: str
    rank: int
    d_out: int
    d_in: int
    scale: float  # s in dW = s * B @ A

    @property
    def prefix(self) -> str:
        """The safetensors key before `.lora_A...`, e.g.
        `base_model.model.model.layers.0.self_attn.q_proj`."""
        return self.key_a[:self.key_a.rindex(".lora_A")]


@dataclass
class AdapterSpec:
    name: str
    path: str
    weights: str
    config: dict = field(default_factory=dict)
    modules: dict[str, ModuleSpec] = field(default_factory=dict)
    content_hash: str = ""


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """peft's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def pattern_value(patterns: dict, key: str, default):
    """peft's `get_pattern_key`: the first pattern p with `(.*\\.)?(p)$` matching
    the module key (e.g. `model.layers.3.self_attn.q_proj`) wins."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _read_config(name: str, folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise WsgError(f"adapter {name!r}: {path} not found; give a PEFT adapter folder written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise WsgError(f"adapter {name!r}: cannot read {path} as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise WsgError(f"adapter {name!r}: {path} must hold a JSON object")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise WsgError(f"adapter {name!r}: {path} needs a positive number '{key}' (got {cfg.get(key)!r})")
    if cfg.get("use_dora"):
        raise WsgError(f"adapter {name!r}: {path} has use_dora=true; DoRA's magnitude vector makes the update "
                       "non-low-rank, which LoRA-factor analyses do not cover")
    return cfg


def _header(name: str, weights: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header only."""
    from safetensors import safe_open

    if not os.path.isfile(weights):
        raise WsgError(f"adapter {name!r}: {weights} not found; give a PEFT adapter folder written by save_pretrained")
    try:
        with safe_open(weights, framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        raise WsgError(f"adapter {name!r}: {weights} is not a readable safetensors file "
                       f"({type(e).__name__}: {e}); re-save the adapter") from None


def read_adapter_spec(name: str, folder: str) -> AdapterSpec:
    """Parse config + header of a local adapter folder into per-module specs
    (no tensor data is read)."""
    folder = os.path.abspath(folder)
    cfg = _read_config(name, folder)
    weights = os.path.join(folder, WEIGHTS_FILE)
    shapes = _header(name, weights)
    rslora = bool(cfg.get("use_rslora", False))
    found: dict[str, dict] = {}
    for key, shape in shapes.items():
        m = _KEY.match(key)
        if not m:
            raise WsgError(f"adapter {name!r}: {weights} holds tensor {key!r}, which is not a per-layer "
                           "LoRA factor (...layers.<i>.<proj>.lora_A/lora_B.weight); only LoRA on "
                           "transformer layers is covered")
        module = f"layers.{int(m['layer'])}.{m['proj']}"
        full = m["full"][len(_PEFT_PREFIX):] if m["full"].startswith(_PEFT_PREFIX) else m["full"]
        entry = found.setdefault(module, {"full": full, "layer": int(m["layer"]), "proj": m["proj"]})
        if entry["full"] != full:
            raise WsgError(f"adapter {name!r}: {entry['full']} and {full} both normalise to {module}; "
                           "one LoRA module per layers.<i>.<proj> is needed")
        if len(shape) != 2:
            raise WsgError(f"adapter {name!r}: tensor {key} in {weights} has shape {shape}; LoRA factors are matrices")
        entry[m["ab"]] = (key, shape)
    spec = AdapterSpec(name=name, path=folder, weights=weights, config=cfg)
    for module, e in sorted(found.items(), key=lambda kv: (kv[1]["layer"], kv[1]["proj"])):
        if "A" not in e or "B" not in e:
            missing = "lora_B" if "B" not in e else "lora_A"
            raise WsgError(f"adapter {name!r}: module {module} in {weights} has no {missing} tensor; re-save the adapter")
        (key_a, (ra, d_in)), (key_b, (d_out, rb)) = e["A"], e["B"]
        rank = int(pattern_value(cfg.get("rank_pattern"), e["full"], cfg["r"]))
        alpha = float(pattern_value(cfg.get("alpha_pattern"), e["full"], cfg["lora_alpha"]))
        if not (ra == rb == rank):
            raise WsgError(f"adapter {name!r}: module {module} has lora_A {[ra, d_in]} and lora_B {[d_out, rb]} "
                           f"but {CONFIG_FILE} gives rank {rank} for it (r / rank_pattern); the config and "
                           "weights do not belong together")
        spec.modules[module] = ModuleSpec(module=module, layer=e["layer"], proj=e["proj"], key_a=key_a,
                                          key_b=key_b, rank=rank, d_out=int(d_out), d_in=int(d_in),
                                          scale=lora_scale(rank, alpha, rslora))
    if not spec.modules:
        raise WsgError(f"adapter {name!r}: {weights} holds no LoRA tensors")
    return spec


def load_factors(weights: str, mods: list[ModuleSpec], data: bytes | None = None):
    """Read only these modules' (B, A) tensors from one safetensors file
    (per-tensor reads through safe_open): float32 and float64 as stored,
    half precisions widened to float32 (exactly). `data`: the file's bytes,
    for a process on another node than the file (`weights` then only names it)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load as load_bytes

    out = []
    try:
        if data is not None:
            tensors = load_bytes(bytes(data))
            pairs = [(tensors[m.key_b], tensors[m.key_a]) for m in mods]
        else:
            with safe_open(weights, framework="pt") as f:
                pairs = [(f.get_tensor(m.key_b), f.get_tensor(m.key_a)) for m in mods]
        for b, a in pairs:
            out.append(tuple(t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
                             for t in (b, a)))
    except Exception as e:
        raise WsgError(f"cannot read LoRA tensors from {weights} ({type(e).__name__}: {e}); "
                       "the file is unreadable or corrupt: re-save the adapter") from None
    return out


def read_lora_factors(folder: str, name: str | None = None) -> tuple[AdapterSpec, dict[str, tuple]]:
    """All modules of a local adapter folder: (spec, {module: (B, A, s)}),
    modules normalised (`layers.<i>.<proj>`) and in layer order."""
    spec = read_adapter_spec(name or folder, folder)
    mods = list(spec.modules.values())
    return spec, {m.module: (b, a, m.scale) for m, (b, a) in zip(mods, load_factors(spec.weights, mods))}


def content_hash(folder: str, chunk: int = 1 << 24) -> str:
    """sha256 over the adapter's config and weights bytes (streamed), 16 hex
    digits: the cache key of everything computed from this adapter, whatever
    its path (a local folder or a run-dir URI)."""
    h = hashlib.sha256()
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        h.update(fname.encode())
        fs, path = rundir.resolve(rundir.join(folder, fname))
        with fs.open_input_stream(path) as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()[:16]
