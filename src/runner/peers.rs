//! The other runs on the same database, as one run sees them. A run that
//! has nothing left to claim is not finished while another live run still
//! holds URLs: that run may die, and its URLs are then this one's to fetch.
//! So it waits, says for whom, and looks again every second, taking back
//! the URLs of any run found dead meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Result;

use crate::clock::now_ms;
use crate::counters::Counters;
use crate::domain::{Holder, Liveness, RunId, RunStart};
use crate::format::thousands;
use crate::hosts::Hosts;
use crate::output::{Leftover, OutputDir};
use crate::process;
use crate::rate::SharedRate;
use crate::store::Store;

use super::durability::HEARTBEAT;

pub struct Peers {
    me: RunStart,
    run: RunId,
    counters: Arc<Counters>,
    /// The holders last told about, to say it once and not every second.
    told: Vec<RunId>,
    /// How often this run renews its heartbeat: a third of its lease at
    /// most, so that a late renewal or two does not lose it its URLs.
    pub heartbeat: Duration,
    /// Per-host limits, shared with the other live runs.
    hosts: Arc<Hosts>,
    /// `--rate`, shared with the other live runs too.
    rate: Option<Arc<SharedRate>>,
    /// When the limits were last shared out.
    shared_at: Option<Instant>,
}

impl Peers {
    pub fn new(
        me: RunStart,
        run: RunId,
        counters: Arc<Counters>,
        lease: Option<Duration>,
        hosts: Arc<Hosts>,
        rate: Option<Arc<SharedRate>>,
    ) -> Peers {
        Peers {
            me,
            run,
            counters,
            told: Vec::new(),
            heartbeat: lease.map_or(HEARTBEAT, |lease| (lease / 3).min(HEARTBEAT)),
            hosts,
            rate,
            shared_at: None,
        }
    }

    /// Gives this run its part of `--rate` and of the per-host limits, as
    /// many runs as are live now share them (PostgreSQL; elsewhere a run has
    /// them whole).
    pub fn share_limits(&mut self, store: &dyn Store, now: Instant) -> Result<()> {
        self.shared_at = Some(now);
        let runs = store.live_runs()?;
        self.hosts.share_among(runs);
        if let Some(rate) = &self.rate {
            rate.share_among(runs);
        }
        Ok(())
    }

    /// Whether the limits are to be shared out again: once a heartbeat.
    pub fn share_due(&self, now: Instant) -> bool {
        self.shared_at.is_none_or(|at| now >= at + self.heartbeat)
    }

    /// For a run with nothing left to claim: whether other runs still hold
    /// URLs (or held them and were found dead, so that there is work again).
    pub fn still_working(&mut self, store: &mut dyn Store, out: &OutputDir) -> Result<bool> {
        if store.held_by_others(self.run)?.is_empty() {
            self.stop_waiting();
            return Ok(false);
        }
        let now = now_ms();
        let reclaimed = store.reclaim_dead_runs(&|run| process::liveness(run, &self.me, now))?;
        let mut leftovers = Vec::new();
        for (id, state) in &reclaimed.dead {
            log_dead_run(*id, *state);
            leftovers.extend(out.leftover_of(id.0));
        }
        settle_leftovers(store, out, leftovers)?;
        if reclaimed.rows > 0 {
            tracing::info!(
                "took back {} URLs from runs that were cut short",
                thousands(reclaimed.rows)
            );
            self.stop_waiting();
            return Ok(true);
        }
        let holders = store.held_by_others(self.run)?;
        if holders.is_empty() {
            self.stop_waiting();
            return Ok(false);
        }
        let ids: Vec<RunId> = holders.iter().map(|h| h.run).collect();
        let waiting = describe(&holders);
        if ids != self.told {
            tracing::info!("nothing left to claim; {waiting}");
            self.told = ids;
        }
        *self.waiting_for() = Some(waiting);
        Ok(true)
    }

    /// Claims came in again: no longer waiting.
    pub fn stop_waiting(&mut self) {
        self.told.clear();
        self.waiting_for().take();
    }

    fn waiting_for(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.counters
            .waiting_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// "waiting for run #3 (pid 1234), which holds 12 URLs", and the others.
fn describe(holders: &[Holder]) -> String {
    let runs: Vec<String> = holders
        .iter()
        .map(|h| format!("run #{} (pid {}, {} URLs)", h.run, h.pid, thousands(h.urls)))
        .collect();
    format!("waiting for {} to finish", runs.join(", "))
}

pub fn log_dead_run(id: RunId, state: Liveness) {
    let how = match state {
        Liveness::Rebooted => "the machine restarted",
        _ => "its process is gone",
    };
    tracing::info!("run #{id} was cut short ({how})");
}

/// Settles what runs that died left in the output folder, with the rows'
/// states read under the write lock: no run may claim one of those rows
/// while its file is being looked at.
pub(super) fn settle_leftovers(
    store: &mut dyn Store,
    out: &OutputDir,
    leftovers: Vec<Leftover>,
) -> Result<()> {
    let ids: Vec<i64> = leftovers.iter().flat_map(Leftover::ids).collect();
    if ids.is_empty() {
        out.settle(leftovers, &HashMap::new());
        return Ok(());
    }
    let mut leftovers = Some(leftovers);
    store.with_row_states(&ids, &mut |states| {
        out.settle(leftovers.take().unwrap_or_default(), states);
        Ok(())
    })?;
    Ok(())
}
