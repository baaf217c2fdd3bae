//! Attribution: how a visitor arrived (UTM parameters, click ids, an external referrer),
//! captured first-touch and last-touch.
//!
//! A page load is a *touch* when its URL has a campaign parameter or a click id, or when its
//! referrer is another site. The first touch is kept forever; the last touch is replaced by
//! each new touch. A new touch also starts a new session. Touches are plain JS objects with
//! the field names of `trueup_protocol::Touch` (built with js-sys, not serde, for size).

use js_sys::{Object, Reflect};
use wasm_bindgen::JsValue;
use web_sys::Url;

const PARAMS: [&str; 8] = [
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
    "gclid",
    "fbclid",
    "msclkid",
];

/// The touch of a page load (its URL and referrer), if it is one.
pub fn touch_of(href: &str, referrer: &str, now: f64) -> Option<Object> {
    let url = Url::new(href).ok()?;
    let params = url.search_params();
    let touch = Object::new();
    let mut campaign = false;
    for key in PARAMS {
        if let Some(v) = params.get(key).filter(|v| !v.is_empty()) {
            let _ = Reflect::set(&touch, &key.into(), &v.into());
            campaign = true;
        }
    }
    let external = Url::new(referrer)
        .map(|r| r.host() != url.host())
        .unwrap_or(false);
    if !campaign && !external {
        return None;
    }
    if external {
        let _ = Reflect::set(&touch, &"referrer".into(), &referrer.into());
    }
    let _ = Reflect::set(&touch, &"landing_page".into(), &href.into());
    let _ = Reflect::set(&touch, &"ts".into(), &now.into());
    Some(touch)
}

/// Applies a page load's touch to the stored `{first, last}`; returns the new attribution
/// object and whether there was a touch (a new campaign).
pub fn apply(stored: &JsValue, touch: Option<Object>) -> (Object, bool) {
    let attr = Object::new();
    let first = Reflect::get(stored, &"first".into()).unwrap_or_default();
    let last = Reflect::get(stored, &"last".into()).unwrap_or_default();
    let had_first = first.is_object();
    if had_first {
        let _ = Reflect::set(&attr, &"first".into(), &first);
    }
    if last.is_object() {
        let _ = Reflect::set(&attr, &"last".into(), &last);
    }
    let Some(t) = touch else { return (attr, false) };
    if !had_first {
        let _ = Reflect::set(&attr, &"first".into(), &t);
    }
    let _ = Reflect::set(&attr, &"last".into(), &t);
    (attr, true)
}
