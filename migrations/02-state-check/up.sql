-- The state check as plain comparisons. SQLite evaluates `state IN (four values)` by
-- building a temporary b-tree on every insert and every change of state: a third of an
-- import's time, and two b-trees per fetched URL. A check cannot be altered in place, so
-- the table is copied.

CREATE TABLE urls_new (
    id              INTEGER PRIMARY KEY,
    url             TEXT NOT NULL UNIQUE,
    path            TEXT NOT NULL UNIQUE,   -- output file, relative to the output folder
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state = 'pending' OR state = 'running' OR state = 'done'
                           OR state = 'failed'),
    attempts        INTEGER NOT NULL DEFAULT 0,  -- finished attempts; the retry budget
    interrupted     INTEGER NOT NULL DEFAULT 0,  -- attempts cut short by a kill or Ctrl-C
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    run_id          INTEGER,                     -- the run that holds or last held it
    http_status     INTEGER,
    bytes           INTEGER,
    sha256          BLOB,
    error           TEXT,
    updated_at      INTEGER
) STRICT;

INSERT INTO urls_new (id, url, path, state, attempts, interrupted, next_attempt_at, run_id,
                      http_status, bytes, sha256, error, updated_at)
    SELECT id, url, path, state, attempts, interrupted, next_attempt_at, run_id,
           http_status, bytes, sha256, error, updated_at
    FROM urls ORDER BY id;

DROP TABLE urls;
ALTER TABLE urls_new RENAME TO urls;
CREATE INDEX urls_by_state ON urls (state, next_attempt_at);
