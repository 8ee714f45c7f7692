"""The math reward: final-number extraction, echo resistance, math_verify
agreement, and the time bound of score_many (rollouts/reward.py)."""
import random
import time

import pytest
from wsg.rollouts import reward
from wsg.rollouts.reward import extract_final_answer, is_number, score

# Completions that only restate the question: plain math_verify credits some
# of them (it evaluates "5 + 4" to 9); the reward must not.
ECHOES = [
    "5 + 4", "What is 5 + 4?", "\\boxed{5 + 4}", "\\boxed{5+4}", "$5+4$", "The answer is 5 + 4",
    "= 5 + 4", "\\boxed{4 + 5}", "The answer is $5 + 4$.", "\\boxed{\\left(5 + 4\\right)}",
    "Add 5 and 4.", "\\boxed{5 \\times 1 + 4}", "\\boxed{\\frac{18}{2}}", "answer: 5+4",
    "\\boxed{9 = 5 + 4}",
]


@pytest.mark.parametrize("completion", ECHOES)
def test_echoes_of_the_question_score_zero(completion):
    assert score(completion, "9") == 0.0


def test_plain_math_verify_would_credit_an_echo():
    # The reason for the number rule: without it, "5 + 4" is worth 1.
    from math_verify import parse, verify

    assert verify(parse("$9$", parsing_timeout=None), parse("$5 + 4$", parsing_timeout=None),
                  timeout_seconds=None)


@pytest.mark.parametrize("completion,gold", [
    ("So the total is \\boxed{9}.", "9"), ("5 + 4 = 9.", "9"), ("The answer is 9.", "9"),
    ("The answer is: **9**", "9"), ("\\boxed{9.0}", "9"), ("\\boxed{9 \\text{ apples}}", "9"),
    ("\\boxed{1,234}", "1234"), ("\\boxed{\\dfrac{1}{2}}", "0.5"), ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("we get \\boxed{-3}", "-3"), ("First \\boxed{7}, no wait: \\boxed{9}", "9"),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{2}"), ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}"),
    ("\\boxed{25\\%}", "25"), ("\\boxed{{9}}", "9"), ("\\boxed{5 + 4 = 9}", "9"),
    ("\\boxed{x = 9}", "9"),
])
def test_correct_final_answers_score_one(completion, gold):
    assert score(completion, gold) == 1.0


@pytest.mark.parametrize("completion,gold", [
    ("\\boxed{8}", "9"), ("\\boxed{9}, no wait: \\boxed{8}", "9"), ("I think 9 is close. 5 + 4", "9"),
    ("\\boxed{1+1}", "2\\sqrt{3}"), ("", "9"), ("no number here", "9"), ("\\boxed{9", "9"),
    ("The answer is 90.", "9"),
])
def test_wrong_or_missing_answers_score_zero(completion, gold):
    assert score(completion, gold) == 0.0


def test_extraction_sources():
    assert extract_final_answer("x \\boxed{12} y") == ("12", "boxed")
    assert extract_final_answer("3 + 4 = 7") == ("7", "stated")
    assert extract_final_answer("3 + 4") == (None, "none")
    assert extract_final_answer("\\boxed 5") == ("5", "boxed")


def test_is_number():
    assert all(is_number(s) for s in ["9", "-3", "+2", "0.5", ".5", "3/4", "\\frac{3}{4}", "-7/2"])
    assert not any(is_number(s) for s in ["5+4", "18/2", "\\frac{4}{8}", "x", "9/1", "2\\sqrt{3}", ""])


def test_random_numeric_answers_agree_with_exact_comparison():
    # Independent reference: Python's integer/fraction equality on the number
    # the completion states, over random phrasings and values.
    from fractions import Fraction

    rng = random.Random(0)
    forms = ["The answer is {x}.", "So {a} + {b} = {x}.", "Final: \\boxed{{{x}}}", "$\\boxed{{{x}}}$",
             "We get \\boxed{{{x}}} apples."]
    for _ in range(300):
        gold = rng.randint(-50, 200)
        x = gold if rng.random() < 0.5 else gold + rng.choice([-10, -1, 1, 2, 100])
        a = rng.randint(0, 99)
        text = rng.choice(forms).format(x=x, a=a, b=x - a)
        assert score(text, str(gold)) == float(Fraction(x) == Fraction(gold)), text
    for _ in range(100):
        p, q = rng.randint(1, 30), rng.randint(2, 30)
        gold = Fraction(p, q)
        dec = f"{p / q:.6f}" if len(str(p / q)) > 8 else str(p / q)
        want = float(abs(Fraction(dec) - gold) < Fraction(1, 10**5))
        assert score(f"\\boxed{{{dec}}}", f"\\frac{{{p}}}{{{q}}}") == want, (dec, gold)


def test_reward_is_binary_on_mixed_inputs():
    rng = random.Random(1)
    for _ in range(100):
        c = "".join(rng.choice("0123456789 +-=\\boxed{}ab.") for _ in range(rng.randint(0, 40)))
        assert score(c, str(rng.randint(0, 20))) in (0.0, 1.0)


# ------------------------------------------------------------ Ray time bound
def test_score_many_matches_score(ray_module):
    comps = ["\\boxed{9}", "5 + 4", "5 + 4 = 9", "\\boxed{8}", "The answer is 3."] * 7
    golds = ["9", "9", "9", "9", "3"] * 7
    got, stats = reward.score_many(comps, golds, chunk_size=4, timeout_s=30)
    assert got == [score(c, g) for c, g in zip(comps, golds)]
    assert stats == {"n_timeouts": 0, "n_chunks": 9}


def test_score_many_kills_a_hanging_scorer(ray_module):
    # A pathological completion must not hang the stage: the scorer below
    # never returns on "HANG" (like a sympy blow-up would); the others score.
    def scorer(c, g):
        if c == "HANG":
            time.sleep(3600)
        return score(c, g)

    comps = ["\\boxed{9}", "HANG", "\\boxed{8}", "5 + 4 = 9"]
    got, stats = reward.score_many(comps, ["9"] * 4, chunk_size=2, timeout_s=1.0, scorer=scorer,
                                   startup_s=10.0)
    assert got == [1.0, 0.0, 0.0, 1.0]
    assert stats["n_timeouts"] == 1
