#!/usr/bin/env python3
"""The script jobrun replaces: a thread pool that fetches every URL into a file.

usage: pool_fetch.py URLS_FILE OUT_DIR WORKERS

Standard library only. ThreadPoolExecutor(max_workers=WORKERS), one urllib request per URL
(a new connection each, as a plain requests.get would), the body written to
OUT_DIR/<n>.json. No retries, nothing synced to disk, no state kept. Exits 1 if any URL
failed.
"""
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

urls_file, out_dir, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])


def fetch(job):
    n, url = job
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
        with open(f"{out_dir}/{n}.json", "wb") as f:
            f.write(body)
        return True
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return False


with open(urls_file) as f:
    urls = f.read().split()

with ThreadPoolExecutor(max_workers=workers) as pool:
    ok = all(list(pool.map(fetch, enumerate(urls))))
sys.exit(0 if ok else 1)
