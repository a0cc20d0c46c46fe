//! Health states (draining, starting, storage unreachable), what draining does to open
//! connections, metrics content, slow clients, the app without storage.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Polls `/healthz` until `pred(status, body)` holds (bounded, generous).
async fn wait_health(node: &TestNode, what: &str, pred: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = get(node.addr, "/healthz").await;
        let body = String::from_utf8_lossy(&response.body).into_owned();
        if pred(response.status, &body) {
            return (response.status, body);
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: still {} {body:?}", response.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP port on 127.0.0.1 with nothing listening.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn draining_says_503_and_moves_keep_alive_clients_away() {
    let node = start_release(&[], |_| {}).await;
    let (mut h1, _) = http1_connect(node.addr).await;
    let mut h2 = http2_connect(node.addr).await;
    for sender in [&mut h2] {
        let response = within(sender.send_request(request("GET", "/healthz", ""))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        collect(response).await;
    }
    let response = within(h1.send_request(request("GET", "/healthz", ""))).await.unwrap();
    assert!(response.headers().get("connection").is_none());
    collect(response).await;

    node.handle.set_draining(true);
    let health = get(node.addr, "/healthz").await;
    assert_eq!(health.status, 503);
    assert_eq!(health.body, b"draining");
    assert_eq!(node.handle.health(), Err("draining".to_owned()));

    // HTTP/1.1: the next response is still served, and says the connection closes.
    let response = within(h1.send_request(request("GET", "/css/site.css", ""))).await.unwrap();
    assert_eq!(response.headers()["connection"], "close");
    assert_eq!(collect(response).await.1.as_ref(), b"body { color: #123; }\n");
    within(async {
        while h1.ready().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // HTTP/2: the server sent GOAWAY; the connection takes no new streams.
    within(async {
        loop {
            match h2.ready().await {
                Err(_) => break,
                Ok(()) => match h2.send_request(request("GET", "/healthz", "")).await {
                    Err(_) => break,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
            }
        }
    })
    .await;

    // Requests on new connections are still answered while draining.
    assert_eq!(get(node.addr, "/css/site.css").await.status, 200);

    node.handle.set_draining(false);
    let health = get(node.addr, "/healthz").await;
    assert_eq!((health.status, health.body.as_slice()), (200, &b"ok"[..]));
    let (mut h1, _) = http1_connect(node.addr).await;
    let response = within(h1.send_request(request("GET", "/", ""))).await.unwrap();
    assert!(response.headers().get("connection").is_none());
}

#[tokio::test]
async fn unreachable_storage_at_start_is_starting_and_the_app_says_503() {
    let port = closed_port();
    let node = start_release(&[], |config| config.db_url = Some(format!("mysql://u:p@127.0.0.1:{port}/notes"))).await;
    let (status, body) = wait_health(&node, "storage schema error", |_, b| b.contains("storage schema not ready")).await;
    assert_eq!(status, 503);
    assert!(body.starts_with("starting: storage schema not ready:"), "{body}");
    // Static files and whoami do not need storage.
    assert_eq!(get(node.addr, "/css/site.css").await.status, 200);
    assert_eq!(get(node.addr, "/whoami").await.status, 200);
    let api = get(node.addr, "/api/notes").await;
    assert_eq!(api.status, 503);
    assert_eq!(api.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&api.body).unwrap();
    assert!(json["error"].as_str().unwrap().starts_with("storage unavailable"), "{json}");
    let page = get(node.addr, "/app").await;
    assert_eq!(page.status, 503);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
}

#[tokio::test]
async fn without_storage_the_app_is_503_and_static_works() {
    let node = start_release(&[], |_| {}).await;
    assert_eq!(get(node.addr, "/healthz").await.status, 200);
    for path in ["/app", "/api/notes", "/api/notes/1"] {
        let response = get(node.addr, path).await;
        assert_eq!(response.status, 503, "{path}");
        assert!(String::from_utf8_lossy(&response.body).contains("storage not configured"), "{path}");
    }
    let post = raw(
        node.addr,
        b"POST /api/notes HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert_eq!(post.status, 503);
    let wrong = raw(node.addr, b"DELETE /api/notes HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("GET, HEAD, POST"));
    assert_eq!(get(node.addr, "/api/other").await.status, 404);
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let node = start_release(&[], |_| {}).await;
    for _ in 0..3 {
        assert_eq!(get(node.addr, "/css/site.css").await.status, 200);
    }
    assert_eq!(get(node.addr, "/nope").await.status, 404);
    assert_eq!(get(node.addr, "/whoami").await.status, 200);
    let response = get(node.addr, "/metrics").await;
    assert_eq!(response.status, 200);
    assert!(response.header("content-type").unwrap().starts_with("application/openmetrics-text"));
    let text = String::from_utf8(response.body).unwrap();
    for line in [
        "web_requests_total{route=\"static\",method=\"GET\",status=\"200\"} 3",
        "web_requests_total{route=\"static\",method=\"GET\",status=\"404\"} 1",
        "web_requests_total{route=\"whoami\",method=\"GET\",status=\"200\"} 1",
        "web_request_duration_seconds_count{route=\"static\"} 4",
        // The scrape itself is in flight.
        "web_requests_in_flight 1",
        "web_release_info{version=\"1.0.0\"} 1",
        "web_ready 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(text.contains("web_request_duration_seconds_bucket{le="), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));
    node.handle.set_draining(true);
    let text = String::from_utf8(get(node.addr, "/metrics").await.body).unwrap();
    assert!(text.lines().any(|l| l == "web_ready 0"), "{text}");
}

#[tokio::test]
async fn slow_clients_do_not_hold_the_node() {
    let node = start_release(&[], |config| {
        config.header_read_timeout = Duration::from_secs(1);
        config.request_timeout = Duration::from_secs(1);
    })
    .await;

    // A request head that never ends: the connection is closed.
    let mut slow_head = TcpStream::connect(node.addr).await.unwrap();
    slow_head.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ").await.unwrap();
    // A body that never ends: 408.
    let mut slow_body = TcpStream::connect(node.addr).await.unwrap();
    slow_body
        .write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly a few bytes")
        .await
        .unwrap();
    // Meanwhile others are served.
    assert_eq!(get(node.addr, "/healthz").await.status, 200);

    let mut rest = Vec::new();
    within(slow_head.read_to_end(&mut rest)).await.expect("closed by the server");
    assert!(rest.is_empty() || parse_response(&rest).status == 408, "{:?}", String::from_utf8_lossy(&rest));

    let response = within(read_response(&mut slow_body)).await;
    assert_eq!(response.status, 408);
    assert_eq!(get(node.addr, "/healthz").await.status, 200);
}

/// The listeners defer `accept` until a connection's first bytes arrive (`TCP_DEFER_ACCEPT`):
/// a client that connects and speaks only after the deferral's second is still served, as
/// are others meanwhile.
#[tokio::test]
async fn a_client_that_waits_before_its_request_is_served() {
    let node = start_release(&[], |_| {}).await;
    let mut late = TcpStream::connect(node.addr).await.unwrap();
    assert_eq!(get(node.addr, "/healthz").await.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    late.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.unwrap();
    let response = within(read_response(&mut late)).await;
    assert_eq!(response.status, 200);
}

/// A client may close its sending side once its request is out (`shutdown(SHUT_WR)`, as
/// `nc -q` does) and still gets the answer: HTTP/1.1 connections allow half-closure (which
/// also spares the server a read per connection while it answers).
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let node = start_release(&[], |_| {}).await;
    let mut c = TcpStream::connect(node.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    c.shutdown().await.unwrap();
    let response = within(read_response(&mut c)).await;
    assert_eq!(response.status, 200);
}
