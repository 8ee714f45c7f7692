"""What a cell writes: PEFT adapter folders, resume state, metrics.

Adapter folders (`<run>/cells/<cell>/step_<N>/`) hold the two files peft and
vLLM load (adapter_config.json, adapter_model.safetensors) and a README.md
model card (core/adapter_card.py); they are
written to a local temp folder and uploaded with `rundir.upload_dir`, whose
`_COMPLETE` marker, written last, makes the folder visible whole.

Resume state goes into the Ray Train checkpoint of the same step: LoRA
weights, optimizer and LR-schedule state, every rank's RNG state and the
metrics history. The data position is the step number itself (the data
order is a pure function of (seed, step): train/data.py), so a resume from
any registered checkpoint, including one earlier than the last (Ray 2.60
may not register a checkpoint reported < ~2 s before a crash), replays
exactly.
"""
from __future__ import annotations

import json
import os
import tempfile

import pyarrow as pa
import torch

from ..core import rundir
from ..core.adapter_card import CARD_FILE, make_portable

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_FILE = "trainer_state.json"
DS_TAG = "deepspeed"


def export_adapter(trainer, local_dir: str, *, rank: int) -> None:
    """Rank 0 writes the PEFT adapter folder. Collective: under ZeRO-3 every
    rank must take part in gathering the LoRA tensors."""
    with trainer.gathered():
        if rank == 0:
            trainer.policy.save_pretrained(local_dir, safe_serialization=True)
            _sort_module_sets(os.path.join(local_dir, "adapter_config.json"))


def _sort_module_sets(path: str) -> None:
    """peft keeps target_modules (and exclude_modules) as a set and writes it
    as a list in the set's order, which follows the process's string-hash
    seed: two runs would write one adapter with different config bytes (and
    so different content hashes, eval fingerprints and geometry pair order).
    Sorted, the file is the same in every process."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))  # as peft writes it


def publish_adapter(trainer, dest: str, *, rank: int, card=None, root: str | None = None) -> str:
    """Export the adapter and upload it whole to `dest` (a step folder of the
    run, RunLayout.cell(...).step(n)); with a `core.adapter_card.AdapterCard`
    the folder is made portable (the base model's hub id) and gets its model
    card. The weights file is never touched. The marker vouches for the two
    adapter files (the card changes when eval adds accuracy); root: the run,
    for run-relative paths in the marker."""

    with tempfile.TemporaryDirectory(prefix="wsg-adapter-") as tmp:
        export_adapter(trainer, tmp, rank=rank)
        if rank == 0:
            if card is not None:
                make_portable(tmp, card)
            rundir.upload_dir(tmp, dest, files=ADAPTER_FILES + ((CARD_FILE,) if card is not None else ()),
                              vouch=ADAPTER_FILES, root=root)
    return dest


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(trainer, local_dir: str, *, rank: int, state: dict) -> None:
    """Write this rank's part of the resume state into `local_dir` (Ray Train
    merges the ranks' folders into one checkpoint). `state` (JSON: step,
    metrics history, fingerprint) is written by rank 0."""
    os.makedirs(local_dir, exist_ok=True)
    torch.save(_rng_state(), os.path.join(local_dir, f"rng_rank{rank}.pt"))
    if trainer.deepspeed:
        os.makedirs(os.path.join(local_dir, DS_TAG), exist_ok=True)
        trainer.engine.save_checkpoint(local_dir, tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    elif rank == 0:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        lora = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(trainer.policy).items()}
        save_file(lora, os.path.join(local_dir, "lora.safetensors"))
        torch.save({"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict()},
                   os.path.join(local_dir, "optim.pt"))
    if rank == 0:
        with open(os.path.join(local_dir, STATE_FILE), "w") as f:
            json.dump(state, f)


def load_resume_state(trainer, local_dir: str, *, rank: int) -> dict:
    """Restore weights, optimizer, schedule and RNG; return rank 0's JSON state."""
    with open(os.path.join(local_dir, STATE_FILE)) as f:
        state = json.load(f)
    if trainer.deepspeed:
        trainer.engine.load_checkpoint(local_dir, tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    else:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(trainer.policy, load_file(os.path.join(local_dir, "lora.safetensors"),
                                                            device=str(trainer.device)))
        opt = torch.load(os.path.join(local_dir, "optim.pt"), map_location=trainer.device, weights_only=False)
        trainer.optimizer.load_state_dict(opt["optimizer"])
        trainer.scheduler.load_state_dict(opt["scheduler"])
    rng = os.path.join(local_dir, f"rng_rank{rank}.pt")
    if os.path.exists(rng):  # absent if the world size changed: the seed-derived state stays
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def metrics_table(history: list[dict]) -> pa.Table:
    """One row per optimizer step; the loss's own metrics become columns."""
    keys: dict[str, None] = {"step": None}
    for row in history:
        keys.update(dict.fromkeys(row))
    cols = {k: [row.get(k) for row in history] for k in keys}
    return pa.table({k: pa.array(v, type=pa.int64() if k == "step" else pa.float64()) for k, v in cols.items()})


def write_metrics(uri: str, history: list[dict]) -> None:
    """The cell's metrics.parquet (rewritten whole: readers never see half a table)."""
    rundir.write_table(uri, metrics_table(history))
