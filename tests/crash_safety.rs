//! Crash safety of the real relay binary: under concurrent load, `kill -9` it at random
//! moments (at least 20 times), restart it on the same data directory, and show that every
//! event that was acknowledged is in the warehouse exactly once after the forwarder drains.
//! Senders behave like agents: a batch with no answer is retried with the same ids until it
//! is answered, and the retry must land exactly once.

mod support;

use std::time::Duration;

use rand::Rng;
use support::*;

const KILLS: usize = 22;
const SENDERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_nothing_and_doubles_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "");
    let url = relay.collect_url();
    let agents = Agents::spawn(&url, SENDERS);

    let relay = tokio::task::spawn_blocking(move || {
        let mut relay = relay;
        let mut rng = rand::rng();
        for _ in 0..KILLS {
            std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
            relay.kill9();
            relay.restart();
        }
        // Let the senders run against a stable relay for a moment, then stop them.
        std::thread::sleep(Duration::from_millis(300));
        relay
    })
    .await
    .unwrap();
    let logs = agents.finish().await;
    relay.wait_drained();
    let (events, duplicates) = check_exactly_once(&relay, &logs);
    let unanswered: u64 = logs.iter().map(|l| l.attempts_unanswered).sum();
    println!(
        "crash-safety: kills={KILLS} events={events} unanswered_attempts={unanswered} answered_duplicate={duplicates} lost=0 doubled=0"
    );
    assert!(events > 1000, "too little load to mean anything: {events}");
    assert!(
        unanswered > 0,
        "the kills should have interrupted some requests"
    );
}
