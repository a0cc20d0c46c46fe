//! The HTTP side of the node: listeners (plain, TLS, or plain redirecting to HTTPS), one
//! tokio task per connection, HTTP/1.1 and HTTP/2 through hyper-util's auto builder (h2c by
//! prior knowledge, h2 over TLS by ALPN), graceful shutdown and drain, the routes, the
//! access log and the metrics.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper::server::conn::{http1, http2};
use hyper_util::server::conn::auto;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::sendfile::{EagerStream, SendfileStream};
use crate::{quick, State};

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every response.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// After rejecting an oversized upload, read and discard at most this much more of it, so the
/// client gets to read the 413 instead of a connection reset...
const DRAIN_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// ...for at most this long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Response header naming the release that served the request.
pub const X_RELEASE: header::HeaderName = header::HeaderName::from_static("x-release");
/// A TLS handshake must finish within this.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener does with its connections.
#[derive(Clone)]
pub enum ListenerKind {
    /// Plain HTTP, every route.
    Plain,
    /// HTTPS.
    Tls(TlsAcceptor),
    /// Plain HTTP answering 308 to `https://host[:port]/path` (except `/healthz` and
    /// `/metrics`, which load balancers and scrapers ask over plain HTTP).
    RedirectToHttps { https_port: u16 },
}

impl ListenerKind {
    fn name(&self) -> &'static str {
        match self {
            ListenerKind::Plain => "http",
            ListenerKind::Tls(_) => "https",
            ListenerKind::RedirectToHttps { .. } => "http-redirect",
        }
    }
}

/// A bound listener, not yet accepting. Its socket has `SO_REUSEPORT`: each HTTP thread
/// accepts on a socket of its own bound to the same address, and the kernel spreads the
/// connections over them (nginx's worker model, without a shared accept queue).
pub struct Listener {
    socket: std::net::TcpListener,
    local_addr: SocketAddr,
    kind: ListenerKind,
}

/// A listening socket with `SO_REUSEPORT` (call inside a runtime).
///
/// And `TCP_DEFER_ACCEPT` (nginx's `listen ... deferred`, HAProxy's `defer-accept`): the
/// kernel hands a connection over once its first bytes (the request, or the TLS client
/// hello) are there, so the first read after `accept` finds them. Without it, under load
/// most connections were accepted before their request arrived: a read that found nothing,
/// and a wait in `epoll` for the request. A client that connects and says nothing is
/// handed over after about a second all the same.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    let seconds: libc::c_int = 1;
    // SAFETY: setsockopt on our own socket with a pointer to an int of the size given.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Listener {
    pub async fn bind(addr: SocketAddr, kind: ListenerKind) -> anyhow::Result<Listener> {
        let context = || format!("binding the {} listener on {addr}", kind.name());
        let socket = reuseport_listener(addr).and_then(TcpListener::into_std).with_context(context)?;
        let local_addr = socket.local_addr().context("listener address")?;
        Ok(Listener { socket, local_addr, kind })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where a redirecting listener sends clients (the HTTPS listener's real port).
    pub fn set_https_port(&mut self, port: u16) {
        if let ListenerKind::RedirectToHttps { https_port } = &mut self.kind {
            *https_port = port;
        }
    }
}

/// Serves `listeners` on `threads` threads, each a single-threaded tokio runtime with its own
/// socket per listener (so a connection lives on one thread: no cross-thread wakeups; a
/// thread about to sleep takes connections still queued at another thread's socket, see
/// [`steal_if_waiting`]), until `stop` says true or its sender is gone; then each thread stops accepting
/// and gives its connections `grace` to finish (see [`accept_loop`]).
pub async fn serve(listeners: Vec<Listener>, threads: usize, state: Arc<State>, stop: watch::Receiver<bool>, grace: Duration) {
    let specs: Vec<(SocketAddr, ListenerKind)> = listeners.iter().map(|l| (l.local_addr, l.kind.clone())).collect();
    let mut first: Vec<Option<std::net::TcpListener>> = listeners.into_iter().map(|l| Some(l.socket)).collect();
    // New connections in turn over the threads, rather than by the kernel's hash.
    let balancers: Vec<Option<Arc<crate::balance::Balancer>>> = specs
        .iter()
        .map(|_| {
            if threads < 2 {
                return None;
            }
            match crate::balance::Balancer::load() {
                Ok(b) => Some(Arc::new(b)),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot load the balancing of new connections over HTTP threads (needs CAP_BPF); the kernel spreads connections by hash");
                    None
                }
            }
        })
        .collect();
    let groups: Vec<Arc<Group>> = specs.iter().map(|_| Arc::default()).collect();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    for t in 0..threads.max(1) {
        // Thread 0 takes the sockets bound at start; the others bind their own.
        let sockets: Vec<Option<std::net::TcpListener>> = first.iter_mut().map(Option::take).collect();
        let (specs, state, stop, done_tx, balancers, groups) = (specs.clone(), Arc::clone(&state), stop.clone(), done_tx.clone(), balancers.clone(), groups.clone());
        let spawned = std::thread::Builder::new().name(format!("web-http-{t}")).spawn(move || {
            // The balancers learn when this thread sleeps for want of work (see `balance.rs`).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(|| {
                    steal_if_waiting();
                    set_asleep(true);
                })
                .on_thread_unpark(|| set_asleep(false))
                .build();
            let runtime = match runtime {
                Ok(runtime) => runtime,
                Err(e) => return warn!(thread = t, error = %e, "HTTP thread without a runtime"),
            };
            runtime.block_on(async move {
                let mut loops = JoinSet::new();
                for ((((addr, kind), socket), balancer), group) in specs.into_iter().zip(sockets).zip(balancers).zip(groups) {
                    let listener = match socket {
                        Some(socket) => Ok(socket),
                        None => reuseport_listener(addr).and_then(TcpListener::into_std),
                    };
                    // Accepted through mio, not tokio: a connection answered at once is never
                    // registered with the runtime (see `quick::answer_at_once`).
                    let listener = listener.and_then(|l| {
                        let l = Arc::new(mio::net::TcpListener::from_std(l));
                        // SAFETY: the mio listener owns its socket and keeps it open until the
                        // last Arc (the AsyncFd's or the group's) is dropped; same fd always.
                        unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }.map_err(std::io::Error::from)
                    });
                    match listener {
                        Ok(listener) => {
                            let balanced = balancer.and_then(|b| match b.register(listener.get_ref()) {
                                Ok(index) => Some((b, index)),
                                Err(e) => {
                                    warn!(thread = t, %addr, error = %format!("{e:#}"), "socket not balanced; the kernel's hash picks it");
                                    None
                                }
                            });
                            let connections = Arc::new(OpenConnections { balanced, ..Default::default() });
                            let steal = Arc::new(tokio::sync::Notify::new());
                            group.add(Arc::clone(listener.get_ref()));
                            if threads > 1 {
                                STEALERS.with(|s| s.borrow_mut().push((Arc::clone(&group), Arc::clone(listener.get_ref()), Arc::clone(&steal), Arc::clone(&connections))));
                            }
                            let socket = Socket { listener, group, steal };
                            loops.spawn(accept_loop(socket, addr, kind, Arc::clone(&state), stop.clone(), grace, connections));
                        }
                        Err(e) => warn!(thread = t, %addr, error = %e, "HTTP thread cannot listen; the others serve"),
                    }
                }
                while loops.join_next().await.is_some() {}
            });
            // Connections still open after their grace period end here, before the thread
            // says it has stopped.
            drop(runtime);
            drop(done_tx);
        });
        if let Err(e) = spawned {
            warn!(thread = t, error = %e, "cannot start an HTTP thread");
        }
    }
    drop(done_tx);
    // Every thread dropped its sender: all have stopped.
    let _ = done_rx.recv().await;
}

/// An accept loop's socket: its group, its own socket, and how to wake the loop to take
/// connections from the others' queues.
type Stealer = (Arc<Group>, Arc<mio::net::TcpListener>, Arc<tokio::sync::Notify>, Arc<OpenConnections>);

thread_local! {
    /// This HTTP thread's accept loops (their balancers learn when it sleeps, through their
    /// `OpenConnections`).
    static STEALERS: std::cell::RefCell<Vec<Stealer>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What an accept loop accepts from.
struct Socket {
    /// Its own socket, accepted from through mio (see `quick::answer_at_once`).
    listener: AsyncFd<Arc<mio::net::TcpListener>>,
    /// The sockets of the same address on the other HTTP threads, and its own.
    group: Arc<Group>,
    /// Woken when the thread is about to sleep while another socket of the group has
    /// connections waiting.
    steal: Arc<tokio::sync::Notify>,
}

/// Connections taken from another thread's queue per socket and turn.
const STEAL_BATCH: usize = 16;

/// Before this thread sleeps: wakes its accept loops whose group has a connection waiting
/// in another thread's queue (that thread is busy, or preempted), so that they take it
/// instead of sleeping. A new connection goes to one thread's queue (`balance.rs`), which
/// cannot know that the thread will be off its CPU for a scheduler tick (4 ms here) right
/// after; nginx's shared accept queue has no such wait.
fn steal_if_waiting() {
    STEALERS.with(|stealers| {
        for (group, own, steal, open) in stealers.borrow().iter() {
            // Only a thread without open connections: one with keep-alive connections keeps
            // the share the balancer gave it (taking more would leave the threads uneven for
            // as long as those connections last), and saves the poll.
            if open.len() == 0 && group.others_waiting(own) {
                steal.notify_one();
            }
        }
    });
}

/// The sockets of one listening address, one per HTTP thread.
#[derive(Default)]
struct Group(std::sync::Mutex<Vec<Arc<mio::net::TcpListener>>>);

impl Group {
    fn add(&self, socket: Arc<mio::net::TcpListener>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(socket);
    }

    fn remove(&self, socket: &Arc<mio::net::TcpListener>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).retain(|s| !Arc::ptr_eq(s, socket));
    }

    /// The group's sockets but `own`.
    fn others(&self, own: &Arc<mio::net::TcpListener>) -> Vec<Arc<mio::net::TcpListener>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|s| !Arc::ptr_eq(s, own)).cloned().collect()
    }

    /// Whether a socket of the group other than `own` has a connection to accept (one
    /// `poll(2)` that does not wait).
    fn others_waiting(&self, own: &Arc<mio::net::TcpListener>) -> bool {
        use std::os::fd::AsRawFd;
        let mut fds = [libc::pollfd { fd: -1, events: libc::POLLIN, revents: 0 }; 16];
        let mut n = 0;
        for socket in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if n < fds.len() && !Arc::ptr_eq(socket, own) {
                fds[n].fd = socket.as_raw_fd();
                n += 1;
            }
        }
        if n == 0 {
            return false;
        }
        // SAFETY: poll reads and writes `n` initialised entries of `fds`.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, 0) };
        ready > 0 && fds[..n].iter().any(|p| p.revents & libc::POLLIN != 0)
    }
}

/// Tells the balancers of this thread's sockets whether it sleeps (its runtime parks).
fn set_asleep(asleep: bool) {
    STEALERS.with(|stealers| {
        for (_, _, _, open) in stealers.borrow().iter() {
            if let Some((balancer, index)) = &open.balanced {
                balancer.set_asleep(*index, asleep);
            }
        }
    });
}

/// Accepts connections until `stop` says true, then stops accepting and gives the open
/// connections `grace` to finish their in-flight requests (idle keep-alive connections
/// are closed at once, HTTP/2 ones get a GOAWAY). Connections still busy are dropped.
async fn accept_loop(
    socket: Socket,
    local_addr: SocketAddr,
    kind: ListenerKind,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    connections: Arc<OpenConnections>,
) {
    let Socket { listener, group, steal } = socket;
    let builders = Arc::new(Builders::new(&state));
    // New plain connections whose request the quick path answers and closes are answered in
    // this loop (`quick::answer_at_once`).
    let at_once = matches!(kind, ListenerKind::Plain) && state.quick_path;
    // The connections watch stop and drain through channels of this loop's own, fed from the
    // node's: every connection registers with them, and a channel shared by all HTTP threads
    // would bounce its lock between CPUs on each connection.
    let mut drain = state.health.drain_watch();
    let (local_stop, conn_stop) = watch::channel(false);
    let (local_drain, conn_drain) = watch::channel(*drain.borrow_and_update());
    let mut drain_open = true;
    // What becomes of a connection accepted here (or taken from another thread's queue).
    let take = |mut stream: std::net::TcpStream, peer: SocketAddr| {
        let mut ahead = bytes::BytesMut::new();
        if at_once {
            stream = match quick::answer_at_once(&state, stream, peer) {
                quick::AtOnce::Done => return,
                quick::AtOnce::Serve(stream, read) => {
                    ahead = read;
                    stream
                }
                quick::AtOnce::Finish(stream, rest) => {
                    let stream = match TcpStream::from_std(stream) {
                        Ok(stream) => stream,
                        Err(e) => {
                            warn!(error = %e, "cannot register a connection");
                            return;
                        }
                    };
                    let (open, state) = (connections.open(), Arc::clone(&state));
                    tokio::spawn(async move {
                        let _open = open;
                        let mut io = SendfileStream::finishing(stream, rest.corked());
                        quick::finish(&mut io, rest, &state, peer).await;
                    });
                    return;
                }
            };
        }
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, "cannot register a connection");
                return;
            }
        };
        // Bound to a wildcard address: ask which one the client reached.
        let local = if local_addr.ip().is_unspecified() {
            let Ok(local) = stream.local_addr() else { return };
            local
        } else {
            local_addr
        };
        // TCP_NODELAY: inherited from the listening socket (Linux), no syscall here.
        let conn = Connection {
            _open: connections.open(),
            state: Arc::clone(&state),
            builders: Arc::clone(&builders),
            local,
            peer,
            kind: kind.clone(),
            stop: conn_stop.clone(),
            drain: conn_drain.clone(),
        };
        // Boxed: the task then holds a pointer, not the future, and tokio moves the
        // task's future several times between spawn and completion.
        tokio::spawn(Box::pin(conn.serve(stream, ahead)));
    };
    loop {
        tokio::select! {
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            changed = drain.changed(), if drain_open => match changed {
                Ok(()) => { local_drain.send_replace(*drain.borrow_and_update()); }
                Err(_) => drain_open = false,
            },
            accepted = listener.async_io(Interest::READABLE, |l| l.accept()) => match accepted {
                Ok((stream, peer)) => take(std::net::TcpStream::from(stream), peer),
                Err(e) => {
                    // Typically EMFILE/ENFILE: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = steal.notified() => {
                // This thread ran out of work while another's queue holds connections (that
                // thread is busy, or off its CPU): take them, as from a shared accept queue.
                for other in group.others(listener.get_ref()) {
                    for _ in 0..STEAL_BATCH {
                        let Ok((stream, peer)) = other.accept() else { break };
                        take(std::net::TcpStream::from(stream), peer);
                    }
                }
            }
        }
    }
    // Closed now, so that the kernel stops queueing connections at it: out of the group and
    // of this thread's stealers (which hold it too), then dropped.
    group.remove(listener.get_ref());
    STEALERS.with(|s| s.borrow_mut().retain(|(_, own, _, _)| !Arc::ptr_eq(own, listener.get_ref())));
    drop(listener);
    local_stop.send_replace(true);
    info!(%local_addr, open_connections = connections.len(), ?grace, "listener shutting down");
    if tokio::time::timeout(grace, connections.all_closed()).await.is_err() {
        // They end when the thread's runtime is dropped (see `serve`).
        warn!(%local_addr, remaining = connections.len(), "grace period over, dropping busy connections");
    }
}

/// The connections of an accept loop still open, so that its shutdown can wait for them. (A
/// `JoinSet` does that too, at the cost of an entry allocated, linked and reaped per
/// connection, which shows with a new connection per request.) With a balancer, the count is
/// also published to it, which sends new connections to the thread with the fewest.
#[derive(Default)]
struct OpenConnections {
    count: std::sync::atomic::AtomicUsize,
    all_closed: tokio::sync::Notify,
    balanced: Option<(Arc<crate::balance::Balancer>, u32)>,
}

/// Counts one open connection until dropped.
struct OpenGuard(Arc<OpenConnections>);

impl OpenConnections {
    fn open(self: &Arc<Self>) -> OpenGuard {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Some((balancer, index)) = &self.balanced {
            balancer.open_connections(*index).fetch_add(1, Ordering::Relaxed);
        }
        OpenGuard(Arc::clone(self))
    }

    fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Returns once no connection is open.
    async fn all_closed(&self) {
        loop {
            let closed = self.all_closed.notified();
            tokio::pin!(closed);
            // Registered before the count is read: a last close in between is not missed.
            closed.as_mut().enable();
            if self.len() == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some((balancer, index)) = &self.0.balanced {
            balancer.open_connections(*index).fetch_sub(1, Ordering::Relaxed);
        }
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// hyper's connection builders, made once per accept loop: `h1`/`h2` when the protocol is
/// known (ALPN, or the first bytes read), `auto` when it is not (TLS without ALPN). Knowing it
/// first saves hyper-util's auto builder a read of its own (the first 24 bytes, to look for
/// the HTTP/2 preface) per connection.
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(state: &State) -> Builders {
        const H2_MAX_STREAMS: u32 = 256;
        const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
        const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
        // HTTP/1.1 half-closure: a client that shuts its sending side after the request still
        // gets the answer (as from nginx), and hyper does not read the socket while it answers
        // to learn whether the client went away (a read that usually finds nothing; a client
        // that is gone is noticed when the answer is written).
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new()).header_read_timeout(state.header_read_timeout).half_close(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .keep_alive_interval(Some(H2_PING_INTERVAL));
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().timer(TokioTimer::new()).header_read_timeout(state.header_read_timeout).half_close(true);
        auto.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .keep_alive_interval(Some(H2_PING_INTERVAL));
        Builders { auto, h1, h2 }
    }
}

/// What every request of a connection needs to know about it.
struct Connection {
    /// Counted as open while this (or what it becomes) lives.
    _open: OpenGuard,
    state: Arc<State>,
    builders: Arc<Builders>,
    local: SocketAddr,
    peer: SocketAddr,
    kind: ListenerKind,
    /// The accept loop's stop and drain channels.
    stop: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
}

impl Connection {
    /// The connection's task. Its future stays small (the large states are boxed), since
    /// spawning moves it: a new connection per request would otherwise copy kilobytes.
    /// Serves a connection; `ahead` holds its first bytes if they were read already.
    async fn serve(self, stream: TcpStream, ahead: bytes::BytesMut) {
        match self.kind.clone() {
            // Boxed: a TLS stream held across the handshake's await would make every
            // connection's future (plain ones too) kilobytes larger.
            ListenerKind::Tls(acceptor) => Box::pin(self.serve_tls(acceptor, stream)).await,
            _ => self.serve_plain(stream, ahead).await,
        }
    }

    async fn serve_tls(self, acceptor: TlsAcceptor, stream: TcpStream) {
        let handshake = Box::pin(tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(EagerStream::new(stream))));
        match handshake.await {
            Ok(Ok(tls)) => {
                // ALPN says which protocol; without it, hyper-util looks at the bytes.
                let h2 = tls.get_ref().1.alpn_protocol().map(|p| p == b"h2");
                if h2 == Some(true) || !self.state.quick_path {
                    return Box::pin(self.serve_io(tls, true, h2, None)).await;
                }
                // HTTP/1.1, or no ALPN: the quick path first (an HTTP/2 preface is not for it).
                let mut io = quick::Replay::new(tls);
                if self.serve_quick(&mut io, true, None).await == quick::End::HandOver {
                    Box::pin(self.serve_io(io, true, h2, None)).await
                }
            }
            Ok(Err(e)) => debug!(peer = %self.peer, error = %e, "TLS handshake failed"),
            Err(_) => debug!(peer = %self.peer, "TLS handshake timed out"),
        }
    }

    /// Plain HTTP: cached files go out with sendfile. The first read (bounded like a request
    /// head) tells HTTP/1.1 from HTTP/2 with prior knowledge.
    async fn serve_plain(self, stream: TcpStream, ahead: bytes::BytesMut) {
        let mut io = SendfileStream::with_ahead(stream, ahead);
        // Usually the request is there already: no timer, no waiting.
        let read = match io.try_read_preface() {
            Ok(Some(h2)) => Ok(Ok(h2)),
            Err(e) => Ok(Err(e)),
            Ok(None) => {
                let mut stop = self.stop.clone();
                let first = tokio::time::timeout(self.state.header_read_timeout, io.read_preface());
                tokio::select! {
                    read = first => read,
                    // Shutting down: a connection that has sent nothing yet closes at once.
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        };
        match read {
            Ok(Ok(h2)) => {
                let closing = io.closing();
                if !h2 && self.state.quick_path && matches!(self.kind, ListenerKind::Plain) && self.serve_quick(&mut io, false, Some(&closing)).await == quick::End::Closed {
                    return;
                }
                Box::pin(self.serve_io(io, false, Some(h2), Some(closing))).await
            }
            Ok(Err(e)) => debug!(peer = %self.peer, error = %e, "reading the first request failed"),
            Err(_) => debug!(peer = %self.peer, "no request in time"),
        }
    }

    /// The requests of an HTTP/1.x connection that [`quick`] answers, until one is not.
    async fn serve_quick<I: quick::ReadAhead>(&self, io: &mut I, tls: bool, closing: Option<&AtomicBool>) -> quick::End {
        let q = quick::Quick { state: &self.state, peer: self.peer, tls, closing, stop: &self.stop };
        quick::serve(io, q).await
    }

    /// Serves HTTP/2 (`h2` true), HTTP/1.1 (false) or whichever the client speaks (`None`).
    async fn serve_io<I>(self, io: I, tls: bool, h2: Option<bool>, closing: Option<Arc<AtomicBool>>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection { _open, state, builders, local, peer, kind, stop, drain } = self;
        let is_h2 = AtomicBool::new(h2 == Some(true));
        // One reference-counted value per request, and it is this connection's own: cloning
        // the node's `Arc<State>` per request would bounce its count between the threads.
        let info = Arc::new(ConnInfo { state, local, peer, tls, kind, is_h2, closing });
        let watch = ConnWatch { info: Arc::clone(&info), stop, drain, h1_only: h2 == Some(false), _open };
        let service = service_fn(move |req| {
            let info = Arc::clone(&info);
            async move { Ok::<_, Infallible>(handle(&info.state, &info, req).await) }
        });
        let io = TokioIo::new(io);
        // hyper's own HTTP/1.1 or HTTP/2 connection when the protocol is known: smaller than
        // the auto connection (which holds room for either), so less to move per connection.
        match h2 {
            Some(false) => Box::pin(watch.drive(builders.h1.serve_connection(io, service), |c| c.graceful_shutdown())).await,
            Some(true) => Box::pin(watch.drive(builders.h2.serve_connection(io, service), |c| c.graceful_shutdown())).await,
            None => Box::pin(watch.drive(builders.auto.serve_connection(io, service), |c| c.graceful_shutdown())).await,
        }
    }
}

/// What a connection watches besides its requests: shutdown and drain.
struct ConnWatch {
    info: Arc<ConnInfo>,
    stop: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
    _open: OpenGuard,
    /// Served by hyper's HTTP/1.1 connection: can never become HTTP/2.
    h1_only: bool,
}

impl ConnWatch {
    /// Runs `conn` to its end; on shutdown, or on drain for HTTP/2, asks it to finish
    /// gracefully (`graceful` is the connection type's `graceful_shutdown`).
    async fn drive<C, E>(self, conn: C, graceful: impl Fn(Pin<&mut C>))
    where
        C: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let ConnWatch { info, mut stop, mut drain, h1_only, _open } = self;
        let (peer, is_h2) = (info.peer, &info.is_h2);
        tokio::pin!(conn);
        // An HTTP/1.1-only connection ignores drain (its responses say `Connection: close`
        // instead): one channel less to register with per connection.
        let (mut shutting_down, mut drain_open) = (false, !h1_only);
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = stop.changed(), if !shutting_down => {
                    graceful(conn.as_mut());
                    shutting_down = true;
                }
                changed = drain.changed(), if !shutting_down && drain_open => {
                    if changed.is_err() {
                        drain_open = false;
                    } else if *drain.borrow_and_update() && is_h2.load(Ordering::Relaxed) {
                        // HTTP/2: GOAWAY, in-flight streams finish. (HTTP/1.1 connections
                        // get `Connection: close` on their next response instead: closing
                        // an idle one here could race with a request the client is sending.)
                        graceful(conn.as_mut());
                        shutting_down = true;
                    }
                }
            }
        }
    }
}

struct ConnInfo {
    state: Arc<State>,
    local: SocketAddr,
    peer: SocketAddr,
    tls: bool,
    kind: ListenerKind,
    /// Set by the first HTTP/2 request (known from the start with ALPN or prior knowledge).
    is_h2: AtomicBool,
    /// Plain HTTP: tells the connection's IO that the response being written is the last
    /// (see [`SendfileStream`]).
    closing: Option<Arc<AtomicBool>>,
}

/// Fixed route names for metrics and the access log.
pub(crate) fn route_name(method: &Method, path: &str) -> &'static str {
    match path {
        "/whoami" => "whoami",
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        "/upload" => "upload",
        "/app" => "app",
        "/api/notes" => "api_notes",
        p if p.starts_with("/api/") => "api_note",
        _ if method == Method::GET || method == Method::HEAD => "static",
        _ => "other",
    }
}

/// Counts a request in flight: decrements the gauge even when the request future is dropped.
pub(crate) struct InFlight<'a>(&'a State);

impl InFlight<'_> {
    pub(crate) fn new(state: &State) -> InFlight<'_> {
        state.metrics.in_flight.inc();
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}

/// Routes one request under the request timeout, adds the common headers, counts it and
/// writes its access log line.
async fn handle(state: &State, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let _in_flight = InFlight::new(state);
    let version = req.version();
    if version == Version::HTTP_2 && !conn.is_h2.load(Ordering::Relaxed) {
        conn.is_h2.store(true, Ordering::Relaxed);
    }
    let method = req.method().clone();
    // What the request's `Connection` says, for the IO of a plain connection (read before the
    // request is handed on).
    let asks = conn.closing.as_ref().map(|_| ConnectionTokens::of(req.headers()));
    let path = req.uri().path();
    let redirect = matches!(conn.kind, ListenerKind::RedirectToHttps { .. }) && path != "/healthz" && path != "/metrics";
    let route = if redirect { "redirect" } else { route_name(&method, path) };
    // The path outlives the request only for the access log: no copy when it is off.
    let logged_path = tracing::enabled!(target: "access", tracing::Level::INFO).then(|| path.to_owned());
    // The release this request is served from, even if a reload switches it meanwhile.
    let site = state.site.load_full();

    let mut response = match answer_now(state, conn, &site, route, redirect, &req) {
        Some(response) => response,
        // Boxed: this future is written into hyper's connection for every request, so it
        // stays as small as the answers above need.
        None => Box::pin(answer_later(state, conn, &site, route, req)).await,
    };

    let headers = response.headers_mut();
    headers.insert(X_RELEASE, site.version_header().clone());
    if state.health.is_draining() && version <= Version::HTTP_11 {
        // Keep-alive clients reconnect, and the balancer sends them to another node.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(closing) = &conn.closing {
        if asks.is_some_and(|asks| asks.ends_connection(version, response.headers())) {
            closing.store(true, Ordering::Relaxed);
        }
    }
    let status = response.status().as_u16();
    let elapsed = start.elapsed();
    state.metrics.observe(route, &method, status, elapsed.as_secs_f64());
    if let Some(path) = logged_path {
        let bytes = response.body().size_hint().exact();
        Access { method: &method, path: &path, version, status, bytes, elapsed, release: &site.version }.log(conn.peer, conn.tls);
    }
    response
}

/// The answers that need no waiting (nothing to read from the client, no storage, no file
/// system): redirects, `/whoami`, `/healthz`, `/metrics` and files kept in memory.
fn answer_now(
    state: &State,
    conn: &ConnInfo,
    site: &crate::site::Site,
    route: &'static str,
    redirect: bool,
    req: &Request<Incoming>,
) -> Option<Response<Body>> {
    if redirect {
        if let ListenerKind::RedirectToHttps { https_port } = conn.kind {
            return Some(redirect_to_https(req, https_port));
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return None;
    }
    match route {
        "static" => site.serve_from_memory(req),
        "whoami" | "healthz" | "metrics" => Some(answer_get(state, conn, site, route)),
        _ => None,
    }
}

/// The other answers (and methods not allowed), under the request timeout when they read
/// from the client.
async fn answer_later(
    state: &State,
    conn: &ConnInfo,
    site: &Arc<crate::site::Site>,
    route: &'static str,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method();
    let get_or_head = method == Method::GET || method == Method::HEAD;
    // Nothing to read from the client (a body of a GET is ignored): no timer to arm.
    let reads_nothing = matches!(conn.kind, ListenerKind::RedirectToHttps { .. })
        || (get_or_head && matches!(route, "static" | "whoami" | "healthz" | "metrics"));
    let allowed = |allow| async move { method_not_allowed(allow) };
    // The routes that wait for something are boxed: the request's future is written into
    // hyper's connection for every request, so it stays as small as the routes answered at
    // once need (a few hundred bytes instead of kilobytes).
    let answer: Pin<Box<dyn Future<Output = Response<Body>> + Send + '_>> = match route {
        "whoami" | "healthz" | "metrics" if get_or_head => return answer_get(state, conn, site, route),
        "upload" if method == Method::POST || method == Method::PUT => Box::pin(upload(state, req)),
        "upload" => Box::pin(allowed("POST, PUT")),
        "app" | "api_notes" | "api_note" => Box::pin(crate::app::handle(state, site, req)),
        "static" => Box::pin(Arc::clone(site).serve(req)),
        _ => Box::pin(allowed("GET, HEAD")),
    };
    if reads_nothing {
        return answer.await;
    }
    match tokio::time::timeout(state.request_timeout, answer).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = text(StatusCode::REQUEST_TIMEOUT, "request not received in time\n");
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// The `close` and `keep-alive` tokens of a message's `Connection` header lines.
#[derive(Clone, Copy)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
}

impl ConnectionTokens {
    fn of(headers: &HeaderMap) -> ConnectionTokens {
        let mut tokens = ConnectionTokens { close: false, keep_alive: false };
        for value in headers.get_all(header::CONNECTION) {
            for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
                tokens.close |= token.eq_ignore_ascii_case("close");
                tokens.keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        }
        tokens
    }

    /// Whether hyper ends an HTTP/1.x connection after the response with `response` headers
    /// to a request with these tokens: either side says `close`, or an HTTP/1.0 request does
    /// not ask for keep-alive (hyper's own rules).
    fn ends_connection(self, version: Version, response: &HeaderMap) -> bool {
        if version > Version::HTTP_11 {
            return false;
        }
        self.close || (version == Version::HTTP_10 && !self.keep_alive) || ConnectionTokens::of(response).close
    }
}

/// One access log line.
pub(crate) struct Access<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub version: Version,
    pub status: u16,
    pub bytes: Option<u64>,
    pub elapsed: Duration,
    pub release: &'a str,
}

impl Access<'_> {
    pub(crate) fn log(&self, peer: SocketAddr, tls: bool) {
        let Access { method, path, version, status, bytes, elapsed, release } = self;
        info!(
            target: "access",
        peer = %peer,
        tls = tls,
        method = %method,
        path = %path,
        version = ?version,
        status,
        bytes,
        duration_us = elapsed.as_micros() as u64,
        release = %release,
    );
    }
}

/// GET/HEAD of `/whoami`, `/healthz` or `/metrics` (`route`).
fn answer_get(state: &State, conn: &ConnInfo, site: &crate::site::Site, route: &'static str) -> Response<Body> {
    match route {
        "whoami" => whoami(state, site, conn),
        "healthz" => match state.health.check() {
            Ok(()) => text(StatusCode::OK, "ok"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, &reason),
        },
        _ => {
            let mut response = Response::new(full(state.metrics.encode(state.health.check().is_ok())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
    }
}

/// 308 to the same host and path over HTTPS.
fn redirect_to_https(req: &Request<Incoming>, https_port: u16) -> Response<Body> {
    let host = req
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
    let Some(host) = host else {
        return text(StatusCode::BAD_REQUEST, "no Host header to redirect to\n");
    };
    // Drop the port of the plain listener; IPv6 literals keep their brackets.
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) => h,
        _ => host.as_str(),
    };
    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    match HeaderValue::from_str(&format!("https://{host}{port}{path}")) {
        Ok(location) => {
            let mut response = text(StatusCode::PERMANENT_REDIRECT, "moved to HTTPS\n");
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        Err(_) => text(StatusCode::BAD_REQUEST, "invalid Host header\n"),
    }
}

#[derive(Serialize)]
struct WhoAmI<'a> {
    node: &'a str,
    version: &'a str,
    release: &'a str,
    release_dir: String,
    server_addr: String,
    client_addr: String,
    tls: bool,
    http_version: String,
}

fn whoami(state: &State, site: &crate::site::Site, conn: &ConnInfo) -> Response<Body> {
    let http_version = if conn.is_h2.load(Ordering::Relaxed) { "HTTP/2.0" } else { "HTTP/1.1" };
    json_status(
        StatusCode::OK,
        &WhoAmI {
            node: &state.node,
            version: &site.version,
            release: &site.version,
            release_dir: site.dir.display().to_string(),
            server_addr: conn.local.to_string(),
            client_addr: conn.peer.to_string(),
            tls: conn.tls,
            http_version: http_version.to_owned(),
        },
    )
}

#[derive(Serialize)]
struct UploadDigest {
    bytes: u64,
    sha256: String,
}

/// Hashes the request body as it streams in (nothing is buffered), or answers 413 once it is
/// known to be larger than the limit.
async fn upload(state: &State, req: Request<Incoming>) -> Response<Body> {
    let limit = state.max_upload_bytes;
    let http1 = req.version() <= Version::HTTP_11;
    let declared = content_length(req.headers());
    if declared.is_some_and(|len| len > limit) {
        // A client waiting for "100 Continue" never sends the body: no need to read it.
        let drained = !expects_continue(req.headers()) && drain(req.into_body(), declared).await;
        return too_large(limit, http1 && !drained);
    }

    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                debug!(error = %e, "upload body could not be read");
                return text(StatusCode::BAD_REQUEST, "could not read the request body\n");
            }
        };
        let Ok(data) = frame.into_data() else { continue }; // trailers
        received += data.len() as u64;
        if received > limit {
            let drained = drain(body, None).await;
            return too_large(limit, http1 && !drained);
        }
        hasher.update(&data);
    }
    json_status(StatusCode::OK, &UploadDigest { bytes: received, sha256: hex::encode(hasher.finalize()) })
}

/// Reads and discards the rest of a rejected body, within `DRAIN_MAX_BYTES` and `DRAIN_TIMEOUT`.
/// True if the whole body was read (the connection can then be kept alive).
async fn drain(mut body: Incoming, declared: Option<u64>) -> bool {
    if declared.is_some_and(|len| len > DRAIN_MAX_BYTES) {
        return false;
    }
    let discard = async {
        let mut discarded: u64 = 0;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                discarded += data.len() as u64;
                if discarded > DRAIN_MAX_BYTES {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIMEOUT, discard).await.unwrap_or(false)
}

fn too_large(limit: u64, close: bool) -> Response<Body> {
    let mut response =
        text(StatusCode::PAYLOAD_TOO_LARGE, &format!("upload larger than the limit of {limit} bytes\n"));
    if close {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub(crate) fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(full(body.to_owned()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

pub(crate) fn json_status(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(full(body));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => {
            warn!(error = %e, "JSON encoding failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sockets of one `SO_REUSEPORT` group: a connection waiting in one's queue is seen
    /// from the other (`others_waiting`) and taken from there (`others`), as an idle HTTP
    /// thread takes a busy one's.
    #[tokio::test]
    async fn a_socket_sees_and_takes_the_connections_waiting_at_the_others() {
        let a = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = reuseport_listener(addr).unwrap();
        let (a, b) = (Arc::new(mio::net::TcpListener::from_std(a.into_std().unwrap())), Arc::new(mio::net::TcpListener::from_std(b.into_std().unwrap())));
        let group = Group::default();
        group.add(Arc::clone(&a));
        group.add(Arc::clone(&b));
        assert!(!group.others_waiting(&a) && !group.others_waiting(&b), "nothing waits yet");
        assert_eq!(group.others(&a).len(), 1);
        // The kernel spreads connections over the two by a hash: connect until one waits at
        // b (a `deferred` listener hands it over once its first bytes are there).
        let mut clients = Vec::new();
        let mut waiting_at_b = false;
        for _ in 0..64 {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut c, b"GET / HTTP/1.1\r\n\r\n").unwrap();
            clients.push(c);
            std::thread::sleep(Duration::from_millis(5));
            if group.others_waiting(&a) {
                waiting_at_b = true;
                break;
            }
        }
        assert!(waiting_at_b, "no connection of 64 went to the second socket");
        // Taken from a's side, through the group.
        let taken = group.others(&a).iter().filter_map(|other| other.accept().ok()).count();
        assert_eq!(taken, 1);
        assert!(!group.others_waiting(&a), "taken");
    }
}
