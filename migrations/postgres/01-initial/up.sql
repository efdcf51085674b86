-- The URL queue shared by runs on several machines, the runs, the job's settings, and the
-- counters that report reads instead of counting millions of rows. Times are unix milliseconds.

CREATE TABLE settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per `jobrun run`, on whichever machine. A run whose heartbeat is older than its
-- lease is dead, wherever it ran; on its own machine its pid says so at once.
CREATE TABLE runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pid          bigint NOT NULL,
    pid_ns       bigint,
    host         text NOT NULL,
    boot_id      text NOT NULL,
    proc_start   bigint NOT NULL,
    command      text NOT NULL,
    started_at   bigint NOT NULL,
    heartbeat_at bigint NOT NULL,              -- the server's clock, so machines' clocks need not agree
    lease_ms     bigint NOT NULL,              -- how stale its heartbeat may get before it counts as dead
    ended_at     bigint,
    outcome      text,
    message      text,
    done         bigint NOT NULL DEFAULT 0,
    failed       bigint NOT NULL DEFAULT 0,
    retried      bigint NOT NULL DEFAULT 0,
    bytes        bigint NOT NULL DEFAULT 0
);
CREATE INDEX runs_unfinished ON runs (id) WHERE ended_at IS NULL;

CREATE TABLE urls (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url             text NOT NULL,
    request         text,
    request_hash    text NOT NULL DEFAULT '',
    host            text NOT NULL,
    -- Byte order, as in SQLite: the folder checks of named paths compare ranges.
    path            text COLLATE "C" NOT NULL UNIQUE,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    interrupted     integer NOT NULL DEFAULT 0,
    rescued         integer NOT NULL DEFAULT 0,  -- taken back from runs that died holding it
    next_attempt_at bigint NOT NULL DEFAULT 0,
    run_id          bigint,                      -- lease owner: the run that holds or last held it
    fence           bigint NOT NULL DEFAULT 0,   -- bumped by every claim
    lease_until     bigint,                      -- deadline at claim; the owner's heartbeat renews it
    written_by      bigint,                      -- the run (and so the machine) that wrote the done file
    http_status     integer,
    bytes           bigint,
    sha256          bytea,
    error           text,
    duration_ms     bigint,
    updated_at      bigint,
    etag            text,
    last_modified   text,
    fetched_at      bigint,
    refresh         text,
    refresh_round   bigint,
    refresh_error   text,
    UNIQUE (url, request_hash)
);
-- What a claim walks: due rows only, retries by due time, new rows in import order.
CREATE INDEX urls_claimable ON urls (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX urls_running ON urls (run_id) WHERE state = 'running';
CREATE INDEX urls_failed ON urls (id) WHERE state = 'failed';
CREATE INDEX urls_to_refresh ON urls (next_attempt_at, id) WHERE refresh = 'pending' AND state = 'done';

-- Counters kept by the triggers below in the statements that change urls, one slot per
-- database connection (its backend pid) so that runs never wait on each other's counters.
CREATE TABLE tallies (
    slot   integer NOT NULL,
    state  text NOT NULL,
    status integer NOT NULL,                   -- last HTTP status, 0 for none
    rows   bigint NOT NULL,
    bytes  bigint NOT NULL,                    -- of done rows
    PRIMARY KEY (slot, state, status)
);
-- Per host, running rows count as pending: a claim, the commonest change, changes nothing here.
CREATE TABLE host_tallies (
    slot  integer NOT NULL,
    host  text NOT NULL,
    state text NOT NULL,                       -- pending (or running), done, failed
    rows  bigint NOT NULL,
    PRIMARY KEY (slot, host, state)
);
CREATE TABLE error_tallies (
    slot    integer NOT NULL,
    error   text NOT NULL,                     -- last error of rows not done
    rows    bigint NOT NULL,
    example text NOT NULL,                     -- a URL that had it
    PRIMARY KEY (slot, error)
);
CREATE TABLE refresh_tallies (
    slot    integer NOT NULL,
    round   bigint NOT NULL,
    refresh text NOT NULL,
    rows    bigint NOT NULL,
    PRIMARY KEY (slot, round, refresh)
);

-- One function for inserts and updates (rows are never deleted): old rows count -1, new rows
-- +1, one upsert per counter table for the whole statement, in key order so that two
-- transactions never take the same counters' locks in opposite orders. Static SQL, so that
-- its plans are kept; each trigger only runs the branch whose transition tables it has.
CREATE FUNCTION tally_urls() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO tallies AS t (slot, state, status, rows, bytes)
        SELECT pg_backend_pid(), state, coalesce(http_status, 0), sum(n),
               sum(CASE WHEN state = 'done' THEN n * coalesce(bytes, 0) ELSE 0 END)
        FROM (SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, 1 AS n FROM changed_new) AS d
        GROUP BY 2, 3
        HAVING sum(n) <> 0
            OR sum(CASE WHEN state = 'done' THEN n * coalesce(bytes, 0) ELSE 0 END) <> 0
        ORDER BY 2, 3
        ON CONFLICT (slot, state, status)
        DO UPDATE SET rows = t.rows + excluded.rows, bytes = t.bytes + excluded.bytes;
        INSERT INTO host_tallies AS t (slot, host, state, rows)
        SELECT pg_backend_pid(), host, CASE WHEN state = 'running' THEN 'pending' ELSE state END,
               sum(n)
        FROM (SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, 1 AS n FROM changed_new) AS d
        GROUP BY 2, 3 HAVING sum(n) <> 0
        ORDER BY 2, 3
        ON CONFLICT (slot, host, state) DO UPDATE SET rows = t.rows + excluded.rows;
        INSERT INTO error_tallies AS t (slot, error, rows, example)
        SELECT pg_backend_pid(), error, sum(n), min(url)
        FROM (SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, 1 AS n FROM changed_new) AS d
        WHERE state <> 'done' AND error IS NOT NULL
        GROUP BY 2 HAVING sum(n) <> 0
        ORDER BY 2
        ON CONFLICT (slot, error) DO UPDATE SET rows = t.rows + excluded.rows;
        INSERT INTO refresh_tallies AS t (slot, round, refresh, rows)
        SELECT pg_backend_pid(), refresh_round, coalesce(refresh, ''), sum(n)
        FROM (SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, 1 AS n FROM changed_new) AS d
        WHERE refresh_round IS NOT NULL
        GROUP BY 2, 3 HAVING sum(n) <> 0
        ORDER BY 2, 3
        ON CONFLICT (slot, round, refresh) DO UPDATE SET rows = t.rows + excluded.rows;
    ELSE
        INSERT INTO tallies AS t (slot, state, status, rows, bytes)
        SELECT pg_backend_pid(), state, coalesce(http_status, 0), sum(n),
               sum(CASE WHEN state = 'done' THEN n * coalesce(bytes, 0) ELSE 0 END)
        FROM (SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, -1 AS n
              FROM changed_old
              UNION ALL
              SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, 1
              FROM changed_new) AS d
        GROUP BY 2, 3
        HAVING sum(n) <> 0
            OR sum(CASE WHEN state = 'done' THEN n * coalesce(bytes, 0) ELSE 0 END) <> 0
        ORDER BY 2, 3
        ON CONFLICT (slot, state, status)
        DO UPDATE SET rows = t.rows + excluded.rows, bytes = t.bytes + excluded.bytes;
        INSERT INTO host_tallies AS t (slot, host, state, rows)
        SELECT pg_backend_pid(), host, CASE WHEN state = 'running' THEN 'pending' ELSE state END,
               sum(n)
        FROM (SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, -1 AS n
              FROM changed_old
              UNION ALL
              SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, 1
              FROM changed_new) AS d
        GROUP BY 2, 3 HAVING sum(n) <> 0
        ORDER BY 2, 3
        ON CONFLICT (slot, host, state) DO UPDATE SET rows = t.rows + excluded.rows;
        INSERT INTO error_tallies AS t (slot, error, rows, example)
        SELECT pg_backend_pid(), error, sum(n), min(url)
        FROM (SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, -1 AS n
              FROM changed_old
              UNION ALL
              SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, 1
              FROM changed_new) AS d
        WHERE state <> 'done' AND error IS NOT NULL
        GROUP BY 2 HAVING sum(n) <> 0
        ORDER BY 2
        ON CONFLICT (slot, error) DO UPDATE SET rows = t.rows + excluded.rows;
        INSERT INTO refresh_tallies AS t (slot, round, refresh, rows)
        SELECT pg_backend_pid(), refresh_round, coalesce(refresh, ''), sum(n)
        FROM (SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, -1 AS n
              FROM changed_old
              UNION ALL
              SELECT url, host, state, http_status, bytes, error, refresh_round, refresh, 1
              FROM changed_new) AS d
        WHERE refresh_round IS NOT NULL
        GROUP BY 2, 3 HAVING sum(n) <> 0
        ORDER BY 2, 3
        ON CONFLICT (slot, round, refresh) DO UPDATE SET rows = t.rows + excluded.rows;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER urls_tally_insert AFTER INSERT ON urls
    REFERENCING NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION tally_urls();
CREATE TRIGGER urls_tally_update AFTER UPDATE ON urls
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION tally_urls();

-- Finished attempts per host and how many were 429 or 503, and the duration histogram,
-- per connection like the tallies.
CREATE TABLE host_answers (
    slot       integer NOT NULL,
    host       text NOT NULL,
    answers    bigint NOT NULL,
    status_429 bigint NOT NULL,
    status_503 bigint NOT NULL,
    PRIMARY KEY (slot, host)
);
CREATE TABLE durations (
    slot   integer NOT NULL,
    bucket integer NOT NULL,
    count  bigint NOT NULL,
    PRIMARY KEY (slot, bucket)
);

-- Taken by `jobrun refresh` while it numbers a new round.
CREATE TABLE refresh_rounds (
    round      bigint PRIMARY KEY,
    started_at bigint NOT NULL
);
