"""analysis.logit_lens against a plain per-sequence, per-position,
per-layer loop that reads the residual stream with forward hooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from wsg.analysis.logit_lens import depths_from_top1, prediction_depth
from wsg.core.errors import WsgError


def tiny_qwen3(seed: int = 0, layers: int = 4):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=1000, tie_word_embeddings=False,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        # Larger embeddings keep early readouts close to the last one on some
        # tokens, so depths spread over 0..L instead of all sitting at L
        # (with this seed: 8, 2, 6, 4, 21 positions at depths 0..4).
        model.model.embed_tokens.weight.mul_(3.0)
    return model


def loop_depths(model, seqs):
    """Straightforward reference: hooks capture each block's raw output, every
    layer is read out through norm + lm_head one position at a time, and the
    depth is found by walking down from the last layer."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    captured = []
    hooks = [blk.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for blk in inner.model.layers]
    depths = []
    try:
        with torch.no_grad():
            for s in seqs:
                captured.clear()
                ids = torch.tensor([s])
                final = model(input_ids=ids).logits[0]
                states = [inner.model.embed_tokens(ids)[0]] + [c[0] for c in captured]
                n_layers = len(states) - 1
                for t in range(len(s)):
                    target = int(final[t].argmax())
                    preds = [int(inner.lm_head(inner.model.norm(h[t])).argmax()) for h in states[:-1]] + [target]
                    d = n_layers
                    while d > 0 and preds[d - 1] == target:
                        d -= 1
                    depths.append(d)
    finally:
        for h in hooks:
            h.remove()
    return np.array(depths, dtype=np.float64)


def _padded(seqs, left: bool):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), 7)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


SEQS = [torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (6, 13, 2, 9, 11)]


@pytest.fixture(scope="module")
def model_and_loop_depths():
    model = tiny_qwen3()
    return model, loop_depths(model, SEQS)


@pytest.mark.parametrize("left", [False, True])
def test_prediction_depth_matches_loop(left, model_and_loop_depths):
    model, ref = model_and_loop_depths
    # The check is only meaningful if depths vary across positions.
    assert len(set(ref.tolist())) >= 4, ref
    ids, mask = _padded(SEQS, left)
    got = prediction_depth(model, ids, mask, batch_size=2)
    assert got == pytest.approx(ref.mean(), abs=1e-12)
    assert 0 <= got <= 4


def test_prediction_depth_through_peft():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_qwen3(1), cfg).eval()
    ids, mask = _padded(SEQS, False)
    assert prediction_depth(model, ids, mask, batch_size=3) == pytest.approx(loop_depths(model, SEQS).mean(), abs=1e-12)


def test_depths_from_top1_hand_example():
    top1 = np.array([
        [5, 1, 2, 9],   # embedding readout
        [5, 3, 2, 9],
        [4, 3, 2, 8],
        [5, 3, 2, 9],   # final
    ])
    # col 0: equal at 0,1 then 4 then 5 -> settles at 3; col 1: from 1;
    # col 2: always -> 0; col 3: 8 at layer 2 -> 3.
    np.testing.assert_array_equal(depths_from_top1(top1), [3, 1, 0, 3])


def test_errors():
    with pytest.raises(WsgError, match="batch_size"):
        prediction_depth(tiny_qwen3(layers=1), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        prediction_depth(tiny_qwen3(layers=1), torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3))


@pytest.mark.parametrize("left", [False, True])
def test_layer_depths_equal_every_layers_readout(left, model_and_loop_depths):
    """The early-stopping readout gives, position by position, the depths of
    the full [L+1, n] top-1 table."""
    from wsg.analysis.logit_lens import layer_depths, layer_top1

    model, _ = model_and_loop_depths
    ids, mask = _padded(SEQS, left)
    fast = layer_depths(model, ids, mask, batch_size=2)
    full = [depths_from_top1(t) for t in layer_top1(model, ids, mask, batch_size=3)]
    assert [len(x) for x in fast] == [len(s) for s in SEQS]
    for f, g in zip(fast, full):
        np.testing.assert_array_equal(f, g)
