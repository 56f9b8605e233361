#!/usr/bin/env bash
# Tollgate's benchmarks in one command: installs nginx and redis-server when missing,
# builds release binaries, then runs every scenario against its baselines and writes
# bench/results/results.{md,json}. Arguments go to `tollgate-bench run` (e.g. --quick,
# --only single,saturation). See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "bench/run.sh: ${missing[*]} needed; install them, e.g. apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
# Thousands of connections at once: as many file descriptors as this shell may have.
ulimit -n "$(ulimit -Hn)"

echo "==> cargo build --release"
cargo build --release --locked -p tollgate-gateway -p tollgate-bench
echo "==> tollgate-bench run $*"
exec target/release/tollgate-bench run "$@"
