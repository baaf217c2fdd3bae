//! Batch bodies, built cheaply enough that the load generator does not steal the relay's CPU.
//!
//! Every event of the whole run must carry a fresh id (a repeated id is answered `duplicate`
//! and stored once, which would flatter the relay), so bodies cannot simply be reused. Each
//! connection owns a [`BatchWriter`] whose constant text is rendered once; a body is then a
//! few copies of that text with the only varying parts spliced in: a fresh UUIDv7 per event,
//! the batch's `ts` and the device's growing `seq`. That costs a couple of microseconds per
//! 20-event batch, against tens of microseconds for formatting the JSON from scratch.

use bytes::Bytes;
use uuid::Uuid;

/// Target size of one event's JSON, bytes.
pub const EVENT_BYTES: usize = 300;

/// The site key of the relay's default configuration.
const SITE: &str = "demo";

/// Builds the batches one connection (one simulated device) sends.
#[derive(Debug)]
pub struct BatchWriter {
    events_per_batch: usize,
    /// `{"id":"`
    before_id: &'static [u8],
    /// From after the id to `"ts":`.
    before_ts: Vec<u8>,
    /// From after `ts` to `"seq":`.
    before_seq: Vec<u8>,
    /// From after `seq` to the end of the event, padded to [`EVENT_BYTES`].
    tail: Vec<u8>,
    seq: u64,
    capacity: usize,
}

impl BatchWriter {
    /// A writer for connection `conn`: its own device, visitor and session.
    pub fn new(conn: usize, events_per_batch: usize) -> BatchWriter {
        let mut w = BatchWriter {
            events_per_batch,
            before_id: br#"{"id":""#,
            before_ts: br#"","name":"button_clicked","schema":"event/1","ts":"#.to_vec(),
            before_seq: format!(
                r#","source":"client","anon_id":"anon-{conn}","session_id":"s-{conn}","device_id":"dev-{conn}","seq":"#
            )
            .into_bytes(),
            tail: Vec::new(),
            seq: 0,
            capacity: 0,
        };
        let props = r#","props":{"button":"checkout","plan":"pro","price":49.5,"items":3"#;
        let context = r#"},"context":{"url":"https://shop.example.com/cart?step=2","referrer":"https://www.example.org/","title":"Your cart"}}"#;
        // Pad with one more property so that a typical event (13-digit ts, 4-digit seq)
        // weighs EVENT_BYTES.
        let fixed = w.before_id.len()
            + 36
            + w.before_ts.len()
            + 13
            + w.before_seq.len()
            + 4
            + props.len()
            + context.len();
        let pad_field = r#","coupon":"""#.len();
        let pad = EVENT_BYTES.saturating_sub(fixed + pad_field);
        w.tail = format!(r#"{props},"coupon":"{}"{context}"#, "x".repeat(pad)).into_bytes();
        w.capacity = 64 + events_per_batch * (EVENT_BYTES + 32);
        w
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
            body.extend_from_slice(self.before_id);
            body.extend_from_slice(
                Uuid::now_v7()
                    .hyphenated()
                    .encode_lower(&mut id_buf)
                    .as_bytes(),
            );
            body.extend_from_slice(&self.before_ts);
            push_int(&mut body, ts);
            body.extend_from_slice(&self.before_seq);
            push_int(&mut body, self.seq);
            body.extend_from_slice(&self.tail);
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
        let mut w = BatchWriter::new(7, 20);
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
                assert_eq!(e["device_id"], "dev-7");
                let len = serde_json::to_string(e).expect("json").len();
                assert!(
                    (EVENT_BYTES - 10..=EVENT_BYTES + 10).contains(&len),
                    "{len}"
                );
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
