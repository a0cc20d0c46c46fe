//! Backend health checks, with HAProxy's semantics (the ones operators already know).
//!
//! - A backend **starts up**, as HAProxy's servers do unless configured otherwise: traffic
//!   flows to it from the start, and checks only take it out after real failures.
//! - **`fall`**: an up backend is marked down after `fall` *consecutive* failed checks
//!   (default 3). **`rise`**: a down backend is marked up after `rise` *consecutive*
//!   successful checks (default 2). A check that agrees with the current state resets the
//!   count toward the other state, so `ok, fail, fail, ok, fail, fail, fail` with `fall = 3`
//!   marks the backend down at the 7th check only. (This is what HAProxy's single `health`
//!   counter in `0..rise+fall` amounts to.)
//! - **`inter`** ([`CheckConfig::interval`], default 2000 ms): the pause between checks
//!   while the state is stable. **`fastinter`** ([`CheckConfig::fast_interval`], default
//!   `inter`): the pause while the backend is in transition, i.e. after at least one check
//!   disagreed with the current state, so a flip is confirmed (or dismissed) sooner.
//! - **`timeout check`** ([`CheckConfig::timeout`], default `inter`): bounds a whole probe,
//!   connect included; a probe that does not finish in time is a failed check.
//!
//! Checks: [`CheckKind::Tcp`] succeeds when a TCP connect succeeds; [`CheckKind::Http`]
//! sends an HTTP/1.1 `GET` and succeeds when the status code is the expected one (only the
//! status line is read). Anything else from the backend (refusal, reset, early close,
//! garbage, wrong status, silence) is a failed check with a short reason, never a panic.
//!
//! [`Tracker`] is the pure rise/fall state machine; [`probe`] runs one check; [`spawn`]
//! runs both in a loop for one backend and reports every check on a channel.

use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{debug, info, warn};

/// HAProxy's default `inter`.
const DEFAULT_INTERVAL: Duration = Duration::from_millis(2000);
/// HAProxy's default `rise`.
const DEFAULT_RISE: u32 = 2;
/// HAProxy's default `fall`.
const DEFAULT_FALL: u32 = 3;
/// Longest HTTP status line accepted (a real one is ~20 bytes).
const MAX_STATUS_LINE: usize = 1024;

/// How to check a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect to the port succeeds within the timeout.
    Tcp { port: u16 },
    /// An HTTP/1.1 GET of `path` (Host header = the backend address) answers
    /// `expect_status` within the timeout.
    Http { port: u16, path: String, expect_status: u16 },
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckKind::Tcp { port } => write!(f, "tcp port {port}"),
            CheckKind::Http { port, path, expect_status } => {
                write!(f, "http port {port} GET {path} expect {expect_status}")
            }
        }
    }
}

/// How and how often to check a backend, and when to flip its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    pub kind: CheckKind,
    /// Interval between checks in a stable state (HAProxy `inter`, default 2000 ms).
    pub interval: Duration,
    /// Interval while a backend is changing state, i.e. after at least one check disagreed
    /// with the current state (HAProxy `fastinter`; default: equal to `interval`).
    pub fast_interval: Duration,
    /// Check timeout (HAProxy: `timeout check`, defaulting to `inter`; default here: equal
    /// to `interval`).
    pub timeout: Duration,
    /// Consecutive successes to mark a down backend up (default 2).
    pub rise: u32,
    /// Consecutive failures to mark an up backend down (default 3).
    pub fall: u32,
}

impl CheckConfig {
    /// A TCP connect check with HAProxy's defaults (inter 2000 ms, fastinter = timeout =
    /// inter, rise 2, fall 3).
    pub fn tcp(port: u16) -> Self {
        Self::with_defaults(CheckKind::Tcp { port })
    }

    /// An HTTP GET check with HAProxy's defaults (inter 2000 ms, fastinter = timeout =
    /// inter, rise 2, fall 3).
    pub fn http(port: u16, path: &str, expect_status: u16) -> Self {
        Self::with_defaults(CheckKind::Http { port, path: path.to_owned(), expect_status })
    }

    fn with_defaults(kind: CheckKind) -> Self {
        CheckConfig {
            kind,
            interval: DEFAULT_INTERVAL,
            fast_interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_INTERVAL,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        }
    }
}

/// The rise/fall state machine of one backend, pure and synchronous (unit-testable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    up: bool,
    /// Consecutive results that disagree with `up` (failures while up, successes while down).
    toward_other: u32,
    rise: u32,
    fall: u32,
}

impl Tracker {
    /// A backend starts up (as HAProxy's servers do unless configured otherwise).
    /// `rise` and `fall` of 0 are taken as 1 (every check decides).
    pub fn new(rise: u32, fall: u32) -> Self {
        Tracker { up: true, toward_other: 0, rise: rise.max(1), fall: fall.max(1) }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// True while the last check(s) disagree with the current state (use fast_interval then).
    pub fn in_transition(&self) -> bool {
        self.toward_other > 0
    }

    /// Records one check result; returns Some(new_state_is_up) exactly when the state flips:
    /// up -> down after `fall` consecutive failures, down -> up after `rise` consecutive
    /// successes. A result that agrees with the state resets the opposite counter.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.toward_other = 0;
            return None;
        }
        self.toward_other = self.toward_other.saturating_add(1);
        let needed = if self.up { self.fall } else { self.rise };
        if self.toward_other >= needed {
            self.up = !self.up;
            self.toward_other = 0;
            Some(self.up)
        } else {
            None
        }
    }
}

/// One probe. Ok(latency) or Err(a short human-readable reason, e.g. "connect: connection
/// refused", "timeout after 2000 ms", "HTTP 503, expected 200").
///
/// The whole probe (connect, request, status line) is bounded by `timeout`; a timeout
/// reason also names the step that was under way, e.g. "timeout after 200 ms (waiting for
/// the response)".
pub async fn probe(kind: &CheckKind, addr: Ipv4Addr, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut step = Step::Connect;
    let result = tokio::time::timeout(timeout, run_probe(kind, addr, &mut step)).await;
    match result {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err(format!("timeout after {} ms ({step})", timeout.as_millis())),
    }
}

/// What a probe was doing, for timeout reasons.
#[derive(Debug, Clone, Copy)]
enum Step {
    Connect,
    Send,
    Receive,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Connect => "connect",
            Step::Send => "sending the request",
            Step::Receive => "waiting for the response",
        })
    }
}

async fn run_probe(kind: &CheckKind, addr: Ipv4Addr, step: &mut Step) -> Result<(), String> {
    match kind {
        CheckKind::Tcp { port } => {
            *step = Step::Connect;
            connect(addr, *port).await.map(drop)
        }
        CheckKind::Http { port, path, expect_status } => {
            check_path(path)?;
            *step = Step::Connect;
            let mut stream = connect(addr, *port).await?;
            *step = Step::Send;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: lbd-health\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("send: {}", io_reason(&e)))?;
            *step = Step::Receive;
            let line = read_status_line(&mut stream).await?;
            let status = parse_status_line(&line)?;
            if status == *expect_status {
                Ok(())
            } else {
                Err(format!("HTTP {status}, expected {expect_status}"))
            }
        }
    }
}

async fn connect(addr: Ipv4Addr, port: u16) -> Result<TcpStream, String> {
    TcpStream::connect(SocketAddrV4::new(addr, port))
        .await
        .map_err(|e| format!("connect: {}", io_reason(&e)))
}

/// The path goes verbatim into the request line: refuse what would break it.
fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(format!("invalid check path {path:?} (must start with '/', no spaces or control characters)"));
    }
    Ok(())
}

/// Reads up to the end of the first line (without the line end).
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("receive: {}", io_reason(&e)))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "connection closed without a response".to_owned()
            } else {
                format!("connection closed in the status line: \"{}\"", excerpt(&buf))
            });
        }
        let scanned = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[scanned..].iter().position(|&b| b == b'\n') {
            let mut end = scanned + i;
            if end > 0 && buf[end - 1] == b'\r' {
                end -= 1;
            }
            buf.truncate(end);
            return Ok(buf);
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err(format!("no HTTP status line in the first {MAX_STATUS_LINE} bytes: \"{}\"", excerpt(&buf)));
        }
    }
}

/// `HTTP/1.1 200 OK` -> 200. The reason phrase is optional.
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let invalid = || format!("not an HTTP status line: \"{}\"", excerpt(line));
    let mut parts = line.splitn(3, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with(b"HTTP/") || code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&status) {
        return Err(invalid());
    }
    Ok(status)
}

/// Backend bytes for a log line: bounded and escaped.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let shown = &bytes[..bytes.len().min(MAX)];
    let mut s = shown.escape_ascii().to_string();
    if bytes.len() > MAX {
        s.push_str("...");
    }
    s
}

/// "Connection refused (os error 111)" -> "connection refused".
fn io_reason(e: &io::Error) -> String {
    let s = e.to_string();
    let s = match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => &s[..i],
        _ => &s,
    };
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => format!("{:?}", e.kind()),
    }
}

/// What a checker reports, on every check (not only transitions), so the daemon can export
/// metrics.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The backend index given to `spawn`.
    pub backend: u32,
    pub ok: bool,
    pub latency: Option<Duration>,
    /// Why the check failed.
    pub reason: Option<String>,
    /// Some(up) when this check flipped the state.
    pub transition: Option<bool>,
    /// State after this check.
    pub up: bool,
}

/// Runs checks for one backend until the returned handle is aborted or the receiver is
/// dropped: probe, [`Tracker::record`], send a [`CheckReport`] on `tx`, sleep
/// `fast_interval` if in transition else `interval`. The first check runs at once.
///
/// Transitions are logged with tracing, at warn (down) and info (up), with the fields
/// `backend`, `address`, `reason` (down) or `latency_ms` (up), and `checks`.
pub fn spawn(
    index: u32,
    name: String,
    addr: Ipv4Addr,
    config: CheckConfig,
    tx: mpsc::Sender<CheckReport>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            () = check_loop(index, &name, addr, &config, &tx) => {}
            () = tx.closed() => {}
        }
        debug!(backend = %name, address = %addr, "health checker stopped (report receiver dropped)");
    })
}

async fn check_loop(index: u32, name: &str, addr: Ipv4Addr, config: &CheckConfig, tx: &mpsc::Sender<CheckReport>) {
    let mut tracker = Tracker::new(config.rise, config.fall);
    loop {
        let result = probe(&config.kind, addr, config.timeout).await;
        let ok = result.is_ok();
        let transition = tracker.record(ok);
        let (latency, reason) = match result {
            Ok(latency) => (Some(latency), None),
            Err(reason) => (None, Some(reason)),
        };
        match (transition, &reason) {
            (Some(false), reason) => {
                let reason = reason.as_deref().unwrap_or_default();
                warn!(
                    backend = %name, address = %addr, check = %config.kind, reason, checks = tracker.fall,
                    "marked down after {} failed check(s)", tracker.fall
                );
            }
            (Some(true), _) => {
                let latency_ms = latency.map_or(0.0, |l| l.as_secs_f64() * 1000.0);
                info!(
                    backend = %name, address = %addr, check = %config.kind, latency_ms, checks = tracker.rise,
                    "marked up after {} successful check(s)", tracker.rise
                );
            }
            (None, Some(reason)) => {
                debug!(backend = %name, address = %addr, reason = %reason, up = tracker.is_up(), "check failed");
            }
            (None, None) => {}
        }
        let report = CheckReport { backend: index, ok, latency, reason, transition, up: tracker.is_up() };
        if tx.send(report).await.is_err() {
            return;
        }
        let pause = if tracker.in_transition() { config.fast_interval } else { config.interval };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

    /// `seq`: '+' ok, '-' failed. `flips`: per check, '.' none, 'D' marked down, 'U' marked
    /// up. `trans`: per check, 't' in transition afterwards, 's' stable.
    #[test]
    fn tracker_table() {
        let cases: &[(u32, u32, &str, &str, &str)] = &[
            // (rise, fall, seq, flips, trans)
            (2, 3, "+--+---", "......D", "sttstts"),
            (2, 3, "+--+---+-++", "......D...U", "sttsttststs"),
            (2, 3, "----", "..D.", "ttss"),
            (2, 2, "--+-++", ".D...U", "tststs"),
            (3, 2, "--++-+++", ".D.....U", "tsttstts"),
            (1, 1, "-+-+", "DUDU", "ssss"),
            (1, 1, "++--++", "..D.U.", "ssssss"),
            (1, 3, "---+", "..DU", "ttss"),
            (3, 1, "-++-+++", "D.....U", "sttstts"),
            // 0 is taken as 1.
            (0, 0, "-+-+", "DUDU", "ssss"),
        ];
        for &(rise, fall, seq, flips, trans) in cases {
            assert!(flips.len() == seq.len() && trans.len() == seq.len(), "malformed row {seq}");
            let mut t = Tracker::new(rise, fall);
            assert!(t.is_up() && !t.in_transition(), "a backend starts up and stable");
            let mut got_flips = String::new();
            let mut got_trans = String::new();
            for c in seq.chars() {
                let was_up = t.is_up();
                let flip = t.record(c == '+');
                got_flips.push(match flip {
                    None => '.',
                    Some(true) => 'U',
                    Some(false) => 'D',
                });
                assert_eq!(flip.is_some(), was_up != t.is_up(), "Some exactly when the state flips");
                if let Some(up) = flip {
                    assert_eq!(up, t.is_up());
                }
                got_trans.push(if t.in_transition() { 't' } else { 's' });
            }
            assert_eq!(got_flips, flips, "flips for rise={rise} fall={fall} seq={seq}");
            assert_eq!(got_trans, trans, "in_transition for rise={rise} fall={fall} seq={seq}");
        }
    }

    #[test]
    fn defaults_are_haproxy_defaults() {
        let c = CheckConfig::tcp(80);
        assert_eq!(c.kind, CheckKind::Tcp { port: 80 });
        assert_eq!(c.interval, Duration::from_millis(2000));
        assert_eq!(c.fast_interval, c.interval);
        assert_eq!(c.timeout, c.interval);
        assert_eq!((c.rise, c.fall), (2, 3));
        let h = CheckConfig::http(8080, "/healthz", 200);
        assert_eq!(h.kind, CheckKind::Http { port: 8080, path: "/healthz".into(), expect_status: 200 });
        assert_eq!((h.interval, h.fast_interval, h.timeout, h.rise, h.fall), (c.interval, c.interval, c.interval, 2, 3));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK"), Ok(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service Unavailable"), Ok(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204"), Ok(204));
        for bad in [&b""[..], b"garbage", b"HTTP/1.1", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 abc OK",
            b"HTTP/1.1 000 Zero", b"SSH-2.0-OpenSSH_9.6", b"\xff\xfe\x00 200 OK"]
        {
            let e = parse_status_line(bad).expect_err("not a status line");
            assert!(e.contains("not an HTTP status line"), "{e}");
        }
        assert_eq!(io_reason(&io::Error::from_raw_os_error(libc::ECONNREFUSED)), "connection refused");
    }

    /// Serves every connection: reads the request head, then writes `response` and closes.
    fn serve(listener: TcpListener, response: &'static [u8]) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 512];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(response).await;
                    let _ = s.shutdown().await;
                });
            }
        })
    }

    async fn http_server(response: &'static [u8]) -> (u16, JoinHandle<()>) {
        let l = TcpListener::bind((LO, 0)).await.expect("bind");
        let port = l.local_addr().expect("local addr").port();
        (port, serve(l, response))
    }

    fn http(port: u16) -> CheckKind {
        CheckKind::Http { port, path: "/health".into(), expect_status: 200 }
    }

    const T: Duration = Duration::from_millis(500);

    /// A port nothing listens on (bound then released).
    async fn closed_port() -> u16 {
        let l = TcpListener::bind((LO, 0)).await.expect("bind");
        l.local_addr().expect("local addr").port()
    }

    #[tokio::test]
    async fn probe_tcp() {
        let l = TcpListener::bind((LO, 0)).await.expect("bind");
        let port = l.local_addr().expect("local addr").port();
        let latency = probe(&CheckKind::Tcp { port }, LO, T).await.expect("listening port");
        assert!(latency < T);

        let port = closed_port().await;
        let e = probe(&CheckKind::Tcp { port }, LO, T).await.expect_err("closed port");
        assert!(e.starts_with("connect: ") && e.contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn probe_http_ok_and_wrong_status() {
        let (port, srv) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        probe(&http(port), LO, T).await.expect("200");
        srv.abort();

        let (port, srv) = http_server(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let e = probe(&http(port), LO, T).await.expect_err("503");
        assert_eq!(e, "HTTP 503, expected 200");
        let expect_503 = CheckKind::Http { port, path: "/".into(), expect_status: 503 };
        probe(&expect_503, LO, T).await.expect("503 expected");
        srv.abort();

        let e = probe(&http(closed_port().await), LO, T).await.expect_err("closed port");
        assert!(e.starts_with("connect: ") && e.contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn probe_http_sends_the_documented_request() {
        let l = TcpListener::bind((LO, 0)).await.expect("bind");
        let port = l.local_addr().expect("local addr").port();
        let srv = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed before the end of the request");
                head.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.expect("write");
            head
        });
        let kind = CheckKind::Http { port, path: "/status?full=1".into(), expect_status: 200 };
        probe(&kind, LO, T).await.expect("200");
        let head = tokio::time::timeout(T, srv).await.expect("server done").expect("server task");
        assert_eq!(
            String::from_utf8(head).expect("ascii"),
            "GET /status?full=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nUser-Agent: lbd-health\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn probe_http_silent_backend_times_out() {
        let l = TcpListener::bind((LO, 0)).await.expect("bind");
        let port = l.local_addr().expect("local addr").port();
        let srv = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s); // accept, never answer, never close
            }
        });
        let t = Duration::from_millis(200);
        let start = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(1), probe(&http(port), LO, t))
            .await
            .expect("probe bounded by its timeout")
            .expect_err("silent backend");
        let took = start.elapsed();
        assert!(e.starts_with("timeout after 200 ms"), "{e}");
        assert!(took >= t && took < Duration::from_secs(1), "{took:?}");
        srv.abort();
    }

    #[tokio::test]
    async fn probe_http_bad_answers() {
        let cases: &[(&'static [u8], &str)] = &[
            (b"garbage\r\n\r\n", "not an HTTP status line: \"garbage\""),
            (b"\x00\xff\x10binary junk\n", "not an HTTP status line"),
            (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP status line"),
            (b"", "connection closed without a response"),
            (b"HTTP/1.1 200 O", "connection closed in the status line"),
            (&[b'x'; 4096], "no HTTP status line in the first 1024 bytes"),
        ];
        for &(response, want) in cases {
            let (port, srv) = http_server(response).await;
            let e = probe(&http(port), LO, T).await.expect_err("bad answer");
            assert!(e.contains(want), "answer {:?}: got {e:?}, want {want:?}", excerpt(response));
            assert!(e.len() < 200, "reasons stay short: {e}");
            srv.abort();
        }

        // Accepted then closed at once, before reading the request.
        let l = TcpListener::bind((LO, 0)).await.expect("bind");
        let port = l.local_addr().expect("local addr").port();
        let srv = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        let e = probe(&http(port), LO, T).await.expect_err("early close");
        assert!(e.contains("connection closed") || e.contains("reset") || e.starts_with("send: "), "{e}");
        srv.abort();
    }

    #[tokio::test]
    async fn probe_http_refuses_bad_paths() {
        for path in ["", "health", "/a b", "/a\r\nX-Injected: 1", "/\0"] {
            let kind = CheckKind::Http { port: 1, path: path.into(), expect_status: 200 };
            let e = probe(&kind, LO, T).await.expect_err("bad path");
            assert!(e.starts_with("invalid check path"), "{path:?}: {e}");
        }
    }

    async fn next_report(rx: &mut mpsc::Receiver<CheckReport>) -> CheckReport {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("a report within 2 s")
            .expect("checker still running")
    }

    /// Receives until a report with `transition == Some(want)`, within 3 s.
    async fn wait_transition(rx: &mut mpsc::Receiver<CheckReport>, want: bool) -> (CheckReport, Vec<CheckReport>) {
        let mut before = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                let r = rx.recv().await.expect("checker still running");
                if r.transition.is_some() {
                    return r;
                }
                before.push(r);
            }
        })
        .await
        .expect("transition within 3 s");
        assert_eq!(r.transition, Some(want), "unexpected transition: {r:?}");
        (r, before)
    }

    #[tokio::test]
    async fn spawn_reports_and_flips() {
        let (port, srv) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let config = CheckConfig {
            interval: Duration::from_millis(50),
            fast_interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            ..CheckConfig::http(port, "/health", 200)
        };
        let (tx, mut rx) = mpsc::channel(16);
        let checker = spawn(7, "web-1".into(), LO, config, tx);

        // Up from the start: reports flow, no transition.
        for _ in 0..3 {
            let r = next_report(&mut rx).await;
            assert_eq!(r.backend, 7);
            assert!(r.ok && r.up && r.transition.is_none() && r.reason.is_none(), "{r:?}");
            assert!(r.latency.is_some());
        }

        // Server gone: down after `fall` = 2 failures.
        srv.abort();
        let _ = srv.await; // the listener is dropped once the task is
        let (down, before) = wait_transition(&mut rx, false).await;
        assert!(!down.ok && !down.up && down.latency.is_none(), "{down:?}");
        let reason = down.reason.as_deref().unwrap_or_default();
        assert!(reason.contains("refused"), "{reason}");
        let failed_before: Vec<_> = before.iter().skip_while(|r| r.ok).collect();
        assert_eq!(failed_before.len(), 1, "fall=2: one failure before the flip: {before:?}");
        assert!(failed_before.iter().all(|r| !r.ok && r.up));

        // Server back on the same port: up after `rise` = 2 successes.
        let l = TcpListener::bind((LO, port)).await.expect("rebind the same port");
        let srv = serve(l, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let (up, before) = wait_transition(&mut rx, true).await;
        assert!(up.ok && up.up && up.latency.is_some() && up.reason.is_none(), "{up:?}");
        let ok_before: Vec<_> = before.iter().skip_while(|r| !r.ok).collect();
        assert_eq!(ok_before.len(), 1, "rise=2: one success before the flip: {before:?}");
        assert!(ok_before.iter().all(|r| r.ok && !r.up));

        // Dropping the receiver stops the checker.
        drop(rx);
        tokio::time::timeout(Duration::from_secs(1), checker)
            .await
            .expect("checker stops once the receiver is dropped")
            .expect("checker task did not panic");
        srv.abort();
    }

    #[tokio::test]
    async fn spawn_stops_when_aborted() {
        let config = CheckConfig {
            interval: Duration::from_millis(20),
            fast_interval: Duration::from_millis(20),
            timeout: T,
            ..CheckConfig::tcp(closed_port().await)
        };
        let (tx, mut rx) = mpsc::channel(4);
        let checker = spawn(0, "db".into(), LO, config, tx);
        let r = next_report(&mut rx).await;
        assert!(!r.ok && r.up && r.reason.is_some(), "{r:?}");
        checker.abort();
        assert!(tokio::time::timeout(Duration::from_secs(1), checker).await.expect("aborted").is_err());
        let end = tokio::time::timeout(Duration::from_secs(1), async {
            while rx.recv().await.is_some() {}
        })
        .await;
        assert!(end.is_ok(), "the channel closes once the checker is gone");
    }
}
