//! The two ingest endpoints: browser batches (anonymous, bound to a site key and its
//! Origins) and server batches (authenticated with a site's secret).
//!
//! Every bound is checked before the data it bounds is allocated: the shutdown flag and the
//! IP's rate limit before the body is read, `Content-Length` before any byte, a streamed cap
//! while reading, a cap on the decompressed size, an event count that stops keeping events
//! past the limit, then per-event size and depth. Bad requests get a 4xx with a reason and
//! change nothing; a batch gets its 200 only after the spool has fsync'd it.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use trueup_protocol::{
    BatchResponse, EventResult, EventStatus, Limits, PROTOCOL_VERSION, RawBatch, SchemaRegistry,
    Source, validate_event,
};

use crate::api::ApiError;
use crate::config::{Config, SiteConfig};
use crate::limiters::Limiters;
use crate::spool::{Admission, DeadLetter, NewEvent, Spool, SpoolError};
use crate::time::now_ms;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The effective configuration.
    pub cfg: Arc<Config>,
    /// Known schemas.
    pub registry: Arc<SchemaRegistry>,
    /// Per-event limits.
    pub limits: Limits,
    /// The durable spool.
    pub spool: Arc<Spool>,
    /// Rate limiters.
    pub limiters: Arc<Limiters>,
    /// Sites by key.
    pub sites: Arc<HashMap<String, SiteConfig>>,
    /// Set when shutdown starts: new batches get 503.
    pub shutting_down: Arc<AtomicBool>,
    /// Fault injection (tests only); `None` when off.
    pub faults: Option<Arc<Faults>>,
    /// KiB of request bodies being read at once (`limits.max_inflight_body_bytes`).
    pub body_budget: Arc<tokio::sync::Semaphore>,
}

/// The permits of [`AppState::body_budget`] for `limits.max_inflight_body_bytes` (1 per KiB).
pub fn body_budget(cfg: &Config) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        cfg.limits.max_inflight_body_bytes.div_ceil(1024),
    ))
}

/// Seeded fault decisions (see [`crate::config::FaultsConfig`]).
pub struct Faults {
    cfg: crate::config::FaultsConfig,
    rng: std::sync::Mutex<rand::rngs::StdRng>,
}

impl Faults {
    /// `None` when every ratio is 0.
    pub fn new(cfg: &crate::config::FaultsConfig) -> Option<Arc<Faults>> {
        use rand::SeedableRng;
        (cfg.fail_ratio > 0.0 || cfg.ack_lost_ratio > 0.0).then(|| {
            Arc::new(Faults {
                cfg: cfg.clone(),
                rng: std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(cfg.seed)),
            })
        })
    }

    fn roll(&self, ratio: f64) -> bool {
        use rand::Rng;
        ratio > 0.0
            && self
                .rng
                .lock()
                .map(|mut r| r.random_bool(ratio.min(1.0)))
                .unwrap_or(false)
    }
}

/// Query parameters of the ingest endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestParams {
    /// `gzip` when the body is gzip-compressed (sendBeacon cannot set Content-Encoding).
    #[serde(default)]
    z: Option<String>,
}

/// `POST <prefix>/<collect_path>`: a browser batch.
pub async fn collect(
    State(st): State<AppState>,
    req: Request,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Some(faults) = st.faults.clone() else {
        return Ok(ingest(st, Source::Client, req).await?.into_response());
    };
    if faults.roll(faults.cfg.fail_ratio) {
        metrics::counter!("trueup_faults_injected_total", "kind" => "fail").increment(1);
        return Err(ApiError::Unavailable {
            code: "fault_injected",
            retry_after: 1,
        });
    }
    let answer = ingest(st, Source::Client, req).await?;
    if faults.roll(faults.cfg.ack_lost_ratio) {
        metrics::counter!("trueup_faults_injected_total", "kind" => "ack_lost").increment(1);
        // Stored; now break the connection after the status line: the body stream fails, so
        // the client sees a network error instead of the answer.
        let broken = futures_util::stream::once(async {
            Err::<bytes::Bytes, _>(std::io::Error::other("fault: ack lost"))
        });
        return Ok((
            axum::http::StatusCode::OK,
            axum::body::Body::from_stream(broken),
        )
            .into_response());
    }
    Ok(answer.into_response())
}

/// `POST <prefix>/<server_path>`: a server batch, `Authorization: Bearer <site secret>`.
pub async fn server_events(
    State(st): State<AppState>,
    req: Request,
) -> Result<Json<BatchResponse>, ApiError> {
    ingest(st, Source::Server, req).await
}

/// One batch, read the way a collector reads it: limit → parse → validate → dedupe and store
/// → answer. Each step refuses with a clear error and nothing stored, except the last.
async fn ingest(
    st: AppState,
    source: Source,
    req: Request,
) -> Result<Json<BatchResponse>, ApiError> {
    let (parts, body) = req.into_parts();
    let caller = limit_caller(&st, source, &parts)?;
    let bytes = read_batch_bytes(&st, &parts.headers, body, caller.gzip).await?;
    let batch = parse_batch(&st, &bytes)?;
    let site = admit_site(&st, &caller, &batch, &parts.headers)?;
    let mut checked = validate_batch(&st, source, &site, &batch);
    let counters = counters_of(&batch, &site);
    let admissions = store(&st, source, &mut checked, counters).await?;
    Ok(Json(answer(source, checked, admissions)))
}

/// Who is sending, known before the body is read.
pub(crate) struct Caller {
    peer: IpAddr,
    /// For server batches: the site whose secret was presented.
    server_site: Option<String>,
    pub(crate) gzip: bool,
}

/// Limits that need no body: shutdown, the client IP's rate (browser batches) or the secret
/// (server batches), the query and the content type.
pub(crate) fn limit_caller(
    st: &AppState,
    source: Source,
    parts: &axum::http::request::Parts,
) -> Result<Caller, ApiError> {
    if st.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable {
            code: "shutting_down",
            retry_after: 5,
        });
    }
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let server_site = match source {
        Source::Client => {
            st.limiters
                .check_ip(st.limiters.client_ip(peer, &parts.headers))?;
            None
        }
        Source::Server => Some(authenticate(st, &parts.headers)?),
    };
    let Query(params) = Query::<IngestParams>::try_from_uri(&parts.uri)
        .map_err(|e| ApiError::bad("bad_query", e.body_text()))?;
    check_content_type(&parts.headers)?;
    let gzip = match params.z.as_deref() {
        None => is_gzip_encoded(&parts.headers)?,
        Some("gzip") => true,
        Some(other) => {
            return Err(ApiError::bad(
                "bad_query",
                format!("unknown compression z={other:?}; use z=gzip"),
            ));
        }
    };
    Ok(Caller {
        peer,
        server_site,
        gzip,
    })
}

/// The body within its caps, decompressed within the decompressed cap.
pub(crate) async fn read_batch_bytes(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
    gzip: bool,
) -> Result<Vec<u8>, ApiError> {
    let raw = read_body(body, headers, &st.cfg, &st.body_budget).await?;
    if gzip {
        gunzip(&raw, st.cfg.limits.max_decompressed_bytes)
    } else {
        Ok(raw.to_vec())
    }
}

/// The batch's header parsed, its events kept raw and counted against the limit.
pub(crate) fn parse_batch<'a>(st: &AppState, bytes: &'a [u8]) -> Result<RawBatch<'a>, ApiError> {
    let batch: RawBatch = serde_json::from_slice(bytes).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            ApiError::bad("too_deep", "the batch nests too deeply to parse")
        } else {
            ApiError::bad("malformed_batch", format!("not a valid batch: {e}"))
        }
    })?;
    if batch.v != PROTOCOL_VERSION {
        return Err(ApiError::bad(
            "unsupported_version",
            format!(
                "batch v={} is not supported; this relay speaks v{PROTOCOL_VERSION}",
                batch.v
            ),
        ));
    }
    let max = st.cfg.limits.max_events_per_batch;
    if batch.events.total > max {
        return Err(ApiError::too_large(
            "too_many_events",
            format!("{} events in one batch, limit {max}", batch.events.total),
        ));
    }
    Ok(batch)
}

/// The batch's site: the authenticated one (server), or a known key sent from an allowed
/// Origin (browser); then the site's rate and the spool's room.
pub(crate) fn admit_site(
    st: &AppState,
    caller: &Caller,
    batch: &RawBatch,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let site = match (&caller.server_site, &batch.site) {
        (Some(authed), Some(claimed)) if authed != claimed => {
            return Err(ApiError::forbidden(
                "wrong_site",
                "the secret does not belong to the batch's site",
            ));
        }
        (Some(authed), _) => authed.clone(),
        (None, None) => {
            return Err(ApiError::forbidden(
                "unknown_site",
                "the batch has no site key",
            ));
        }
        (None, Some(key)) => {
            let site = st
                .sites
                .get(key)
                .ok_or_else(|| ApiError::forbidden("unknown_site", "unknown site key"))?;
            check_origin(site, headers, st.limiters.is_trusted_peer(caller.peer))?;
            key.clone()
        }
    };
    st.limiters.check_site(&site)?;
    if st.spool.stats().bytes.load(Ordering::Relaxed) > st.cfg.spool.max_bytes {
        return Err(ApiError::Unavailable {
            code: "spool_full",
            retry_after: 10,
        });
    }
    Ok(site)
}

/// Each event validated on its own: the valid ones to store, the others answered
/// `rejected` and kept as dead letters.
pub(crate) struct Checked {
    /// Per event in batch order; `None` until the spool has answered for it.
    results: Vec<Option<EventResult>>,
    /// The valid events (taken by [`store`]).
    pub(crate) fresh: Vec<NewEvent>,
    /// The id, batch position and capture time of each valid event.
    fresh_ids: Vec<(uuid::Uuid, usize, i64)>,
    dead: Vec<DeadLetter>,
}

pub(crate) fn validate_batch(
    st: &AppState,
    source: Source,
    site: &str,
    batch: &RawBatch,
) -> Checked {
    let n = batch.events.items.len();
    metrics::counter!("trueup_events_received_total", "source" => source.as_str())
        .increment(n as u64);
    let now = now_ms();
    let mut c = Checked {
        results: vec![None; n],
        fresh: Vec::with_capacity(n),
        fresh_ids: Vec::with_capacity(n),
        dead: Vec::new(),
    };
    for (i, raw) in batch.events.items.iter().enumerate() {
        match validate_event(raw.get(), source, now, &st.registry, &st.limits) {
            Ok(event) => {
                c.fresh.push(NewEvent {
                    id: event.id,
                    site: site.to_string(),
                    body: raw.get().to_string(),
                });
                c.fresh_ids.push((event.id, i, event.ts));
            }
            Err(rej) => {
                metrics::counter!("trueup_events_rejected_total", "reason" => rej.reason.as_str())
                    .increment(1);
                c.dead.push(DeadLetter {
                    stage: "ingest",
                    sink: None,
                    site: Some(site.to_string()),
                    reason: rej.reason.as_str().to_string(),
                    detail: rej.detail.clone(),
                    event_id: rej.id,
                    raw: raw.get().to_string(),
                });
                c.results[i] = Some(EventResult {
                    id: rej.id,
                    status: EventStatus::Rejected {
                        reason: rej.reason,
                        detail: rej.detail,
                    },
                });
            }
        }
    }
    c
}

/// The agent's counters to spool with the batch, unless their device id is unusable.
pub(crate) fn counters_of(batch: &RawBatch, site: &str) -> Option<(String, String)> {
    let c = batch.counters.as_ref()?;
    if c.device_id.is_empty() || c.device_id.len() > 200 {
        metrics::counter!("trueup_counters_ignored_total").increment(1);
        return None;
    }
    serde_json::to_string(c)
        .ok()
        .map(|json| (site.to_string(), json))
}

/// Dedupes and stores the valid events, the counters and the dead letters in one durable
/// transaction (shared with other requests). Returns, per valid event, whether it was new.
async fn store(
    st: &AppState,
    source: Source,
    checked: &mut Checked,
    counters: Option<(String, String)>,
) -> Result<Vec<Admission>, ApiError> {
    st.spool
        .write(
            source.as_str(),
            std::mem::take(&mut checked.fresh),
            counters,
            std::mem::take(&mut checked.dead),
        )
        .await
        .map_err(|e| match e {
            SpoolError::Closed => ApiError::Unavailable {
                code: "shutting_down",
                retry_after: 5,
            },
            SpoolError::Storage(_) => ApiError::Unavailable {
                code: "storage_unavailable",
                retry_after: 10,
            },
            SpoolError::Full(_) => ApiError::Unavailable {
                code: "storage_full",
                retry_after: 30,
            },
        })
}

/// The per-event answer, in batch order.
pub(crate) fn answer(
    source: Source,
    checked: Checked,
    admissions: Vec<Admission>,
) -> BatchResponse {
    let Checked {
        mut results,
        fresh_ids,
        ..
    } = checked;
    let now = now_ms();
    let lag = metrics::histogram!("trueup_pipeline_lag_seconds", "stage" => "capture_to_accepted");
    for ((id, i, ts), adm) in fresh_ids.into_iter().zip(admissions) {
        let status = match adm {
            Admission::New => {
                lag.record((now - ts).max(0) as f64 / 1000.0);
                EventStatus::Accepted
            }
            Admission::Duplicate => EventStatus::Duplicate,
        };
        results[i] = Some(EventResult {
            id: Some(id),
            status,
        });
    }
    let mut response = BatchResponse::default();
    for r in results.into_iter().flatten() {
        response.push(r);
    }
    let label = source.as_str();
    metrics::counter!("trueup_events_accepted_total", "source" => label)
        .increment(response.accepted.into());
    metrics::counter!("trueup_events_duplicate_total", "source" => label)
        .increment(response.duplicate.into());
    response
}

/// The site whose server secret the request presents.
fn authenticate(st: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?
        .trim()
        .as_bytes();
    // Compare against every secret without an early exit, so timing reveals nothing.
    let mut found = None;
    for site in st.sites.values() {
        for secret in &site.server_secrets {
            if bool::from(secret.as_bytes().ct_eq(presented)) {
                found = Some(site.key.clone());
            }
        }
    }
    found.ok_or(ApiError::Unauthorized)
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match ct.as_str() {
        "text/plain" | "application/json" | "" => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType),
    }
}

fn is_gzip_encoded(headers: &HeaderMap) -> Result<bool, ApiError> {
    match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => Ok(false),
        Some(e) if e == "gzip" => Ok(true),
        Some(e) if e == "identity" => Ok(false),
        Some(e) => Err(ApiError::bad(
            "unsupported_encoding",
            format!("Content-Encoding {e:?} is not supported; use gzip"),
        )),
    }
}

async fn read_body(
    body: Body,
    headers: &HeaderMap,
    cfg: &Config,
    budget: &tokio::sync::Semaphore,
) -> Result<bytes::Bytes, ApiError> {
    let max = cfg.limits.max_body_bytes;
    let mut declared = None;
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ApiError::bad("bad_content_length", "Content-Length is not a number"))?;
        if len > max as u64 {
            return Err(ApiError::too_large(
                "body_too_large",
                format!("body of {len} bytes, limit {max}"),
            ));
        }
        declared = Some(len as usize);
    }
    // Room for this body among those being read at once (slow senders hold theirs until the
    // request's deadline): what it declared, or the most it may be. None left: 503, retry.
    let kib = u32::try_from(declared.unwrap_or(max).div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let Ok(_room) = budget.try_acquire_many(kib) else {
        metrics::counter!("trueup_body_budget_exhausted_total").increment(1);
        return Err(ApiError::Unavailable {
            code: "busy",
            retry_after: 1,
        });
    };
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::too_large(
            "body_too_large",
            format!("body over the limit of {max} bytes"),
        )),
        Err(e) => Err(ApiError::bad(
            "body_unreadable",
            format!("the body could not be read: {e}"),
        )),
    }
}

fn gunzip(raw: &[u8], max: usize) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(max));
    flate2::read::GzDecoder::new(raw)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::bad("bad_gzip", format!("the body is not valid gzip: {e}")))?;
    if out.len() > max {
        return Err(ApiError::too_large(
            "decompressed_too_large",
            format!("decompressed body over the limit of {max} bytes"),
        ));
    }
    Ok(out)
}

fn check_origin(
    site: &SiteConfig,
    headers: &HeaderMap,
    trusted_peer: bool,
) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        // Not a browser request (or a very old browser); the site key still binds it.
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if site.origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
        return Ok(());
    }
    if site.allow_same_origin {
        let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("");
        let host = trusted_peer
            .then(|| headers.get("x-forwarded-host"))
            .flatten()
            .or_else(|| headers.get(header::HOST))
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !authority.is_empty() && authority.eq_ignore_ascii_case(host) {
            return Ok(());
        }
    }
    Err(ApiError::forbidden(
        "origin_not_allowed",
        format!("origin {origin:?} is not allowed for this site"),
    ))
}
