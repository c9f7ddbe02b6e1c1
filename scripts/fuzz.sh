#!/usr/bin/env bash
# scripts/fuzz.sh [--secs N] [TARGET...]
#
# Runs the cargo-fuzz targets in fuzz/ (every target unless some are named) for N seconds each
# (default 60), on the machine's stable Rust: libFuzzer's coverage instrumentation without a
# sanitizer (`--sanitizer none`; AddressSanitizer needs a nightly compiler). The oracle is Rust's
# own checks (bounds, overflow: cargo fuzz builds with debug assertions) and each target's
# assertions. Installs cargo-fuzz with `cargo install --locked` when it is missing.
#
# Before fuzzing it writes the seed inputs of the ring targets (fuzz/seeds.py: well-formed
# virtio-blk requests and virtio-net control commands) and runs fuzz/'s tests, which check that
# every seed still reaches the request path. Corpora grow in fuzz/corpus/TARGET (kept between
# runs, not committed). A crash writes its input to fuzz/artifacts/TARGET/ and fails the script;
# `cargo fuzz run --sanitizer none TARGET fuzz/artifacts/TARGET/crash-...` replays it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=60
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --secs) secs=$2; shift 2 ;;
        -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

python3 seeds.py
cargo test --locked --lib
cargo fuzz build --sanitizer none -O

failed=()
for t in "${targets[@]}"; do
    echo "== $t: ${secs} s"
    mkdir -p "corpus/$t"
    set +e
    cargo fuzz run --sanitizer none -O "$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 2>&1 |
        grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|new_units_added)|panicked|deadly|Test unit written'
    status=${PIPESTATUS[0]}
    set -e
    [ "$status" -eq 0 ] || failed+=("$t")
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, ${secs} s each, no crash"
