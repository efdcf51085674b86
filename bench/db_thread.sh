#!/usr/bin/env bash
# The CPU time of jobrun's database thread per URL in a real run.
#
#   bench/db_thread.sh N W JOBRUN...      e.g. bench/db_thread.sh 20000 20 old/jobrun new/jobrun
#
# For each binary in turn: imports N URLs of the bench server (examples/bench_server.rs,
# answering after DELAY ms, default 0) into a new database under BENCH_DIR (default
# /tmp/jobrun-db-thread), runs them with W workers, and prints the time the `jobrun-db`
# thread spent on a CPU (its /proc schedstat, read every 20 ms until the run exits) per URL,
# the run's user and system seconds, and the files it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
N=$1; W=$2; shift 2
DIR=${BENCH_DIR:-/tmp/jobrun-db-thread}
cargo build --release --locked --quiet --example bench_server
B=$PWD/target/release/examples/bench_server
mkdir -p "$DIR"
have=$( (wc -l < "$DIR/data/manifest.tsv") 2> /dev/null || echo 0)
[ "$have" -ge "$N" ] || "$B" generate --items "$N" --dir "$DIR/data" > /dev/null
port=$("$B" free-port)
"$B" serve --dir "$DIR/data" --port "$port" --delay-ms "${DELAY:-0}" > /dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
until curl -sf -o /dev/null "http://127.0.0.1:$port/items/0.json"; do sleep 0.1; done
seq 0 $((N - 1)) | sed "s|.*|http://127.0.0.1:$port/items/&.json|" > "$DIR/urls.txt"
for bin in "$@"; do
    rm -rf "$DIR/run"; mkdir -p "$DIR/run"
    "$bin" --db "$DIR/run/db" import "$DIR/urls.txt" > /dev/null 2>&1
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    /usr/bin/time -f '%U %S' -o "$DIR/run/time" \
        "$bin" --db "$DIR/run/db" run --out "$DIR/run/out" --workers "$W" > /dev/null 2>&1 &
    timer=$!
    pid=
    until [ -n "$pid" ]; do pid=$(pgrep -P $timer || true); done
    ns=0
    while kill -0 "$pid" 2> /dev/null; do
        for task in /proc/"$pid"/task/*; do
            if [ "$(cat "$task/comm" 2> /dev/null)" = jobrun-db ]; then
                v=$(cut -d' ' -f1 "$task/schedstat" 2> /dev/null || true)
                [ -z "$v" ] || ns=$v
            fi
        done
        sleep 0.02
    done
    wait $timer || true
    read -r user sys < <(tail -n 1 "$DIR/run/time")
    printf '%s  load %s  db thread %.2f us/URL  user %s s  sys %s s  files %s\n' "$bin" "$load" \
        "$(echo "$ns / 1000 / $N" | bc -l)" "$user" "$sys" "$(find "$DIR/run/out" -type f | wc -l)"
done
rm -rf "$DIR/run"
