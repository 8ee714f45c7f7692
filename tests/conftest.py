"""Shared by every test package (tests/sweep, tests/train, tests/rollouts,
tests/analysis, tests/cluster): pytest puts this folder on sys.path, so the
shared helpers in tests/train_fixtures.py import as `train_fixtures`; its
fixtures are registered here for every package.

- `tokenizer`: the SmolLM2 tokenizer (tiny-qwen3 uses it), once per session;
- `ray_local`: a local Ray instance (address="local": never another
  session's cluster), started once and left up for the next module;
- `ray_module`: a local Ray of one module's own, shut down after it (its
  actors, engines and their vLLM processes end with it);
- `s3_bucket`: an S3 API server (moto) on loopback with the bucket `wsg`, the
  AWS_* environment pointing at it for the test, stopped by pid after it.
"""
import pytest
from train_fixtures import ray_local, tokenizer  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def ray_module():
    import ray

    if ray.is_initialized():  # left up by an earlier module's `ray_local`
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_bucket(tmp_path, monkeypatch):
    from _cluster import S3Server

    s3 = S3Server(tmp_path / "s3").start()
    try:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        s3.make_bucket("wsg")
        yield s3
    finally:
        s3.stop()
