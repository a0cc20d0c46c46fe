//! The HTTP side of the node: one tokio task per connection, HTTP/1.1 (keep-alive) and
//! cleartext HTTP/2 through hyper-util's auto builder, graceful shutdown, and the routes.
//!
//! Routes: `GET /whoami`, `GET /healthz`, `POST|PUT /upload`, and GET/HEAD on any other path
//! serves a static file from the root through tower-http's `ServeDir`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceExt;
use tower_http::services::ServeDir;
use tracing::{debug, info, warn};

use crate::config::Config;

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every response.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How long a client may take to send the request head (slow-loris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After rejecting an oversized upload, read and discard at most this much more of it, so the
/// client gets to read the 413 instead of a connection reset...
const DRAIN_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// ...for at most this long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Shared, read-only state of the request handlers.
struct State {
    node: String,
    version: String,
    max_upload_bytes: u64,
    static_files: ServeDir,
}

/// A bound, not yet running HTTP server. `bind` then `run`; `local_addr` in between tells the
/// port when the configuration asked for port 0.
pub struct HttpServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    shutdown_grace: Duration,
    state: Arc<State>,
}

impl HttpServer {
    /// Binds `config.listen`. Files are served from `config.root`.
    pub async fn bind(config: &Config) -> anyhow::Result<HttpServer> {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding HTTP listener on {}", config.listen))?;
        let local_addr = listener.local_addr().context("HTTP listener address")?;
        let state = State {
            node: config.node.clone(),
            version: config.version.clone(),
            max_upload_bytes: config.max_upload_bytes,
            static_files: ServeDir::new(&config.root).append_index_html_on_directories(true),
        };
        Ok(HttpServer { listener, local_addr, shutdown_grace: config.shutdown_grace, state: Arc::new(state) })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until `shutdown` completes, then stops accepting and gives the open
    /// connections `shutdown_grace` to finish their in-flight requests (idle keep-alive
    /// connections are closed at once). Connections still busy after that are dropped.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let HttpServer { listener, local_addr, shutdown_grace, state } = self;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
        builder.http2().timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);

        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Typically EMFILE/ENFILE: back off instead of spinning.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let local = match stream.local_addr() {
                        Ok(local) => local,
                        Err(e) => {
                            debug!(%peer, error = %e, "connection gone before it was served");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let state = Arc::clone(&state);
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, req, local, peer).await) }
                    });
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let conn = graceful.watch(conn);
                    connections.spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
            }
        }

        drop(listener);
        info!(%local_addr, open_connections = connections.len(), grace = ?shutdown_grace, "HTTP server shutting down");
        if tokio::time::timeout(shutdown_grace, graceful.shutdown()).await.is_err() {
            warn!(remaining = connections.len(), "grace period over, dropping busy connections");
            connections.abort_all();
        }
        while connections.join_next().await.is_some() {}
        info!(%local_addr, "HTTP server stopped");
        Ok(())
    }
}

/// Routes one request and logs it at debug level.
async fn handle(state: &State, req: Request<Incoming>, local: SocketAddr, peer: SocketAddr) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let version = req.version();
    let uri = req.uri().clone();
    let response = route(state, req, local, peer).await;
    debug!(
        %peer, %method, %uri, ?version,
        status = response.status().as_u16(),
        elapsed_us = start.elapsed().as_micros() as u64,
        "request"
    );
    response
}

async fn route(state: &State, req: Request<Incoming>, local: SocketAddr, peer: SocketAddr) -> Response<Body> {
    let method = req.method();
    let get_or_head = method == Method::GET || method == Method::HEAD;
    match req.uri().path() {
        "/whoami" if get_or_head => whoami(state, local, peer),
        "/healthz" if get_or_head => text(StatusCode::OK, "ok"),
        "/upload" if method == Method::POST || method == Method::PUT => upload(state, req).await,
        "/upload" => method_not_allowed("POST, PUT"),
        _ if get_or_head => static_file(state, req).await,
        _ => method_not_allowed("GET, HEAD"),
    }
}

#[derive(Serialize)]
struct WhoAmI<'a> {
    node: &'a str,
    version: &'a str,
    server_addr: String,
    client_addr: String,
}

fn whoami(state: &State, local: SocketAddr, peer: SocketAddr) -> Response<Body> {
    json(&WhoAmI {
        node: &state.node,
        version: &state.version,
        server_addr: local.to_string(),
        client_addr: peer.to_string(),
    })
}

#[derive(Serialize)]
struct UploadDigest {
    bytes: u64,
    sha256: String,
}

/// Hashes the request body as it streams in (nothing is buffered), or answers 413 once it is
/// known to be larger than the limit.
async fn upload(state: &State, req: Request<Incoming>) -> Response<Body> {
    let limit = state.max_upload_bytes;
    let http1 = req.version() <= Version::HTTP_11;
    let declared = content_length(req.headers());
    if declared.is_some_and(|len| len > limit) {
        // A client waiting for "100 Continue" never sends the body: no need to read it.
        let drained = !expects_continue(req.headers()) && drain(req.into_body(), declared).await;
        return too_large(limit, http1 && !drained);
    }

    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                debug!(error = %e, "upload body could not be read");
                return text(StatusCode::BAD_REQUEST, "could not read the request body\n");
            }
        };
        let Ok(data) = frame.into_data() else { continue }; // trailers
        received += data.len() as u64;
        if received > limit {
            let drained = drain(body, None).await;
            return too_large(limit, http1 && !drained);
        }
        hasher.update(&data);
    }
    json(&UploadDigest { bytes: received, sha256: hex::encode(hasher.finalize()) })
}

/// Reads and discards the rest of a rejected body, within `DRAIN_MAX_BYTES` and `DRAIN_TIMEOUT`.
/// True if the whole body was read (the connection can then be kept alive).
async fn drain(mut body: Incoming, declared: Option<u64>) -> bool {
    if declared.is_some_and(|len| len > DRAIN_MAX_BYTES) {
        return false;
    }
    let discard = async {
        let mut discarded: u64 = 0;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                discarded += data.len() as u64;
                if discarded > DRAIN_MAX_BYTES {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIMEOUT, discard).await.unwrap_or(false)
}

fn too_large(limit: u64, close: bool) -> Response<Body> {
    let mut response =
        text(StatusCode::PAYLOAD_TOO_LARGE, &format!("upload larger than the limit of {limit} bytes\n"));
    if close {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// GET/HEAD of a file under the root. `ServeDir` rejects `..` and other non-normal path
/// components (also percent-encoded ones), picks the content type, serves `index.html` for
/// directories and answers ranges and conditional requests. Its empty error bodies get a
/// short text reason.
async fn static_file(state: &State, req: Request<Incoming>) -> Response<Body> {
    let response = match state.static_files.clone().oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status();
    if (status.is_client_error() || status.is_server_error())
        && !response.headers().contains_key(header::CONTENT_TYPE)
    {
        let (mut parts, _) = response.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let reason = format!("{}\n", status.canonical_reason().unwrap_or("error").to_ascii_lowercase());
        let mut replaced = text(status, &reason);
        for (name, value) in parts.headers.iter() {
            if !replaced.headers().contains_key(name) {
                replaced.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return replaced;
    }
    response.map(|body| body.map_err(BoxError::from).boxed_unsync())
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(full(body.to_owned()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn json(value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(full(body));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => {
            warn!(error = %e, "JSON encoding failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}
