//! The PostHog sink: PostHog's capture endpoint, `POST <url>/batch/`.
//!
//! Body: `{"api_key": "<project key>", "historical_migration": false, "batch": [...]}`, each
//! event as PostHog documents it:
//!
//! | PostHog | from trueup |
//! |---|---|
//! | `event` | the name; `page_view` → `$pageview`, `identify` → `$identify` |
//! | `distinct_id` | `user_id` when known, else `anon_id` |
//! | `timestamp` | the capture time `ts`, ISO-8601 (not the send time) |
//! | `uuid` | the trueup event id (PostHog dedupes on it) |
//! | `properties` | the event's `props`, plus `$session_id`, `$device_id`, `$current_url`, `$host`, `$pathname`, `$referrer`, `title`, the last touch's `utm_*` / `gclid` / `fbclid` / `msclkid`, `$lib` = `trueup`, and `trueup_seq`, `trueup_schema`, `trueup_site`, `trueup_source` |
//! | `$identify` | `$anon_distinct_id` = `anon_id`, `$set` = the identify's `traits` |
//!
//! Agents' counters are trueup's own and are not sent (they count as taken). Limits: 20 MB per
//! request (413 splits); answers as in [`super::http`].

use std::sync::Arc;

use serde_json::{Map, Value, json};
use trueup_protocol::Event;

use super::http::{self, Encoded, Limits};
use super::{Delivery, Sink, SinkError};
use crate::config::SinkConfig;
use crate::spool::{Record, RecordKind};
use crate::time::iso8601;

/// The PostHog sink.
pub struct PosthogSink {
    client: reqwest::Client,
    url: String,
    /// `{"api_key":…,"historical_migration":…,"batch":[` — the body up to the events.
    head: String,
    limits: Limits,
}

impl PosthogSink {
    /// A sink for `cfg` (kind `posthog`) with the project API key.
    pub fn new(cfg: &SinkConfig, api_key: String) -> anyhow::Result<PosthogSink> {
        let head = format!(
            r#"{{"api_key":{},"historical_migration":{},"batch":["#,
            serde_json::to_string(&api_key)?,
            cfg.historical_migration
        );
        Ok(PosthogSink {
            client: http::client(cfg.timeout())?,
            url: format!(
                "{}/batch/",
                cfg.url.as_deref().unwrap_or_default().trim_end_matches('/')
            ),
            limits: Limits {
                max_events: cfg.batch_size(),
                max_bytes: cfg.max_batch_bytes(),
                max_event_bytes: cfg.max_event_bytes(),
                overhead: head.len() + 2,
            },
            head,
        })
    }
}

/// One event in PostHog's form.
pub fn event_json(e: &Event, site: &str) -> Value {
    let mut p: Map<String, Value> = e.props.clone();
    let mut set = |k: &str, v: Option<&str>| {
        if let Some(v) = v {
            p.insert(k.into(), Value::String(v.into()));
        }
    };
    set("$session_id", e.session_id.as_deref());
    set("$device_id", e.device_id.as_deref());
    set("$current_url", e.context.url.as_deref());
    set("$referrer", e.context.referrer.as_deref());
    set("title", e.context.title.as_deref());
    if let Some(url) = e
        .context
        .url
        .as_deref()
        .and_then(|u| reqwest::Url::parse(u).ok())
    {
        set("$host", url.host_str());
        set("$pathname", Some(url.path()));
    }
    if let Some(t) = e.context.attribution.as_ref().and_then(|a| a.last.as_ref()) {
        set("utm_source", t.utm_source.as_deref());
        set("utm_medium", t.utm_medium.as_deref());
        set("utm_campaign", t.utm_campaign.as_deref());
        set("utm_term", t.utm_term.as_deref());
        set("utm_content", t.utm_content.as_deref());
        set("gclid", t.gclid.as_deref());
        set("fbclid", t.fbclid.as_deref());
        set("msclkid", t.msclkid.as_deref());
    }
    set("$lib", Some("trueup"));
    set("trueup_schema", Some(&e.schema));
    set("trueup_site", Some(site));
    set("trueup_source", Some(e.source.as_str()));
    if let Some(seq) = e.seq {
        p.insert("trueup_seq".into(), seq.into());
    }
    let event = match e.name.as_str() {
        "page_view" => "$pageview",
        "identify" => {
            p.insert("$anon_distinct_id".into(), Value::String(e.anon_id.clone()));
            let traits = p.remove("traits").unwrap_or_else(|| json!({}));
            p.insert("$set".into(), traits);
            "$identify"
        }
        other => other,
    };
    json!({
        "event": event,
        "distinct_id": e.user_id.as_deref().unwrap_or(&e.anon_id),
        "timestamp": iso8601(e.ts),
        "uuid": e.id,
        "properties": p,
    })
}

/// Events in the upstream's form; unreadable ones rejected; counters skipped.
pub(crate) fn encode_events(
    records: &[Record],
    form: impl Fn(&Event, &Record) -> Value,
) -> (Vec<Encoded>, Vec<(i64, String)>) {
    let (mut items, mut rejected) = (Vec::new(), Vec::new());
    for r in records.iter().filter(|r| r.kind == RecordKind::Event) {
        match serde_json::from_str::<Event>(&r.body) {
            Ok(e) => items.push(Encoded {
                pos: r.pos,
                json: form(&e, r).to_string(),
            }),
            Err(err) => rejected.push((r.pos, format!("unreadable_event: {err}"))),
        }
    }
    (items, rejected)
}

#[async_trait::async_trait]
impl Sink for PosthogSink {
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError> {
        let (items, mut rejected) = encode_events(&records, |e, r| event_json(e, &r.site));
        rejected.extend(
            http::deliver(&items, self.limits, |part| {
                let body = format!("{}{}]}}", self.head, http::join(part));
                let request = self
                    .client
                    .post(&self.url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                async move { http::answer(request.send().await).await }
            })
            .await?,
        );
        Ok(Delivery { rejected })
    }
}
