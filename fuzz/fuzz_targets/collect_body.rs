//! The relay's collect path on one body, as `relay/src/ingest.rs` runs it, without a server
//! (`trueup_relay::fuzzing::collect`): the query and headers, the raw cap (`Content-Length`
//! and streamed), gzip with the decompressed cap, the batch parse with its event count, the
//! site and Origin, each event's validation, the answer.
//!
//! Input: a flag byte then the body (see `common::request`). Checks: `common::check`.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use trueup_protocol::Source;
use trueup_relay::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((body, req)) = common::request(data) else {
        return;
    };
    let out = fuzzing::collect(&body, req);
    common::check(&out, Source::Client);
});
