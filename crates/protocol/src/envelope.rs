//! The event envelope, version 1.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Where an event was emitted: in a browser (anonymous, lossy) or by a system of record
/// (authenticated, exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Captured by the browser agent.
    Client,
    /// Emitted by a backend through the authenticated server path.
    Server,
}

impl Source {
    /// The lowercase name used on the wire and in the warehouse.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Client => "client",
            Source::Server => "server",
        }
    }
}

/// One captured event. Field names are the wire names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// UUIDv7 fixed at capture; the idempotency key.
    pub id: Uuid,
    /// What happened, e.g. `page_view` or `signup_completed`.
    pub name: String,
    /// `"<name>/<version>"` of a schema the registry knows.
    pub schema: String,
    /// Capture time, milliseconds since the Unix epoch.
    pub ts: i64,
    /// Who emitted the event.
    pub source: Source,
    /// The anonymous visitor id (or, for server events, any stable id of the subject).
    pub anon_id: String,
    /// The known user, once identified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The browsing session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The device (browser profile) whose agent captured the event; required for client events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Per-device counter that only grows; required for client events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Event properties, checked against the schema.
    #[serde(default)]
    pub props: Map<String, Value>,
    /// Where the event was captured.
    #[serde(default)]
    pub context: Context,
}

/// Where an event was captured: the page at call time and the visitor's attribution.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// The page URL at call time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `document.referrer` at call time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    /// `document.title` at call time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// First- and last-touch attribution, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
    /// Set when the agent ran in a degraded mode (e.g. `memory_queue`, `no_wasm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// First-touch and last-touch attribution of a visitor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attribution {
    /// The first campaign touch seen for this visitor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<Touch>,
    /// The most recent campaign touch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Touch>,
}

/// One campaign touch: how a visitor arrived.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // the fields are the standard UTM parameters and click ids
pub struct Touch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utm_source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utm_medium: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utm_campaign: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utm_term: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utm_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gclid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fbclid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msclkid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landing_page: Option<String>,
    /// When the touch happened, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
}
