//! Batch bodies, built cheaply enough that the load generator does not steal the relay's CPU.
//!
//! Every event of the whole run must carry a fresh id (a repeated id is answered `duplicate`
//! and stored once, which would flatter the relay), so bodies cannot simply be reused. Each
//! connection owns a [`BatchWriter`] whose constant text is rendered once; a body is then a
//! few copies of that text with the only varying parts spliced in: a fresh UUIDv7 per event,
//! the batch's `ts` and the device's growing `seq`. That costs about 2.5 µs per 20-event
//! batch (with uuid's `fast-rng`; without it every id costs a `getrandom` syscall and a
//! batch about 10 µs).

use bytes::Bytes;
use uuid::Uuid;

/// The site key of the relay's default configuration.
const SITE: &str = "demo";

/// Builds the batches one connection (one simulated device) sends.
///
/// An event, about 380 bytes (the size of a typical `track()` call with page context):
///
/// ```text
/// {"id":"<uuidv7>","name":"button_clicked","schema":"event/1","ts":<now ms>,"source":"client",
///  "anon_id":"anon-<d>","session_id":"s-<d>","device_id":"dev-<d>","seq":<k>,
///  "props":{"button":"checkout","plan":"pro","price":49.5,"items":3},
///  "context":{"url":"https://shop.example.com/cart?step=2","referrer":"https://www.example.org/","title":"Your cart"}}
/// ```
#[derive(Debug)]
pub struct BatchWriter {
    events_per_batch: usize,
    /// From after `ts` to `"seq":`.
    before_seq: Vec<u8>,
    seq: u64,
    capacity: usize,
}

/// Up to the id.
const BEFORE_ID: &[u8] = br#"{"id":""#;
/// From after the id to `"ts":`.
const BEFORE_TS: &[u8] = br#"","name":"button_clicked","schema":"event/1","ts":"#;
/// From after `seq` to the end of the event.
const TAIL: &[u8] = br#","props":{"button":"checkout","plan":"pro","price":49.5,"items":3},"context":{"url":"https://shop.example.com/cart?step=2","referrer":"https://www.example.org/","title":"Your cart"}}"#;

impl BatchWriter {
    /// A writer for the simulated device `device`: its own visitor, session and `seq`.
    pub fn new(device: &str, events_per_batch: usize) -> BatchWriter {
        let before_seq = format!(
            r#","source":"client","anon_id":"anon-{device}","session_id":"s-{device}","device_id":"dev-{device}","seq":"#
        )
        .into_bytes();
        let event =
            BEFORE_ID.len() + 36 + BEFORE_TS.len() + 20 + before_seq.len() + 20 + TAIL.len();
        BatchWriter {
            events_per_batch,
            before_seq,
            seq: 0,
            capacity: 64 + events_per_batch * (event + 1),
        }
    }

    /// The next batch: `events_per_batch` events, each with a fresh UUIDv7 id.
    pub fn next_batch(&mut self) -> Bytes {
        let ts = now_ms();
        let mut body = Vec::with_capacity(self.capacity);
        body.extend_from_slice(br#"{"v":1,"site":""#);
        body.extend_from_slice(SITE.as_bytes());
        body.extend_from_slice(br#"","events":["#);
        let mut id_buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        for i in 0..self.events_per_batch {
            if i > 0 {
                body.push(b',');
            }
            self.seq += 1;
            body.extend_from_slice(BEFORE_ID);
            body.extend_from_slice(
                Uuid::now_v7()
                    .hyphenated()
                    .encode_lower(&mut id_buf)
                    .as_bytes(),
            );
            body.extend_from_slice(BEFORE_TS);
            push_int(&mut body, ts);
            body.extend_from_slice(&self.before_seq);
            push_int(&mut body, self.seq);
            body.extend_from_slice(TAIL);
        }
        body.extend_from_slice(b"]}");
        Bytes::from(body)
    }
}

/// Appends the decimal digits of `n`.
fn push_int(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_valid_json_with_fresh_ids_and_growing_seq() {
        let mut w = BatchWriter::new("1-7", 20);
        let mut ids = std::collections::HashSet::new();
        let mut last_seq = 0;
        for _ in 0..3 {
            let body = w.next_batch();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
            assert_eq!(v["site"], "demo");
            let events = v["events"].as_array().expect("events");
            assert_eq!(events.len(), 20);
            for e in events {
                let id = e["id"].as_str().expect("id");
                let parsed = Uuid::parse_str(id).expect("uuid");
                assert_eq!(parsed.get_version_num(), 7);
                assert_eq!(parsed.hyphenated().to_string(), id, "lowercase hyphenated");
                assert!(ids.insert(id.to_string()), "ids are unique");
                let seq = e["seq"].as_u64().expect("seq");
                assert!(seq > last_seq);
                last_seq = seq;
                assert_eq!(e["device_id"], "dev-1-7");
                let len = serde_json::to_string(e).expect("json").len();
                assert!((360..=400).contains(&len), "{len}");
            }
        }
    }

    #[test]
    fn push_int_writes_decimal() {
        for n in [0u64, 7, 10, 1234, u64::MAX] {
            let mut out = Vec::new();
            push_int(&mut out, n);
            assert_eq!(String::from_utf8(out).expect("ascii"), n.to_string());
        }
    }
}
