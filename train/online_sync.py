"""Weight sync from the trainer's LoRA policy to the rollout engine.

After every optimizer step the engine must sample from the *new* policy.
Sampling silently from the base model (an adapter never attached, or a
cached adapter name reused for new weights) is a known bug class of RL
frameworks (verl, OpenRLHF); tests/train/test_online_sync.py guards it by
comparing the engine's teacher-forced log-probs with the trainer's.

Two strategies (cfg.online.sync, docs/online.md):

- "lora": the adapter is saved as a PEFT folder and served as a vLLM
  LoRARequest with a fresh (name, id) per version: vLLM caches adapters by
  id, so a reused id would keep serving the old weights.
- "merged": W0 + ΔW is written for every parameter of each module that
  holds a LoRA layer (the whole attention block, so vLLM's fused q/k/v
  projection always receives all of its parts) and loaded into the engine
  in place; the engine then runs at base-model speed. On CPU vLLM's LoRA
  path is 7-12x slower than the base model (docs/stack.md "vLLM"), so "auto"
  means merged on CPU and lora on GPU.
"""
from __future__ import annotations

import itertools
import os
import shutil
import time
from typing import Callable

import torch

from ..core.errors import WsgError
from ..rollouts.merge import write_merged

# vLLM's in-place reload warns once per untouched layer on every merged sync.
QUIET_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                  "vllm.model_executor.model_loader.reload.inplace")


#: vLLM LoRA ids, unique in the process: cells that take turns on one shared
#: engine (train/shared.py) must never reuse an id the engine has cached.
_LORA_IDS = itertools.count(1)


class WeightSync:
    """Pushes the trainer's current policy to one engine.

    load_merged(path): the engine's in-place load (a Ray call in
    train/online.py). publish(folder, tag, drop): makes a local folder
    readable by the engine and returns the engine's path to it (identity when
    both share a node; a copy into the engine's own folder otherwise), and
    removes the engine's copies named in `drop`. After `push`, `lora` is the
    LoRA request tuple (name, id, path) to generate with, or None once merged
    weights are loaded."""

    def __init__(self, strategy: str, *, work_dir: str, name: str, load_merged: Callable[[str], object],
                 publish: Callable[[str, str, list[str]], str] | None = None, dtype: torch.dtype | None = None):
        if strategy not in ("lora", "merged"):
            raise WsgError(f"sync strategy must be 'lora' or 'merged' (resolve 'auto' first), got {strategy!r}")
        self.strategy, self.work_dir, self.name = strategy, work_dir, name
        self.load_merged, self.dtype = load_merged, dtype
        self.publish = publish or (lambda folder, tag, drop: folder)
        self.version = 0
        self.lora: tuple[str, int, str] | None = None
        os.makedirs(work_dir, exist_ok=True)

    def push(self, policy) -> float:
        """Sync the current weights; returns the seconds it took."""
        t0 = time.perf_counter()
        self.version += 1
        if self.strategy == "lora":
            tag = f"v{self.version}"
            folder = os.path.join(self.work_dir, tag)
            policy.save_pretrained(folder, safe_serialization=True)
            # v-1 may still sit in vLLM's cache; anything older is never asked for again.
            stale = f"v{self.version - 2}"
            path = self.publish(folder, tag, [stale])
            shutil.rmtree(os.path.join(self.work_dir, stale), ignore_errors=True)
            # A fresh name AND id per version: vLLM keys its adapter cache by id,
            # so a reused id would go on serving the previous weights.
            self.lora = (f"{self.name}-{tag}", next(_LORA_IDS), path)
        else:
            folder = write_merged(policy, os.path.join(self.work_dir, "merged"), dtype=self.dtype)
            self.load_merged(self.publish(folder, "merged", []))
            self.lora = None
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- engine calls
# The engine is a Ray actor handle (cells) or a plain EngineActor (tests,
# bench): these two calls serve both.

def call_engine(engine, method: str, *args, **kw):
    fn = getattr(engine, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args, **kw))
    return fn(*args, **kw)


def on_engine(engine, fn, *args):
    """Run fn(engine_instance, *args) where the engine lives (`__ray_call__`)."""
    if hasattr(engine, "__ray_call__"):
        import ray

        return ray.get(engine.__ray_call__.remote(fn, *args))
    return fn(engine, *args)


def node_id(_engine) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def quiet_reload_logs(_engine) -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def receive_files(engine, tag: str, files: dict[str, bytes], drop: list[str]) -> str:
    """Write a synced folder into the engine's own work dir (other node)."""
    base = os.path.join(engine.work_dir, "wsg-sync")
    dest = os.path.join(base, tag)
    os.makedirs(dest, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(dest, name + ".tmp"), "wb") as f:
            f.write(data)
        os.replace(os.path.join(dest, name + ".tmp"), os.path.join(dest, name))
    for d in drop:
        shutil.rmtree(os.path.join(base, d), ignore_errors=True)
    return dest
