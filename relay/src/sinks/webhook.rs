//! The webhook sink: a signed JSON batch POSTed to any URL.
//!
//! # What the receiver gets
//!
//! `POST <url>` with `Content-Type: application/json` and
//!
//! ```json
//! {"batch_id": "9f2c…", "sent_at": "2026-12-06T10:00:00.123Z",
//!  "records": [{"type": "event", "site": "demo", "received_at": 1765015200123, "data": {…}},
//!              {"type": "counters", "site": "demo", "received_at": 1765015200123, "data": {…}}]}
//! ```
//!
//! `data` is the event as the relay stored it (the protocol's envelope: `id`, `name`,
//! `schema`, `ts`, …) or an agent's counters. Headers:
//!
//! - `Idempotency-Key`: the batch id, a hash of the batch's records, so the same records
//!   carry the same key on every retry. Event ids (`data.id`) are the finer key: a batch that
//!   was split or re-cut after a restart has a new batch id but the same event ids.
//! - `Trueup-Timestamp`: Unix seconds when the request was signed.
//! - `Trueup-Signature`: `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
//!
//! # Verifying (receiver side)
//!
//! Compute HMAC-SHA256 with the shared secret over the timestamp header, a `.`, and the raw
//! body bytes exactly as received; compare with the hex after `v1=` in constant time; refuse
//! a timestamp more than 5 minutes from your clock (replay), and remember batch ids (or event
//! ids) you have stored for at least as long, answering 2xx to a repeat without storing it
//! again. Answer 2xx only after storing; 429/5xx to be retried; 413 to have the batch split;
//! another 4xx to refuse (the relay splits to find the record you refuse and dead-letters only
//! it).

use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::http::{self, Encoded, Limits};
use super::{Delivery, Sink, SinkError};
use crate::config::SinkConfig;
use crate::spool::{Record, RecordKind};
use crate::time::{iso8601, now_ms};

/// The webhook sink.
pub struct WebhookSink {
    client: reqwest::Client,
    url: String,
    secret: Vec<u8>,
    limits: Limits,
}

impl WebhookSink {
    /// A sink for `cfg` (kind `webhook`), signing with `secret`.
    pub fn new(cfg: &SinkConfig, secret: String) -> anyhow::Result<WebhookSink> {
        Ok(WebhookSink {
            client: http::client(cfg.timeout())?,
            url: cfg.url.clone().unwrap_or_default(),
            secret: secret.into_bytes(),
            limits: Limits {
                max_events: cfg.batch_size(),
                max_bytes: cfg.max_batch_bytes(),
                max_event_bytes: cfg.max_event_bytes(),
                overhead: envelope("", "").len() + 64,
            },
        })
    }
}

fn envelope(batch_id: &str, records: &str) -> String {
    format!(
        r#"{{"batch_id":"{batch_id}","sent_at":"{}","records":[{records}]}}"#,
        iso8601(now_ms())
    )
}

fn encode(r: &Record) -> Encoded {
    let kind = match r.kind {
        RecordKind::Event => "event",
        RecordKind::Counters => "counters",
    };
    let site = serde_json::to_string(&r.site).unwrap_or_else(|_| "\"\"".into());
    Encoded {
        pos: r.pos,
        json: format!(
            r#"{{"type":"{kind}","site":{site},"received_at":{},"data":{}}}"#,
            r.received_at, r.body
        ),
    }
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: i64, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1={}", hex(&mac.finalize().into_bytes()))
}

#[async_trait::async_trait]
impl Sink for WebhookSink {
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError> {
        let items: Vec<Encoded> = records.iter().map(encode).collect();
        let rejected = http::deliver(&items, self.limits, |part| {
            let joined = http::join(part);
            let batch_id = hex(&Sha256::digest(joined.as_bytes())[..16]);
            let body = envelope(&batch_id, &joined);
            let ts = now_ms() / 1000;
            let request = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("idempotency-key", &batch_id)
                .header("trueup-timestamp", ts.to_string())
                .header("trueup-signature", signature(&self.secret, ts, &body))
                .body(body);
            async move { http::answer(request.send().await).await }
        })
        .await?;
        Ok(Delivery { rejected })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_matches_a_known_vector() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac 'secret'
        assert_eq!(
            super::signature(b"secret", 1_700_000_000, r#"{"a":1}"#),
            "v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }
}
