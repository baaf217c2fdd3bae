//! What the log sinks (`kafka`, `nats`) put around each record: the same value (the record
//! as stored), the same key and the same `trueup-*` headers, so a loader reads either log the
//! same way.

use std::borrow::Cow;

use serde::Deserialize;

use crate::spool::{Record, RecordKind};

/// The fields the key and headers are made of, borrowed from the record's JSON.
#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    schema: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    session_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    anon_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    device_id: Option<Cow<'a, str>>,
}

/// One record as a log message: its key and headers.
pub(crate) struct LogMessage<'a> {
    record: &'a Record,
    fields: Fields<'a>,
    received_at: String,
}

impl<'a> LogMessage<'a> {
    /// The message for `record`, or `None` when it is larger than `max_bytes` (with the
    /// dead-letter reason).
    pub(crate) fn of(record: &'a Record, max_bytes: usize) -> Result<LogMessage<'a>, String> {
        if record.body.len() > max_bytes {
            return Err(format!(
                "too_large: {} bytes, max_event_bytes {max_bytes}",
                record.body.len()
            ));
        }
        Ok(LogMessage {
            record,
            fields: serde_json::from_str(&record.body).unwrap_or_default(),
            received_at: record.received_at.to_string(),
        })
    }

    /// The partitioning key: the event's `session_id` (its `anon_id` when it has none, as
    /// server events), a device's counters by `device_id`.
    pub(crate) fn key(&self) -> Option<&str> {
        let f = &self.fields;
        match self.record.kind {
            RecordKind::Event => f.session_id.as_deref().or(f.anon_id.as_deref()),
            RecordKind::Counters => f.device_id.as_deref(),
        }
    }

    /// A stable id for the log's own deduplication: the event id, or for counters the
    /// device and the time the relay received them.
    pub(crate) fn dedupe_id(&self) -> String {
        match (self.record.kind, self.fields.id.as_deref()) {
            (RecordKind::Event, Some(id)) => id.to_string(),
            _ => format!(
                "counters:{}:{}",
                self.fields.device_id.as_deref().unwrap_or(""),
                self.record.received_at
            ),
        }
    }

    /// The `trueup-*` headers: `trueup-kind`, `trueup-site`, `trueup-received-at`, and
    /// `trueup-id`, `trueup-schema`, `trueup-source` when the record has them.
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let kind = match self.record.kind {
            RecordKind::Event => "event",
            RecordKind::Counters => "counters",
        };
        let f = &self.fields;
        [
            ("trueup-kind", Some(kind)),
            ("trueup-site", Some(self.record.site.as_str())),
            ("trueup-received-at", Some(self.received_at.as_str())),
            ("trueup-id", f.id.as_deref()),
            ("trueup-schema", f.schema.as_deref()),
            ("trueup-source", f.source.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
    }
}
