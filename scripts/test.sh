#!/usr/bin/env bash
# The test suite on CPU: lint, then pytest (smoke tests included). Extra args go to pytest.
#   bash scripts/test.sh                # everything
#   bash scripts/test.sh -m "not smoke" # skip the end-to-end trainer runs
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
cd "$ROOT"
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q "$@"
