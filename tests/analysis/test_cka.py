"""analysis.cka: linear CKA against the HSIC form, its invariances, and
hidden-state collection against an unbatched per-prompt reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from scipy.stats import ortho_group
from wsg.analysis.cka import collect_hidden_states, layerwise_cka, linear_cka
from wsg.core.errors import WsgError


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: Gretton's HSIC form with an explicit centering
    matrix H = I − 11ᵀ/n on uncentred Gram matrices K = XXᵀ, L = YYᵀ."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k = x @ x.T
    l = y @ y.T
    return np.trace(k @ h @ l @ h) / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(l @ h @ l @ h))


# (n, d1, d2): the first two take the feature branch, the last two the Gram branch
SHAPES = [(60, 8, 12), (40, 40, 5), (12, 30, 50), (7, 100, 64)]


@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_linear_cka_matches_hsic_form(n, d1, d2):
    rng = np.random.default_rng(n + d1 + d2)
    for _ in range(20):
        x = rng.normal(size=(n, d1)) * rng.uniform(0.1, 5, size=d1) + rng.normal(size=d1) * 3
        # Partly related representations so CKA is away from 0 and 1.
        y = np.tanh(x @ rng.normal(size=(d1, d2))) + rng.normal(size=(n, d2)) * rng.uniform(0, 2)
        got = linear_cka(x, y)
        assert got == pytest.approx(hsic_cka(x, y), rel=1e-10)
        assert 0.0 <= got <= 1.0
        assert linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) == pytest.approx(got, rel=1e-5)


@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_linear_cka_invariances(n, d1, d2):
    rng = np.random.default_rng(7 * n + d1)
    x = rng.normal(size=(n, d1)) + 2.0
    y = x @ rng.normal(size=(d1, d2)) + rng.normal(size=(n, d2))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y)
    q1 = ortho_group.rvs(d1, random_state=1)
    q2 = ortho_group.rvs(d2, random_state=2)
    assert linear_cka(x @ q1, y @ q2) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * x, 0.02 * y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, x @ q1) == pytest.approx(1.0, abs=1e-12)
    # A general invertible (strongly anisotropic) map changes CKA.
    m = rng.normal(size=(d1, d1)) @ np.diag(np.logspace(-2, 2, d1))
    assert abs(np.linalg.det(m)) > 0
    assert abs(linear_cka(x @ m, y) - base) > 1e-3


def test_layerwise_and_errors():
    rng = np.random.default_rng(3)
    a = [rng.normal(size=(10, 4)) for _ in range(3)]
    b = [rng.normal(size=(10, 6)) for _ in range(3)]
    got = layerwise_cka(a, b)
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_allclose(got, [hsic_cka(x, y) for x, y in zip(a, b)], rtol=1e-10)
    with pytest.raises(WsgError, match="3 and 2"):
        layerwise_cka(a, b[:2])
    with pytest.raises(ValueError, match="10 rows, Y has 9"):
        linear_cka(a[0], b[0][:9])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones((5, 3)), b[0][:5])


def tiny_qwen3(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=1000,
    )
    return transformers.Qwen3ForCausalLM(cfg).eval()


def _reference(model, seqs):
    """One prompt at a time, no padding, plain mean over tokens."""
    per_layer = None
    with torch.no_grad():
        for s in seqs:
            out = model(input_ids=torch.tensor([s]), output_hidden_states=True)
            hs = [h[0].double().mean(0).numpy() for h in out.hidden_states[1:]]
            per_layer = [[v] for v in hs] if per_layer is None else [p + [v] for p, v in zip(per_layer, hs)]
    return [np.stack(p) for p in per_layer]


def _left_padded(seqs, pad=0):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def test_collect_hidden_states_matches_unbatched_reference():
    model = tiny_qwen3()
    g = torch.Generator().manual_seed(0)
    lengths = [5, 11, 3, 9, 14, 7, 2]
    seqs = [torch.randint(1, 1000, (n,), generator=g).tolist() for n in lengths]
    ids, mask = _left_padded(seqs)
    got = collect_hidden_states(model, input_ids=ids, attention_mask=mask, max_length=64, batch_size=3)
    ref = _reference(model, seqs)
    assert len(got) == 2 and got[0].shape == (7, 64) and got[0].dtype == np.float64
    for g_, r_ in zip(got, ref):
        np.testing.assert_allclose(g_, r_, rtol=1e-4, atol=1e-5)
    # Truncation keeps the first max_length tokens.
    got_t = collect_hidden_states(model, input_ids=ids, attention_mask=mask, max_length=4, batch_size=2)
    for g_, r_ in zip(got_t, _reference(model, [s[:4] for s in seqs])):
        np.testing.assert_allclose(g_, r_, rtol=1e-4, atol=1e-5)

    # PEFT-wrapped: the (non-zero) LoRA changes the states, and the result
    # still matches the per-prompt reference through the wrapper.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    peft_model = get_peft_model(tiny_qwen3(), cfg)
    got_p = collect_hidden_states(peft_model, input_ids=ids, attention_mask=mask, max_length=64, batch_size=4)
    for g_, r_ in zip(got_p, _reference(peft_model, seqs)):
        np.testing.assert_allclose(g_, r_, rtol=1e-4, atol=1e-5)
    assert np.abs(got_p[0] - got[0]).max() > 1e-3
    cka = layerwise_cka(got, got_p)
    assert cka.shape == (2,) and np.all((cka > 0) & (cka < 1))


def test_collect_hidden_states_from_text_prompts():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(1000)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0")
    prompts = ["w5 w17 w3", "w900 w2", "w44 w44 w44 w44 w1"]
    model = tiny_qwen3(1)
    got = collect_hidden_states(model, hf_tok, prompts, max_length=16, batch_size=2)
    ref = _reference(model, [[5, 17, 3], [900, 2], [44, 44, 44, 44, 1]])
    for g_, r_ in zip(got, ref):
        np.testing.assert_allclose(g_, r_, rtol=1e-4, atol=1e-5)
    with pytest.raises(WsgError, match="either prompts"):
        collect_hidden_states(model, hf_tok, prompts, max_length=16, batch_size=2, input_ids=[[1]])
