-- Counters for report and the start of a run, so that neither reads every row: rows by origin,
-- state and last HTTP status (with the bytes of done rows), and the last errors of rows not
-- done. They count the rows up to `tallied.id`, kept by the triggers below; newer rows are
-- added a batch at a time after each import transaction (src/store/sqlite/tallies.rs), since
-- a trigger on insert would make every insert keep a statement journal. A running row counts as pending,
-- so that a claim changes no counter; the few running rows are counted on the state index.

CREATE TABLE tallies (
    origin_id INTEGER NOT NULL,                 -- origins.id
    state     TEXT NOT NULL,                    -- pending (running included), done or failed
    status    INTEGER NOT NULL,                 -- last HTTP status, 0 for none
    rows      INTEGER NOT NULL,
    bytes     INTEGER NOT NULL,                 -- of done rows
    PRIMARY KEY (origin_id, state, status)
) STRICT, WITHOUT ROWID;

CREATE TABLE error_tallies (
    error      TEXT PRIMARY KEY,                -- last error of rows not done
    rows       INTEGER NOT NULL,
    example_id INTEGER NOT NULL                 -- urls.id of a row that had it
) STRICT, WITHOUT ROWID;

-- One row: the tallies count the rows of urls whose id is at most `id` (rows are never
-- deleted, so a new row's id is past it). `touched` says that a row past it changed since,
-- so that the next fold must read those rows, not take them as they were imported.
CREATE TABLE tallied (
    id      INTEGER NOT NULL,
    touched INTEGER NOT NULL
) STRICT;

INSERT INTO tallied (id, touched) SELECT coalesce(max(id), 0), 0 FROM urls;

INSERT INTO tallies (origin_id, state, status, rows, bytes)
SELECT origin_id, CASE WHEN state = 'running' THEN 'pending' ELSE state END,
       coalesce(http_status, 0), count(*),
       sum(CASE WHEN state = 'done' THEN coalesce(bytes, 0) ELSE 0 END)
FROM urls GROUP BY 1, 2, 3;

INSERT INTO error_tallies (error, rows, example_id)
SELECT error, count(*), min(id) FROM urls
WHERE error IS NOT NULL AND state <> 'done' GROUP BY error;

-- One trigger for every change the counters see, so that a claim, which changes none, costs
-- one test of its WHEN: a changed row that is tallied leaves its old counters (old) for its
-- new ones (new); one past the mark marks the mark touched.
CREATE TRIGGER urls_tally_update AFTER UPDATE OF origin_id, state, http_status, bytes, error
ON urls
WHEN old.origin_id IS NOT new.origin_id
  OR old.http_status IS NOT new.http_status
  OR (CASE WHEN old.state = 'running' THEN 'pending' ELSE old.state END)
     IS NOT (CASE WHEN new.state = 'running' THEN 'pending' ELSE new.state END)
  OR ((old.state = 'done' OR new.state = 'done') AND old.bytes IS NOT new.bytes)
  OR ((old.error IS NOT new.error OR (old.state = 'done') IS NOT (new.state = 'done'))
      AND ((old.error IS NOT NULL AND old.state <> 'done')
           OR (new.error IS NOT NULL AND new.state <> 'done')))
  OR old.id > (SELECT id FROM tallied)
BEGIN
    UPDATE tallied SET touched = 1 WHERE touched = 0 AND old.id > id;
    UPDATE tallies SET rows = rows - 1,
        bytes = bytes - CASE WHEN old.state = 'done' THEN coalesce(old.bytes, 0) ELSE 0 END
    WHERE origin_id = old.origin_id
      AND state = CASE WHEN old.state = 'running' THEN 'pending' ELSE old.state END
      AND status = coalesce(old.http_status, 0)
      AND old.id <= (SELECT id FROM tallied);
    INSERT INTO tallies (origin_id, state, status, rows, bytes)
    SELECT new.origin_id, CASE WHEN new.state = 'running' THEN 'pending' ELSE new.state END,
           coalesce(new.http_status, 0), 1,
           CASE WHEN new.state = 'done' THEN coalesce(new.bytes, 0) ELSE 0 END
    WHERE old.id <= (SELECT id FROM tallied)
    ON CONFLICT DO UPDATE SET rows = rows + 1, bytes = bytes + excluded.bytes;
    UPDATE error_tallies SET rows = rows - 1
    WHERE error = old.error AND old.state <> 'done' AND old.id <= (SELECT id FROM tallied);
    INSERT INTO error_tallies (error, rows, example_id)
    SELECT new.error, 1, new.id WHERE new.error IS NOT NULL AND new.state <> 'done'
      AND old.id <= (SELECT id FROM tallied)
    ON CONFLICT DO UPDATE SET rows = rows + 1;
END;

CREATE TRIGGER urls_tally_delete AFTER DELETE ON urls BEGIN
    UPDATE tallied SET touched = 1 WHERE touched = 0 AND old.id > id;
    UPDATE tallies SET rows = rows - 1,
        bytes = bytes - CASE WHEN old.state = 'done' THEN coalesce(old.bytes, 0) ELSE 0 END
    WHERE origin_id = old.origin_id
      AND state = CASE WHEN old.state = 'running' THEN 'pending' ELSE old.state END
      AND status = coalesce(old.http_status, 0)
      AND old.id <= (SELECT id FROM tallied);
    UPDATE error_tallies SET rows = rows - 1
    WHERE error = old.error AND old.state <> 'done' AND old.id <= (SELECT id FROM tallied);
END;
