-- A fencing value per row, bumped by every claim: an outcome is recorded only under the claim it is for.
ALTER TABLE urls ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
