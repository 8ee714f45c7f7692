"""Linear CKA of hidden states (seed paper §2 Analysis (iv), §3.6; Kornblith
et al. 2019) and the hidden-state collection it runs on.

Linear CKA between representations X ∈ R^{n×d1} and Y ∈ R^{n×d2} of the same
n inputs, after centring every column:

    CKA(X, Y) = ‖YᵀX‖_F² / (‖XᵀX‖_F · ‖YᵀY‖_F)

It is invariant to orthogonal transforms and isotropic scaling of either side
but not to general invertible maps, which is what makes it a similarity of
representations rather than of information content.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

from ..core.errors import WsgError


class CkaInputError(WsgError, ValueError):
    """Bad input to CKA or hidden-state collection."""


def _as_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise CkaInputError(f"linear_cka: {name} must be 2-D [n, d], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise CkaInputError(f"linear_cka: {name} has non-finite values")
    return a


def linear_cka(X, Y) -> float:
    """Linear CKA of two representations of the same n examples (rows).

    Computed in float64 from the feature form ‖YᵀX‖_F² when the widths are
    small, or from the n×n Gram matrices (‖YᵀX‖_F² = ⟨XXᵀ, YYᵀ⟩_F) when n is
    smaller than the widths, which is the usual case (100 prompts, d = 2560).
    """
    x = _as_float64(X, "X")
    y = _as_float64(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise CkaInputError(
            f"linear_cka needs the same examples on both sides: X has {x.shape[0]} rows, Y has {y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise CkaInputError(f"linear_cka needs at least 2 examples, got {x.shape[0]}")
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    n = x.shape[0]
    if n < min(x.shape[1], y.shape[1]):
        k = x @ x.T
        l = y @ y.T
        num = float(np.sum(k * l))
        den = float(np.linalg.norm(k) * np.linalg.norm(l))
    else:
        num = float(np.linalg.norm(y.T @ x) ** 2)
        den = float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    if den == 0.0:
        raise CkaInputError(
            "linear_cka is undefined when one representation is constant across examples "
            "(zero variance after centring)"
        )
    return num / den


def layerwise_cka(hs_a: Sequence, hs_b: Sequence) -> np.ndarray:
    """CKA per layer between two lists of [n, d] hidden states (float64 [L])."""
    if len(hs_a) != len(hs_b):
        raise CkaInputError(
            f"layerwise_cka needs the same number of layers on both sides, got {len(hs_a)} and {len(hs_b)}"
        )
    return np.array([linear_cka(a, b) for a, b in zip(hs_a, hs_b)], dtype=np.float64)


@contextmanager
def inference(model):
    """Eval mode without autograd for the block; the model's mode is restored
    after (every readout of analysis/: CKA, LMC, logit lens)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token sequences right-padded, with their attention mask.

    Right padding, because transformers 5.x numbers positions 0..T−1 whatever
    the mask says: with left padding the real tokens would sit at shifted
    rotary positions and their hidden states would change.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def unpad(input_ids, attention_mask) -> list[list[int]]:
    """The real tokens of each row of a (left- or right-) padded batch."""
    ids = torch.as_tensor(input_ids)
    mask = torch.as_tensor(attention_mask).bool()
    if ids.shape != mask.shape or ids.ndim != 2:
        raise CkaInputError(
            f"input_ids and attention_mask must both be [batch, seq]; got {tuple(ids.shape)} and {tuple(mask.shape)}"
        )
    return [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]


def pad_token_id(tokenizer) -> int:
    """A pad id for the tokenizer; its value never matters (masked out)."""
    if tokenizer is None:
        return 0
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def collect_hidden_states(
    model,
    tokenizer=None,
    prompts: list[str] | None = None,
    *,
    max_length: int,
    batch_size: int,
    input_ids=None,
    attention_mask=None,
) -> list[np.ndarray]:
    """Mean-pooled (over real tokens) hidden state of every decoder block.

    Give either `prompts` (with `tokenizer`; texts are used as they are, so
    apply any chat template first) or an already tokenized `input_ids` +
    `attention_mask` batch. Sequences are truncated to `max_length` tokens.
    Works on a plain transformers causal LM or a PEFT-wrapped one (the LoRA is
    applied unmerged). Returns L float64 arrays [n_prompts, hidden]: entry i is
    the output of block `layers.<i>` as transformers reports it (the last one
    after the final norm, since transformers ties it to last_hidden_state).
    """
    if batch_size < 1 or max_length < 1:
        raise CkaInputError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    if (prompts is None) == (input_ids is None):
        raise CkaInputError("collect_hidden_states: give either prompts (with a tokenizer) or input_ids, not both")
    if prompts is not None:
        if tokenizer is None:
            raise CkaInputError("collect_hidden_states: prompts need a tokenizer")
        seqs = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    else:
        if attention_mask is None:
            attention_mask = torch.ones_like(torch.as_tensor(input_ids))
        seqs = unpad(input_ids, attention_mask)
    seqs = [list(s)[:max_length] for s in seqs]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise CkaInputError("collect_hidden_states needs at least one prompt and no empty prompt")
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    # Length-sorted batches waste less compute on padding; rows go back in order.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pooled: list[np.ndarray] | None = None
    with inference(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = right_pad([seqs[i] for i in idx], pad)
            ids, mask = ids.to(device), mask.to(device)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            blocks = out.hidden_states[1:]  # [0] is the embedding output
            if pooled is None:
                pooled = [np.zeros((len(seqs), h.shape[-1]), np.float64) for h in blocks]
            m = mask.to(torch.float64).unsqueeze(-1)
            for layer, h in enumerate(blocks):
                mean = (h.to(torch.float64) * m).sum(1) / m.sum(1)
                pooled[layer][idx] = mean.cpu().numpy()
    return pooled
