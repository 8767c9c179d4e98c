//! The HTTP side of the sandbox: the four Blinger endpoints (routed by hand on the raw path, so
//! that what is recorded is exactly what arrived) and the `/_sandbox/*` control endpoints.
//!
//! Order of checks for an API request, chosen so that each switch is deterministic to test:
//! `down` (503 at once) → latency → path and method (404) → `Authorization` (401) → content
//! type, JSON and fields (400/413/422) → random injections (429, 5xx, stall) → `status_override`
//! → `forbidden_conversations` → `body_status_override` → delivery (idempotent on the message uuid).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::config::SandboxConfig;
use super::record::{Endpoint, Journal, Outcome, RateWindow, RecordedRequest, Stats, rfc3339_ms};
use super::responses::{self, Stamp};
use blinger_api::{Conversation, Envelope, Message};

/// The API base path, as on `https://widget.blinger.io/api/external/v1`.
pub const BASE_PATH: &str = "/api/external/v1";

/// Largest request body read; larger ones answer 413.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// What the sandbox remembers about an accepted message, to answer a repeated uuid with the same
/// message (a real API's idempotency), without keeping whole answers in memory.
struct Delivered {
    message_id: Uuid,
    file_id: Uuid,
    stamp: Stamp,
    /// The text or file URL of the first request.
    payload: String,
    endpoint: Endpoint,
}

struct Dice {
    rng: StdRng,
    seed: Option<u64>,
}

/// State shared by every connection and the [`super::Sandbox`] handle. Each lock guards a few
/// plain operations and is never held across an `.await` or while taking another lock.
pub(crate) struct Shared {
    config: Mutex<Arc<SandboxConfig>>,
    dice: Mutex<Dice>,
    pub(crate) journal: Mutex<Journal>,
    deliveries: Mutex<HashMap<Uuid, Delivered>>,
    rate: Mutex<RateWindow>,
    /// Cancelled at shutdown: wakes every injected sleep so that shutdown is prompt.
    pub(crate) cancel: CancellationToken,
}

/// Locks, ignoring poisoning: a panicking request must not take the sandbox down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_rng(seed: Option<u64>) -> StdRng {
    match seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_os_rng(),
    }
}

impl Shared {
    pub(crate) fn new(config: SandboxConfig, journal: Journal) -> Self {
        let seed = config.seed;
        Self {
            config: Mutex::new(Arc::new(config)),
            dice: Mutex::new(Dice {
                rng: new_rng(seed),
                seed,
            }),
            journal: Mutex::new(journal),
            deliveries: Mutex::new(HashMap::new()),
            rate: Mutex::new(RateWindow::new()),
            cancel: CancellationToken::new(),
        }
    }

    pub(crate) fn config(&self) -> Arc<SandboxConfig> {
        lock(&self.config).clone()
    }

    pub(crate) fn set_config(&self, config: SandboxConfig) {
        let seed = config.seed;
        *lock(&self.config) = Arc::new(config);
        let mut dice = lock(&self.dice);
        if dice.seed != seed {
            // A new seed restarts the random sequence, so a test can reproduce it.
            *dice = Dice {
                rng: new_rng(seed),
                seed,
            };
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut SandboxConfig)) {
        let mut config = (*self.config()).clone();
        f(&mut config);
        self.set_config(config);
    }

    pub(crate) fn stats(&self) -> Stats {
        let rate = lock(&self.rate).snapshot(Instant::now());
        let unique = lock(&self.deliveries).len() as u64;
        lock(&self.journal).stats(rate, unique)
    }

    /// Forgets records, counters and delivered uuids.
    pub(crate) fn reset(&self) {
        lock(&self.journal).reset();
        lock(&self.deliveries).clear();
        *lock(&self.rate) = RateWindow::new();
    }

    fn record(&self, rec: RecordedRequest, max_records: usize) {
        lock(&self.journal).record(rec, max_records);
    }

    /// Sleeps, unless the sandbox is shutting down.
    async fn sleep(&self, d: Duration) {
        if d.is_zero() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.cancel.cancelled() => {}
        }
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_sandbox/stats", get(get_stats))
        .route("/_sandbox/requests", get(get_requests))
        .route(
            "/_sandbox/config",
            get(get_config).put(put_config).patch(patch_config),
        )
        .route("/_sandbox/reset", post(post_reset))
        .route("/_sandbox/healthz", get(|| async { "ok" }))
        .fallback(api)
        .with_state(shared)
}

async fn get_stats(State(shared): State<Arc<Shared>>) -> Json<Stats> {
    Json(shared.stats())
}

#[derive(Deserialize)]
struct RequestsQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

async fn get_requests(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<RequestsQuery>,
) -> Json<Vec<RecordedRequest>> {
    let records = lock(&shared.journal).since(q.since.unwrap_or(0), q.limit.unwrap_or(usize::MAX));
    Json(records)
}

async fn get_config(State(shared): State<Arc<Shared>>) -> Json<SandboxConfig> {
    Json((*shared.config()).clone())
}

fn config_error(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": msg }))).into_response()
}

/// Replaces the whole config (missing fields take their defaults).
async fn put_config(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<SandboxConfig>(&body) {
        Ok(config) => apply_config(&shared, config),
        Err(e) => config_error(e.to_string()),
    }
}

/// Changes only the fields present in the body.
async fn patch_config(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let patch = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(patch)) => patch,
        Ok(_) => return config_error("expected a JSON object".to_owned()),
        Err(e) => return config_error(e.to_string()),
    };
    let mut current = match serde_json::to_value(&*shared.config()) {
        Ok(Value::Object(m)) => m,
        _ => return config_error("cannot serialise the current config".to_owned()),
    };
    current.extend(patch);
    match serde_json::from_value::<SandboxConfig>(Value::Object(current)) {
        Ok(config) => apply_config(&shared, config),
        Err(e) => config_error(e.to_string()),
    }
}

fn apply_config(shared: &Shared, config: SandboxConfig) -> Response {
    if let Err(e) = config.validate() {
        return config_error(e);
    }
    shared.set_config(config.clone());
    Json(config).into_response()
}

async fn post_reset(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.reset();
    Json(json!({ "reset": true }))
}

/// Every request that is not a control endpoint. Handled in its own task so that a client giving
/// up (closing the connection) cannot cancel the handling half-way: every request is recorded.
async fn api(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let arrived = Instant::now();
    let ts = OffsetDateTime::now_utc();
    lock(&shared.rate).note(arrived);
    let (parts, body) = req.into_parts();
    let handling = tokio::spawn(handle(
        shared,
        parts.method,
        parts.uri,
        parts.headers,
        body,
        arrived,
        ts,
    ));
    match handling.await {
        Ok(response) => response,
        Err(_) => plain_status(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// `{"status": N, "data": null}` with HTTP status N.
fn plain_status(status: StatusCode) -> Response {
    json_response(
        status,
        &Envelope::<()> {
            status: status.as_u16(),
            data: None,
        },
    )
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The endpoint and raw conversation-id segment of an API path:
/// `/api/external/v1/conversation/{id}/{action}` with exactly one non-empty segment for `{id}`.
fn route(path: &str) -> Option<(Endpoint, &str)> {
    let rest = path
        .strip_prefix(BASE_PATH)?
        .strip_prefix("/conversation/")?;
    let (id, action) = rest.split_once('/')?;
    if id.is_empty() {
        return None;
    }
    Some((Endpoint::from_action(action)?, id))
}

/// A validated request body.
enum Payload {
    Text { uuid: Uuid, text: String },
    File { uuid: Uuid, file: String },
    Review,
    Assign { agent_id: String },
}

/// Why a request is malformed: HTTP status and a readable reason.
type Invalid = (StatusCode, String);

fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

fn validate(
    endpoint: Endpoint,
    content_type: Option<&str>,
    raw: &[u8],
    body: &Value,
) -> Result<Payload, Invalid> {
    fn bad<T>(msg: &str) -> Result<T, Invalid> {
        Err((StatusCode::BAD_REQUEST, msg.to_owned()))
    }
    fn unprocessable<T>(msg: String) -> Result<T, Invalid> {
        Err((StatusCode::UNPROCESSABLE_ENTITY, msg))
    }
    if endpoint == Endpoint::RequestReview {
        // No body is expected; like a lenient real API, one that is sent is ignored.
        return Ok(Payload::Review);
    }
    if raw.is_empty() {
        return bad("a JSON body is required");
    }
    if !is_json(content_type) {
        return bad("Content-Type must be application/json");
    }
    let Value::Object(obj) = body else {
        return bad("the body is not a JSON object");
    };
    let string = |field: &str| -> Result<&str, Invalid> {
        match obj.get(field) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => unprocessable(format!("field {field} must be a string")),
            None => unprocessable(format!("field {field} is required")),
        }
    };
    let uuid = || -> Result<Uuid, Invalid> {
        let s = string("uuid")?;
        Uuid::parse_str(s).or_else(|_| unprocessable(format!("field uuid is not a UUID: {s:?}")))
    };
    match endpoint {
        Endpoint::SendTextMessage => {
            let uuid = uuid()?;
            let text = string("text")?;
            if text.trim().is_empty() {
                return unprocessable("field text must not be empty".to_owned());
            }
            Ok(Payload::Text {
                uuid,
                text: text.to_owned(),
            })
        }
        Endpoint::SendFileMessage => {
            let uuid = uuid()?;
            let file = string("file")?;
            match url::Url::parse(file) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
                _ => {
                    return unprocessable(format!("field file is not an http(s) URL: {file:?}"));
                }
            }
            Ok(Payload::File {
                uuid,
                file: file.to_owned(),
            })
        }
        Endpoint::AssignAgent => {
            let agent_id = string("agentId")?;
            if agent_id.is_empty() {
                return unprocessable("field agentId must not be empty".to_owned());
            }
            Ok(Payload::Assign {
                agent_id: agent_id.to_owned(),
            })
        }
        Endpoint::RequestReview | Endpoint::Other => unreachable!("handled above"),
    }
}

/// What the dice decided for one request.
enum Injection {
    None,
    RateLimited,
    Error(StatusCode),
    Stall,
}

impl Shared {
    /// Rolls every random choice of one request under one short lock.
    fn roll(&self, config: &SandboxConfig) -> (Duration, Injection) {
        let mut dice = lock(&self.dice);
        let rng = &mut dice.rng;
        let jitter = if config.latency_jitter_ms > 0 {
            rng.random_range(0..=config.latency_jitter_ms)
        } else {
            0
        };
        let latency = Duration::from_millis(config.latency_ms.saturating_add(jitter));
        let hit = |rng: &mut StdRng, rate: f64| rate > 0.0 && rng.random::<f64>() < rate;
        let injection = if hit(rng, config.rate_429) {
            Injection::RateLimited
        } else if hit(rng, config.error_rate) {
            let codes = [
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
            ];
            Injection::Error(codes[rng.random_range(0..codes.len())])
        } else if hit(rng, config.timeout_rate) {
            Injection::Stall
        } else {
            Injection::None
        };
        (latency, injection)
    }

    /// Creates the message (or returns the one already created for this uuid).
    fn deliver(
        &self,
        endpoint: Endpoint,
        conversation_id: &str,
        payload: Payload,
    ) -> (Outcome, Answer, Option<String>) {
        let (uuid, payload_text) = match payload {
            Payload::Text { uuid, text } => (uuid, text),
            Payload::File { uuid, file } => (uuid, file),
            Payload::Review => {
                let id = Uuid::new_v4();
                let message = responses::review_message(id, Stamp::now());
                return (
                    Outcome::Ok,
                    Answer::Message(Box::new(message)),
                    Some(id.to_string()),
                );
            }
            Payload::Assign { agent_id } => {
                let conversation =
                    responses::conversation(conversation_id, &agent_id, Stamp::now());
                return (
                    Outcome::Ok,
                    Answer::Conversation(Box::new(conversation)),
                    None,
                );
            }
        };
        let (outcome, message_id, file_id, stamp, endpoint, payload_text) = {
            let mut deliveries = lock(&self.deliveries);
            match deliveries.get(&uuid) {
                Some(d) => (
                    Outcome::Duplicate,
                    d.message_id,
                    d.file_id,
                    d.stamp,
                    d.endpoint,
                    d.payload.clone(),
                ),
                None => {
                    let d = Delivered {
                        message_id: Uuid::new_v4(),
                        file_id: Uuid::new_v4(),
                        stamp: Stamp::now(),
                        payload: payload_text,
                        endpoint,
                    };
                    let r = (
                        Outcome::Ok,
                        d.message_id,
                        d.file_id,
                        d.stamp,
                        d.endpoint,
                        d.payload.clone(),
                    );
                    deliveries.insert(uuid, d);
                    r
                }
            }
        };
        let message = if endpoint == Endpoint::SendFileMessage {
            responses::file_message(message_id, file_id, &payload_text, stamp)
        } else {
            responses::text_message(message_id, &payload_text, stamp)
        };
        (
            outcome,
            Answer::Message(Box::new(message)),
            Some(message_id.to_string()),
        )
    }
}

/// The `data` of a successful answer.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Answer {
    Message(Box<Message>),
    Conversation(Box<Conversation>),
}

fn rate_limited(config: &SandboxConfig, status: StatusCode) -> Response {
    let mut response = plain_status(status);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(config.retry_after_secs),
    );
    response
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

async fn handle(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    arrived: Instant,
    ts: OffsetDateTime,
) -> Response {
    let config = shared.config();
    let path = uri.path();
    let routed = route(path).filter(|_| method == Method::POST);
    let endpoint = routed.map_or(Endpoint::Other, |(e, _)| e);
    let conversation_id = routed.map(|(_, raw)| {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned()
    });
    let token_ok = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == config.token.as_bytes());
    let content_type = header_str(&headers, header::CONTENT_TYPE);
    let (raw, unreadable) = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => (b, false),
        Err(_) => (axum::body::Bytes::new(), true),
    };
    let body: Value = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&raw).unwrap_or(Value::Null)
    };
    let field = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_owned);

    let mut rec = RecordedRequest {
        ts: rfc3339_ms(ts),
        seq: 0,
        method: method.to_string(),
        path: path.to_owned(),
        query: uri.query().map(str::to_owned),
        endpoint,
        conversation_id: conversation_id.clone(),
        authorization_ok: token_ok,
        content_type: content_type.clone(),
        uuid: field("uuid"),
        agent_id: field("agentId"),
        body_bytes: raw.len(),
        body,
        status: 0,
        outcome: Outcome::Ok,
        message_id: None,
        latency_ms: 0,
    };
    let finish = |mut rec: RecordedRequest, outcome: Outcome, response: Response| {
        rec.status = response.status().as_u16();
        rec.outcome = outcome;
        rec.latency_ms = arrived.elapsed().as_millis() as u64;
        shared.record(rec, config.max_records);
        response
    };

    if config.down {
        return finish(
            rec,
            Outcome::InjectedError,
            plain_status(StatusCode::SERVICE_UNAVAILABLE),
        );
    }
    let (latency, injection) = shared.roll(&config);
    shared.sleep(latency).await;

    let (Some(conversation_id), true) = (conversation_id, endpoint != Endpoint::Other) else {
        return finish(rec, Outcome::NotFound, plain_status(StatusCode::NOT_FOUND));
    };
    if !token_ok {
        return finish(
            rec,
            Outcome::Unauthorized,
            plain_status(StatusCode::UNAUTHORIZED),
        );
    }
    if unreadable {
        let status = StatusCode::PAYLOAD_TOO_LARGE;
        let error = format!("body over {MAX_BODY} bytes, or interrupted");
        let body = json!({ "status": status.as_u16(), "data": null, "error": error });
        return finish(rec, Outcome::BadRequest, json_response(status, &body));
    }
    let payload = match validate(endpoint, content_type.as_deref(), &raw, &rec.body) {
        Ok(p) => p,
        Err((status, error)) => {
            let body = json!({ "status": status.as_u16(), "data": null, "error": error });
            return finish(rec, Outcome::BadRequest, json_response(status, &body));
        }
    };

    match injection {
        Injection::None => {}
        Injection::RateLimited => {
            let response = rate_limited(&config, StatusCode::TOO_MANY_REQUESTS);
            return finish(rec, Outcome::Injected429, response);
        }
        Injection::Error(status) => {
            return finish(rec, Outcome::InjectedError, plain_status(status));
        }
        Injection::Stall => {
            // Recorded now, not when the stall ends: the client will have given up by then, and
            // tests want to see the attempt without waiting for it.
            let status = StatusCode::GATEWAY_TIMEOUT;
            rec.status = status.as_u16();
            rec.outcome = Outcome::InjectedTimeout;
            rec.latency_ms = arrived.elapsed().as_millis() as u64;
            shared.record(rec, config.max_records);
            shared.sleep(Duration::from_secs(config.timeout_secs)).await;
            return plain_status(status);
        }
    }

    if config.forbidden_conversations.contains(&conversation_id) {
        return finish(
            rec,
            Outcome::InjectedError,
            plain_status(StatusCode::FORBIDDEN),
        );
    }
    let mut answer_status = StatusCode::OK;
    if let Some(code) = config.status_override {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::TOO_MANY_REQUESTS {
            return finish(rec, Outcome::Injected429, rate_limited(&config, status));
        }
        if !status.is_success() {
            return finish(rec, Outcome::InjectedError, plain_status(status));
        }
        answer_status = status;
    }
    if let Some(code) = config.body_status_override
        && !(200..300).contains(&code)
    {
        let body = Envelope::<()> {
            status: code,
            data: None,
        };
        return finish(
            rec,
            Outcome::InjectedError,
            json_response(StatusCode::OK, &body),
        );
    }

    let (outcome, data, message_id) = shared.deliver(endpoint, &conversation_id, payload);
    let envelope = Envelope {
        status: config.body_status_override.unwrap_or(200),
        data: Some(data),
    };
    rec.message_id = message_id;
    finish(rec, outcome, json_response(answer_status, &envelope))
}
