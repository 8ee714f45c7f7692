"""Shared by every test package (tests/sweep, tests/train, tests/rollouts,
tests/analysis, tests/cluster): pytest puts this folder on sys.path, so the
shared helpers in tests/train_fixtures.py import as `train_fixtures`; its
fixtures are registered here for every package.

- `tokenizer`: the SmolLM2 tokenizer (tiny-qwen3 uses it), once per session;
- `ray_local`: a local Ray instance (address="local": never another
  session's cluster), started once and left up for the next module.
"""
from train_fixtures import ray_local, tokenizer  # noqa: F401  (fixtures)
