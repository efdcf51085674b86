#!/usr/bin/env bash
# The PostgreSQL store at each of SIZES rows (default 10,000 and ROWS, ROWS by default
# 10,000,000): fills the store's tables straight by SQL (`pg_queue --fill`, indexes built
# after), times CALLS (default 200) claim + complete calls of 1,024 rows by one run (median and
# p99 per call, the five slowest, the server's CPU per job), then times `jobrun report` on it
# three times, and drops the schema. KEEP=1 keeps the schemas (their names are printed);
# REUSE=SCHEMA times the calls on such a kept schema instead of filling one (each time, CALLS x
# 1,024 more of its rows are claimed). Against JOBRUN_BENCH_PG (default the tests' server,
# postgres://postgres@127.0.0.1:5432/test); needs psql to drop the schemas. PG_QUEUE and
# JOBRUN choose other builds of the two programs (default this tree's release builds).
# Figures: bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-10000000}
SIZES=${SIZES:-"10000 $ROWS"}
CALLS=${CALLS:-200}
PG=${JOBRUN_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}
PG_QUEUE=${PG_QUEUE:-target/release/examples/pg_queue}
JOBRUN=${JOBRUN:-target/release/jobrun}
if [ -z "${PG_QUEUE_BUILT:-}" ]; then
    cargo build --locked --release --example pg_queue --bin jobrun
fi
if [ -n "${REUSE:-}" ]; then
    SIZES=reuse
fi
for rows in $SIZES; do
    echo "== $rows rows, $CALLS calls; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    if [ "$rows" = reuse ]; then
        out=$(JOBRUN_BENCH_PG="$PG" "$PG_QUEUE" --reuse "$REUSE" --batches "$CALLS")
    else
        out=$(JOBRUN_BENCH_PG="$PG" "$PG_QUEUE" --fill "$rows" --batches "$CALLS" --keep)
    fi
    echo "$out"
    db=$(sed -n "s/^kept: --db '\(.*\)' (DROP.*/\1/p" <<<"$out")
    schema=$(sed -n 's/.*DROP SCHEMA \([a-z0-9_]*\) CASCADE.*/\1/p' <<<"$out")
    for _ in 1 2 3; do
        start=$(date +%s.%N)
        "$JOBRUN" --db "$db" report >/dev/null
        echo "report: $(echo "$(date +%s.%N) - $start" | bc) s"
    done
    if [ "$rows" != reuse ] && [ -z "${KEEP:-}" ]; then
        psql -q "$PG" -c "SET client_min_messages = warning; DROP SCHEMA $schema CASCADE"
    fi
done
