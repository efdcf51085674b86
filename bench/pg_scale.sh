#!/usr/bin/env bash
# The PostgreSQL store at 10,000 and at ROWS rows (default 10,000,000): fills the store's
# tables straight by SQL (`pg_queue --fill`, indexes built after), times CALLS (default 200)
# claim + complete calls of 1,024 rows by one run (median and p99 per call, the server's CPU
# per job), then times `jobrun report` on it three times, and drops the schema. Against
# JOBRUN_BENCH_PG (default the tests' server, postgres://postgres@127.0.0.1:5432/test); needs
# psql to drop the schemas. Figures: bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-10000000}
CALLS=${CALLS:-200}
PG=${JOBRUN_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}
cargo build --locked --release --example pg_queue --bin jobrun
for rows in 10000 "$ROWS"; do
    echo "== $rows rows, $CALLS calls; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    out=$(JOBRUN_BENCH_PG="$PG" target/release/examples/pg_queue --fill "$rows" \
        --batches "$CALLS" --keep)
    echo "$out"
    db=$(sed -n "s/^kept: --db '\(.*\)' (DROP.*/\1/p" <<<"$out")
    schema=$(sed -n 's/.*DROP SCHEMA \([a-z0-9_]*\) CASCADE.*/\1/p' <<<"$out")
    for _ in 1 2 3; do
        start=$(date +%s.%N)
        target/release/jobrun --db "$db" report >/dev/null
        echo "report: $(echo "$(date +%s.%N) - $start" | bc) s"
    done
    psql -q "$PG" -c "SET client_min_messages = warning; DROP SCHEMA $schema CASCADE"
done
