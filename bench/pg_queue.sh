#!/usr/bin/env bash
# The PostgreSQL queue without HTTP: import of URLS URLs (default 1,000,000) in batches of
# 10,000, then claim + complete of every row in batches of 1,024 by RUNS runs (default 1 and
# 4), each on its own connection, against JOBRUN_BENCH_PG (default the tests' server,
# postgres://postgres@127.0.0.1:5432/test), in a schema of its own that is dropped after.
# Prints jobs/s, the median and p99 time of a claim + complete call, and the CPU time the
# server's backends spent per job (read from /proc: a figure that other load on the machine
# does not change much). Figures: bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
URLS=${URLS:-1000000}
RUNS=${RUNS:-"1 4"}
cargo build --locked --release --example pg_queue
for runs in $RUNS; do
    echo "== $URLS URLs, $runs run(s); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    target/release/examples/pg_queue --urls "$URLS" --runs "$runs"
done
