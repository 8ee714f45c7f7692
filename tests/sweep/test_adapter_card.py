"""core/adapter_card.py: an adapter trained by the cell's own loop (tiny-qwen3,
in this process), made portable and copied to a fresh folder, loads with peft
(base given explicitly) and through vLLM's LoRARequest with the trained
policy's outputs; only adapter_config.json's base name and README.md change."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from train_fixtures import tiny_cfg, write_run
from wsg.core.adapter_card import (
    CARD_FILE,
    CONFIG_FILE,
    AdapterCard,
    add_accuracy,
    base_model_id,
    make_portable,
    read_card,
)
from wsg.core.cells import CellKey
from wsg.core.config import config_hash
from wsg.core.layout import RunLayout

WEIGHTS = "adapter_model.safetensors"
KEY = CellKey.of("sft", 42, 2e-2)
STEP = 2


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):  # noqa: F811
    """Two real optimizer steps of an sft cell through train.worker.fit, which
    publishes step_2 as the product does; returns (folder, policy, cfg)."""
    from wsg.train.data import RolloutSource, build_train_set
    from wsg.train.task import CellTask, placement
    from wsg.train.worker import fit

    run = str(tmp_path_factory.mktemp("card-run"))
    write_run(run, tokenizer, n_prompts=6)
    cfg = tiny_cfg(max_steps=STEP, checkpoint_steps=[STEP])
    ts = build_train_set(cfg, run, loss="sft", tokenizer=tokenizer)
    task = CellTask(cfg=cfg, layout=RunLayout.of(run), key=KEY, fingerprint={}, data=ts, online=False,
                    placement=placement(cfg, online=False))
    out = fit(task, RolloutSource(task, ts, rank=0, world=1), rank=0, world=1, device="cpu",
              report=lambda row, ckpt: None, resume_dir=None)
    assert out["status"]["state"] == "complete"
    return RunLayout(run).cell(KEY.id).step(STEP), out["policy"].eval(), cfg


@pytest.fixture(scope="module")
def portable(trained, tmp_path_factory):
    """The published folder, made portable, copied to a fresh place."""
    folder, _policy, cfg = trained
    work = tmp_path_factory.mktemp("portable")
    src = work / "published"
    shutil.copytree(folder, src)
    make_portable(str(src), AdapterCard.of(cfg, KEY, STEP, rollouts_hash="0123456789abcdef"))
    dest = work / "elsewhere" / "adapter"
    shutil.copytree(src, dest)
    return dest


def test_base_model_names():
    assert base_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("tiny-qwen3") == "tiny-qwen3"  # no hub id: the alias itself
    assert base_model_id("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    assert base_model_id("/data/models/mine") == "/data/models/mine"


def test_published_folder_is_portable(trained, portable):
    """The cell publishes its checkpoints portable already (base named by its id,
    a card beside the weights); making it portable again changes only the card."""
    folder = trained[0]
    before = json.load(open(os.path.join(folder, CONFIG_FILE)))
    after = json.load(open(portable / CONFIG_FILE))
    # Not the cache folder peft loaded the base from: the name a user can load.
    assert before["base_model_name_or_path"] == "tiny-qwen3"
    assert not os.path.isabs(before["base_model_name_or_path"])
    assert after == before
    assert _sha(portable / WEIGHTS) == _sha(os.path.join(folder, WEIGHTS))
    assert CARD_FILE in os.listdir(folder)
    assert sorted(os.listdir(portable)) == sorted(os.listdir(folder))
    # Written as peft writes it (indent 2, sorted keys).
    raw = open(os.path.join(folder, CONFIG_FILE)).read()
    assert json.dumps(json.loads(raw), indent=2, sort_keys=True) == raw


def test_card_fields_and_accuracy(trained, portable):
    cfg = trained[2]
    card = read_card(str(portable))
    assert card == AdapterCard.of(cfg, KEY, STEP, rollouts_hash="0123456789abcdef")
    assert (card.loss, card.init_seed, card.data_seed, card.lr, card.step) == ("sft", 42, 42, 2e-2, 2)
    text = (portable / CARD_FILE).read_text()
    front = text.split("---\n")[1]
    assert "base_model:" not in front  # tiny-qwen3 has no hub id: no hub metadata claims one
    for want in ("| learning rate | 0.02 |", "| step | 2 of 2 |", "`0123456789abcdef`", config_hash(cfg),
                 "has **no hub id**", "PeftModel.from_pretrained(base", "LoRARequest(", "max_lora_rank=8",
                 "Not measured"):
        assert want in text, want
    assert add_accuracy(str(portable), {"synthetic": 0.375})
    card2 = read_card(str(portable))
    assert card2.accuracy == {"synthetic": 0.375} and card2.step == STEP
    assert "| synthetic | 0.3750 |" in (portable / CARD_FILE).read_text()
    assert not add_accuracy(str(portable.parent), {"x": 1.0})  # no card there


def test_smollm2_card_names_the_hub_model(trained, tmp_path):
    folder, _policy, cfg = trained
    cfg2 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": "smollm2-135m-instruct"})})
    dest = tmp_path / "a"
    shutil.copytree(folder, dest)
    make_portable(str(dest), AdapterCard.of(cfg2, KEY, STEP))
    assert json.load(open(dest / CONFIG_FILE))["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = (dest / CARD_FILE).read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in text.split("---\n")[1]
    assert "AutoPeftModelForCausalLM" in text and "dequantized to float32" in text
    assert "| rollouts hash | unknown |" in text


def _ids(tokenizer):  # noqa: F811
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 4 + 5?"}], tokenize=False,
                                           add_generation_prompt=True)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer("We add 4 and 5. The answer is \\boxed{9}.", add_special_tokens=False)["input_ids"]
    return p, c


def _logprobs(model, p, c) -> np.ndarray:
    ids = torch.tensor([p + c])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return lp.gather(-1, ids[0, 1:, None])[:, 0][len(p) - 1:].numpy()


def test_copied_adapter_loads_with_peft(trained, portable, tokenizer):  # noqa: F811
    from peft import PeftConfig, PeftModel
    from wsg.core.models import load_causal_lm

    _folder, policy, _cfg = trained
    assert PeftConfig.from_pretrained(str(portable)).base_model_name_or_path == "tiny-qwen3"
    loaded = PeftModel.from_pretrained(load_causal_lm("tiny-qwen3"), str(portable)).eval()
    p, c = _ids(tokenizer)
    want, got = _logprobs(policy, p, c), _logprobs(loaded, p, c)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    with policy.disable_adapter():
        base = _logprobs(policy, p, c)
    assert np.abs(base - want).max() > 1e-2  # the adapter matters: the match above is not the base's


@pytest.mark.slow
def test_copied_adapter_loads_in_vllm(trained, portable, tokenizer, tmp_path):  # noqa: F811
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from wsg.core.models import resolve_model
    from wsg.rollouts.engine import EngineActor, EngineOptions

    _folder, policy, _cfg = trained
    p, c = _ids(tokenizer)
    want = _logprobs(policy, p, c)
    with policy.disable_adapter():
        base = _logprobs(policy, p, c)
    engine = EngineActor(EngineOptions(model=resolve_model("tiny-qwen3"), dtype="float32", max_model_len=512,
                                       enable_lora=True, max_lora_rank=8, cpu_kv_cache_gib=0.25, seed=0),
                         work_dir=str(tmp_path / "vllm"))
    try:
        ids = p + c
        sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        [out] = engine.llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False,
                                    lora_request=LoRARequest(KEY.id, 1, str(portable)))
        got = np.array([out.prompt_logprobs[i][ids[i]].logprob for i in range(len(p), len(ids))])
    finally:
        engine.shutdown()
    print(f"\nvLLM LoRA vs peft: max |diff| {np.abs(got - want).max():.2e}; base vs adapter {np.abs(base - want).max():.3f}")
    assert np.abs(got - want).max() < 2e-3  # vLLM's CPU kernels vs torch (tests/rollouts/test_rollouts_engine.py)
    assert np.abs(got - base).max() > 10 * 2e-3
