#!/usr/bin/env bash
# Runs Tollgate's whole test suite: one cargo build, then every test of the workspace.
# On first use it creates .venv with the Python tools the tests call (kubernetes-validate, the
# official SDKs) and installs the Node.js clients under tests/clients (Codex CLI, Claude Code).
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests start their own redis-server instances and clusters on free ports, and make
# TLS certificates with openssl.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "tests/run.sh: ${missing[*]} needed (the tests start their own Redis servers); install them, e.g. apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

venv=.venv
requirements=tests/requirements.txt
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "==> installing test tools into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  echo "$want" > "$venv/.requirements.sha256"
fi
export TOLLGATE_PYTHON="$PWD/$venv/bin/python"

# The Node.js clients the tests drive (Codex CLI, Claude Code, the Vercel AI SDK), pinned
# by tests/clients/package-lock.json.
clients=tests/clients
want=$(sha256sum "$clients/package-lock.json" | cut -d' ' -f1)
if [ ! -d "$clients/node_modules" ] || [ "$(cat "$clients/node_modules/.lock.sha256" 2>/dev/null)" != "$want" ]; then
  command -v npm >/dev/null || { echo "tests/run.sh: npm needed (Node.js 20 or later) for the client tests" >&2; exit 1; }
  echo "==> npm ci ($clients)"
  (cd "$clients" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$clients/node_modules/.lock.sha256"
fi

echo "==> cargo build"
cargo build --workspace --all-targets --locked
echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s += $1} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s += $1} END {print s + 0}')
echo "tests: $passed passed, $failed failed"
exit "$status"
