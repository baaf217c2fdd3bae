//! Attribution kept with the user: what the page's `trueup.attribution()` returned at signup
//! (first and last campaign touch), stored raw and as columns.
//!
//! A touch is *known* when it names a campaign (a `utm_*` parameter), a click id (`gclid`,
//! `fbclid`, `msclkid`) or an external referrer — exactly what makes the agent record a touch.
//! A visitor with no known touch is stored as unknown (`attribution_known = 0`, every column
//! NULL), never as "direct": "we do not know" and "typed the URL" are different facts, and
//! reconciliation reports the unknown share. Columns are copied as sent (`ft_source` is
//! `utm_source`; nothing is inferred from a referrer or a click id), so a report can apply
//! its own channel rules.
//!
//! The page's JSON is untrusted: only strings are read, each capped, and the whole value is
//! bounded; fields this version does not know are kept in the raw JSON and otherwise ignored,
//! so a newer agent never fails a signup.

use serde_json::{Map, Value};

/// Largest attribution JSON accepted, in bytes.
pub const MAX_BYTES: usize = 8 * 1024;
/// Longest column value kept, in characters; longer values are cut.
const MAX_CHARS: usize = 1_000;

const CAMPAIGN_KEYS: [&str; 5] = [
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
];
const CLICK_KEYS: [&str; 3] = ["gclid", "fbclid", "msclkid"];

/// The columns of one touch (`ft_*` or `lt_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TouchColumns {
    /// `utm_source`.
    pub source: Option<String>,
    /// `utm_medium`.
    pub medium: Option<String>,
    /// `utm_campaign`.
    pub campaign: Option<String>,
    /// The first of `gclid`, `fbclid`, `msclkid` present.
    pub click_id: Option<String>,
    /// The external referrer.
    pub referrer: Option<String>,
    /// The page the touch landed on.
    pub landing: Option<String>,
}

/// What the users table stores about a signup's attribution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The JSON the page sent, compact; `None` when it sent none (or `{}`).
    pub raw: Option<String>,
    /// First touch, all `None` when unknown.
    pub first: TouchColumns,
    /// Last touch, all `None` when unknown.
    pub last: TouchColumns,
    /// Whether either touch is known.
    pub known: bool,
}

/// Reads the page's attribution. `Err` says, for a 400, what is wrong with it.
pub fn from_page(value: Option<&Value>) -> Result<Stored, String> {
    let obj = match value {
        None | Some(Value::Null) => return Ok(Stored::default()),
        Some(Value::Object(obj)) => obj,
        Some(_) => {
            return Err("attribution must be an object like trueup.attribution() returns".into());
        }
    };
    let raw = serde_json::to_string(obj).map_err(|e| e.to_string())?;
    if raw.len() > MAX_BYTES {
        return Err(format!(
            "attribution is {} bytes, limit {MAX_BYTES}",
            raw.len()
        ));
    }
    let touch = |key: &str| match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(t)) => Ok(Some(t)),
        Some(_) => Err(format!("attribution.{key} must be an object")),
    };
    let (first, last) = (touch("first")?, touch("last")?);
    let first = first.filter(|t| is_known(t));
    let last = last.filter(|t| is_known(t));
    Ok(Stored {
        raw: (!obj.is_empty()).then_some(raw),
        known: first.is_some() || last.is_some(),
        first: first.map(columns).unwrap_or_default(),
        last: last.map(columns).unwrap_or_default(),
    })
}

fn text(touch: &Map<String, Value>, key: &str) -> Option<String> {
    let s = touch.get(key)?.as_str()?.trim();
    (!s.is_empty()).then(|| s.chars().take(MAX_CHARS).collect())
}

fn is_known(touch: &Map<String, Value>) -> bool {
    CAMPAIGN_KEYS
        .iter()
        .chain(CLICK_KEYS.iter())
        .chain(["referrer"].iter())
        .any(|k| text(touch, k).is_some())
}

fn columns(touch: &Map<String, Value>) -> TouchColumns {
    TouchColumns {
        source: text(touch, "utm_source"),
        medium: text(touch, "utm_medium"),
        campaign: text(touch, "utm_campaign"),
        click_id: CLICK_KEYS.iter().find_map(|k| text(touch, k)),
        referrer: text(touch, "referrer"),
        landing: text(touch, "landing_page"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn campaign_touches_become_columns() {
        let a = json!({
            "first": {"utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "launch",
                      "landing_page": "https://shop.example/?utm_source=newsletter", "ts": 1},
            "last": {"gclid": "g-1", "referrer": "https://www.google.com/", "landing_page": "https://shop.example/p", "ts": 2}
        });
        let s = from_page(Some(&a)).unwrap();
        assert!(s.known);
        assert_eq!(s.first.source.as_deref(), Some("newsletter"));
        assert_eq!(s.first.medium.as_deref(), Some("email"));
        assert_eq!(s.first.campaign.as_deref(), Some("launch"));
        assert_eq!(s.first.click_id, None);
        assert_eq!(
            s.first.landing.as_deref(),
            Some("https://shop.example/?utm_source=newsletter")
        );
        assert_eq!(s.last.click_id.as_deref(), Some("g-1"));
        assert_eq!(s.last.referrer.as_deref(), Some("https://www.google.com/"));
        assert_eq!(s.last.source, None, "nothing is inferred");
        let raw: Value = serde_json::from_str(s.raw.as_deref().unwrap()).unwrap();
        assert_eq!(raw, a);
    }

    #[test]
    fn nothing_known_is_unknown_not_direct() {
        for page in [None, Some(json!(null)), Some(json!({}))] {
            assert_eq!(from_page(page.as_ref()).unwrap(), Stored::default());
        }
        // A touch with only a landing page names no source: unknown, raw JSON kept.
        let a = json!({"first": {"landing_page": "https://shop.example/"}});
        let s = from_page(Some(&a)).unwrap();
        assert!(!s.known);
        assert_eq!(s.first, TouchColumns::default());
        assert!(s.raw.is_some());
    }

    #[test]
    fn only_strings_are_read_and_unknown_fields_are_tolerated() {
        let a =
            json!({"first": {"utm_source": 42, "fbclid": " fb-1 ", "new_field": true}, "v2": 1});
        let s = from_page(Some(&a)).unwrap();
        assert!(s.known);
        assert_eq!(s.first.source, None);
        assert_eq!(s.first.click_id.as_deref(), Some("fb-1"));
    }

    #[test]
    fn bad_shapes_and_sizes_are_explained() {
        assert!(
            from_page(Some(&json!("utm")))
                .unwrap_err()
                .contains("object")
        );
        assert!(
            from_page(Some(&json!({"first": "x"})))
                .unwrap_err()
                .contains("attribution.first")
        );
        let big = json!({"first": {"utm_source": "x".repeat(MAX_BYTES)}});
        assert!(from_page(Some(&big)).unwrap_err().contains("limit"));
    }

    #[test]
    fn long_values_are_cut() {
        let a = json!({"first": {"utm_campaign": "c".repeat(3_000)}});
        let s = from_page(Some(&a)).unwrap();
        assert_eq!(s.first.campaign.unwrap().chars().count(), MAX_CHARS);
    }
}
