//! HTTPS: certificates from `web_app::devcert`, handshake trusting the generated CA, ALPN h2
//! and http/1.1, an untrusted client refused, the plain listener redirecting to HTTPS.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::*;
use hyper::{StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use web_app::config::TlsConfig;

fn client_config(ca: Option<&Path>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>, name: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = within(TcpStream::connect(addr)).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    within(TlsConnector::from(config).connect(name, tcp)).await
}

async fn tls_node(redirect: bool) -> TestNode {
    start_release(&[], |config| {
        // The certificates go into the node's temporary base directory, removed with it.
        let web_app::Content::Releases(releases) = &config.content else { unreachable!() };
        let certs = web_app::devcert::generate(&releases.parent().unwrap().join("certs"), &["www.example.test", "127.0.0.1"]).unwrap();
        config.tls = Some(TlsConfig { listen: "127.0.0.1:0".parse().unwrap(), cert: certs.cert, key: certs.key });
        config.redirect_http = redirect;
    })
    .await
}

fn ca(node: &TestNode) -> std::path::PathBuf {
    node.base.path().join("certs/ca.pem")
}

#[tokio::test]
async fn h2_over_tls_by_alpn_with_the_generated_ca() {
    let node = tls_node(false).await;
    let tls_addr = node.tls.expect("TLS listener");
    for name in ["www.example.test", "127.0.0.1"] {
        let stream = tls_connect(tls_addr, client_config(Some(&ca(&node)), &[b"h2", b"http/1.1"]), name).await.expect("handshake");
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "{name}");
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let response = within(sender.send_request(request("GET", "/whoami", ""))).await.unwrap();
        assert_eq!(response.version(), Version::HTTP_2);
        let (parts, body) = collect(response).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers["x-release"], "1.0.0");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["tls"], true);
        assert_eq!(json["http_version"], "HTTP/2.0");
        assert_eq!(json["server_addr"], tls_addr.to_string());
        let response = within(sender.send_request(request("GET", "/css/site.css", ""))).await.unwrap();
        assert_eq!(collect(response).await.1.as_ref(), b"body { color: #123; }\n");
    }
}

#[tokio::test]
async fn http1_over_tls_when_the_client_offers_only_http1() {
    let node = tls_node(false).await;
    let stream = tls_connect(node.tls.unwrap(), client_config(Some(&ca(&node)), &[b"http/1.1"]), "www.example.test").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let response = within(sender.send_request(request("GET", "/whoami", ""))).await.unwrap();
    assert_eq!(response.version(), Version::HTTP_11);
    let json: serde_json::Value = serde_json::from_slice(&collect(response).await.1).unwrap();
    assert_eq!(json["tls"], true);
    assert_eq!(json["http_version"], "HTTP/1.1");
    // No ALPN at all: HTTP/1.1 still works.
    let stream = tls_connect(node.tls.unwrap(), client_config(Some(&ca(&node)), &[]), "127.0.0.1").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
}

/// HTTP/1.1 over TLS goes through the quick path first (files kept in memory) and hands over
/// to hyper mid-connection; a client speaking HTTP/2 without ALPN still gets hyper's HTTP/2.
#[tokio::test]
async fn quick_path_over_tls_hands_over_to_hyper() {
    let node = tls_node(false).await;
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let mut stream = tls_connect(node.tls.unwrap(), client_config(Some(&ca(&node)), alpn), "127.0.0.1").await.unwrap();
        let pipelined = b"GET /css/site.css HTTP/1.1\r\nHost: t\r\n\r\n\
            POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
            GET /css/site.css HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        within(stream.write_all(pipelined)).await.unwrap();
        let mut bytes = Vec::new();
        // A TLS close without close_notify shows as an error after the data: keep the data.
        let _ = within(stream.read_to_end(&mut bytes)).await;
        let responses = split_responses(&bytes, &[false, false, false]);
        assert_eq!(responses.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 200], "{alpn:?}");
        assert_eq!(responses[0].body, b"body { color: #123; }\n");
        assert_eq!(responses[2].body, responses[0].body);
        assert_eq!(responses[2].header("connection"), Some("close"));
        let upload: serde_json::Value = serde_json::from_slice(&responses[1].body).unwrap();
        assert_eq!(upload["bytes"], 5);
    }
    let stream = tls_connect(node.tls.unwrap(), client_config(Some(&ca(&node)), &[]), "127.0.0.1").await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let response = within(sender.send_request(request("GET", "/css/site.css", ""))).await.unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(collect(response).await.1.as_ref(), b"body { color: #123; }\n");
}

#[tokio::test]
async fn untrusted_or_wrong_name_is_refused_and_the_node_keeps_serving() {
    let node = tls_node(false).await;
    let tls_addr = node.tls.unwrap();
    let err = tls_connect(tls_addr, client_config(None, &[b"h2"]), "www.example.test").await.expect_err("no CA trusted");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    let err = tls_connect(tls_addr, client_config(Some(&ca(&node)), &[b"h2"]), "other.example.test").await.expect_err("wrong name");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    // Plain HTTP to the TLS port: the handshake fails, the connection is closed, no harm done.
    let mut plain = within(TcpStream::connect(tls_addr)).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = within(plain.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    let stream = tls_connect(tls_addr, client_config(Some(&ca(&node)), &[b"h2"]), "www.example.test").await;
    assert!(stream.is_ok(), "still serving TLS");
}

#[tokio::test]
async fn plain_listener_redirects_to_https() {
    let node = tls_node(true).await;
    let tls_port = node.tls.unwrap().port();
    for (host, path, expected) in [
        ("www.example.test:8080", "/a/b?x=1&y=2", format!("https://www.example.test:{tls_port}/a/b?x=1&y=2")),
        ("www.example.test", "/", format!("https://www.example.test:{tls_port}/")),
        ("[::1]:80", "/x", format!("https://[::1]:{tls_port}/x")),
    ] {
        let response =
            raw(node.addr, format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await;
        assert_eq!(response.status, 308, "{host}{path}");
        assert_eq!(response.header("location"), Some(expected.as_str()));
    }
    // POST is redirected too (308 keeps the method).
    let response = raw(node.addr, b"POST /api/notes HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    assert_eq!(response.status, 308);
    // Health checks and scrapes stay on plain HTTP.
    assert_eq!(get(node.addr, "/healthz").await.status, 200);
    assert_eq!(get(node.addr, "/metrics").await.status, 200);
    // No Host at all (HTTP/1.0): a clear 400.
    let response = raw(node.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.status, 400);
}

#[tokio::test]
async fn unusable_certificate_files_fail_the_start_clearly() {
    let base = tempfile::tempdir().unwrap();
    make_release(base.path(), "1.0.0", &[]);
    let releases = base.path().join("releases");
    web_app::release::activate(&releases, "1.0.0").unwrap();
    std::fs::write(base.path().join("garbage.pem"), "not a certificate").unwrap();
    for (cert, key, expected) in [
        ("missing.pem", "missing.pem", "--tls-cert"),
        ("garbage.pem", "garbage.pem", "no PEM certificate"),
    ] {
        let mut config = web_app::Config::with_releases(&releases);
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.tls = Some(TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: base.path().join(cert),
            key: base.path().join(key),
        });
        let err = format!("{:#}", web_app::bind(config).await.err().expect("refused"));
        assert!(err.contains(expected), "{cert}: {err}");
    }
}
