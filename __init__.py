"""Not a package of wsg: it marks the checkout's root as the parent of the
stage packages (core, sweep, train, rollouts, analysis), so that the relative
imports between them (`from ..core import errors`) resolve for static tools
and editors that read the tree without installing it. At run time the same
packages are `wsg.core`, `wsg.sweep`, ... (wsg/__init__.py, pyproject.toml)."""
