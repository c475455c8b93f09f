#!/usr/bin/env bash
# Quickstart 2: set up, then lint, type-check and run the whole test suite.
source "$(dirname "$0")/env.sh"
echo "== ruff" && ruff check .
echo "== mypy" && mypy
echo "== pytest" && exec pytest -q -ra "$@"
