//! What jobrun is about, apart from where it is kept: the jobs (one URL
//! each) and their states, the runs that work on them, and the read models
//! that `report`, `export` and `verify` show. Plain data: nothing here
//! knows about SQL, HTTP or files, and every store speaks these types.
//!
//! Counts are `u64` here; a store converts them at its SQL boundary.

mod job;
mod report;
mod run;

pub use job::{
    Claim, Completion, Fetched, HostFilter, InsertResult, JobState, Lease, NewUrl, RowState,
    Validators, Work,
};
pub use report::{
    DoneFile, Durations, ErrorCount, ExportRow, FailedRow, HostCount, RefreshCounts, RefreshRound,
    StateCounts, StatusCount, Summary,
};
pub use run::{
    Holder, Liveness, Reclaimed, RunEnd, RunId, RunInfo, RunOutcome, RunStart, Started, message_of,
};
