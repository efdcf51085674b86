//! A worker: takes jobs from the dispatcher one at a time, each with its
//! host's permit, makes one attempt at each and reports the outcome to the
//! database owner. It stops when the dispatcher is gone.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::clock::now_ms;
use crate::counters::Counters;
use crate::domain::{Completion, Fetched};
use crate::fetch::{Attempt, Fetcher, LocalError};
use crate::output::Written;
use crate::redact::redact_url;

use super::dispatch::Dispatched;
use super::messages::Event;

pub async fn work(
    fetcher: Arc<Fetcher>,
    jobs: flume::Receiver<Dispatched>,
    idle: Arc<Semaphore>,
    events: flume::Sender<Event>,
    counters: Arc<Counters>,
) {
    while let Ok((job, permit)) = jobs.recv_async().await {
        let in_flight = counters.requests.start();
        let attempt = fetcher.attempt(&job.claim, &job.temp).await;
        drop((permit, in_flight));
        if let Ok(attempt) = &attempt {
            counters.requests.observe(attempt);
        }
        let event = match attempt {
            Ok(Attempt::Body(body)) => {
                tracing::trace!(
                    "fetched {}: HTTP {}, {} bytes in {} ms",
                    redact_url(&job.claim.url),
                    body.status,
                    body.bytes,
                    body.millis
                );
                Event::Finished {
                    completion: Completion::Done {
                        id: job.claim.id,
                        lease: job.claim.lease,
                        fetched: Fetched {
                            status: body.status,
                            bytes: body.bytes,
                            sha256: body.sha256,
                            millis: body.millis,
                            validators: body.validators,
                        },
                    },
                    staged: Some(Written {
                        id: job.claim.id,
                        name: job.claim.path.clone(),
                        bytes: body.bytes,
                        sha256: body.sha256,
                    }),
                }
            }
            Ok(Attempt::Unchanged(completion)) => {
                tracing::trace!("unchanged: {}", redact_url(&job.claim.url));
                Event::Finished {
                    completion,
                    staged: None,
                }
            }
            Ok(Attempt::Failed(completion)) => {
                log_failure(&job.claim.url, &completion);
                Event::Finished {
                    completion,
                    staged: None,
                }
            }
            Err(LocalError::Output(error)) => Event::Fatal(error.into()),
            Err(LocalError::Client(error)) => Event::Fatal(error.into()),
        };
        if events.send_async(event).await.is_err() {
            return;
        }
        idle.add_permits(1);
    }
}

fn log_failure(url: &str, completion: &Completion) {
    let url = redact_url(url);
    match completion {
        Completion::Retry {
            error,
            next_attempt_at,
            ..
        } => {
            let wait = std::time::Duration::from_millis(
                next_attempt_at.saturating_sub(now_ms()).max(0) as u64,
            );
            tracing::debug!(
                "retry {url} in {}: {error}",
                humantime::format_duration(wait)
            );
        }
        Completion::Failed { error, .. } => tracing::debug!("failed {url}: {error}"),
        _ => {}
    }
}
