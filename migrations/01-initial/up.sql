-- The URL queue, the runs that worked on it, and the job's settings.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- One row per `jobrun run`. A run whose ended_at is NULL is either still going or
-- was killed; pid, host, boot_id and proc_start tell which.
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,
    pid          INTEGER NOT NULL,
    host         TEXT NOT NULL,
    boot_id      TEXT NOT NULL,
    proc_start   INTEGER NOT NULL,          -- process start time, to tell a reused pid apart
    command      TEXT NOT NULL,             -- how it was started, secrets removed
    started_at   INTEGER NOT NULL,          -- unix milliseconds, like every time here
    heartbeat_at INTEGER NOT NULL,
    ended_at     INTEGER,
    outcome      TEXT,                      -- finished, interrupted, error, killed, rebooted
    message      TEXT,                      -- what stopped it, for outcome error
    done         INTEGER NOT NULL DEFAULT 0,
    failed       INTEGER NOT NULL DEFAULT 0,
    retried      INTEGER NOT NULL DEFAULT 0,
    bytes        INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE urls (
    id              INTEGER PRIMARY KEY,
    url             TEXT NOT NULL UNIQUE,
    path            TEXT NOT NULL UNIQUE,   -- output file, relative to the output folder
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'done', 'failed')),
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

CREATE INDEX urls_by_state ON urls (state, next_attempt_at);
