//! Crash safety of the real relay binary: under concurrent load, `kill -9` it at random
//! moments (at least 20 times), restart it on the same data directory, and show that every
//! event that was acknowledged is in the warehouse exactly once after the forwarder drains.
//! Senders behave like agents: a batch with no answer is retried with the same ids until it
//! is answered, and the retry must land exactly once. The relay fans out to two sinks, the
//! embedded warehouse and a webhook receiver (which outlives the relay's deaths): each must
//! end with every acknowledged event exactly once by id.

mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::time::Duration;

use rand::Rng;
use support::*;

const KILLS: usize = 22;
const SENDERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_nothing_and_doubles_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let hook = upstream::Upstream::start(upstream::Flavor::Webhook {
        secret: "whsec-crash".into(),
    })
    .await;
    std::fs::write(tmp.path().join("hook.secret"), "whsec-crash").unwrap();
    let config = format!(
        "[forwarder]\ninitial_backoff_ms = 50\nmax_backoff_ms = 400\n\n[[sinks]]\nname = \"warehouse\"\nkind = \"warehouse\"\n\n[[sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}/in\"\nsecret_file = \"{}\"\n",
        hook.url(),
        tmp.path().join("hook.secret").display()
    );
    let relay = RelayProc::start(tmp.path(), &config);
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
    let sent: std::collections::HashSet<String> =
        logs.iter().flat_map(|l| l.sent.iter().cloned()).collect();
    let at_hook: std::collections::HashSet<String> =
        hook.seen(|s| s.events.keys().cloned().collect());
    assert_eq!(
        at_hook.len(),
        sent.len(),
        "the webhook holds every acknowledged event"
    );
    assert!(
        at_hook == sent,
        "the webhook holds exactly the acknowledged events"
    );
    let resent = hook.seen(|s| s.arrivals.values().filter(|n| **n > 1).count());
    let unanswered: u64 = logs.iter().map(|l| l.attempts_unanswered).sum();
    println!(
        "crash-safety: kills={KILLS} events={events} unanswered_attempts={unanswered} answered_duplicate={duplicates} lost=0 doubled=0 webhook_resent_after_a_kill={resent}"
    );
    assert!(events > 1000, "too little load to mean anything: {events}");
    assert!(
        unanswered > 0,
        "the kills should have interrupted some requests"
    );
}
