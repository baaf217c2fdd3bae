//! The visitor's identity and session: the ids every event carries (`refresh`), kept in
//! localStorage with consent (`save_identity`), and `identify`/`reset`.

use js_sys::Object;
use wasm_bindgen::prelude::*;

use crate::*;

/// The stored session and its last activity (localStorage `trueup.sess`, "<session> <last
/// activity>"), or undefined and 0.
pub(crate) fn stored_session(host: &Host) -> (JsValue, f64) {
    match host.load(false, "sess").dyn_ref::<js_sys::JsString>() {
        Some(s) => {
            let parts = s.split(" ");
            (parts.get(0), parts.get(1).unchecked_into_f64())
        }
        None => (JsValue::UNDEFINED, 0.0),
    }
}

#[wasm_bindgen]
impl Core {
    /// `identify(user, traits)`: the visitor is `user` (a string, else nothing happens) from
    /// now on, kept with the identity; an `identify` event carries `traits` (an object).
    pub fn identify(&mut self, user: JsValue, traits: JsValue, ctx: &JsValue) {
        if !user.is_string() {
            return;
        }
        self.user = user;
        self.refresh();
        self.save_identity();
        let props: JsValue = Object::new().into();
        if traits.is_object() {
            set(&props, "traits", &traits);
        }
        self.event(&"identify".into(), "identify/1", props, ctx);
    }

    /// `reset()` (a logout): no user, a new visitor id and session from now on.
    pub fn reset(&mut self) {
        self.user = JsValue::UNDEFINED;
        self.anon = self.host.uuid();
        self.session = self.host.uuid();
        self.refresh();
        self.save_identity();
    }
}

impl Core {
    /// Remakes the identity and context objects every event carries.
    pub(crate) fn refresh(&mut self) {
        let ids: JsValue = Object::new().into();
        set(&ids, "anon_id", &self.anon);
        if !self.user.is_undefined() {
            set(&ids, "user_id", &self.user);
        }
        set(&ids, "session_id", &self.session);
        set(&ids, "device_id", &self.device_stream);
        self.ids = ids;
        let extra: JsValue = Object::new().into();
        if !self.attribution.is_undefined() {
            set(&extra, "attribution", &self.attribution);
        }
        if self.memory {
            set(&extra, "degraded", &"memory_queue".into());
        }
        self.extra = extra;
    }

    /// Keeps the identity in localStorage (only with consent): device, visitor, user,
    /// session and attribution.
    pub(crate) fn save_identity(&mut self) {
        if self.consent != Consent::Granted {
            return;
        }
        if !self.claimed {
            self.claimed = true;
            self.keep(true, "tab", &self.stream);
            let live = live_tabs(&self.host);
            live.push(&self.stream);
            // Bounded: a tab that crashed never takes its stream off the list.
            let n = live.length();
            let live = if n > 50 { live.slice(n - 50, n) } else { live };
            self.keep(false, "tabs", &live);
        }
        self.keep(false, "dev", &self.device);
        self.keep(false, "anon", &self.anon);
        self.keep(false, "user", &self.user);
        self.keep(
            false,
            "sess",
            &join(&self.session, &self.session_last.into(), " "),
        );
        if self.attribution.is_object() {
            self.keep(false, "attr", &self.attribution);
        }
    }
}
