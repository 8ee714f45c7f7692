"""train.packed against separate training: K cells packed on one frozen base
(one forward and backward per micro-batch for all of them) give, step by
step, each cell's loss, pre-clip grad norm and LR, and after the last step
its LoRA tensors, as K PolicyTrainer + train_step runs of those cells alone.

Stated tolerance: float64 models agree to 1e-6 relative (the log-probs pass
through float32 in both paths, as in training); float32 models to 1e-4
relative (the packed batch's matrix products have other shapes, so float32
rounding differs; three AdamW steps carry it into the adapters)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from wsg.core.config import LoraCfg
from wsg.core.errors import WsgError
from wsg.train.data import collate_sequences
from wsg.train.losses import get_loss, validate_hyper
from wsg.train.packed import PackedCell, PackedTrainer, packed_train_step
from wsg.train.steps import PolicyTrainer, attach_lora, train_step

LC = LoraCfg(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
CELLS = [("sft", PackedCell(seed=1, lr=1e-2)), ("dpo", PackedCell(seed=2, lr=5e-3)),
         ("offline_grpo", PackedCell(seed=3, lr=2e-2)), ("rift", PackedCell(seed=1, lr=1e-2))]
STEPS, MICRO = 3, 2
OPT = dict(weight_decay=0.01, warmup_steps=1, max_steps=STEPS, max_grad_norm=0.05)


def tiny_base(dtype):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=128, vocab_size=300)
    return transformers.Qwen3ForCausalLM(cfg).to(dtype).eval()


def micro_batch(loss: str, rng: np.random.Generator):
    """Random sequences of random lengths: 4 rows (2 pairs for a paired
    loss), 2 groups, random 0/1 rewards."""
    n_prompt = rng.integers(2, 6, 4)
    seqs = [rng.integers(1, 300, int(p + rng.integers(1, 9))).tolist() for p in n_prompt]
    pairs = np.array([[0, 2], [1, 3]]) if get_loss(loss).paired else None
    return collate_sequences(seqs, n_prompt, pad_id=0, rewards=rng.integers(0, 2, 4).astype(float),
                             group_ids=np.array([0, 0, 1, 1]), pair_index=pairs)


def data():
    rng = np.random.default_rng(7)
    return [[[micro_batch(loss, rng) for _ in range(MICRO)] for _ in range(STEPS)] for loss, _ in CELLS]


def separate(base, batches):
    rows, adapters = [], []
    for (loss, cell), steps in zip(CELLS, batches):
        policy = attach_lora(copy.deepcopy(base), LC, seed=cell.seed)
        trainer = PolicyTrainer(policy, lr=cell.lr, device="cpu", **OPT)
        rows.append([train_step(trainer, get_loss(loss), validate_hyper(loss), mbs, world=1) for mbs in steps])
        adapters.append({n: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
                         for n, m in policy.get_base_model().named_modules() if hasattr(m, "lora_A")})
    return rows, adapters


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_packed_cells_train_as_they_do_alone(dtype, tol):
    base, batches = tiny_base(dtype), data()
    want, want_adapters = separate(base, batches)
    trainer = PackedTrainer(copy.deepcopy(base), LC, [c for _, c in CELLS], **OPT)
    specs, hypers = [get_loss(n) for n, _ in CELLS], [validate_hyper(n) for n, _ in CELLS]
    got = [packed_train_step(trainer, specs, hypers, [b[s] for b in batches]) for s in range(STEPS)]
    for k, (loss, _) in enumerate(CELLS):
        for s in range(STEPS):
            g, w = got[s][k], want[k][s]
            for key in ("loss", "grad_norm", "lr"):
                assert g[key] == pytest.approx(w[key], rel=tol, abs=1e-12), (loss, s, key)
        # Clipping is on (max_grad_norm below every cell's norm), so the check covers it.
        assert all(want[k][s]["grad_norm"] > OPT["max_grad_norm"] for s in range(STEPS))
        adapter = trainer.adapter(k)
        assert set(adapter) == set(want_adapters[k]) and len(adapter) == 2 * 3
        for name, (a, b) in adapter.items():
            torch.testing.assert_close(a, want_adapters[k][name][0], rtol=tol, atol=tol * 1e-2)
            torch.testing.assert_close(b, want_adapters[k][name][1], rtol=tol, atol=tol * 1e-2)
    # The cells moved apart: equal seeds (sft and rift) with other data and losses end elsewhere.
    a0, a3 = trainer.adapter(0), trainer.adapter(3)
    assert any(not torch.allclose(a0[n][1], a3[n][1]) for n in a0)


def test_a_cell_with_a_non_finite_loss_leaves_the_others_unchanged():
    """Cell 0's loss made NaN: it is not stepped, and every other cell ends
    where it ends when packed without it."""
    base, batches = tiny_base(torch.float64), data()
    specs, hypers = [get_loss(n) for n, _ in CELLS], [validate_hyper(n) for n, _ in CELLS]
    nan = copy.copy(specs[0])
    object.__setattr__(nan, "fn", lambda batch, **kw: (specs[0].fn(batch, **kw)[0] * float("nan"), {}))
    trainer = PackedTrainer(copy.deepcopy(base), LC, [c for _, c in CELLS], **OPT)
    out = packed_train_step(trainer, [nan] + specs[1:], hypers, [b[0] for b in batches])
    alone = PackedTrainer(copy.deepcopy(base), LC, [c for _, c in CELLS[1:]], **OPT)
    ref = packed_train_step(alone, specs[1:], hypers[1:], [b[0] for b in batches[1:]])
    assert np.isnan(out[0]["loss"]) and np.isnan(out[0]["grad_norm"])
    init = PackedTrainer(copy.deepcopy(base), LC, [CELLS[0][1]], **OPT).adapter(0)
    for name, (a, b) in trainer.adapter(0).items():
        assert torch.equal(a, init[name][0]) and torch.equal(b, init[name][1])
    for k in range(1, len(CELLS)):
        assert out[k]["loss"] == pytest.approx(ref[k - 1]["loss"], rel=1e-9)
        for name, (a, b) in trainer.adapter(k).items():
            torch.testing.assert_close(b, alone.adapter(k - 1)[name][1], rtol=1e-9, atol=1e-12)


def test_refusals():
    base = tiny_base(torch.float32)
    with pytest.raises(WsgError, match="train.lora.dropout"):
        PackedTrainer(base, LoraCfg(r=4, alpha=8, dropout=0.1), [PackedCell(1, 1e-3)], **OPT)
    trainer = PackedTrainer(base, LC, [PackedCell(1, 1e-3), PackedCell(2, 1e-3)], **OPT)
    rng = np.random.default_rng(0)
    with pytest.raises(WsgError, match="same number of micro-batches"):
        packed_train_step(trainer, [get_loss("sft")] * 2, [{}] * 2,
                          [[micro_batch("sft", rng)], [micro_batch("sft", rng)] * 2])
