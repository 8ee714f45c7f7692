"""Problem loading (rollouts/datasets.py, rollouts/synthetic.py): the synthetic
generator, and the DeepScaleR / GSM8K / AIME / generic loaders on local files
of the same schemas written here."""
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from wsg.core.config import DataCfg, EvalSetCfg
from wsg.core.errors import WsgError
from wsg.rollouts import synthetic
from wsg.rollouts.datasets import (
    Problem,
    gold_from_raw,
    load_problems,
    load_problems_with_report,
)

_OPERANDS = re.compile(r"\d+")


@pytest.mark.parametrize("family", synthetic.family_names())
def test_synthetic_answers_match_the_operands_in_the_text(family):
    fam = synthetic.get_family(family)
    rows = synthetic.generate(family, 40, seed=3)
    assert len(rows) == 40
    for r in rows:
        nums = [int(x) for x in _OPERANDS.findall(r["problem"])]
        # Every phrasing states a then b, except "Subtract b from a".
        a, b = (nums[1], nums[0]) if r["problem"].startswith("Subtract") else (nums[0], nums[1])
        assert (a, b) == (r["a"], r["b"])
        assert fam.a[0] <= a <= fam.a[1] and fam.b[0] <= b <= fam.b[1]
        want = {"+": a + b, "-": a - b, "*": a * b}[fam.op]
        assert r["answer"] == str(want)


def test_synthetic_is_deterministic_and_seed_dependent():
    a = load_problems(DataCfg(family="add_single_digit", n_prompts=30, seed=5))
    b = load_problems(DataCfg(family="add_single_digit", n_prompts=30, seed=5))
    c = load_problems(DataCfg(family="add_single_digit", n_prompts=30, seed=6))
    assert a == b and a != c
    assert all(isinstance(p, Problem) for p in a)
    assert len({p.id for p in a}) == 30


def test_synthetic_draws_distinct_pairs_while_possible():
    rows = synthetic.generate("add_single_digit", 100, seed=0)
    assert len({(r["a"], r["b"]) for r in rows}) == 100  # all 10 x 10 pairs once
    rows = synthetic.generate("sub_single_digit", 60, seed=0)
    assert all(r["a"] >= r["b"] for r in rows) and len({(r["a"], r["b"]) for r in rows}) == 55


def test_unknown_family_names_the_valid_ones():
    with pytest.raises(WsgError, match="add_single_digit"):
        load_problems(DataCfg(family="add_one_digit"))


def test_eval_set_cfg_is_accepted():
    probs = load_problems(EvalSetCfg(name="synthetic", family="mul_single_digit", n_prompts=7, seed=1))
    assert len(probs) == 7 and probs[0].id.startswith("mul_single_digit-s1-")


# ------------------------------------------------------------------ files
def _write(path, rows):
    if str(path).endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_deepscaler_schema_parquet(tmp_path):
    rows = [{"problem": f"Compute {i} squared.", "answer": str(i * i), "solution": "..."} for i in range(20)]
    rows[3]["answer"] = "\\frac{1}{2}"
    path = _write(tmp_path / "dsr.parquet", rows)
    probs, rep = load_problems_with_report(DataCfg(source="deepscaler", path=path, n_prompts=100))
    assert [p.problem for p in probs] == [r["problem"] for r in rows]
    assert probs[3].answer == "\\frac{1}{2}" and probs[5].answer == "25"
    assert rep.n_loaded == 20 and rep.n_bad_gold == 0
    assert probs[0].id == "deepscaler-000000"


def test_gsm8k_schema_jsonl_extracts_the_gold_after_hashes(tmp_path):
    rows = [{"question": "Q1?", "answer": "Some work <<2*3=6>> 6\n#### 6"},
            {"question": "Q2?", "answer": "lots of steps\n#### 1,234"},
            {"question": "Q3?", "answer": "no final marker here"},
            {"question": "Q4?", "answer": "#### -7"}]
    path = _write(tmp_path / "gsm8k_test.jsonl", rows)
    probs, rep = load_problems_with_report(DataCfg(source="gsm8k", path=path, split="test"))
    assert [(p.problem, p.answer) for p in probs] == [("Q1?", "6"), ("Q2?", "1234"), ("Q4?", "-7")]
    assert rep.n_bad_gold == 1 and rep.bad_gold_examples[0]["row"] == 2


def test_aime_schema_with_column_mapping_and_ids(tmp_path):
    rows = [{"ID": f"2024-I-{i}", "Problem": f"AIME problem {i}", "Answer": 100 + i} for i in range(1, 16)]
    path = _write(tmp_path / "aime.parquet", rows)
    cfg = EvalSetCfg(name="aime24", source="aime", path=path, n_prompts=64,
                     columns={"problem": "Problem", "answer": "Answer", "id": "ID"})
    probs = load_problems(cfg)
    assert [p.id for p in probs] == [f"2024-I-{i}" for i in range(1, 16)]
    assert probs[0].answer == "101"  # integer cells become strings


def test_unparseable_golds_are_counted_not_fatal(tmp_path):
    rows = [{"problem": "p1", "answer": "7"}, {"problem": "p2", "answer": "see the solution"},
            {"problem": "p3", "answer": ""}, {"problem": "", "answer": "3"},
            {"problem": "p5", "answer": None}, {"problem": "p6", "answer": "2\\sqrt{3}"}]
    path = _write(tmp_path / "mixed.jsonl", rows)
    probs, rep = load_problems_with_report(DataCfg(source="jsonl", path=path))
    assert [p.problem for p in probs] == ["p1", "p6"]
    assert (rep.n_bad_gold, rep.n_empty_problem, rep.n_loaded, rep.n_examined) == (3, 1, 2, 6)


def test_n_prompts_takes_a_seeded_subset_in_file_order(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(50)]
    path = _write(tmp_path / "d.parquet", rows)
    a = load_problems(DataCfg(source="parquet", path=path, n_prompts=10, seed=1))
    b = load_problems(DataCfg(source="parquet", path=path, n_prompts=10, seed=1))
    c = load_problems(DataCfg(source="parquet", path=path, n_prompts=10, seed=2))
    assert a == b and a != c and len(a) == 10
    idx = [int(p.problem[1:]) for p in a]
    assert idx == sorted(idx)


def test_bad_rows_are_replaced_to_reach_n_prompts(tmp_path):
    rows = [{"problem": f"p{i}", "answer": "n/a" if i % 2 else str(i)} for i in range(40)]
    path = _write(tmp_path / "d.jsonl", rows)
    probs, rep = load_problems_with_report(DataCfg(source="jsonl", path=path, n_prompts=12, seed=0))
    assert len(probs) == 12 and rep.n_bad_gold == rep.n_examined - 12


def test_folder_of_files_picks_the_split(tmp_path):
    _write(tmp_path / "train-00000.parquet", [{"problem": "tr", "answer": "1"}])
    _write(tmp_path / "test-00000.parquet", [{"problem": "te", "answer": "2"}])
    probs = load_problems(DataCfg(source="parquet", path=str(tmp_path), split="test"))
    assert [p.problem for p in probs] == ["te"]


def test_missing_column_names_the_file_and_column(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(WsgError, match=r"no column 'problem'.*question.*data\.columns"):
        load_problems(DataCfg(source="jsonl", path=path))


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(WsgError, match="no rows"):
        load_problems(DataCfg(source="jsonl", path=str(path)))


def test_all_golds_bad_is_an_error_naming_the_column(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"problem": "p", "sol": "unknown"}])
    with pytest.raises(WsgError, match="unparseable gold answers in column 'sol'"):
        load_problems(DataCfg(source="jsonl", path=path, columns={"answer": "sol"}))


def test_missing_file_and_required_path_and_bad_mapping(tmp_path):
    with pytest.raises(WsgError, match="does not exist"):
        load_problems(DataCfg(source="parquet", path=str(tmp_path / "nope.parquet")))
    with pytest.raises(WsgError, match="data.path is required"):
        load_problems(DataCfg(source="jsonl"))
    with pytest.raises(WsgError, match="unknown key"):
        load_problems(DataCfg(source="jsonl", path="x.jsonl", columns={"question": "q"}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "answer": "1"}\n{oops\n')
    with pytest.raises(WsgError, match="line 2"):
        load_problems(DataCfg(source="jsonl", path=str(bad)))


def test_gold_from_raw():
    assert gold_from_raw("Work.\n#### 72", "gsm8k") == "72"
    assert gold_from_raw("no marker", "gsm8k") is None
    assert gold_from_raw(" 42 ", "aime") == "42"
    assert gold_from_raw(None, "deepscaler") is None
