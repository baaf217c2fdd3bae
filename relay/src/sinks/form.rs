//! A spooled event read for re-encoding in an upstream's form, without building a JSON tree.
//!
//! The HTTP sinks that reshape events (PostHog, Segment) read each spooled body into
//! [`Stored`], which borrows its strings from the body and keeps each property's value as the
//! raw JSON it was (`RawValue`): nothing below the top level of `props` is parsed or
//! re-allocated. [`Fields`] then writes an object from two lists of entries, the later list
//! winning on a shared key, so "the event's props plus our keys" needs no map either.

use std::borrow::Cow;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// An event as the spool stores it (the protocol's form, validated at ingest), borrowed.
#[derive(Deserialize)]
pub struct Stored<'a> {
    pub id: uuid::Uuid,
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(borrow)]
    pub schema: Cow<'a, str>,
    pub ts: i64,
    #[serde(borrow)]
    pub source: Cow<'a, str>,
    #[serde(borrow)]
    pub anon_id: Cow<'a, str>,
    #[serde(default, borrow)]
    pub user_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub session_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub device_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    pub props: Props<'a>,
    #[serde(default, borrow)]
    pub context: StoredContext<'a>,
}

/// The page context and attribution of a stored event.
#[derive(Default, Deserialize)]
pub struct StoredContext<'a> {
    #[serde(default, borrow)]
    pub url: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub referrer: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub title: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub attribution: Option<StoredAttribution<'a>>,
}

/// The attribution of a stored event; only the last touch is forwarded.
#[derive(Default, Deserialize)]
pub struct StoredAttribution<'a> {
    #[serde(default, borrow)]
    pub last: Option<StoredTouch<'a>>,
}

/// A campaign touch of a stored event.
#[derive(Default, Deserialize)]
pub struct StoredTouch<'a> {
    #[serde(default, borrow)]
    pub utm_source: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub utm_medium: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub utm_campaign: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub utm_term: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub utm_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub gclid: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub fbclid: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub msclkid: Option<Cow<'a, str>>,
}

/// An event's properties: keys in order, values as their raw JSON. A key given twice keeps
/// its last value (as the validator, which read them into a map, saw them).
#[derive(Default)]
pub struct Props<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Props<'a> {
    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The properties as entries, without `except`.
    pub fn entries(&self, except: Option<&str>) -> Vec<(&str, Val<'_>)> {
        self.0
            .iter()
            .filter(|(k, _)| Some(k.as_ref()) != except)
            .map(|(k, v)| (k.as_ref(), Val::Raw(v)))
            .collect()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Props<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Props<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of properties")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Props<'a>, M::Error> {
                let mut out: Vec<(Cow<'a, str>, &'a RawValue)> = Vec::new();
                while let Some(k) = m.next_key::<Cow<'a, str>>()? {
                    let v: &'a RawValue = m.next_value()?;
                    match out.iter_mut().find(|(seen, _)| *seen == k) {
                        Some(slot) => slot.1 = v,
                        None => out.push((k, v)),
                    }
                }
                Ok(Props(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A value to write: raw JSON, a string, a number, or an object of entries.
pub enum Val<'a> {
    Raw(&'a RawValue),
    Str(&'a str),
    U64(u64),
    Obj(Fields<'a>),
}

impl Serialize for Val<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Val::Raw(r) => r.serialize(s),
            Val::Str(v) => s.serialize_str(v),
            Val::U64(n) => s.serialize_u64(*n),
            Val::Obj(f) => f.serialize(s),
        }
    }
}

/// An object written from two lists of entries: `low`'s entries whose key `high` lacks,
/// then `high`'s.
#[derive(Default)]
pub struct Fields<'a> {
    pub low: Vec<(&'a str, Val<'a>)>,
    pub high: Vec<(&'a str, Val<'a>)>,
}

impl<'a> Fields<'a> {
    /// Adds `key` with a string value when there is one (to `high`).
    pub fn put(&mut self, key: &'a str, value: Option<&'a str>) {
        if let Some(v) = value {
            self.high.push((key, Val::Str(v)));
        }
    }

    /// Whether no entry would be written.
    pub fn is_empty(&self) -> bool {
        self.low.is_empty() && self.high.is_empty()
    }
}

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (k, v) in &self.low {
            if !self.high.iter().any(|(h, _)| h == k) {
                m.serialize_entry(k, v)?;
            }
        }
        for (k, v) in &self.high {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// The host and path of a page URL, when it parses.
pub fn host_and_path(url: Option<&str>) -> Option<reqwest::Url> {
    url.and_then(|u| reqwest::Url::parse(u).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn props_keep_raw_values_and_the_last_of_a_repeated_key() {
        let s: Stored = serde_json::from_str(
            r#"{"id":"0190a6d0-0000-7000-8000-000000000001","name":"a\"b","schema":"x/1","ts":5,
                "source":"client","anon_id":"an","props":{"k":{"n":[1,2.50]},"d":1,"d":"two"}}"#,
        )
        .unwrap();
        assert_eq!(s.name, "a\"b");
        assert_eq!(s.props.0.len(), 2);
        assert_eq!(s.props.get("k").unwrap().get(), r#"{"n":[1,2.50]}"#);
        assert_eq!(s.props.get("d").unwrap().get(), r#""two""#);
    }

    #[test]
    fn the_high_entries_win_on_a_shared_key() {
        let raw = RawValue::from_string("[1]".into()).unwrap();
        let f = Fields {
            low: vec![("a", Val::Str("low")), ("b", Val::Raw(&raw))],
            high: vec![("a", Val::U64(7)), ("c", Val::Str("c"))],
        };
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"b":[1],"a":7,"c":"c"}"#
        );
    }
}
