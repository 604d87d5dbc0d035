//! The body of `POST /v1/images/generations` (OpenAI's images API plus pipefuse's extensions),
//! checked field by field so that a 400 names the field at fault, and the errors in OpenAI's
//! shape (`{"error": {"message", "type", "param", "code"}}`).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Map, Value};

/// The most images one request may ask for (OpenAI's limit for `n`).
pub(crate) const MAX_IMAGES: usize = 10;
/// The largest side of an image, in pixels.
pub(crate) const MAX_SIDE: usize = 16384;
/// The most steps one request may ask for.
pub(crate) const MAX_STEPS: usize = 1000;
/// The longest `timeout` a request may ask for, in seconds (a day; the server's own limit
/// applies too).
pub(crate) const MAX_TIMEOUT: f64 = 86_400.0;

/// A checked image request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ImageRequest {
    /// The prompt as given (class names for class-conditional models).
    pub(crate) prompt: String,
    /// Images to make.
    pub(crate) n: usize,
    /// `(width, height)` in pixels, when `size` was given.
    pub(crate) size: Option<(usize, usize)>,
    /// Seed of the initial noise (random when not given).
    pub(crate) seed: Option<u64>,
    /// Denoising steps (the model's default when not given).
    pub(crate) steps: Option<usize>,
    /// Classifier-free guidance scale.
    pub(crate) guidance_scale: Option<f32>,
    /// A safetensors file of prompt embeddings (text-conditioned models), decoded from base64.
    pub(crate) prompt_embeds: Option<Vec<u8>>,
    /// Seconds the request may take from its arrival (at most the server's limit).
    pub(crate) timeout: Option<f64>,
    /// Who asked (OpenAI's `user`): requests of different users take turns.
    pub(crate) user: Option<String>,
    /// The model asked for (must be the one served, when given).
    pub(crate) model: Option<String>,
}

/// An error answered to the client: its status, OpenAI's error `type`, the field at fault.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) param: Option<String>,
    pub(crate) message: String,
    /// Seconds after which to try again (429, 503).
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    /// A 400 naming `field`.
    pub(crate) fn field(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            param: Some(field.to_string()),
            message: format!("`{field}`: {}", message.into()),
            retry_after: None,
        }
    }

    /// An error of `status` with no field.
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // OpenAI's `code`: a string naming the error class, or null.
        let code = match self.status.as_u16() {
            429 => Some("rate_limit_exceeded"),
            401 => Some("invalid_api_key"),
            413 => Some("payload_too_large"),
            503 => Some("service_unavailable"),
            504 => Some("timeout"),
            _ => None,
        };
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": code,
        }});
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        r
    }
}

/// OpenAI fields taken and ignored (they choose among OpenAI's own models' options).
const IGNORED: &[&str] = &[
    "quality",
    "style",
    "background",
    "moderation",
    "output_compression",
    "partial_images",
];

/// Checks a request body; the first field at fault is named.
pub(crate) fn parse(body: &[u8]) -> Result<ImageRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the body is not JSON: {e}"),
        )
    })?;
    let Value::Object(o) = v else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the body must be a JSON object",
        ));
    };
    for k in o.keys() {
        let known = [
            "prompt",
            "n",
            "size",
            "response_format",
            "output_format",
            "model",
            "user",
            "seed",
            "steps",
            "guidance_scale",
            "negative_prompt",
            "prompt_embeds",
            "timeout",
            "stream",
        ];
        if !known.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()) {
            return Err(ApiError::field(
                k,
                format!("unknown field; known: {}", known.join(", ")),
            ));
        }
    }
    let prompt = match o.get("prompt") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(ApiError::field("prompt", "must not be empty")),
        Some(_) => return Err(ApiError::field("prompt", "must be a string")),
        None => return Err(ApiError::field("prompt", "is required")),
    };
    let n = int(&o, "n", 1, MAX_IMAGES as u64)?.unwrap_or(1) as usize;
    let size = match string(&o, "size")? {
        None | Some("auto") => None,
        Some(s) => Some(parse_size(s).ok_or_else(|| {
            ApiError::field(
                "size",
                format!(
                    "`{s}` is not WIDTHxHEIGHT in pixels (e.g. \"256x256\"), each 1..={MAX_SIDE}"
                ),
            )
        })?),
    };
    match string(&o, "response_format")? {
        None | Some("b64_json") => {}
        Some(f) => {
            return Err(ApiError::field(
                "response_format",
                format!("`{f}` is not served: images come back as `b64_json` (PNG)"),
            ))
        }
    }
    match string(&o, "output_format")? {
        None | Some("png") => {}
        Some(f) => return Err(ApiError::field("output_format", format!("`{f}`: only png"))),
    }
    match o.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(ApiError::field(
                "stream",
                "images are not streamed here; follow progress with POST /v1/jobs and GET \
                 /v1/jobs/{id}/events",
            ))
        }
    }
    if o.contains_key("negative_prompt") {
        return Err(ApiError::field(
            "negative_prompt",
            "no text encoder runs here: class-conditional models guide against the null class; \
             text-conditioned models take `negative_prompt_embeds` inside `prompt_embeds`",
        ));
    }
    let model = string(&o, "model")?.map(str::to_string);
    let user = string(&o, "user")?.map(str::to_string);
    let seed = int(&o, "seed", 0, u64::MAX)?;
    let steps = int(&o, "steps", 1, MAX_STEPS as u64)?.map(|s| s as usize);
    let guidance_scale = match o.get("guidance_scale") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(g) if g.is_finite() && (0.0..=1000.0).contains(&g) => Some(g as f32),
            _ => {
                return Err(ApiError::field(
                    "guidance_scale",
                    "must be a number in 0..=1000 (1 disables guidance)",
                ))
            }
        },
    };
    let timeout = match o.get("timeout") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(t) if t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT => Some(t),
            _ => {
                return Err(ApiError::field(
                    "timeout",
                    format!("must be a number of seconds in (0, {MAX_TIMEOUT}]"),
                ))
            }
        },
    };
    let prompt_embeds = match string(&o, "prompt_embeds")? {
        None => None,
        Some(b64) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| {
                    ApiError::field(
                        "prompt_embeds",
                        format!("not base64 (a safetensors file, standard alphabet): {e}"),
                    )
                })?,
        ),
    };
    Ok(ImageRequest {
        prompt,
        n,
        size,
        seed,
        steps,
        guidance_scale,
        prompt_embeds,
        timeout,
        user,
        model,
    })
}

/// `"WxH"` as `(W, H)`, each in 1..=[`MAX_SIDE`].
fn parse_size(s: &str) -> Option<(usize, usize)> {
    let (w, h) = s.split_once(['x', 'X'])?;
    let side = |t: &str| {
        t.trim()
            .parse::<usize>()
            .ok()
            .filter(|v| (1..=MAX_SIDE).contains(v))
    };
    Some((side(w)?, side(h)?))
}

fn string<'a>(o: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::field(field, "must be a string")),
    }
}

fn int(o: &Map<String, Value>, field: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::field(
                field,
                format!("must be an integer in {min}..={max}"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        parse(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn a_full_request_is_read() {
        let r = parse(
            br#"{"prompt": "7", "n": 3, "size": "64x32", "response_format": "b64_json",
                "model": "digits-dit", "seed": 5, "steps": 12, "guidance_scale": 2.5,
                "quality": "hd", "user": "ann", "timeout": 30}"#,
        )
        .unwrap();
        assert_eq!(
            (r.n, r.size, r.seed, r.steps, r.guidance_scale),
            (3, Some((64, 32)), Some(5), Some(12), Some(2.5))
        );
        assert_eq!((r.user.as_deref(), r.timeout), (Some("ann"), Some(30.0)));
        let r = parse(br#"{"prompt": "x"}"#).unwrap();
        assert_eq!((r.n, r.size, r.seed, r.steps), (1, None, None, None));
    }

    #[test]
    fn each_bad_field_is_named() {
        for (body, field) in [
            (r#"{"n": 1}"#, "prompt"),
            (r#"{"prompt": 7}"#, "prompt"),
            (r#"{"prompt": " "}"#, "prompt"),
            (r#"{"prompt": "1", "n": 0}"#, "n"),
            (r#"{"prompt": "1", "n": 11}"#, "n"),
            (r#"{"prompt": "1", "n": 1.5}"#, "n"),
            (r#"{"prompt": "1", "size": "256"}"#, "size"),
            (r#"{"prompt": "1", "size": "0x256"}"#, "size"),
            (r#"{"prompt": "1", "size": "99999x256"}"#, "size"),
            (
                r#"{"prompt": "1", "response_format": "url"}"#,
                "response_format",
            ),
            (r#"{"prompt": "1", "steps": 0}"#, "steps"),
            (r#"{"prompt": "1", "seed": -1}"#, "seed"),
            (
                r#"{"prompt": "1", "guidance_scale": "high"}"#,
                "guidance_scale",
            ),
            (r#"{"prompt": "1", "timeout": 0}"#, "timeout"),
            (r#"{"prompt": "1", "timeout": 1e300}"#, "timeout"),
            (r#"{"prompt": "1", "stream": true}"#, "stream"),
            (r#"{"prompt": "1", "prompt_embeds": "!!"}"#, "prompt_embeds"),
            (
                r#"{"prompt": "1", "negative_prompt": "blurry"}"#,
                "negative_prompt",
            ),
            (r#"{"prompt": "1", "setps": 3}"#, "setps"),
        ] {
            let e = err(body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
            assert!(e.message.contains(field), "{}", e.message);
        }
        for body in ["not json", "[1, 2]", ""] {
            assert_eq!(err(body).status, StatusCode::BAD_REQUEST);
        }
    }
}
