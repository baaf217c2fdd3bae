//! The protocol crate's batch parser and validator, as the relay uses them: the batch
//! header parsed with its events kept raw ([`RawBatch`], bounded), then each event through
//! [`validate_event`] on either path. Also the typed [`Batch`] senders build.
//!
//! Invariants: the event count is bounded; an accepted event parses directly as the
//! [`Event`] that was validated (what the sinks do with the stored text), re-serializes and
//! validates again unchanged; answers and typed batches survive their wire format.
#![no_main]

mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use trueup_protocol::{
    Batch, BatchResponse, Event, EventResult, EventStatus, Limits, MAX_EVENTS_PER_BATCH_LIMIT,
    RawBatch, SchemaDef, SchemaRegistry, Source, validate_event,
};

/// The relay's clock, fixed (the seeds' events are from just before it).
const NOW: i64 = 1_790_000_000_000;

/// The built-in schemas plus the example ones (a closed schema with required props).
fn registry() -> &'static SchemaRegistry {
    static REG: OnceLock<SchemaRegistry> = OnceLock::new();
    REG.get_or_init(|| {
        let mut reg = SchemaRegistry::builtin();
        let defs: Vec<SchemaDef> = serde_json::from_str(
            r#"[
              {"name": "signup_completed", "version": 1, "additional_props": false,
               "props": {"plan": {"type": "string", "required": true}, "seats": {"type": "integer"}}},
              {"name": "order_paid", "version": 1,
               "props": {"order_id": {"type": "string", "required": true},
                         "amount": {"type": "number", "required": true},
                         "currency": {"type": "string", "required": true},
                         "flags": {"type": "array"}, "meta": {"type": "object"},
                         "gift": {"type": "boolean"}, "note": {"type": "any"}}}
            ]"#,
        )
        .expect("the schema definitions parse");
        for def in defs {
            reg.register(def).expect("the schemas register");
        }
        reg
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = serde_json::from_slice::<Batch>(data) {
        let text = serde_json::to_string(&b).expect("a parsed batch serializes");
        let back: Batch = serde_json::from_str(&text).expect("a serialized batch parses");
        assert_eq!(back, b, "a typed batch survives its wire format");
    }
    let Ok(batch) = serde_json::from_slice::<RawBatch>(data) else {
        return;
    };
    assert!(batch.events.items.len() <= MAX_EVENTS_PER_BATCH_LIMIT);
    assert!(batch.events.items.len() <= batch.events.total);
    if let Some(c) = &batch.counters {
        let _ = c.identity_holds();
        let _ = c.dropped_total();
    }
    let limits = Limits::default();
    let unbounded = Limits {
        max_event_bytes: usize::MAX,
        ..limits
    };
    for source in [Source::Client, Source::Server] {
        let mut resp = BatchResponse::default();
        for raw in &batch.events.items {
            let result = match validate_event(raw.get(), source, NOW, registry(), &limits) {
                Ok(event) => {
                    let direct: Event = serde_json::from_str(raw.get()).unwrap_or_else(|e| {
                        panic!("an accepted event does not parse as an Event ({e}): {raw}")
                    });
                    assert_eq!(direct, event, "the sinks read the event that was validated");
                    let text = serde_json::to_string(&event).expect("an event serializes");
                    let again = validate_event(&text, source, NOW, registry(), &unbounded)
                        .unwrap_or_else(|r| {
                            panic!("a re-serialized event does not validate ({r:?}): {text}")
                        });
                    assert_eq!(again, event, "re-serializing changes nothing");
                    EventResult {
                        id: Some(event.id),
                        status: EventStatus::Accepted,
                    }
                }
                Err(rej) => {
                    assert!(!rej.reason.as_str().is_empty());
                    EventResult {
                        id: rej.id,
                        status: EventStatus::Rejected {
                            reason: rej.reason,
                            detail: rej.detail,
                        },
                    }
                }
            };
            resp.push(result);
        }
        common::round_trips(&resp);
    }
});
