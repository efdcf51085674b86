-- Requests beyond a plain GET (method, headers and body from JSON Lines), the host of
-- every URL for per-host counts, and request durations for the report.
-- SQLite cannot drop the UNIQUE on url or change a CHECK in place, so the table is rebuilt.

CREATE TABLE urls_v2 (
    id              INTEGER PRIMARY KEY,
    url             TEXT NOT NULL,
    request         TEXT,                   -- JSON {"method", "headers", "body"}; NULL for a plain GET
    -- A job is its URL and its request: '' for a plain GET, else the request's sha256.
    -- Two columns, not one key, so that the table does not hold every URL twice.
    request_hash    TEXT NOT NULL DEFAULT '',
    host            TEXT NOT NULL,          -- host[:port] as written in the URL
    path            TEXT NOT NULL UNIQUE,   -- output file, relative to the output folder
    -- Plain comparisons: SQLite evaluates IN (...) in a CHECK by building a
    -- temporary b-tree on every insert and every change of state.
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state = 'pending' OR state = 'running' OR state = 'done'
                           OR state = 'failed'),
    attempts        INTEGER NOT NULL DEFAULT 0,
    interrupted     INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    run_id          INTEGER,
    http_status     INTEGER,
    bytes           INTEGER,
    sha256          BLOB,
    error           TEXT,
    duration_ms     INTEGER,                -- how long the last attempt took
    updated_at      INTEGER,
    UNIQUE (url, request_hash)
) STRICT;

INSERT INTO urls_v2 (id, url, host, path, state, attempts, interrupted,
                     next_attempt_at, run_id, http_status, bytes, sha256, error, updated_at)
SELECT id, url,
       -- the authority, less any user:password@
       substr(authority, instr(authority, '@') + 1),
       path, state, attempts, interrupted, next_attempt_at, run_id, http_status, bytes,
       sha256, error, updated_at
FROM (SELECT *, substr(rest, 1, instr(rest || '/', '/') - 1) AS authority
      FROM (SELECT *, substr(url, instr(url, '://') + 3) AS rest FROM urls))
ORDER BY id;

DROP TABLE urls;
ALTER TABLE urls_v2 RENAME TO urls;
CREATE INDEX urls_by_state ON urls (state, next_attempt_at);

-- A histogram of request durations: bucket b holds requests of about 2^(b/4) ms.
CREATE TABLE durations (
    bucket INTEGER PRIMARY KEY,
    count  INTEGER NOT NULL
) STRICT;
