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

-- What each URL is, fixed at import and never updated: what to send and where its file
-- goes. Its unique indexes on text are written once per URL, never by the queue. Import takes
-- ids by the thousand: each connection keeps 64 at a time, in ascending order, so that most
-- take no lock and write no WAL (a connection that ends leaves a gap of at most 63).
CREATE TABLE requests (
    id           bigint GENERATED ALWAYS AS IDENTITY (CACHE 64) PRIMARY KEY,
    url          text COLLATE "C" NOT NULL,   -- byte order: unique checks need no locale
    request      text,
    request_hash text COLLATE "C" NOT NULL DEFAULT '',
    host         text NOT NULL,
    -- Byte order, as in SQLite: the folder checks of named paths compare ranges.
    path         text COLLATE "C" NOT NULL UNIQUE,
    UNIQUE (url, request_hash)
);

-- Where each URL stands: the queue, one row per request with the same id. Every claim and
-- outcome rewrites a row here and nothing else, so a change of state writes a narrow row,
-- its primary key and at most one partial index, not the URL's text indexes.
CREATE TABLE jobs (
    id              bigint PRIMARY KEY,
    next_attempt_at bigint NOT NULL DEFAULT 0,
    fence           bigint NOT NULL DEFAULT 0,   -- bumped by every claim
    run_id          bigint,                      -- lease owner: the run that holds or last held it
    lease_until     bigint,                      -- deadline at claim; the owner's heartbeat renews it
    written_by      bigint,                      -- the run (and so the machine) that wrote the done file
    bytes           bigint,
    duration_ms     bigint,
    updated_at      bigint,
    fetched_at      bigint,
    refresh_round   bigint,
    attempts        integer NOT NULL DEFAULT 0,
    interrupted     integer NOT NULL DEFAULT 0,
    rescued         integer NOT NULL DEFAULT 0,  -- taken back from runs that died holding it
    http_status     integer,
    answer_status   integer,                     -- of the last finished attempt, a refresh's too
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'done', 'failed')),
    host            text NOT NULL,               -- the request's, for claims that skip hosts
    sha256          bytea,
    error           text,
    etag            text,
    last_modified   text,
    refresh         text,
    refresh_error   text
) WITH (fillfactor = 80);                        -- room for a row's next version on its page
-- What a claim walks: due rows only, retries by due time, new rows in import order.
CREATE INDEX jobs_claimable ON jobs (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX jobs_running ON jobs (run_id) WHERE state = 'running';
CREATE INDEX jobs_failed ON jobs (id) WHERE state = 'failed';
CREATE INDEX jobs_to_refresh ON jobs (next_attempt_at, id) WHERE refresh = 'pending' AND state = 'done';

-- The two as one, for reading (report, export, verify). A query that needs no column of
-- requests reads jobs alone: the planner drops a left join on a unique key it does not use.
CREATE VIEW urls AS
SELECT j.id, r.url, r.request, r.request_hash, j.host, r.path, j.state, j.attempts,
       j.interrupted, j.rescued, j.next_attempt_at, j.run_id, j.fence, j.lease_until,
       j.written_by, j.http_status, j.bytes, j.sha256, j.error, j.duration_ms, j.updated_at,
       j.etag, j.last_modified, j.fetched_at, j.refresh, j.refresh_round, j.refresh_error
FROM jobs j LEFT JOIN requests r ON r.id = j.id;

-- Counters kept in the statements that change jobs, one slot per database connection (its
-- backend pid) so that runs never wait on each other's counters. Import adds its rows
-- itself, and so does a claim of pending rows (the commonest update, and one that moves rows
-- from pending to running and changes nothing else counted); every other update is counted
-- by the trigger below.
CREATE TABLE tallies (
    slot   integer NOT NULL,
    state  text NOT NULL,
    status integer NOT NULL,                   -- last HTTP status, 0 for none
    rows   bigint NOT NULL,
    bytes  bigint NOT NULL,                    -- of done rows
    PRIMARY KEY (slot, state, status)
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

-- Per host: rows by state (running rows count as pending, so that a claim changes nothing
-- here) and finished attempts, with how many were answered 429 or 503. A batch spread over
-- a thousand hosts would rewrite a thousand counters; each statement that changes them
-- appends one row of arrays to host_changes instead (a batch of outcomes, one row for its
-- states and answers together), and every 16 such rows are added up into host_counts at once:
-- a fold of a few rows, so that the statement that does it is not much slower than others.
CREATE TABLE host_counts (
    slot       integer NOT NULL,
    host       text NOT NULL,
    pending    bigint NOT NULL,
    done       bigint NOT NULL,
    failed     bigint NOT NULL,
    answers    bigint NOT NULL,
    status_429 bigint NOT NULL,
    status_503 bigint NOT NULL,
    PRIMARY KEY (slot, host)
) WITH (fillfactor = 50);                        -- a fold rewrites every host's row: in place (HOT)
CREATE TABLE host_changes (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hosts      text[] NOT NULL,
    pending    bigint[],                       -- NULL when the change has no such counts, not
                                               -- an array of zeros to write, compress and add
    done       bigint[],
    failed     bigint[],
    answers    bigint[],
    status_429 bigint[],
    status_503 bigint[]
);
-- A batch's row of arrays is tens of kilobytes, written once and read once by a fold: lz4
-- compresses it several times faster than the default pglz, where the server has lz4.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE host_changes ALTER COLUMN hosts SET COMPRESSION lz4,
        ALTER COLUMN pending SET COMPRESSION lz4, ALTER COLUMN done SET COMPRESSION lz4,
        ALTER COLUMN failed SET COMPRESSION lz4, ALTER COLUMN answers SET COMPRESSION lz4,
        ALTER COLUMN status_429 SET COMPRESSION lz4, ALTER COLUMN status_503 SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value OR syntax_error THEN
    NULL;
END $$;

-- Both, added up; what report reads.
CREATE VIEW host_totals AS
SELECT host, pending, done, failed, answers, status_429, status_503 FROM host_counts
UNION ALL
SELECT c.host, coalesce(c.pending, 0), coalesce(c.done, 0), coalesce(c.failed, 0),
       coalesce(c.answers, 0), coalesce(c.status_429, 0), coalesce(c.status_503, 0)
FROM host_changes,
     unnest(hosts, pending, done, failed, answers, status_429, status_503)
         AS c(host, pending, done, failed, answers, status_429, status_503);
CREATE VIEW host_tallies AS
SELECT t.host, s.state, s.rows
FROM host_totals t
CROSS JOIN LATERAL (VALUES ('pending', t.pending), ('done', t.done), ('failed', t.failed))
    AS s(state, rows);
CREATE VIEW host_answers AS
SELECT host, answers, status_429, status_503 FROM host_totals;

-- Adds up the changes no other transaction is folding, in this connection's slot, and
-- removes them in the same transaction: each is counted once, whoever folds it. The arrays
-- are stepped through together by unnest in the select list (a shorter or NULL one gives
-- NULLs, as unnest of several arrays does), without unnest in FROM copying each row's arrays
-- into a store first. The slot's existing rows are updated by one join (in place: see the
-- table's fillfactor), and only hosts new to the slot are inserted: an upsert of every host
-- tried an insert first, row by row, and was most of a fold's time.
CREATE FUNCTION fold_host_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(*) FROM host_changes) >= 16 THEN
        WITH folded AS (
            DELETE FROM host_changes
            WHERE id = ANY(ARRAY(SELECT id FROM host_changes FOR UPDATE SKIP LOCKED))
            RETURNING hosts, pending, done, failed, answers, status_429, status_503),
        sums AS (
            SELECT c.host, coalesce(sum(c.pending), 0) AS pending,
                   coalesce(sum(c.done), 0) AS done, coalesce(sum(c.failed), 0) AS failed,
                   coalesce(sum(c.answers), 0) AS answers,
                   coalesce(sum(c.status_429), 0) AS status_429,
                   coalesce(sum(c.status_503), 0) AS status_503
            FROM (SELECT unnest(hosts) AS host, unnest(pending) AS pending, unnest(done) AS done,
                         unnest(failed) AS failed, unnest(answers) AS answers,
                         unnest(status_429) AS status_429, unnest(status_503) AS status_503
                  FROM folded) AS c
            GROUP BY c.host),
        updated AS (
            UPDATE host_counts h SET pending = h.pending + s.pending, done = h.done + s.done,
                failed = h.failed + s.failed, answers = h.answers + s.answers,
                status_429 = h.status_429 + s.status_429,
                status_503 = h.status_503 + s.status_503
            FROM sums s
            WHERE h.slot = pg_backend_pid() AND h.host = s.host
            RETURNING h.host)
        INSERT INTO host_counts AS h
            (slot, host, pending, done, failed, answers, status_429, status_503)
        SELECT pg_backend_pid(), s.host, s.pending, s.done, s.failed, s.answers, s.status_429,
               s.status_503
        FROM sums s
        WHERE NOT EXISTS (SELECT 1 FROM updated u WHERE u.host = s.host)
        ORDER BY s.host
        ON CONFLICT (slot, host) DO UPDATE SET pending = h.pending + excluded.pending,
            done = h.done + excluded.done, failed = h.failed + excluded.failed,
            answers = h.answers + excluded.answers,
            status_429 = h.status_429 + excluded.status_429,
            status_503 = h.status_503 + excluded.status_503;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER host_changes_fold AFTER INSERT ON host_changes
    FOR EACH STATEMENT EXECUTE FUNCTION fold_host_changes();

-- A row for every statement that put rows back to pending as never tried (a run's unstarted
-- or interrupted rows, a rescue, `retry`, `verify`), written by the trigger below. A claim
-- starts where its run's last one got to; one that finds a row here it has not seen starts
-- from the beginning instead, so rows given back behind it are not left waiting. Only
-- inserted, so that those statements never wait on each other here.
CREATE TABLE requeues (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY
);

-- Every update of jobs, counted: old rows -1, new rows +1, one upsert per counter table in
-- key order, so that two transactions never take the same counters' locks in opposite
-- orders. Static SQL, so that its plans are kept. The error's example URL is looked up only
-- for rows that have an error. Per host, the rows by state and the attempts that finished
-- (a row's attempts went up; answer_status says how it was answered) go in as one row of
-- host_changes; a claim, which only moves rows from pending to running, which count alike
-- there, finishes no attempt and changes no host, skips that part. Rows back to pending as
-- never tried leave a row in requeues. A statement that counted its own rows says so by
-- setting jobrun.counted to 'claim' for the rest of its transaction, in the same query that
-- adds its counts (so only once it has rows to count); the trigger then counts nothing and
-- clears it, so that the statements after it are counted again. The old and new rows are
-- joined by hash: a merge join sorted both for each batch of outcomes.
CREATE FUNCTION tally_jobs() RETURNS trigger LANGUAGE plpgsql SET enable_mergejoin = off AS $$
BEGIN
    IF current_setting('jobrun.counted', true) = 'claim' THEN
        PERFORM set_config('jobrun.counted', '', true);
        RETURN NULL;
    END IF;
    WITH d AS (
        SELECT id, state, http_status, bytes, error, refresh_round, refresh, -1 AS n
        FROM changed_old
        UNION ALL
        SELECT id, state, http_status, bytes, error, refresh_round, refresh, 1
        FROM changed_new),
    states AS (
        INSERT INTO tallies AS t (slot, state, status, rows, bytes)
        SELECT pg_backend_pid(), state, coalesce(http_status, 0), sum(n),
               sum(CASE WHEN state = 'done' THEN n * coalesce(bytes, 0) ELSE 0 END)
        FROM d
        GROUP BY 2, 3
        HAVING sum(n) <> 0
            OR sum(CASE WHEN state = 'done' THEN n * coalesce(bytes, 0) ELSE 0 END) <> 0
        ORDER BY 2, 3
        ON CONFLICT (slot, state, status)
        DO UPDATE SET rows = t.rows + excluded.rows, bytes = t.bytes + excluded.bytes),
    errors AS (
        INSERT INTO error_tallies AS t (slot, error, rows, example)
        SELECT pg_backend_pid(), error, sum(n),
               min((SELECT r.url FROM requests r WHERE r.id = d.id))
        FROM d
        WHERE state <> 'done' AND error IS NOT NULL
        GROUP BY 2 HAVING sum(n) <> 0
        ORDER BY 2
        ON CONFLICT (slot, error) DO UPDATE SET rows = t.rows + excluded.rows)
    INSERT INTO refresh_tallies AS t (slot, round, refresh, rows)
    SELECT pg_backend_pid(), refresh_round, coalesce(refresh, ''), sum(n)
    FROM d
    WHERE refresh_round IS NOT NULL
    GROUP BY 2, 3 HAVING sum(n) <> 0
    ORDER BY 2, 3
    ON CONFLICT (slot, round, refresh) DO UPDATE SET rows = t.rows + excluded.rows;
    -- A row's host never changes: each old row and its new version are one host's.
    IF EXISTS (SELECT 1 FROM changed_new WHERE state <> 'running')
       OR EXISTS (SELECT 1 FROM changed_old WHERE state NOT IN ('pending', 'running')) THEN
        WITH per_host AS (
            SELECT n.host,
                   count(*) FILTER (WHERE n.state IN ('pending', 'running'))
                       - count(*) FILTER (WHERE o.state IN ('pending', 'running')) AS pending,
                   count(*) FILTER (WHERE n.state = 'done')
                       - count(*) FILTER (WHERE o.state = 'done') AS done,
                   count(*) FILTER (WHERE n.state = 'failed')
                       - count(*) FILTER (WHERE o.state = 'failed') AS failed,
                   count(*) FILTER (WHERE n.attempts > o.attempts) AS answers,
                   count(*) FILTER (WHERE n.attempts > o.attempts
                                      AND n.answer_status = 429) AS status_429,
                   count(*) FILTER (WHERE n.attempts > o.attempts
                                      AND n.answer_status = 503) AS status_503
            FROM changed_old o JOIN changed_new n ON n.id = o.id
            GROUP BY n.host)
        INSERT INTO host_changes (hosts, pending, done, failed, answers, status_429, status_503)
        SELECT array_agg(host),
               CASE WHEN bool_or(pending <> 0) THEN array_agg(pending) END,
               CASE WHEN bool_or(done <> 0) THEN array_agg(done) END,
               CASE WHEN bool_or(failed <> 0) THEN array_agg(failed) END,
               CASE WHEN bool_or(answers <> 0) THEN array_agg(answers) END,
               CASE WHEN bool_or(status_429 <> 0) THEN array_agg(status_429) END,
               CASE WHEN bool_or(status_503 <> 0) THEN array_agg(status_503) END
        FROM per_host WHERE pending <> 0 OR done <> 0 OR failed <> 0 OR answers <> 0
        HAVING count(*) > 0;
    END IF;
    IF EXISTS (SELECT 1 FROM changed_new WHERE state = 'pending' AND next_attempt_at <= 0) THEN
        INSERT INTO requeues DEFAULT VALUES;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_tally AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION tally_jobs();

-- The duration histogram of finished attempts, per connection like the tallies.
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
