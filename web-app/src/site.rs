//! The site a node serves: a verified release (or a plain `--root` directory) and the static
//! file responses built from it.
//!
//! Static GET/HEAD requests take one of two paths:
//! - a file of the verified release kept in memory ([`release::CachedFile`]): answered
//!   directly, with its ETag (from the manifest's sha256), Last-Modified, conditional GET
//!   (304) and gzip/br variants; no file system access per request. Range requests skip it.
//! - everything else: tower-http's `ServeDir` (ranges, precompressed `.gz`/`.br` files,
//!   index files, traversal rejection) behind tower-http's on-the-fly compression of text
//!   types, with an ETag added (manifest sha256, or mtime-size for `--root`) and checked.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::Extensions;
use hyper::{Method, Request, Response, StatusCode, Version};
use tower::ServiceExt;
use tower_http::compression::Compression;
use tower_http::services::ServeDir;

use crate::http::{full, text, Body, BoxError};
use crate::release::{self, CachedFile, Manifest, ReleaseError};
use crate::sendfile;

/// Where a node's static files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A plain directory, served as is (no manifest, no cache): the original `--root` mode.
    Root(PathBuf),
    /// A releases directory; `current` points to the release to serve, verified first.
    Releases(PathBuf),
}

type Predicate = fn(StatusCode, Version, &HeaderMap, &Extensions) -> bool;

/// A file kept in memory with its response headers prepared once, at load: the hot path
/// only clones reference-counted values.
pub(crate) struct Entry {
    body: Bytes,
    gzip: Option<Bytes>,
    br: Option<Bytes>,
    content_type: HeaderValue,
    last_modified: HeaderValue,
    /// Modification time in whole seconds (HTTP dates have no more).
    modified_secs: u64,
    etag: HeaderValue,
    etag_gzip: HeaderValue,
    etag_br: HeaderValue,
    /// The headers of a 200 (or HEAD) answer with each body: identity, gzip, br. Cloned per
    /// request, which costs less than building them (no hashing of header names).
    headers: [HeaderMap; 3],
    /// The same answers as HTTP/1.1 bytes for [`crate::quick`]: status line and headers
    /// (`x-release` included), without `date` and the blank line; 200 then 304 for each body.
    heads: [[Bytes; 2]; 3],
}

/// Which body of a cached file a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Identity = 0,
    Gzip = 1,
    Br = 2,
}

impl Entry {
    fn new(file: CachedFile, release: &HeaderValue) -> Option<Entry> {
        let variant = |suffix: &str| HeaderValue::from_str(&format!("{}-{suffix}\"", file.etag.trim_end_matches('"'))).ok();
        let mut entry = Entry {
            content_type: HeaderValue::from_static(file.content_type),
            last_modified: HeaderValue::from_str(&file.last_modified).ok()?,
            modified_secs: file.modified.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            etag: HeaderValue::from_str(&file.etag).ok()?,
            etag_gzip: variant("gzip")?,
            etag_br: variant("br")?,
            body: file.body,
            gzip: file.gzip,
            br: file.br,
            headers: Default::default(),
            heads: Default::default(),
        };
        entry.headers = [
            entry.ok_headers(entry.body.len(), &entry.etag, None),
            entry.ok_headers(entry.gzip.as_ref().map_or(0, Bytes::len), &entry.etag_gzip, Some("gzip")),
            entry.ok_headers(entry.br.as_ref().map_or(0, Bytes::len), &entry.etag_br, Some("br")),
        ];
        let etags = [&entry.etag, &entry.etag_gzip, &entry.etag_br];
        entry.heads = std::array::from_fn(|i| {
            let ok = head_bytes("200 OK", &entry.headers[i], release);
            let mut not_modified = HeaderMap::with_capacity(2);
            not_modified.insert(header::ETAG, etags[i].clone());
            not_modified.insert(header::LAST_MODIFIED, entry.last_modified.clone());
            [ok, head_bytes("304 Not Modified", &not_modified, release)]
        });
        Some(entry)
    }

    /// The body a request gets: br, else gzip, else identity, as it accepts and as there are.
    pub(crate) fn variant(&self, accepts: impl Fn(&str) -> bool) -> Variant {
        match (&self.br, &self.gzip) {
            (Some(_), _) if accepts("br") => Variant::Br,
            (_, Some(_)) if accepts("gzip") => Variant::Gzip,
            _ => Variant::Identity,
        }
    }

    /// The body of `variant`.
    pub(crate) fn body(&self, variant: Variant) -> &Bytes {
        match variant {
            Variant::Br => self.br.as_ref().unwrap_or(&self.body),
            Variant::Gzip => self.gzip.as_ref().unwrap_or(&self.body),
            Variant::Identity => &self.body,
        }
    }

    fn etag(&self, variant: Variant) -> &HeaderValue {
        [&self.etag, &self.etag_gzip, &self.etag_br][variant as usize]
    }

    /// Whether the request's validators say the client has `variant` already (304).
    /// If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
    pub(crate) fn not_modified(&self, variant: Variant, if_none_match: Option<&str>, if_modified_since: Option<&str>) -> bool {
        if let Some(inm) = if_none_match {
            etag_matches(inm, self.etag(variant).to_str().unwrap_or(""))
        } else if let Some(since) = if_modified_since {
            httpdate::parse_http_date(since)
                .ok()
                .and_then(|since| since.duration_since(UNIX_EPOCH).ok())
                .is_some_and(|since| self.modified_secs <= since.as_secs())
        } else {
            false
        }
    }

    /// The HTTP/1.1 status line and headers of the answer (see [`Entry::heads`]).
    pub(crate) fn head(&self, variant: Variant, not_modified: bool) -> &Bytes {
        &self.heads[variant as usize][usize::from(not_modified)]
    }

    /// The headers of a 200 answer with a body of `len` bytes.
    fn ok_headers(&self, len: usize, etag: &HeaderValue, encoding: Option<&'static str>) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(8);
        h.insert(header::ETAG, etag.clone());
        h.insert(header::LAST_MODIFIED, self.last_modified.clone());
        h.insert(header::CONTENT_TYPE, self.content_type.clone());
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if self.gzip.is_some() || self.br.is_some() {
            h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        if let Some(encoding) = encoding {
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
        }
        h
    }
}

/// `HTTP/1.1 <status>` and `headers` (then `x-release`) as hyper writes them.
fn head_bytes(status: &str, headers: &HeaderMap, release: &HeaderValue) -> Bytes {
    let mut head = format!("HTTP/1.1 {status}\r\n").into_bytes();
    for (name, value) in headers.iter().chain([(&crate::http::X_RELEASE, release)]) {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    Bytes::from(head)
}

/// Moves the bodies worth `sendfile` (see [`crate::sendfile`]) into one sealed memory file;
/// if that fails they stay on the heap, served the same way by copying.
fn pack_for_sendfile(cache: &mut HashMap<String, Entry>) {
    let mut bodies: Vec<&mut Bytes> = cache
        .values_mut()
        .flat_map(|e| [Some(&mut e.body), e.gzip.as_mut(), e.br.as_mut()])
        .flatten()
        .filter(|b| b.len() >= sendfile::SENDFILE_MIN)
        .collect();
    if bodies.is_empty() {
        return;
    }
    match sendfile::pack(&bodies.iter().map(|b| &b[..]).collect::<Vec<_>>()) {
        Ok(packed) => {
            for (body, packed) in bodies.iter_mut().zip(packed) {
                **body = packed;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot map the cached files for sendfile; serving them by copy"),
    }
}

/// On-the-fly compression only for whole (200) responses of text types of some size: never
/// for ranges, images, archives or already encoded bodies.
fn compress_when(status: StatusCode, _: Version, headers: &HeaderMap, _: &Extensions) -> bool {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let len: u64 = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    status == StatusCode::OK && release::compressible(mime) && len >= 256
}

/// The site being served: immutable once built; a reload builds a new one and swaps it in.
pub struct Site {
    /// Version served (manifest version, or `--app-version`/`VERSION` for `--root`).
    pub version: String,
    /// Directory served (the resolved release directory, or the root).
    pub dir: PathBuf,
    /// The verified manifest (`None` for `--root`).
    pub manifest: Option<Manifest>,
    cache: HashMap<String, Entry>,
    files: Compression<ServeDir, Predicate>,
    version_header: HeaderValue,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site").field("version", &self.version).field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Site {
    /// Loads the site. For releases, resolves `current` and verifies the release (blocking
    /// file I/O: call from `spawn_blocking` on a running server).
    pub fn load(content: &Content, root_version: &str) -> Result<Site, ReleaseError> {
        match content {
            Content::Root(root) => Ok(Site::new(root_version.to_owned(), root.clone(), None, HashMap::new())),
            Content::Releases(dir) => {
                let current = release::resolve_current(dir)?;
                let verified = release::verify(&current)?;
                Ok(Site::new(verified.manifest.version.clone(), verified.dir, Some(verified.manifest), verified.cache))
            }
        }
    }

    fn new(version: String, dir: PathBuf, manifest: Option<Manifest>, cache: HashMap<String, CachedFile>) -> Site {
        let serve_dir = ServeDir::new(&dir)
            .append_index_html_on_directories(true)
            .precompressed_gzip()
            .precompressed_br();
        let files = Compression::new(serve_dir).no_deflate().no_zstd().compress_when(compress_when as Predicate);
        let version_header =
            HeaderValue::from_str(&version).unwrap_or_else(|_| HeaderValue::from_static("invalid-version"));
        // A file whose headers cannot be prepared is simply served from disk.
        let mut cache =
            cache.into_iter().filter_map(|(path, file)| Some((path, Entry::new(file, &version_header)?))).collect();
        pack_for_sendfile(&mut cache);
        Site { version, dir, manifest, cache, files, version_header }
    }

    /// The version as a header value (for `x-release`).
    pub fn version_header(&self) -> &HeaderValue {
        &self.version_header
    }

    /// Number of files kept in memory.
    pub fn cached_files(&self) -> usize {
        self.cache.len()
    }

    /// The answer to a GET/HEAD from the files kept in memory, if the request is for one of
    /// them and not a range: no await, no file system access. [`Site::serve`] answers the rest.
    pub fn serve_from_memory<B>(&self, req: &Request<B>) -> Option<Response<Body>> {
        if req.headers().contains_key(header::RANGE) {
            return None;
        }
        Some(serve_cached(self.cached(req.uri().path())?, req.method(), req.headers()))
    }

    /// The file kept in memory for the path of a request's URI, if there is one.
    pub(crate) fn cached(&self, path: &str) -> Option<&Entry> {
        // A plain path (what a cached file's own path looks like) is looked up as it is;
        // anything else is decoded and checked first.
        match plain_path(path).then(|| self.cache.get(&path[1..])).flatten() {
            Some(file) => Some(file),
            None => self.cache.get(&*relative_path(path)?),
        }
    }

    /// Answers a GET/HEAD for a static file.
    pub async fn serve(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if let Some(response) = self.serve_from_memory(&req) {
            return response;
        }
        let rel = relative_path(req.uri().path());
        let etag = match &rel {
            Some(rel) => self.etag_of(rel).await,
            None => None,
        };
        if let Some(etag) = &etag {
            if let Some(inm) = req.headers().get(header::IF_NONE_MATCH) {
                if inm.to_str().is_ok_and(|inm| etag_matches(inm, etag)) {
                    return not_modified(etag);
                }
            }
        }
        let response = match self.files.clone().oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        if (status.is_client_error() || status.is_server_error())
            && !response.headers().contains_key(header::CONTENT_TYPE)
        {
            return with_reason(response);
        }
        let mut response = response.map(|body| body.map_err(BoxError::from).boxed_unsync());
        if let Some(etag) = etag {
            if status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT {
                // A compressed representation is a different one: its own validator.
                let etag = match response.headers().get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
                    Some(encoding) => format!("{}-{encoding}\"", etag.trim_end_matches('"')),
                    None => etag,
                };
                if let Ok(value) = HeaderValue::from_str(&etag) {
                    response.headers_mut().insert(header::ETAG, value);
                }
            }
        }
        response
    }

    /// The ETag of a file of the site: the manifest's sha256 for a release, mtime and size
    /// (as nginx does) for `--root`. Index files are looked up for directory paths.
    async fn etag_of(&self, rel: &str) -> Option<String> {
        let rel = if rel.is_empty() || rel.ends_with('/') { format!("{rel}index.html") } else { rel.to_owned() };
        match &self.manifest {
            Some(manifest) => manifest.files.get(&rel).map(|entry| release::etag_from_sha256(&entry.sha256)),
            None => {
                let meta = tokio::fs::metadata(self.dir.join(&rel)).await.ok()?;
                if !meta.is_file() {
                    return None;
                }
                let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_secs();
                Some(format!("\"{mtime:x}-{:x}\"", meta.len()))
            }
        }
    }
}

/// Whether a URI path is `/` and then only letters, digits, `/`, `.`, `-` and `_`, not ending
/// in `/`: what the path of a file looks like, to be looked up without decoding.
pub(crate) fn plain_path(path: &str) -> bool {
    path.len() > 1
        && path.starts_with('/')
        && !path.ends_with('/')
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'-' | b'_'))
}

/// The percent-decoded path relative to the site root, if it is a plain one: only normal
/// components (no `.`, `..`, backslashes, NUL, or absolute segments once decoded). `None`
/// means "let ServeDir decide" (it rejects what escapes the root).
pub fn relative_path(uri_path: &str) -> Option<Cow<'_, str>> {
    let decoded = percent_encoding::percent_decode_str(uri_path).decode_utf8().ok()?;
    let rel = decoded.strip_prefix('/')?;
    if rel.contains('\\') || rel.contains('\0') || rel.contains("//") {
        return None;
    }
    let trimmed = rel.trim_end_matches('/');
    if !trimmed.is_empty() && !Path::new(trimmed).components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    if rel.is_empty() || rel.ends_with('/') {
        // Directory: its index file.
        return Some(Cow::Owned(format!("{rel}index.html")));
    }
    Some(match decoded {
        // Nothing was percent-decoded: borrow from the URI, no allocation.
        Cow::Borrowed(path) => Cow::Borrowed(&path[1..]),
        Cow::Owned(path) => Cow::Owned(path[1..].to_owned()),
    })
}

/// Whether a client accepts a content coding, by its `Accept-Encoding` lines (`values`). A
/// `q=0` excludes.
pub(crate) fn accepts<'a>(values: impl IntoIterator<Item = &'a str>, coding: &str) -> bool {
    values.into_iter().any(|v| {
        v.split(',').any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
            });
            (name.eq_ignore_ascii_case(coding) || name == "*") && !q_zero
        })
    })
}

/// The `Accept-Encoding` lines of a request that are text.
fn accept_encoding(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok())
}

/// Weak comparison of an If-None-Match header against an ETag (RFC 9110 13.1.2).
fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

fn not_modified(etag: &str) -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

fn serve_cached(file: &Entry, method: &Method, headers: &HeaderMap) -> Response<Body> {
    let variant = file.variant(|coding| accepts(accept_encoding(headers), coding));
    let text = |name| headers.get(name).map(|v: &HeaderValue| v.to_str().unwrap_or(""));
    let not_modified = file.not_modified(variant, text(header::IF_NONE_MATCH), text(header::IF_MODIFIED_SINCE));
    let mut response = if not_modified || method == Method::HEAD {
        Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync())
    } else {
        Response::new(full(file.body(variant).clone()))
    };
    if not_modified {
        let h = response.headers_mut();
        h.insert(header::ETAG, file.etag(variant).clone());
        h.insert(header::LAST_MODIFIED, file.last_modified.clone());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return response;
    }
    *response.headers_mut() = file.headers[variant as usize].clone();
    response
}

/// ServeDir's error responses have empty bodies: give them a short text reason, keeping
/// their other headers (e.g. `Content-Range` of a 416).
fn with_reason<B>(response: Response<B>) -> Response<Body> {
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let status = parts.status;
    let reason = format!("{}\n", status.canonical_reason().unwrap_or("error").to_ascii_lowercase());
    let mut replaced = text(status, &reason);
    for (name, value) in parts.headers.iter() {
        if !replaced.headers().contains_key(name) {
            replaced.headers_mut().insert(name.clone(), value.clone());
        }
    }
    replaced
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let check = |uri: &str, expected: Option<&str>| assert_eq!(relative_path(uri).as_deref(), expected, "{uri}");
        check("/", Some("index.html"));
        check("/a/b.css", Some("a/b.css"));
        check("/sub/", Some("sub/index.html"));
        check("/my%20file.txt", Some("my file.txt"));
        check("/../secret", None);
        check("/%2e%2e/secret", None);
        check("/a/%2e%2e/%2e%2e/secret", None);
        check("/a%2f..%2f..%2fsecret", None);
        check("/./index.html", None);
        check("/a%5c..%5csecret", None);
        check("/a%00b", None);
        check("//etc/passwd", None);
        check("/%ff", None);
        check("relative", None);
    }

    #[test]
    fn accept_encoding() {
        let check = |value: &str, coding: &str, expected: bool| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
            assert_eq!(accepts(super::accept_encoding(&h), coding), expected, "{value} {coding}");
        };
        check("gzip, deflate, br", "gzip", true);
        check("gzip, deflate, br", "br", true);
        check("deflate", "gzip", false);
        check("gzip;q=0", "gzip", false);
        check("GZIP;q=0.5", "gzip", true);
        check("*", "br", true);
        assert!(!accepts(super::accept_encoding(&HeaderMap::new()), "gzip"));
    }

    #[test]
    fn if_none_match() {
        let check = |inm: &str, expected: bool| {
            assert_eq!(etag_matches(inm, "\"abc\""), expected, "{inm}");
        };
        check("\"abc\"", true);
        check("W/\"abc\"", true);
        check("\"x\", \"abc\"", true);
        check("*", true);
        check("\"abcd\"", false);
        check("abc", false);
    }
}
