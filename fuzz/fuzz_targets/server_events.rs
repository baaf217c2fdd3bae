//! The relay's server-events path on one body (`trueup_relay::fuzzing::server_events`): the
//! secret (flag 4: the `demo` site's, else a wrong one), the query and headers, the caps,
//! gzip, the batch parse, the site the secret belongs to against the batch's, each event's
//! validation as a server event, the answer.
//!
//! Input: a flag byte then the body (see `common::request`). Checks: `common::check`, and a
//! wrong secret is always 401 whatever the body.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use trueup_protocol::Source;
use trueup_relay::api::ApiError;
use trueup_relay::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((body, req)) = common::request(data) else {
        return;
    };
    let out = fuzzing::server_events(&body, req);
    if !req.good_secret {
        assert!(
            matches!(out.answer, Err(ApiError::Unauthorized)),
            "a wrong secret must be refused before anything else"
        );
    }
    common::check(&out, Source::Server);
});
