#!/usr/bin/env bash
# --rate on a shared PostgreSQL queue: for each run count R in RUNS (default "1 2 4"), N URLs
# (default 8,000) are imported into a fresh schema on JOBRUN_BENCH_PG (default the tests'
# server, postgres://postgres@127.0.0.1:5432/test), then R `jobrun run --rate RATE` (default
# 200) processes start at once, each standing for a machine, against
# examples/bench_server.rs (answering after DELAY_MS, default 20, with 1 KB). The runs hold a
# 6 s lease, so they share the rate out every 2 s. Prints the requests per second the server
# saw from all runs together over the steady part, from FROM to TO seconds after the start
# (default 4 and 10), then stops the runs. REPEAT=K measures each run count K times (default
# 1). Figures: bench/README.md.
#
#   bench/pg_rate.sh
#   RUNS="2 4" REPEAT=3 JOBRUN=/tmp/jobrun-old bench/pg_rate.sh
#
# JOBRUN=PATH measures another jobrun binary.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-8000}
RUNS=${RUNS:-"1 2 4"}
RATE=${RATE:-200}
WORKERS=${WORKERS:-20}
DELAY_MS=${DELAY_MS:-20}
FROM=${FROM:-4}
TO=${TO:-10}
REPEAT=${REPEAT:-1}
PG=${JOBRUN_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}
export PGOPTIONS="-c client_min_messages=warning"
DIR=${BENCH_DIR:-/dev/shm/jobrun-bench}/pg-rate-$$

cargo build --release --locked --quiet --bin jobrun --example bench_server
JOBRUN=${JOBRUN:-$PWD/target/release/jobrun}
BENCH_SERVER=$PWD/target/release/examples/bench_server
mkdir -p "$DIR"
server_pid=
schema=
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
    [ -n "$server_pid" ] && kill "$server_pid" 2> /dev/null
    [ -n "$schema" ] && psql -q "$PG" -c "DROP SCHEMA IF EXISTS $schema CASCADE" > /dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT

"$BENCH_SERVER" serve --synthetic 1024 --delay-ms "$DELAY_MS" --url-file "$DIR/base" \
    --hits "$DIR/hits" &
server_pid=$!
for _ in $(seq 100); do [ -s "$DIR/base" ] && break; sleep 0.1; done
base=$(cat "$DIR/base")
seq 0 $((N - 1)) | sed "s|.*|$base/items/&.json|" > "$DIR/urls.txt"
case "$PG" in *\?*) sep='&' ;; *) sep='?' ;; esac

now_ms() { date +%s%3N; }
for round in $(seq "$REPEAT"); do
    for runs in $RUNS; do
        schema=jobrun_bench_rate_$$_${runs}_$round
        psql -q "$PG" -c "CREATE SCHEMA $schema" > /dev/null
        db="$PG${sep}options=-c%20search_path%3D$schema"
        rm -rf "$DIR/out"
        "$JOBRUN" --db "$db" --quiet import "$DIR/urls.txt"
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        start=$(now_ms)
        pids=()
        for i in $(seq "$runs"); do
            "$JOBRUN" --db "$db" --quiet run --workers "$WORKERS" --rate "$RATE" --lease 6s \
                --out "$DIR/out" > /dev/null 2>&1 &
            pids+=($!)
        done
        while [ $(($(now_ms) - start)) -lt $((TO * 1000 + 200)) ]; do sleep 0.2; done
        for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
        for pid in "${pids[@]}"; do wait "$pid" 2> /dev/null || true; done
        pids=()
        seen=$(awk -v from=$((start + FROM * 1000)) -v to=$((start + TO * 1000)) \
            '$1 >= from && $1 < to' "$DIR/hits" | wc -l)
        printf '%d run(s) x --rate %s: %6.1f requests/s at the server from %d s to %d s; load before %s\n' \
            "$runs" "$RATE" "$(echo "$seen / ($TO - $FROM)" | bc -l)" "$FROM" "$TO" "$load"
        psql -q "$PG" -c "DROP SCHEMA $schema CASCADE" > /dev/null
        schema=
    done
done
