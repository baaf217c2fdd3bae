//! This tab's `seq` stream among the site's open tabs: the list of live tabs in localStorage
//! (a duplicated tab or a page back from the bfcache begins a stream of its own: `shown`).

use js_sys::Array;
use wasm_bindgen::prelude::*;

use crate::*;

/// The streams of the site's live tabs (localStorage `trueup.tabs`, a JSON array): a tab adds
/// its own when it starts (with consent) and takes it off at `pagehide`.
pub(crate) fn live_tabs(host: &Host) -> Array {
    match parse(&host.load(false, "tabs")) {
        Ok(v) if Array::is_array(&v) => v.unchecked_into(),
        _ => Array::new(),
    }
}

#[wasm_bindgen]
impl Core {
    /// Back from the back/forward cache: the pages shown in this tab meanwhile went on with its
    /// stream, so this page begins a new one (what they numbered is not known for sure here:
    /// their storage writes reach this page's process asynchronously).
    pub fn shown(&mut self) {
        if self.claimed {
            return;
        }
        self.stream = self.host.uuid();
        self.seq = 0.0;
        self.device_stream = join(&self.device, &self.stream, ".");
        self.refresh();
        self.save_identity();
    }
}

impl Core {
    /// Takes this tab's stream off the list of live tabs.
    pub(crate) fn release(&mut self) {
        if !core::mem::take(&mut self.claimed) {
            return;
        }
        let live = live_tabs(&self.host);
        let at = live.index_of(&self.stream, 0);
        if at >= 0 {
            let at = at as u32;
            let rest = live.slice(at + 1, live.length());
            self.keep(false, "tabs", &live.slice(0, at).concat(&rest));
        }
    }
}
