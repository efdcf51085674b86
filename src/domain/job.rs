//! A job is one URL to fetch into one file. A run claims jobs under a
//! lease and reports what became of each as a [`Completion`].

use serde::Serialize;

use super::RunId;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting to be fetched (again), perhaps not before a retry time.
    Pending,
    /// Claimed by a run, which may be fetching it right now.
    Running,
    /// Its body is in its file, durable.
    Done,
    /// Failed for good: a permanent error, or its retries used up.
    Failed,
}

impl JobState {
    /// The state as stored and shown: `pending`, `running`, `done`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    /// The state named `name`, as [`JobState::as_str`] writes it.
    pub fn parse(name: &str) -> Option<JobState> {
        Some(match name {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            _ => return None,
        })
    }
}

/// The right to record a claimed job's outcome: the run that claimed it,
/// and a fencing value that changes every time the job is claimed. A run
/// found dead loses its leases; if it comes back, its completions carry a
/// fence that no longer matches and are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub run: RunId,
    pub fence: i64,
}

/// A URL claimed by a run.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: i64,
    pub lease: Lease,
    pub url: String,
    /// The request as JSON, when it is not a plain GET.
    pub request: Option<String>,
    /// The output file, relative to the output folder.
    pub path: String,
    /// Attempts already made (and finished).
    pub attempts: u32,
    /// The host as recorded at import: host[:port], the port only when it
    /// is not the scheme's default. Politeness is kept per this key, so
    /// http and https on one name share it, as they share the server.
    pub host: String,
    /// The size and sha256 of the body last recorded as done, if any.
    pub recorded: Option<(u64, [u8; 32])>,
    /// Claimed by `jobrun refresh`: a done row whose file stays until a
    /// changed body replaces it.
    pub refresh: bool,
    /// The validators stored with the done body, sent as `If-None-Match`
    /// and `If-Modified-Since` by a refresh.
    pub validators: Validators,
}

/// A body's `ETag` and `Last-Modified`, as the server sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// What a run claims: rows to fetch, or done rows to refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Work {
    #[default]
    Fetch,
    Refresh,
}

/// A row's state, as far as its output file is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    /// Done: its file is the one to keep.
    Done,
    /// Held by a run, which may be writing its file right now.
    Held,
    /// Pending or failed: nobody is writing its file.
    Free,
}

impl From<JobState> for RowState {
    fn from(state: JobState) -> RowState {
        match state {
            JobState::Done => RowState::Done,
            JobState::Running => RowState::Held,
            JobState::Pending | JobState::Failed => RowState::Free,
        }
    }
}

/// Which due rows a claim leaves for later, so that claimed rows go to hosts
/// that can take them now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFilter {
    /// Hosts not to claim for now: paused, or with enough claimed already.
    pub skip: Vec<String>,
}

impl HostFilter {
    pub fn is_empty(&self) -> bool {
        self.skip.is_empty()
    }
}

/// A URL to import.
#[derive(Debug, Clone, Copy)]
pub struct NewUrl<'a> {
    pub url: &'a str,
    /// The request as JSON, when it is not a plain GET.
    pub request: Option<&'a str>,
    /// With the URL, what makes two imported lines the same job: empty for
    /// a plain GET, else a hash of the request.
    pub request_hash: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The file name was given by the user (`"name"`), not made from the URL.
    pub named: bool,
}

/// What became of one URL of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertResult {
    Inserted,
    /// The same request is in the database already.
    Duplicate,
    /// The file name is taken, or clashes with a folder of another name,
    /// or the same request is there already under another name.
    NameTaken(String),
}

impl InsertResult {
    /// A named line whose request is imported already under another name.
    pub fn same_request_named(existing: &str, path: &str) -> InsertResult {
        InsertResult::NameTaken(format!(
            "the same request is already imported with the name {existing:?}, not {path:?}: \
             one request is one job and one file (drop this line, or make its request differ)"
        ))
    }

    /// A line whose file name is another URL's.
    pub fn name_used(path: &str) -> InsertResult {
        InsertResult::NameTaken(format!("\"name\" {path:?} is already used by another URL"))
    }

    /// A named line whose file needs a folder where another URL's file is.
    pub fn needs_folder(path: &str, folder: &str) -> InsertResult {
        InsertResult::NameTaken(format!(
            "\"name\" {path:?} needs a folder {folder:?}, which is another URL's file"
        ))
    }

    /// A named line whose file would be a folder holding another URL's file.
    pub fn folder_of_file(path: &str, other: &str) -> InsertResult {
        InsertResult::NameTaken(format!(
            "\"name\" {path:?} is a folder of another URL's file {other:?}"
        ))
    }
}

/// What a done attempt records in its row: the answer's status, the
/// body's size and sha256, how long it took, and the validators for a
/// later refresh.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub bytes: u64,
    pub sha256: [u8; 32],
    pub millis: u32,
    pub validators: Validators,
}

/// What became of a claimed URL. Each carries the lease it was claimed
/// under; a store records it only while that lease still holds.
#[derive(Debug, Clone)]
pub enum Completion {
    /// The body is in its final file, and that file is durable.
    Done {
        id: i64,
        lease: Lease,
        fetched: Fetched,
    },
    /// A refresh found the body unchanged (a 304, or the same sha256): the
    /// file stays as it is.
    Unchanged {
        id: i64,
        lease: Lease,
        status: u16,
        millis: u32,
        validators: Validators,
    },
    /// A retryable failure: back to pending until `next_attempt_at`.
    Retry {
        id: i64,
        lease: Lease,
        status: Option<u16>,
        error: String,
        next_attempt_at: i64,
        millis: u32,
    },
    /// A permanent failure, or the last attempt failed.
    Failed {
        id: i64,
        lease: Lease,
        status: Option<u16>,
        error: String,
        millis: u32,
    },
    /// The attempt was cut short by a shutdown: back to pending, budget kept.
    Interrupted { id: i64, lease: Lease },
    /// Claimed but never started: back to pending, nothing recorded.
    Unstarted { id: i64, lease: Lease },
}

impl Completion {
    /// How long the attempt took, for attempts that reached an end.
    pub fn millis(&self) -> Option<u32> {
        match *self {
            Completion::Done {
                fetched: Fetched { millis, .. },
                ..
            }
            | Completion::Unchanged { millis, .. }
            | Completion::Retry { millis, .. }
            | Completion::Failed { millis, .. } => Some(millis),
            Completion::Interrupted { .. } | Completion::Unstarted { .. } => None,
        }
    }

    pub fn id(&self) -> i64 {
        match *self {
            Completion::Done { id, .. }
            | Completion::Unchanged { id, .. }
            | Completion::Retry { id, .. }
            | Completion::Failed { id, .. }
            | Completion::Interrupted { id, .. }
            | Completion::Unstarted { id, .. } => id,
        }
    }

    /// The lease the URL was claimed under.
    pub fn lease(&self) -> Lease {
        match *self {
            Completion::Done { lease, .. }
            | Completion::Unchanged { lease, .. }
            | Completion::Retry { lease, .. }
            | Completion::Failed { lease, .. }
            | Completion::Interrupted { lease, .. }
            | Completion::Unstarted { lease, .. } => lease,
        }
    }
}
