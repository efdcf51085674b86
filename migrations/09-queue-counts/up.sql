-- The queue counts what a run's commits change in the tallies itself, a batch at a time, by
-- origin, state, status and error, instead of the trigger doing it row by row: the trigger
-- leaves alone the changes made while `queue_counting` holds a row. Only the queue's own
-- transaction inserts that row, and deletes it before it commits, so every other change (the
-- commands that give rows back, another program, the sqlite3 shell) is counted by the trigger
-- as before.

CREATE TABLE queue_counting (
    run_id INTEGER NOT NULL                     -- the run whose commit counts its own changes
) STRICT;

DROP TRIGGER urls_tally_update;

-- As in 08-tallies, with the test of `queue_counting` first.
CREATE TRIGGER urls_tally_update AFTER UPDATE OF origin_id, state, http_status, bytes, error
ON urls
WHEN NOT EXISTS (SELECT 1 FROM queue_counting)
 AND (old.origin_id IS NOT new.origin_id
  OR old.http_status IS NOT new.http_status
  OR (CASE WHEN old.state = 'running' THEN 'pending' ELSE old.state END)
     IS NOT (CASE WHEN new.state = 'running' THEN 'pending' ELSE new.state END)
  OR ((old.state = 'done' OR new.state = 'done') AND old.bytes IS NOT new.bytes)
  OR ((old.error IS NOT new.error OR (old.state = 'done') IS NOT (new.state = 'done'))
      AND ((old.error IS NOT NULL AND old.state <> 'done')
           OR (new.error IS NOT NULL AND new.state <> 'done')))
  OR old.id > (SELECT id FROM tallied))
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
