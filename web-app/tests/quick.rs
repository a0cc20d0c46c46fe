//! The quick path (HTTP/1.1 GET/HEAD of files kept in memory, answered without hyper): the
//! same bytes as hyper's answers, hand-over to hyper in the middle of a connection, heads in
//! pieces or too large for it, and hyper's timeouts and shutdown for the connections it holds.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Files of the test release: small text (cached, gzip variant), a precompressed `.br`
/// variant, a 64 KiB binary (cached, sent with sendfile on plain HTTP).
fn extra_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("js/app.js", "console.log('quick');\n".repeat(30).into_bytes()),
        ("js/app.js.br", b"not really brotli, served as the br variant".to_vec()),
        ("data/blob.bin", pattern(64 * 1024)),
        ("my file.txt", b"a name with a space\n".to_vec()),
    ]
}

/// Two nodes serving the same release: the quick path on (first) and off (second).
async fn quick_and_hyper() -> (TestNode, TestNode) {
    let files = extra_files();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    let quick = start_release(&refs, |_| {}).await;
    let mut config = web_app::Config::with_releases(quick.releases());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.node = NODE.to_owned();
    config.quick_path = false;
    let hyper = launch(tempfile::tempdir().unwrap(), config).await;
    (quick, hyper)
}

/// The bytes of a connection's responses without their `date` lines (the only header that
/// may differ between two servers answering the same request).
fn without_date(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    let mut rest = &text[..];
    while let Some(i) = rest.find("\r\ndate: ") {
        out.push_str(&rest[..i]);
        let end = rest[i + 2..].find("\r\n").map_or(rest.len(), |e| i + 2 + e);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Sends `request` on a new connection and returns all the bytes until the server closes it.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    within(async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.unwrap();
        bytes
    })
    .await
}

#[tokio::test]
async fn quick_answers_are_hypers_answers() {
    let (quick, hyper) = quick_and_hyper().await;
    let first = get(quick.addr, "/index.html").await;
    let etag = first.header("etag").unwrap().to_owned();
    let modified = first.header("last-modified").unwrap().to_owned();
    let gzip_etag = format!("{}-gzip\"", etag.trim_end_matches('"'));
    let requests: Vec<String> = vec![
        "GET /index.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "HEAD /index.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET /css/site.css?v=3&x=%41 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET /css%2Fsite.css HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET /my%20file.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET /data/blob.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET /index.html HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip, deflate\r\nConnection: close\r\n\r\n".into(),
        "GET /js/app.js HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip, br\r\nConnection: close\r\n\r\n".into(),
        "GET /js/app.js HTTP/1.1\r\nHost: t\r\nAccept-Encoding: br;q=0\r\naccept-encoding: gzip\r\nConnection: close\r\n\r\n".into(),
        "GET /js/app.js HTTP/1.1\r\nHost: t\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n".into(),
        format!("GET /index.html HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"x\", {etag}\r\nConnection: close\r\n\r\n"),
        format!("GET /index.html HTTP/1.1\r\nHost: t\r\nIf-None-Match: {etag}\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"),
        format!("GET /index.html HTTP/1.1\r\nHost: t\r\nIf-None-Match: {gzip_etag}\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"),
        format!("HEAD /index.html HTTP/1.1\r\nHost: t\r\nIf-None-Match: W/{etag}\r\nConnection: close\r\n\r\n"),
        format!("GET /index.html HTTP/1.1\r\nHost: t\r\nIf-Modified-Since: {modified}\r\nConnection: close\r\n\r\n"),
        format!("GET /index.html HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"other\"\r\nIf-Modified-Since: {modified}\r\nConnection: close\r\n\r\n"),
        "GET /index.html HTTP/1.1\r\nHost: t\r\nIf-Modified-Since: not a date\r\nConnection: close\r\n\r\n".into(),
        "GET /index.html HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"caf\u{e9}\"\r\nConnection: close\r\n\r\n".into(),
        "get /index.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET /index.html HTTP/1.1\r\nhOsT: t\r\nCONNECTION: Keep-Alive, Close\r\n\r\n".into(),
        // Keep-alive: two answers, the second closes.
        "GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\nHEAD /js/app.js HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        // Not for the quick path: the same from hyper either way.
        "GET /index.html HTTP/1.0\r\nHost: t\r\n\r\n".into(),
        "GET /index.html HTTP/1.1\r\nHost: t\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n".into(),
        "GET /nope.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET /../secret.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET http://t/index.html HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".into(),
        "GET /index.html HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc".into(),
        "GET /index.html HTTP/1.1\r\nHost t\r\n\r\n".into(),
        "GET /index.html\r\n\r\n".into(),
    ];
    for request in &requests {
        let from_quick = exchange(quick.addr, request.as_bytes()).await;
        let from_hyper = exchange(hyper.addr, request.as_bytes()).await;
        assert!(!from_hyper.is_empty() || request.contains("Host t") || !request.contains("HTTP/1.1"), "{request:?}: no answer");
        assert_eq!(without_date(&from_quick), without_date(&from_hyper), "{request:?}");
        if !from_quick.is_empty() {
            let head_end = from_quick.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let head = String::from_utf8_lossy(&from_quick[..head_end]);
            assert_eq!(head.matches("\r\ndate: ").count(), 1, "{request:?}: {head}");
        }
    }
    // A few of them in detail: the comparison above is not between two empty answers.
    let both = split_responses(
        &exchange(quick.addr, requests[21].as_bytes()).await,
        &[false, true],
    );
    assert_eq!(both[0].status, 200);
    assert_eq!(both[0].body, b"body { color: #123; }\n");
    assert_eq!(both[1].header("content-encoding"), None);
    let br = parse_response(&exchange(quick.addr, requests[8].as_bytes()).await);
    assert_eq!((br.status, br.header("content-encoding")), (200, Some("br")));
    assert_eq!(br.body, b"not really brotli, served as the br variant");
    let blob = parse_response(&exchange(quick.addr, requests[6].as_bytes()).await);
    assert_eq!(blob.body, pattern(64 * 1024));
    let not_modified = parse_response(&exchange(quick.addr, requests[11].as_bytes()).await);
    assert_eq!((not_modified.status, not_modified.header("etag")), (304, Some(etag.as_str())));
}

#[tokio::test]
async fn hyper_takes_over_in_the_middle_of_a_connection() {
    let files = extra_files();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    let node = start_release(&refs, |_| {}).await;
    // Pipelined: cached file, upload (hyper from here on), cached file, whoami.
    let pipelined = b"GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\n\
        POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
        HEAD /data/blob.bin HTTP/1.1\r\nHost: t\r\n\r\n\
        GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\n\
        GET /whoami HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let responses = split_responses(&exchange(node.addr, pipelined).await, &[false, false, true, false, false]);
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200]);
    assert_eq!(responses[0].body, b"body { color: #123; }\n");
    let upload: serde_json::Value = serde_json::from_slice(&responses[1].body).unwrap();
    assert_eq!(upload["bytes"], 5, "{upload}");
    assert_eq!(responses[2].header("content-length"), Some("65536"));
    assert_eq!(responses[3].body, responses[0].body);
    let whoami: serde_json::Value = serde_json::from_slice(&responses[4].body).unwrap();
    assert_eq!(whoami["node"], NODE);

    // One request at a time on a keep-alive connection (hyper's client): quick, hyper, hyper.
    let (mut client, _) = http1_connect(node.addr).await;
    for (method, path, status) in [("GET", "/index.html", 200), ("POST", "/upload", 200), ("GET", "/index.html", 200), ("GET", "/nope", 404)] {
        within(client.ready()).await.expect("connection still open");
        let response = within(client.send_request(request(method, path, "abc"))).await.unwrap();
        let (parts, body) = collect(response).await;
        assert_eq!(parts.status, status, "{method} {path}");
        if path == "/index.html" {
            assert!(body.starts_with(b"<!doctype html><title>v1.0.0</title>"));
        }
    }
}

#[tokio::test]
async fn heads_in_pieces_or_too_large_for_the_quick_path_are_answered() {
    let node = start_release(&[], |_| {}).await;
    // In pieces, pausing inside the request line and the headers.
    let mut c = TcpStream::connect(node.addr).await.unwrap();
    for piece in ["GE", "T /css/site.css HT", "TP/1.1\r\nHost: t\r", "\nConnection: close\r\n", "\r\n"] {
        c.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let response = within(read_response(&mut c)).await;
    assert_eq!((response.status, response.body.as_slice()), (200, &b"body { color: #123; }\n"[..]));

    // More header lines than the quick path takes, and a head larger than it reads.
    let many: String = (0..60).map(|i| format!("X-Header-{i}: {i}\r\n")).collect();
    let large = format!("X-Large: {}\r\n", "a".repeat(12 * 1024));
    for extra in [many, large] {
        let request = format!("GET /css/site.css HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n");
        let response = raw(node.addr, request.as_bytes()).await;
        assert_eq!((response.status, response.body.as_slice()), (200, &b"body { color: #123; }\n"[..]));
    }
    // After all that, the node still serves.
    assert_eq!(get(node.addr, "/css/site.css").await.status, 200);
}

/// Reads one response of a keep-alive connection (by its content-length).
async fn read_one(c: &mut TcpStream) -> RawResponse {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_response(&bytes[..end + 4]);
            let len: usize = head.header("content-length").map_or(0, |l| l.parse().unwrap());
            if bytes.len() >= end + 4 + len {
                return parse_response(&bytes[..end + 4 + len]);
            }
        }
        let n = within(c.read(&mut buf)).await.unwrap();
        assert!(n > 0, "connection closed before a whole response");
        bytes.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn idle_connections_close_after_the_header_timeout_and_at_shutdown() {
    let mut node = start_release(&[], |config| config.header_read_timeout = Duration::from_secs(1)).await;
    let mut idle = TcpStream::connect(node.addr).await.unwrap();
    idle.write_all(b"GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    assert_eq!(read_one(&mut idle).await.status, 200);
    // Half a head, then nothing.
    let mut partial = TcpStream::connect(node.addr).await.unwrap();
    partial.write_all(b"GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\nGET /css/site.css HTT").await.unwrap();
    assert_eq!(read_one(&mut partial).await.status, 200);
    let since = Instant::now();
    let mut rest = Vec::new();
    within(idle.read_to_end(&mut rest)).await.expect("idle connection closed");
    assert!(rest.is_empty());
    within(partial.read_to_end(&mut rest)).await.expect("connection with half a head closed");
    assert!(rest.is_empty());
    let waited = since.elapsed();
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_secs(5), "closed after {waited:?}");

    // Shutdown closes a connection waiting for its next request at once.
    let mut waiting = TcpStream::connect(node.addr).await.unwrap();
    waiting.write_all(b"GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    assert_eq!(read_one(&mut waiting).await.status, 200);
    node.trigger_stop();
    let since = Instant::now();
    within(waiting.read_to_end(&mut rest)).await.expect("closed at shutdown");
    assert!(since.elapsed() < Duration::from_millis(900), "closed after {:?}", since.elapsed());
    node.stop().await.expect("clean stop");
}

#[tokio::test]
async fn draining_answers_close_the_connection() {
    let node = start_release(&[], |_| {}).await;
    let mut c = TcpStream::connect(node.addr).await.unwrap();
    c.write_all(b"GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    assert_eq!(read_one(&mut c).await.header("connection"), None);
    node.handle.set_draining(true);
    c.write_all(b"GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let response = within(read_response(&mut c)).await;
    assert_eq!((response.status, response.header("connection")), (200, Some("close")));
}

/// Bytes a client sends after a request that closes the connection are not read: the answer
/// still arrives whole (a close with unread bytes would send a reset instead of it).
#[tokio::test]
async fn bytes_after_a_closing_request_do_not_cost_its_answer() {
    let files = extra_files();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    let node = start_release(&refs, |_| {}).await;
    for path in ["/css/site.css", "/data/blob.bin"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        let response = parse_response(&exchange(node.addr, request.as_bytes()).await);
        assert_eq!(response.status, 200, "{path}");
        let len: usize = response.header("content-length").unwrap().parse().unwrap();
        assert_eq!(response.body.len(), len, "{path}: the answer whole, and nothing after it");
        // The same with the extra bytes arriving just after the request.
        let answer = within(async {
            let mut c = TcpStream::connect(node.addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
            c.write_all(b"GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
            let mut bytes = Vec::new();
            c.read_to_end(&mut bytes).await.map(|_| bytes)
        })
        .await
        .expect("no reset");
        assert_eq!(parse_response(&answer).body.len(), len, "{path}");
        // A head of exactly the first read's 2 KiB, more bytes behind it in the socket: the
        // server has read all of the request and none of the rest.
        let start = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Pad: ");
        let head = format!("{start}{}\r\n\r\n", "p".repeat(2048 - start.len() - 4));
        assert_eq!(head.len(), 2048);
        let mut request = head.into_bytes();
        request.extend_from_slice(&[b'x'; 10_000]);
        let response = parse_response(&exchange(node.addr, &request).await);
        assert_eq!((response.status, response.body.len()), (200, len), "{path}: padded head");
    }
}

/// A new connection's last answer that the socket does not take at once (a client with a small
/// segment size: the server's send buffer starts small) is written on when the socket has
/// room: all of it arrives.
#[tokio::test]
async fn a_closing_answer_larger_than_the_socket_takes_at_once_arrives_whole() {
    let big = pattern(200 * 1024);
    let node = start_release(&[("big.bin", big.as_slice()), ("data/blob.bin", &pattern(64 * 1024))], |_| {}).await;
    for (path, body) in [("/big.bin", big.clone()), ("/data/blob.bin", pattern(64 * 1024))] {
        let bytes = within(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            let mss: libc::c_int = 536;
            // SAFETY: setsockopt on our own socket with a pointer to an int of the size given.
            let set = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    libc::IPPROTO_TCP,
                    libc::TCP_MAXSEG,
                    (&mss as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(set, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
            let mut c = socket.connect(node.addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
            // Read slowly at first, so that the server finds its socket full.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let mut bytes = Vec::new();
            c.read_to_end(&mut bytes).await.unwrap();
            bytes
        })
        .await;
        let response = parse_response(&bytes);
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.header("connection"), Some("close"), "{path}");
        assert!(response.body == body, "{path}: {} bytes of {}", response.body.len(), body.len());
    }
}
