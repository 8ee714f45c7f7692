"""analysis.lmc: the concatenated-factor LoRA path against peft-loaded
endpoints and a dense merge, and the masked answer CE against a hand
computation, on a tiny random Qwen3."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from wsg.analysis.lmc import (
    interpolate_lora,
    masked_answer_ce,
    masked_answer_nll,
    write_interpolated_adapter,
)
from wsg.analysis.lora_io import read_lora_factors
from wsg.core.errors import WsgError

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_qwen3(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=1000,
    )
    return transformers.Qwen3ForCausalLM(cfg).eval()


def make_adapter(path, *, lora_seed, r=4, lora_alpha=8, use_rslora=False):
    model = get_peft_model(tiny_qwen3(0), LoraConfig(
        r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=PROJ, init_lora_weights=False,
    ))
    with torch.no_grad():  # a distinct, non-zero LoRA per seed (B is random with init_lora_weights=False)
        g = torch.Generator().manual_seed(lora_seed)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(path))
    return str(path)


def load(adapter_dir):
    return PeftModel.from_pretrained(tiny_qwen3(0), adapter_dir).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(1, 1000, (3, 12), generator=torch.Generator().manual_seed(5))


def test_interpolate_lora_equals_dense_on_random_factors():
    rng = np.random.default_rng(0)
    fa, fb = {}, {}
    for name, (dout, din) in {"m0": (7, 5), "m1": (3, 9)}.items():
        fa[name] = (rng.normal(size=(dout, 4)), rng.normal(size=(4, din)), 2.0)  # (B, A, s)
        fb[name] = (rng.normal(size=(dout, 2)), rng.normal(size=(2, din)), 3 / np.sqrt(2))
    for alpha in (0.0, 0.25, 1.0, 1.5):
        out = interpolate_lora(fa, fb, alpha)
        for name in fa:
            b_cat, a_cat, s = out[name]
            assert s == 1.0 and a_cat.shape[0] == b_cat.shape[1] == 6
            dense = alpha * fa[name][2] * fa[name][0] @ fa[name][1] + (1 - alpha) * fb[name][2] * fb[name][0] @ fb[name][1]
            np.testing.assert_allclose((b_cat @ a_cat).numpy(), dense, rtol=1e-12, atol=1e-12)
    with pytest.raises(WsgError, match="same modules"):
        interpolate_lora(fa, {"m0": fb["m0"]}, 0.5)
    bad = dict(fb, m1=(rng.normal(size=(3, 2)), rng.normal(size=(2, 8)), 1.0))
    with pytest.raises(ValueError, match="m1"):
        interpolate_lora(fa, bad, 0.5)


@pytest.mark.parametrize("b_kwargs", [dict(r=4, lora_alpha=8), dict(r=2, lora_alpha=6, use_rslora=True)])
def test_interpolated_adapter_endpoints_and_dense_merge(tmp_path, b_kwargs):
    dir_a = make_adapter(tmp_path / "a", lora_seed=1)
    dir_b = make_adapter(tmp_path / "b", lora_seed=2, **b_kwargs)
    peft_a, peft_b = load(dir_a), load(dir_b)
    la, lb, base = logits(peft_a, IDS), logits(peft_b, IDS), logits(tiny_qwen3(0), IDS)
    assert (la - lb).abs().max() > 1e-2 and (la - base).abs().max() > 1e-2  # the adapters do something

    for alpha, ref in ((1.0, la), (0.0, lb)):
        out = write_interpolated_adapter(dir_a, dir_b, alpha, str(tmp_path / f"i{alpha}"))
        cfg = json.load(open(os.path.join(out, "adapter_config.json")))
        assert cfg["r"] == 4 + b_kwargs["r"] and cfg["lora_alpha"] == cfg["r"] and not cfg["use_rslora"]
        torch.testing.assert_close(logits(load(out), IDS), ref, rtol=1e-4, atol=1e-5)

    # Dense reference: W + α ΔW_a + (1−α) ΔW_b with ΔW from peft's own get_delta_weight.
    alpha = 0.3
    dense = tiny_qwen3(0)
    with torch.no_grad():
        for name, mod in peft_a.base_model.model.named_modules():
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
                mod_b = peft_b.base_model.model.get_submodule(name)
                delta = alpha * mod.get_delta_weight("default") + (1 - alpha) * mod_b.get_delta_weight("default")
                dense.get_submodule(name).weight += delta
    out = write_interpolated_adapter(dir_a, dir_b, alpha, str(tmp_path / "mid"))
    interp = logits(load(out), IDS)
    torch.testing.assert_close(interp, logits(dense, IDS), rtol=1e-4, atol=1e-5)
    assert (interp - la).abs().max() > 1e-3 and (interp - lb).abs().max() > 1e-3


def test_read_and_write_refusals(tmp_path):
    dir_a = make_adapter(tmp_path / "a", lora_seed=1)
    spec, factors = read_lora_factors(dir_a)
    assert len(factors) == 2 * 4 and spec.config["r"] == 4
    assert all(s == 2.0 and a.shape[0] == 4 and b.shape[1] == 4 for b, a, s in factors.values())
    with pytest.raises(WsgError, match="adapter_config.json"):
        read_lora_factors(str(tmp_path / "missing"))
    # An adapter on fewer modules cannot be interpolated with a.
    model = get_peft_model(tiny_qwen3(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "q"))
    with pytest.raises(WsgError, match="different modules"):
        write_interpolated_adapter(dir_a, str(tmp_path / "q"), 0.5, str(tmp_path / "out"))
    cfg_path = tmp_path / "a" / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["use_dora"] = True
    cfg_path.write_text(json.dumps(c))
    with pytest.raises(WsgError, match="use_dora"):
        read_lora_factors(dir_a)
    c["use_dora"], c["alpha_pattern"] = False, {"q_proj": 2}  # readable, but not interpolable
    cfg_path.write_text(json.dumps(c))
    with pytest.raises(WsgError, match="cannot interpolate: alpha_pattern"):
        write_interpolated_adapter(dir_a, dir_a, 0.5, str(tmp_path / "out2"))


def _hand_ce(model, pairs):
    """Unbatched: full logits, log_softmax, gather the answer positions."""
    total, count = [], []
    with torch.no_grad():
        for p, a in pairs:
            ids = torch.tensor([p + a])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            s = sum(-logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(a))
            total.append(s)
            count.append(len(a))
    return np.array(total), np.array(count)


def test_masked_answer_ce_matches_hand_computation(tmp_path):
    g = torch.Generator().manual_seed(9)
    pairs = [
        (torch.randint(1, 1000, (lp,), generator=g).tolist(), torch.randint(1, 1000, (la,), generator=g).tolist())
        for lp, la in [(5, 3), (1, 4), (9, 1), (4, 6), (12, 2)]
    ]
    model = load(make_adapter(tmp_path / "a", lora_seed=3))
    ref_sum, ref_n = _hand_ce(model, pairs)
    nll, ntok = masked_answer_nll(model, None, pairs, batch_size=2)
    np.testing.assert_allclose(nll, ref_sum, rtol=1e-5)
    np.testing.assert_array_equal(ntok, ref_n)
    ce = masked_answer_ce(model, None, pairs, batch_size=3)
    assert ce == pytest.approx(ref_sum.sum() / ref_n.sum(), rel=1e-5)
    # Scoring the prompt instead would give a different number: the mask matters.
    assert masked_answer_ce(model, None, [(p[:1], p[1:] + a) for p, a in pairs if len(p) > 1], batch_size=2) != pytest.approx(ce)


def test_masked_answer_ce_text_items():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(1000)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0")
    model = tiny_qwen3(0)
    items = [("w1 w2 w3", "w7 w8"), ("w10", "w11 w12 w13")]
    ref_sum, ref_n = _hand_ce(model, [([1, 2, 3], [7, 8]), ([10], [11, 12, 13])])
    assert masked_answer_ce(model, hf_tok, items, batch_size=2) == pytest.approx(ref_sum.sum() / ref_n.sum(), rel=1e-5)
    with pytest.raises(WsgError, match="tokenizer"):
        masked_answer_ce(model, None, items, batch_size=2)
