#!/usr/bin/env bash
# The soak run (not part of CI): one gateway with Redis under steady mixed traffic for
# 30 minutes by default, sampling RSS, open file descriptors, threads and Redis keys, and
# failing on a growth trend or an unexpected answer. Writes bench/results/soak.{md,csv}.
# Arguments go to `tollgate-bench soak` (e.g. --minutes 60 --rate 200). See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> apt-get install redis-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server
  else
    echo "bench/soak.sh: redis-server needed; install it, e.g. apt-get install redis-server" >&2
    exit 1
  fi
fi

echo "==> cargo build --release"
cargo build --release --locked -p tollgate-gateway -p tollgate-bench
echo "==> tollgate-bench soak $*"
exec target/release/tollgate-bench soak "$@"
