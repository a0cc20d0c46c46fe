//! The small HTTP client of `lbd status`, `lbd ctl` and `lbd deploy`: one request, a
//! bounded wait, the body as text.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

/// How long one request may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `method uri` (with `Authorization: Bearer token` when given) and returns the status
/// and the body.
pub async fn request(method: Method, uri: &str, token: Option<&str>, body: String) -> Result<(StatusCode, String)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {}", t.trim()));
    }
    let req = req.body(Full::new(Bytes::from(body))).with_context(|| format!("bad request URI {uri}"))?;
    let exchange = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, exchange).await.with_context(|| format!("{uri}: no answer within {TIMEOUT:?}"))?
}

/// GET `uri`, requiring a 2xx answer.
pub async fn get_ok(uri: &str) -> Result<String> {
    let (status, body) = request(Method::GET, uri, None, String::new()).await?;
    anyhow::ensure!(status.is_success(), "{uri}: {status}: {}", body.trim());
    Ok(body)
}
