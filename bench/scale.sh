#!/usr/bin/env bash
# jobrun at a million URLs: import, report, a whole run, and a resume after kill -9.
#
#   bench/scale.sh [N]        (default 1000000)
#
# Serves N made-up URLs (1 KB bodies; examples/bench_server.rs --synthetic) on 127.0.0.1
# and measures, with /usr/bin/time:
#   - import of N URLs: seconds and peak memory; the database's size per URL
#   - report on N rows, all pending, and again with all done; the same on 10,000 rows
#   - run: killed with -9 after 5 s, then resumed; the time from starting the resumed
#     run to the server's first request, and the resumed run's seconds and peak memory,
#     next to a run of 10,000 URLs of the same kind
# Needs about N x 4 KB of disk and N inodes under BENCH_DIR (default /tmp/jobrun-bench),
# freed at the end. JOBRUN=PATH measures another jobrun binary.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
SMALL=10000
WORKERS=${WORKERS:-20}
DIR=${BENCH_DIR:-/tmp/jobrun-bench}/scale-$$

cargo build --release --locked --quiet --bin jobrun --example bench_server
JOBRUN=${JOBRUN:-$PWD/target/release/jobrun}
BENCH_SERVER=$PWD/target/release/examples/bench_server
mkdir -p "$DIR"
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT

port=$("$BENCH_SERVER" free-port)
# (Re)starts the server; its log says when the first request came.
start_server() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid"
        wait "$server_pid" 2> /dev/null || true
    fi
    "$BENCH_SERVER" serve --synthetic 1024 --port "$port" --note-first-request 2> "$DIR/server.log" &
    server_pid=$!
    for _ in $(seq 100); do
        # A bare connection, not a request: the first request is the client's.
        (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null && return
        sleep 0.1
    done
    echo "the server did not start" >&2
    exit 1
}
now_ms() { date +%s%3N; }
timed() { # LOG LABEL COMMAND...: runs it under /usr/bin/time, prints seconds and peak MB
    local log=$1 label=$2
    shift 2
    /usr/bin/time -f '%e %M' -o "$DIR/time" "$@" > "$DIR/$log.log" 2>&1 || true
    read -r secs kb < "$DIR/time"
    printf '%-34s %8.2f s %8.1f MB\n' "$label" "$secs" "$(echo "$kb / 1024" | bc -l)"
}

seq 0 $((N - 1)) | sed "s|.*|http://127.0.0.1:$port/items/&.json|" > "$DIR/urls.txt"
head -n "$SMALL" "$DIR/urls.txt" > "$DIR/urls-small.txt"
db=$DIR/big.db
echo "$N URLs on $(nproc) CPUs, workers $WORKERS, files in $DIR"
printf '%-34s %10s %11s\n' step time "peak memory"
timed import "import $N" "$JOBRUN" --db "$db" import "$DIR/urls.txt"
db_bytes=$(stat -c %s "$db")
timed report1 "report, all pending" "$JOBRUN" --db "$db" report

start_server
"$JOBRUN" --db "$db" run --out "$DIR/out" --workers "$WORKERS" > "$DIR/killed.log" 2>&1 &
victim=$!
sleep 5
kill -9 "$victim" 2> /dev/null || true
{ wait "$victim"; } 2> /dev/null || true
done_before=$("$JOBRUN" --db "$db" report --json | sed 's/.*"done":\([0-9]*\).*/\1/')

start_server
started=$(now_ms)
timed resumed "run after kill -9 ($done_before done)" \
    "$JOBRUN" --db "$db" run --out "$DIR/out" --workers "$WORKERS"
first=$(sed -n 's/^first request at //p' "$DIR/server.log")
rate=$(sed -n 's/.*(\([0-9]*\) URLs\/s).*/\1/p' "$DIR/resumed.log")
timed report2 "report, all done" "$JOBRUN" --db "$db" report
files=$(find "$DIR/out" -type f | wc -l)

"$JOBRUN" --db "$DIR/small.db" import "$DIR/urls-small.txt" > /dev/null 2>&1
timed report3 "report on $SMALL, all pending" "$JOBRUN" --db "$DIR/small.db" report
timed small "run $SMALL" "$JOBRUN" --db "$DIR/small.db" run --out "$DIR/out-small" --workers "$WORKERS"
timed report4 "report on $SMALL, all done" "$JOBRUN" --db "$DIR/small.db" report

echo "first request $((first - started)) ms after the resumed run started"
echo "resumed run: $rate URLs/s; $files files in the output folder"
echo "database: $db_bytes bytes after the import, $((db_bytes / N)) bytes per URL;" \
    "$(stat -c %s "$db") bytes when all done"
