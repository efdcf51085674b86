//! Host-aware scheduling as the servers see it: with one request per host at
//! a time and more hosts than workers, every worker is kept busy.

mod support;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use support::*;

/// Holds every request until as many are in flight as can be: one per
/// worker, or one per host that has URLs left when fewer do (one request
/// per host at a time). Then it lets them all go. A dispatcher that leaves
/// a worker idle while a free host has URLs never gets there: the requests
/// wait until `give_up`, and the gate says where it stood
/// and lets everything through from then on.
struct Gate {
    workers: usize,
    give_up: Duration,
    state: Mutex<Held>,
    released: Condvar,
}

struct Held {
    /// URLs each host has that were not let go yet.
    left: Vec<usize>,
    /// The hosts of the requests held now.
    hosts: Vec<usize>,
    /// How many times requests were let go.
    rounds: u64,
    stuck: Option<String>,
}

impl Gate {
    fn new(workers: usize, hosts: usize, per_host: usize) -> Gate {
        Gate {
            workers,
            give_up: Duration::from_secs(60),
            state: Mutex::new(Held {
                left: vec![per_host; hosts],
                hosts: Vec::new(),
                rounds: 0,
                stuck: None,
            }),
            released: Condvar::new(),
        }
    }

    fn pass(&self, host: usize) {
        let mut held = self.state.lock().unwrap();
        if held.stuck.is_some() {
            // Found wanting once: the rest goes through.
            return;
        }
        held.hosts.push(host);
        let round = held.rounds;
        let with_urls = held.left.iter().filter(|&&n| n > 0).count();
        if held.hosts.len() >= self.workers.min(with_urls) {
            Gate::release(&mut held);
            self.released.notify_all();
            return;
        }
        let (mut held, waited) = self
            .released
            .wait_timeout_while(held, self.give_up, |held| held.rounds == round)
            .unwrap();
        if waited.timed_out() {
            held.stuck = Some(format!(
                "{} requests in flight, from hosts {:?}, while {with_urls} hosts had URLs left \
                 and {} workers could have been busy",
                held.hosts.len(),
                held.hosts,
                self.workers
            ));
            Gate::release(&mut held);
            self.released.notify_all();
        }
    }

    fn release(held: &mut Held) {
        for host in std::mem::take(&mut held.hosts) {
            held.left[host] = held.left[host].saturating_sub(1);
        }
        held.rounds += 1;
    }
}

#[test]
fn every_worker_is_busy_when_hosts_outnumber_workers() {
    let (workers, hosts, per_host) = (10, 20, 40);
    let gate = Arc::new(Gate::new(workers, hosts, per_host));
    let servers: Vec<Server> = (0..hosts)
        .map(|host| {
            let gate = gate.clone();
            Server::start_on(
                &format!("127.0.0.{}:0", host + 2),
                move |request| match item_of(&request.path) {
                    Some(i) => {
                        gate.pass(host);
                        Reply::ok(item_body(i))
                    }
                    None => Reply::status(404),
                },
            )
        })
        .collect();
    let urls: Vec<String> = (0..per_host)
        .flat_map(|i| {
            servers
                .iter()
                .map(move |s| s.url(&format!("/items/{i}.json")))
        })
        .collect();
    let job = Job::with_urls(&urls);
    // Longer than the gate waits, so that a request it holds is not
    // given up and asked for again.
    job.run_ok(&[
        "--workers",
        &workers.to_string(),
        "--per-host-workers",
        "1",
        "--timeout",
        "120s",
    ]);
    let held = gate.state.lock().unwrap();
    assert_eq!(held.stuck, None, "a worker was left idle");
    for server in &servers {
        assert_eq!(server.most_in_flight(), 1, "{}", server.url(""));
    }
    assert_eq!(held.left, vec![0; hosts], "every URL was asked for once");
    assert_eq!(job.report_json()["done"], urls.len());
}
