#!/usr/bin/env bash
# Several runs on one PostgreSQL queue against a slow API: for each run count R in RUNS
# (default "1 2 4"), N URLs (default 20,000) are imported into a fresh schema on
# JOBRUN_BENCH_PG (default the tests' server, postgres://postgres@127.0.0.1:5432/test), then R
# `jobrun run --workers W` (default 100) processes start at once, each standing for a
# machine, against examples/bench_server.rs answering every request after DELAY_MS
# (default 100) with 1 KB. Prints the wall time from the first start to the last exit,
# total URLs/s over it, when the server saw the last request, and each run's own figure;
# checks that every URL is done and was fetched once. REPEAT=K measures each run count K times (default 1). Figures: bench/README.md.
#
#   bench/pg_runs.sh
#   N=40000 RUNS="1 4" REPEAT=3 bench/pg_runs.sh
#
# Needs N x 4 KB under BENCH_DIR (default /dev/shm/jobrun-bench); JOBRUN=PATH measures
# another jobrun binary.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20000}
RUNS=${RUNS:-"1 2 4"}
WORKERS=${WORKERS:-100}
DELAY_MS=${DELAY_MS:-100}
REPEAT=${REPEAT:-1}
PG=${JOBRUN_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}
export PGOPTIONS="-c client_min_messages=warning"
DIR=${BENCH_DIR:-/dev/shm/jobrun-bench}/pg-runs-$$

cargo build --release --locked --quiet --bin jobrun --example bench_server
JOBRUN=${JOBRUN:-$PWD/target/release/jobrun}
BENCH_SERVER=$PWD/target/release/examples/bench_server
mkdir -p "$DIR"
server_pid=
schema=
cleanup() {
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
        schema=jobrun_bench_runs_$$_${runs}_$round
        psql -q "$PG" -c "CREATE SCHEMA $schema" > /dev/null
        db="$PG${sep}options=-c%20search_path%3D$schema"
        rm -rf "$DIR/out" "$DIR"/run-*.log
        "$JOBRUN" --db "$db" --quiet import "$DIR/urls.txt"
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        hits_before=$(wc -l < "$DIR/hits")
        start=$(now_ms)
        pids=()
        for i in $(seq "$runs"); do
            "$JOBRUN" --db "$db" run --workers "$WORKERS" --out "$DIR/out" \
                > "$DIR/run-$i.log" 2>&1 &
            pids+=($!)
        done
        failed=0
        for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
        ms=$(($(now_ms) - start))
        last=$(tail -n +$((hits_before + 1)) "$DIR/hits" | cut -d' ' -f1 | sort -n | tail -n 1)
        fetched=$(tail -n +$((hits_before + 1)) "$DIR/hits" | wc -l)
        distinct=$(tail -n +$((hits_before + 1)) "$DIR/hits" | cut -d' ' -f2 | sort -u | wc -l)
        done_count=$(psql -qtA "$PG" -c "SELECT count(*) FROM $schema.urls WHERE state = 'done'")
        per_run=$(grep -ho 'run #[0-9]*: [0-9,]* done[^)]*URLs/s)' "$DIR"/run-*.log |
            sed -E 's/run #([0-9]+): ([0-9,]+) done.*\(([0-9]+) URLs\/s\)/#\1 \2 done at \3\/s/' |
            paste -sd ',' - | sed 's/,#/, #/g')
        printf '%d run(s) x %d workers, %d URLs: %6.2f s, %6.0f URLs/s total (last request after %.2f s); load before %s; %s\n' \
            "$runs" "$WORKERS" "$N" "$(echo "$ms / 1000" | bc -l)" \
            "$(echo "$N * 1000 / $ms" | bc -l)" "$(echo "($last - $start) / 1000" | bc -l)" \
            "$load" "$per_run"
        if [ "$failed" != 0 ] || [ "$done_count" != "$N" ] || [ "$fetched" != "$N" ] ||
            [ "$distinct" != "$N" ]; then
            echo "not every URL is done ($done_count of $N) and fetched once ($fetched" \
                "requests, $distinct URLs), or a run failed:" >&2
            tail -n 5 "$DIR"/run-*.log >&2
            exit 1
        fi
        psql -q "$PG" -c "DROP SCHEMA $schema CASCADE" > /dev/null
        schema=
    done
done
