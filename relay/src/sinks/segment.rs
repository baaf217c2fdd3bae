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

use serde::Serialize;

use super::form::{self, Fields, Stored, Val};
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
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Message<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message_id: uuid::Uuid,
    anonymous_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    timestamp: String,
    sent_at: &'a str,
    context: MessageContext<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<Fields<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traits: Option<Val<'a>>,
}

#[derive(Serialize)]
struct MessageContext<'a> {
    library: Library,
    trueup: TrueupContext<'a>,
    #[serde(skip_serializing_if = "Fields::is_empty")]
    page: Fields<'a>,
    #[serde(skip_serializing_if = "Fields::is_empty")]
    campaign: Fields<'a>,
}

#[derive(Serialize)]
struct Library {
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
struct TrueupContext<'a> {
    site: &'a str,
    session_id: Option<&'a str>,
    device_id: Option<&'a str>,
    seq: Option<u64>,
    schema: &'a str,
    source: &'a str,
}

/// The page fields of an event: `url`, `path`, `search`, `referrer`, `title`.
fn page<'a>(e: &'a Stored, url: Option<&'a reqwest::Url>, search: Option<&'a str>) -> Fields<'a> {
    let mut page = Fields::default();
    page.put("url", e.context.url.as_deref());
    page.put("path", url.map(|u| u.path()));
    page.put("search", search);
    page.put("referrer", e.context.referrer.as_deref());
    page.put("title", e.context.title.as_deref());
    page
}

/// One stored event as a Segment message, as JSON; `sent_at` is this request's ISO-8601 time.
pub(crate) fn message_json(e: &Stored, site: &str, sent_at: &str) -> serde_json::Result<String> {
    let url = form::host_and_path(e.context.url.as_deref());
    let search = url
        .as_ref()
        .and_then(|u| u.query())
        .map(|q| format!("?{q}"));
    let mut campaign = Fields::default();
    if let Some(t) = e.context.attribution.as_ref().and_then(|a| a.last.as_ref()) {
        campaign.put("source", t.utm_source.as_deref());
        campaign.put("medium", t.utm_medium.as_deref());
        campaign.put("name", t.utm_campaign.as_deref());
        campaign.put("term", t.utm_term.as_deref());
        campaign.put("content", t.utm_content.as_deref());
    }
    let mut m = Message {
        kind: "track",
        message_id: e.id,
        anonymous_id: &e.anon_id,
        user_id: e.user_id.as_deref(),
        timestamp: iso8601(e.ts),
        sent_at,
        context: MessageContext {
            library: Library {
                name: "trueup",
                version: env!("CARGO_PKG_VERSION"),
            },
            trueup: TrueupContext {
                site,
                session_id: e.session_id.as_deref(),
                device_id: e.device_id.as_deref(),
                seq: e.seq,
                schema: &e.schema,
                source: &e.source,
            },
            page: page(e, url.as_ref(), search.as_deref()),
            campaign,
        },
        event: None,
        name: None,
        properties: None,
        traits: None,
    };
    match e.name.as_ref() {
        "page_view" => {
            m.kind = "page";
            m.name = e.context.title.as_deref();
            let mut props = page(e, url.as_ref(), search.as_deref());
            props.low = std::mem::take(&mut props.high);
            props.high = e.props.entries(None);
            m.properties = Some(props);
        }
        "identify" => {
            m.kind = "identify";
            m.traits = Some(
                e.props
                    .get("traits")
                    .map_or(Val::Obj(Fields::default()), Val::Raw),
            );
        }
        name => {
            m.event = Some(name);
            m.properties = Some(Fields {
                low: Vec::new(),
                high: e.props.entries(None),
            });
        }
    }
    serde_json::to_string(&m)
}

#[async_trait::async_trait]
impl Sink for SegmentSink {
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError> {
        let sent_at = iso8601(now_ms());
        let (items, mut rejected) =
            encode_events(records, move |e, r| message_json(e, &r.site, &sent_at)).await?;
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    fn form(body: &str) -> Value {
        let e: super::Stored = serde_json::from_str(body).unwrap();
        let m = super::message_json(&e, "shop", "2025-11-28T10:00:01.000Z").unwrap();
        serde_json::from_str(&m).unwrap()
    }

    #[test]
    fn a_page_has_its_page_fields_with_props_winning() {
        let v = form(
            r#"{"id":"0190a6d0-0000-7000-8000-000000000001","name":"page_view","schema":"page_view/1",
                "ts":1764324000123,"source":"client","anon_id":"an","props":{"title":"theirs"},
                "context":{"url":"https://shop.example/a?q=1","title":"T",
                           "attribution":{"last":{"utm_source":"g","utm_campaign":"c"}}}}"#,
        );
        assert_eq!(v["type"], "page");
        assert_eq!(v["name"], "T");
        assert_eq!(v["sentAt"], "2025-11-28T10:00:01.000Z");
        assert_eq!(v["properties"]["title"], "theirs");
        assert_eq!(v["properties"]["search"], "?q=1");
        assert_eq!(v["context"]["page"]["title"], "T");
        assert_eq!(
            v["context"]["campaign"],
            json!({"source": "g", "name": "c"})
        );
        assert_eq!(v["context"]["trueup"]["session_id"], Value::Null);
        assert!(v.get("userId").is_none());
    }

    #[test]
    fn track_and_identify() {
        let v = form(
            r#"{"id":"0190a6d0-0000-7000-8000-000000000002","name":"signup_completed",
                "schema":"signup_completed/1","ts":0,"source":"server","anon_id":"an","user_id":"u",
                "props":{"plan":"pro"}}"#,
        );
        assert_eq!(
            (&v["type"], &v["event"], &v["userId"]),
            (&json!("track"), &json!("signup_completed"), &json!("u"))
        );
        assert_eq!(v["properties"], json!({"plan": "pro"}));
        assert!(v["context"].get("page").is_none());
        let v = form(
            r#"{"id":"0190a6d0-0000-7000-8000-000000000003","name":"identify","schema":"identify/1",
                "ts":0,"source":"client","anon_id":"an"}"#,
        );
        assert_eq!(v["type"], "identify");
        assert_eq!(v["traits"], json!({}));
        assert!(v.get("properties").is_none());
    }
}
