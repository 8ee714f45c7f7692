"""Compiled vLLM engines: the torch.compile cache is kept per node and reused,
and the first start of a configuration is serialised (rollouts/engine.py)."""
import os
import threading

import pytest


def _opts(**kw):
    from wsg.rollouts.engine import EngineOptions

    return EngineOptions(model="some/model", **kw)


def test_engine_env_compiled_uses_the_persistent_cache(tmp_path, monkeypatch):
    from wsg.rollouts.engine import compile_cache_root, engine_env

    monkeypatch.setenv("WSG_CACHE", str(tmp_path / "c"))
    eager = engine_env(str(tmp_path / "w"), _opts(enforce_eager=True))
    assert eager["VLLM_CACHE_ROOT"] == os.path.join(str(tmp_path / "w"), "cache")
    assert "VLLM_USE_AOT_COMPILE" not in eager
    comp = engine_env(str(tmp_path / "w"), _opts(enforce_eager=False))
    assert comp["VLLM_CACHE_ROOT"] == str(compile_cache_root())
    assert compile_cache_root().parent == tmp_path / "c"
    # The AOT artefact of vLLM 0.32 does not load back (recompiles each start).
    assert comp["VLLM_USE_AOT_COMPILE"] == "0"
    assert comp["TORCHINDUCTOR_CACHE_DIR"] == str(compile_cache_root() / "inductor")
    # Sockets stay private to the engine either way.
    assert comp["VLLM_RPC_BASE_PATH"] == eager["VLLM_RPC_BASE_PATH"]


def test_first_compile_lock_serialises_only_the_first_start(tmp_path, monkeypatch):
    from wsg.rollouts.engine import compile_cache_root, first_compile_lock

    monkeypatch.setenv("WSG_CACHE", str(tmp_path))
    opts = _opts(enforce_eager=False)
    order, inside, release = [], threading.Event(), threading.Event()

    def first():
        with first_compile_lock(opts):
            order.append("first in")
            inside.set()
            release.wait(30)
            order.append("first out")

    def second():
        with first_compile_lock(opts):
            order.append("second in")

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(30)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.5)
    assert b.is_alive() and order == ["first in"]  # waiting for the compiling start
    release.set()
    a.join(30)
    b.join(30)
    assert order == ["first in", "first out", "second in"]
    markers = list(compile_cache_root().glob("started-*"))
    assert len(markers) == 1

    # Once started, later starts of that configuration do not wait at all:
    # hold the lock file from outside and enter again.
    import fcntl

    lock = next(compile_cache_root().glob("lock-*"))
    with open(lock) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        done = threading.Event()
        c = threading.Thread(target=lambda: (first_compile_lock(opts).__enter__(), done.set()))
        c.start()
        assert done.wait(30)
        fcntl.flock(fh, fcntl.LOCK_UN)
    # Another configuration (here: LoRA on) has its own lock and marker.
    with first_compile_lock(_opts(enforce_eager=False, enable_lora=True)):
        pass
    assert len(list(compile_cache_root().glob("started-*"))) == 2


def test_eager_engines_take_no_lock(tmp_path, monkeypatch):
    from wsg.rollouts.engine import compile_cache_root, first_compile_lock

    monkeypatch.setenv("WSG_CACHE", str(tmp_path))
    with first_compile_lock(_opts(enforce_eager=True)):
        pass
    assert not compile_cache_root().exists()


@pytest.mark.slow
def test_compiled_engine_reuses_its_cache_and_matches_eager(tmp_path):
    """Two compiled starts in fresh actor processes: the second adds nothing to
    the cache (it loaded, not compiled), and both give transformers' greedy
    tokens on the same prompts (fp32)."""
    import ray
    from wsg.core.models import resolve_model
    from wsg.rollouts.engine import (
        EngineOptions,
        shutdown_engines,
        start_engines,
        wait_ready,
    )

    path = resolve_model("tiny-qwen3")
    cache = tmp_path / "wsg-cache"
    if ray.is_initialized():  # this test needs its own runtime_env (WSG_CACHE for the actors)
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"WSG_CACHE": str(cache)}})
    try:
        prompts = [[1, 5, 9, 42, 7], [3, 3, 8], [100, 200, 300, 17, 2, 9]]

        def greedy(opts):
            [e] = start_engines(opts, 1)
            try:
                wait_ready([e], model=path)
                outs = ray.get(e.generate.remote(prompts, n=1, temperature=0.0, max_tokens=12))
                return [o["samples"][0]["token_ids"] for o in outs]
            finally:
                shutdown_engines([e])

        base = dict(model=path, dtype="float32", max_model_len=256, cpu_kv_cache_gib=0.25, seed=1)
        first = greedy(EngineOptions(enforce_eager=False, **base))
        files = {p.relative_to(cache) for p in cache.rglob("*") if p.is_file()}
        assert any(p.parts[1] == "inductor" for p in files), sorted(map(str, files))[:20]
        assert any(p.name.startswith("started-") for p in files)
        second = greedy(EngineOptions(enforce_eager=False, **base))
        again = {p.relative_to(cache) for p in cache.rglob("*") if p.is_file()}
        assert again == files  # loaded from the cache: no new compiled artefacts
        assert first == second == _hf_greedy(path, prompts, 12)
        assert all(len(t) > 0 for t in first)
    finally:
        ray.shutdown()


def _hf_greedy(path, prompts, max_new):
    import torch
    from wsg.core.models import load_causal_lm

    model = load_causal_lm(path)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=max_new)[0, len(p):].tolist()
            cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
            outs.append(ids[:cut])
    return outs
