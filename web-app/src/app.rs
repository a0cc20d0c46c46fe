//! The notes app: a small guestbook with an HTML page and a JSON API, stored in MySQL.
//!
//! - `GET /app`: HTML page with the newest notes, a form, and which node and release served it.
//! - `POST /app`: the form (`application/x-www-form-urlencoded`: `author`, `text`); 303 to `/app`.
//! - `GET /api/notes[?limit=N]`: JSON array, newest first (N in 1..=200, default 50).
//! - `POST /api/notes`: JSON `{"author": "...", "text": "..."}`; 201 with the stored note.
//! - `GET /api/notes/{id}`: one note, 404 if there is none.
//!
//! Errors are classified once, in [`AppError`]: the client's (400, 404, 405, 408, 413, 415),
//! the storage's (503: not configured, unreachable, timed out). API errors are JSON
//! `{"error": "..."}`; page errors are a short HTML page.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use tracing::warn;

use crate::http::{full, json_status, Body};
use crate::site::Site;
use crate::storage::{Note, StorageError};
use crate::State;

/// Largest accepted API or form body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const MAX_AUTHOR_CHARS: usize = 64;
pub const MAX_TEXT_CHARS: usize = 2000;
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 200;

/// Everything that can go wrong in the app, by origin.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    // The client's.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("request body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("content type must be {0}")]
    UnsupportedMediaType(&'static str),
    #[error("could not read the request body: {0}")]
    Body(String),
    // The storage's.
    #[error("storage not configured (start the node with --db-url)")]
    StorageNotConfigured,
    #[error("storage unavailable: {0}")]
    Storage(#[from] StorageError),
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) | AppError::Body(_) => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AppError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::StorageNotConfigured | AppError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The one place errors become responses: JSON for the API, HTML for the page.
    pub fn into_response(self, html: bool) -> Response<Body> {
        let status = self.status();
        if let AppError::Storage(e) = &self {
            warn!(error = %e, "storage request failed");
        }
        let mut response = if html {
            let mut page = String::new();
            page.push_str("<!doctype html><meta charset=\"utf-8\"><title>Notes: error</title>");
            page.push_str(&format!("<h1>{}</h1><p>{}</p><p><a href=\"/app\">Back to the notes</a></p>\n",
                status.as_u16(), escape(&self.to_string())));
            html_response(status, page)
        } else {
            json_status(status, &serde_json::json!({ "error": self.to_string() }))
        };
        if let AppError::MethodNotAllowed(allow) = self {
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// Input of `POST /api/notes` and of the form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewNote {
    pub author: String,
    pub text: String,
}

impl NewNote {
    /// Trims both fields and checks their lengths and characters.
    pub fn validate(self) -> Result<NewNote, AppError> {
        let author = self.author.trim().to_owned();
        let text = self.text.trim().to_owned();
        if author.is_empty() {
            return Err(AppError::BadRequest("author must not be empty".into()));
        }
        if author.chars().count() > MAX_AUTHOR_CHARS {
            return Err(AppError::BadRequest(format!("author is longer than {MAX_AUTHOR_CHARS} characters")));
        }
        if author.chars().any(char::is_control) {
            return Err(AppError::BadRequest("author must not contain control characters".into()));
        }
        if text.is_empty() {
            return Err(AppError::BadRequest("text must not be empty".into()));
        }
        if text.chars().count() > MAX_TEXT_CHARS {
            return Err(AppError::BadRequest(format!("text is longer than {MAX_TEXT_CHARS} characters")));
        }
        if text.chars().any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t') {
            return Err(AppError::BadRequest("text must not contain control characters".into()));
        }
        Ok(NewNote { author, text })
    }
}

/// `/app`, `/api/notes` and `/api/notes/{id}`.
pub async fn handle(state: &State, site: &Site, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let html = path == "/app";
    let result = match (req.method(), path.as_str()) {
        (&Method::GET | &Method::HEAD, "/app") => page(state, site).await,
        (&Method::POST, "/app") => post_form(state, site, req).await,
        (_, "/app") => Err(AppError::MethodNotAllowed("GET, HEAD, POST")),
        (&Method::GET | &Method::HEAD, "/api/notes") => list(state, req.uri().query()).await,
        (&Method::POST, "/api/notes") => post_json(state, site, req).await,
        (_, "/api/notes") => Err(AppError::MethodNotAllowed("GET, HEAD, POST")),
        (method, p) => match p.strip_prefix("/api/notes/") {
            Some(id) if method == Method::GET || method == Method::HEAD => one(state, id).await,
            Some(_) => Err(AppError::MethodNotAllowed("GET, HEAD")),
            None => Err(AppError::NotFound(format!("no such API endpoint: {p}"))),
        },
    };
    result.unwrap_or_else(|e| e.into_response(html))
}

fn storage(state: &State) -> Result<&crate::storage::Storage, AppError> {
    state.storage.as_ref().ok_or(AppError::StorageNotConfigured)
}

async fn list(state: &State, query: Option<&str>) -> Result<Response<Body>, AppError> {
    let storage = storage(state)?;
    let mut limit = DEFAULT_LIMIT;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| AppError::BadRequest(format!("limit must be a number from 1 to {MAX_LIMIT}")))?;
            }
            other => return Err(AppError::BadRequest(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok(json_status(StatusCode::OK, &storage.list(limit).await?))
}

async fn one(state: &State, id: &str) -> Result<Response<Body>, AppError> {
    let id: u64 = id.parse().map_err(|_| AppError::BadRequest(format!("note id must be a positive integer, not {id:?}")))?;
    match storage(state)?.get(id).await? {
        Some(note) => Ok(json_status(StatusCode::OK, &note)),
        None => Err(AppError::NotFound(format!("no note {id}"))),
    }
}

/// The body, up to [`MAX_BODY_BYTES`], if its content type is `expected`.
async fn read_body(req: Request<Incoming>, expected: &'static str) -> Result<Bytes, AppError> {
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case(expected) {
        return Err(AppError::UnsupportedMediaType(expected));
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(AppError::TooLarge);
    }
    match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(AppError::TooLarge),
        Err(e) => Err(AppError::Body(e.to_string())),
    }
}

async fn post_json(state: &State, site: &Site, req: Request<Incoming>) -> Result<Response<Body>, AppError> {
    let storage = storage(state)?;
    let body = read_body(req, "application/json").await?;
    let input: NewNote =
        serde_json::from_slice(&body).map_err(|e| AppError::BadRequest(format!("invalid JSON: {e}")))?;
    let input = input.validate()?;
    let note = storage.insert(&input.author, &input.text, &state.node, &site.version).await?;
    let mut response = json_status(StatusCode::CREATED, &note);
    if let Ok(location) = HeaderValue::from_str(&format!("/api/notes/{}", note.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn post_form(state: &State, site: &Site, req: Request<Incoming>) -> Result<Response<Body>, AppError> {
    let storage = storage(state)?;
    let body = read_body(req, "application/x-www-form-urlencoded").await?;
    let (mut author, mut text) = (None, None);
    for (key, value) in form_urlencoded::parse(&body) {
        match &*key {
            "author" => author = Some(value.into_owned()),
            "text" => text = Some(value.into_owned()),
            other => return Err(AppError::BadRequest(format!("unknown form field {other:?}"))),
        }
    }
    let input = NewNote {
        author: author.ok_or_else(|| AppError::BadRequest("the form has no author".into()))?,
        text: text.ok_or_else(|| AppError::BadRequest("the form has no text".into()))?,
    }
    .validate()?;
    storage.insert(&input.author, &input.text, &state.node, &site.version).await?;
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/app"));
    Ok(response)
}

async fn page(state: &State, site: &Site) -> Result<Response<Body>, AppError> {
    let notes = storage(state)?.list(DEFAULT_LIMIT).await?;
    Ok(html_response(StatusCode::OK, render_page(&state.node, &site.version, &notes)))
}

/// The notes page. Every value from storage or configuration is escaped.
pub fn render_page(node: &str, release: &str, notes: &[Note]) -> String {
    let mut page = String::with_capacity(2048 + notes.len() * 256);
    page.push_str(concat!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width\"><title>Notes</title>",
        "<style>body{font:16px/1.4 system-ui,sans-serif;max-width:40em;margin:2em auto;padding:0 1em}",
        "li{margin:.6em 0}small{color:#666}textarea{width:100%;height:5em}footer{margin-top:2em;color:#444}</style>",
        "</head><body><h1>Notes</h1>\n",
        "<form method=\"post\" action=\"/app\"><p><input name=\"author\" maxlength=\"64\" required placeholder=\"Your name\"></p>",
        "<p><textarea name=\"text\" maxlength=\"2000\" required placeholder=\"Your note\"></textarea></p>",
        "<p><button>Post</button></p></form>\n<ul id=\"notes\">\n",
    ));
    if notes.is_empty() {
        page.push_str("<li>No notes yet.</li>\n");
    }
    for note in notes {
        page.push_str(&format!(
            "<li><b>{}</b>: {}<br><small>#{} at {} via {} (release {})</small></li>\n",
            escape(&note.author),
            escape(&note.text),
            note.id,
            escape(&note.created_at),
            escape(&note.node),
            escape(&note.release),
        ));
    }
    page.push_str(&format!(
        "</ul>\n<footer id=\"served-by\">Served by node <b>{}</b>, release <b>{}</b>.</footer>\n</body></html>\n",
        escape(node),
        escape(release)
    ));
    page
}

/// HTML text escaping. Five characters, so written here rather than pulling in a crate.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html_response(status: StatusCode, page: String) -> Response<Body> {
    let mut response = Response::new(full(page));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(author: &str, text: &str, expected: Result<(&str, &str), &str>) {
        let result = NewNote { author: author.into(), text: text.into() }.validate();
        match (result, expected) {
            (Ok(n), Ok((a, t))) => assert_eq!((n.author.as_str(), n.text.as_str()), (a, t)),
            (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{e} vs {msg}"),
            (r, e) => panic!("{author:?} {text:?}: got {r:?}, expected {e:?}"),
        }
    }

    #[test]
    fn validation() {
        check(" ann ", " hello\n", Ok(("ann", "hello")));
        check("ann", "two\nlines\ttab", Ok(("ann", "two\nlines\ttab")));
        check("", "x", Err("author must not be empty"));
        check("   ", "x", Err("author must not be empty"));
        check("ann", " ", Err("text must not be empty"));
        check(&"a".repeat(65), "x", Err("author is longer than 64"));
        check(&"é".repeat(64), "x", Ok((&"é".repeat(64), "x")));
        check("ann", &"x".repeat(2001), Err("text is longer than 2000"));
        check("a\u{7}b", "x", Err("author must not contain control"));
        check("ann", "a\u{0}b", Err("text must not contain control"));
    }

    #[test]
    fn page_escapes_everything() {
        let note = Note {
            id: 7,
            author: "<script>".into(),
            text: "a & b \"q\" 'x'".into(),
            node: "web<1>".into(),
            release: "1.0".into(),
            created_at: "2026-01-01T00:00:00.000000Z".into(),
        };
        let page = render_page("web&1", "2.0<", &[note]);
        assert!(page.contains("<b>&lt;script&gt;</b>: a &amp; b &quot;q&quot; &#39;x&#39;"), "{page}");
        assert!(page.contains("via web&lt;1&gt; (release 1.0)"));
        assert!(page.contains("Served by node <b>web&amp;1</b>, release <b>2.0&lt;</b>"));
        assert!(!page.contains("<script>"));
        assert!(render_page("n", "r", &[]).contains("No notes yet."));
    }
}
