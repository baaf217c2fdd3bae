//! The public router (collection, server path, the agent's files, optionally the demo site)
//! and the admin router (health, readiness, metrics), each built from state so tests can call
//! them directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::dash;
use crate::health::{AdminState, healthz, metrics_text, readyz, require_token, sinks};
use crate::ingest::{AppState, collect, server_events};

/// The public router.
pub fn public_router(st: AppState) -> Router {
    let cfg = st.cfg.clone();
    let allowed: Arc<Vec<HeaderValue>> = Arc::new(
        cfg.sites
            .iter()
            .flat_map(|s| s.origins.iter())
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect(),
    );
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            allowed.contains(origin)
        }))
        .allow_methods([Method::POST])
        .allow_headers([header::CONTENT_TYPE])
        .max_age(Duration::from_secs(86_400));
    let assets = Router::new()
        .fallback_service(
            ServeDir::new(&cfg.asset_dir)
                .precompressed_br()
                .precompressed_gzip(),
        )
        .layer(middleware::from_fn(asset_cache_headers));
    // API answers are never cached by a browser or a shared cache on the way.
    let mut router = Router::new()
        .route(&cfg.collect_url_path(), post(collect).layer(cors))
        .route(&cfg.server_url_path(), post(server_events))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .nest(cfg.assets_url_path().trim_end_matches('/'), assets)
        .with_state(st);
    if let Some(www) = &cfg.www_dir {
        router = router.fallback_service(ServeDir::new(www));
    }
    router
        .layer(nosniff())
        .layer(middleware::from_fn(record_latency))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(cfg.request_timeout_secs),
        ))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::new())
}

/// The admin router: `/healthz`, `/readyz`, `/sinks`, `/metrics`, and the dashboards
/// (`/dash/…`, `/api/v1/…`, `/login`; see `dash`).
/// Behind the admin token when one is configured (see `health`).
pub fn admin_router(st: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/sinks", get(sinks))
        .route("/metrics", get(metrics_text))
        .route("/login", get(dash::login_form).post(dash::login))
        .route("/logout", post(dash::logout))
        .route("/dash", get(dash::index))
        .route("/dash/", get(dash::index))
        .route("/dash/{*file}", get(dash::file))
        .route("/api/v1/quality", get(dash::quality_api))
        .route("/api/v1/business", get(dash::business_api))
        .route("/api/v1/behaviour", get(dash::behaviour_api))
        .layer(middleware::from_fn_with_state(st.clone(), require_token))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(nosniff())
        .layer(CatchPanicLayer::new())
        .with_state(st)
}

/// `X-Content-Type-Options: nosniff` on every answer: a browser takes each body as the type
/// it is labelled (JSON error bodies quote client input), never guesses a script or a page.
fn nosniff() -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::if_not_present(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    )
}

/// Hashed names (`loader.3f9a1c2e.js`) never change: cache for a year. Other names (the
/// short-cache loader) may change on deploy: five minutes.
async fn asset_cache_headers(req: Request, next: Next) -> Response {
    let immutable = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .map(|name| {
            name.split('.')
                .any(|part| part.len() >= 8 && part.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .unwrap_or(false);
    let mut resp = next.run(req).await;
    if resp.status().is_success() {
        let value = if immutable {
            "public, max-age=31536000, immutable"
        } else {
            "public, max-age=300"
        };
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(value));
    }
    resp
}

async fn record_latency(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::histogram!("trueup_request_duration_seconds", "path" => path.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("trueup_requests_total", "path" => path, "status" => status).increment(1);
    resp
}
