//! The live view of a run: done out of total, failures, URLs waiting for a
//! retry, URLs/s and MB/s over the last ten seconds, an ETA, and the hosts
//! that are paused or throttled. On a terminal it is a progress bar; else a
//! status line every few seconds (a JSON event with `--log-format json`).
//!
//! It is drawn from counters that the database owner bumps as it commits,
//! never from polling the database.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::clock::now_ms;
use crate::commands::{human_bytes, thousands};
use crate::hosts::Hosts;

/// How far back the rates look.
const WINDOW: Duration = Duration::from_secs(10);
/// How often the bar is redrawn.
const BAR_EVERY: Duration = Duration::from_millis(200);

/// Counts committed by this run.
#[derive(Debug, Default)]
pub struct Counters {
    pub done: AtomicU64,
    pub failed: AtomicU64,
    /// Retries scheduled.
    pub retried: AtomicU64,
    pub bytes: AtomicU64,
    /// When the URLs waiting for a retry are due: those known at the
    /// start, and the retries recorded since.
    pub retries: RetrySchedule,
    /// Which other runs this one waits for, when it has nothing to claim.
    pub waiting_for: Mutex<Option<String>>,
    /// Counted by the workers, for `--metrics`.
    pub requests: crate::metrics::Requests,
}

/// Retry times, counted per second. A URL waits for its retry until its
/// time comes, whether or not it has been taken yet; to the second is close
/// enough for a display, and keeps memory to the span of the retry delays
/// whatever the number of URLs waiting.
#[derive(Debug, Default)]
pub struct RetrySchedule {
    /// The end of each second (unix ms) -> retries due within it.
    by_second: Mutex<BTreeMap<i64, u64>>,
}

impl RetrySchedule {
    /// Adds `count` retries due at `due` (unix ms); one already due is not
    /// waiting. Seconds gone by are dropped here too, so that the schedule
    /// stays small when nothing displays it.
    pub fn add(&self, due: i64, count: u64) {
        let now = now_ms();
        let mut by_second = self.by_second.lock().unwrap_or_else(|e| e.into_inner());
        drop_past(&mut by_second, now);
        if due > now {
            let second_end = due.saturating_add(999).div_euclid(1000) * 1000;
            *by_second.entry(second_end).or_default() += count;
        }
    }

    /// How many retries are not yet due at `now` (unix ms).
    pub fn waiting(&self, now: i64) -> u64 {
        let mut by_second = self.by_second.lock().unwrap_or_else(|e| e.into_inner());
        drop_past(&mut by_second, now);
        by_second.values().sum()
    }
}

/// Drops the seconds that ended by `now`.
fn drop_past(by_second: &mut BTreeMap<i64, u64>, now: i64) {
    while let Some(second) = by_second.first_entry()
        && *second.key() <= now
    {
        second.remove();
    }
}

/// Where the job stood when the run started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    pub total: u64,
    pub done: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// A bar on a terminal.
    Bar,
    /// A status line this often.
    Lines(Duration),
    Off,
}

struct Sample {
    at: Instant,
    finished: u64,
    bytes: u64,
}

/// Shows progress until the task is dropped or aborted.
pub async fn show(counters: Arc<Counters>, start: Start, hosts: Arc<Hosts>, display: Display) {
    let every = match display {
        Display::Off => return,
        Display::Bar => BAR_EVERY,
        Display::Lines(every) => every,
    };
    let bar = (display == Display::Bar).then(|| new_bar(start.total));
    crate::log::set_bar(bar.clone());
    let _clear = ClearOnDrop(bar.clone());
    let mut samples: VecDeque<Sample> = VecDeque::new();
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let done = counters.done.load(Ordering::Relaxed);
        let failed = counters.failed.load(Ordering::Relaxed);
        let bytes = counters.bytes.load(Ordering::Relaxed);
        samples.push_back(Sample {
            at: now,
            finished: done + failed,
            bytes,
        });
        while samples.front().is_some_and(|s| now - s.at > WINDOW) {
            samples.pop_front();
        }
        let status = Status {
            done: start.done + done,
            failed: start.failed + failed,
            total: start.total,
            retry_waiting: counters.retries.waiting(now_ms()),
            rates: rates(&samples),
            restrained: restrained(&hosts),
            waiting_for: counters
                .waiting_for
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        match &bar {
            Some(bar) => {
                bar.set_length(status.total);
                bar.set_position(status.done + status.failed);
                bar.set_message(status.bar_message());
            }
            None => status.log(),
        }
    }
}

fn new_bar(total: u64) -> ProgressBar {
    let style =
        ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} done · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("##-");
    ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(style)
}

struct ClearOnDrop(Option<ProgressBar>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
        crate::log::set_bar(None);
    }
}

/// URLs and bytes per second over the samples' span.
fn rates(samples: &VecDeque<Sample>) -> Option<(f64, f64)> {
    let (first, last) = (samples.front()?, samples.back()?);
    let seconds = (last.at - first.at).as_secs_f64();
    (seconds >= 0.5).then(|| {
        (
            (last.finished - first.finished) as f64 / seconds,
            (last.bytes - first.bytes) as f64 / seconds,
        )
    })
}

/// Each paused or throttled host: how long it is paused for (and the
/// Retry-After it asked for, when that was capped), its rate now, and the
/// share of its answers that were 429 or 503.
fn restrained(hosts: &Hosts) -> Vec<String> {
    hosts
        .restrained()
        .into_iter()
        .map(|view| {
            let mut text = view.host;
            if let Some(pause) = view.paused_for {
                text += &format!(" paused {}s", pause.as_secs() + 1);
                if let Some(asked) = view.capped_from {
                    text += &format!(" (Retry-After {} s capped)", asked.as_secs());
                }
            }
            if let Some(rate) = view.adaptive_rate {
                text += &format!(" at {rate:.1}/s");
            }
            if view.throttled_share > 0.0 {
                text += &format!(" ({:.0}% 429/503)", view.throttled_share * 100.0);
            }
            text
        })
        .collect()
}

struct Status {
    done: u64,
    failed: u64,
    total: u64,
    retry_waiting: u64,
    rates: Option<(f64, f64)>,
    restrained: Vec<String>,
    waiting_for: Option<String>,
}

impl Status {
    fn eta(&self) -> Option<Duration> {
        let (urls_per_second, _) = self.rates?;
        let left = self.total.saturating_sub(self.done + self.failed);
        (urls_per_second > 0.0)
            .then(|| Duration::from_secs((left as f64 / urls_per_second).ceil() as u64))
    }

    fn parts(&self) -> Vec<String> {
        let mut parts = vec![
            format!("{} failed", thousands(self.failed)),
            format!("{} waiting for a retry", thousands(self.retry_waiting)),
        ];
        match self.rates {
            Some((urls, bytes)) => {
                parts.push(format!("{urls:.0} URLs/s"));
                parts.push(format!("{}/s", human_bytes(bytes as i64)));
            }
            None => parts.push("measuring rate".into()),
        }
        parts.push(match self.eta() {
            Some(eta) => format!("ETA {}", humantime::format_duration(eta)),
            None => "ETA unknown".into(),
        });
        if !self.restrained.is_empty() {
            parts.push(format!("hosts: {}", self.restrained.join(", ")));
        }
        parts.extend(self.waiting_for.clone());
        parts
    }

    fn bar_message(&self) -> String {
        self.parts().join(" · ")
    }

    fn log(&self) {
        let (urls_per_s, bytes_per_s) = self.rates.unwrap_or_default();
        tracing::info!(
            done = self.done,
            total = self.total,
            failed = self.failed,
            retry_waiting = self.retry_waiting,
            urls_per_s = urls_per_s.round(),
            bytes_per_s = bytes_per_s.round(),
            eta_s = self.eta().map(|eta| eta.as_secs()),
            "{}/{} done, {}",
            thousands(self.done),
            thousands(self.total),
            self.parts().join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_waits_only_until_its_time() {
        let retries = RetrySchedule::default();
        // A whole second an hour from now.
        let at = (now_ms() / 1000 + 3600) * 1000;
        retries.add(at + 500, 2);
        retries.add(at + 900, 1);
        retries.add(at + 2000, 4);
        retries.add(now_ms() - 10, 8);
        assert_eq!(
            retries.waiting(at - 1000),
            7,
            "one already due is not waiting"
        );
        assert_eq!(retries.waiting(at + 999), 7, "due within the second");
        assert_eq!(retries.waiting(at + 1000), 4);
        assert_eq!(retries.waiting(at + 2000), 0);
        assert!(retries.by_second.lock().unwrap().is_empty());
    }

    #[test]
    fn the_status_names_counts_rates_and_an_eta() {
        let status = Status {
            done: 500,
            failed: 2,
            total: 1502,
            retry_waiting: 3,
            rates: Some((100.0, 2_000_000.0)),
            restrained: vec!["a.test paused 3s".into()],
            waiting_for: Some("waiting for run #3 (pid 7, 2 URLs) to finish".into()),
        };
        let text = status.bar_message();
        for part in [
            "2 failed",
            "3 waiting for a retry",
            "100 URLs/s",
            "2.0 MB/s",
            "ETA 10s",
            "a.test paused 3s",
            "waiting for run #3 (pid 7, 2 URLs) to finish",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
    }
}
