//! Releases: atomic switch on reload, refusal of releases that do not match their manifest
//! (the node keeps serving the one it has), start without a valid release, the CLI.

mod common;

use std::process::Command;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use web_app::Reloaded;

async fn served_version(node: &TestNode) -> (String, String, String) {
    let whoami: serde_json::Value = serde_json::from_slice(&get(node.addr, "/whoami").await.body).unwrap();
    let index = get(node.addr, "/").await;
    (
        whoami["release"].as_str().unwrap().to_owned(),
        index.header("x-release").unwrap().to_owned(),
        String::from_utf8(index.body).unwrap(),
    )
}

async fn metric(node: &TestNode, line_start: &str) -> Option<String> {
    let text = String::from_utf8(get(node.addr, "/metrics").await.body).unwrap();
    text.lines().find(|l| l.starts_with(line_start)).map(str::to_owned)
}

#[tokio::test]
async fn reload_switches_to_a_good_release_atomically() {
    let node = start_release(&[], |_| {}).await;
    let (release, header, body) = served_version(&node).await;
    assert_eq!((release.as_str(), header.as_str()), ("1.0.0", "1.0.0"));
    assert!(body.contains("<title>v1.0.0</title>"));

    make_release(node.base.path(), "2.0.0", &[]);
    web_app::release::activate(&node.releases(), "2.0.0").unwrap();
    // Moving the symlink alone changes nothing: the node serves what it verified.
    assert_eq!(served_version(&node).await.0, "1.0.0");

    let outcome = node.handle.reload().await.expect("good release accepted");
    assert_eq!(outcome, Reloaded::Switched { from: "1.0.0".into(), to: "2.0.0".into() });
    let (release, header, body) = served_version(&node).await;
    assert_eq!((release.as_str(), header.as_str()), ("2.0.0", "2.0.0"));
    assert!(body.contains("<title>v2.0.0</title>"));
    assert_eq!(node.handle.version(), "2.0.0");

    // Reloading again without a change says so.
    assert_eq!(node.handle.reload().await.unwrap(), Reloaded::Unchanged { version: "2.0.0".into() });
    // And back (a rollback is a reload to the old release).
    web_app::release::activate(&node.releases(), "1.0.0").unwrap();
    node.handle.reload().await.unwrap();
    assert_eq!(served_version(&node).await.0, "1.0.0");

    assert_eq!(metric(&node, "web_release_reloads_total{outcome=\"switched\"}").await.as_deref(), Some("web_release_reloads_total{outcome=\"switched\"} 2"));
    assert_eq!(metric(&node, "web_release_info{").await.as_deref(), Some("web_release_info{version=\"1.0.0\"} 1"));
}

#[tokio::test]
async fn bad_releases_are_refused_and_the_old_one_kept() {
    let node = start_release(&[], |_| {}).await;
    let base = node.base.path();
    let releases = node.releases();

    // Corrupted: same size, other bytes.
    let dir = make_release(base, "2.0.0", &[]);
    std::fs::write(dir.join("css/site.css"), "body { color: #456; }\n").unwrap();
    // Missing file.
    let missing = make_release(base, "3.0.0", &[]);
    std::fs::remove_file(missing.join("VERSION")).unwrap();
    // Extra file.
    let extra = make_release(base, "4.0.0", &[]);
    std::fs::write(extra.join("sneaky.html"), "x").unwrap();
    // No manifest.
    let no_manifest = make_release(base, "5.0.0", &[]);
    std::fs::remove_file(no_manifest.join("MANIFEST.toml")).unwrap();
    // A symlink pointing out of the release.
    let link = make_release(base, "6.0.0", &[]);
    std::os::unix::fs::symlink(base.join("secret.txt"), link.join("secret.txt")).unwrap();

    for (version, reason) in [
        ("2.0.0", "css/site.css: sha256"),
        ("3.0.0", "missing file VERSION"),
        ("4.0.0", "extra file sneaky.html"),
        ("5.0.0", "no MANIFEST.toml"),
        ("6.0.0", "symlink secret.txt"),
    ] {
        web_app::release::activate(&releases, version).unwrap();
        let err = node.handle.reload().await.expect_err(version).to_string();
        assert!(err.contains(reason), "{version}: {err}");
        let (release, header, body) = served_version(&node).await;
        assert_eq!((release.as_str(), header.as_str()), ("1.0.0", "1.0.0"), "{version}");
        assert!(body.contains("<title>v1.0.0</title>"));
        assert_eq!(get(node.addr, "/css/site.css").await.body, b"body { color: #123; }\n");
        assert_eq!(get(node.addr, "/healthz").await.status, 200, "a refused release does not make the node unhealthy");
    }
    // A dangling `current`.
    std::fs::remove_file(releases.join("current")).unwrap();
    std::os::unix::fs::symlink("nonexistent", releases.join("current")).unwrap();
    assert!(node.handle.reload().await.is_err());
    assert_eq!(served_version(&node).await.0, "1.0.0");
    assert_eq!(
        metric(&node, "web_release_reloads_total{outcome=\"refused\"}").await.as_deref(),
        Some("web_release_reloads_total{outcome=\"refused\"} 6")
    );
}

#[tokio::test]
async fn in_flight_download_finishes_on_the_old_release() {
    let big_v1 = pattern(4 * 1024 * 1024);
    let node = start_release(&[("big.bin", &big_v1)], |_| {}).await;
    make_release(node.base.path(), "2.0.0", &[("big.bin", &pattern(1000))]);
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    stream.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut first = vec![0u8; 1024];
    within(stream.read_exact(&mut first)).await.unwrap();

    web_app::release::activate(&node.releases(), "2.0.0").unwrap();
    node.handle.reload().await.unwrap();
    assert_eq!(get(node.addr, "/big.bin").await.body.len(), 1000, "new requests get the new release");

    let mut rest = Vec::new();
    within(stream.read_to_end(&mut rest)).await.unwrap();
    first.extend_from_slice(&rest);
    let response = parse_response(&first);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-release"), Some("1.0.0"));
    assert!(response.body == big_v1, "the download started on 1.0.0 is 1.0.0's file, whole");
}

/// A cached file large enough to go out with sendfile on plain HTTP (see
/// `web_app::sendfile`), read slowly through a small receive buffer on a keep-alive
/// connection: two pipelined responses, byte-exact; the first still the old release's bytes
/// after a reload freed that release while it was in flight, the second either release's
/// (whichever it was answered from) but whole.
#[tokio::test]
async fn sendfile_responses_are_exact_through_a_slow_reader_and_a_reload() {
    let len = 200 * 1024;
    assert!(len >= web_app::sendfile::SENDFILE_MIN && len as u64 <= web_app::release::CACHE_MAX_FILE);
    let v1 = pattern(len);
    let node = start_release(&[("mid.bin", &v1)], |_| {}).await;
    let v2: Vec<u8> = v1.iter().map(|b| b ^ 0x5a).collect();
    make_release(node.base.path(), "2.0.0", &[("mid.bin", &v2)]);

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = within(socket.connect(node.addr)).await.unwrap();
    stream
        .write_all(b"GET /mid.bin HTTP/1.1\r\nHost: t\r\n\r\nGET /mid.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut received = vec![0u8; 1024];
    within(stream.read_exact(&mut received)).await.unwrap();

    web_app::release::activate(&node.releases(), "2.0.0").unwrap();
    assert!(matches!(node.handle.reload().await.unwrap(), Reloaded::Switched { .. }));
    let fresh = get(node.addr, "/mid.bin").await;
    assert!(fresh.body == v2, "new requests get the new release");

    // The rest, slowly: small reads with pauses, so the server meets a full socket often.
    within(async {
        let mut chunk = vec![0u8; 3000];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..n]);
            if received.len().is_multiple_of(5) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    })
    .await;
    let mut rest = &received[..];
    for i in 0..2 {
        let end = rest.windows(4).position(|w| w == b"\r\n\r\n").expect("response head") + 4;
        let head = parse_response(&rest[..end]);
        assert_eq!(head.status, 200, "response {i}");
        let release = head.header("x-release").expect("x-release").to_owned();
        if i == 0 {
            assert_eq!(release, "1.0.0", "the first response is from the release it started on");
        }
        let expected = if release == "1.0.0" { &v1 } else { &v2 };
        let body_len: usize = head.header("content-length").expect("content-length").parse().unwrap();
        assert_eq!(body_len, len, "response {i}");
        assert!(rest[end..end + body_len] == expected[..], "response {i}: body differs from {release}'s file");
        rest = &rest[end + body_len..];
    }
    assert!(rest.is_empty(), "{} bytes after the two responses", rest.len());
}

#[tokio::test]
async fn start_without_a_valid_release_fails_clearly() {
    let base = tempfile::tempdir().unwrap();
    let releases = base.path().join("releases");
    std::fs::create_dir(&releases).unwrap();
    let config = |releases: &std::path::Path| {
        let mut config = web_app::Config::with_releases(releases);
        config.listen = "127.0.0.1:0".parse().unwrap();
        config
    };
    let err = web_app::bind(config(&releases)).await.err().expect("no current").to_string();
    assert!(err.contains("no valid release to serve") && err.contains("current"), "{err}");

    let dir = make_release(base.path(), "1.0.0", &[]);
    std::fs::write(dir.join("index.html"), "tampered").unwrap();
    web_app::release::activate(&releases, "1.0.0").unwrap();
    let err = web_app::bind(config(&releases)).await.err().expect("corrupted").to_string();
    assert!(err.contains("no valid release to serve") && err.contains("index.html: size"), "{err}");
}

#[test]
fn release_cli_create_verify_activate() {
    let base = tempfile::tempdir().unwrap();
    let site = base.path().join("site");
    std::fs::create_dir_all(site.join("sub")).unwrap();
    std::fs::write(site.join("index.html"), "hi\n").unwrap();
    std::fs::write(site.join("sub/a.txt"), "a\n").unwrap();
    let releases = base.path().join("releases");
    let bin = env!("CARGO_BIN_EXE_web-app");
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, out) = run(&["release", "create", "--from", site.to_str().unwrap(), "--version", "7.1", "--out", releases.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("release 7.1 created") && out.contains("(2 files)"), "{out}");
    let manifest = std::fs::read_to_string(releases.join("7.1/MANIFEST.toml")).unwrap();
    assert!(manifest.contains("version = \"7.1\"") && manifest.contains("sub/a.txt"), "{manifest}");

    let dir = releases.join("7.1");
    let (ok, out) = run(&["release", "verify", dir.to_str().unwrap()]);
    assert!(ok && out.contains("2 files match"), "{out}");
    let (ok, out) = run(&["release", "activate", "--releases", releases.to_str().unwrap(), "--version", "7.1"]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read_link(releases.join("current")).unwrap(), std::path::PathBuf::from("7.1"));

    std::fs::write(dir.join("sub/a.txt"), "b\n").unwrap();
    let (ok, out) = run(&["release", "verify", dir.to_str().unwrap()]);
    assert!(!ok, "a corrupted release verifies: {out}");
    assert!(out.contains("sub/a.txt: sha256"), "{out}");
    let (ok, out) = run(&["release", "create", "--from", site.to_str().unwrap(), "--version", "../x", "--out", releases.to_str().unwrap()]);
    assert!(!ok && out.contains("invalid version"), "{out}");
    let (ok, out) = run(&["--releases", base.path().join("nope").to_str().unwrap()]);
    assert!(!ok && out.contains("--releases"), "{out}");
}

/// The last response of a connection (its tail held back for the FIN, see
/// `web_app::sendfile::SendfileStream`) arrives whole, for a copied and a `sendfile` body,
/// whichever way the connection ends: `Connection: close` from the client, HTTP/1.0 without
/// keep-alive. And an HTTP/1.0 client asking for keep-alive (on a second `Connection` line)
/// gets each response before it sends its next request: nothing is held back from a
/// connection that stays open.
#[tokio::test]
async fn last_responses_arrive_whole_and_kept_alive_ones_at_once() {
    let large = pattern(web_app::sendfile::SENDFILE_MIN * 4 + 3);
    let small = pattern(700);
    let node = start_release(&[("large.bin", &large), ("small.bin", &small)], |_| {}).await;
    for (path, body) in [("/small.bin", &small), ("/large.bin", &large)] {
        for request in [
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
            format!("GET {path} HTTP/1.0\r\nHost: t\r\n\r\n"),
            format!("GET {path} HTTP/1.0\r\nHost: t\r\nConnection: x-other\r\nConnection: keep-alive, close\r\n\r\n"),
        ] {
            let response = raw(node.addr, request.as_bytes()).await;
            assert_eq!(response.status, 200, "{request:?}");
            assert!(response.body == *body, "{request:?}: {} bytes", response.body.len());
        }

        let mut stream = within(TcpStream::connect(node.addr)).await.unwrap();
        let request = format!("GET {path} HTTP/1.0\r\nHost: t\r\nConnection: x-other\r\nConnection: Keep-Alive\r\n\r\n");
        for _ in 0..3 {
            stream.write_all(request.as_bytes()).await.unwrap();
            // Exactly one response, read before the next request goes out.
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                within(stream.read_exact(&mut byte)).await.expect("response head");
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap();
            assert!(head.starts_with("HTTP/1.0 200") && head.to_ascii_lowercase().contains("connection: keep-alive"), "{head}");
            let mut got = vec![0u8; body.len()];
            within(stream.read_exact(&mut got)).await.expect("whole body before the next request");
            assert!(got == *body);
        }
    }
}
