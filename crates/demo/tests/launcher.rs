//! `trueup-demo --relay-config`: one command runs the shop and the relay (the `trueup-relay`
//! next to the shop's binary); Ctrl-C stops both, in order, with the last business events
//! delivered; and a shop killed outright does not leave its relay behind.

#[path = "../../emitter/tests/relay_binary/mod.rs"]
#[macro_use]
mod relay_binary;
mod common;
#[path = "../../../tests/support/mod.rs"]
mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Demo, client, wait_count};
use reqwest::StatusCode;
use serde_json::json;
use support::SERVER_SECRET;

/// A relay config of the shape the demo needs: the relay on its own loopback ports (port 0:
/// the shop learns them from the relay's ready file), trusting the shop as its proxy, with
/// the shop's server secret.
fn relay_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "{data}"
asset_dir = "{assets}"
schemas_file = "{schemas}"

[rate_limit]
trusted_proxies = ["127.0.0.1/32", "::1/128"]

[[sites]]
key = "demo"
origins = ["http://127.0.0.1:8080"]
server_secrets = ["{SERVER_SECRET}"]
"#,
            data = dir.join("data").display(),
            assets = dir.join("assets").display(),
            schemas = relay_binary::example_schemas().display(),
        ),
    )
    .unwrap();
    path
}

/// The started relay's public and admin addresses, as the shop reports them.
fn relay_addrs(demo: &Demo) -> (SocketAddr, SocketAddr) {
    let public = demo
        .relay_url
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .expect("the shop uses the relay it started");
    (public, demo.relay_admin.expect("a relay was started"))
}

fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn wait_closed(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while listening(addr) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_runs_both_and_ctrl_c_stops_both_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let config = relay_config(tmp.path());
    let config_arg = config.display().to_string();
    let mut demo = Demo::spawn(
        tmp.path(),
        &[
            "--relay-config",
            &config_arg,
            "--server-secret",
            SERVER_SECRET,
        ],
    );
    let (public, admin) = relay_addrs(&demo);
    assert!(
        listening(public) && listening(admin),
        "the relay was started and is ready"
    );

    let resp = client()
        .post(demo.url("/api/signup"))
        .json(&json!({"email": "ada@shop.example", "plan": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    // Ctrl-C right away: the signup_completed still held by the emitter must be delivered
    // before the relay is stopped.
    let status =
        tokio::task::block_in_place(|| demo.signal_and_wait(libc::SIGINT, Duration::from_secs(60)));
    assert!(status.success(), "{status}:\n{}", demo.log_text());
    assert!(
        wait_closed(public, Duration::from_secs(5)) && !listening(admin),
        "the relay stopped with the shop"
    );
    let log = demo.log_text();
    assert!(log.contains("emitter drained"), "{log}");
    assert!(log.contains("relay stopped"), "{log}");

    let warehouse =
        || rusqlite::Connection::open(tmp.path().join("data/warehouse.sqlite")).unwrap();
    let n = wait_count(
        warehouse,
        "SELECT count(*) FROM events WHERE source = 'server' AND name = 'signup_completed'",
        &[],
        1,
        Duration::from_secs(1),
    );
    assert_eq!(
        n, 1,
        "the last event reached the warehouse before the relay stopped:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_killed_outright_does_not_leave_its_relay_running() {
    let tmp = tempfile::tempdir().unwrap();
    let config = relay_config(tmp.path());
    let config_arg = config.display().to_string();
    let mut demo = Demo::spawn(tmp.path(), &["--relay-config", &config_arg]);
    let (public, _) = relay_addrs(&demo);
    assert!(listening(public));
    tokio::task::block_in_place(|| demo.signal_and_wait(libc::SIGKILL, Duration::from_secs(10)));
    assert!(
        wait_closed(public, Duration::from_secs(30)),
        "the relay outlived the shop:\n{}",
        demo.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_start_stops_the_shop_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("relay.toml");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            tmp.path().join("data").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trueup-demo"))
        .arg("--relay-config")
        .arg(&config)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--db")
        .arg(tmp.path().join("demo.sqlite"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the relay exited during start"), "{stderr}");
}
