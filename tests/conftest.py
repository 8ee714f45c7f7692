"""Shared by every test package (tests/sweep, tests/train, tests/rollouts,
tests/analysis, tests/cluster): pytest puts this folder on sys.path, so the
shared helpers in tests/train_fixtures.py import as `train_fixtures`; its
fixtures are registered here for every package.

- `tokenizer`: the SmolLM2 tokenizer (tiny-qwen3 uses it), once per session;
- `ray_local`: a local Ray instance (address="local": never another
  session's cluster), started once and left up for the next module;
- `ray_module`: a local Ray of one module's own, shut down after it (its
  actors, engines and their vLLM processes end with it).
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
