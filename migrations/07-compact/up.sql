-- Smaller rows: a URL's scheme://host[:port] lives once in `origins`, not in every row; a
-- generated file name (a lowercase UUID, then the extension) is kept as 16 bytes and the
-- extension; the index on refresh rounds holds only rows that were refreshed.
-- SQLite cannot change a column's type in place, so the table is rebuilt.

-- A URL is `prefix || url`: the prefix is everything before the path, or '' when that part
-- holds a user name or password (they stay in the row's own URL) or there is no path.
CREATE TABLE origins (
    id     INTEGER PRIMARY KEY,
    prefix TEXT NOT NULL,
    host   TEXT NOT NULL,                   -- host[:port] as written in the URL
    UNIQUE (prefix, host)
) STRICT;

CREATE TABLE urls_v3 (
    id              INTEGER PRIMARY KEY,
    origin_id       INTEGER NOT NULL,       -- origins.id
    url             TEXT NOT NULL,          -- the URL less its origin's prefix
    request         TEXT,                   -- JSON {"method", "headers", "body"}; NULL for a plain GET
    request_hash    TEXT NOT NULL DEFAULT '',
    -- Output file, relative to the output folder: text, or for a name that starts with a
    -- lowercase UUID, a blob of its 16 bytes followed by the rest of the name.
    path            ANY NOT NULL UNIQUE,
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
    duration_ms     INTEGER,
    updated_at      INTEGER,
    etag            TEXT,
    last_modified   TEXT,
    fetched_at      INTEGER,
    refresh         TEXT,
    refresh_round   INTEGER,
    refresh_error   TEXT,
    fence           INTEGER NOT NULL DEFAULT 0,
    UNIQUE (origin_id, url, request_hash)
) STRICT;

CREATE TEMP VIEW split AS
SELECT *,
       CASE WHEN instr(url, '://') > 0 AND instr(rest, '/') > 0
                 AND NOT substr(rest, 1, instr(rest, '/') - 1) GLOB '*[@?#]*'
            THEN substr(url, 1, instr(url, '://') + 1 + instr(rest, '/'))
            ELSE '' END AS prefix
FROM (SELECT *, substr(url, instr(url, '://') + 3) AS rest FROM urls);

INSERT INTO origins (prefix, host) SELECT DISTINCT prefix, host FROM split;

INSERT INTO urls_v3 (id, origin_id, url, request, request_hash, path, state, attempts,
                     interrupted, next_attempt_at, run_id, http_status, bytes, sha256, error,
                     duration_ms, updated_at, etag, last_modified, fetched_at, refresh,
                     refresh_round, refresh_error, fence)
SELECT u.id, o.id, substr(u.url, length(u.prefix) + 1), u.request, u.request_hash,
       CASE WHEN substr(u.path, 1, 36) GLOB
                 '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]'
            THEN unhex(replace(substr(u.path, 1, 36), '-', '') || hex(substr(u.path, 37)))
            ELSE u.path END,
       u.state, u.attempts, u.interrupted, u.next_attempt_at, u.run_id, u.http_status,
       u.bytes, u.sha256, u.error, u.duration_ms, u.updated_at, u.etag, u.last_modified,
       u.fetched_at, u.refresh, u.refresh_round, u.refresh_error, u.fence
FROM split AS u
JOIN origins AS o ON o.prefix = u.prefix AND o.host = u.host
ORDER BY u.id;

DROP VIEW split;
DROP TABLE urls;
ALTER TABLE urls_v3 RENAME TO urls;
CREATE INDEX urls_by_state ON urls (state, next_attempt_at);
CREATE INDEX urls_to_refresh ON urls (next_attempt_at) WHERE refresh = 'pending';
CREATE INDEX urls_by_refresh_round ON urls (refresh_round, refresh)
    WHERE refresh_round IS NOT NULL;
