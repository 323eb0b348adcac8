#!/bin/sh
# Runs every fuzz target for SECS seconds (default 60) on one core, seeded from fuzz/seeds,
# and prints libFuzzer's last status line (inputs executed, coverage) for each. Run from the
# repository root: fuzz/run.sh 600 (TARGETS="relay scan" fuzz/run.sh 60 for some). Needs cargo-fuzz (cargo install cargo-fuzz); the stable
# toolchain works with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only sanitizer flags).
set -eu
SECS=${1:-60}
export RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
cargo fuzz build -O
for t in ${TARGETS:-startup scan backend scram config classify prepared relay}; do
    mkdir -p fuzz/corpus/$t
    # -rss_limit_mb: an input that makes a parser allocate without bound fails the run
    cargo fuzz run -O "$t" fuzz/corpus/$t fuzz/seeds/$t -- \
        -max_total_time="$SECS" -timeout=5 -rss_limit_mb=512 -max_len=8192 \
        -print_final_stats=1 >fuzz/$t.log 2>&1 || { echo "$t: FAILED, see fuzz/$t.log"; exit 1; }
    execs=$(grep -m1 'stat::number_of_executed_units' fuzz/$t.log | awk '{print $2}')
    cov=$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' fuzz/$t.log | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+')
    corpus=$(ls fuzz/corpus/$t | wc -l)
    echo "$t: ${SECS}s, $execs inputs, $cov, corpus $corpus"
done
