//! The quick path: HTTP/1.1 `GET` and `HEAD` of the files of the release kept in memory,
//! answered without hyper, the way nginx answers them: parse the head where it was read, write
//! a prepared head and the body, loop for the next request of the connection.
//!
//! Why by hand: that is what most requests to a node are, and through hyper a new connection
//! for one small file cost about twice nginx's user-space time (17.8 against 9.2 µs measured
//! with perf: hyper's dispatcher, request and response objects, header maps, the body box, its
//! per-connection buffers and timer), spread so that no change inside hyper's design removed
//! it. The head is parsed by httparse, the parser hyper uses itself, and the answer is the same
//! one hyper would write for the same [`crate::site::Site`] answer (the same headers, in the same
//! order, `date` and `connection: close` added the same way; a test compares both).
//!
//! Everything else goes to hyper, with the bytes read so far, and hyper serves the rest of the
//! connection: other methods and routes, HTTP/1.0, requests with a body, `Range`, `Expect`,
//! `Upgrade`, files not kept in memory, a head that is not whole within [`MAX_HEAD`] bytes,
//! more than [`MAX_HEADERS`] header lines, anything httparse rejects (hyper answers it) and
//! HTTP/2 (never started here). So this path answers nothing that hyper would answer
//! differently; the access log line and the metrics of a request are the same either way.
//!
//! Waiting for a request follows hyper's HTTP/1.1 rules: the node's header read timeout runs
//! from the moment a head is awaited (an idle keep-alive connection included), a shutdown
//! closes a connection that waits, a draining node answers `connection: close`. After each
//! answer the connection's task yields, so that one fast client cannot hold the thread.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use hyper::{Method, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::http::{route_name, Access, InFlight};
use crate::site::{accepts, plain_path, Entry, Site, Variant};
use crate::State;

/// Header lines a request may have to be answered here (hyper takes up to 100).
pub const MAX_HEADERS: usize = 32;
/// A head not whole within this many bytes goes to hyper (which allows more).
pub const MAX_HEAD: usize = 8 * 1024;

/// A connection whose bytes can be read ahead, parsed in place, and left for the next reader.
pub(crate) trait ReadAhead: AsyncRead + AsyncWrite + Unpin {
    /// The bytes read and not consumed yet: the next reads of the connection return them first.
    fn ahead(&mut self) -> &mut BytesMut;
    /// Reads what the connection has into [`ReadAhead::ahead`]: the count, 0 at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>>;
    /// Whether dropping the connection ends it as well as a shutdown would: nothing sent
    /// would be lost (no unread bytes, which make a close send a reset) and no protocol needs
    /// a last word (TLS's close_notify). Then the last response goes out with the close.
    fn may_just_close(&mut self) -> bool {
        false
    }
}

/// Any connection (a TLS one) with bytes read ahead.
pub(crate) struct Replay<I> {
    io: I,
    ahead: BytesMut,
}

impl<I> Replay<I> {
    pub fn new(io: I) -> Replay<I> {
        Replay { io, ahead: BytesMut::new() }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> ReadAhead for Replay<I> {
    fn ahead(&mut self) -> &mut BytesMut {
        &mut self.ahead
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.ahead.capacity() - self.ahead.len() < 1024 {
            self.ahead.reserve(4096);
        }
        let mut buf = ReadBuf::uninit(self.ahead.spare_capacity_mut());
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
        unsafe { self.ahead.set_len(self.ahead.len() + n) };
        Poll::Ready(Ok(n))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Replay<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            buf.put_slice(&self.ahead[..n]);
            self.ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Replay<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How the quick path left a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Done with: closed, gone, timed out, or shut down.
    Closed,
    /// hyper serves the rest, from the bytes read ahead on.
    HandOver,
}

/// The connection the quick path serves.
pub(crate) struct Quick<'a> {
    pub state: &'a State,
    pub peer: SocketAddr,
    pub tls: bool,
    /// Plain connections: tells the IO that the response written is the last (see
    /// [`crate::sendfile::SendfileStream`]).
    pub closing: Option<&'a AtomicBool>,
    /// The accept loop's shutdown signal.
    pub stop: &'a watch::Receiver<bool>,
}

/// A request the quick path answers.
struct Ask<'s> {
    /// Its length in bytes (head only: it has no body).
    len: usize,
    head_only: bool,
    /// It asks to close the connection after the answer.
    close: bool,
    file: &'s Entry,
    variant: Variant,
    not_modified: bool,
    /// The path, when the access log is on.
    logged_path: Option<String>,
}

/// What the bytes read so far hold.
enum Step<'s> {
    Answer(Ask<'s>),
    /// The start of a head.
    More,
    /// A request for hyper (or bytes hyper rejects).
    HandOver,
}

/// Serves the requests of an HTTP/1.x connection until one is not for this path (then hyper
/// gets the connection) or the connection ends.
pub(crate) async fn serve<I: ReadAhead>(io: &mut I, q: Quick<'_>) -> End {
    let state = q.state;
    let mut stop = None;
    let mut deadline = None;
    loop {
        if !io.ahead().is_empty() {
            let start = Instant::now();
            let site = state.site.load_full();
            let logging = tracing::enabled!(target: "access", tracing::Level::INFO);
            let ask = match decide(&site, io.ahead(), logging) {
                Step::Answer(ask) => ask,
                Step::More if io.ahead().len() < MAX_HEAD => {
                    // The rest of the head is on its way.
                    let stop = stop.get_or_insert_with(|| q.stop.clone());
                    match wait(io, stop, *deadline.get_or_insert_with(|| head_deadline(state))).await {
                        Ok(()) => continue,
                        Err(()) => return End::Closed,
                    }
                }
                Step::More | Step::HandOver => return End::HandOver,
            };
            let in_flight = InFlight::new(state);
            let answer = Answer::new(state, ask, start);
            if answer.close {
                if let Some(closing) = q.closing {
                    closing.store(true, Ordering::Relaxed);
                }
            }
            let written = write_all(io, &mut answer.bufs()).await;
            drop(in_flight);
            if let Some(logged) = &answer.logged {
                logged.log(&site.version, q.peer, q.tls);
            }
            io.ahead().advance(answer.len);
            if written.is_err() {
                return End::Closed;
            }
            if answer.close {
                if !(io.ahead().is_empty() && io.may_just_close()) {
                    let _ = poll_fn(|cx| Pin::new(&mut *io).poll_shutdown(cx)).await;
                }
                return End::Closed;
            }
            deadline = None;
            // The other connections of the thread first: a client that sends its next request
            // at once (from another CPU, or pipelined) would otherwise be answered again and
            // again within this poll, with nothing to stop it but tokio's budget of 128 reads,
            // while the thread's other connections wait (a p99 of 40-110 ms against nginx's
            // 2 ms, measured with wrk -t8 -c32). nginx, too, answers a connection's next
            // request only after the events already waiting.
            tokio::task::yield_now().await;
            continue;
        }
        let stop = stop.get_or_insert_with(|| q.stop.clone());
        if wait(io, stop, *deadline.get_or_insert_with(|| head_deadline(state))).await.is_err() {
            return End::Closed;
        }
    }
}

/// What [`answer_at_once`] did with a new connection.
pub(crate) enum AtOnce {
    /// Answered and closed (or it failed).
    Done,
    /// Not answered here: the connection goes on the usual way, with the bytes read.
    Serve(std::net::TcpStream, BytesMut),
    /// The answer is partly written (the socket was full): [`finish`] writes the rest.
    Finish(std::net::TcpStream, Box<Rest>),
}

/// Answers a new plain HTTP connection on the spot, before tokio knows of it, when its first
/// bytes are a whole request that the quick path answers and that closes the connection (or
/// the node drains): read, write, close, three system calls, as nginx does with `deferred`
/// accepts. Registering the socket with tokio's `epoll` and removing it again, and spawning a
/// task, cost about 8 % of the node's CPU per connection (measured with perf, 1 KiB files,
/// a new connection per request). Anything else goes on as usual with the bytes read.
pub(crate) fn answer_at_once(state: &State, stream: std::net::TcpStream, peer: SocketAddr) -> AtOnce {
    let mut ahead = BytesMut::new();
    match crate::sendfile::recv_preface(&stream, &mut ahead) {
        Ok(Some(false)) => {}
        Ok(_) => return AtOnce::Serve(stream, ahead),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return AtOnce::Serve(stream, ahead),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "reading the first request failed");
            return AtOnce::Done;
        }
    }
    let start = Instant::now();
    let site = state.site.load_full();
    let logging = tracing::enabled!(target: "access", tracing::Level::INFO);
    let ask = match decide(&site, &ahead, logging) {
        // Only a connection's whole and last request: no waiting for more of it, and no
        // pipelined bytes behind it that a keep-alive connection would have to serve.
        Step::Answer(ask) if ask.len == ahead.len() && (ask.close || state.health.is_draining()) => ask,
        _ => return AtOnce::Serve(stream, ahead),
    };
    // Whether the read emptied the socket: a close with unread bytes would send a reset.
    let drained = ahead.len() < ahead.capacity();
    let in_flight = InFlight::new(state);
    let answer = Answer::new(state, ask, start);
    let mut bufs = answer.bufs();
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    match crate::sendfile::write_last(&stream, &mut bufs) {
        Ok((written, _)) if written == total => {
            drop(in_flight);
            if let Some(logged) = &answer.logged {
                logged.log(&site.version, peer, false);
            }
            if !drained {
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
            AtOnce::Done
        }
        Ok((written, corked)) => {
            let (head, body) = (answer.head().clone(), answer.body().clone());
            let Answer { tail, logged, .. } = answer;
            let rest = Box::new(Rest { head, tail, body, written, corked, logged, site: Arc::clone(&site) });
            AtOnce::Finish(stream, rest)
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "writing the answer failed");
            AtOnce::Done
        }
    }
}

/// The part of an answer that [`answer_at_once`] could not write.
pub(crate) struct Rest {
    head: Bytes,
    tail: Tail,
    body: Bytes,
    written: usize,
    corked: bool,
    logged: Option<Logged>,
    site: Arc<Site>,
}

impl Rest {
    /// Whether [`answer_at_once`] set `TCP_CORK` on the socket.
    pub fn corked(&self) -> bool {
        self.corked
    }
}

/// Writes the rest of an answer that [`answer_at_once`] began, then ends the connection.
pub(crate) async fn finish<I: ReadAhead>(io: &mut I, rest: Box<Rest>, state: &State, peer: SocketAddr) {
    let in_flight = InFlight::new(state);
    let mut bufs = [IoSlice::new(&rest.head), IoSlice::new(rest.tail.bytes()), IoSlice::new(&rest.body)];
    let mut bufs = &mut bufs[..];
    IoSlice::advance_slices(&mut bufs, rest.written);
    let written = write_all(io, bufs).await;
    drop(in_flight);
    if let Some(logged) = &rest.logged {
        logged.log(&rest.site.version, peer, false);
    }
    if written.is_ok() {
        let _ = poll_fn(|cx| Pin::new(&mut *io).poll_shutdown(cx)).await;
    }
}

/// A request answered from memory: the bytes that go out, and what is counted and logged.
struct Answer<'s> {
    ask: Ask<'s>,
    /// Length of the request.
    len: usize,
    /// The connection closes after it.
    close: bool,
    tail: Tail,
    logged: Option<Logged>,
}

impl<'s> Answer<'s> {
    /// The answer to `ask`, counted in the metrics (before the write, as hyper's path counts).
    fn new(state: &State, mut ask: Ask<'s>, start: Instant) -> Answer<'s> {
        let close = ask.close || state.health.is_draining();
        let status: u16 = if ask.not_modified { 304 } else { 200 };
        let mut tail = Tail::default();
        if close {
            tail.put(b"connection: close\r\n");
        }
        tail.put(b"date: ");
        DATE.with(|date| tail.put(&date.now()));
        tail.put(b"\r\n\r\n");
        let method = if ask.head_only { Method::HEAD } else { Method::GET };
        state.metrics.observe("static", &method, status, start.elapsed().as_secs_f64());
        let sends_body = !ask.head_only && !ask.not_modified;
        let bytes = if sends_body { ask.file.body(ask.variant).len() as u64 } else { 0 };
        let logged = ask.logged_path.take().map(|path| Logged { method, path, status, bytes, start });
        Answer { len: ask.len, close, tail, logged, ask }
    }

    fn head(&self) -> &'s Bytes {
        self.ask.file.head(self.ask.variant, self.ask.not_modified)
    }

    /// The body sent: empty for HEAD and 304.
    fn body(&self) -> &'s Bytes {
        static NONE: Bytes = Bytes::new();
        if self.ask.head_only || self.ask.not_modified {
            &NONE
        } else {
            self.ask.file.body(self.ask.variant)
        }
    }

    fn bufs(&self) -> [IoSlice<'_>; 3] {
        [IoSlice::new(self.head()), IoSlice::new(self.tail.bytes()), IoSlice::new(self.body())]
    }
}

/// The access log line of an answer, written once the answer is out.
struct Logged {
    method: Method,
    path: String,
    status: u16,
    bytes: u64,
    start: Instant,
}

impl Logged {
    fn log(&self, release: &str, peer: SocketAddr, tls: bool) {
        let Logged { method, path, status, bytes, start } = self;
        Access { method, path, version: Version::HTTP_11, status: *status, bytes: Some(*bytes), elapsed: start.elapsed(), release }.log(peer, tls);
    }
}

/// When a head awaited from now must be whole (hyper's `header_read_timeout`).
fn head_deadline(state: &State) -> tokio::time::Instant {
    tokio::time::Instant::now() + state.header_read_timeout
}

/// Reads more of the connection: `Err` when it ended, failed, timed out or the node stops.
async fn wait<I: ReadAhead>(io: &mut I, stop: &mut watch::Receiver<bool>, deadline: tokio::time::Instant) -> Result<(), ()> {
    tokio::select! {
        read = poll_fn(|cx| io.poll_fill(cx)) => match read {
            Ok(n) if n > 0 => Ok(()),
            _ => Err(()),
        },
        _ = stop.wait_for(|stop| *stop) => Err(()),
        _ = tokio::time::sleep_until(deadline) => Err(()),
    }
}

/// What the bytes in `buf` ask of `site`.
fn decide<'s>(site: &'s Site, buf: &[u8], logging: bool) -> Step<'s> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Step::More,
        Err(_) => return Step::HandOver,
    };
    let head_only = match req.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return Step::HandOver,
    };
    let target = req.path.unwrap_or("");
    if req.version != Some(1) || !target.starts_with('/') {
        return Step::HandOver;
    }
    // A target of a file's plain path, or else one that hyper takes too (it would answer 400).
    let path = if plain_path(target) {
        target
    } else {
        match hyper::http::uri::PathAndQuery::try_from(target) {
            Ok(pq) => &target[..pq.path().len()],
            Err(_) => return Step::HandOver,
        }
    };
    if route_name(&Method::GET, path) != "static" {
        return Step::HandOver;
    }
    let Some(file) = site.cached(path) else { return Step::HandOver };
    let (mut close, mut if_none_match, mut if_modified_since) = (false, None, None);
    for h in req.headers.iter() {
        let name = h.name;
        let is = |n: &str| name.len() == n.len() && name.eq_ignore_ascii_case(n);
        if is("connection") {
            close |= text(h.value).split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        } else if is("content-length") || is("transfer-encoding") || is("range") || is("if-range") || is("expect") || is("upgrade") {
            return Step::HandOver;
        } else if is("if-none-match") {
            if_none_match = if_none_match.or(Some(text(h.value)));
        } else if is("if-modified-since") {
            if_modified_since = if_modified_since.or(Some(text(h.value)));
        }
    }
    let accept_encoding = || req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("accept-encoding")).map(|h| text(h.value));
    let variant = file.variant(|coding| accepts(accept_encoding(), coding));
    let not_modified = file.not_modified(variant, if_none_match, if_modified_since);
    let logged_path = logging.then(|| path.to_owned());
    Step::Answer(Ask { len, head_only, close, file, variant, not_modified, logged_path })
}

/// A header value as hyper's `HeaderValue::to_str` sees it: visible ASCII, else "".
fn text(value: &[u8]) -> &str {
    if value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        // Checked: ASCII.
        std::str::from_utf8(value).unwrap_or("")
    } else {
        ""
    }
}

/// Writes all of `bufs`, then flushes.
async fn write_all<I: AsyncWrite + Unpin>(io: &mut I, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut bufs = bufs;
    while !bufs.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, bufs)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx)).await
}

/// The end of a head: `connection: close`, `date`, the blank line.
struct Tail {
    bytes: [u8; 64],
    len: usize,
}

impl Default for Tail {
    fn default() -> Tail {
        Tail { bytes: [0; 64], len: 0 }
    }
}

impl Tail {
    fn put(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The `date` of responses, formatted once a second per thread (as hyper does).
struct CachedDate {
    at: std::cell::Cell<u64>,
    text: std::cell::Cell<[u8; 29]>,
}

thread_local! {
    static DATE: CachedDate = const { CachedDate { at: std::cell::Cell::new(u64::MAX), text: std::cell::Cell::new([0; 29]) } };
}

impl CachedDate {
    fn now(&self) -> [u8; 29] {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.at.get() != secs {
            let mut text = [0; 29];
            let formatted = httpdate::fmt_http_date(now);
            if formatted.len() == text.len() {
                text.copy_from_slice(formatted.as_bytes());
                self.text.set(text);
                self.at.set(secs);
            }
        }
        self.text.get()
    }
}
