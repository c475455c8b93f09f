# Sourced by the other scripts: a project virtual environment in .venv, (re)installed only
# when pyproject.toml changed. The first run compiles llama-cpp-python (~4 min on 2 cores).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
EXTRAS="${STV_EXTRAS:-embedded,dev}"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: story-to-video needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setting up $VENV ..." >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.stamp-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$STAMP" ]; then
  echo "installing story-to-video[$EXTRAS] into $VENV (first time takes minutes) ..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]" >&2
  rm -f "$VENV"/.stamp-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
