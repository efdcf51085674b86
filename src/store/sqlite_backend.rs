//! The SQLite store behind the store interface: each method is the SQLite
//! store's own operation of the same name.

use std::collections::HashMap;

use anyhow::Result;

use super::backend::{RunId, Store as Backend};
use super::{
    Claim, Completion, DoneFile, ExportRow, FailedRow, Holder, HostFilter, InsertResult, Liveness,
    NewUrl, Reclaimed, RefreshCounts, RefreshRound, RowState, RunEnd, RunInfo, RunStart,
    StateCounts, Started, Store, Summary, Work,
};

impl Backend for Store {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn import(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>> {
        let writer = self.import_batch()?;
        let results = batch
            .iter()
            .map(|new| writer.insert(new))
            .collect::<Result<Vec<_>>>()?;
        writer.commit()?;
        Ok(results)
    }

    fn expect_bulk_writes(&mut self) -> Result<()> {
        Store::expect_bulk_writes(self)
    }

    fn start_run(
        &mut self,
        me: &RunStart,
        liveness: &dyn Fn(&RunInfo) -> Liveness,
    ) -> Result<Started> {
        Store::start_run(self, me, liveness)
    }

    fn reclaim_dead_runs(
        &mut self,
        liveness: &dyn Fn(&RunInfo) -> Liveness,
    ) -> Result<Reclaimed> {
        Store::reclaim_dead_runs(self, liveness)
    }

    fn held_by_others(&self, run: RunId) -> Result<Vec<Holder>> {
        Store::held_by_others(self, run.0)
    }

    fn heartbeat(&mut self, run: RunId) -> Result<()> {
        Store::complete_and_claim(self, run.0, &[], 0, &HostFilter::default(), Work::Fetch)?;
        Ok(())
    }

    fn end_run(&mut self, run: RunId, end: &RunEnd) -> Result<()> {
        Store::end_run(self, run.0, end)
    }

    fn recent_runs(&self, limit: usize) -> Result<Vec<RunInfo>> {
        Store::recent_runs(self, limit)
    }

    fn complete_and_claim(
        &mut self,
        run: RunId,
        completions: &[Completion],
        claim: usize,
        filter: &HostFilter,
        work: Work,
    ) -> Result<Vec<Claim>> {
        Store::complete_and_claim(self, run.0, completions, claim, filter, work)
    }

    fn next_due(&self, work: Work) -> Result<Option<i64>> {
        Store::next_due(self, work)
    }

    fn with_row_states(
        &mut self,
        ids: &[i64],
        settle: &mut dyn FnMut(&HashMap<i64, RowState>) -> Result<()>,
    ) -> Result<()> {
        Store::with_row_states(self, ids, settle)?
    }

    fn requeue_failed(&mut self, status: Option<u16>, error: Option<&str>) -> Result<u64> {
        Ok(Store::requeue_failed(self, status, error)? as u64)
    }

    fn requeue_damaged(&mut self, ids: &[i64]) -> Result<()> {
        Store::requeue_damaged(self, ids)
    }

    fn start_refresh(&mut self, cutoff: Option<i64>) -> Result<RefreshRound> {
        Store::start_refresh(self, cutoff)
    }

    fn setting(&self, key: &str) -> Result<Option<String>> {
        Store::setting(self, key)
    }

    fn setting_or_insert(
        &mut self,
        key: &str,
        value: &str,
        prepare: &mut dyn FnMut() -> Result<()>,
    ) -> Result<String> {
        Store::setting_or_insert(self, key, value, prepare)
    }

    fn state_counts(&self) -> Result<StateCounts> {
        Store::state_counts(self)
    }

    fn retry_schedule(&self, now: i64) -> Result<Vec<(i64, u64)>> {
        Store::retry_schedule(self, now)
    }

    fn summary(&self, top_errors: usize) -> Result<Summary> {
        Store::summary(self, top_errors)
    }

    fn refresh_counts(&self) -> Result<Option<RefreshCounts>> {
        Store::refresh_counts(self)
    }

    fn done_files(&self, each: &mut dyn FnMut(DoneFile) -> Result<()>) -> Result<()> {
        Store::done_files(self, each)
    }

    fn failed(&self, each: &mut dyn FnMut(FailedRow) -> Result<()>) -> Result<()> {
        Store::failed(self, each)
    }

    fn export(&self, each: &mut dyn FnMut(ExportRow) -> Result<()>) -> Result<()> {
        Store::export(self, each)
    }
}
