//! Event ids derived from idempotency keys, for events emitted by systems of record.
//!
//! A browser event gets a random UUIDv7 when `track()` is called and keeps it through every
//! retry. A backend cannot do that: a checkout retried by the user, a job replayed after a
//! crash or a fact re-emitted at start-up runs the code that builds the event again, from
//! scratch. So the id of a server event is *derived* from what identifies the business fact —
//! an idempotency key (the order's id, the user's id) and the fact's own time (the
//! `created_at` stored with it) — and every run that emits the same fact produces the same
//! id, which the relay stores once.
//!
//! The id is still a valid UUIDv7, so it passes the relay's validation and sorts by time like
//! any other: the 48-bit Unix-millisecond timestamp is the fact's time, and the 74 bits a
//! UUIDv7 leaves random are taken from SHA-256 of `site \0 name \0 key`. The separators keep
//! `("ab", "c")` and `("a", "bc")` apart (site keys and event names never contain NUL).
//!
//! What this does and does not promise:
//! - Same `(site, name, key, ts_ms)`, same id, on every platform and in every version of this
//!   crate: the derivation is part of the wire contract (changing it would make facts
//!   re-emitted across an upgrade count twice).
//! - A different key, name or site gives an unrelated id (up to a 2⁻⁷⁴ collision between
//!   facts that share a millisecond).
//! - The time is part of the id: the caller must pass the fact's stored time, not "now", or a
//!   retry a millisecond later is a new event.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The largest timestamp a UUIDv7 can hold (48 bits of milliseconds, year 10889).
const MAX_TS_MS: i64 = (1 << 48) - 1;

/// The UUIDv7 of the fact `(site, name, key)` that happened at `ts_ms` (milliseconds since
/// the Unix epoch; clamped to the 48 bits a UUIDv7 holds, so negative times map to 0).
///
/// ```
/// let a = trueup_protocol::id_for_key("shop", "order_paid", "order-81f2", 1_764_324_000_123);
/// let b = trueup_protocol::id_for_key("shop", "order_paid", "order-81f2", 1_764_324_000_123);
/// assert_eq!(a, b);
/// assert_eq!(a.get_version_num(), 7);
/// ```
pub fn id_for_key(site: &str, name: &str, key: &str, ts_ms: i64) -> Uuid {
    let digest = Sha256::new()
        .chain_update(site.as_bytes())
        .chain_update([0u8])
        .chain_update(name.as_bytes())
        .chain_update([0u8])
        .chain_update(key.as_bytes())
        .finalize();
    let ts = ts_ms.clamp(0, MAX_TS_MS).to_be_bytes();
    let mut b = [0u8; 16];
    // 48-bit big-endian timestamp (the low 6 bytes of the i64).
    b[..6].copy_from_slice(&ts[2..]);
    b[6..].copy_from_slice(&digest[..10]);
    // Version 7 in the high nibble of byte 6, variant 0b10 in the high bits of byte 8.
    b[6] = 0x70 | (b[6] & 0x0f);
    b[8] = 0x80 | (b[8] & 0x3f);
    Uuid::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: i64 = 1_764_324_000_123; // 2025-11-28T10:00:00.123Z

    fn ts_of(id: Uuid) -> i64 {
        let b = id.as_bytes();
        b[..6]
            .iter()
            .fold(0i64, |acc, x| (acc << 8) | i64::from(*x))
    }

    #[test]
    fn stable_across_calls() {
        let a = id_for_key("demo", "order_paid", "o-1", TS);
        assert_eq!(a, id_for_key("demo", "order_paid", "o-1", TS));
        // Pinned (computed independently: Python's hashlib and uuid): the derivation is part
        // of the wire contract and must never change.
        assert_eq!(a.to_string(), "019ac9e7-c17b-74c3-95bf-aad8e3ef740b");
    }

    #[test]
    fn is_a_uuidv7_of_the_rfc_variant_carrying_the_time() {
        for (i, ts) in [0, 1, TS, MAX_TS_MS].into_iter().enumerate() {
            let id = id_for_key("demo", "signup_completed", &format!("user-{i}"), ts);
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_version(), Some(uuid::Version::SortRand));
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(ts_of(id), ts);
        }
    }

    #[test]
    fn out_of_range_times_are_clamped() {
        assert_eq!(ts_of(id_for_key("s", "n", "k", -5)), 0);
        assert_eq!(ts_of(id_for_key("s", "n", "k", i64::MAX)), MAX_TS_MS);
    }

    #[test]
    fn differs_by_key_name_site_and_time() {
        let base = id_for_key("demo", "order_paid", "o-1", TS);
        for other in [
            id_for_key("demo", "order_paid", "o-2", TS),
            id_for_key("demo", "order_refunded", "o-1", TS),
            id_for_key("other", "order_paid", "o-1", TS),
            id_for_key("demo", "order_paid", "o-1", TS + 1),
        ] {
            assert_ne!(base, other);
        }
        // The separators keep the parts apart.
        assert_ne!(
            id_for_key("ab", "c", "k", TS),
            id_for_key("a", "bc", "k", TS)
        );
        assert_ne!(
            id_for_key("s", "ab", "c", TS),
            id_for_key("s", "a", "bc", TS)
        );
    }

    #[test]
    fn the_relay_accepts_it_as_an_event_id() {
        // The relay's validation demands a lowercase hyphenated UUIDv7 string.
        let id = id_for_key("demo", "order_paid", "o-1", TS);
        let text = id.to_string();
        assert_eq!(text, text.to_lowercase());
        assert_eq!(Uuid::parse_str(&text).unwrap(), id);
    }
}
