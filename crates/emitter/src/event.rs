//! A business fact as a backend describes it, and its wire form.

use serde_json::{Map, Value};
use trueup_protocol::{Context, Event, Source, id_for_key};
use uuid::Uuid;

use crate::EmitError;

/// A business fact to emit: what happened (`name`), to whom, when, and the idempotency key
/// that identifies it.
///
/// The event's id is derived from `(site, name, key, ts_ms)` (see
/// [`trueup_protocol::id_for_key`]), so emitting the same fact again — a retried request, a
/// replayed job, a re-emit at start-up — gives the same id and the relay stores it once.
/// Both `key` and `ts_ms` must therefore come from the fact as stored (the order's id and its
/// `created_at`), never from the clock at emit time.
///
/// ```
/// use trueup_emitter::ServerEvent;
/// let paid = ServerEvent::new("order_paid", "order-81f2", 1_764_324_000_123)
///     .user_id("user-7")
///     .prop("order_id", "order-81f2")
///     .prop("amount", 49.5)
///     .prop("currency", "EUR");
/// assert_eq!(paid.schema, "order_paid/1");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ServerEvent {
    /// What happened, e.g. `signup_completed`.
    pub name: String,
    /// `"<name>/<version>"` of a schema the relay knows. [`ServerEvent::new`] sets version 1.
    pub schema: String,
    /// Identifies the fact among the facts of this name, e.g. the order id.
    pub key: String,
    /// When the fact happened, milliseconds since the Unix epoch, as stored with it.
    pub ts_ms: i64,
    /// The user the fact is about.
    pub user_id: Option<String>,
    /// The browser's anonymous id, when the request that caused the fact carried it. When
    /// absent, the user id stands in (the wire format needs a subject).
    pub anon_id: Option<String>,
    /// Properties, checked by the relay against the schema.
    pub props: Map<String, Value>,
}

impl ServerEvent {
    /// The fact `name` identified by `key`, which happened at `ts_ms`, with schema
    /// `"<name>/1"` and no properties.
    pub fn new(name: impl Into<String>, key: impl Into<String>, ts_ms: i64) -> ServerEvent {
        let name = name.into();
        ServerEvent {
            schema: format!("{name}/1"),
            name,
            key: key.into(),
            ts_ms,
            user_id: None,
            anon_id: None,
            props: Map::new(),
        }
    }

    /// Uses schema `schema` (`"<name>/<version>"`) instead of `"<name>/1"`.
    pub fn schema(mut self, schema: impl Into<String>) -> ServerEvent {
        self.schema = schema.into();
        self
    }

    /// Sets the user the fact is about.
    pub fn user_id(mut self, user_id: impl Into<String>) -> ServerEvent {
        self.user_id = Some(user_id.into());
        self
    }

    /// Sets the browser's anonymous id.
    pub fn anon_id(mut self, anon_id: impl Into<String>) -> ServerEvent {
        self.anon_id = Some(anon_id.into());
        self
    }

    /// Adds (or replaces) property `key`.
    pub fn prop(mut self, key: impl Into<String>, value: impl Into<Value>) -> ServerEvent {
        self.props.insert(key.into(), value.into());
        self
    }

    /// The id this fact gets on `site`.
    pub fn id(&self, site: &str) -> Uuid {
        id_for_key(site, &self.name, &self.key, self.ts_ms)
    }

    /// The id and the JSON of the wire event. Checks what the relay would otherwise reject
    /// for a reason the caller can fix at once; the relay checks the rest (schema, sizes).
    pub(crate) fn to_wire(&self, site: &str) -> Result<(Uuid, String), EmitError> {
        if self.name.is_empty() || self.key.is_empty() {
            return Err(EmitError::Invalid("name and key must not be empty".into()));
        }
        let subject = self
            .anon_id
            .clone()
            .filter(|a| !a.is_empty())
            .or_else(|| self.user_id.clone().filter(|u| !u.is_empty()))
            .ok_or_else(|| {
                EmitError::Invalid("a server event needs a user_id or an anon_id".into())
            })?;
        let id = self.id(site);
        let event = Event {
            id,
            name: self.name.clone(),
            schema: self.schema.clone(),
            ts: self.ts_ms,
            source: Source::Server,
            anon_id: subject,
            user_id: self.user_id.clone().filter(|u| !u.is_empty()),
            session_id: None,
            device_id: None,
            seq: None,
            props: self.props.clone(),
            context: Context::default(),
        };
        let json = serde_json::to_string(&event)
            .map_err(|e| EmitError::Invalid(format!("cannot serialise the event: {e}")))?;
        Ok((id, json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_event_is_a_server_event_with_the_derived_id() {
        let e = ServerEvent::new("order_paid", "o-1", 1_764_324_000_123)
            .user_id("u-1")
            .prop("amount", 12.5);
        let (id, json) = e.to_wire("demo").unwrap();
        assert_eq!(
            id,
            id_for_key("demo", "order_paid", "o-1", 1_764_324_000_123)
        );
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["id"], id.to_string());
        assert_eq!(v["source"], "server");
        assert_eq!(v["schema"], "order_paid/1");
        assert_eq!(
            v["anon_id"], "u-1",
            "the user id stands in for a missing anon id"
        );
        assert_eq!(v["user_id"], "u-1");
        assert_eq!(v["props"]["amount"], 12.5);
        assert!(v.get("seq").is_none() && v.get("device_id").is_none());
    }

    #[test]
    fn anon_id_is_kept_when_given() {
        let e = ServerEvent::new("signup_completed", "u-1", 5)
            .user_id("u-1")
            .anon_id("a-9");
        let (_, json) = e.to_wire("demo").unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["anon_id"], "a-9");
    }

    #[test]
    fn a_fact_without_subject_or_key_is_refused() {
        let e = ServerEvent::new("order_paid", "o-1", 5);
        assert!(matches!(e.to_wire("demo"), Err(EmitError::Invalid(_))));
        let e = ServerEvent::new("order_paid", "", 5).user_id("u");
        assert!(matches!(e.to_wire("demo"), Err(EmitError::Invalid(_))));
    }
}
