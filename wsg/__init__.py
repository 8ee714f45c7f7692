"""wsg: do different post-training losses change a language model in different ways?

The package's parts are `wsg.core` (the shared vocabulary: config schema, run
layout, cell identity, errors, models), `wsg.sweep` (grid, pipeline, CLI), `wsg.train`
(the training cell), `wsg.rollouts` (vLLM generation, rewards) and
`wsg.analysis` (geometry, evaluation, statistics, report). An installed wsg
(`pip install .`) holds them under this folder (pyproject.toml maps them with
setuptools' package-dir). A source checkout keeps them as the repository's
top-level folders; then this file points the package's path at the checkout,
so that `import wsg.sweep` works from the checkout (and from a Ray job's copy
of it) as it does installed.
"""
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "sweep")) and _os.path.isfile(_os.path.join(_root, "sweep", "cli.py")):
    __path__.append(_root)  # noqa: F821  (a package's __path__)


def __getattr__(name):
    # `wsg.open_run` without importing the stages (torch, Ray) with `import wsg`.
    if name in ("open_run", "Run", "open_study", "Study"):
        from wsg.analysis import results

        return getattr(results, name)
    raise AttributeError(f"module 'wsg' has no attribute {name!r}")
