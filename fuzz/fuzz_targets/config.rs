//! The config loader: TOML text → `trueup_relay::Config` (as `Config::from_file` parses it)
//! → `Config::validate`, then what the server derives from a valid config before it starts.
//! Nothing may panic; validation is idempotent (the relay may validate twice).
#![no_main]

use libfuzzer_sys::fuzz_target;
use trueup_relay::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = fuzzing::load_config(text) else {
        return;
    };
    let mut again = cfg.clone();
    again
        .validate()
        .unwrap_or_else(|e| panic!("a validated config fails validation again: {e}"));
    assert_eq!(
        format!("{again:?}"),
        format!("{cfg:?}"),
        "validation is idempotent"
    );
    let _ = cfg.event_limits();
    let _ = cfg.schema_registry();
    let _ = (
        cfg.collect_url_path(),
        cfg.server_url_path(),
        cfg.assets_url_path(),
    );
    let _ = (cfg.spool_path(), cfg.warehouse_path());
    for s in cfg.effective_sinks() {
        let _ = cfg.warehouse_path_of(&s);
        let _ = (
            s.batch_size(),
            s.max_batch_bytes(),
            s.max_event_bytes(),
            s.timeout(),
        );
    }
    let _ = cfg.reconcile_stores();
    let _ = trueup_relay::ingest::body_budget(&cfg);
});
