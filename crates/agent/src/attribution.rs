//! Attribution: how a visitor arrived (UTM parameters, click ids, an external referrer),
//! captured first-touch and last-touch.
//!
//! A page load is a *touch* when its URL has a campaign parameter or a click id, or when its
//! referrer is another site. The first touch is kept forever; the last touch is replaced by
//! each new touch. A new touch also starts a new session. Touches are plain JS objects with
//! the field names of `trueup_protocol::Touch` (built with js-sys, not serde, for size).

use js_sys::Object;
use wasm_bindgen::prelude::*;

use crate::{get, set};

#[wasm_bindgen]
extern "C" {
    // The few parts of the URL API needed here (web-sys's bindings are larger).
    #[wasm_bindgen(js_name = URL)]
    type Url;
    #[wasm_bindgen(constructor, catch, js_class = URL)]
    fn new(url: &JsValue) -> Result<Url, JsValue>;
    #[wasm_bindgen(method, getter)]
    fn host(this: &Url) -> JsValue;
    #[wasm_bindgen(method, getter, js_name = searchParams)]
    fn search_params(this: &Url) -> SearchParams;
    type SearchParams;
    #[wasm_bindgen(method)]
    fn get(this: &SearchParams, name: &str) -> JsValue;
}

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

/// The touch of a page load (its URL and referrer, strings), if it is one.
pub fn touch_of(href: &JsValue, referrer: &JsValue, now: f64) -> Option<JsValue> {
    let url = Url::new(href).ok()?;
    let params = url.search_params();
    let touch: JsValue = Object::new().into();
    let mut campaign = false;
    for key in PARAMS {
        let v = params.get(key);
        if v.is_truthy() {
            set(&touch, key, &v);
            campaign = true;
        }
    }
    let external = Url::new(referrer).is_ok_and(|r| r.host() != url.host());
    if !campaign && !external {
        return None;
    }
    if external {
        set(&touch, "referrer", referrer);
    }
    set(&touch, "landing_page", href);
    set(&touch, "ts", &now.into());
    Some(touch)
}

/// Applies a page load's touch to the stored `{first, last}`; returns the new attribution
/// object and whether there was a touch (a new campaign).
pub fn apply(stored: &JsValue, touch: Option<JsValue>) -> (JsValue, bool) {
    let attr: JsValue = Object::new().into();
    let first = get(stored, "first");
    let last = get(stored, "last");
    let had_first = first.is_object();
    if had_first {
        set(&attr, "first", &first);
    }
    if last.is_object() {
        set(&attr, "last", &last);
    }
    let Some(t) = touch else { return (attr, false) };
    if !had_first {
        set(&attr, "first", &t);
    }
    set(&attr, "last", &t);
    (attr, true)
}
