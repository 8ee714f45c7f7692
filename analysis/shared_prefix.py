"""Forward passes that run the token prefix every row shares once per model.

The functional stage scores the same eval prompts under many models (every
adapter's hidden states and logit lens, four α points per LMC pair), and every
prompt starts with the same chat-template tokens: in the default 24 of ~50
(system prompt and the user turn's header), about half of each forward. Here
that prefix runs once per model, as a batch of one whose keys and values are
cached, and each batch runs only its rows' remaining tokens after it.

Under causal attention the prefix's states do not depend on what follows, so
this is the full forward's computation; the numbers differ from it by float
rounding only (the matrix products have other shapes). Tests hold both
functions here to the full-forward references (lmc.masked_answer_nll,
cka.collect_hidden_states, logit_lens.prediction_depth).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .cka import inference, right_pad
from .lmc import LmcInputError
from .logit_lens import depths_of_states, readout_modules


def common_prefix_len(seqs: Sequence[Sequence[int]], *, leave: int = 1) -> int:
    """Length of the token prefix all `seqs` share, leaving at least `leave`
    tokens of the shortest one after it (a row needs a token of its own to be
    run, and its last prompt token predicts the first answer token)."""
    if not seqs:
        return 0
    n = max(0, min(len(s) for s in seqs) - leave)
    first = list(seqs[0][:n])
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


@dataclass
class Prefix:
    """The shared prefix as one model ran it (batch of one)."""

    length: int
    cache: object  # the model's key/value cache after the prefix
    hidden: Optional[tuple] = None  # every layer's hidden states [1, length, h]
    logits: Optional[torch.Tensor] = None  # [1, length, vocab]


def run_prefix(model, ids: Sequence[int], *, hidden: bool = False) -> Optional[Prefix]:
    """Run the prefix `ids` once (None when it is empty)."""
    if not ids:
        return None
    device = next(model.parameters()).device
    x = torch.as_tensor([list(ids)], device=device)
    out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, output_hidden_states=hidden,
                logits_to_keep=0 if hidden else 1)
    return Prefix(length=len(ids), cache=out.past_key_values, hidden=out.hidden_states if hidden else None,
                  logits=out.logits if hidden else None)


def run_rows(model, prefix: Optional[Prefix], rows: Sequence[Sequence[int]], pad: int, *, hidden: bool = False,
             logits_to_keep=0):
    """The forward of `rows` (their tokens after the prefix), right padded.
    Returns the model's output (positions are the rows' own, after the
    prefix) and the rows' [B, T] mask."""
    device = next(model.parameters()).device
    ids, mask = right_pad(rows, pad)
    ids, mask = ids.to(device), mask.to(device)
    if prefix is None:
        return model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=hidden,
                     logits_to_keep=logits_to_keep), mask
    b, p = ids.shape[0], prefix.length
    cache = copy.deepcopy(prefix.cache)  # a forward appends to its cache in place
    cache.batch_repeat_interleave(b)
    # Right padding: a row's real tokens sit at positions p, p+1, ... of its sequence.
    pos = (p + torch.arange(ids.shape[1], device=device)).unsqueeze(0).expand(b, -1)
    full = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=device), mask], dim=1)
    out = model(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=cache, use_cache=True,
                output_hidden_states=hidden, logits_to_keep=logits_to_keep)
    return out, mask


@dataclass
class ModelPass:
    """What one model gives on the eval items (functional.py's model unit)."""

    pooled: Optional[list]  # L float64 arrays [n_hidden, hidden]: mean over each prompt's tokens per block
    depth: Optional[float]  # mean logit-lens prediction depth over those prompts' tokens
    nll: Optional[np.ndarray]  # per answered item: −log p summed over its answer tokens
    ntok: Optional[np.ndarray]  # per answered item: its answer tokens


def _answer_nll(logits: torch.Tensor, row: int, first: int, answer: Sequence[int]) -> float:
    """−Σ log p of `answer`, predicted from positions first, first+1, … of `row`."""
    pos = torch.arange(first, first + len(answer), device=logits.device)
    logp = torch.log_softmax(logits[row, pos].float(), dim=-1)
    return -logp[torch.arange(len(answer), device=logits.device),
                 torch.as_tensor(list(answer), device=logits.device)].double().sum().item()


def _pool(pooled: list, idx: list, blocks, real: torch.Tensor, p: int, pre_sum: Optional[list]) -> None:
    """Rows `idx` of every block's mean over the prompt's tokens: the prefix's
    summed states (`pre_sum`, the same in every row) plus the row's own."""
    m = real.to(torch.float64).unsqueeze(-1)
    count = m.sum(1) + p
    for layer, h in enumerate(blocks):
        total = (h.to(torch.float64) * m).sum(1) + (pre_sum[layer] if pre_sum is not None else 0.0)
        pooled[layer][idx] = (total / count).cpu().numpy()


def model_pass(model, prompts: Sequence[Sequence[int]], pad: int, *, batch_size: int, n_hidden: int,
               answers: Sequence[Sequence[int]] = ()) -> ModelPass:
    """One model over token prompts, their shared prefix run once: CKA's
    pooled hidden states and the logit lens's depth on the first `n_hidden`
    prompts (their prompt tokens only), and the answer NLL of the first
    len(answers) prompts each followed by its answer (lmc.masked_answer_nll).
    One forward per batch serves all three: under causal attention a prompt's
    states do not depend on the answer after it. The prefix's positions are
    the same in every row: their depths are read once and count once per row."""
    n_ans = len(answers)
    if (n_ans and any(len(a) < 1 for a in answers)) or any(len(q) < 1 for q in prompts[:max(n_hidden, n_ans)]):
        raise LmcInputError("model_pass needs at least one prompt token and one answer token per item")
    n = max(n_hidden, n_ans)
    prompts = [list(q) for q in prompts[:n]]
    p = common_prefix_len(prompts)
    norm, head = readout_modules(model)
    device = next(model.parameters()).device
    nll = np.zeros(n_ans, np.float64)
    pooled, depth_sum = None, 0.0

    def rows_of(idx):
        return [prompts[i][p:] + (list(answers[i]) if i < n_ans else []) for i in idx]

    # Batches never mix rows that need every position's logits (the lens)
    # with rows that need only their answers' (the rest reach the LM head there only).
    def length(i):
        return len(prompts[i]) - p + (len(answers[i]) if i < n_ans else 0)

    groups = [sorted(range(n_hidden), key=length), sorted(range(n_hidden, n), key=length)]
    with inference(model):
        prefix = run_prefix(model, prompts[0][:p], hidden=n_hidden > 0)
        if prefix is not None and n_hidden:
            pre_sum = [h[0].to(torch.float64).sum(0) for h in prefix.hidden[1:]]
            pre_depth = depths_of_states([h[0] for h in prefix.hidden[:-1]], prefix.logits[0].argmax(-1), norm, head)
            depth_sum += n_hidden * float(pre_depth.astype(np.float64).sum())
        for g, order in enumerate(groups):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                lo = 0 if g == 0 else min(len(prompts[i]) for i in idx) - 1 - p
                hi = max(length(i) for i in idx)
                out, mask = run_rows(model, prefix, rows_of(idx), pad, hidden=g == 0,
                                     logits_to_keep=0 if g == 0 else torch.arange(lo, hi, device=device))
                for row, i in enumerate(idx):
                    if i < n_ans:
                        nll[i] = _answer_nll(out.logits, row, len(prompts[i]) - 1 - p - lo, answers[i])
                if g == 1:
                    continue
                # Prompt tokens only: [B, T] true where a row's position holds one of its prompt's tokens.
                real = torch.arange(mask.shape[1], device=device)[None, :] < torch.as_tensor(
                    [len(prompts[i]) - p for i in idx], device=device)[:, None]
                hs = out.hidden_states
                depth_sum += float(depths_of_states([h[real] for h in hs[:-1]], out.logits[real].argmax(-1),
                                                    norm, head).astype(np.float64).sum())
                if pooled is None:
                    pooled = [np.zeros((n_hidden, h.shape[-1]), np.float64) for h in hs[1:]]
                _pool(pooled, idx, hs[1:], real, p, pre_sum if prefix is not None else None)
    depth = depth_sum / float(sum(len(q) for q in prompts[:n_hidden])) if n_hidden else None
    return ModelPass(pooled=pooled, depth=depth, nll=nll if n_ans else None,
                     ntok=np.array([len(a) for a in answers], np.int64) if n_ans else None)


def answer_nll(model, pairs: Sequence[tuple], pad: int, *, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """lmc.masked_answer_nll on token pairs (prompt_ids, answer_ids), the
    prompts' shared prefix run once: per item the −log p summed over the
    answer tokens, and their count."""
    if not pairs:
        raise LmcInputError("answer_nll needs at least one item")
    res = model_pass(model, [q for q, _ in pairs], pad, batch_size=batch_size, n_hidden=0,
                     answers=[a for _, a in pairs])
    return res.nll, res.ntok


def hidden_and_depth(model, seqs: Sequence[Sequence[int]], pad: int, *, batch_size: int) -> tuple[list, float]:
    """cka.collect_hidden_states and logit_lens.prediction_depth of the same
    sequences from one forward per batch, their shared prefix run once: the
    mean-pooled hidden state of every decoder block (L float64 arrays
    [n, hidden]) and the mean prediction depth over every token position."""
    res = model_pass(model, seqs, pad, batch_size=batch_size, n_hidden=len(seqs))
    return res.pooled, res.depth
