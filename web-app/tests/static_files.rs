//! Static files of a verified release: validators and conditional GET, ranges, compression,
//! content types, traversal. Both paths are covered: files kept in memory (small) and files
//! served by ServeDir (large ones, and every Range request).

mod common;

use std::io::Read;

use common::*;

const BIG: usize = 300 * 1024; // above release::CACHE_MAX_FILE: served from disk

fn text_blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| b"the quick brown fox jumps over the lazy dog\n"[i % 44]).collect()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data).read_to_end(&mut out).expect("valid gzip");
    out
}

async fn request_with(addr: std::net::SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    raw(addr, req.as_bytes()).await
}

#[tokio::test]
async fn conditional_get_on_cached_and_disk_files() {
    let big = pattern(BIG);
    let node = start_release(&[("data/big.bin", &big)], |_| {}).await;
    for path in ["/css/site.css", "/data/big.bin", "/"] {
        let first = get(node.addr, path).await;
        assert_eq!(first.status, 200, "{path}");
        assert_eq!(first.header("x-release"), Some("1.0.0"), "{path}");
        let etag = first.header("etag").unwrap_or_else(|| panic!("{path}: no ETag")).to_owned();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{path}: {etag}");

        let same = request_with(node.addr, "GET", path, &[("If-None-Match", &etag)]).await;
        assert_eq!(same.status, 304, "{path}");
        assert!(same.body.is_empty());
        assert_eq!(same.header("etag"), Some(etag.as_str()));
        let weak = format!("W/{etag}");
        let listed = format!("\"nope\", {etag}");
        for inm in [weak.as_str(), listed.as_str(), "*"] {
            assert_eq!(request_with(node.addr, "GET", path, &[("If-None-Match", inm)]).await.status, 304, "{path} {inm}");
        }
        let other = request_with(node.addr, "GET", path, &[("If-None-Match", "\"other\"")]).await;
        assert_eq!(other.status, 200, "{path}");
        assert_eq!(other.body, first.body);

        let last_modified = first.header("last-modified").expect("Last-Modified").to_owned();
        let since = request_with(node.addr, "GET", path, &[("If-Modified-Since", &last_modified)]).await;
        assert_eq!(since.status, 304, "{path}");
        let old = request_with(node.addr, "GET", path, &[("If-Modified-Since", "Mon, 01 Jan 1990 00:00:00 GMT")]).await;
        assert_eq!(old.status, 200, "{path}");

        let head = request_with(node.addr, "HEAD", path, &[]).await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        assert_eq!(head.header("content-length"), first.header("content-length"));
        assert_eq!(head.header("etag"), Some(etag.as_str()));
    }
    // Different files, different validators.
    let a = get(node.addr, "/css/site.css").await;
    let b = get(node.addr, "/index.html").await;
    assert_ne!(a.header("etag"), b.header("etag"));
    assert_eq!(get(node.addr, "/").await.header("etag"), b.header("etag"), "index file of /");
}

#[tokio::test]
async fn range_requests() {
    let big = pattern(BIG);
    let node = start_release(&[("data/big.bin", &big)], |_| {}).await;
    let etag = get(node.addr, "/data/big.bin").await.header("etag").unwrap().to_owned();

    let part = request_with(node.addr, "GET", "/data/big.bin", &[("Range", "bytes=100-199")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some(format!("bytes 100-199/{BIG}").as_str()));
    assert_eq!(part.body, &big[100..200]);
    assert_eq!(part.header("etag"), Some(etag.as_str()));

    let suffix = request_with(node.addr, "GET", "/data/big.bin", &[("Range", "bytes=-10")]).await;
    assert_eq!(suffix.status, 206);
    assert_eq!(suffix.body, &big[BIG - 10..]);

    let open = request_with(node.addr, "GET", "/data/big.bin", &[("Range", &format!("bytes={}-", BIG - 3))]).await;
    assert_eq!(open.status, 206);
    assert_eq!(open.body, &big[BIG - 3..]);

    let unsatisfiable = request_with(node.addr, "GET", "/data/big.bin", &[("Range", &format!("bytes={BIG}-"))]).await;
    assert_eq!(unsatisfiable.status, 416);
    assert_eq!(unsatisfiable.header("content-range"), Some(format!("bytes */{BIG}").as_str()));

    // A small file kept in memory answers ranges too (from disk).
    let css = b"body { color: #123; }\n";
    let part = request_with(node.addr, "GET", "/css/site.css", &[("Range", "bytes=0-3")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, &css[..4]);
    assert_eq!(part.header("content-range"), Some(format!("bytes 0-3/{}", css.len()).as_str()));
}

#[tokio::test]
async fn compression_cached_precompressed_and_on_the_fly() {
    let big_text = text_blob(BIG);
    let png = pattern(4096);
    let node = start_release(
        &[
            ("docs/big.txt", &big_text),
            ("js/app.js", &text_blob(5000)),
            ("js/app.js.br", b"BROTLI-VARIANT"),
            ("img/logo.png", &png),
        ],
        |_| {},
    )
    .await;

    // In memory, compressed at load.
    let plain = get(node.addr, "/index.html").await;
    assert!(plain.header("content-encoding").is_none());
    let gz = request_with(node.addr, "GET", "/index.html", &[("Accept-Encoding", "gzip, deflate")]).await;
    assert_eq!(gz.status, 200);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("vary"), Some("accept-encoding"));
    assert_eq!(gunzip(&gz.body), plain.body);
    assert_ne!(gz.header("etag"), plain.header("etag"), "each representation has its own validator");
    let gz_etag = gz.header("etag").unwrap().to_owned();
    let again = request_with(node.addr, "GET", "/index.html", &[("Accept-Encoding", "gzip"), ("If-None-Match", &gz_etag)]).await;
    assert_eq!(again.status, 304);
    let refused = request_with(node.addr, "GET", "/index.html", &[("Accept-Encoding", "gzip;q=0")]).await;
    assert!(refused.header("content-encoding").is_none());
    assert_eq!(refused.body, plain.body);

    // Precompressed variant shipped in the release: preferred when br is accepted.
    let br = request_with(node.addr, "GET", "/js/app.js", &[("Accept-Encoding", "gzip, br")]).await;
    assert_eq!(br.header("content-encoding"), Some("br"));
    assert_eq!(br.body, b"BROTLI-VARIANT");
    let gz = request_with(node.addr, "GET", "/js/app.js", &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gunzip(&gz.body), text_blob(5000));

    // From disk, compressed on the fly.
    let gz = request_with(node.addr, "GET", "/docs/big.txt", &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(gz.status, 200);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert!(gz.body.len() < BIG / 10, "compressed to {} bytes", gz.body.len());
    assert_eq!(gunzip(&gz.body), big_text);
    let etag = gz.header("etag").expect("etag").to_owned();
    assert!(etag.ends_with("-gzip\""), "{etag}");
    let identity = get(node.addr, "/docs/big.txt").await;
    assert!(identity.header("content-encoding").is_none());
    assert_eq!(identity.body, big_text);

    // Images are not compressed.
    let img = request_with(node.addr, "GET", "/img/logo.png", &[("Accept-Encoding", "gzip, br")]).await;
    assert!(img.header("content-encoding").is_none());
    assert_eq!(img.body, png);
}

#[tokio::test]
async fn content_types() {
    let node = start_release(
        &[
            ("a.js", b"let a = 1;"),
            ("a.json", b"{}"),
            ("a.svg", b"<svg/>"),
            ("a.png", b"png"),
            ("a.txt", b"txt"),
            ("a.unknownext", b"?"),
            ("big.css", &text_blob(BIG)),
        ],
        |_| {},
    )
    .await;
    for (path, expected) in [
        ("/", "text/html"),
        ("/index.html", "text/html"),
        ("/css/site.css", "text/css"),
        ("/big.css", "text/css"),
        ("/a.js", "text/javascript"),
        ("/a.json", "application/json"),
        ("/a.svg", "image/svg+xml"),
        ("/a.png", "image/png"),
        ("/a.txt", "text/plain"),
        ("/a.unknownext", "application/octet-stream"),
    ] {
        let response = get(node.addr, path).await;
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.header("content-type"), Some(expected), "{path}");
    }
}

#[tokio::test]
async fn traversal_never_escapes_the_release() {
    let node = start_release(&[], |_| {}).await;
    assert!(node.base.path().join("secret.txt").exists());
    for path in [
        "/../secret.txt",
        "/../../secret.txt",
        "/%2e%2e/%2e%2e/secret.txt",
        "/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
        "/..%2f..%2fsecret.txt",
        "/css/..%2f..%2f..%2fsecret.txt",
        "/css/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "/%2e%2e%5c%2e%2e%5csecret.txt",
        "//etc/passwd",
        "/%2fetc%2fpasswd",
        "/etc/passwd",
        "/%00/../secret.txt",
        "/MANIFEST.toml/../../secret.txt",
    ] {
        let response = get(node.addr, path).await;
        assert!(response.status == 404 || response.status == 400, "{path}: {}", response.status);
        let body = String::from_utf8_lossy(&response.body);
        assert!(!body.contains("TOP-SECRET") && !body.contains("root:"), "{path} leaked: {body}");
    }
    assert_eq!(get(node.addr, "/css/site.css").await.status, 200);
}

#[tokio::test]
async fn plain_root_has_validators_too() {
    let node = start(|_, root| std::fs::write(root.join("a.txt"), "hello\n").unwrap()).await;
    let first = get(node.addr, "/a.txt").await;
    let etag = first.header("etag").expect("etag").to_owned();
    assert_eq!(first.header("x-release"), Some(VERSION));
    assert_eq!(request_with(node.addr, "GET", "/a.txt", &[("If-None-Match", &etag)]).await.status, 304);
    // A changed file gets a new validator (size differs).
    std::fs::write(node.root().join("a.txt"), "hello, world\n").unwrap();
    let changed = request_with(node.addr, "GET", "/a.txt", &[("If-None-Match", &etag)]).await;
    assert_eq!(changed.status, 200);
    assert_eq!(changed.body, b"hello, world\n");
}
