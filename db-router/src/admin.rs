//! The router's admin HTTP API (hyper):
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` | everything registered in the [`Registry`] (router and monitor), OpenMetrics text |
//! | `GET /status` | JSON: primary, read replica, generation, backends (role, lag, GTIDs, errors), last failover |
//! | `GET /live` | 200 while the process serves |
//! | `GET /ready` | 200 when a primary is published, else 503 |
//! | `POST /rejoin[?backend=IP:PORT]` | makes a fenced old primary (or the named backend) a replica of the primary; 409 with the reason when that does not apply |
//!
//! Bad requests get a 4xx status and a one-line reason. Bind it to loopback: `/rejoin`
//! changes replication.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;

use crate::monitor::{MonitorHandle, RejoinError};

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut body = body.into();
    body.push('\n');
    reply(status, "text/plain; charset=utf-8", body)
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    body.push(b'\n');
    reply(status, "application/json", body)
}

/// What the admin server shows and controls.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub monitor: Option<MonitorHandle>,
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        let allowed = match path {
            "/metrics" | "/status" | "/live" | "/ready" => Method::GET,
            "/rejoin" => Method::POST,
            other => {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("no such endpoint {other:?}: try GET /metrics, /status, /live, /ready or POST /rejoin"),
                )
            }
        };
        if req.method() != allowed && !(allowed == Method::GET && req.method() == Method::HEAD) {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes {allowed}"));
            r.headers_mut().insert(header::ALLOW, allowed.as_str().parse().expect("method is a header value"));
            return r;
        }
        match path {
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", out),
                    Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed"),
                }
            }
            "/live" => text(StatusCode::OK, "ok"),
            "/ready" => match &self.monitor {
                Some(m) if m.status().primary.is_none() => text(StatusCode::SERVICE_UNAVAILABLE, "no primary published"),
                _ => text(StatusCode::OK, "ok"),
            },
            "/status" => match &self.monitor {
                Some(m) => {
                    let status = m.status();
                    let mut v = serde_json::to_value(&status).expect("status serializes");
                    if status.backends.iter().any(|b| b.role == crate::monitor::decide::Role::Stale) {
                        v["hint"] = json!("a backend is fenced and not replicating: POST /rejoin makes it a replica of the primary");
                    }
                    json(StatusCode::OK, &v)
                }
                None => text(StatusCode::NOT_FOUND, "no monitor runs in this process"),
            },
            _ => self.rejoin(req.uri().query()).await,
        }
    }

    async fn rejoin(&self, query: Option<&str>) -> Response<Body> {
        let Some(monitor) = &self.monitor else {
            return text(StatusCode::NOT_FOUND, "no monitor runs in this process");
        };
        let mut target = None;
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "backend" => match v.parse::<SocketAddr>() {
                    Ok(a) => target = Some(a),
                    Err(_) => {
                        return text(StatusCode::BAD_REQUEST, format!("backend={v:?} is not IP:PORT"));
                    }
                },
                other => return text(StatusCode::BAD_REQUEST, format!("unknown parameter {other:?}: only backend=IP:PORT")),
            }
        }
        match monitor.rejoin(target).await {
            Ok(report) => json(StatusCode::OK, &serde_json::to_value(report).expect("report serializes")),
            Err(e) => {
                let status = match e {
                    RejoinError::NotApplicable(_) => StatusCode::CONFLICT,
                    RejoinError::Failed { .. } => StatusCode::BAD_GATEWAY,
                    RejoinError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
                };
                text(status, e.to_string())
            }
        }
    }
}

/// Serves the admin API on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, admin: Admin) {
    let admin = Arc::new(admin);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds `addr` and serves in a new task; returns the bound address (port 0 picks one).
pub async fn spawn(addr: SocketAddr, admin: Admin) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, tokio::spawn(serve(listener, admin))))
}
