//! Validation of one raw event against the envelope, the limits and the schema registry.
//!
//! [`validate_event`] never panics, whatever the input (a property test holds it to that),
//! and every failure carries a [`Reason`] that is stable on the wire and in metrics, plus a
//! human-readable detail.

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
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
    // Keys must be unique at every level: with a repeated key, readers disagree on the
    // event (the last one wins here, the sinks' parsers refuse the text or keep the first),
    // so what was validated would not be what is stored and forwarded.
    let UniqueKeys(value) = serde_json::from_str(raw).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with("recursion limit exceeded") {
            reject(
                peek_id(raw),
                Reason::TooDeep,
                "nested deeper than the JSON parser's limit of 128",
            )
        } else if msg.starts_with(DUPLICATE_KEY) {
            reject(None, Reason::InvalidEnvelope, msg)
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

const DUPLICATE_KEY: &str = "duplicate key";

/// A JSON value whose objects have unique keys (parsing fails on the first repeated one).
struct UniqueKeys(Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor).map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON has no NaN or infinity, so the parser never produces them: never `Null`.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(UniqueKeys(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let UniqueKeys(v) = map.next_value()?;
            match out.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(v);
                }
                serde_json::map::Entry::Occupied(slot) => {
                    let key = slot.key();
                    return Err(de::Error::custom(format_args!("{DUPLICATE_KEY} {key:?}")));
                }
            }
        }
        Ok(Value::Object(out))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000_000;

    fn check(raw: &str) -> Result<Event, Rejection> {
        validate_event(
            raw,
            Source::Client,
            NOW,
            &SchemaRegistry::builtin(),
            &Limits::default(),
        )
    }

    const GOOD: &str = r#"{"id":"0196a1b2-c3d4-7e5f-8a9b-000000000033","name":"page_view","schema":"page_view/1","ts":1789999999000,"source":"client","anon_id":"anon-1","device_id":"d1","seq":10,"props":{"a":{"b":[1,2.5,"x",null,true]}}}"#;

    #[test]
    fn a_good_event_still_parses() {
        let e = check(GOOD).expect("valid");
        assert_eq!(e.props["a"]["b"][1], serde_json::json!(2.5));
    }

    /// Found by the `batch` fuzz target: a repeated field was validated with its last value
    /// and accepted, but the stored text does not parse as an `Event` (serde refuses the
    /// duplicate), so every sink would have dead-lettered an event answered `accepted`.
    #[test]
    fn a_repeated_field_is_rejected() {
        let raw = r#"{"id":"0196a1b2-c3d4-7e5f-8a9b-000000000033","name":"signup_completed","schema":"signup_completed/1","ts":1789999999000,"source":"client","anon_id":"anon-1","session_id":"sesa9b-000000000035","name":"page_view","schema":"page_view/1","ts":1789999999000,"source":"client","anon_id":"anon-1","session_id":"sess-1","device_id":"d1","seq":10,"props":{},"context":{"url":"https://shop.example/cart","title":"Cart"}}"#;
        let rej = check(raw).expect_err("a repeated field is ambiguous");
        assert_eq!(rej.reason, Reason::InvalidEnvelope);
        assert!(
            rej.detail.contains("duplicate key \"name\""),
            "{}",
            rej.detail
        );
    }

    /// The same inside the props (where a schema's types would hold for one reader only) and
    /// deeper.
    #[test]
    fn a_repeated_key_anywhere_is_rejected() {
        for raw in [
            GOOD.replace(r#"{"a":{"b""#, r#"{"a":1,"a":{"b""#),
            GOOD.replace(r#"{"b":[1,"#, r#"{"b":0,"b":[1,"#),
            GOOD.replace(r#"null,true]"#, r#"null,{"k":1,"k":2}]"#),
        ] {
            let rej = check(&raw).expect_err(&raw);
            assert_eq!(rej.reason, Reason::InvalidEnvelope, "{raw}");
            assert!(rej.detail.starts_with(DUPLICATE_KEY), "{}", rej.detail);
        }
    }

    #[test]
    fn the_parser_depth_limit_still_answers_too_deep() {
        let raw = format!(
            r#"{{"id":"0196a1b2-c3d4-7e5f-8a9b-000000000033","props":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(check(&raw).unwrap_err().reason, Reason::TooDeep);
    }
}
