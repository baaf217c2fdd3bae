//! Consent: nothing stored or sent before it (events held in memory, bounded), the identity
//! kept and shared by the tabs when it is given, forgotten when it is refused.

use wasm_bindgen::prelude::*;

use crate::*;

/// Most events held while consent is pending (`Core::held`).
pub(crate) const HOLD_EVENTS: usize = 1_000;
/// Most bytes (of event JSON) held while consent is pending.
pub(crate) const HOLD_BYTES: f64 = 1_000_000.0;

#[wasm_bindgen]
impl Core {
    /// `consent(granted)`: granted, what was held goes to the queue and the identity is kept;
    /// refused, the identity is forgotten and what is held and queued is dropped (counted
    /// `consent`). Returns the reason to drop everything queued with (opt-out), else undefined.
    /// Stored (`trueup.consent`): the device's, for its other tabs and its next pages.
    pub fn consent(&mut self, granted: bool) -> JsValue {
        let held = core::mem::take(&mut self.held);
        let held_drops = core::mem::take(&mut self.held_drops);
        self.held_bytes = 0.0;
        if granted {
            let mut held = held;
            if self.consent != Consent::Granted {
                self.adopt_stored_identity();
                // Stored and sent nowhere yet: they are this identity's.
                for it in held.iter_mut() {
                    it.record = self.host.restamp(&it.record, &self.ids);
                    it.bytes = num(&get(&it.record, "b"));
                }
            }
            self.consent = Consent::Granted;
            self.save_identity();
            // After the identity: a tab told of the consent (a `storage` event) finds it stored.
            self.keep(false, "consent", &"granted".into());
            self.page.extend(held);
            if held_drops > 0.0 {
                self.drops.push(("queue_full".into(), held_drops, 0));
            }
            return JsValue::UNDEFINED;
        }
        // Opt-out: forget the identity, drop what is held and queued, and count it.
        self.release();
        self.consent = Consent::Denied;
        self.keep(false, "consent", &"denied".into());
        for k in ["dev", "anon", "user", "sess", "attr"] {
            self.keep(false, k, &JsValue::UNDEFINED);
        }
        self.keep(true, "tab", &JsValue::UNDEFINED);
        self.keep(true, "seq", &JsValue::UNDEFINED);
        // This page forgets it too: what it tracks after a later consent is a new device's,
        // with counters of its own (`totals`).
        self.device = self.host.uuid();
        self.anon = self.host.uuid();
        self.user = JsValue::UNDEFINED;
        self.session = self.host.uuid();
        self.attribution = JsValue::UNDEFINED;
        self.stream = self.host.uuid();
        self.seq = 0.0;
        self.device_stream = join(&self.device, &self.stream, ".");
        self.refresh();
        // What was tracked and not written yet is counted too (what was written is the
        // queue's, which the caller clears with the reason returned).
        let unwritten = self.page.iter().filter(|it| it.batch == 0).count();
        self.page.clear();
        let n = (held.len() + unwritten) as f64 + held_drops;
        if !self.open {
            self.unstored_drops += n;
            return JsValue::UNDEFINED;
        }
        if n > 0.0 {
            self.drops.push(("consent".into(), n, 0));
        }
        "consent".into()
    }

    /// Whether consent is granted (events rescued by other tabs are adopted only then).
    #[wasm_bindgen(getter)]
    pub fn granted(&self) -> bool {
        self.consent == Consent::Granted
    }
}

impl Core {
    /// At consent: a tab given consent earlier kept its identity (device, visitor, user,
    /// session); this page takes it, so the site's tabs are one device and one visitor and the
    /// counters add up.
    pub(crate) fn adopt_stored_identity(&mut self) {
        let device = self.host.load(false, "dev");
        if !device.is_string() {
            return;
        }
        self.device = device;
        self.device_stream = join(&self.device, &self.stream, ".");
        let anon = self.host.load(false, "anon");
        if anon.is_string() {
            self.anon = anon;
        }
        let user = self.host.load(false, "user");
        if user.is_string() {
            self.user = user;
        }
        let (session, last) = stored_session(&self.host);
        if session.is_string() {
            self.session = session;
            self.session_last = self.session_last.max(last);
        }
        self.refresh();
    }
}
