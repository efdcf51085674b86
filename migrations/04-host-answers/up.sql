-- Answers per host (every finished attempt) and how many were 429 or 503, for the report:
-- a URL's own row keeps only its last status.
CREATE TABLE host_answers (
    host       TEXT PRIMARY KEY,            -- as in urls.host
    answers    INTEGER NOT NULL DEFAULT 0,
    status_429 INTEGER NOT NULL DEFAULT 0,
    status_503 INTEGER NOT NULL DEFAULT 0
) STRICT;
