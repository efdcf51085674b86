//! The durability pipeline: the order in which a finished body becomes a
//! done row. A body waits in its temp file until the batch it joined is
//! handed to the sync thread (sync, rename, sync); only its answer moves the
//! outcome into the batch that the next commit marks done. Failures skip
//! the disk and go straight into that batch.
//!
//! This type holds the outcomes on their way and says when each step is
//! due; the coordinator does the steps (the sync thread, the commit).
//! One batch is with the sync thread at a time, and a batch is committed
//! before the next one's files are renamed: a crash leaves renamed files of
//! at most one uncommitted batch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::output;

use crate::domain::{Completion, Fetched};
use crate::output::Written;

/// Outcomes committed together at most, and bodies synced together at most.
pub const MAX_BATCH: usize = 1024;
/// How long an outcome waits for its batch's sync or commit at most.
pub const MAX_BATCH_DELAY: Duration = Duration::from_millis(20);
/// How often the run says it is alive when nothing else is committed,
/// unless its lease asks for more often.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

pub struct Durability {
    /// Bodies not yet handed to the sync thread, with their outcomes.
    staged: Vec<(Completion, Written)>,
    staged_since: Option<Instant>,
    /// The outcomes of the bodies the sync thread is working on.
    syncing: Option<Vec<Completion>>,
    /// Outcomes ready to commit: failures, and bodies already durable.
    batch: Vec<Completion>,
    batch_since: Option<Instant>,
    /// A sync answer came in: commit its bodies without waiting.
    commit_now: bool,
    /// The recorded files of rows that failed, removed before the commit
    /// if they are still the very files recorded.
    to_remove: Vec<Written>,
    last_commit: Instant,
    /// How often the run says it is alive.
    heartbeat: Duration,
}

impl Durability {
    pub fn new(now: Instant, heartbeat: Duration) -> Durability {
        Durability {
            staged: Vec::new(),
            staged_since: None,
            syncing: None,
            batch: Vec::new(),
            batch_since: None,
            commit_now: false,
            to_remove: Vec::new(),
            last_commit: now,
            heartbeat,
        }
    }

    /// An outcome with nothing to make durable: it joins the next commit.
    pub fn ready(&mut self, completion: Completion, now: Instant) {
        self.batch.push(completion);
        self.batch_since.get_or_insert(now);
    }

    /// A done outcome whose body is in its temp file: it joins the next
    /// batch for the sync thread.
    pub fn stage(&mut self, completion: Completion, body: Written, now: Instant) {
        self.staged.push((completion, body));
        self.staged_since.get_or_insert(now);
    }

    /// A failed row's recorded file, to remove before the commit that
    /// marks the row failed.
    pub fn remove_before_commit(&mut self, recorded: Written) {
        self.to_remove.push(recorded);
    }

    /// Whether the staged bodies should go to the sync thread now: a full
    /// batch, or one that waited long enough, and none being synced.
    pub fn sync_due(&self, now: Instant) -> bool {
        self.syncing.is_none()
            && (self.staged.len() >= MAX_BATCH
                || self
                    .staged_since
                    .is_some_and(|since| now >= since + MAX_BATCH_DELAY))
    }

    /// Takes the staged bodies for the sync thread; their outcomes wait for
    /// its answer.
    pub fn start_sync(&mut self) -> Vec<Written> {
        let (completions, bodies) = std::mem::take(&mut self.staged).into_iter().unzip();
        self.syncing = Some(completions);
        self.staged_since = None;
        bodies
    }

    pub fn is_syncing(&self) -> bool {
        self.syncing.is_some()
    }

    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Takes the sync thread's answer for the bodies it was given: they are
    /// durable and their outcomes join the batch, except those whose names
    /// could not be used, which fail. On an error none of them may be
    /// marked done: they go back to pending, and the error, which stops the
    /// run, is handed back.
    pub fn synced(
        &mut self,
        answer: output::Result<Vec<(i64, String)>>,
        now: Instant,
    ) -> Option<output::Error> {
        let mut completions = self.syncing.take().unwrap_or_default();
        let mut stopped = None;
        match answer {
            Ok(refused) if refused.is_empty() => {}
            Ok(refused) => {
                let mut refused: HashMap<i64, String> = refused.into_iter().collect();
                for completion in &mut completions {
                    if let Completion::Done {
                        id,
                        lease,
                        fetched: Fetched { status, millis, .. },
                    } = *completion
                        && let Some(error) = refused.remove(&id)
                    {
                        tracing::debug!("failed: {error}");
                        *completion = Completion::Failed {
                            id,
                            lease,
                            status: Some(status),
                            error,
                            millis,
                        };
                    }
                }
            }
            Err(error) => {
                for completion in &mut completions {
                    if let Completion::Done { id, lease, .. } = *completion {
                        *completion = Completion::Interrupted { id, lease };
                    }
                }
                stopped = Some(error);
            }
        }
        self.batch.append(&mut completions);
        self.batch_since.get_or_insert(now);
        self.commit_now = true;
        stopped
    }

    /// Whether the batch should be committed now: a sync answer came in,
    /// the batch is full, or it waited long enough.
    pub fn commit_due(&self, now: Instant) -> bool {
        self.commit_now
            || self.batch.len() >= MAX_BATCH
            || self
                .batch_since
                .is_some_and(|since| now >= since + MAX_BATCH_DELAY)
    }

    /// Whether nothing was committed for so long that the run should say
    /// it is alive.
    pub fn heartbeat_due(&self, now: Instant) -> bool {
        now >= self.last_commit + self.heartbeat
    }

    /// The outcomes the next commit records.
    pub fn batch(&self) -> &[Completion] {
        &self.batch
    }

    /// The files to remove before the next commit.
    pub fn take_to_remove(&mut self) -> Vec<Written> {
        std::mem::take(&mut self.to_remove)
    }

    /// The run said it is alive without a commit.
    pub fn renewed(&mut self, now: Instant) {
        self.last_commit = now;
    }

    /// The batch was committed.
    pub fn committed(&mut self, now: Instant) {
        self.batch.clear();
        self.batch_since = None;
        self.commit_now = false;
        self.last_commit = now;
    }

    /// When a step comes due even if nothing else happens.
    pub fn deadline(&self) -> Instant {
        let mut deadline = self.last_commit + self.heartbeat;
        if let Some(since) = self.batch_since {
            deadline = deadline.min(since + MAX_BATCH_DELAY);
        }
        if let Some(since) = self.staged_since
            && self.syncing.is_none()
        {
            deadline = deadline.min(since + MAX_BATCH_DELAY);
        }
        deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Lease, RunId};

    const LEASE: Lease = Lease {
        run: RunId(1),
        fence: 1,
    };

    fn done(id: i64) -> (Completion, Written) {
        let completion = Completion::Done {
            id,
            lease: LEASE,
            fetched: Fetched {
                status: 200,
                bytes: 3,
                sha256: [0; 32],
                millis: 1,
                validators: Default::default(),
            },
        };
        let body = Written {
            id,
            name: format!("{id}.json"),
            bytes: 3,
            sha256: [0; 32],
        };
        (completion, body)
    }

    fn ids(completions: &[Completion]) -> Vec<i64> {
        completions.iter().map(Completion::id).collect()
    }

    #[test]
    fn a_body_is_committed_only_after_the_sync_answer() {
        let start = Instant::now();
        let mut pipeline = Durability::new(start, HEARTBEAT);
        let (completion, body) = done(1);
        pipeline.stage(completion, body, start);
        assert!(!pipeline.sync_due(start), "a lone body waits for company");
        assert!(!pipeline.commit_due(start + MAX_BATCH_DELAY));
        assert!(pipeline.sync_due(start + MAX_BATCH_DELAY));

        let bodies = pipeline.start_sync();
        assert_eq!(bodies.len(), 1);
        assert!(pipeline.is_syncing());
        assert!(!pipeline.has_staged());
        assert!(pipeline.batch().is_empty(), "not durable yet");
        assert!(!pipeline.commit_due(start + HEARTBEAT / 2));

        assert!(pipeline.synced(Ok(Vec::new()), start).is_none());
        assert!(!pipeline.is_syncing());
        assert_eq!(ids(pipeline.batch()), [1]);
        assert!(
            pipeline.commit_due(start),
            "a sync answer is committed at once"
        );
        assert!(matches!(pipeline.batch()[0], Completion::Done { .. }));
    }

    #[test]
    fn one_batch_is_synced_at_a_time() {
        let start = Instant::now();
        let mut pipeline = Durability::new(start, HEARTBEAT);
        let (completion, body) = done(1);
        pipeline.stage(completion, body, start);
        pipeline.start_sync();
        for id in 2..2 + MAX_BATCH as i64 {
            let (completion, body) = done(id);
            pipeline.stage(completion, body, start);
        }
        let later = start + MAX_BATCH_DELAY * 2;
        assert!(
            !pipeline.sync_due(later),
            "the first batch is still syncing"
        );
        assert_eq!(pipeline.deadline(), start + HEARTBEAT);
        pipeline.synced(Ok(Vec::new()), later);
        assert!(pipeline.sync_due(later), "a full batch goes at once");
        assert_eq!(pipeline.start_sync().len(), MAX_BATCH);
    }

    #[test]
    fn a_refused_name_fails_its_row_and_a_sync_error_sends_the_batch_back() {
        let start = Instant::now();
        let mut pipeline = Durability::new(start, HEARTBEAT);
        for id in [1, 2] {
            let (completion, body) = done(id);
            pipeline.stage(completion, body, start);
        }
        pipeline.start_sync();
        pipeline.synced(Ok(vec![(2, "a folder is in the way".into())]), start);
        assert!(matches!(
            pipeline.batch()[0],
            Completion::Done { id: 1, .. }
        ));
        assert!(matches!(
            &pipeline.batch()[1],
            Completion::Failed { id: 2, status: Some(200), error, .. } if error == "a folder is in the way"
        ));
        pipeline.committed(start);
        assert!(pipeline.batch().is_empty());

        let (completion, body) = done(3);
        pipeline.stage(completion, body, start);
        pipeline.start_sync();
        let error = pipeline.synced(Err(output::Error::Folder("disk full".into())), start);
        assert_eq!(error.map(|e| e.to_string()).as_deref(), Some("disk full"));
        assert!(matches!(
            pipeline.batch(),
            [Completion::Interrupted { id: 3, .. }]
        ));
    }

    #[test]
    fn failures_wait_for_a_short_delay_and_the_heartbeat_for_a_long_one() {
        let start = Instant::now();
        let mut pipeline = Durability::new(start, HEARTBEAT);
        assert_eq!(pipeline.deadline(), start + HEARTBEAT);
        assert!(!pipeline.heartbeat_due(start));
        assert!(pipeline.heartbeat_due(start + HEARTBEAT));

        pipeline.ready(
            Completion::Unstarted {
                id: 7,
                lease: LEASE,
            },
            start,
        );
        assert_eq!(pipeline.deadline(), start + MAX_BATCH_DELAY);
        assert!(!pipeline.commit_due(start));
        assert!(pipeline.commit_due(start + MAX_BATCH_DELAY));

        let (_, recorded) = done(7);
        pipeline.remove_before_commit(recorded);
        assert_eq!(pipeline.take_to_remove().len(), 1);
        assert!(pipeline.take_to_remove().is_empty());

        let later = start + Duration::from_secs(1);
        pipeline.committed(later);
        assert!(!pipeline.commit_due(later + MAX_BATCH_DELAY));
        assert_eq!(pipeline.deadline(), later + HEARTBEAT);
    }
}
