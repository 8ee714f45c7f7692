"""EngineActor on Ray with real vLLM (tiny-qwen3, fp32), checked against
transformers/peft as the independent reference: teacher-forced logprobs, a
LoRA adapter, merged-weight reload, sampling, the chat template."""
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_path():
    from wsg.core.models import resolve_model

    return resolve_model("tiny-qwen3")


@pytest.fixture(scope="module")
def engine(ray_module, tiny_path):
    from wsg.rollouts.engine import (
        EngineOptions,
        shutdown_engines,
        start_engines,
        wait_ready,
    )

    opts = EngineOptions(model=tiny_path, dtype="float32", max_model_len=512, enable_lora=True,
                         max_lora_rank=8, cpu_kv_cache_gib=0.25, seed=3)
    [e] = start_engines(opts, 1)
    wait_ready([e], model=tiny_path)
    yield e
    shutdown_engines([e])


@pytest.fixture(scope="module")
def hf(tiny_path):
    from wsg.core.models import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_path), load_tokenizer(tiny_path)


def _hf_logprobs(model, prompt_ids, comp_ids):
    import torch

    ids = torch.tensor([list(prompt_ids) + list(comp_ids)])
    with torch.no_grad():
        logits = model(ids).logits.float()
    lp = torch.log_softmax(logits[0, :-1], -1)
    tgt = ids[0, 1:]
    out = lp.gather(-1, tgt[:, None])[:, 0]
    return out[len(prompt_ids) - 1:].tolist()


@pytest.fixture(scope="module")
def prompts(engine):
    import ray

    texts = ray.get(engine.apply_chat_template.remote(["What is 2 + 3?", "Add 4 and 7."],
                                                      instruction="Put the final answer in \\boxed{}."))
    return texts, ray.get(engine.tokenize.remote(texts))


def test_chat_template_matches_transformers(prompts, hf):
    from wsg.rollouts.prompts import build_messages

    _model, tok = hf
    texts, ids = prompts
    msgs = build_messages("What is 2 + 3?", instruction="Put the final answer in \\boxed{}.")
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert texts[0] == want and texts[0].endswith("<|im_start|>assistant\n")
    assert ids[0] == tok.encode(want, add_special_tokens=False)


def test_generate_shapes_logprobs_and_seed(engine, prompts, hf):
    import ray

    model, _tok = hf
    _texts, ids = prompts
    kw = dict(n=3, temperature=1.0, top_p=1.0, max_tokens=10, logprobs=True)
    a = ray.get(engine.generate.remote(ids, seed=11, **kw))
    b = ray.get(engine.generate.remote(ids, seed=11, **kw))
    c = ray.get(engine.generate.remote(ids, seed=12, **kw))
    toks = lambda r: [s["token_ids"] for p in r for s in p["samples"]]  # noqa: E731
    assert toks(a) == toks(b) and toks(a) != toks(c)
    for p, pid in zip(a, ids):
        assert p["prompt_token_ids"] == pid and len(p["samples"]) == 3
        for s in p["samples"]:
            assert len(s["logprobs"]) == len(s["token_ids"]) > 0
            assert s["finish_reason"] in ("stop", "length")
            if s["finish_reason"] == "length":
                assert len(s["token_ids"]) == 10
            # Sampled tokens' logprobs = the fp32 model's (raw, T=1).
            ref = _hf_logprobs(model, pid, s["token_ids"])
            assert max(abs(x - y) for x, y in zip(s["logprobs"], ref)) < 2e-3
    # Text prompts are tokenized without special tokens: same ids.
    t = ray.get(engine.generate.remote(prompts[0], seed=11, **kw))
    assert toks(t) == toks(a)


def test_score_logprobs_matches_transformers(engine, prompts, hf):
    import random

    import ray

    model, _tok = hf
    _texts, ids = prompts
    rng = random.Random(0)
    comps = [[rng.randrange(1000, 40000) for _ in range(7)], [rng.randrange(1000, 40000) for _ in range(4)]]
    got = ray.get(engine.score_logprobs.remote(ids, comps))
    for pid, c, g in zip(ids, comps, got):
        ref = _hf_logprobs(model, pid, c)
        assert len(g) == len(c)
        assert max(abs(x - y) for x, y in zip(g, ref)) < 2e-3
    single = ray.get(engine.score_logprobs.remote(ids[0], comps[0]))
    assert single == pytest.approx(got[0], abs=1e-6)


def _lora_adapter(tiny_path, out_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from wsg.core.models import load_causal_lm

    base = load_causal_lm(tiny_path)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # B = 0 at init would make the adapter a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(out_dir)
    return pm.eval()


def test_lora_and_merged_weights_match_peft(engine, prompts, tiny_path, tmp_path_factory, hf):
    import ray

    _texts, ids = prompts
    model, tok = hf
    adir = tmp_path_factory.mktemp("lora")
    pm = _lora_adapter(tiny_path, str(adir))
    comp = [1000 + 37 * i for i in range(8)]
    ref_lora = _hf_logprobs(pm, ids[0], comp)
    ref_base = _hf_logprobs(model, ids[0], comp)
    assert max(abs(x - y) for x, y in zip(ref_lora, ref_base)) > 0.05  # the adapter matters

    got = ray.get(engine.score_logprobs.remote(ids[0], comp, lora=("a", 1, str(adir))))
    assert max(abs(x - y) for x, y in zip(got, ref_lora)) < 2e-3
    gen = ray.get(engine.generate.remote(ids[:1], n=2, max_tokens=6, logprobs=True, seed=1,
                                         lora=("a", 1, str(adir))))
    s = gen[0]["samples"][0]
    assert max(abs(x - y) for x, y in zip(s["logprobs"], _hf_logprobs(pm, ids[0], s["token_ids"]))) < 2e-3

    # Merged policy into the engine's base weights (the online cells' sync).
    mdir = tmp_path_factory.mktemp("merged")
    pm.merge_and_unload().save_pretrained(str(mdir))
    secs = ray.get(engine.load_merged_weights.remote(str(mdir)))
    assert secs >= 0
    got = ray.get(engine.score_logprobs.remote(ids[0], comp))
    assert max(abs(x - y) for x, y in zip(got, ref_lora)) < 2e-3
    assert ray.get(engine.info.remote())["weights"] == str(mdir)
    # And back to the base weights.
    ray.get(engine.load_merged_weights.remote(tiny_path))
    got = ray.get(engine.score_logprobs.remote(ids[0], comp))
    assert max(abs(x - y) for x, y in zip(got, ref_base)) < 2e-3
