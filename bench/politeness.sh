#!/usr/bin/env bash
# jobrun against servers that say "slow down": the politeness targets of bench/README.md.
#
#   bench/politeness.sh [SCENARIO...]      e.g. bench/politeness.sh bucket mix
#
# Scenarios (all by default), each against its own examples/bench_server.rs on loopback:
#   bucket  a token bucket of 50 requests/s (burst 10), 3,000 URLs, 50 workers: goodput
#           and the share of requests answered 429
#   mix     5% 500, 5% 429 with Retry-After: 1, 3% resets; 2,000 URLs, 50 workers, with
#           and without --no-adaptive: URLs/s, and whether every file is right
#   first   every item's first request 429 with Retry-After: 2; 60 URLs, 20 workers: time,
#           and the shortest gap between an item's two requests
#   always  every request 503 with Retry-After: 1; 100 URLs, --max-attempts 3: time, exit code
#   refused every request 429 without Retry-After; 60 URLs, 8 workers, 4 attempts: time with
#           and without --no-adaptive (alternating, ROUNDS times, medians)
#   paused  ten hosts of 1,000 URLs each, interleaved; one answers every request 429 with
#           Retry-After: 30: when the other 9,000 are done, against a run without that host
#   hosts   100 hosts, --per-host-workers 1, 50 workers, 50 ms latency, 5,000 URLs: URLs/s
#           against the bound of 1,000/s
#   memory  1,000,000 URLs over 10,000 hosts (addresses 127.0.0.2-127.0.39.251, one listener on
#           0.0.0.0; MEMORY_HOSTS changes the count, MEMORY_URLS the list sizes), 50 workers:
#           peak RSS, next to 10,000 URLs over the same hosts
#
# JOBRUN=PATH measures another jobrun binary (e.g. one built from an older commit).
# LIMIT=S (default 300) stops a run (SIGINT) that takes longer; its figure then says so.
# BENCH_DIR (default /tmp/jobrun-bench) holds the databases, freed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=(bucket mix first always paused hosts)
DIR=${BENCH_DIR:-/tmp/jobrun-bench}/polite-$$
LIMIT=${LIMIT:-300}

# PROFILE=debug measures debug builds (quicker to build, slower to run).
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
    cargo build --release --locked --quiet --bin jobrun --example bench_server
else
    cargo build --locked --quiet --bin jobrun --example bench_server
fi
JOBRUN=${JOBRUN:-$PWD/target/$PROFILE/jobrun}
BENCH_SERVER=$PWD/target/$PROFILE/examples/bench_server
mkdir -p "$DIR"
servers=()
cleanup() {
    for pid in "${servers[@]}"; do kill "$pid" 2> /dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT
ulimit -n 65536 2> /dev/null || true

now_ms() { date +%s%3N; }
# serve NAME OPTIONS...: starts a bench server; its base URLs end up in $DIR/NAME.url
serve() {
    local name=$1
    shift
    rm -f "$DIR/$name.url"
    "$BENCH_SERVER" serve --synthetic 1024 --url-file "$DIR/$name.url" "$@" &
    servers+=($!)
    for _ in $(seq 200); do
        [ -s "$DIR/$name.url" ] && return
        sleep 0.05
    done
    echo "the server $name did not start" >&2
    exit 1
}
stop_servers() {
    for pid in "${servers[@]}"; do kill "$pid" 2> /dev/null || true; done
    for pid in "${servers[@]}"; do wait "$pid" 2> /dev/null || true; done
    servers=()
}
# urls BASE... N: N URLs, item i on base i mod (number of bases)
urls() {
    local n=${*: -1}
    local bases=("${@:1:$#-1}")
    printf '%s\n' "${bases[@]}" | awk -v n="$n" '{ b[++k] = $0 } END {
        for (i = 0; i < n; i++) print b[(i % k) + 1] "/items/" i ".json"
    }'
}
# job NAME: a fresh database imported from $DIR/NAME.txt
job() {
    rm -rf "$DIR/$1"
    mkdir -p "$DIR/$1"
    "$JOBRUN" -q --db "$DIR/$1/jobrun.db" import "$DIR/$1.txt" > /dev/null
}
# Every done file holds the synthetic body of its item (what bench_server --synthetic 1024 sends).
check_files() {
    "$JOBRUN" --db "$DIR/$1/jobrun.db" export | python3 -c '
import json, sys
bad = undone = 0
for line in sys.stdin:
    row = json.loads(line)
    if row["state"] != "done":
        undone += 1
        continue
    item = row["url"].rsplit("/", 1)[1].split(".")[0]
    head = ("{\"id\": %s, \"pad\": \"" % item).encode()
    want = head + b"x" * (1021 - len(head)) + b"\"}\n"
    if open(row["path"], "rb").read() != want:
        bad += 1
print("%s%s" % ("ok" if bad == 0 else "%d wrong" % bad, ", %d not done" % undone if undone else ""))'
}
done_of() { # NAME: URLs done in that job
    "$JOBRUN" --db "$DIR/$1/jobrun.db" report --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["done"])'
}
count() { # FILE STATUS: requests answered STATUS in a hits file
    awk -v s="$2" '$3 == s { n++ } END { print n + 0 }' "$1"
}

bucket() {
    serve bucket --bucket 50:10 --hits "$DIR/bucket.hits"
    urls "$(cat "$DIR/bucket.url")" 3000 > "$DIR/bucket.txt"
    job bucket
    local start end
    start=$(now_ms)
    timeout -s INT "$LIMIT" "$JOBRUN" -q --db "$DIR/bucket/jobrun.db" run --workers 50 --max-attempts 100 || true
    end=$(now_ms)
    stop_servers
    local total t429
    total=$(wc -l < "$DIR/bucket.hits")
    t429=$(count "$DIR/bucket.hits" 429)
    local done
    done=$(done_of bucket)
    echo "bucket: $done of 3000 URLs done in $((end - start))ms: $(echo "$done * 1000 / ($end - $start)" | bc -l | xargs printf '%.1f') URLs/s" \
        "(bound 50/s), $t429 of $total requests 429 ($(echo "100 * $t429 / $total" | bc -l | xargs printf '%.1f')%)," \
        "files $(check_files bucket)"
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

mix() {
    # Alternating, ROUNDS times (default 3): where the random pauses fall moves the time a lot.
    local round mode results=()
    for round in $(seq "${ROUNDS:-3}"); do
        for mode in adaptive no-adaptive; do
            serve mix --faults 500=5,429=5,reset=3
            urls "$(cat "$DIR/mix.url")" 2000 > "$DIR/mix.txt"
            job mix
            local flags=(--workers 50)
            [ "$mode" = no-adaptive ] && flags+=(--no-adaptive)
            local start end done rate
            start=$(now_ms)
            timeout -s INT "$LIMIT" "$JOBRUN" -q --db "$DIR/mix/jobrun.db" run "${flags[@]}" || true
            end=$(now_ms)
            stop_servers
            done=$(done_of mix)
            rate=$(echo "$done * 1000 / ($end - $start)" | bc -l | xargs printf '%.1f')
            echo "mix, round $round ($mode): $done of 2000 URLs done in $((end - start))ms:" \
                "$rate URLs/s, files $(check_files mix)"
            results+=("$mode $rate")
        done
    done
    for mode in adaptive no-adaptive; do
        echo "mix ($mode): median $(printf '%s\n' "${results[@]}" | awk -v m="$mode" '$1 == m { print $2 }' | median) URLs/s"
    done
}

first() {
    serve first --first 429:2 --hits "$DIR/first.hits"
    urls "$(cat "$DIR/first.url")" 60 > "$DIR/first.txt"
    job first
    local start end
    start=$(now_ms)
    timeout -s INT "$LIMIT" "$JOBRUN" -q --db "$DIR/first/jobrun.db" run --workers 20 || true
    end=$(now_ms)
    stop_servers
    local gap
    gap=$(sort -k2,2n -k1,1n "$DIR/first.hits" | awk '
        $2 == item { g = $1 - last; if (min == "" || g < min) min = g }
        { item = $2; last = $1 } END { print min }')
    echo "first: $(done_of first) of 60 URLs done in $((end - start))ms, shortest gap between an item's requests ${gap}ms" \
        "(Retry-After 2 s), files $(check_files first)"
}

always() {
    serve always --always 503:1
    urls "$(cat "$DIR/always.url")" 100 > "$DIR/always.txt"
    job always
    local start end code=0
    start=$(now_ms)
    timeout -s INT "$LIMIT" "$JOBRUN" -q --db "$DIR/always/jobrun.db" run --max-attempts 3 || code=$?
    end=$(now_ms)
    stop_servers
    local failed
    failed=$("$JOBRUN" --db "$DIR/always/jobrun.db" report --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["failed"])')
    echo "always: 100 URLs in $((end - start))ms, exit $code, $failed failed"
}

refused() {
    # A bucket that never holds a token: 429 without Retry-After, always.
    local round mode results=()
    for round in $(seq "${ROUNDS:-3}"); do
        for mode in adaptive no-adaptive; do
            serve refused --bucket 0:0
            urls "$(cat "$DIR/refused.url")" 60 > "$DIR/refused.txt"
            job refused
            local flags=(--workers 8 --max-attempts 4 --backoff-base 10ms --backoff-max 20ms)
            [ "$mode" = no-adaptive ] && flags+=(--no-adaptive)
            local start end
            start=$(now_ms)
            timeout -s INT "$LIMIT" "$JOBRUN" -q --db "$DIR/refused/jobrun.db" run "${flags[@]}" || true
            end=$(now_ms)
            stop_servers
            echo "refused, round $round ($mode): 60 URLs in $((end - start))ms"
            results+=("$mode $((end - start))")
        done
    done
    for mode in adaptive no-adaptive; do
        echo "refused ($mode): median $(printf '%s\n' "${results[@]}" | awk -v m="$mode" '$1 == m { print $2 }' | median)ms"
    done
}

# paused_run NAME: runs the list, stops it once the 9 free hosts' 9,000 URLs were
# served; prints ms from start to the last of those requests
paused_run() {
    local name=$1 start served=0 deadline
    job "$name"
    start=$(now_ms)
    deadline=$((start + LIMIT * 1000))
    "$JOBRUN" -q --db "$DIR/$name/jobrun.db" run --workers 50 &
    local run=$!
    while [ "$served" -lt 9000 ] && [ "$(now_ms)" -lt "$deadline" ]; do
        sleep 0.1
        served=$(cat "$DIR"/free-*.hits | awk '$3 == 200' | wc -l)
    done
    kill -INT "$run" 2> /dev/null || true
    wait "$run" 2> /dev/null || true
    local last
    last=$(cat "$DIR"/free-*.hits | awk '$3 == 200 { if ($1 > m) m = $1 } END { print m }')
    echo "$served $((last - start))"
}

paused() {
    local i free=()
    for i in $(seq 2 10); do
        serve "free-$i" --bind "127.0.0.$i" --delay-ms 10 --hits "$DIR/free-$i.hits"
        free+=("$(cat "$DIR/free-$i.url")")
    done
    serve slow --bind 127.0.0.11 --always 429:30
    # Interleaved: item j of every host in turn; the same 9,000 free URLs in both lists.
    local files=() k=0
    for base in "${free[@]}" "$(cat "$DIR/slow.url")"; do
        urls "$base" 1000 > "$DIR/host-$k.txt"
        files+=("$DIR/host-$k.txt")
        k=$((k + 1))
    done
    paste -d'\n' "${files[@]}" > "$DIR/with.txt"
    paste -d'\n' "${files[@]:0:9}" > "$DIR/alone.txt"
    # Alternating, ROUNDS times (default 3): the machine's load moves more than the effect.
    local round alone=() with=() result
    for round in $(seq "${ROUNDS:-3}"); do
        for name in with alone; do
            for i in $(seq 2 10); do : > "$DIR/free-$i.hits"; done
            result=$(paused_run "$name")
            echo "paused, round $round, $name: ${result#* }ms (${result% *} of 9000 served)"
            if [ "$name" = alone ]; then alone+=("${result#* }"); else with+=("${result#* }"); fi
        done
    done
    stop_servers
    local a w
    a=$(printf '%s\n' "${alone[@]}" | median)
    w=$(printf '%s\n' "${with[@]}" | median)
    echo "paused: the 9000 free URLs, medians: alone ${a}ms, with a host answering 429" \
        "Retry-After 30: ${w}ms: $(echo "$w / $a" | bc -l | xargs printf '%.2f')x"
}

hosts() {
    serve hosts --listeners 100 --delay-ms 50
    mapfile -t bases < "$DIR/hosts.url"
    urls "${bases[@]}" 5000 > "$DIR/hosts.txt"
    job hosts
    local start end
    start=$(now_ms)
    timeout -s INT "$LIMIT" "$JOBRUN" -q --db "$DIR/hosts/jobrun.db" run --workers 50 --per-host-workers 1 || true
    end=$(now_ms)
    stop_servers
    echo "hosts: 5000 URLs over 100 hosts in $((end - start))ms:" \
        "$(echo "5000000 / ($end - $start)" | bc -l | xargs printf '%.0f') URLs/s (bound 1000/s), files $(check_files hosts)"
}

memory() {
    # One listener on 0.0.0.0 answers every loopback address: MEMORY_HOSTS (default 10000)
    # hosts are 127.0.(i / 250).(i % 250 + 2) on its port, with no listener per host.
    serve memory --bind 0.0.0.0
    local port
    port=$(sed 's/.*://' "$DIR/memory.url")
    mapfile -t bases < <(awk -v n="${MEMORY_HOSTS:-10000}" -v port="$port" 'BEGIN {
        for (i = 0; i < n; i++) printf "http://127.0.%d.%d:%d\n", int(i / 250), i % 250 + 2, port
    }')
    local n
    for n in ${MEMORY_URLS:-10000 1000000}; do
        urls "${bases[@]}" "$n" > "$DIR/memory.txt"
        job memory
        /usr/bin/time -f '%e %M' -o "$DIR/time" \
            "$JOBRUN" -q --db "$DIR/memory/jobrun.db" run --workers 50 > /dev/null 2>&1 || true
        echo "  $(done_of memory) done"
        read -r secs kb < "$DIR/time"
        echo "memory: $n URLs over ${#bases[@]} hosts: ${secs}s, peak RSS $((kb / 1024)) MB"
    done
    stop_servers
}

echo "jobrun: $JOBRUN"
for scenario in "${SCENARIOS[@]}"; do
    "$scenario"
done
