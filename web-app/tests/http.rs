//! HTTP behaviour of an in-process node on 127.0.0.1:0.

mod common;

use std::time::Duration;

use common::*;
use hyper::{StatusCode, Version};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn whoami_reports_node_version_and_addresses() {
    let node = start(|_, _| {}).await;
    let (mut client, client_addr) = http1_connect(node.addr).await;
    let response = within(client.send_request(request("GET", "/whoami", ""))).await.unwrap();
    let (parts, body) = collect(response).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["node"], NODE);
    assert_eq!(json["version"], VERSION);
    assert_eq!(json["server_addr"], node.addr.to_string());
    assert_eq!(json["client_addr"], client_addr.to_string());
    node.stop().await.unwrap();
}

#[tokio::test]
async fn version_defaults_to_the_version_file() {
    let node = start(|config, root| {
        std::fs::write(root.join("VERSION"), "  4.5.6\n").unwrap();
        config.version = web_app::config::version_from_root(root);
    })
    .await;
    let json: serde_json::Value = serde_json::from_slice(&get(node.addr, "/whoami").await.body).unwrap();
    assert_eq!(json["version"], "4.5.6");
}

#[tokio::test]
async fn healthz_says_ok() {
    let node = start(|_, _| {}).await;
    let response = get(node.addr, "/healthz").await;
    assert_eq!(response.status, 200);
    assert!(response.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(response.body, b"ok");
}

#[tokio::test]
async fn static_file_is_byte_exact_with_its_content_type() {
    let blob = pattern(300 * 1024 + 7);
    let node = start(|_, root| {
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("data/blob.bin"), pattern(300 * 1024 + 7)).unwrap();
        std::fs::write(root.join("style.css"), "body{}\n").unwrap();
    })
    .await;

    let response = get(node.addr, "/data/blob.bin").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some(blob.len().to_string().as_str()));
    assert!(response.body == blob, "served bytes differ from the file");

    let css = get(node.addr, "/style.css").await;
    assert_eq!(css.status, 200);
    assert_eq!(css.header("content-type"), Some("text/css"));
    assert_eq!(css.body, b"body{}\n");

    // HEAD: same headers, no body.
    let head = raw(node.addr, b"HEAD /data/blob.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(blob.len().to_string().as_str()));
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn index_html_for_directories() {
    let node = start(|_, root| {
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/index.html"), "sub index\n").unwrap();
    })
    .await;
    let response = get(node.addr, "/").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/html"));
    assert_eq!(response.body, INDEX.as_bytes());

    let sub = get(node.addr, "/sub/").await;
    assert_eq!(sub.status, 200);
    assert_eq!(sub.body, b"sub index\n");

    // Without the trailing slash: a redirect to it.
    let redirect = get(node.addr, "/sub").await;
    assert!((300..400).contains(&redirect.status), "status {}", redirect.status);
    assert_eq!(redirect.header("location"), Some("/sub/"));
}

#[tokio::test]
async fn missing_file_is_404_with_a_reason() {
    let node = start(|_, _| {}).await;
    let response = get(node.addr, "/no/such/file.txt").await;
    assert_eq!(response.status, 404);
    assert_eq!(response.body, b"not found\n");
}

#[tokio::test]
async fn path_traversal_never_escapes_the_root() {
    let node = start(|_, _| {}).await;
    assert!(node.root().join("../secret.txt").exists(), "fixture: the secret exists outside the root");
    let attempts = [
        "/../secret.txt",
        "/../etc/passwd",
        "/../../../../../../etc/passwd",
        "/%2e%2e/secret.txt",
        "/%2E%2E/%2E%2E/etc/passwd",
        "/%2e%2e%2fsecret.txt",
        "/..%2fsecret.txt",
        "/.%2e/secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e%5csecret.txt",
        "//etc/passwd",
        "/%2fetc%2fpasswd",
        "/./../secret.txt",
        "/%00../secret.txt",
    ];
    for path in attempts {
        let response = get(node.addr, path).await;
        assert!(
            response.status == 404 || response.status == 400,
            "{path}: status {} (expected 404 or 400)",
            response.status
        );
        let body = String::from_utf8_lossy(&response.body);
        assert!(!body.contains("TOP-SECRET") && !body.contains("root:"), "{path} leaked: {body}");
    }
    // Still serving afterwards.
    assert_eq!(get(node.addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn one_mib_upload_returns_length_and_sha256() {
    let node = start(|_, _| {}).await;
    let data = pattern(1024 * 1024);
    let expected = hex::encode(Sha256::digest(&data));
    let (mut client, _) = http1_connect(node.addr).await;
    for method in ["POST", "PUT"] {
        let response = within(client.send_request(request(method, "/upload", data.clone()))).await.unwrap();
        let (parts, body) = collect(response).await;
        assert_eq!(parts.status, StatusCode::OK, "{method}");
        assert_eq!(parts.headers["content-type"], "application/json");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["bytes"], 1024 * 1024, "{method}");
        assert_eq!(json["sha256"], expected.as_str(), "{method}");
    }

    // Empty body, and a chunked body without Content-Length.
    let empty = raw(node.addr, b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    let json: serde_json::Value = serde_json::from_slice(&empty.body).unwrap();
    assert_eq!(json["bytes"], 0);
    assert_eq!(json["sha256"], hex::encode(Sha256::digest(b"")).as_str());

    let chunked = raw(
        node.addr,
        b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(chunked.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&chunked.body).unwrap();
    assert_eq!(json["bytes"], 11);
    assert_eq!(json["sha256"], hex::encode(Sha256::digest(b"hello world")).as_str());
}

#[tokio::test]
async fn too_large_upload_gets_413() {
    const LIMIT: u64 = 64 * 1024;
    let node = start(|config, _| config.max_upload_bytes = LIMIT).await;

    // Exactly the limit is fine.
    let (mut client, _) = http1_connect(node.addr).await;
    let ok = within(client.send_request(request("POST", "/upload", pattern(LIMIT as usize)))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    collect(ok).await;

    // Declared too large (Content-Length).
    let response = within(client.send_request(request("POST", "/upload", pattern(4 * LIMIT as usize)))).await.unwrap();
    let (parts, body) = collect(response).await;
    assert_eq!(parts.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&body).contains("limit"), "reason: {body:?}");

    // The rejected body was drained: the same connection still works.
    let response = within(client.send_request(request("GET", "/healthz", ""))).await.unwrap();
    assert_eq!(collect(response).await.1.as_ref(), b"ok");

    // Found too large while streaming (chunked, no Content-Length).
    let chunk = vec![b'x'; 16 * 1024];
    let mut body = Vec::new();
    for _ in 0..8 {
        body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(&chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let mut request =
        b"PUT /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    request.extend_from_slice(&body);
    let response = raw(node.addr, &request).await;
    assert_eq!(response.status, 413);
    assert!(String::from_utf8_lossy(&response.body).contains("limit"));

    // Expect: 100-continue with a too-large Content-Length: 413 without sending the body.
    let response = raw(
        node.addr,
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 413);
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let node = start(|_, _| {}).await;
    let (mut client, client_addr) = http1_connect(node.addr).await;
    for i in 0..5 {
        let path = if i % 2 == 0 { "/whoami" } else { "/" };
        within(client.ready()).await.expect("connection still open");
        let response = within(client.send_request(request("GET", path, ""))).await.unwrap();
        assert_eq!(response.version(), Version::HTTP_11);
        let (parts, body) = collect(response).await;
        assert_eq!(parts.status, StatusCode::OK, "request {i}");
        if path == "/whoami" {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["client_addr"], client_addr.to_string(), "same connection");
        } else {
            assert_eq!(body.as_ref(), INDEX.as_bytes());
        }
    }

    // The same with pipelined raw requests: both answered on one connection.
    let response = raw(
        node.addr,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    let rest = String::from_utf8_lossy(&response.body);
    assert!(rest.starts_with("okHTTP/1.1 200 OK\r\n") && rest.ends_with("\r\n\r\nok"), "{rest:?}");
}

#[tokio::test]
async fn http2_prior_knowledge_works() {
    let node = start(|_, _| {}).await;
    let mut client = http2_connect(node.addr).await;
    for path in ["/whoami", "/healthz", "/"] {
        let response = within(client.send_request(request("GET", path, ""))).await.unwrap();
        assert_eq!(response.version(), Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        collect(response).await;
    }
    let data = pattern(200_000);
    let response = within(client.send_request(request("POST", "/upload", data.clone()))).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&collect(response).await.1).unwrap();
    assert_eq!(json["sha256"], hex::encode(Sha256::digest(&data)).as_str());
}

#[tokio::test]
async fn wrong_methods_get_405() {
    let node = start(|_, _| {}).await;
    for (method, path, allow) in [
        ("DELETE", "/index.html", "GET, HEAD"),
        ("POST", "/", "GET, HEAD"),
        ("POST", "/whoami", "GET, HEAD"),
        ("PUT", "/healthz", "GET, HEAD"),
        ("GET", "/upload", "POST, PUT"),
    ] {
        let response =
            raw(node.addr, format!("{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
                .await;
        assert_eq!(response.status, 405, "{method} {path}");
        assert_eq!(response.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(response.body, b"method not allowed\n");
    }
}

#[tokio::test]
async fn malformed_requests_do_not_hurt_the_server() {
    let node = start(|_, _| {}).await;
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\x01\x02 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ] {
        let mut bytes = Vec::new();
        within(async {
            let mut stream = TcpStream::connect(node.addr).await.unwrap();
            let _ = stream.write_all(garbage).await;
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut bytes).await;
        })
        .await;
        if !bytes.is_empty() {
            let response = parse_response(&bytes);
            assert!((400..500).contains(&response.status), "{garbage:?}: {}", response.status);
        }
    }
    // A client that connects and goes away.
    drop(TcpStream::connect(node.addr).await.unwrap());
    assert_eq!(get(node.addr, "/healthz").await.body, b"ok");
    node.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    // A grace period far longer than the bounded wait below: if the idle connection held the
    // shutdown up, the stop would wait it out and the bound would fail.
    let mut node = start(|config, _| config.shutdown_grace = Duration::from_secs(3600)).await;
    let mut stream = within(TcpStream::connect(node.addr)).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\nConnection: close\r\n\r\n12345")
        .await
        .unwrap();
    // An idle keep-alive connection must not hold the shutdown up.
    let (_idle, _) = http1_connect(node.addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    node.trigger_stop();
    // Every HTTP thread's accept loop sees the stop on its next turn and closes its socket.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(node.addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting 10 s after shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    stream.write_all(b"67890").await.unwrap();
    let response = within(read_response(&mut stream)).await;
    assert_eq!(response.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(json["bytes"], 10);
    assert_eq!(json["sha256"], hex::encode(Sha256::digest(b"1234567890")).as_str());
    // The idle connection was closed at once: no waiting out the grace period.
    tokio::time::timeout(Duration::from_secs(60), node.stop())
        .await
        .expect("an idle keep-alive connection held the shutdown up")
        .unwrap();
}

#[tokio::test]
async fn shutdown_grace_is_bounded() {
    let mut node = start(|config, _| config.shutdown_grace = Duration::from_millis(300)).await;
    // A request that never completes its body.
    let mut stream = within(TcpStream::connect(node.addr)).await.unwrap();
    stream.write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n123").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.trigger_stop();
    // The request never completes: only the grace period ends the shutdown.
    tokio::time::timeout(Duration::from_secs(60), node.stop())
        .await
        .expect("the shutdown waited past its grace period")
        .unwrap();
}
