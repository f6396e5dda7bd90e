#!/usr/bin/env bash
# The linter: bash scripts/lint.sh [ruff check args] — ruff (pinned in constraints.txt) with the
# configuration in pyproject.toml.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$MIRAGE_ROOT"
exec "$MIRAGE_VENV/bin/ruff" check src tests benchmarks "$@"
