"""Chat prompts: one problem -> the messages -> the templated text the model sees.

Every consumer (the rollout engines, the OpenAI-compatible teacher, the
transformers baseline in bench/, evaluation) builds prompts through
`build_messages` / `render_prompts`, so the text a teacher was fed
(`rollouts.parquet: prompt_text`) is exactly what training and evaluation
re-create from the same problem.
"""
from __future__ import annotations

from typing import Any, Sequence


def user_content(problem: str, *, instruction: str = "") -> str:
    """The user turn: the problem, then the answer-format instruction on its
    own paragraph (the embedded default asks for `\\boxed{}`, docs/design.md)."""
    problem = problem.strip()
    instruction = (instruction or "").strip()
    return f"{problem}\n\n{instruction}" if instruction else problem


def build_messages(problem: str, *, instruction: str = "",
                   system_prompt: str | None = None) -> list[dict[str, str]]:
    """ChatML-style messages. `system_prompt=None` leaves the system turn to the
    model's template (SmolLM2's template inserts its own default one)."""
    msgs: list[dict[str, str]] = []
    if system_prompt is not None:
        msgs.append({"role": "system", "content": system_prompt})
    msgs.append({"role": "user", "content": user_content(problem, instruction=instruction)})
    return msgs


def _problem_text(p: Any) -> str:
    # A Problem (rollouts.datasets) or a plain string.
    return p.problem if hasattr(p, "problem") else str(p)


def render_prompts(tokenizer, problems: Sequence[Any], *, instruction: str = "",
                   system_prompt: str | None = None) -> list[str]:
    """Chat-templated prompt texts (generation prompt appended, not tokenized).

    Raises ValueError when the tokenizer has no chat template: a base model
    would be prompted with raw text the seed protocol never uses."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; use an instruct/chat model")
    out = []
    for p in problems:
        msgs = build_messages(_problem_text(p), instruction=instruction, system_prompt=system_prompt)
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of already-templated texts. No special tokens are added: the
    template already wrote any BOS the model needs, and a second one would make
    the ids differ from what the teacher was fed."""
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
