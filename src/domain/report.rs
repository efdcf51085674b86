//! The read models: what `report`, `export`, `verify` and `refresh` read
//! back about the jobs, summed up or one row at a time.

use serde::Serialize;

use super::JobState;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub counts: StateCounts,
    /// Bytes in the files of done rows.
    pub bytes: u64,
    pub http_statuses: Vec<StatusCount>,
    /// The most common last errors of rows not done, most frequent first.
    pub errors: Vec<ErrorCount>,
    /// Counts per host, when there is more than one host.
    pub hosts: Vec<HostCount>,
    /// Request durations, from the histogram of every finished attempt.
    pub durations: Option<Durations>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusCount {
    pub status: u16,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorCount {
    pub error: String,
    pub count: u64,
    /// One URL that ended with this error.
    pub example: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HostCount {
    pub host: String,
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    pub pending: u64,
    /// Finished attempts, and how many were answered 429 or 503.
    pub answers: u64,
    pub status_429: u64,
    pub status_503: u64,
}

/// Percentiles in milliseconds, each the lower edge of its histogram bucket
/// (within about 19%).
#[derive(Debug, Clone, Serialize)]
pub struct Durations {
    pub requests: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl Durations {
    /// The histogram bucket of a duration: quarter-octaves of milliseconds,
    /// so that any percentile read back is within about 19% of the truth.
    pub fn bucket(millis: u32) -> i64 {
        (4.0 * (f64::from(millis) + 1.0).log2()).floor() as i64
    }

    /// The smallest duration in a bucket, in milliseconds.
    pub fn bucket_floor(bucket: i64) -> f64 {
        (2f64.powf(bucket as f64 / 4.0) - 1.0).max(0.0)
    }

    /// The percentiles of a histogram, (bucket, count) in bucket order.
    pub fn of_histogram(buckets: &[(i64, u64)]) -> Option<Durations> {
        let requests: u64 = buckets.iter().map(|(_, count)| count).sum();
        if requests == 0 {
            return None;
        }
        let percentile = |p: f64| {
            let rank = (p * requests as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (bucket, count) in buckets {
                seen += count;
                if seen >= rank {
                    return Durations::bucket_floor(*bucket);
                }
            }
            buckets
                .last()
                .map_or(0.0, |(bucket, _)| Durations::bucket_floor(*bucket))
        };
        Some(Durations {
            requests,
            p50_ms: percentile(0.50),
            p95_ms: percentile(0.95),
            p99_ms: percentile(0.99),
        })
    }
}

/// Rows per state.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct StateCounts {
    pub total: u64,
    pub pending: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    /// Pending rows whose retry time is still to come (not those already
    /// due, which a run takes at once).
    pub retry_waiting: u64,
}

/// A done URL's file, as recorded.
#[derive(Debug, Clone)]
pub struct DoneFile {
    pub id: i64,
    pub url: String,
    /// Relative to the output folder.
    pub path: String,
    /// None when no size was recorded (the row is damaged).
    pub bytes: Option<u64>,
    pub sha256: Vec<u8>,
    /// The machine whose run wrote the file, where the store records it
    /// (PostgreSQL, where each machine has its own output folder).
    pub written_on: Option<String>,
}

/// A failed URL, as `report --failed` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct FailedRow {
    pub url: String,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub error: Option<String>,
}

/// One URL, as `export` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct ExportRow {
    pub url: String,
    pub state: JobState,
    /// Relative to the output folder.
    pub path: String,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub bytes: Option<u64>,
    pub sha256: Option<String>,
    pub error: Option<String>,
    /// For a done row, the machine whose run wrote the file, where the
    /// store records it (PostgreSQL): the file is in that machine's folder.
    #[serde(skip)]
    pub written_on: Option<String>,
}

impl ExportRow {
    /// The field names, in order: the CSV header, also when there is no row.
    pub const FIELDS: [&str; 8] = [
        "url",
        "state",
        "path",
        "http_status",
        "attempts",
        "bytes",
        "sha256",
        "error",
    ];
}

/// The round a refresh works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshRound {
    /// A new round, with the rows it asked for.
    Started { round: i64, rows: u64 },
    /// An earlier round that did not finish, with the rows it still has.
    Resumed { round: i64, rows: u64 },
}

/// Where the last refresh round stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RefreshCounts {
    pub round: i64,
    pub changed: u64,
    pub unchanged: u64,
    pub failed: u64,
    /// Not refreshed yet: the round was cut short.
    pub pending: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csv_header_names_every_field_in_order() {
        let row = ExportRow {
            url: String::new(),
            state: JobState::Pending,
            path: String::new(),
            http_status: None,
            attempts: 0,
            bytes: None,
            sha256: None,
            error: None,
            written_on: None,
        };
        let json = serde_json::to_value(&row).unwrap();
        let mut fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = ExportRow::FIELDS.to_vec();
        fields.sort_unstable();
        expected.sort_unstable();
        assert_eq!(fields, expected);
        let mut csv = csv::WriterBuilder::new().from_writer(Vec::new());
        csv.serialize(&row).unwrap();
        let text = String::from_utf8(csv.into_inner().unwrap()).unwrap();
        assert_eq!(
            text.lines().next(),
            Some(ExportRow::FIELDS.join(",").as_str())
        );
    }
}
