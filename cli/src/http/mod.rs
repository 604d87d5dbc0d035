//! `pipefuse serve`: a cluster behind an HTTP API that image clients already speak (OpenAI's
//! `POST /v1/images/generations`), an asynchronous jobs API with an SSE progress stream, a
//! bounded fair queue that says no (429 + `Retry-After`) at once, Prometheus metrics, health
//! checks and a web page. Built on axum (hyper) on the process's tokio runtime.
//!
//! Routes (README "Serving over HTTP" documents them):
//! `GET /` page; `GET /healthz`; `GET /readyz`; `GET /metrics`; `GET /v1/models`;
//! `POST /v1/images/generations`; `POST /v1/jobs`; `GET /v1/jobs`; `GET /v1/jobs/{id}`;
//! `GET /v1/jobs/{id}/events` (SSE); `DELETE /v1/jobs/{id}`.

mod api;
mod command;
mod jobs;
mod metrics;
mod png;
mod queue;
mod routes;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::Cluster;
use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
pub(crate) use command::{bind, model_id, run, HttpArgs, HttpConfig, ServeArgs};
use jobs::Jobs;
use metrics::Metrics;

/// The largest request body taken (prompt embeddings of big text encoders fit).
const MAX_BODY: usize = 64 << 20;

/// What every handler shares.
pub(crate) struct Server {
    jobs: Arc<Jobs>,
    metrics: Arc<Metrics>,
    model_id: String,
    request_timeout: Duration,
    api_key: Option<String>,
}

/// How long connections still open after the drain (a slow upload, a client that stopped
/// reading) may hold the process before it exits anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves `cluster` on `listener` until SIGTERM / Ctrl-C, then drains (see the module
/// documentation) and shuts the cluster down.
pub(crate) async fn serve_on(
    listener: tokio::net::TcpListener,
    cluster: Arc<Cluster>,
    config: HttpConfig,
    model_id: String,
) -> Result<()> {
    let HttpConfig {
        api_key,
        max_queue,
        per_user,
        request_timeout,
        drain_timeout,
        ..
    } = config;
    let metrics = Arc::new(Metrics::new());
    let jobs = Arc::new(Jobs::new(
        cluster.clone(),
        metrics.clone(),
        max_queue,
        per_user,
    ));
    let dispatcher = tokio::spawn(jobs.clone().dispatch());
    let server = Arc::new(Server {
        jobs: jobs.clone(),
        metrics,
        model_id,
        request_timeout,
        api_key,
    });
    let app = router(server);
    let addr = listener.local_addr()?;
    // Made before anything is printed: a SIGTERM from then on is a clean stop.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = {
        let jobs = jobs.clone();
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            jobs.stop_accepting();
            eprintln!(
                "stopping: no new requests; letting admitted ones finish (up to {} s)",
                drain_timeout.as_secs_f64()
            );
            let deadline = tokio::time::Instant::now() + drain_timeout;
            while !jobs.idle() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if !jobs.idle() {
                eprintln!("stopping: cancelling the requests still open");
                jobs.cancel_all("the server is stopping");
                let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
                while !jobs.idle() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let _ = drained_tx.send(());
        }
    };
    eprintln!(
        "serving {} on http://{addr}/ (OpenAI images API at /v1/images/generations)",
        server_model(&jobs)
    );
    // Small answers (a 429, an SSE event) leave at once instead of waiting on Nagle's algorithm.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%e, "TCP_NODELAY");
        }
    });
    let serving = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(drain)
    .into_future();
    tokio::select! {
        r = serving => r.context("serving HTTP")?,
        _ = async {
            let _ = drained_rx.await;
            tokio::time::sleep(CLOSE_GRACE).await;
        } => {
            tracing::warn!("connections still open {} s after the drain: closing them", CLOSE_GRACE.as_secs());
        }
    }
    eprintln!("stopped serving");
    dispatcher.abort();
    let _ = dispatcher.await;
    drop(jobs);
    // Connection tasks let go of the server's state moments after serving returns.
    let t0 = tokio::time::Instant::now();
    while Arc::strong_count(&cluster) > 1 && t0.elapsed() < CLOSE_GRACE {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match Arc::try_unwrap(cluster) {
        Ok(cluster) => cluster.shutdown().await,
        Err(_) => tracing::warn!("the cluster is still in use: exiting without its shutdown"),
    }
    Ok(())
}

fn server_model(jobs: &Jobs) -> String {
    format!("{:?} model", jobs.cluster().model().config.arch)
}

fn router(server: Arc<Server>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(routes::models))
        .route("/v1/images/generations", post(routes::generations))
        .route("/v1/jobs", post(routes::create_job).get(routes::list_jobs))
        .route(
            "/v1/jobs/{id}",
            get(routes::get_job).delete(routes::delete_job),
        )
        .route("/v1/jobs/{id}/events", get(routes::job_events))
        .route("/metrics", get(routes::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            server.clone(),
            require_key,
        ));
    Router::new()
        .route("/", get(routes::page))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .merge(api)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            log_request,
        ))
        .with_state(server)
}

async fn require_key(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    match &s.api_key {
        Some(key) if !routes::authorized(req.headers(), key) => {
            let mut e = api::ApiError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or wrong API key: send `Authorization: Bearer KEY`",
            );
            e.param = None;
            e.into_response()
        }
        _ => next.run(req).await,
    }
}

/// Answers 413 as soon as a request's `Content-Length` is beyond [`MAX_BODY`], without reading
/// the body (a chunked body is cut at the limit by `DefaultBodyLimit`).
async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let length = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(n) if n > MAX_BODY as u64 => api::ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the body is {n} bytes; at most {} MiB is taken",
                MAX_BODY >> 20
            ),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// Logs each request (at debug) and times its refusals.
async fn log_request(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t0 = Instant::now();
    let r = next.run(req).await;
    // Refusals carry Retry-After (a request that failed or was cancelled after running does not).
    if matches!(r.status().as_u16(), 429 | 503) && r.headers().contains_key("retry-after") {
        s.metrics.refusal(t0.elapsed().as_secs_f64());
    }
    tracing::debug!(%method, %path, status = r.status().as_u16(), ms = t0.elapsed().as_millis() as u64, "http");
    r
}
