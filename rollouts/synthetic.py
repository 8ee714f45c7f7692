"""Deterministic synthetic arithmetic word problems (the embedded default's data).

A family fixes the operation and the operand ranges (its difficulty); the seed
fixes which operand pairs and which phrasings are drawn. The same (family,
seed, n) always gives the same problems, on any machine: the generator is
`random.Random` seeded from the family name and the seed, never from Python's
salted `hash`. Operand pairs are drawn without replacement while the family
has enough distinct pairs, so small families do not repeat questions.

Difficulty matters for the sweep: every loss needs prompts whose K samples
are partly right (docs/design.md "The embedded default"); see docs/rollouts.md for
measured accuracies per family.
"""
from __future__ import annotations

import dataclasses
import random
import zlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    op: str                                   # "+", "-", "*"
    a: tuple[int, int]                        # inclusive range of the first operand
    b: tuple[int, int]                        # inclusive range of the second operand
    # Keep only pairs for which this holds (e.g. non-negative differences).
    keep: Callable[[int, int], bool] = lambda a, b: True
    # "plain": "What is a + b?" / "Add a and b."; "word": short stories.
    style: str = "plain"
    doc: str = ""


_BASE: dict[str, Family] = {
    "add_single_digit": Family("+", (0, 9), (0, 9), doc="a + b, a, b in 0..9"),
    "add_1_20": Family("+", (1, 20), (1, 20), doc="a + b, a, b in 1..20"),
    "add_two_digit": Family("+", (10, 99), (10, 99), doc="a + b, a, b in 10..99"),
    "add_three_digit": Family("+", (100, 999), (100, 999), doc="a + b, a, b in 100..999"),
    "sub_single_digit": Family("-", (0, 9), (0, 9), keep=lambda a, b: a >= b,
                               doc="a - b, 0 <= b <= a <= 9"),
    "sub_two_digit": Family("-", (10, 99), (10, 99), keep=lambda a, b: a >= b,
                            doc="a - b, 10 <= b <= a <= 99"),
    "mul_single_digit": Family("*", (1, 9), (1, 9), doc="a * b, a, b in 1..9"),
    "mul_two_by_one": Family("*", (10, 99), (2, 9), doc="a * b, a in 10..99, b in 2..9"),
}
# Every family in two phrasings: `<name>` (plain questions) and `<name>_word`
# (word problems, markedly harder for a 135M model: docs/rollouts.md).
FAMILIES: dict[str, Family] = {
    **_BASE,
    **{f"{k}_word": dataclasses.replace(f, style="word", doc=f.doc + ", as a word problem")
       for k, f in _BASE.items()},
}

# Phrasings per (operation, style). Names/items vary the surface form; every
# phrasing states both operands and none states the result.
_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "coins", "shells", "cards")
_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("+", "plain"): ("What is {a} + {b}?", "Add {a} and {b}."),
    ("-", "plain"): ("What is {a} - {b}?", "Subtract {b} from {a}."),
    ("*", "plain"): ("What is {a} * {b}?", "Multiply {a} by {b}."),
    ("+", "word"): (
        "{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
        "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in total?",
    ),
    ("-", "word"): (
        "{name} has {a} {item} and gives away {b} of them. How many {item} does {name} have left?",
        "There were {a} {item} in a jar. {b} were taken out. How many {item} are in the jar now?",
    ),
    ("*", "word"): (
        "{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?",
        "There are {a} rows of {item} with {b} {item} in each row. How many {item} are there?",
    ),
}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def family_names() -> list[str]:
    return sorted(FAMILIES)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown synthetic family {name!r}; valid: {', '.join(family_names())}") from None


def _rng(family: str, seed: int) -> random.Random:
    return random.Random(zlib.crc32(family.encode()) * 1_000_003 + int(seed))


def _pairs(fam: Family, n: int, rng: random.Random) -> list[tuple[int, int]]:
    (a0, a1), (b0, b1) = fam.a, fam.b
    space = (a1 - a0 + 1) * (b1 - b0 + 1)
    if space <= 200_000:
        allp = [(a, b) for a in range(a0, a1 + 1) for b in range(b0, b1 + 1) if fam.keep(a, b)]
        rng.shuffle(allp)
        # Without replacement while possible, then cycle through new shuffles.
        out = list(allp[:n])
        while len(out) < n:
            rng.shuffle(allp)
            out.extend(allp[: n - len(out)])
        return out
    out = []
    while len(out) < n:
        a, b = rng.randint(a0, a1), rng.randint(b0, b1)
        if fam.keep(a, b):
            out.append((a, b))
    return out


def generate(family: str, n: int, seed: int) -> list[dict]:
    """`n` problems of a family: dicts with id, problem, answer (a string
    integer), a, b, op. Deterministic in (family, n, seed)."""
    fam = get_family(family)
    if n <= 0:
        return []
    rng = _rng(family, seed)
    out = []
    for i, (a, b) in enumerate(_pairs(fam, n, rng)):
        tpl = rng.choice(_TEMPLATES[(fam.op, fam.style)])
        text = tpl.format(a=a, b=b, name=rng.choice(_NAMES), item=rng.choice(_ITEMS))
        out.append({"id": f"{family}-s{seed}-{i:05d}", "problem": text,
                    "answer": str(_APPLY[fam.op](a, b)), "a": a, "b": b, "op": fam.op})
    return out


def problem_key(op: str, a: int, b: int) -> str:
    """What a problem asks, whatever its phrasing ("What is 3 + 4?" and "Add
    3 and 4." share it): the key eval sets are kept disjoint from training by."""
    return f"{op}|{a}|{b}"


def normalize_text(text: str) -> str:
    return " ".join(str(text).lower().split())


def generate_excluding(family: str, n: int, seed: int, exclude: frozenset) -> tuple[list[dict], int]:
    """Up to `n` problems of a family none of which is in `exclude` (keys of
    `problem_key` or `normalize_text`), drawn without replacement in a seeded
    order; fewer than n when the family has no more (never a repeat). Returns
    (rows, how many drawn candidates were excluded). Eval sets only: training
    prompts come from `generate`, which this leaves untouched."""
    fam = get_family(family)
    rng = _rng(family, seed)
    (a0, a1), (b0, b1) = fam.a, fam.b
    space = (a1 - a0 + 1) * (b1 - b0 + 1)
    if space <= 200_000:
        pool = [(a, b) for a in range(a0, a1 + 1) for b in range(b0, b1 + 1) if fam.keep(a, b)]
        rng.shuffle(pool)
    else:
        pool = ((rng.randint(a0, a1), rng.randint(b0, b1)) for _ in range(50 * n + 1000))
    out, seen, dropped = [], set(), 0
    for a, b in pool:
        if len(out) >= n:
            break
        if not fam.keep(a, b) or (a, b) in seen:
            continue
        seen.add((a, b))
        tpl = rng.choice(_TEMPLATES[(fam.op, fam.style)])
        text = tpl.format(a=a, b=b, name=rng.choice(_NAMES), item=rng.choice(_ITEMS))
        if problem_key(fam.op, a, b) in exclude or normalize_text(text) in exclude:
            dropped += 1
            continue
        out.append({"id": f"{family}-s{seed}-{len(out):05d}", "problem": text,
                    "answer": str(_APPLY[fam.op](a, b)), "a": a, "b": b, "op": fam.op})
    return out, dropped

