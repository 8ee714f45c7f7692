"""analysis.shared_prefix against the full-forward references it replaces in
the functional stage: lmc.masked_answer_nll, cka.collect_hidden_states and
logit_lens.prediction_depth, on tiny random Qwen3 models (plain and with a
random LoRA) and rows that share a prefix of random tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from wsg.analysis.cka import collect_hidden_states, right_pad
from wsg.analysis.lmc import masked_answer_nll
from wsg.analysis.logit_lens import prediction_depth
from wsg.analysis.shared_prefix import answer_nll, common_prefix_len, hidden_and_depth

PAD = 0


def tiny(dtype, *, lora: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=128, vocab_size=500, tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        # Larger embeddings spread the logit-lens depths over 0..L (as in test_logit_lens).
        model.model.embed_tokens.weight.mul_(3.0)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model.to(dtype).eval()


def rows(n: int, prefix: int, seed: int) -> list[list[int]]:
    """n rows of random tokens (1..499) of different lengths after a common prefix."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, 500, (prefix,), generator=g).tolist()
    return [head + torch.randint(1, 500, (int(k),), generator=g).tolist()
            for k in torch.randint(2, 12, (n,), generator=g)]


def test_common_prefix_len_by_hand():
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 7]]) == 2
    # Leaves a token of the shortest row: identical rows share all but their last.
    assert common_prefix_len([[5, 6, 7], [5, 6, 7]]) == 2
    assert common_prefix_len([[5, 6, 7], [5, 6, 7]], leave=0) == 3
    assert common_prefix_len([[1, 2], [3, 2]]) == 0
    assert common_prefix_len([[4]]) == 0
    assert common_prefix_len([]) == 0


CASES = [(torch.float64, False, 1e-10), (torch.float64, True, 1e-10), (torch.float32, True, 2e-5)]


@pytest.mark.parametrize("prefix", [0, 9])
@pytest.mark.parametrize("dtype,lora,tol", CASES)
def test_answer_nll_equals_the_full_forward(dtype, lora, tol, prefix):
    model = tiny(dtype, lora=lora)
    prompts = rows(7, prefix, seed=1)
    g = torch.Generator().manual_seed(2)
    pairs = [(p, torch.randint(1, 500, (int(k),), generator=g).tolist())
             for p, k in zip(prompts, torch.randint(1, 6, (7,), generator=g))]
    assert common_prefix_len([p for p, _ in pairs]) >= prefix
    nll, ntok = answer_nll(model, pairs, PAD, batch_size=3)
    ref_nll, ref_ntok = masked_answer_nll(model, None, pairs, batch_size=3)
    np.testing.assert_array_equal(ntok, ref_ntok)
    assert np.all(nll > 0)
    np.testing.assert_allclose(nll, ref_nll, rtol=tol, atol=0)


@pytest.mark.parametrize("prefix", [0, 9])
@pytest.mark.parametrize("dtype,lora,tol", CASES)
def test_hidden_and_depth_equal_the_full_forward(dtype, lora, tol, prefix):
    model = tiny(dtype, lora=lora, seed=3)
    seqs = rows(6, prefix, seed=4)
    pooled, depth = hidden_and_depth(model, seqs, PAD, batch_size=4)
    ids, mask = right_pad(seqs, PAD)
    ref = collect_hidden_states(model, input_ids=ids, attention_mask=mask, max_length=64, batch_size=4)
    assert len(pooled) == len(ref) == 4
    for got, want in zip(pooled, ref):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    ref_depth = prediction_depth(model, ids, mask, batch_size=4)
    if dtype == torch.float64:
        # Float64 leaves no near-tie for the argmax to flip: the depths are the same numbers.
        assert depth == pytest.approx(ref_depth, abs=1e-12)
    else:
        assert depth == pytest.approx(ref_depth, abs=0.05)
    assert 0 < depth < 4  # the depths vary: the check is not vacuous


def test_answer_nll_refuses_empty_items():
    from wsg.core.errors import WsgError
    with pytest.raises(WsgError, match="at least one prompt token and one answer token"):
        answer_nll(tiny(torch.float32, lora=False), [([1, 2], [])], PAD, batch_size=2)


@pytest.mark.parametrize("n_hidden,n_ans", [(3, 5), (5, 2), (4, 4)])
def test_one_pass_serves_cka_the_lens_and_the_answers(n_hidden, n_ans):
    """model_pass: the first n_hidden prompts' hidden states and depths (the
    answers appended to some of them change nothing: causal attention) and
    the first n_ans prompts' answer NLL, each equal to its own reference."""
    from wsg.analysis.shared_prefix import model_pass

    model = tiny(torch.float64, lora=True, seed=5)
    prompts = rows(5, 7, seed=6)
    g = torch.Generator().manual_seed(8)
    answers = [torch.randint(1, 500, (int(k),), generator=g).tolist() for k in torch.randint(1, 5, (n_ans,), generator=g)]
    res = model_pass(model, prompts, PAD, batch_size=2, n_hidden=n_hidden, answers=answers)
    ids, mask = right_pad(prompts[:n_hidden], PAD)
    ref = collect_hidden_states(model, input_ids=ids, attention_mask=mask, max_length=64, batch_size=2)
    for got, want in zip(res.pooled, ref):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert res.depth == pytest.approx(prediction_depth(model, ids, mask, batch_size=2), abs=1e-12)
    ref_nll, ref_ntok = masked_answer_nll(model, None, list(zip(prompts[:n_ans], answers)), batch_size=2)
    np.testing.assert_allclose(res.nll, ref_nll, rtol=1e-10)
    np.testing.assert_array_equal(res.ntok, ref_ntok)
