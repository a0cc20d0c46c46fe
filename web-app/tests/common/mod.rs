//! Helpers shared by the integration tests: an in-process node on 127.0.0.1:0 with a
//! temporary root, a raw HTTP/1.1 exchange over a TcpStream, and hyper client connections.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use web_app::Config;

pub const NODE: &str = "web-test";
pub const VERSION: &str = "1.2.3-test";
pub const INDEX: &str = "<!doctype html><title>web-test</title>\n";

/// Bounds every network step so a broken server fails the test instead of hanging it.
pub async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut).await.expect("timed out")
}

/// A node running in the test's runtime, with its own temporary directory:
/// `base/root` is the node's root and `base/secret.txt` a file outside it.
pub struct TestNode {
    pub addr: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub udp: Option<SocketAddr>,
    pub handle: web_app::NodeHandle,
    pub base: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestNode {
    pub fn root(&self) -> PathBuf {
        self.base.path().join("root")
    }

    /// Triggers the graceful shutdown without waiting for it.
    pub fn trigger_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts the node down and returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.trigger_stop();
        let task = self.task.take().expect("node task");
        within(task).await.expect("node task panicked")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts a node with root `index.html` written; `configure` may adjust the config (and
/// write more files under the root it is given) before binding.
pub async fn start(configure: impl FnOnce(&mut Config, &Path)) -> TestNode {
    let base = tempfile::tempdir().expect("tempdir");
    let root = base.path().join("root");
    std::fs::create_dir(&root).expect("root dir");
    std::fs::write(root.join("index.html"), INDEX).expect("index.html");
    std::fs::write(base.path().join("secret.txt"), "TOP-SECRET outside the root\n").expect("secret");

    let mut config = Config::new(&root);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.node = NODE.to_owned();
    config.version = VERSION.to_owned();
    config.shutdown_grace = Duration::from_secs(5);
    configure(&mut config, &root);
    launch(base, config).await
}

/// Binds and runs a node with `config`; `base` is removed when the node is dropped.
pub async fn launch(base: tempfile::TempDir, config: Config) -> TestNode {
    let node = web_app::bind(config).await.expect("bind");
    let addr = node.local_addr();
    let tls = node.tls_addr();
    let udp = node.udp_addr();
    let handle = node.handle();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(node.run(async move {
        let _ = stop_rx.await;
    }));
    TestNode { addr, tls, udp, handle, base, stop: Some(stop_tx), task: Some(task) }
}

/// Writes a small site for release `version` under `base/site-<version>` and makes it a
/// release in `base/releases`. Returns the release directory.
pub fn make_release(base: &Path, version: &str, extra: &[(&str, &[u8])]) -> PathBuf {
    let site = base.join(format!("site-{version}"));
    std::fs::create_dir_all(site.join("css")).unwrap();
    std::fs::write(site.join("index.html"), format!("<!doctype html><title>v{version}</title>\n{}", "<p>hello</p>\n".repeat(40))).unwrap();
    std::fs::write(site.join("css/site.css"), "body { color: #123; }\n").unwrap();
    std::fs::write(site.join("VERSION"), format!("{version}\n")).unwrap();
    for (name, data) in extra {
        let path = site.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    web_app::release::create(&site, version, &base.join("releases")).expect("release create")
}

/// A node serving `base/releases/current` -> release "1.0.0" (plus `extra` files).
pub async fn start_release(extra: &[(&str, &[u8])], configure: impl FnOnce(&mut Config)) -> TestNode {
    let base = tempfile::tempdir().expect("tempdir");
    make_release(base.path(), "1.0.0", extra);
    std::fs::write(base.path().join("secret.txt"), "TOP-SECRET outside the root\n").unwrap();
    let releases = base.path().join("releases");
    web_app::release::activate(&releases, "1.0.0").unwrap();
    let mut config = Config::with_releases(&releases);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.node = NODE.to_owned();
    config.shutdown_grace = Duration::from_secs(5);
    configure(&mut config);
    launch(base, config).await
}

impl TestNode {
    pub fn releases(&self) -> PathBuf {
        self.base.path().join("releases")
    }
}

/// A parsed HTTP/1.1 response read from a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as is on a new connection and reads the response until the server closes
/// the connection (send `Connection: close`).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    within(async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write request");
        read_response(&mut stream).await
    })
    .await
}

/// Reads a whole response (until EOF) from `stream`.
pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.expect("read response");
    parse_response(&bytes)
}

pub fn parse_response(bytes: &[u8]) -> RawResponse {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("end of response head");
    let head = std::str::from_utf8(&bytes[..end]).expect("UTF-8 response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line.split(' ').nth(1).expect("status code").parse().expect("numeric status");
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("header line");
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    let mut response = RawResponse { status, headers, body: bytes[end + 4..].to_vec() };
    if response.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        response.body = dechunk(&response.body);
    }
    response
}

/// Splits the bytes of several responses (each with a `content-length`, or none for a 304
/// or a HEAD answer) into parsed responses. `heads` says which requests were HEADs.
pub fn split_responses(mut bytes: &[u8], heads: &[bool]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    for &head in heads {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
        let parsed = parse_response(&bytes[..end]);
        let len = if head || parsed.status == 304 {
            0
        } else {
            parsed.header("content-length").map_or(0, |l| l.parse().unwrap())
        };
        out.push(parse_response(&bytes[..end + len]));
        bytes = &bytes[end + len..];
    }
    assert!(bytes.is_empty(), "bytes after the last response: {:?}", String::from_utf8_lossy(bytes));
    out
}

/// The data of a chunked body (trailers ignored).
fn dechunk(mut bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = bytes.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size_text = std::str::from_utf8(&bytes[..line_end]).expect("chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).expect("hex chunk size");
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&bytes[..size]);
        bytes = &bytes[size + 2..];
    }
}

/// `GET path` with `Connection: close` on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> RawResponse {
    raw(addr, format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await
}

/// An HTTP/1.1 client connection (keep-alive) driven by hyper.
pub async fn http1_connect(addr: SocketAddr) -> (http1::SendRequest<Full<Bytes>>, SocketAddr) {
    let stream = within(TcpStream::connect(addr)).await.expect("connect");
    let local = stream.local_addr().unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.expect("http1 handshake");
    tokio::spawn(conn);
    (sender, local)
}

/// An HTTP/2 (prior knowledge, cleartext) client connection driven by hyper.
pub async fn http2_connect(addr: SocketAddr) -> http2::SendRequest<Full<Bytes>> {
    let stream = within(TcpStream::connect(addr)).await.expect("connect");
    let (sender, conn) =
        http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("http2 handshake");
    tokio::spawn(conn);
    sender
}

pub fn request(method: &str, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test")
        .body(Full::new(body.into()))
        .unwrap()
}

/// Collects a hyper response into its parts and body bytes.
pub async fn collect(response: Response<hyper::body::Incoming>) -> (hyper::http::response::Parts, Bytes) {
    let (parts, body) = response.into_parts();
    let body = within(body.collect()).await.expect("response body").to_bytes();
    (parts, body)
}

/// Deterministic, incompressible-looking test data.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
