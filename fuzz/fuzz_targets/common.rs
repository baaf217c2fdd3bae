//! What every relay-path target checks about an answer.
#![allow(dead_code)]

use std::io::Write;
use trueup_protocol::{BatchResponse, Event, EventStatus, Source, validate_event};

use trueup_relay::fuzzing::{self, Outcome, Presented};

/// The 200 answer accounts for every event, every stored event is one the sinks can read
/// back as the event that was validated, and the answer survives its own wire format.
/// A refusal is a 4xx: nothing a body holds may make the relay answer 5xx.
pub fn check(out: &Outcome, source: Source) {
    match &out.answer {
        Ok(resp) => {
            let n = resp.results.len();
            assert_eq!(n, out.events, "one result per event");
            assert_eq!(
                (resp.accepted + resp.duplicate + resp.rejected) as usize,
                n,
                "the totals add up"
            );
            assert_eq!(
                resp.accepted as usize,
                out.stored.len(),
                "accepted = stored"
            );
            let accepted: Vec<_> = resp
                .results
                .iter()
                .filter(|r| r.status == EventStatus::Accepted)
                .map(|r| r.id.expect("an accepted event has an id"))
                .collect();
            let now = trueup_relay::time::now_ms();
            for (raw, id) in out.stored.iter().zip(&accepted) {
                stored_event_is_readable(raw, *id, source, now);
            }
            round_trips(resp);
        }
        Err(e) => assert!(
            e.status().is_client_error(),
            "a body made the relay answer {}: {e}",
            e.status()
        ),
    }
}

/// The raw text the spool keeps is what every sink parses (as an [`Event`]): it must read
/// back as the event that was validated, and still validate.
pub fn stored_event_is_readable(raw: &str, id: uuid::Uuid, source: Source, now: i64) {
    let direct: Event = serde_json::from_str(raw)
        .unwrap_or_else(|e| panic!("an accepted event does not parse as an Event ({e}): {raw}"));
    assert_eq!(direct.id, id, "the stored event's id is the answered id");
    let limits = fuzzing::limits();
    let validated = validate_event(raw, source, now, fuzzing::registry(), &limits)
        .unwrap_or_else(|r| panic!("a stored event no longer validates ({r:?}): {raw}"));
    assert_eq!(
        direct, validated,
        "the sinks read the event that was validated"
    );
    // Re-serialized (what a forwarder re-encoding it would produce), it is still the same
    // event. The size limit is lifted: `1e2` becomes `100.0`, an absent `props` `{}`.
    let text = serde_json::to_string(&direct).expect("an event serializes");
    let unbounded = trueup_protocol::Limits {
        max_event_bytes: usize::MAX,
        ..limits
    };
    let again = validate_event(&text, source, now, fuzzing::registry(), &unbounded)
        .unwrap_or_else(|r| panic!("a re-serialized event does not validate ({r:?}): {text}"));
    assert_eq!(again, direct, "re-serializing changes nothing");
}

/// What the agent reads back is what the relay meant.
pub fn round_trips(resp: &BatchResponse) {
    let text = serde_json::to_string(resp).expect("an answer serializes");
    let back: BatchResponse = serde_json::from_str(&text).expect("an answer parses back");
    assert_eq!(&back, resp);
}

/// Decodes a relay-path input: one flag byte, then the body. Flags 0-4 are
/// [`Presented::from_byte`] (`?z=gzip`, `Content-Encoding: gzip`, `Content-Length`, `Origin`,
/// the right server secret); flag 6: the rest after one count byte is repeated that many
/// times (to reach the caps); flag 5: the harness then gzips it (and asks for gzip), so
/// decompression sees well-formed streams too.
pub fn request(data: &[u8]) -> Option<(Vec<u8>, Presented)> {
    let (&flags, mut body) = data.split_first()?;
    let mut req = Presented::from_byte(flags);
    let mut times = 1;
    if flags & 64 != 0
        && let Some((&n, rest)) = body.split_first()
    {
        times = usize::from(n);
        body = rest;
    }
    let mut body = body.repeat(times);
    if flags & 32 != 0 {
        req.query_gzip = true;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&body).expect("writing to a Vec");
        body = enc.finish().expect("writing to a Vec");
    }
    Some((body, req))
}
