//! The HTTP routes of `pipefuse serve`: OpenAI's images API (synchronous), the jobs API
//! (asynchronous, with an SSE progress stream), models, health, metrics and the web page.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures_util::stream::Stream;
use serde_json::{json, Value};

use super::api::{self, ApiError, ImageRequest};
use super::jobs::{Job, JobState, Jobs};
use super::Server;
use crate::generate::{GenerateArgs, RequestFields};

/// How long `DELETE` waits for a running job to stop before answering that it is stopping.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// The web page (one file, no build step, nothing from the network).
const PAGE: &str = include_str!("page.html");

pub(crate) async fn page() -> Html<&'static str> {
    Html(PAGE)
}

pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

pub(crate) async fn readyz(State(s): State<Arc<Server>>) -> Response {
    match s.jobs.check_cluster().await {
        Ok(h) if h.missing.is_empty() => (StatusCode::OK, "ready\n").into_response(),
        // Ready on fewer nodes: requests run (slower) while a node is away.
        Ok(h) => (
            StatusCode::OK,
            format!(
                "ready on nodes {}; waiting for {} to return\n",
                h.nodes.join(", "),
                h.missing.join(", ")
            ),
        )
            .into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

pub(crate) async fn metrics(State(s): State<Arc<Server>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

pub(crate) async fn models(State(s): State<Arc<Server>>) -> Json<Value> {
    let model = s.jobs.cluster().model();
    let cfg = &model.config;
    let f = crate::images::pixel_factor(model).unwrap_or(1);
    let side = cfg.sample_size * f;
    Json(json!({"object": "list", "data": [{
        "id": s.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "pipefuse",
        "arch": format!("{:?}", cfg.arch),
        "default_size": format!("{side}x{side}"),
        "size_multiple": f * cfg.patch_size,
        "labels": model.labels.keys().collect::<Vec<_>>(),
        "needs": if cfg.arch == model::Arch::Dit { "prompt (a class label)" } else { "prompt_embeds (base64 safetensors)" },
    }]}))
}

/// `POST /v1/images/generations`: runs the request and answers with its images. A client that
/// disconnects before the answer cancels it.
pub(crate) async fn generations(
    State(s): State<Arc<Server>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let job = submit(s.clone(), peer, body).await?;
    let mut guard = CancelOnDrop(Some((s.jobs.clone(), job.id)));
    let state = job.finished().await;
    guard.0 = None;
    s.jobs.forget(job.id);
    let id = job.id;
    match state {
        JobState::Succeeded { images, .. } => Ok((
            [("x-request-id", format!("job-{id}"))],
            Json(json!({"created": job.created, "data": b64_images(&images)})),
        )
            .into_response()),
        other => Err(final_error(&job, &other)),
    }
}

/// `POST /v1/jobs`: queues the request and answers at once (202) with the job.
pub(crate) async fn create_job(
    State(s): State<Arc<Server>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let job = submit(s.clone(), peer, body).await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/job-{}", job.id))],
        Json(job_json(&s.jobs, &job, false)),
    )
        .into_response())
}

pub(crate) async fn list_jobs(State(s): State<Arc<Server>>) -> Json<Value> {
    let jobs: Vec<Value> = s
        .jobs
        .list()
        .iter()
        .map(|j| job_json(&s.jobs, j, false))
        .collect();
    Json(json!({"object": "list", "data": jobs}))
}

pub(crate) async fn get_job(
    State(s): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&s.jobs, &id)?;
    Ok(Json(job_json(&s.jobs, &job, true)))
}

pub(crate) async fn delete_job(
    State(s): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&s.jobs, &id)?;
    let ended = |state: &JobState| {
        ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!("{id} has already ended ({})", state.name()),
        )
    };
    if !s.jobs.cancel(job.id, "cancelled by DELETE") {
        return Err(ended(&job.state()));
    }
    // A running job stops at its next item; one that finished first was not cancelled.
    match tokio::time::timeout(CANCEL_WAIT, job.finished()).await {
        Ok(JobState::Cancelled { .. }) => Ok(Json(job_json(&s.jobs, &job, false))),
        Ok(other) => Err(ended(&other)),
        Err(_) => {
            let mut v = job_json(&s.jobs, &job, false);
            v["cancelling"] = json!(true);
            Ok(Json(v))
        }
    }
}

/// `GET /v1/jobs/{id}/events`: one SSE event per change of the job's state (`queued`,
/// `running` with `step` / `steps`, then one of `succeeded`, `failed`, `cancelled`, after which
/// the stream ends). The images are fetched with `GET /v1/jobs/{id}`.
pub(crate) async fn job_events(
    State(s): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    let job = find(&s.jobs, &id)?;
    let jobs = s.jobs.clone();
    let rx = job.watch();
    // Each state once, as it changes; the stream ends after the final one. Dropping the response
    // (the client left) drops all of it.
    let stream = futures_util::stream::unfold((rx, true, false), move |(mut rx, first, done)| {
        let (jobs, job) = (jobs.clone(), job.clone());
        async move {
            if done || (!first && rx.changed().await.is_err()) {
                return None;
            }
            let state = rx.borrow_and_update().clone();
            let data = job_json(&jobs, &job, false);
            let event = Event::default().event(state.name()).data(data.to_string());
            Some((Ok(event), (rx, false, state.is_final())))
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Cancels a synchronous request whose handler was dropped (its client disconnected).
struct CancelOnDrop(Option<(Arc<Jobs>, u64)>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some((jobs, id)) = self.0.take() {
            if jobs.cancel(id, "the client closed the connection") {
                tracing::info!(job = id, "client disconnected: request cancelled");
            }
            jobs.forget(id);
        }
    }
}

fn find(jobs: &Jobs, id: &str) -> Result<Arc<Job>, ApiError> {
    id.strip_prefix("job-")
        .and_then(|n| n.parse().ok())
        .and_then(|n| jobs.get(n))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("no job `{id}` (finished jobs are kept for a while, then forgotten)"),
            )
        })
}

fn b64_images(images: &[Vec<u8>]) -> Vec<Value> {
    images
        .iter()
        .map(|png| json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(png)}))
        .collect()
}

/// A job as the API shows it; with `images`, a finished job's images too.
fn job_json(jobs: &Jobs, job: &Job, images: bool) -> Value {
    let state = job.state();
    let mut v = json!({
        "id": format!("job-{}", job.id),
        "object": "image.job",
        "created": job.created,
        "status": state.name(),
        "user": job.user,
    });
    match &state {
        JobState::Queued => v["queue_position"] = json!(jobs.position(job.id)),
        JobState::Running { step, steps } => {
            v["step"] = json!(step);
            v["steps"] = json!(steps);
        }
        JobState::Succeeded { images: png, secs } => {
            v["seconds"] = json!(secs);
            if images {
                v["data"] = json!(b64_images(png));
            }
        }
        JobState::Failed { message, .. } => v["error"] = json!(message),
        JobState::Cancelled { reason } => v["error"] = json!(format!("cancelled: {reason}")),
    }
    v
}

/// The error a synchronous request answers when its job did not succeed.
fn final_error(job: &Job, state: &JobState) -> ApiError {
    match state {
        JobState::Failed { status, message } => ApiError::new(
            StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "server_error",
            format!("job-{}: {message}", job.id),
        ),
        JobState::Cancelled { reason } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("job-{} was cancelled: {reason}", job.id),
        ),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "unfinished",
        ),
    }
}

/// Refuses at once when the queue is full, then checks the body and builds the request (on a
/// blocking thread: a large body's JSON, base64 and embeddings must not hold the runtime that
/// answers other clients and drives the cluster), then queues it.
async fn submit(s: Arc<Server>, peer: SocketAddr, body: Bytes) -> Result<Arc<Job>, ApiError> {
    s.jobs.check_room()?;
    let server = s.clone();
    let built = tokio::task::spawn_blocking(move || {
        let req = api::parse(&body)?;
        if let Some(m) = req.model.as_deref().filter(|m| *m != server.model_id) {
            return Err(ApiError::field(
                "model",
                format!(
                    "`{m}` is not served here; this server serves `{}`",
                    server.model_id
                ),
            ));
        }
        let built = build(&server, &req)?;
        Ok((req, built))
    })
    .await
    .unwrap_or_else(|e| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("checking the request failed: {e}"),
        ))
    });
    let (req, built) = built.inspect_err(|e| {
        if e.status == StatusCode::BAD_REQUEST {
            s.jobs.invalid();
        }
    })?;
    let timeout = req.timeout.map_or(s.request_timeout, |t| {
        Duration::try_from_secs_f64(t).map_or(s.request_timeout, |d| d.min(s.request_timeout))
    });
    let user = req.user.clone().unwrap_or_else(|| peer.ip().to_string());
    s.jobs.admit(user, built, timeout)
}

/// The cluster request for `req`, through generate's checks.
fn build(s: &Server, req: &ImageRequest) -> Result<actors::GenerateRequest, ApiError> {
    let cluster = s.jobs.cluster();
    let model = cluster.model();
    let cfg = &model.config;
    let f = crate::images::pixel_factor(model).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    })?;
    let multiple = f * cfg.patch_size;
    if let Some((w, h)) = req.size {
        if w % multiple != 0 || h % multiple != 0 {
            return Err(ApiError::field(
                "size",
                format!("{w}x{h}: each side must be a multiple of {multiple} (pixels per latent element {f} x patch size {})", cfg.patch_size),
            ));
        }
    }
    let mut fields = RequestFields {
        steps: req.steps,
        guidance_scale: req.guidance_scale,
        seed: req.seed.unwrap_or_else(rand::random),
        height: req.size.map(|s| s.1),
        width: req.size.map(|s| s.0),
        ..Default::default()
    };
    if cfg.arch == model::Arch::Dit {
        if req.prompt_embeds.is_some() {
            return Err(ApiError::field(
                "prompt_embeds",
                "this class-conditional model takes class labels in `prompt`",
            ));
        }
        let ids = class_ids(model, &req.prompt)?;
        if ids.len() * req.n > api::MAX_IMAGES {
            return Err(ApiError::field(
                "n",
                format!(
                    "{} label(s) x n = {} images: at most {} per request",
                    ids.len(),
                    ids.len() * req.n,
                    api::MAX_IMAGES
                ),
            ));
        }
        fields.class_labels = (0..req.n).flat_map(|_| ids.iter().copied()).collect();
    } else {
        let Some(bytes) = &req.prompt_embeds else {
            return Err(ApiError::field("prompt_embeds", format!("this {:?} model is text-conditioned and no text encoder runs here: send the prompt's embeddings as a base64 safetensors file (the names of generate's --prompt-embeds)", cfg.arch)));
        };
        if req.n != 1 {
            return Err(ApiError::field(
                "n",
                "with `prompt_embeds` the batch is the file's; leave n at 1",
            ));
        }
        fields.prompt_embeds = Some(bytes.clone());
    }
    let args = GenerateArgs::from_fields(fields).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    })?;
    crate::generate::request(&args, cluster).map_err(|e| flag_error(crate::error_chain(&e)))
}

/// A 400 from generate's checks, in the API's terms: its flag names become the request's field
/// names, and the first field it names is `param`.
fn flag_error(msg: String) -> ApiError {
    const FIELDS: &[(&str, &str)] = &[
        ("--prompt-embeds FILE", "`prompt_embeds`"),
        ("--prompt-embeds", "`prompt_embeds`"),
        ("--guidance-scale", "`guidance_scale`"),
        ("--true-cfg-scale", "`guidance_scale`"),
        ("--class-label", "`prompt`"),
        ("--height", "`size` height"),
        ("--width", "`size` width"),
        ("--steps", "`steps`"),
    ];
    let mut first: Option<(usize, &str)> = None;
    let mut out = msg;
    for (flag, field) in FIELDS {
        if let Some(at) = out.find(flag) {
            let name = field
                .trim_start_matches('`')
                .split('`')
                .next()
                .unwrap_or("");
            if first.is_none_or(|(f, _)| at < f) {
                first = Some((at, name));
            }
            out = out.replace(flag, field);
        }
    }
    let mut e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", out);
    e.param = first.map(|(_, name)| name.to_string());
    e
}

/// The class ids `prompt` names: one label of the model's `id2label`, else comma-separated
/// labels (one image each); a model without labels takes class numbers.
fn class_ids(model: &actors::ModelSource, prompt: &str) -> Result<Vec<usize>, ApiError> {
    let classes = model.config.num_classes;
    if let Some(&id) = model.labels.get(prompt.trim()) {
        return Ok(vec![id]);
    }
    prompt
        .split(',')
        .map(str::trim)
        .map(|p| {
            let id = if model.labels.is_empty() {
                p.parse::<usize>().ok().filter(|&i| i < classes)
            } else {
                model.labels.get(p).copied()
            };
            id.ok_or_else(|| {
                let known = if model.labels.is_empty() {
                    format!("class numbers 0..{}", classes.saturating_sub(1))
                } else {
                    let names: Vec<&str> = model.labels.keys().map(String::as_str).take(20).collect();
                    format!("labels such as {}", names.join(", "))
                };
                ApiError::field("prompt", format!("`{p}` is not a class of this model (it takes {known}; several separated by commas)"))
            })
        })
        .collect()
}

/// Answers 401 unless the request carries `Authorization: Bearer <key>`.
pub(crate) fn authorized(headers: &HeaderMap, key: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .is_some_and(|(_, k)| constant_time_eq(k.trim().as_bytes(), key.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_errors_speak_of_the_request_fields() {
        let e = flag_error(
            "prompt.safetensors: guidance scale 5 needs `negative_prompt_embeds` (or pass \
             --guidance-scale 1)"
                .into(),
        );
        assert_eq!(e.param.as_deref(), Some("guidance_scale"));
        assert!(e.message.contains("`guidance_scale` 1") && !e.message.contains("--"));
        let e = flag_error("--height 100 / --width 100 must be positive multiples of 8".into());
        assert_eq!(e.param.as_deref(), Some("size"));
        assert_eq!(
            e.message,
            "`size` height 100 / `size` width 100 must be positive multiples of 8"
        );
        assert_eq!(flag_error("no flag here".into()).param, None);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_key_exact() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert!(authorized(&h("Bearer k1"), "k1"));
        assert!(authorized(&h("bearer k1"), "k1"));
        assert!(!authorized(&h("Bearer k2"), "k1"));
        assert!(!authorized(&h("Basic k1"), "k1"));
        assert!(!authorized(&HeaderMap::new(), "k1"));
    }
}
