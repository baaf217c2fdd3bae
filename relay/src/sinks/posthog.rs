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

use serde::Serialize;

use super::form::{self, Fields, Stored, Val};
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
#[derive(Serialize)]
struct Out<'a> {
    event: &'a str,
    distinct_id: &'a str,
    timestamp: String,
    uuid: uuid::Uuid,
    properties: Fields<'a>,
}

/// One stored event in PostHog's form, as JSON.
pub(crate) fn event_json(e: &Stored, site: &str) -> serde_json::Result<String> {
    let url = form::host_and_path(e.context.url.as_deref());
    let identify = e.name == "identify";
    let mut p = Fields {
        low: e.props.entries(identify.then_some("traits")),
        high: Vec::with_capacity(24),
    };
    p.put("$session_id", e.session_id.as_deref());
    p.put("$device_id", e.device_id.as_deref());
    p.put("$current_url", e.context.url.as_deref());
    p.put("$referrer", e.context.referrer.as_deref());
    p.put("title", e.context.title.as_deref());
    if let Some(url) = &url {
        p.put("$host", url.host_str());
        p.put("$pathname", Some(url.path()));
    }
    if let Some(t) = e.context.attribution.as_ref().and_then(|a| a.last.as_ref()) {
        p.put("utm_source", t.utm_source.as_deref());
        p.put("utm_medium", t.utm_medium.as_deref());
        p.put("utm_campaign", t.utm_campaign.as_deref());
        p.put("utm_term", t.utm_term.as_deref());
        p.put("utm_content", t.utm_content.as_deref());
        p.put("gclid", t.gclid.as_deref());
        p.put("fbclid", t.fbclid.as_deref());
        p.put("msclkid", t.msclkid.as_deref());
    }
    p.put("$lib", Some("trueup"));
    p.put("trueup_schema", Some(&e.schema));
    p.put("trueup_site", Some(site));
    p.put("trueup_source", Some(&e.source));
    if let Some(seq) = e.seq {
        p.high.push(("trueup_seq", Val::U64(seq)));
    }
    let event = match e.name.as_ref() {
        "page_view" => "$pageview",
        "identify" => {
            p.put("$anon_distinct_id", Some(&e.anon_id));
            let traits = e
                .props
                .get("traits")
                .map_or(Val::Obj(Fields::default()), Val::Raw);
            p.high.push(("$set", traits));
            "$identify"
        }
        other => other,
    };
    serde_json::to_string(&Out {
        event,
        distinct_id: e.user_id.as_deref().unwrap_or(&e.anon_id),
        timestamp: iso8601(e.ts),
        uuid: e.id,
        properties: p,
    })
}

/// Events in the upstream's form, encoded off the async threads (in parallel across a
/// forwarder's concurrent calls); unreadable ones rejected; counters skipped.
pub(crate) async fn encode_events<F>(
    records: Arc<Vec<Record>>,
    form: F,
) -> Result<(Vec<Encoded>, Vec<(i64, String)>), SinkError>
where
    F: Fn(&Stored, &Record) -> serde_json::Result<String> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let (mut items, mut rejected) = (Vec::with_capacity(records.len()), Vec::new());
        for r in records.iter().filter(|r| r.kind == RecordKind::Event) {
            match serde_json::from_str::<Stored>(&r.body).and_then(|e| form(&e, r)) {
                Ok(json) => items.push(Encoded { pos: r.pos, json }),
                Err(err) => rejected.push((r.pos, format!("unreadable_event: {err}"))),
            }
        }
        (items, rejected)
    })
    .await
    .map_err(|e| SinkError {
        message: format!("encoding task failed: {e}"),
        retry_after: None,
    })
}

#[async_trait::async_trait]
impl Sink for PosthogSink {
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError> {
        let (items, mut rejected) = encode_events(records, |e, r| event_json(e, &r.site)).await?;
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    fn form(body: &str) -> Value {
        let e: super::Stored = serde_json::from_str(body).unwrap();
        serde_json::from_str(&super::event_json(&e, "shop").unwrap()).unwrap()
    }

    #[test]
    fn our_keys_win_over_props_and_nested_props_pass_through() {
        let v = form(
            r#"{"id":"0190A6D0-0000-7000-8000-000000000001","name":"page_view","schema":"page_view/1",
                "ts":1764324000123,"source":"client","anon_id":"an","session_id":"s","seq":7,
                "props":{"$session_id":"theirs","$host":"kept","x":{"a":[1,2.50]}},
                "context":{"url":"https://shop.example/a?q=1"}}"#,
        );
        assert_eq!(v["event"], "$pageview");
        assert_eq!(v["uuid"], "0190a6d0-0000-7000-8000-000000000001");
        assert_eq!(v["timestamp"], "2025-11-28T10:00:00.123Z");
        let p = &v["properties"];
        assert_eq!(p["$session_id"], "s");
        assert_eq!(p["$host"], "shop.example");
        assert_eq!(p["$pathname"], "/a");
        assert_eq!(p["x"], json!({"a": [1, 2.5]}));
        assert_eq!(p["trueup_seq"], 7);
        assert_eq!(p["trueup_site"], "shop");
    }

    #[test]
    fn identify_sets_traits_and_the_anonymous_id() {
        let v = form(
            r#"{"id":"0190a6d0-0000-7000-8000-000000000002","name":"identify","schema":"identify/1",
                "ts":0,"source":"client","anon_id":"an","user_id":"u","props":{"traits":{"plan":"pro"}}}"#,
        );
        assert_eq!(v["event"], "$identify");
        assert_eq!(v["distinct_id"], "u");
        assert_eq!(v["properties"]["$anon_distinct_id"], "an");
        assert_eq!(v["properties"]["$set"], json!({"plan": "pro"}));
        assert!(v["properties"].get("traits").is_none());
    }
}
