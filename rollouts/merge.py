"""W0 + ΔW of a LoRA-wrapped model, as the tensors a vLLM engine reloads in
place: the one adapter merger of wsg. Online cells sync their policy this way
on a CPU (train/online_sync.py) and the eval stage serves each adapter this
way (analysis/evaluate.py), where vLLM's LoRA path is 7-12x slower than the
base model (docs/stack.md, "vLLM").

Every parameter of each module that holds a LoRA layer is written (the whole
attention block, so vLLM's fused q/k/v projection always receives all of its
parts), computed from the frozen base weights: nothing accumulates across
merges and no unmerge leaves rounding residue in the base.
"""
from __future__ import annotations

import os

import torch

from ..core.errors import WsgError

MERGED_FILE = "model.safetensors"


def _lora_layers(policy) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in policy.named_modules() if isinstance(m, LoraLayer)}


def _checkpoint_name(peft_name: str) -> str:
    """peft module path → the base checkpoint's name (what vLLM's load_weights reads)."""
    for prefix in ("base_model.model.",):
        if peft_name.startswith(prefix):
            peft_name = peft_name[len(prefix):]
    return peft_name.replace(".base_layer", "")


@torch.no_grad()
def merged_weights(policy, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{checkpoint name: tensor} of W0 + ΔW for every parameter of each module
    that contains a LoRA layer, computed from the frozen base weights (so the
    result never accumulates across syncs). ΔW = s·B·A as peft defines it
    (`get_delta_weight`, the scaling s included)."""
    layers = _lora_layers(policy)
    if not layers:
        raise WsgError("the policy has no LoRA layers to merge; check train.lora.target_modules")
    adapter = policy.active_adapter if isinstance(policy.active_adapter, str) else policy.active_adapter[0]
    parents = sorted({n.rpartition(".")[0] for n in layers})
    modules = dict(policy.named_modules())
    out: dict[str, torch.Tensor] = {}
    for parent in parents:
        for pname, p in modules[parent].named_parameters():
            if "lora_" in pname:
                continue
            full = f"{parent}.{pname}"
            owner = full.rpartition(".")[0].replace(".base_layer", "")
            t = p.detach()
            if owner in layers and pname.endswith("base_layer.weight"):
                t = t + layers[owner].get_delta_weight(adapter).to(t.dtype)
            out[_checkpoint_name(full)] = t.to("cpu", dtype=dtype or t.dtype).contiguous()
    return out


def write_tensors(folder: str, tensors: dict[str, torch.Tensor]) -> str:
    """`folder`/model.safetensors (temp + rename, so an engine never reads half
    a file); returns the folder."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, MERGED_FILE + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(folder, MERGED_FILE))
    return folder


def write_merged(policy, folder: str, *, dtype: torch.dtype | None = None) -> str:
    """The merged tensors of `policy` written for an engine's in-place reload."""
    return write_tensors(folder, merged_weights(policy, dtype=dtype))
