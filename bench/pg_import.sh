#!/usr/bin/env bash
# `jobrun import` of a list into a fresh schema of the PostgreSQL store, end to end: wall time
# and the client's CPU (from /usr/bin/time), and the CPU time of the importing backend (its
# pid found by the client's port, its /proc/PID/stat polled every 20 ms; the last reading
# before it exits), per URL. Usage: bench/pg_import.sh LIST [JOBRUN...] (default
# target/release/jobrun; several binaries are run in turn, ROUNDS times, default 1) against
# JOBRUN_BENCH_PG (default the tests' server, postgres://postgres@127.0.0.1:5432/test).
# A list of N lines: seq 0 $((N-1)) | sed 's|.*|http://127.0.0.1:40123/items/&.json|'.
# Figures: bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
LIST=${1:?usage: bench/pg_import.sh LIST [JOBRUN...]}
shift
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=(target/release/jobrun)
PG=${JOBRUN_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}
ROUNDS=${ROUNDS:-1}
sep='?'
[[ $PG == *\?* ]] && sep='&'
lines=$(wc -l < "$LIST")
ticks_of() { awk '{ sub(/.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' "/proc/$1/stat" 2>/dev/null; }
for round in $(seq "$ROUNDS"); do
    for bin in "${BINS[@]}"; do
        schema=jobrun_bench_import_$$_$round
        psql -q "$PG" -c "CREATE SCHEMA $schema"
        db="$PG${sep}options=-c%20search_path%3D$schema"
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        time_out=$(mktemp)
        /usr/bin/time -o "$time_out" -f '%e %U %S' "$bin" -q --db "$db" import "$LIST" > /dev/null &
        client=$!
        backend= ticks=0
        while kill -0 "$client" 2> /dev/null; do
            if [ -z "$backend" ]; then
                jobrun=$(pgrep -P "$client" || true)
                port=$(ss -tnpH state established '( dport = :5432 )' 2> /dev/null \
                    | awk -v pid="pid=$jobrun," 'index($0, pid) { n = split($3, a, ":"); print a[n]; exit }')
                [ -n "$port" ] && backend=$(psql -qtA "$PG" -c \
                    "SELECT pid FROM pg_stat_activity WHERE client_port = $port AND client_addr IS NOT NULL")
            fi
            if [ -n "$backend" ]; then
                t=$(ticks_of "$backend")
                [ -n "$t" ] && ticks=$t
            fi
            sleep 0.02
        done
        wait "$client"
        [ -n "$backend" ] || echo "$bin: its backend was not found; the CPU figure below is 0" >&2
        read -r wall user sys < "$time_out"
        rm -f "$time_out"
        rows=$(psql -qtA "$PG" -c "SELECT count(*) FROM $schema.requests")
        psql -q "$PG" -c "SET client_min_messages = warning; DROP SCHEMA $schema CASCADE"
        awk -v b="$bin" -v w="$wall" -v u="$user" -v s="$sys" -v t="$ticks" -v n="$lines" \
            -v r="$rows" -v l="$load" 'BEGIN { printf "%s: %d of %d rows in %.2f s, client %.2f user + %.2f sys, backend %.2f s = %.1f us per URL (load %s)\n", b, r, n, w, u, s, t / 100, t / 100 / n * 1e6, l }'
    done
done
