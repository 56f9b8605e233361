#!/usr/bin/env bash
# Runs the cargo-fuzz targets for a bounded time each and prints one summary line per
# target; exits non-zero when any target finds a crash. See fuzz/README.md.
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET] [target...]     (default: 30 s, every target)
#
# Environment: FUZZ_TOOLCHAIN (default: nightly if installed, else stable with
# RUSTC_BOOTSTRAP=1), FUZZ_SANITIZER (default: none; `address` for ASan).
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
ALL_TARGETS=(request sse translate api_key compile)

cd "$(dirname "$0")"
seconds=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
case $seconds in '' | *[!0-9]*)
    echo "usage: $0 [SECONDS_PER_TARGET] [target...]" >&2
    exit 2
    ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version "=$CARGO_FUZZ_VERSION" --locked
fi

# libFuzzer's instrumentation needs unstable rustc flags: nightly when there is one,
# otherwise the stable compiler with its unstable features unlocked.
if [ -z "${FUZZ_TOOLCHAIN:-}" ]; then
    if rustup run nightly rustc --version >/dev/null 2>&1; then
        FUZZ_TOOLCHAIN=nightly
    else
        FUZZ_TOOLCHAIN=stable
    fi
fi
if command -v rustup >/dev/null 2>&1; then
    export RUSTUP_TOOLCHAIN=$FUZZ_TOOLCHAIN
fi
if [ "$FUZZ_TOOLCHAIN" != nightly ]; then
    export RUSTC_BOOTSTRAP=1
fi

# Release build with debug assertions and overflow checks; one build for every target.
# The code under test forbids `unsafe`, so no sanitizer by default (faster to build and
# to run); FUZZ_SANITIZER=address turns ASan on.
build=(-O -a --sanitizer "${FUZZ_SANITIZER:-none}" --codegen-units 16)
echo "fuzz: building with $(rustc --version) (toolchain $FUZZ_TOOLCHAIN)"
start=$(date +%s)
cargo fuzz build "${build[@]}"
echo "fuzz: built in $(($(date +%s) - start)) s"

mkdir -p target/logs
failed=0
for target in "${targets[@]}"; do
    corpus=corpus/$target
    artifacts=artifacts/$target
    log=target/logs/$target.log
    mkdir -p "$corpus" "$artifacts"
    # Seeds (committed) start the working corpus (not committed); -n keeps what grew.
    cp -n seeds/"$target"/* "$corpus"/ 2>/dev/null || true
    before=$(find "$artifacts" -type f | wc -l)
    status=0
    cargo fuzz run "${build[@]}" "$target" "$corpus" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
        >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    crashes=$(($(find "$artifacts" -type f | wc -l) - before))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1 # libFuzzer failed without writing an artifact; the log says why.
    fi
    echo "fuzz: $target: ${seconds} s, ${execs:-0} executions, $crashes crashes," \
        "corpus $(find "$corpus" -type f | wc -l) inputs"
    if [ "$crashes" -ne 0 ]; then
        failed=1
        tail -n 60 "$log" >&2
        echo "fuzz: $target: full log in fuzz/$log, inputs in fuzz/$artifacts/" >&2
    fi
done
exit $failed
