"""Eval prompts never ask a training problem (rollouts.datasets.load_eval_problems),
and the training prompts are exactly what they were before that rule."""
import hashlib
import json
import re

import pytest
from wsg.rollouts.datasets import load_eval_problems, load_problems
from wsg.sweep.config import load_config, parse_config

# sha256 of [[id, problem, answer], ...] of the training prompts, computed with
# the code before eval sets were made disjoint (c8dff81).
TRAINING = {"configs/smoke.yaml": ("d1554d3168f6a3ae", 64), "configs/tiny.yaml": ("01a1e8ecbb67fdba", 16)}


def _hash(problems):
    return hashlib.sha256(json.dumps([[p.id, p.problem, p.answer] for p in problems]).encode()).hexdigest()[:16]


def _asks(p):
    """Independent of the generator's keys: the numbers in the text, in order, and the answer."""
    return tuple(int(x) for x in re.findall(r"\d+", p.problem)), p.answer


@pytest.mark.parametrize("path", sorted(TRAINING))
def test_training_prompts_unchanged_and_eval_disjoint(path):
    cfg = load_config(path)
    train = load_problems(cfg.data)
    assert (_hash(train), len(train)) == TRAINING[path]
    asked = {_asks(p) for p in train}
    old = load_problems(cfg.analysis.eval_sets[0])  # what the eval stage used to read
    assert sum(_asks(p) in asked for p in old) > 0  # ... which overlapped (45 of 64 for smoke.yaml)
    from wsg.analysis.evaluate import eval_prompts

    probs, prompts = eval_prompts(cfg, cfg.analysis.eval_sets[0])
    assert probs and len(prompts) == len(probs)
    assert not [p for p in probs if _asks(p) in asked]
    assert len({_asks(p) for p in probs}) == len(probs)  # no repeats


def test_small_family_runs_out_rather_than_repeats():
    cfg = load_config("configs/smoke.yaml")
    probs, report = load_eval_problems(cfg.analysis.eval_sets[0], cfg.data)
    # 100 ordered pairs of single digits, 64 of them trained on: 36 are left.
    assert len(probs) == 36 and report.n_excluded == 64 and report.n_loaded == 36


# Families whose every phrasing states a before b ("Subtract b from a" does not).
_ORDERED = ("add_single_digit", "add_1_20", "add_two_digit", "mul_single_digit", "mul_two_by_one")


@pytest.mark.parametrize("seed", range(8))
def test_random_families_and_seeds_are_disjoint(seed):
    import random

    rng = random.Random(seed)
    fam = rng.choice(_ORDERED)
    data = parse_config({"data": {"source": "synthetic", "family": fam + rng.choice(["", "_word"]),
                                  "n_prompts": rng.randint(5, 80), "seed": rng.randint(0, 9)}}).data
    es = parse_config({"analysis": {"eval_sets": [{"name": "e", "family": fam + rng.choice(["", "_word"]),
                                                   "n_prompts": rng.randint(5, 80), "seed": rng.randint(0, 9)}]}}
                      ).analysis.eval_sets[0]
    asked = {_asks(p) for p in load_problems(data)}
    probs, report = load_eval_problems(es, data)
    assert not [p for p in probs if _asks(p) in asked], (data, es)
    assert len({_asks(p) for p in probs}) == len(probs)
    # As many as asked for, unless the family ran out: then every untrained problem is there.
    space = {"add_single_digit": 100, "mul_single_digit": 81}.get(fam)
    assert len(probs) == es.n_prompts or (space is not None and len(probs) == space - len(asked))


def test_file_sources_are_disjoint_by_text(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"problem": f"Q{i}:  what is {i}?", "answer": str(i)}) + "\n" for i in range(30)))
    data = parse_config({"data": {"source": "jsonl", "path": str(f), "n_prompts": 20, "seed": 0}}).data
    es = parse_config({"analysis": {"eval_sets": [{"name": "e", "source": "jsonl", "path": str(f),
                                                   "n_prompts": 30, "seed": 1}]}}).analysis.eval_sets[0]
    train = {p.problem for p in load_problems(data)}
    probs, report = load_eval_problems(es, data)
    assert len(probs) == 10 and report.n_excluded == 20 and not {p.problem for p in probs} & train
