//! Checks of the [`Store`] contract that hold for every backend, written
//! against the trait alone: a backend's tests call each one with a
//! function that opens a fresh, empty store of its kind.

use crate::store::Result;

use super::Store;
use crate::domain::{
    Claim, Completion, ExportRow, Fetched, HostFilter, InsertResult, JobState, Liveness, NewUrl,
    RunEnd, RunId, RunOutcome, RunStart, Validators, Work,
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

/// Starts a run of this process, with `others` as every other run's
/// liveness.
pub(crate) fn start(store: &mut dyn Store, others: Liveness) -> RunId {
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
        fetched: Fetched {
            status: 200,
            bytes: 3,
            sha256: [7; 32],
            millis: 1,
            validators: Validators::default(),
        },
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
            error.is_taken_for_dead(),
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

pub fn an_import_says_what_became_of_each_url_in_order(fresh: Fresh<'_>) {
    let mut store = store_with(fresh, &["a"]);
    let new = |url: &'static str, path: &'static str, named: bool| NewUrl {
        url,
        request: None,
        request_hash: "",
        host: "example.test",
        path,
        named,
    };
    let results = store
        .import(&[
            new("http://example.test/a", "other", false),
            new("http://example.test/b", "b", false),
            new("http://example.test/c", "a", true),
            new("http://example.test/b", "b", true),
            new("http://example.test/d", "a/inside", true),
        ])
        .unwrap();
    assert_eq!(results[0], InsertResult::Duplicate);
    assert_eq!(results[1], InsertResult::Inserted);
    assert!(
        matches!(results[2], InsertResult::NameTaken(_)),
        "{results:?}"
    );
    assert_eq!(results[3], InsertResult::Duplicate);
    assert!(
        matches!(results[4], InsertResult::NameTaken(_)),
        "{results:?}"
    );
    let paths: Vec<String> = rows(&*store).into_iter().map(|row| row.0).collect();
    assert_eq!(paths, ["a", "b"]);
}

pub fn an_ended_run_gives_its_rows_back_and_says_how_it_ended(fresh: Fresh<'_>) {
    let mut store = store_with(fresh, &["a", "b"]);
    let run = start(&mut *store, Liveness::Alive);
    let claims = complete_and_claim(&mut *store, run, &[], 2).unwrap();
    complete_and_claim(&mut *store, run, &[done(&claims[0])], 0).unwrap();
    assert_eq!(store.held_by_others(RunId(run.0 + 1)).unwrap().len(), 1);
    store
        .end_run(run, &RunEnd::Error("it broke".into()))
        .unwrap();
    let states: Vec<JobState> = rows(&*store).into_iter().map(|row| row.1).collect();
    assert_eq!(states, [JobState::Done, JobState::Pending]);
    let ended = store.recent_runs(1).unwrap().remove(0);
    assert_eq!((ended.id, ended.outcome), (run, Some(RunOutcome::Error)));
    assert_eq!(ended.message.as_deref(), Some("it broke"));
    assert_eq!((ended.done, ended.bytes), (1, 3));
    assert!(store.heartbeat(run).is_err());
}

pub fn failed_rows_go_back_with_a_fresh_budget(fresh: Fresh<'_>) {
    let mut store = store_with(fresh, &["a", "b"]);
    let run = start(&mut *store, Liveness::Alive);
    let claims = complete_and_claim(&mut *store, run, &[], 2).unwrap();
    let failed = |claim: &Claim, status| Completion::Failed {
        id: claim.id,
        lease: claim.lease,
        status: Some(status),
        error: format!("HTTP {status}"),
        millis: 1,
    };
    let outcomes = [failed(&claims[0], 404), failed(&claims[1], 410)];
    complete_and_claim(&mut *store, run, &outcomes, 0).unwrap();
    assert_eq!(store.state_counts().unwrap().failed, 2);
    assert_eq!(store.requeue_failed(Some(404), None).unwrap(), 1);
    assert_eq!(store.requeue_failed(None, Some("HTTP 4")).unwrap(), 1);
    assert_eq!(
        rows(&*store),
        [
            ("a".to_string(), JobState::Pending, 0),
            ("b".to_string(), JobState::Pending, 0)
        ]
    );
}

pub fn a_setting_keeps_its_first_value(fresh: Fresh<'_>) {
    let mut store = fresh();
    assert_eq!(store.setting("out_dir").unwrap(), None);
    let refused = store.setting_or_insert("out_dir", "/c", &mut || Err("no".into()));
    assert!(refused.is_err());
    assert_eq!(store.setting("out_dir").unwrap(), None);
    let recorded = store.setting_or_insert("out_dir", "/a", &mut || Ok(()));
    assert_eq!(recorded.unwrap(), "/a");
    let mut not_asked = || panic!("prepare runs only when recording");
    let held = store.setting_or_insert("out_dir", "/b", &mut not_asked);
    assert_eq!(held.unwrap(), "/a");
}
