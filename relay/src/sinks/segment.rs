//! The Segment sink (also RudderStack's data plane, which takes Segment's format):
//! `POST <url>/v1/batch`, HTTP Basic with the write key as user and no password.
//!
//! Body: `{"batch": [...]}`, each message as Segment's spec documents it:
//!
//! | Segment | from trueup |
//! |---|---|
//! | `type` | `page` for `page_view`, `identify` for `identify`, else `track` (with `event` = the name) |
//! | `messageId` | the trueup event id (Segment and RudderStack dedupe on it) |
//! | `anonymousId`, `userId` | `anon_id`, `user_id` |
//! | `timestamp` | the capture time `ts`, ISO-8601 |
//! | `sentAt` | when this request was made |
//! | `properties` | the event's `props` (a page adds `url`, `path`, `search`, `referrer`, `title`) |
//! | `traits` | an identify's `traits` |
//! | `context` | `page` (url, path, search, referrer, title), `campaign` (the last touch's UTM), `library` = trueup, and `trueup` (site, session_id, device_id, seq, schema, source) |
//!
//! Limits (Segment's documented ones; RudderStack's in brackets): 32 KB per event (a bigger
//! event is dead-lettered `too_large`, never sent), 500 KB [4 MB] per batch, 2,500 events per
//! batch. Agents' counters are not sent (they count as taken).

use std::sync::Arc;

use serde_json::{Map, Value, json};
use trueup_protocol::Event;

use super::http::{self, Limits};
use super::posthog::encode_events;
use super::{Delivery, Sink, SinkError};
use crate::config::SinkConfig;
use crate::spool::Record;
use crate::time::{iso8601, now_ms};

/// The Segment / RudderStack sink.
pub struct SegmentSink {
    client: reqwest::Client,
    url: String,
    write_key: String,
    limits: Limits,
}

impl SegmentSink {
    /// A sink for `cfg` (kind `segment` or `rudderstack`) with the write key.
    pub fn new(cfg: &SinkConfig, write_key: String) -> anyhow::Result<SegmentSink> {
        Ok(SegmentSink {
            client: http::client(cfg.timeout())?,
            url: format!(
                "{}/v1/batch",
                cfg.url.as_deref().unwrap_or_default().trim_end_matches('/')
            ),
            write_key,
            limits: Limits {
                max_events: cfg.batch_size(),
                max_bytes: cfg.max_batch_bytes(),
                max_event_bytes: cfg.max_event_bytes(),
                overhead: r#"{"batch":[]}"#.len(),
            },
        })
    }
}

/// One event as a Segment message.
pub fn message_json(e: &Event, site: &str, sent_at_ms: i64) -> Value {
    let url = e
        .context
        .url
        .as_deref()
        .and_then(|u| reqwest::Url::parse(u).ok());
    let mut page = Map::new();
    let put = |m: &mut Map<String, Value>, k: &str, v: Option<&str>| {
        if let Some(v) = v {
            m.insert(k.into(), Value::String(v.into()));
        }
    };
    put(&mut page, "url", e.context.url.as_deref());
    put(&mut page, "path", url.as_ref().map(|u| u.path()));
    put(
        &mut page,
        "search",
        url.as_ref()
            .and_then(|u| u.query())
            .map(|q| format!("?{q}"))
            .as_deref(),
    );
    put(&mut page, "referrer", e.context.referrer.as_deref());
    put(&mut page, "title", e.context.title.as_deref());
    let mut campaign = Map::new();
    if let Some(t) = e.context.attribution.as_ref().and_then(|a| a.last.as_ref()) {
        put(&mut campaign, "source", t.utm_source.as_deref());
        put(&mut campaign, "medium", t.utm_medium.as_deref());
        put(&mut campaign, "name", t.utm_campaign.as_deref());
        put(&mut campaign, "term", t.utm_term.as_deref());
        put(&mut campaign, "content", t.utm_content.as_deref());
    }
    let mut context = json!({
        "library": {"name": "trueup", "version": env!("CARGO_PKG_VERSION")},
        "trueup": {
            "site": site,
            "session_id": e.session_id,
            "device_id": e.device_id,
            "seq": e.seq,
            "schema": e.schema,
            "source": e.source.as_str(),
        },
    });
    if !page.is_empty() {
        context["page"] = Value::Object(page.clone());
    }
    if !campaign.is_empty() {
        context["campaign"] = Value::Object(campaign);
    }
    let mut m = json!({
        "messageId": e.id,
        "anonymousId": e.anon_id,
        "timestamp": iso8601(e.ts),
        "sentAt": iso8601(sent_at_ms),
        "context": context,
    });
    if let Some(u) = &e.user_id {
        m["userId"] = Value::String(u.clone());
    }
    match e.name.as_str() {
        "page_view" => {
            let mut props = page;
            props.extend(e.props.clone());
            m["type"] = "page".into();
            if let Some(t) = &e.context.title {
                m["name"] = Value::String(t.clone());
            }
            m["properties"] = Value::Object(props);
        }
        "identify" => {
            m["type"] = "identify".into();
            m["traits"] = e.props.get("traits").cloned().unwrap_or_else(|| json!({}));
        }
        name => {
            m["type"] = "track".into();
            m["event"] = Value::String(name.into());
            m["properties"] = Value::Object(e.props.clone());
        }
    }
    m
}

#[async_trait::async_trait]
impl Sink for SegmentSink {
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError> {
        let now = now_ms();
        let (items, mut rejected) = encode_events(&records, |e, r| message_json(e, &r.site, now));
        rejected.extend(
            http::deliver(&items, self.limits, |part| {
                let body = format!(r#"{{"batch":[{}]}}"#, http::join(part));
                let request = self
                    .client
                    .post(&self.url)
                    .basic_auth(&self.write_key, Some(""))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                async move { http::answer(request.send().await).await }
            })
            .await?,
        );
        Ok(Delivery { rejected })
    }
}
