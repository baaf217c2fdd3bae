//! The shop's system of record: users (with the attribution they arrived with) and orders,
//! in one SQLite file.
//!
//! The schema is a contract: reconciliation queries it as is (`substr(created_at, 1, 10)` is
//! the UTC day, `attribution_known = 0` marks the unknown share). Writes happen in one
//! transaction each; an order is unique by the idempotency key the page sends, so a retried
//! checkout finds the order its first attempt created instead of creating another.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::attribution;

/// The tables, created when missing.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
  id TEXT PRIMARY KEY,
  email TEXT NOT NULL UNIQUE,
  anon_id TEXT,
  plan TEXT NOT NULL,
  created_at TEXT NOT NULL,
  attribution TEXT,
  ft_source TEXT, ft_medium TEXT, ft_campaign TEXT, ft_click_id TEXT, ft_referrer TEXT, ft_landing TEXT,
  lt_source TEXT, lt_medium TEXT, lt_campaign TEXT, lt_click_id TEXT, lt_referrer TEXT, lt_landing TEXT,
  attribution_known INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
  id TEXT PRIMARY KEY,
  user_id TEXT NOT NULL REFERENCES users(id),
  idempotency_key TEXT NOT NULL UNIQUE,
  amount_cents INTEGER NOT NULL,
  currency TEXT NOT NULL,
  created_at TEXT NOT NULL
);
";

/// The database, shared by the handlers. One connection: the demo's writes are few, and
/// one writer at a time is what SQLite does anyway.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    /// Opens (or creates) the file, its directory and the tables.
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection, on the blocking pool.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> T {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut conn)
        })
        .await
        .expect("database work does not panic")
    }
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Another user has this email.
    #[error("email already registered")]
    EmailTaken,
    /// The order's user does not exist.
    #[error("unknown user")]
    UnknownUser,
    /// The idempotency key belongs to a different order (other user, amount or currency).
    #[error("idempotency key used for a different order")]
    KeyReused,
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// A user to insert.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// UUID.
    pub id: String,
    /// Normalised (trimmed, lowercase).
    pub email: String,
    /// The agent's anonymous id, when the page sent it.
    pub anon_id: Option<String>,
    /// The plan chosen at signup.
    pub plan: String,
    /// RFC 3339 UTC with ms.
    pub created_at: String,
    /// What the page said about how the visitor arrived.
    pub attribution: attribution::Stored,
}

/// Inserts `user` in one transaction.
pub fn insert_user(conn: &mut Connection, user: &NewUser) -> Result<(), DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (f, l) = (&user.attribution.first, &user.attribution.last);
    let inserted = tx.execute(
        "INSERT INTO users (id, email, anon_id, created_at, attribution,
            ft_source, ft_medium, ft_campaign, ft_click_id, ft_referrer, ft_landing,
            lt_source, lt_medium, lt_campaign, lt_click_id, lt_referrer, lt_landing,
            attribution_known, plan)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)
         ON CONFLICT (email) DO NOTHING",
        params![
            user.id,
            user.email,
            user.anon_id,
            user.created_at,
            user.attribution.raw,
            f.source,
            f.medium,
            f.campaign,
            f.click_id,
            f.referrer,
            f.landing,
            l.source,
            l.medium,
            l.campaign,
            l.click_id,
            l.referrer,
            l.landing,
            user.attribution.known,
            user.plan,
        ],
    )?;
    if inserted == 0 {
        return Err(DbError::EmailTaken);
    }
    tx.commit()?;
    Ok(())
}

/// The columns [`order_of_row`] reads, in its order.
const ORDER_COLUMNS: &str =
    "SELECT o.id, o.user_id, o.amount_cents, o.currency, o.created_at, u.anon_id
     FROM orders o JOIN users u ON u.id = o.user_id";

/// An [`Order`] from a row of [`ORDER_COLUMNS`].
fn order_of_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Order> {
    Ok(Order {
        id: r.get(0)?,
        user_id: r.get(1)?,
        amount_cents: r.get(2)?,
        currency: r.get(3)?,
        created_at: r.get(4)?,
        anon_id: r.get(5)?,
    })
}

/// A stored user, as the `signup_completed` event describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signup {
    /// UUID.
    pub id: String,
    /// The agent's anonymous id, if known.
    pub anon_id: Option<String>,
    /// The plan chosen.
    pub plan: String,
    /// RFC 3339 UTC with ms.
    pub created_at: String,
}

/// Users and orders created at or after `since` (RFC 3339), oldest first, at most `limit`
/// of each: the facts to emit again at start, in case an emit was lost.
pub fn recent_facts(
    conn: &Connection,
    since: &str,
    limit: usize,
) -> Result<(Vec<Signup>, Vec<Order>), DbError> {
    let mut users = conn.prepare(
        "SELECT id, anon_id, plan, created_at FROM users WHERE created_at >= ?1
         ORDER BY created_at LIMIT ?2",
    )?;
    let signups = users
        .query_map(params![since, limit as i64], |r| {
            Ok(Signup {
                id: r.get(0)?,
                anon_id: r.get(1)?,
                plan: r.get(2)?,
                created_at: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut orders = conn.prepare(&format!(
        "{ORDER_COLUMNS} WHERE o.created_at >= ?1 ORDER BY o.created_at LIMIT ?2"
    ))?;
    let orders = orders
        .query_map(params![since, limit as i64], order_of_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((signups, orders))
}

/// An order to create, unless its idempotency key already has one.
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// UUID for a new order.
    pub id: String,
    /// The buyer.
    pub user_id: String,
    /// Sent by the page; the same for every retry of one checkout.
    pub idempotency_key: String,
    /// Amount in the currency's minor unit.
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// RFC 3339 UTC with ms.
    pub created_at: String,
}

/// A stored order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// UUID.
    pub id: String,
    /// The buyer.
    pub user_id: String,
    /// Amount in the currency's minor unit.
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// RFC 3339 UTC with ms.
    pub created_at: String,
    /// The buyer's anonymous id at signup, if known.
    pub anon_id: Option<String>,
}

/// The order of `new.idempotency_key`: created now (`true`) or found (`false`).
pub fn find_or_create_order(
    conn: &mut Connection,
    new: &NewOrder,
) -> Result<(Order, bool), DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let existing = tx
        .query_row(
            &format!("{ORDER_COLUMNS} WHERE o.idempotency_key = ?1"),
            [&new.idempotency_key],
            order_of_row,
        )
        .optional()?;
    if let Some(order) = existing {
        let same = order.user_id == new.user_id
            && order.amount_cents == new.amount_cents
            && order.currency == new.currency;
        return if same {
            Ok((order, false))
        } else {
            Err(DbError::KeyReused)
        };
    }
    let anon_id: Option<String> = tx
        .query_row(
            "SELECT anon_id FROM users WHERE id = ?1",
            [&new.user_id],
            |r| r.get(0),
        )
        .optional()?
        .ok_or(DbError::UnknownUser)?;
    tx.execute(
        "INSERT INTO orders (id, user_id, idempotency_key, amount_cents, currency, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            new.id,
            new.user_id,
            new.idempotency_key,
            new.amount_cents,
            new.currency,
            new.created_at
        ],
    )?;
    tx.commit()?;
    Ok((
        Order {
            id: new.id.clone(),
            user_id: new.user_id.clone(),
            amount_cents: new.amount_cents,
            currency: new.currency.clone(),
            created_at: new.created_at.clone(),
            anon_id,
        },
        true,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn
    }

    fn user(id: &str, email: &str) -> NewUser {
        NewUser {
            id: id.into(),
            email: email.into(),
            anon_id: Some("anon-1".into()),
            plan: "pro".into(),
            created_at: "2026-11-28T10:00:00.123Z".into(),
            attribution: attribution::Stored::default(),
        }
    }

    fn order(key: &str, amount: i64) -> NewOrder {
        NewOrder {
            id: format!("order-for-{key}-{amount}"),
            user_id: "u-1".into(),
            idempotency_key: key.into(),
            amount_cents: amount,
            currency: "EUR".into(),
            created_at: "2026-11-28T10:01:00.000Z".into(),
        }
    }

    #[test]
    fn an_email_is_registered_once() {
        let mut conn = db();
        insert_user(&mut conn, &user("u-1", "a@shop.example")).unwrap();
        assert!(matches!(
            insert_user(&mut conn, &user("u-2", "a@shop.example")),
            Err(DbError::EmailTaken)
        ));
        let n: i64 = conn
            .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn a_key_creates_one_order_and_finds_it_again() {
        let mut conn = db();
        insert_user(&mut conn, &user("u-1", "a@shop.example")).unwrap();
        let (first, created) = find_or_create_order(&mut conn, &order("k-1", 4950)).unwrap();
        assert!(created);
        assert_eq!(first.anon_id.as_deref(), Some("anon-1"));
        let mut retry = order("k-1", 4950);
        retry.id = "another-id".into();
        retry.created_at = "2026-11-28T10:02:00.000Z".into();
        let (again, created) = find_or_create_order(&mut conn, &retry).unwrap();
        assert!(!created);
        assert_eq!(
            again, first,
            "the retry gets the first order, its id and time"
        );
        assert!(matches!(
            find_or_create_order(&mut conn, &order("k-1", 100)),
            Err(DbError::KeyReused)
        ));
        let mut stranger = order("k-2", 100);
        stranger.user_id = "nobody".into();
        assert!(matches!(
            find_or_create_order(&mut conn, &stranger),
            Err(DbError::UnknownUser)
        ));
        let n: i64 = conn
            .query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }
}
