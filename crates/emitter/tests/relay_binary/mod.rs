//! Lets the integration tests of crates other than the relay reuse the workspace's
//! `tests/support` module, which runs the real `trueup-relay` binary.
//!
//! `tests/support` names the binary with `env!("CARGO_BIN_EXE_trueup-relay")`, a variable
//! Cargo sets only when compiling the relay's own tests. Declared with `#[macro_use]` before
//! `mod support;`, this module's `env!` shadows the built-in one inside `support`: it answers
//! that one name with the binary next to the test's own target directory, and passes every
//! other name to the built-in `env!`.
//!
//! Cargo does not build another package's binaries for these tests: run
//! `cargo build -p trueup-relay` first (same profile), or point `TRUEUP_RELAY_BIN` at one.

use std::path::PathBuf;

macro_rules! env {
    ("CARGO_BIN_EXE_trueup-relay") => {
        $crate::relay_binary::path()
    };
    ($name:literal) => {
        ::std::env!($name)
    };
}

/// The `trueup-relay` binary: `$TRUEUP_RELAY_BIN`, or `target/<profile>/trueup-relay` of the
/// target directory this test runs from (`target/<profile>/deps/<test>`).
pub fn path() -> PathBuf {
    if let Some(bin) = std::env::var_os("TRUEUP_RELAY_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin = profile_dir.join(format!("trueup-relay{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not found: build the relay first with `cargo build -p trueup-relay` \
         (or set TRUEUP_RELAY_BIN)",
        bin.display()
    );
    bin
}

/// `relay/schemas.example.toml` (signup_completed/1, order_paid/1), as an absolute path.
pub fn example_schemas() -> PathBuf {
    PathBuf::from(::std::env!("CARGO_MANIFEST_DIR"))
        .join("../../relay/schemas.example.toml")
        .canonicalize()
        .expect("relay/schemas.example.toml exists")
}
