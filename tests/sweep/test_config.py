"""Config validation: every shipped YAML loads; bad input names the key path."""
from pathlib import Path

import pytest
import yaml
from wsg.core.config import ExperimentConfig, config_hash, dump_config
from wsg.core.errors import ConfigError
from wsg.sweep.config import load_config, parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in CONFIGS}
    assert {"smoke.yaml", "paper_qwen3_4b.yaml", "paper_seed_lr.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_round_trips(path):
    if "study" in yaml.safe_load(path.read_text()):  # a study config: one run config per value
        from wsg.sweep.study import load_study

        cfgs = [cfg for _, cfg in load_study(str(path))[1]]
    else:
        cfgs = [load_config(path)]
    for cfg in cfgs:
        assert isinstance(cfg, ExperimentConfig)
        again = parse_config(yaml.safe_load(dump_config(cfg)))
        assert config_hash(again) == config_hash(cfg)


def test_the_cpu_study_is_the_default_at_three_teachers():
    from wsg.sweep.study import load_study

    study, runs = load_study(str(next(p for p in CONFIGS if p.name == "study_cpu.yaml")))
    default = load_config(next(p for p in CONFIGS if p.name == "smoke.yaml"))
    assert study.factor == "teacher" and [v.label for v, _ in runs] == ["scripted-0.15", "scripted-0.80", "self"]
    # Its first run is the embedded default, config hash and all; the others change only the teacher.
    assert config_hash(runs[0][1]) == config_hash(default)
    assert [(c.rollouts.backend, c.rollouts.scripted_error_rate) for _, c in runs[1:]] == [("scripted", 0.8),
                                                                                           ("vllm", 0.15)]
    assert all(c.grid == default.grid and c.train == default.train for _, c in runs)


def test_paper_config_is_the_seed_protocol():
    cfg = load_config(next(p for p in CONFIGS if p.name == "paper_qwen3_4b.yaml"))
    t = cfg.train
    assert cfg.model.name == "Qwen/Qwen3-4B-Instruct-2507"
    assert (t.lora.r, t.lora.alpha, t.lora.dropout) == (32, 64, 0.0)
    assert sorted(t.lora.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert t.effective_batch == 32 and t.warmup_frac == 0.05 and t.weight_decay == 0.01
    assert t.max_grad_norm == 1.0 and cfg.grid.lrs == [5e-6] and t.checkpoint_steps == [1000, 1500]
    assert cfg.loss_cfg("dpo").lr_scale == 0.1 and cfg.rollouts.k == 4 and cfg.grid.seeds == [42]


def _err(data):
    with pytest.raises(ConfigError) as ei:
        parse_config(data, "x.yaml")
    return str(ei.value)


def test_typo_key_names_the_path():
    msg = _err({"train": {"lora": {"rank": 8}}})
    assert "train.lora.rank" in msg and "unknown key" in msg


def test_wrong_type_names_the_path_and_value():
    msg = _err({"rollouts": {"k": "four"}})
    assert "rollouts.k" in msg and "'four'" in msg


def test_effective_batch_must_divide():
    msg = _err({"train": {"effective_batch": 30, "per_device_batch": 8, "grad_accum": 4}})
    assert "train.effective_batch=30" in msg and "8 x 4 x 1 = 32" in msg


def test_checkpoint_beyond_last_step():
    msg = _err({"train": {"max_steps": 10, "checkpoint_steps": [5, 20]}})
    assert "[20]" in msg and "max_steps=10" in msg


def test_unknown_loss_lists_valid_ones():
    msg = _err({"grid": {"losses": ["sft", "ppo"]}})
    assert "ppo" in msg and "dpo" in msg and "online_dapo" in msg


def test_nonpositive_lr_refused():
    assert "grid.lrs" in _err({"grid": {"lrs": [0.0]}})
    assert "losses.dpo.lrs" in _err({"losses": {"dpo": {"lrs": [-1e-6]}}})


def test_train_lr_is_refused_naming_where_lrs_live():
    assert "grid.lrs" in _err({"train": {"lr": 1e-5}})


def test_every_loss_hyperparameter_is_checked_at_load_naming_the_key():
    err = _err({"grid": {"losses": ["sft", "online_grpo"]},
                "losses": {"online_grpo": {"hyper": {"kl_coeff": 0.1, "clip_eps_low": "x"}},
                           "dpo": {"variant": "nope"}}})
    assert "losses.online_grpo.hyper.kl_coeff" in err and "kl_coef" in err  # the valid names are listed
    assert "losses.online_grpo.hyper.clip_eps_low" in err and "float" in err
    assert "losses.dpo.variant" in err


def test_controls_vary_a_grid_loss():
    assert "grid.controls.losses" in _err({"grid": {"losses": ["sft"], "controls": {"losses": ["dpo"],
                                                                                  "init_seeds": [1]}}})
    assert "lr_factors" in _err({"grid": {"controls": {"lr_factors": [1.0]}}})


def test_openai_backend_needs_endpoint():
    assert "rollouts.endpoint" in _err({"rollouts": {"backend": "openai"}})


def test_hash_changes_with_content():
    a = parse_config({})
    b = parse_config({"train": {"max_grad_norm": 2.0}})
    assert config_hash(a) != config_hash(b) and len(config_hash(a)) == 16


def test_missing_and_non_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
