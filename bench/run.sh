#!/usr/bin/env bash
# jobrun against the tools it replaces, on one machine, over 127.0.0.1.
#
#   bench/run.sh [N] [WORKERS...]          e.g. bench/run.sh 20000 20 64
#
# N URLs of ~20 KB JSON (default 20000), fetched by each tool with each worker count
# (default 20 64), RUNS times (default 3), tools in a new order each round. Prints, per
# tool and worker count, the medians (and min-max) of URLs/s, CPU seconds (user + sys of
# the tool and its children), CPU per URL, its user part (the system part follows the disk
# and what else writes to it), peak memory and, against the bench server, the
# connections the tool opened (counted where the server accepts them), and whether every
# run's files were right: exactly N files whose byte total and multiset of sha256s match
# the data. For jobrun, whose time includes its import, it then gives the import's
# seconds and the run's own URLs/s, and its requests' durations (50th, 90th and 99th
# percentiles, as its database recorded them; needs the sqlite3 command).
#
# Settings (environment):
#   SERVER=static      nginx serving files (when installed; else the bench server, no delay)
#   SERVER=latency:MS  the bench server (examples/bench_server.rs), answering after MS ms
#   SERVER=h2:MS[:STREAMS]  the bench server over HTTP/2 and TLS (ALPN h2 only), answering
#                      after MS ms, allowing STREAMS streams at once per connection (default
#                      128); its certificate is trusted for the bench only (--cacert), and
#                      curl runs with --http2
#   TOOLS="jobrun curl wget2 aria2c python"   the tools; one that is not installed is skipped
#   RUNS=3             rounds
#   BENCH_DIR=DIR      data and output (default /tmp/jobrun-bench); needs RUNS x tools x
#                      worker counts x N x 20 KB of disk, freed at the end
#   JOBRUN=PATH        a jobrun binary to measure instead of this checkout's release build
#
# jobrun's time includes its import. Only jobrun syncs its files to disk; the others
# leave them to the kernel's writeback, which may finish after their clock stops.
# Outputs are deleted only at the end: on ext4, creating files soon after deleting many
# costs extra, and that would land on whichever tool ran next.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
shift || true
WORKERS=("$@")
[ ${#WORKERS[@]} -gt 0 ] || WORKERS=(20 64)
SERVER=${SERVER:-static}
TOOLS=${TOOLS:-jobrun curl wget2 aria2c python}
RUNS=${RUNS:-3}
DIR=${BENCH_DIR:-/tmp/jobrun-bench}
DATA=$DIR/data
OUT=$DIR/out-$$

echo "== building" >&2
cargo build --release --locked --quiet --bin jobrun --example bench_server
JOBRUN=${JOBRUN:-$PWD/target/release/jobrun}
BENCH_SERVER=$PWD/target/release/examples/bench_server

mkdir -p "$DATA" "$OUT"
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
    [ -f "$OUT/nginx.pid" ] && kill "$(cat "$OUT/nginx.pid")" 2>/dev/null
    rm -rf "$OUT"
}
trap cleanup EXIT

have=$( (wc -l < "$DATA/manifest.tsv") 2> /dev/null || echo 0)
if [ "$have" -lt "$N" ]; then
    echo "== writing $N items to $DATA" >&2
    "$BENCH_SERVER" generate --items "$N" --dir "$DATA"
fi
head -n "$N" "$DATA/manifest.tsv" | cut -f3 | sort > "$OUT/expected.sha"
BYTES=$(head -n "$N" "$DATA/manifest.tsv" | awk '{ s += $2 } END { print s }')

port=$("$BENCH_SERVER" free-port)
case $SERVER in
static)
    if command -v nginx > /dev/null; then
        server_name="nginx $(nginx -v 2>&1 | sed 's|.*/||')"
        cat > "$OUT/nginx.conf" <<EOF
worker_processes 1;
pid $OUT/nginx.pid;
error_log $OUT/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    default_type application/json;
    client_body_temp_path $OUT/nginx-tmp;
    proxy_temp_path $OUT/nginx-tmp;
    fastcgi_temp_path $OUT/nginx-tmp;
    uwsgi_temp_path $OUT/nginx-tmp;
    scgi_temp_path $OUT/nginx-tmp;
    server { listen 127.0.0.1:$port backlog=4096; root $DATA; }
}
EOF
        nginx -c "$OUT/nginx.conf" -e "$OUT/nginx-error.log"
    else
        server_name="bench_server, no delay"
        "$BENCH_SERVER" serve --dir "$DATA" --port "$port" &
        server_pid=$!
    fi ;;
latency:*)
    server_name="bench_server, ${SERVER#latency:} ms per request"
    "$BENCH_SERVER" serve --dir "$DATA" --port "$port" --delay-ms "${SERVER#latency:}" &
    server_pid=$! ;;
h2:*)
    IFS=: read -r _ delay streams <<< "$SERVER"
    streams=${streams:-128}
    server_name="bench_server, HTTP/2 over TLS, $delay ms per request, $streams streams per connection"
    "$BENCH_SERVER" serve --dir "$DATA" --port "$port" --delay-ms "$delay" --tls "$OUT/tls" --max-streams "$streams" &
    server_pid=$!
    scheme=https
    CACERT=$OUT/tls/ca.pem ;;
*) echo "SERVER must be static, latency:MS or h2:MS[:STREAMS]" >&2; exit 2 ;;
esac
scheme=${scheme:-http}
CURL_TLS=()
[ -z "${CACERT:-}" ] || CURL_TLS=(--http2 --cacert "$CACERT")
for _ in $(seq 100); do
    [ "$scheme" = http ] || [ -f "$CACERT" ] || { sleep 0.1; continue; }
    curl -s "${CURL_TLS[@]}" -o /dev/null "$scheme://127.0.0.1:$port/items/0.json" && break
    sleep 0.1
done
seq 0 $((N - 1)) | sed "s|.*|$scheme://127.0.0.1:$port/items/&.json|" > "$OUT/urls.txt"

# Connections the bench server has accepted so far ("-" for nginx), this question's own
# included.
accepted() {
    [ -n "$server_pid" ] && curl -sf "${CURL_TLS[@]}" "$scheme://127.0.0.1:$port/connections" || echo -
}

available=()
for tool in $TOOLS; do
    case $tool in
    jobrun) available+=(jobrun) ;;
    curl | wget2 | aria2c | python)
        if command -v "${tool/python/python3}" > /dev/null; then available+=("$tool")
        else echo "== $tool is not installed: skipped" >&2; fi ;;
    *) echo "unknown tool $tool" >&2; exit 2 ;;
    esac
done

# Runs TOOL with W workers into the folder $2; the command line goes to stdout.
command_for() {
    local tool=$1 out=$2 w=$3
    case $tool in
    jobrun) echo "sh -c '/usr/bin/time -f %e -o $out.import $JOBRUN --db $out.db import $OUT/urls.txt 2>/dev/null && exec $JOBRUN --db $out.db run --out $out --workers $w${CACERT:+ --cacert $CACERT}'" ;;
    curl)
        awk -v d="$out" '{ n = $0; sub(/.*\//, "", n); printf "url = \"%s\"\noutput = \"%s/%s\"\n", $0, d, n }' \
            "$OUT/urls.txt" > "$out.curl"
        echo "curl --parallel --parallel-max $w -sS --fail --retry 3 ${CURL_TLS[*]} -K $out.curl" ;;
    wget2) echo "wget2 -i $OUT/urls.txt -P $out --max-threads=$w -q --no-hsts --no-hpkp --no-netrc" ;;
    aria2c) echo "aria2c -i $OUT/urls.txt -d $out -j $w --max-connection-per-server=1 --split=1 --allow-overwrite=true --auto-file-renaming=false --file-allocation=none --deferred-input=true --console-log-level=warn --summary-interval=0 --download-result=hide" ;;
    python) echo "python3 bench/pool_fetch.py $OUT/urls.txt $out $w" ;;
    esac
}

# "ok" when $1 holds exactly N files with the expected bytes and sha256s.
check() {
    local files n bytes
    files=$(find "$1" -type f)
    n=$(printf '%s' "$files" | grep -c . || true)
    bytes=$(printf '%s\n' "$files" | grep . | xargs -r -d '\n' stat -c %s | awk '{ s += $1 } END { print s + 0 }')
    if [ "$n" -ne "$N" ]; then echo "FAIL:$n-files"
    elif [ "$bytes" -ne "$BYTES" ]; then echo "FAIL:$bytes-bytes"
    elif ! printf '%s\n' "$files" | xargs -d '\n' sha256sum | cut -c1-64 | sort | cmp -s - "$OUT/expected.sha"
    then echo "FAIL:content"
    else echo ok; fi
}

# For a jobrun run into $1 with $2 workers that took $3 s in all: the seconds of its
# import, of the run alone, and the 50th, 90th and 99th percentiles of its requests'
# durations in ms (from sending a request to the end of its body, as the database
# recorded them; "-" without the sqlite3 command).
jobrun_parts() {
    local import durations=(- - -)
    import=$(tail -n 1 "$1.import" 2>/dev/null || echo 0)
    if command -v sqlite3 > /dev/null; then
        mapfile -t durations < <(sqlite3 "$1.db" "SELECT duration_ms FROM urls WHERE state = 'done' ORDER BY 1" |
            awk '{ d[NR] = $1 } END { if (NR) for (p = 50; p < 100; p += (p < 90 ? 40 : 9)) print d[int((NR - 1) * p / 100) + 1] }')
    fi
    [ ${#durations[@]} -eq 3 ] || durations=(- - -)
    echo "$2 $import $(awk -v a="$3" -v b="$import" 'BEGIN { print a - b }') ${durations[*]}"
}

echo "== $N URLs, workers ${WORKERS[*]}, $RUNS rounds, server: $server_name" >&2
for round in $(seq "$RUNS"); do
    # A different tool goes first in every round.
    order=("${available[@]:$(( (round - 1) % ${#available[@]} ))}" "${available[@]:0:$(( (round - 1) % ${#available[@]} ))}")
    for w in "${WORKERS[@]}"; do
        for tool in "${order[@]}"; do
            out=$OUT/$tool-w$w-r$round
            mkdir -p "$out"
            cmd=$(command_for "$tool" "$out" "$w")
            sync
            before=$(accepted)
            /usr/bin/time -f '%e %U %S %M' -o "$out.time" sh -c "exec $cmd" > "$out.log" 2>&1 || true
            after=$(accepted)
            # Less the one that asked for the count before the run.
            opened=-
            [ "$before" = - ] || [ "$after" = - ] || opened=$((after - before - 1))
            read -r secs user sys rss < <(tail -n 1 "$out.time")
            echo "$tool $w $secs $user $sys $rss $(check "$out") $opened" | tee -a "$OUT/results" >&2
            [ "$tool" != jobrun ] || jobrun_parts "$out" "$w" "$secs" >> "$OUT/jobrun-parts"
        done
    done
done

# Medians per tool and worker count: "median (min-max)".
echo
echo "$N URLs of ~20 KB ($BYTES bytes), server: $server_name, $RUNS runs each, $(nproc) CPUs"
printf '%-7s %5s  %-22s %-20s %-16s %-16s %-16s %-18s %s\n' tool W "URLs/s" "CPU s" "CPU us/URL" "user us/URL" "peak MB" "connections" check
for w in "${WORKERS[@]}"; do
    for tool in "${available[@]}"; do
        awk -v t="$tool" -v w="$w" -v n="$N" '
            function median(a, k,   i, j, x) {
                for (i = 2; i <= k; i++) { x = a[i]; for (j = i - 1; j > 0 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
                return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
            }
            function show(a, k, fmt) { return sprintf(fmt " (" fmt "-" fmt ")", median(a, k), a[1], a[k]) }
            $1 == t && $2 == w { k++; rate[k] = n / $3; cpu[k] = $4 + $5; per[k] = 1e6 * ($4 + $5) / n; usr[k] = 1e6 * $4 / n; mb[k] = $6 / 1024
                                 conns[k] = $8; if ($7 != "ok") bad = bad " " $7 }
            END { if (!k) exit
                  printf "%-7s %5s  %-22s %-20s %-16s %-16s %-16s %-18s %s\n", t, w, show(rate, k, "%.0f"), show(cpu, k, "%.2f"),
                      show(per, k, "%.0f"), show(usr, k, "%.0f"), show(mb, k, "%.0f"), conns[1] == "-" ? "-" : show(conns, k, "%d"),
                      bad ? "FAIL" bad : "ok" }' "$OUT/results"
    done
done
# jobrun's time above includes its import: the two apart, and its requests' durations.
if [ -s "$OUT/jobrun-parts" ]; then for w in "${WORKERS[@]}"; do
    awk -v w="$w" -v n="$N" '
        function median(a, k,   i, j, x) {
            for (i = 2; i <= k; i++) { x = a[i]; for (j = i - 1; j > 0 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
            return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
        }
        $1 == w { k++; imp[k] = $2; run[k] = n / $3; p50[k] = $4; p90[k] = $5; p99[k] = $6 }
        END { if (!k) exit
              printf "jobrun W=%s: import %.2f s, the run alone %.0f URLs/s; requests p50 %s ms, p90 %s, p99 %s (medians of %d)\n",
                  w, median(imp, k), median(run, k), p50[1] == "-" ? "-" : median(p50, k),
                  p90[1] == "-" ? "-" : median(p90, k), p99[1] == "-" ? "-" : median(p99, k), k }' "$OUT/jobrun-parts"
done; fi
