-- Validators of each done body (ETag, Last-Modified), when it was fetched, and where `jobrun refresh` stands with it.
ALTER TABLE urls ADD COLUMN etag TEXT;
ALTER TABLE urls ADD COLUMN last_modified TEXT;
ALTER TABLE urls ADD COLUMN fetched_at INTEGER;           -- unix ms of the last fetch or 304 that confirmed the file
ALTER TABLE urls ADD COLUMN refresh TEXT;                 -- pending, changed, unchanged, failed; NULL if never refreshed
ALTER TABLE urls ADD COLUMN refresh_round INTEGER;        -- the refresh run that asked for it
ALTER TABLE urls ADD COLUMN refresh_error TEXT;           -- why its last refresh attempt failed
UPDATE urls SET fetched_at = updated_at WHERE state = 'done';
CREATE INDEX urls_to_refresh ON urls (next_attempt_at) WHERE refresh = 'pending';
CREATE INDEX urls_by_refresh_round ON urls (refresh_round, refresh);
