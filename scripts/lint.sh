#!/usr/bin/env bash
# The linter: bash scripts/lint.sh [ruff check args] — ruff and mypy (both pinned in
# constraints.txt) with the configuration in pyproject.toml: the format check first, then the lint
# rules (E501 included), then the type check of src/mirage ([tool.mypy]).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$MIRAGE_ROOT"
"$MIRAGE_VENV/bin/ruff" format --check src tests benchmarks experiments examples
"$MIRAGE_VENV/bin/ruff" check src tests benchmarks experiments "$@"
exec "$MIRAGE_VENV/bin/mypy"
