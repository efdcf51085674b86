//! Checks of the [`Store`] contract that hold for every backend, written
//! against the trait alone: a backend's tests call each one with a
//! function that opens a fresh, empty store of its kind.

use anyhow::Result;

use super::{Store, TakenForDead};
use crate::domain::{
    Claim, Completion, ExportRow, HostFilter, JobState, Liveness, NewUrl, RunId, RunStart,
    Validators, Work,
};

/// Opens a new, empty store.
pub type Fresh<'a> = &'a dyn Fn() -> Box<dyn Store>;

fn store_with(fresh: Fresh<'_>, names: &[&str]) -> Box<dyn Store> {
    let mut store = fresh();
    let urls: Vec<String> = names
        .iter()
        .map(|name| format!("http://example.test/{name}"))
        .collect();
    let batch: Vec<NewUrl<'_>> = urls
        .iter()
        .zip(names)
        .map(|(url, name)| NewUrl {
            url,
            request: None,
            request_hash: "",
            host: "example.test",
            path: name,
            named: false,
        })
        .collect();
    store.import(&batch).unwrap();
    store
}

fn start(store: &mut dyn Store, others: Liveness) -> RunId {
    let me = RunStart {
        pid: std::process::id(),
        pid_ns: None,
        host: "test".into(),
        boot_id: "boot".into(),
        proc_start: 1,
        command: "jobrun run".into(),
    };
    store.start_run(&me, &|_| others).unwrap().id
}

fn complete_and_claim(
    store: &mut dyn Store,
    run: RunId,
    completions: &[Completion],
    claim: usize,
) -> Result<Vec<Claim>> {
    store.complete_and_claim(run, completions, claim, &HostFilter::default(), Work::Fetch)
}

fn done(claim: &Claim) -> Completion {
    Completion::Done {
        id: claim.id,
        lease: claim.lease,
        status: 200,
        bytes: 3,
        sha256: [7; 32],
        millis: 1,
        validators: Validators::default(),
    }
}

fn given_back(claim: &Claim) -> Completion {
    Completion::Unstarted {
        id: claim.id,
        lease: claim.lease,
    }
}

/// Every row's (path, state, attempts), in import order.
fn rows(store: &dyn Store) -> Vec<(String, JobState, u32)> {
    let mut rows = Vec::new();
    store
        .export(&mut |row: ExportRow| {
            rows.push((row.path, row.state, row.attempts));
            Ok(())
        })
        .unwrap();
    rows
}

fn assert_taken_for_dead(refused: Result<Vec<Claim>>) {
    match refused {
        Ok(claims) => panic!(
            "a stale completion was accepted (and {} claimed)",
            claims.len()
        ),
        Err(error) => assert!(
            error.downcast_ref::<TakenForDead>().is_some(),
            "not refused as taken for dead: {error:#}"
        ),
    }
}

pub fn every_claim_gives_a_row_a_new_fence(fresh: Fresh<'_>) {
    let mut store = store_with(fresh, &["a"]);
    let run = start(&mut *store, Liveness::Alive);
    let first = complete_and_claim(&mut *store, run, &[], 1)
        .unwrap()
        .remove(0);
    let second = complete_and_claim(&mut *store, run, &[given_back(&first)], 1)
        .unwrap()
        .remove(0);
    assert_eq!((first.id, first.lease.run), (second.id, second.lease.run));
    assert_eq!(first.lease.run, run);
    assert_ne!(first.lease.fence, second.lease.fence);
}

/// The fence alone tells the outcomes of two claims of one row by one run
/// apart: run and state match both.
pub fn an_outcome_under_an_earlier_claim_of_the_row_is_refused(fresh: Fresh<'_>) {
    let mut store = store_with(fresh, &["a", "b"]);
    let run = start(&mut *store, Liveness::Alive);
    let claims = complete_and_claim(&mut *store, run, &[], 2).unwrap();
    let (a, b) = (&claims[0], &claims[1]);
    let again = complete_and_claim(&mut *store, run, &[given_back(a)], 1)
        .unwrap()
        .remove(0);
    assert_eq!(again.id, a.id);
    let before = rows(&*store);
    assert_eq!(before[0].1, JobState::Running);
    assert_taken_for_dead(complete_and_claim(&mut *store, run, &[done(b), done(a)], 0));
    // Nothing of the batch was kept, not even b's valid outcome.
    assert_eq!(rows(&*store), before);
    // Under the current claim, the same outcomes are recorded.
    complete_and_claim(&mut *store, run, &[done(b), done(&again)], 0).unwrap();
    let states: Vec<JobState> = rows(&*store).into_iter().map(|row| row.1).collect();
    assert_eq!(states, [JobState::Done, JobState::Done]);
}

pub fn a_run_taken_for_dead_cannot_complete_what_another_claimed(fresh: Fresh<'_>) {
    let mut store = store_with(fresh, &["a"]);
    let old = start(&mut *store, Liveness::Alive);
    let stale = complete_and_claim(&mut *store, old, &[], 1)
        .unwrap()
        .remove(0);
    // The next run finds the first dead and takes its row back.
    let new = start(&mut *store, Liveness::Gone);
    let fresh_claim = complete_and_claim(&mut *store, new, &[], 1)
        .unwrap()
        .remove(0);
    assert_eq!(fresh_claim.id, stale.id);
    assert_eq!(fresh_claim.lease.run, new);
    let before = rows(&*store);
    assert_eq!(before, [("a".to_string(), JobState::Running, 0)]);
    assert_taken_for_dead(complete_and_claim(&mut *store, old, &[done(&stale)], 0));
    assert_eq!(rows(&*store), before);
    // Sent by the new run, the old claim's outcome is refused all the same.
    assert!(complete_and_claim(&mut *store, new, &[done(&stale)], 0).is_err());
    assert_eq!(rows(&*store), before);
    assert!(store.heartbeat(old).is_err());
    store.heartbeat(new).unwrap();
    complete_and_claim(&mut *store, new, &[done(&fresh_claim)], 0).unwrap();
    assert_eq!(rows(&*store)[0].1, JobState::Done);
}
