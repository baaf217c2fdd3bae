//! Validation of one raw event against the envelope, the limits and the schema registry.
//!
//! [`validate_event`] never panics, whatever the input (a property test holds it to that),
//! and every failure carries a [`Reason`] that is stable on the wire and in metrics, plus a
//! human-readable detail.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::envelope::{Event, Source};
use crate::schema::{PropsMismatch, SchemaRegistry};

/// Why an event was rejected. Serialized in `snake_case`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The event has no `id`.
    MissingId,
    /// The `id` is not a UUIDv7 string.
    InvalidId,
    /// The event is not an object, lacks a field, has a field of the wrong type or an unknown field.
    InvalidEnvelope,
    /// `name` is empty, too long, or has control characters.
    InvalidName,
    /// `schema` is not a registered `"<name>/<version>"`.
    UnknownSchema,
    /// The schema exists but is for another event name.
    SchemaMismatch,
    /// A property has the wrong type for the schema.
    PropTypeMismatch,
    /// A required property is missing.
    MissingProp,
    /// A property the schema does not declare (and does not allow).
    UnknownProp,
    /// The event is larger than the per-event byte limit.
    TooLarge,
    /// The event nests deeper than the depth limit.
    TooDeep,
    /// `ts` is absurdly far in the future or the past.
    TsOutOfRange,
    /// A client event on the server path or a server event on the client path.
    WrongSource,
    /// A client event without `device_id` and `seq`.
    MissingSeq,
    /// A string field (`anon_id`, `user_id`, ...) is empty or too long.
    InvalidField,
}

impl Reason {
    /// Every reason, for metrics that list all of them.
    pub const ALL: [Reason; 15] = [
        Reason::MissingId,
        Reason::InvalidId,
        Reason::InvalidEnvelope,
        Reason::InvalidName,
        Reason::UnknownSchema,
        Reason::SchemaMismatch,
        Reason::PropTypeMismatch,
        Reason::MissingProp,
        Reason::UnknownProp,
        Reason::TooLarge,
        Reason::TooDeep,
        Reason::TsOutOfRange,
        Reason::WrongSource,
        Reason::MissingSeq,
        Reason::InvalidField,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MissingId => "missing_id",
            Reason::InvalidId => "invalid_id",
            Reason::InvalidEnvelope => "invalid_envelope",
            Reason::InvalidName => "invalid_name",
            Reason::UnknownSchema => "unknown_schema",
            Reason::SchemaMismatch => "schema_mismatch",
            Reason::PropTypeMismatch => "prop_type_mismatch",
            Reason::MissingProp => "missing_prop",
            Reason::UnknownProp => "unknown_prop",
            Reason::TooLarge => "too_large",
            Reason::TooDeep => "too_deep",
            Reason::TsOutOfRange => "ts_out_of_range",
            Reason::WrongSource => "wrong_source",
            Reason::MissingSeq => "missing_seq",
            Reason::InvalidField => "invalid_field",
        }
    }
}

/// A rejected event: the reason, a detail, and the id when one could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The event's id, if it had a valid one.
    pub id: Option<Uuid>,
    /// Why.
    pub reason: Reason,
    /// Which field, what was expected.
    pub detail: String,
}

/// Per-event limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest raw event, in bytes.
    pub max_event_bytes: usize,
    /// Deepest nesting of arrays/objects, counting the event object itself as 1.
    pub max_depth: usize,
    /// How far in the future `ts` may be, in milliseconds.
    pub max_future_ms: i64,
    /// How far in the past `ts` may be, in milliseconds.
    pub max_past_ms: i64,
    /// Longest `name`, `anon_id`, `user_id`, `session_id`, `device_id`, in characters.
    pub max_id_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: 32 * 1024,
            max_depth: 10,
            max_future_ms: 24 * 3600 * 1000,
            max_past_ms: 8 * 24 * 3600 * 1000,
            max_id_chars: 200,
        }
    }
}

/// The nesting depth of a JSON value: scalars are 0, `{}` and `[]` are 1.
pub fn json_depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn reject(id: Option<Uuid>, reason: Reason, detail: impl Into<String>) -> Rejection {
    Rejection {
        id,
        reason,
        detail: detail.into(),
    }
}

/// Validates one raw event (its JSON text) captured by `expected` source at relay time
/// `now_ms`. Returns the parsed event or why it is rejected.
pub fn validate_event(
    raw: &str,
    expected: Source,
    now_ms: i64,
    registry: &SchemaRegistry,
    limits: &Limits,
) -> Result<Event, Rejection> {
    // Size first: it is the cheapest check and bounds the work of every later one.
    if raw.len() > limits.max_event_bytes {
        let id = peek_id(raw);
        return Err(reject(
            id,
            Reason::TooLarge,
            format!("{} bytes, limit {}", raw.len(), limits.max_event_bytes),
        ));
    }
    let value: Value = serde_json::from_str(raw).map_err(|e| {
        if e.to_string().starts_with("recursion limit exceeded") {
            reject(
                peek_id(raw),
                Reason::TooDeep,
                "nested deeper than the JSON parser's limit of 128",
            )
        } else {
            reject(None, Reason::InvalidEnvelope, format!("not JSON: {e}"))
        }
    })?;
    let Value::Object(ref map) = value else {
        return Err(reject(
            None,
            Reason::InvalidEnvelope,
            "event is not an object",
        ));
    };
    let id = match map.get("id") {
        None | Some(Value::Null) => return Err(reject(None, Reason::MissingId, "no id")),
        Some(Value::String(s)) => match Uuid::parse_str(s) {
            Ok(id) if id.get_version_num() == 7 && id.hyphenated().to_string() == *s => id,
            Ok(id) if id.get_version_num() == 7 => {
                return Err(reject(
                    None,
                    Reason::InvalidId,
                    "id must be a lowercase hyphenated UUID",
                ));
            }
            Ok(_) => return Err(reject(None, Reason::InvalidId, "id is not a UUIDv7")),
            Err(_) => return Err(reject(None, Reason::InvalidId, "id is not a UUID")),
        },
        Some(_) => return Err(reject(None, Reason::InvalidId, "id is not a string")),
    };
    let depth = json_depth(&value);
    if depth > limits.max_depth {
        return Err(reject(
            Some(id),
            Reason::TooDeep,
            format!("depth {depth}, limit {}", limits.max_depth),
        ));
    }
    let event: Event = serde_json::from_value(value)
        .map_err(|e| reject(Some(id), Reason::InvalidEnvelope, e.to_string()))?;
    check_event(&event, expected, now_ms, registry, limits)
        .map_err(|(r, d)| reject(Some(id), r, d))?;
    Ok(event)
}

fn check_event(
    event: &Event,
    expected: Source,
    now_ms: i64,
    registry: &SchemaRegistry,
    limits: &Limits,
) -> Result<(), (Reason, String)> {
    let valid_text = |s: &str| {
        !s.is_empty()
            && s.chars().count() <= limits.max_id_chars
            && !s.chars().any(char::is_control)
    };
    if !valid_text(&event.name) {
        return Err((
            Reason::InvalidName,
            format!(
                "name must be 1..={} characters without control characters",
                limits.max_id_chars
            ),
        ));
    }
    for (field, value) in [
        ("anon_id", Some(&event.anon_id)),
        ("user_id", event.user_id.as_ref()),
        ("session_id", event.session_id.as_ref()),
        ("device_id", event.device_id.as_ref()),
    ] {
        if let Some(v) = value
            && !valid_text(v)
        {
            return Err((
                Reason::InvalidField,
                format!(
                    "{field} must be 1..={} characters without control characters",
                    limits.max_id_chars
                ),
            ));
        }
    }
    if event.source != expected {
        return Err((
            Reason::WrongSource,
            format!(
                "source {} on the {} path",
                event.source.as_str(),
                expected.as_str()
            ),
        ));
    }
    if event.source == Source::Client && (event.seq.is_none() || event.device_id.is_none()) {
        return Err((
            Reason::MissingSeq,
            "client events need device_id and seq".into(),
        ));
    }
    let earliest = now_ms.saturating_sub(limits.max_past_ms);
    let latest = now_ms.saturating_add(limits.max_future_ms);
    if event.ts < earliest || event.ts > latest {
        return Err((
            Reason::TsOutOfRange,
            format!("ts {} outside [{earliest}, {latest}]", event.ts),
        ));
    }
    let schema = registry.get(&event.schema).ok_or_else(|| {
        (
            Reason::UnknownSchema,
            format!("schema {:?} is not registered", event.schema),
        )
    })?;
    if !schema.any_name && schema.name != event.name {
        return Err((
            Reason::SchemaMismatch,
            format!(
                "schema {} is for events named {:?}",
                event.schema, schema.name
            ),
        ));
    }
    schema.check_props(&event.props).map_err(|m| match m {
        PropsMismatch::Missing(k) => (Reason::MissingProp, format!("props.{k} is required")),
        PropsMismatch::WrongType(d) => (Reason::PropTypeMismatch, d),
        PropsMismatch::Unknown(k) => (
            Reason::UnknownProp,
            format!("props.{k} is not declared by schema {}", event.schema),
        ),
    })
}

/// Reads the `id` of an event too large to parse fully, if it is a UUID near the start.
fn peek_id(raw: &str) -> Option<Uuid> {
    let at = raw.get(..raw.len().min(256))?.find("\"id\"")?;
    let rest = raw
        .get(at + 4..)?
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let rest = rest.strip_prefix('"')?;
    Uuid::parse_str(rest.get(..36)?).ok()
}
