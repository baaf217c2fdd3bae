//! The relay behind the shop's own domain: every request under `/_r/` is forwarded to the
//! relay, as a Next.js rewrite or an nginx `location /_r/ { proxy_pass … }` would. The
//! browser only ever talks to the shop's origin, so filter lists that block analytics hosts
//! see nothing to block.
//!
//! What is forwarded: the method, path and query, the body, and the end-to-end headers
//! (`Origin`, `Content-Type`, `Content-Encoding`, `Authorization`, caching validators, …).
//! Hop-by-hop headers, `Host` and cookies are not (the relay needs none of them). The proxy
//! adds `X-Forwarded-For` (the client's address appended), `X-Forwarded-Host` (the `Host` the
//! browser used, so the relay's same-origin check compares against the shop's origin) and
//! `X-Forwarded-Proto`; the relay honours them only from addresses in its
//! `rate_limit.trusted_proxies`.
//!
//! Bodies are buffered with caps (batches are small; the agent's files are a few hundred KiB):
//! a request body over [`MAX_REQUEST_BYTES`] is answered 413 without contacting the relay,
//! an answer over [`MAX_RESPONSE_BYTES`] or a relay that cannot be reached is answered 502.
//! The agent retries 5xx, so a relay restart costs a retry, not an event.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use trueup_protocol::ErrorBody;

use crate::AppState;

/// Largest request body forwarded (the relay's own default limit is 1 MiB).
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;
/// Largest answer relayed back.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1), plus those the
/// proxy sets itself or deliberately keeps from the relay.
const NOT_FORWARDED: [HeaderName; 12] = [
    header::CONNECTION,
    header::HOST,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::COOKIE,
    header::SET_COOKIE,
    HeaderName::from_static("keep-alive"),
];

/// Forwards to the relay.
#[derive(Clone)]
pub struct Proxy {
    http: reqwest::Client,
    /// The relay's base URL, without a trailing `/`.
    relay: String,
}

impl Proxy {
    /// A proxy to the relay at `relay` (e.g. `http://127.0.0.1:8081`).
    pub fn new(relay: &str) -> anyhow::Result<Proxy> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            // The relay's redirects (none today) are the browser's business.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Proxy {
            http,
            relay: relay.trim_end_matches('/').to_string(),
        })
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = ErrorBody {
        error: code.into(),
        message: message.into(),
    };
    (status, axum::Json(body)).into_response()
}

fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let connection_listed = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|n| n.trim().eq_ignore_ascii_case(name.as_str()));
        if !NOT_FORWARDED.contains(name) && !connection_listed {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// `ANY /_r/*`: the request, forwarded to the relay; the relay's answer, forwarded back.
pub async fn forward(State(st): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let too_long = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > MAX_REQUEST_BYTES as u64);
    if too_long {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is too large",
        );
    }
    let body = match to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        // Over the cap while streaming (no Content-Length), or the client went away.
        Err(e) if e.to_string().contains("length limit") => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is too large",
            );
        }
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                "the request body could not be read",
            );
        }
    };

    let mut headers = forwarded(&parts.headers);
    let xff_name = HeaderName::from_static("x-forwarded-for");
    if let Some(ip) = peer {
        let ip = ip.to_string();
        let chain = parts
            .headers
            .get_all(&xff_name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .chain(std::iter::once(ip.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        headers.remove(&xff_name);
        if let Ok(v) = HeaderValue::from_str(&chain) {
            headers.insert(xff_name, v);
        }
    }
    // Only this proxy says which host was asked for; a client's own claim is dropped.
    headers.remove(HeaderName::from_static("x-forwarded-host"));
    if let Some(host) = parts.headers.get(header::HOST) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );

    let path = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let url = format!("{}{path}", st.proxy.relay);
    let upstream = st
        .proxy
        .http
        .request(parts.method, &url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let mut resp = match upstream {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%url, error = %e, "relay unreachable");
            return error(
                StatusCode::BAD_GATEWAY,
                "relay_unreachable",
                "the event relay cannot be reached right now; retry later",
            );
        }
    };
    let status = resp.status();
    let resp_headers = forwarded(resp.headers());
    let mut bytes = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) if bytes.len() + chunk.len() <= MAX_RESPONSE_BYTES => {
                bytes.extend_from_slice(&chunk)
            }
            Ok(Some(_)) => {
                tracing::warn!(%url, "relay answer over the proxy's cap");
                return error(
                    StatusCode::BAD_GATEWAY,
                    "answer_too_large",
                    "the relay's answer is too large",
                );
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%url, error = %e, "relay answer cut off");
                return error(
                    StatusCode::BAD_GATEWAY,
                    "relay_answer_lost",
                    "the relay's answer was cut off; retry",
                );
            }
        }
    }
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    *out.headers_mut() = resp_headers;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_host_and_cookies_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://shop.example"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(header::COOKIE, HeaderValue::from_static("session=secret"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        let out = forwarded(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["origin", "content-type"]);
    }
}
