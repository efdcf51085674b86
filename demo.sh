#!/usr/bin/env bash
# A whole jobrun job on this machine, no internet needed: builds jobrun and a
# local demo API (which fails some first requests with 500, 429, resets and
# 404s), imports its URLs, starts a run, kills it with -9 a third of the way
# in, reads the report, resumes, retries the failures, and verifies every
# file against the sha256 the API published.
#
#   ./demo.sh [ITEMS]        (default 2000; work folder: $DEMO_DIR or a new temp dir)
set -euo pipefail
cd "$(dirname "$0")"
items=${1:-2000}
work=${DEMO_DIR:-$(mktemp -d)}
mkdir -p "$work"
echo "== building (the first build takes a few minutes)"
cargo build --release --locked --bin jobrun --example demo_api
jobrun="$PWD/target/release/jobrun"
api_pid=
cleanup() { [ -n "$api_pid" ] && kill "$api_pid" 2>/dev/null; true; }
trap cleanup EXIT

rm -f "$work/api.url"
target/release/examples/demo_api --items "$items" --url-file "$work/api.url" \
    --manifest "$work/manifest.txt" &
api_pid=$!
for _ in $(seq 100); do [ -s "$work/api.url" ] && break; sleep 0.1; done
[ -s "$work/api.url" ] || { echo "the demo API did not start" >&2; exit 1; }
cd "$work"
rm -rf jobrun.db* out
cut -d' ' -f1 manifest.txt > urls.txt

echo "== jobrun import urls.txt"
"$jobrun" import urls.txt

echo "== jobrun run --workers 20, killed with -9 a third of the way in"
"$jobrun" run --workers 20 --backoff-base 200ms &
run_pid=$!
while kill -0 "$run_pid" 2>/dev/null; do
    done_now=$("$jobrun" report --json | sed 's/.*"done":\([0-9]*\).*/\1/')
    [ "$done_now" -ge $((items / 3)) ] && break
    sleep 0.05
done
kill -9 "$run_pid" 2>/dev/null || true
wait "$run_pid" 2>/dev/null || true

echo "== jobrun report (after the kill)"
"$jobrun" report

echo "== jobrun run --workers 20 (resumes; exit 1 says some URLs failed)"
"$jobrun" run --workers 20 --backoff-base 200ms || [ $? -eq 1 ]

echo "== jobrun report --failed"
"$jobrun" report --failed

echo "== jobrun retry, then run again"
"$jobrun" retry
"$jobrun" run --workers 20 --backoff-base 200ms

echo "== jobrun report"
"$jobrun" report

echo "== jobrun verify"
"$jobrun" verify

echo "== checking every file against the API's manifest"
"$jobrun" export --format csv | awk -F, 'NR > 1 { print $1, $7 }' | sort > recorded.txt
sort manifest.txt > expected.txt
diff -q expected.txt recorded.txt > /dev/null || { echo "recorded sha256s differ" >&2; exit 1; }
files=$(find out -type f | wc -l)
find out -type f -print0 | xargs -0 sha256sum | cut -c1-64 | sort > on-disk.txt
cut -d' ' -f2 manifest.txt | sort | diff -q - on-disk.txt > /dev/null \
    || { echo "files on disk differ from what the API served" >&2; exit 1; }
echo "ok: $files files in $work/out, each byte-identical to what the API served"
