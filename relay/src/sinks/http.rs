//! What the HTTP sinks share: one client per sink, how an upstream's answer is read, and
//! delivery in requests that fit the upstream's limits, splitting to isolate what it refuses.
//!
//! Answers: 2xx means the upstream took the request. 408, 425, 429 and 5xx, timeouts and
//! connection failures are temporary: the whole delivery fails and the forwarder retries it
//! later (honouring `Retry-After`). 401, 403 and 404 are temporary too: they mean a wrong key
//! or URL, which an operator fixes; the events wait in the spool meanwhile (and `/sinks` says
//! why) rather than being thrown away. 413 splits the request in two; a single event that is
//! still too large is dead-lettered `too_large`. Any other 4xx also splits, so that the one
//! event the upstream refuses is found and dead-lettered (`rejected_<status>`) and the rest
//! are delivered.
//!
//! A request that was split or retried can reach the upstream twice (a retry after a lost
//! answer, or a delivery retried after part of it was taken): every upstream here dedupes by
//! the event id that each event carries (`uuid`, `messageId`, or the webhook's id).

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use super::SinkError;

/// One record as a sink will send it.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Its spool position.
    pub pos: i64,
    /// Its JSON in the upstream's form.
    pub json: String,
}

/// How an upstream answered one request.
#[derive(Debug)]
pub enum Answer {
    /// It took the request.
    Taken,
    /// Try the whole delivery again later.
    Retry {
        /// What happened (logged, shown in `/sinks`; never a secret or a payload).
        message: String,
        /// The upstream's `Retry-After`.
        after: Option<Duration>,
    },
    /// 413: too large as a whole.
    TooLarge,
    /// Another 4xx: something in it is refused.
    Rejected {
        /// The status.
        status: u16,
        /// The start of the upstream's explanation.
        detail: String,
    },
}

/// A client for one sink: its timeout for a whole request, no redirects (an upstream that
/// redirects a POST is misconfigured, and following it could leak the key elsewhere).
pub fn client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("trueup-relay/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Reads an upstream's answer to a request.
pub async fn answer(result: Result<reqwest::Response, reqwest::Error>) -> Answer {
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            let what = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "cannot connect"
            } else {
                "request failed"
            };
            return Answer::Retry {
                // Without the URL: reqwest's message may carry it, and a query string may
                // carry a key.
                message: format!("{what}: {}", e.without_url()),
                after: None,
            };
        }
    };
    let status = resp.status();
    let after = retry_after(resp.headers());
    if status.is_success() {
        return Answer::Taken;
    }
    let detail = body_start(resp).await;
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => Answer::TooLarge,
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => Answer::Retry {
            message: format!("upstream answered {status}"),
            after,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Answer::Retry {
            message: format!("upstream answered {status}: check the sink's url and key ({detail})"),
            after,
        },
        s if s.is_client_error() && s.as_u16() != 425 => Answer::Rejected {
            status: s.as_u16(),
            detail,
        },
        s => Answer::Retry {
            message: format!("upstream answered {s}"),
            after,
        },
    }
}

async fn body_start(resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace(['\n', '\r'], " ")
}

/// `Retry-After` in seconds or as an HTTP date; at most an hour.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    };
    Some(wait.min(Duration::from_secs(3600)))
}

/// The limits of one upstream's requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most events per request.
    pub max_events: usize,
    /// Most bytes per request body.
    pub max_bytes: usize,
    /// Largest single event, bytes.
    pub max_event_bytes: usize,
    /// Bytes a request body has besides its events (envelope, separators are counted apart).
    pub overhead: usize,
}

/// Sends `items` in requests that fit `limits` (in order), splitting on 413 and on other
/// 4xx answers to isolate what is refused. Returns what was dead-lettered, by position with
/// a reason, or the first temporary failure (the forwarder retries the whole delivery).
pub async fn deliver<F, Fut>(
    items: &[Encoded],
    limits: Limits,
    mut send: F,
) -> Result<Vec<(i64, String)>, SinkError>
where
    F: FnMut(&[Encoded]) -> Fut,
    Fut: Future<Output = Answer>,
{
    let mut rejected = Vec::new();
    let mut sendable = Vec::with_capacity(items.len());
    for item in items {
        if item.json.len() > limits.max_event_bytes {
            rejected.push((
                item.pos,
                format!(
                    "too_large: {} bytes as sent, the upstream takes at most {}",
                    item.json.len(),
                    limits.max_event_bytes
                ),
            ));
        } else {
            sendable.push(item.clone());
        }
    }
    let mut work: VecDeque<(usize, usize)> = chunks(&sendable, limits).into();
    while let Some((start, end)) = work.pop_front() {
        let part = &sendable[start..end];
        match send(part).await {
            Answer::Taken => {}
            Answer::Retry { message, after } => {
                return Err(SinkError {
                    message,
                    retry_after: after,
                });
            }
            Answer::TooLarge if part.len() == 1 => rejected.push((
                part[0].pos,
                "too_large: the upstream answered 413 for this event alone".into(),
            )),
            Answer::Rejected { status, detail } if part.len() == 1 => {
                rejected.push((part[0].pos, format!("rejected_{status}: {detail}")))
            }
            Answer::TooLarge | Answer::Rejected { .. } => {
                let mid = start + part.len() / 2;
                work.push_front((mid, end));
                work.push_front((start, mid));
            }
        }
    }
    rejected.sort_by_key(|(pos, _)| *pos);
    Ok(rejected)
}

/// Cuts `items` into ranges of at most `max_events` whose body (overhead, events, commas)
/// fits `max_bytes`.
fn chunks(items: &[Encoded], limits: Limits) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, limits.overhead);
    for (i, item) in items.iter().enumerate() {
        let add = item.json.len() + 1;
        if i > start && (i - start >= limits.max_events || bytes + add > limits.max_bytes) {
            out.push((start, i));
            start = i;
            bytes = limits.overhead;
        }
        bytes += add;
    }
    if start < items.len() {
        out.push((start, items.len()));
    }
    out
}

/// `items` joined as a JSON array's contents.
pub fn join(items: &[Encoded]) -> String {
    let mut out = String::with_capacity(items.iter().map(|i| i.json.len() + 1).sum());
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item.json);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(sizes: &[usize]) -> Vec<Encoded> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Encoded {
                pos: i as i64 + 1,
                json: "x".repeat(*n),
            })
            .collect()
    }

    const LIMITS: Limits = Limits {
        max_events: 3,
        max_bytes: 100,
        max_event_bytes: 60,
        overhead: 10,
    };

    #[test]
    fn chunks_respect_count_and_bytes() {
        let it = items(&[10, 10, 10, 10, 50, 50, 5]);
        let c = chunks(&it, LIMITS);
        assert_eq!(c, vec![(0, 3), (3, 5), (5, 7)]);
        for (s, e) in c {
            let body: usize = 10 + it[s..e].iter().map(|i| i.json.len() + 1).sum::<usize>();
            assert!(body <= 100 && e - s <= 3);
        }
    }

    #[tokio::test]
    async fn a_refused_event_is_isolated_and_the_rest_delivered() {
        let it = items(&[10, 10, 10, 70, 10, 10]);
        let mut taken = Vec::new();
        let rejected = deliver(&it, LIMITS, |part: &[Encoded]| {
            let bad = part.iter().any(|i| i.pos == 2);
            let poss: Vec<i64> = part.iter().map(|i| i.pos).collect();
            if !bad {
                taken.extend(poss);
            }
            async move {
                if bad {
                    Answer::Rejected {
                        status: 400,
                        detail: "bad event".into(),
                    }
                } else {
                    Answer::Taken
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(taken, vec![1, 3, 5, 6]);
        assert_eq!(rejected.len(), 2);
        assert_eq!(rejected[0].0, 2);
        assert!(rejected[0].1.starts_with("rejected_400: bad event"));
        assert_eq!(rejected[1].0, 4);
        assert!(rejected[1].1.starts_with("too_large"));
    }

    #[tokio::test]
    async fn a_temporary_failure_fails_the_delivery_with_its_wait() {
        let it = items(&[10, 10]);
        let err = deliver(&it, LIMITS, |_: &[Encoded]| async {
            Answer::Retry {
                message: "upstream answered 429".into(),
                after: Some(Duration::from_secs(7)),
            }
        })
        .await
        .unwrap_err();
        assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            "retry-after",
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let got = retry_after(&h).unwrap();
        assert!(got > Duration::from_secs(100) && got <= Duration::from_secs(120));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
