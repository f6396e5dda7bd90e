#!/usr/bin/env bash
# The test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
export MIRAGE_TEST_SERVERS=1  # bootstrap.sh also installs what only tests use (MLServer, chromium)
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
exec "$MIRAGE_VENV/bin/python" -m pytest "$@"
