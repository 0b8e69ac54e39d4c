#!/usr/bin/env bash
# bench/gpu_check.py from this source tree on a machine with Python 3.12 and torch but none of the project's
# other dependencies, offline: the wheels that `make gpu-wheels` put under .gpu-wheels/*/ are installed
# (those whose distribution this Python lacks; GPU_WHEELS_ALL=1: all of them) into .gpu-site/, which goes on
# PYTHONPATH with the source tree. Arguments go to gpu_check.py; its last line is one JSON object.
#
#   bash bench/gpu_check.sh                 # every stage
#   bash bench/gpu_check.sh --only train    # e.g. after a second carry brought .gpu-wheels/scipy
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=$PWD/.gpu-site
mkdir -p "$SITE"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DPMIX_CACHE=${DPMIX_CACHE:-$PWD/.gpu-site/.cache} HF_HUB_OFFLINE=1

shopt -s nullglob
wanted=()
for whl in .gpu-wheels/*/*.whl; do
  dist=$(basename "$whl" | cut -d- -f1)
  if [ "${GPU_WHEELS_ALL:-0}" = 1 ] || ! "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
    wanted+=("$whl")
  fi
done
if [ ${#wanted[@]} -gt 0 ]; then
  echo "gpu_check.sh: installing ${#wanted[@]} wheel(s) into .gpu-site" >&2
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --no-compile --target "$SITE" --upgrade "${wanted[@]}" >&2
  else  # no pip: a wheel is a zip of importable files
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "${wanted[@]}"
  fi
fi
exec "$PY" bench/gpu_check.py "$@"
