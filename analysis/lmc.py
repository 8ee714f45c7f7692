"""Linear mode connectivity between two LoRA adapters (seed paper §2
Analysis (iii), §3.5; Frankle et al. 2020). Adapters are read by
analysis/lora_io.py (factor order (B, A), peft's scale rule).

The path α·ΔW_a + (1−α)·ΔW_b is itself a LoRA of rank r_a + r_b: with
ΔW = s·B·A,

    α s_a B_a A_a + (1−α) s_b B_b A_b = [α s_a B_a, (1−α) s_b B_b] · [A_a; A_b],

so every point is served by an ordinary PEFT adapter with scale 1 (no copy of
the base weights, and vLLM/peft load it unchanged). Along the path we measure
the masked-answer cross-entropy: the per-token CE of the gold `\\boxed{answer}`
continuation right after the prompt, prompt tokens masked out.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import save as st_save

from ..core import rundir
from ..core.errors import WsgError
from .cka import inference, pad_token_id, right_pad
from .lora_io import CONFIG_FILE, WEIGHTS_FILE, read_lora_factors

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


class LmcInputError(WsgError, ValueError):
    """An adapter or item set that the interpolation or the CE cannot use."""


def _check_plain_lora(config: Mapping, where: str) -> None:
    """Refuse adapter features the factor interpolation does not cover."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (needs 'LORA')")
    if config.get("use_dora"):
        problems.append("use_dora=true (DoRA's magnitude vector is not linear in the factors)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r} (per-module ranks/alphas are not supported; needs {{}})")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']!r} (needs none)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("bias terms (needs bias='none', lora_bias=false)")
    if problems:
        raise LmcInputError(f"adapter {where}: cannot interpolate: " + "; ".join(problems))


def interpolate_lora(factors_a: Mapping, factors_b: Mapping, alpha: float) -> dict[str, tuple]:
    """One rank-(r_a + r_b) LoRA with scale 1 equal to α·ΔW_a + (1−α)·ΔW_b.

    factors map a module name to (B [d_out, r], A [r, d_in], scale), the
    order of analysis.lora_io; numpy or torch. Returns (B_cat, A_cat, 1.0)
    torch tensors (float32, or float64 if an input is float64):
    B_cat = [α s_a B_a, (1−α) s_b B_b] and A_cat = [A_a; A_b].
    """
    if set(factors_a) != set(factors_b):
        only_a = sorted(set(factors_a) - set(factors_b))
        only_b = sorted(set(factors_b) - set(factors_a))
        raise LmcInputError(f"interpolate_lora needs the same modules: only in a {only_a[:3]}, only in b {only_b[:3]}")
    out = {}
    for name in sorted(factors_a):
        (b_a, a_a, s_a), (b_b, a_b, s_b) = factors_a[name], factors_b[name]
        a_a, b_a, a_b, b_b = (torch.as_tensor(t) for t in (a_a, b_a, a_b, b_b))
        dtype = torch.float64 if torch.float64 in (a_a.dtype, b_a.dtype, a_b.dtype, b_b.dtype) else torch.float32
        if a_a.shape[1] != a_b.shape[1] or b_a.shape[0] != b_b.shape[0]:
            raise LmcInputError(
                f"interpolate_lora: module {name} has base shapes {(b_a.shape[0], a_a.shape[1])} in a and "
                f"{(b_b.shape[0], a_b.shape[1])} in b; the adapters must share a base model"
            )
        if a_a.shape[0] != b_a.shape[1] or a_b.shape[0] != b_b.shape[1]:
            raise LmcInputError(f"interpolate_lora: module {name} has A/B ranks that do not match")
        a_cat = torch.cat([a_a.to(dtype), a_b.to(dtype)], dim=0).contiguous()
        b_cat = torch.cat(
            [(float(alpha) * float(s_a)) * b_a.to(dtype), ((1.0 - float(alpha)) * float(s_b)) * b_b.to(dtype)], dim=1
        ).contiguous()
        out[name] = (b_cat, a_cat, 1.0)
    return out


def read_pair(adapter_dir_a: str, adapter_dir_b: str) -> tuple:
    """Both adapters' specs and factors, checked for interpolation once
    (`interpolated_adapter` then serves every α of the path)."""
    spec_a, fa = read_lora_factors(adapter_dir_a)
    spec_b, fb = read_lora_factors(adapter_dir_b)
    for spec in (spec_a, spec_b):
        _check_plain_lora(spec.config, spec.path)
    if set(fa) != set(fb):
        only_a = sorted(set(fa) - set(fb))
        only_b = sorted(set(fb) - set(fa))
        raise LmcInputError(
            f"adapters {adapter_dir_a} and {adapter_dir_b} adapt different modules (only in a: {only_a[:3]}, "
            f"only in b: {only_b[:3]}); interpolate adapters trained with the same target_modules"
        )
    return spec_a, fa, spec_b, fb


def interpolated_adapter(pair: tuple, alpha: float) -> tuple[dict, dict]:
    """(adapter_config, safetensors tensors) of the PEFT adapter for
    α·ΔW_a + (1−α)·ΔW_b, from `read_pair`. Its config is a's with
    r = r_a + r_b, lora_alpha = r and use_rslora off, so PEFT's scaling is
    exactly 1 and the factors carry the weights."""
    spec_a, fa, spec_b, fb = pair
    merged = interpolate_lora(fa, fb, alpha)
    r = int(spec_a.config["r"]) + int(spec_b.config["r"])
    config = copy.deepcopy(spec_a.config)
    config.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern={}, alpha_pattern={})
    tensors = {}
    for name, (b_cat, a_cat, _) in merged.items():  # a's safetensors keys
        tensors[spec_a.modules[name].prefix + _A_SUFFIX] = a_cat
        tensors[spec_a.modules[name].prefix + _B_SUFFIX] = b_cat
    return config, tensors


def save_adapter(config: dict, tensors: dict, out_dir: str, marker: dict | None = None) -> str:
    rundir.write_bytes(rundir.join(out_dir, WEIGHTS_FILE), st_save(tensors, metadata={"format": "pt"}))
    rundir.write_json(rundir.join(out_dir, CONFIG_FILE), config)
    rundir.mark_complete(out_dir, marker or {}, files=[rundir.join(out_dir, WEIGHTS_FILE),
                                                       rundir.join(out_dir, CONFIG_FILE)])
    return out_dir


def write_interpolated_adapter(adapter_dir_a: str, adapter_dir_b: str, alpha: float, out_dir: str) -> str:
    """Write the PEFT adapter for α·ΔW_a + (1−α)·ΔW_b to out_dir; return out_dir."""
    config, tensors = interpolated_adapter(read_pair(adapter_dir_a, adapter_dir_b), alpha)
    return save_adapter(config, tensors, out_dir,
                        {"alpha": float(alpha), "adapter_a": str(adapter_dir_a), "adapter_b": str(adapter_dir_b)})


def _tokenize_items(tokenizer, items: Sequence[tuple]) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for k, (prompt, answer) in enumerate(items):
        if isinstance(prompt, str) != isinstance(answer, str):
            raise LmcInputError(f"item {k}: prompt and answer must both be text or both be token ids")
        if isinstance(prompt, str):
            if tokenizer is None:
                raise LmcInputError("masked_answer_ce: text items need a tokenizer")
            # The prompt as the tokenizer encodes a prompt; the answer as a bare
            # continuation (no BOS/EOS of its own).
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        else:
            p, a = [int(t) for t in prompt], [int(t) for t in answer]
        if len(p) < 1 or len(a) < 1:
            raise LmcInputError(f"item {k}: needs at least one prompt token and one answer token, got {len(p)} and {len(a)}")
        pairs.append((list(p), list(a)))
    return pairs


def masked_answer_nll(model, tokenizer, items: Sequence[tuple], *, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item: (sum of −log p over the answer tokens, number of answer tokens).

    items are (prompt_text, answer_text) with a tokenizer, or
    (prompt_ids, answer_ids) token sequences (tokenizer may be None). The
    answer is scored as the continuation right after the prompt.
    """
    if batch_size < 1:
        raise LmcInputError(f"batch_size must be >= 1, got {batch_size}")
    pairs = _tokenize_items(tokenizer, items)
    if not pairs:
        raise LmcInputError("masked_answer_ce needs at least one item")
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    nll = np.zeros(len(pairs), np.float64)
    ntok = np.array([len(a) for _, a in pairs], np.int64)
    with inference(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = right_pad([pairs[i][0] + pairs[i][1] for i in idx], pad)
            # Logits at position t predict token t+1; only the positions
            # that predict answer tokens are projected to the vocabulary
            # (the LM head is a large share of the cost, docs/stack.md).
            lo = min(len(pairs[i][0]) for i in idx) - 1
            hi = max(len(pairs[i][0]) + len(pairs[i][1]) for i in idx) - 1
            keep = torch.arange(lo, hi, device=device)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                        logits_to_keep=keep)
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            for row, i in enumerate(idx):
                p, a = pairs[i]
                pos = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=device) - lo
                tgt = torch.as_tensor(a, device=device)
                nll[i] = -logp[row, pos, tgt].double().sum().item()
    return nll, ntok


def masked_answer_ce(model, tokenizer, items: Sequence[tuple], *, batch_size: int) -> float:
    """Mean per-token CE of the answer continuations, pooled over all answer
    tokens of all items (seed §3.5: "per-token cross-entropy of the gold
    \\boxed{answer} continuation right after the prompt")."""
    nll, ntok = masked_answer_nll(model, tokenizer, items, batch_size=batch_size)
    return float(nll.sum() / ntok.sum())
