"""Binary math reward: the completion's final NUMBER, verified against the gold.

Plain math-verify is hackable here: it parses "5 + 4" as an expression equal
to 9, so a completion that only echoes the question "What is 5 + 4?" would be
credited (docs/stack.md, docs/design.md "reward"). So the reward first extracts ONE final
answer and accepts it only if it is a number:

1. the content of the last `\\boxed{...}` (or `\\fbox{}`) if there is one,
   right of its last "=" if it has one ("\\boxed{x = 9}"): a boxed expression
   is the model's final answer, so "\\boxed{5+4}" scores 0;
2. else the last number stated as an answer: the whole completion if it is
   a number, else the last number right after "answer (is|:)", "=", "equals"
   or "is" that is not an operand of an arithmetic expression ("is 5 + 4"
   states no number).

A number is an integer, a decimal, or a fraction in lowest terms (an
unreduced 18/2 is an unevaluated division). When the gold itself is not a
number (DeepScaleR has golds such as `\\frac{\\pi}{2}`), a boxed symbolic
answer is allowed, but never one made only of numbers and operators (an
unevaluated sum like "5+4"). The extracted answer is compared with the gold by
math_verify (numeric tolerance, 1/2 == 0.5).

math_verify's own timeouts use signal.alarm, which fails off the main thread
(Ray Train loops, thread pools), so they are turned off here and the time
bound is ours: `score_many` scores in Ray tasks and force-cancels (kills) a
task that exceeds its deadline; the samples it could not score get reward 0
and are counted.
"""
from __future__ import annotations

import logging
import math
import re
import time
from typing import Callable, Sequence

log = logging.getLogger("wsg.rollouts.reward")
# math_verify warns once per process that its timeouts are off: they are off
# on purpose (see the module docstring).
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_NUM_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_FRAC_SLASH = re.compile(r"^([+-]?)(\d+)/(\d+)$")
_FRAC_TEX = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{(\d+)\}$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# A number in running text, and the cues that state it as the answer.
_TEXT_NUM = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_CUE = re.compile(
    r"(?:\banswer\b(?:\s+is)?|=|\bequals\b|\bis\b)\s*:?\s*(?:\*\*|\$|\\\(|\\\[)?\s*(" + _TEXT_NUM + r")",
    re.IGNORECASE)
_OPERATOR_AFTER = re.compile(r"^\s*(?:[+\-*/×÷^·]|\\times|\\cdot|\\div)\s*\(?\s*\d")


def find_last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}/\\fbox{...} (nested braces matched),
    or of `\\boxed 5`; None when there is none or its braces never close."""
    starts = [m for m in _BOX.finditer(text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
            continue  # unclosed: try an earlier box
        tok = re.match(r"[^\s$]+", text[i:])
        if tok:
            return tok.group(0)
    return None


def normalize_answer(s: str) -> str:
    """Strip formatting that never changes the value: $, \\text{units},
    spacing commands, \\dfrac, trailing period, %, degrees, thousands commas."""
    s = _strip_outer_braces(s.strip())
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf|mathbf)\{\s*([^{}]*?)\s*\}",
               lambda m: m.group(1) if re.fullmatch(r"[\d.,+\-/ ]+", m.group(1)) else " ", s)
    s = re.sub(r"\\[!,;: ]|~", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("$", "").replace("\\(", "").replace("\\)", "")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = re.sub(r"\\?%", "", s)
    s = s.strip().rstrip(".").strip()
    # A trailing unit word ("9 apples") is not part of the value.
    m = re.fullmatch(r"(" + _TEXT_NUM + r")\s+[A-Za-z][A-Za-z ]*", s)
    if m:
        s = m.group(1)
    s = re.sub(r"\s+", "", s) if re.fullmatch(r"[\d\s.,+\-/]+", s) else s
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _strip_outer_braces(s: str) -> str:
    """"{9}" -> "9" (but not "{1}{2}", whose braces are two groups)."""
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for j, ch in enumerate(s):
            depth += (ch == "{") - (ch == "}")
            if depth == 0 and j < len(s) - 1:
                return s
        s = s[1:-1].strip()
    return s


def is_number(s: str) -> bool:
    """An integer, decimal, or fraction in lowest terms (normalized input)."""
    if _NUM_RE.match(s):
        return True
    m = _FRAC_SLASH.match(s) or _FRAC_TEX.match(s)
    if m:
        num, den = abs(int(m.group(2))), int(m.group(3))
        return den > 1 and math.gcd(num, den) == 1
    return False


def is_arithmetic_expression(s: str) -> bool:
    """Numbers joined by operators only ("5+4", "3 \\times 7"): unevaluated."""
    t = re.sub(r"\\(?:times|cdot|div)", "*", re.sub(r"\\(?:left|right)", "", s))
    if not re.fullmatch(r"[\d\s.+\-*/×÷^·(){}\[\]]+", t):
        return False
    if is_number(t.replace(" ", "")):
        return False
    return bool(re.search(r"[\d)}\]]\s*[+\-*/×÷^·]+\s*[(\[{]*\s*[\d.]", t))


def _stated_number(text: str) -> str | None:
    """The last number stated as the answer in running text (not an operand)."""
    last = None
    for m in _CUE.finditer(text):
        after = text[m.end(1):]
        if _OPERATOR_AFTER.match(after):
            continue  # "is 5 + 4": the number is an operand, no answer stated
        last = m.group(1)
    return last


def extract_final_answer(completion: str) -> tuple[str | None, str]:
    """(normalized final answer or None, where it came from: boxed|stated|none)."""
    boxed = find_last_boxed(completion)
    if boxed is not None:
        # "\boxed{5 + 4 = 9}" / "\boxed{x = 9}": the value is right of the last "=".
        if "=" in boxed:
            boxed = boxed.rsplit("=", 1)[1]
        return normalize_answer(boxed), "boxed"
    bare = completion.strip().rstrip(".").strip()
    if re.fullmatch(_TEXT_NUM, bare):
        return normalize_answer(bare), "stated"  # the whole completion is a number
    stated = _stated_number(completion)
    if stated is not None:
        return normalize_answer(stated), "stated"
    return None, "none"


def _parse(latex: str, alarm_s: int | None = None):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(f"${latex}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=alarm_s)


def parse_gold(gold: str, *, alarm_s: int | None = None):
    """math_verify's parse of a gold answer, or None if it does not parse.
    `alarm_s` bounds it with math_verify's signal.alarm (main thread only);
    None = no bound of its own (run it where a hang can be bounded)."""
    if gold is None or not str(gold).strip():
        return None
    g = normalize_answer(str(gold))
    # math_verify reads prose as a product of symbols ("see the solution" ->
    # s*e*e*...): a gold with a word outside a LaTeX command is not an answer.
    if not g or re.search(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+", "", g)):
        return None
    parsed = _parse(g, alarm_s)
    return parsed or None


def score(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer is a number (or an allowed
    symbolic form, see the module docstring) equal to the gold, else 0.0."""
    from math_verify import verify

    ans, _how = extract_final_answer(completion or "")
    if not ans:
        return 0.0
    g = normalize_answer(str(gold))
    if is_number(g):
        if not is_number(ans):
            return 0.0
    elif is_arithmetic_expression(ans):
        return 0.0
    gold_p, pred_p = _parse(g), _parse(ans)
    if not gold_p or not pred_p:
        return 0.0
    return 1.0 if verify(gold_p, pred_p, timeout_seconds=None) else 0.0


def score_batch(completions: Sequence[str], golds: Sequence[str],
                scorer: Callable[[str, str], float] = score) -> list[float]:
    return [float(scorer(c, g)) for c, g in zip(completions, golds)]


def _remote_batch():
    import ray

    return ray.remote(num_cpus=1, max_retries=0)(score_batch)


def warm_up(num_cpus: float = 1.0):
    """Start a reward worker and import math_verify/sympy in it (a few seconds)
    while something else waits, e.g. engines loading. Returns the ObjectRef."""
    return _remote_batch().options(num_cpus=num_cpus).remote(["\\boxed{1}"], ["1"])


def score_many(completions: Sequence[str], golds: Sequence[str], *, timeout_s: float = 5.0,
               chunk_size: int = 64, scorer: Callable[[str, str], float] = score,
               num_cpus: float = 1.0, startup_s: float = 60.0) -> tuple[list[float], dict]:
    """Rewards for many (completion, gold) pairs, in parallel Ray tasks.

    Each chunk task gets `timeout_s` per item (+ a start-up allowance); a chunk
    that overruns is killed (`ray.cancel(force=True)`) and its items are
    rescored one per task with `timeout_s` each. Items that still overrun get
    0.0. Returns (rewards, {"n_timeouts", "n_chunks"}). `scorer` must be
    picklable by Ray (a module-level function or a closure)."""

    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
    if not completions:
        return [], {"n_timeouts": 0, "n_chunks": 0}
    fn = _remote_batch().options(num_cpus=num_cpus)
    # `startup_s`: a (re)started worker's first import of sympy takes seconds.
    chunks = [(i, min(i + chunk_size, len(completions))) for i in range(0, len(completions), chunk_size)]
    refs = {fn.remote(list(completions[a:b]), list(golds[a:b]), scorer): (a, b) for a, b in chunks}
    rewards: list[float | None] = [None] * len(completions)
    overdue = _collect(refs, rewards, lambda a, b: startup_s + timeout_s * (b - a))
    n_timeouts = 0
    if overdue:
        singles = {fn.remote([completions[i]], [golds[i]], scorer): (i, i + 1)
                   for a, b in overdue for i in range(a, b)}
        for a, _b in _collect(singles, rewards, lambda a, b: startup_s + timeout_s):
            log.warning("reward of sample %d timed out after %.1f s; scored 0", a, timeout_s)
            rewards[a] = 0.0
            n_timeouts += 1
    return [float(r) for r in rewards], {"n_timeouts": n_timeouts, "n_chunks": len(chunks)}


def _collect(refs: dict, rewards: list, budget: Callable[[int, int], float]) -> list[tuple[int, int]]:
    """Fill `rewards` from finished tasks; kill and return the overdue spans.
    Each task's deadline counts from when the previous one finished, so tasks
    queued behind busy CPUs are not charged for waiting."""
    import ray

    pending = dict(refs)
    overdue: list[tuple[int, int]] = []
    clock = time.monotonic()
    while pending:
        # The task that started earliest is the one with the oldest deadline.
        ref0 = next(iter(pending))
        a0, b0 = pending[ref0]
        left = clock + budget(a0, b0) - time.monotonic()
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0.0))
        if not done:
            ray.cancel(ref0, force=True)
            overdue.append(pending.pop(ref0))
            clock = time.monotonic()
            continue
        for ref in done:
            a, b = pending.pop(ref)
            rewards[a:b] = ray.get(ref)
        clock = time.monotonic()
    return overdue
