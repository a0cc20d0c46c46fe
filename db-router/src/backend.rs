//! One connection from the router to a MariaDB server, and the response relay.
//!
//! The relay walks the frames of a response as they arrive and copies them to the client
//! unchanged (the backend numbers its frames from 1 because the router forwards the client's
//! command as frame 0, so sequence ids already match). It looks at the first bytes of each
//! packet only to find where the response ends: OK, ERR, column count and definitions, rows up
//! to the terminator, `SERVER_MORE_RESULTS_EXISTS` for multi-results.

use std::{net::SocketAddr, time::Duration};

use bytes::{Buf, BytesMut};
use mysql_common::{
    constants::{CapabilityFlags, StatusFlags},
    io::ParseBuf,
    packets::{AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse, ServerError},
    proto::MySerialize,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UnixStream},
};

use crate::{
    protocol::{self, frame_header, MAX_FRAME},
    topology::ConnRole,
    stream::Stream,
};

/// Why a backend exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("cannot connect to {addr} over its Unix socket {}: {source}", path.display())]
    ConnectUnix { addr: SocketAddr, path: std::path::PathBuf, source: std::io::Error },
    #[error("connection to {addr} lost: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("{addr} refused the login: {message}")]
    Login { addr: SocketAddr, code: u16, state: [u8; 5], message: String },
    #[error("{addr} sent a packet the router does not understand: {what}")]
    Protocol { addr: SocketAddr, what: String },
    #[error("TLS with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
    #[error("timed out after {0:?} connecting to {1}")]
    Timeout(Duration, SocketAddr),
    /// The routing view took this server out of its role (see `Routing::takes_out`) while
    /// the session waited for its answer.
    #[error("{0} was taken out by the monitor (down, not answering, or replaced by a failover) before it answered")]
    TakenOut(SocketAddr),
}

/// Why a relay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Writing to the client failed: the client went away.
    #[error("client went away: {0}")]
    Client(std::io::Error),
}

/// Login parameters for a backend connection.
pub struct Login<'a> {
    pub user: &'a [u8],
    /// `SHA1(password)`, `None` for an account without a password.
    pub sha1_password: Option<&'a [u8; 20]>,
    pub database: Option<&'a [u8]>,
    /// The client's capabilities; the connection uses the subset both sides support.
    pub client_caps: CapabilityFlags,
    pub collation: u8,
    /// Ask for `CLIENT_SESSION_TRACK` even if the client did not (read-your-writes).
    pub session_track: bool,
    pub timeout: Duration,
    /// The server's Unix socket, when it runs on this host and the configuration names it
    /// (`sockets`): the connection goes there instead of to the TCP address.
    pub unix_socket: Option<&'a std::path::Path>,
    /// Open the connection for the in-kernel fast path: from a port bound first and
    /// reserved there, so that the server's end of it goes into the fast path's sockmap.
    pub fast: Option<&'a crate::fast_path::FastPath>,
    /// Log in over TLS (TCP connections only).
    pub tls: Option<&'a crate::tls::BackendTls>,
}

/// A port reserved with the fast path while its connection opens.
struct Reserved<'a>(&'a crate::fast_path::FastPath, u16);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.0.release_port(self.1);
    }
}

pub struct Backend {
    /// The server's address (its identity in the routing view), even when connected over
    /// its Unix socket.
    pub addr: SocketAddr,
    /// The connection's place in the in-kernel relay's maps (declared before `stream`: it
    /// leaves the maps before the socket closes).
    pub kernel: Option<crate::kernel_relay::BackendSlot>,
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Capabilities negotiated with this server.
    pub caps: CapabilityFlags,
    /// A number unique to this connection (prepared statement ids belong to it).
    pub serial: u64,
    pub server_version: String,
    /// The last relay passed bytes to the client (after a failure: the client saw part of
    /// an answer, so the statement cannot be retried elsewhere).
    pub relayed: bool,
    /// This connection on the routing view's watchlist, so that a wait for the server's
    /// answer ends once the view takes the server out (see [`Backend::watch_routing`]).
    routing_watch: Option<std::sync::Arc<crate::topology::Watched>>,
}

/// What the relay saw of one response.
#[derive(Debug, Default)]
pub struct Summary {
    /// Status flags of the last OK/EOF packet.
    pub status: Option<StatusFlags>,
    /// The response (or its last result) was an ERR packet: (code, state, message).
    pub error: Option<(u16, [u8; 5], String)>,
    /// `last_gtid` reported by the server (needs `CLIENT_SESSION_TRACK`).
    pub gtid: Option<String>,
    /// COM_STMT_PREPARE: (backend statement id, columns, params).
    pub prepared: Option<(u32, u16, u16)>,
    /// The server asked for a LOCAL INFILE: the client sends the file next.
    pub local_infile: bool,
    /// First column of the first row (text protocol), when `capture` was asked for.
    pub first_value: Option<Option<Vec<u8>>>,
}

/// The shape of the response to expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// COM_QUERY, COM_STMT_EXECUTE: OK, ERR, LOCAL INFILE or result sets.
    Results,
    /// COM_STMT_FETCH: rows then EOF.
    Rows,
    /// COM_STMT_PREPARE.
    Prepare,
    /// COM_FIELD_LIST: column definitions up to EOF.
    FieldList,
    /// One packet (COM_INIT_DB, COM_RESET_CONNECTION, COM_STMT_RESET, COM_STATISTICS, ...).
    Single,
}

/// Where relayed frames go.
pub enum Sink<'a> {
    Client {
        stream: &'a mut Stream,
        out: &'a mut BytesMut,
        /// The client did not negotiate `CLIENT_SESSION_TRACK`: OK packets carrying session
        /// state are rewritten without it.
        strip_state: bool,
        /// COM_STMT_PREPARE: the statement id the client sees.
        stmt_id: Option<u32>,
        /// Leave the answer's last bytes in `out` for the caller to send (the session sends
        /// them once it has decided whether the kernel may route the client's next command).
        hold: bool,
    },
    Discard,
}

#[derive(Clone, Copy, Debug)]
enum State {
    First,
    Columns(u64),
    ColumnsEof,
    Rows,
    PrepParams(u16, u16),
    PrepParamsEof(u16),
    PrepCols(u16),
    PrepColsEof,
    FieldList,
    Done,
}

static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Backend {
    /// Connects and logs in with `mysql_native_password`.
    pub async fn connect(addr: SocketAddr, login: &Login<'_>) -> Result<Backend, BackendError> {
        match tokio::time::timeout(login.timeout, Self::connect_inner(addr, login)).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout(login.timeout, addr)),
        }
    }

    async fn connect_inner(addr: SocketAddr, login: &Login<'_>) -> Result<Backend, BackendError> {
        let mut _reserved = None;
        let stream: Stream = match login.unix_socket {
            Some(path) => UnixStream::connect(path).await.map_err(|source| BackendError::ConnectUnix { addr, path: path.into(), source })?.into(),
            None => match login.fast.filter(|_| addr.is_ipv4()) {
                None => TcpStream::connect(addr).await.map_err(|source| BackendError::Connect { addr, source })?.into(),
                Some(fast) => {
                    let err = |source| BackendError::Connect { addr, source };
                    let socket = tokio::net::TcpSocket::new_v4().map_err(err)?;
                    socket.bind((std::net::Ipv4Addr::UNSPECIFIED, 0).into()).map_err(err)?;
                    let port = socket.local_addr().map_err(err)?.port();
                    fast.reserve_port(port);
                    // Until the login is over: by then the server has accepted the connection.
                    _reserved = Some(Reserved(fast, port));
                    socket.connect(addr).await.map_err(err)?.into()
                }
            },
        };
        let mut be = Backend {
            addr,
            kernel: None,
            routing_watch: None,
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(4096),
            caps: CapabilityFlags::empty(),
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            server_version: String::new(),
            relayed: false,
        };
        let (seq, hs) = be.read_packet().await?;
        if hs.first() == Some(&0xFF) {
            return Err(be.login_error(&hs));
        }
        let handshake = ParseBuf(&hs)
            .parse::<HandshakePacket>(())
            .map_err(|e| BackendError::Protocol { addr, what: format!("handshake: {e}") })?;
        be.server_version = handshake.server_version_str().into_owned();
        let server_caps = handshake.capabilities();
        let mut caps = (login.client_caps & server_caps & protocol::server_capabilities())
            | CapabilityFlags::CLIENT_PROTOCOL_41
            | CapabilityFlags::CLIENT_SECURE_CONNECTION
            | CapabilityFlags::CLIENT_LONG_PASSWORD;
        caps.remove(CapabilityFlags::CLIENT_CONNECT_ATTRS);
        if login.session_track && server_caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK) {
            caps |= CapabilityFlags::CLIENT_SESSION_TRACK;
        }
        let mut seq = seq;
        if let (Some(tls), true) = (login.tls, login.unix_socket.is_none()) {
            if !server_caps.contains(CapabilityFlags::CLIENT_SSL) {
                return Err(BackendError::Protocol { addr, what: "the server offers no TLS, and backend_tls_ca asks for it".into() });
            }
            caps |= CapabilityFlags::CLIENT_SSL;
            // SSLRequest: the fixed part of a handshake response, then TLS.
            let mut req = Vec::with_capacity(32);
            req.extend_from_slice(&caps.bits().to_le_bytes());
            req.extend_from_slice(&(16u32 * 1024 * 1024).to_le_bytes());
            req.push(login.collation);
            req.extend_from_slice(&[0; 23]);
            seq = seq.wrapping_add(1);
            be.send_packet(seq, &req).await?;
            let plain = std::mem::replace(&mut be.stream, Stream::Gone);
            be.stream = tls.connect(plain, addr).await.map_err(|source| BackendError::Tls { addr, source })?;
        }
        let nonce = handshake.nonce();
        let token = login.sha1_password.map(|p| protocol::native_token(&nonce, p).to_vec()).unwrap_or_default();
        let version = handshake.server_version_parsed().unwrap_or((5, 5, 5));
        let resp = HandshakeResponse::new(
            Some(token),
            version,
            Some(login.user),
            login.database,
            Some(AuthPlugin::MysqlNativePassword),
            caps,
            None,
            16 * 1024 * 1024,
        );
        be.caps = resp.capabilities();
        let mut payload = Vec::with_capacity(128);
        resp.serialize(&mut payload);
        payload[8] = login.collation; // new() picks utf8mb4; keep the client's collation
        be.send_packet(seq.wrapping_add(1), &payload).await?;
        loop {
            let (seq, reply) = be.read_packet().await?;
            match reply.first() {
                Some(0x00) => return Ok(be),
                Some(0xFF) => return Err(be.login_error(&reply)),
                Some(0xFE) => {
                    let switch = ParseBuf(&reply)
                        .parse::<AuthSwitchRequest>(())
                        .map_err(|e| BackendError::Protocol { addr, what: format!("auth switch: {e}") })?;
                    if switch.auth_plugin().as_bytes() != b"mysql_native_password" {
                        return Err(BackendError::Protocol {
                            addr,
                            what: format!("auth plugin {} (the router logs in with mysql_native_password)", String::from_utf8_lossy(switch.auth_plugin().as_bytes())),
                        });
                    }
                    let data = switch.plugin_data();
                    let nonce = data.strip_suffix(&[0]).unwrap_or(data);
                    let token = login.sha1_password.map(|p| protocol::native_token(nonce, p).to_vec()).unwrap_or_default();
                    be.send_packet(seq.wrapping_add(1), &token).await?;
                }
                _ => return Err(BackendError::Protocol { addr, what: "unexpected packet during login".into() }),
            }
        }
    }

    fn login_error(&self, payload: &[u8]) -> BackendError {
        let (code, state, message) = parse_err(payload);
        BackendError::Login { addr: self.addr, code, state, message }
    }

    fn io(&self, source: std::io::Error) -> BackendError {
        BackendError::Io { addr: self.addr, source }
    }

    /// Ties this connection to its `role` in the routing view: from now on, a read that waits
    /// for the server gives up with [`BackendError::TakenOut`] as soon as the view takes the
    /// server out of that role (`Routing::takes_out`). A server that hangs (stopped, frozen
    /// disk, lost network without a reset) never closes its connections, so without this
    /// every session with a statement in flight on it would wait for ever, also after the
    /// monitor has promoted the replica; with it they get an error when the monitor takes the
    /// server out, as MaxScale's sessions do, and their next statement goes elsewhere (a read
    /// that got no byte of its answer yet runs on the primary at once). Only reads wait on
    /// the server: a write goes to the socket buffer.
    pub fn watch_routing(&mut self, list: &std::sync::Arc<crate::topology::Watchlist>, role: ConnRole) {
        self.routing_watch = Some(list.watch(self.addr, role));
    }

    async fn fill(&mut self) -> Result<(), BackendError> {
        self.rbuf.reserve(64 * 1024);
        let Backend { stream, rbuf, routing_watch, addr, .. } = self;
        let read = stream.read_buf(rbuf);
        let result = match routing_watch {
            None => read.await,
            Some(watched) => tokio::select! {
                biased;
                r = read => r,
                () = watched.taken_out() => return Err(BackendError::TakenOut(*addr)),
            },
        };
        match result {
            Ok(0) => Err(self.io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => Ok(()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Reads one whole packet (used during login).
    async fn read_packet(&mut self) -> Result<(u8, Vec<u8>), BackendError> {
        let mut payload = Vec::new();
        loop {
            if let Some((len, seq)) = frame_header(&self.rbuf) {
                if self.rbuf.len() >= 4 + len {
                    payload.extend_from_slice(&self.rbuf[4..4 + len]);
                    self.rbuf.advance(4 + len);
                    if len < MAX_FRAME {
                        return Ok((seq, payload));
                    }
                    continue;
                }
            }
            self.fill().await?;
        }
    }

    /// Sends one packet starting at sequence id `seq`.
    pub async fn send_packet(&mut self, seq: u8, payload: &[u8]) -> Result<(), BackendError> {
        self.wbuf.clear();
        protocol::put_packet(&mut self.wbuf, seq, payload);
        let r = self.stream.write_all(&self.wbuf).await;
        r.map_err(|e| self.io(e))
    }

    /// Queues a command (frame 0) to be sent by [`Backend::flush`].
    pub fn queue_command(&mut self, payload: &[u8]) {
        protocol::put_packet(&mut self.wbuf, 0, payload);
    }

    pub async fn flush(&mut self) -> Result<(), BackendError> {
        let r = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        r.map_err(|e| self.io(e))
    }

    /// Connected over TCP (not the server's Unix socket).
    pub fn is_tcp(&self) -> bool {
        self.stream.is_tcp()
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }

    /// Sends a command (frame 0); its response comes to the router.
    pub async fn send_command(&mut self, payload: &[u8]) -> Result<(), BackendError> {
        if self.kernel.as_ref().is_some_and(|k| k.redirecting()) {
            self.settle().await?;
            if let Some(k) = self.kernel.as_mut() {
                k.set_redirect(false);
            }
        }
        self.send_packet(0, payload).await
    }

    /// Sends a command whose response the kernel relays straight to the client
    /// ([`crate::kernel_relay`]); `Ok(false)` (nothing sent) when this connection cannot.
    /// `counted` runs once the answer is certain to go through the kernel and before the
    /// command leaves: the answer may reach the client before this task runs again.
    pub async fn send_command_redirected(&mut self, payload: &[u8], counted: impl FnOnce()) -> Result<bool, BackendError> {
        let Some(k) = self.kernel.as_mut() else { return Ok(false) };
        // Off, nothing is in flight (the router read every answer); on, the kernel keeps
        // answers in order.
        k.set_redirect(true);
        k.note_sent();
        counted();
        self.send_packet(0, payload).await?;
        Ok(true)
    }

    /// Where redirected answers on this connection stand.
    pub fn kernel_progress(&self) -> crate::kernel_relay::Progress {
        self.kernel.as_ref().map_or(crate::kernel_relay::Progress::Settled, |k| k.progress())
    }

    /// Waits until every redirected answer on this connection has ended; an error when the
    /// connection ends first or the relay lost track (the connection is then unusable).
    pub async fn settle(&mut self) -> Result<(), BackendError> {
        use crate::kernel_relay::Progress;
        let mut pause = Duration::from_micros(20);
        loop {
            match self.kernel_progress() {
                Progress::Settled => return Ok(()),
                Progress::Lost => return Err(self.protocol_error("the in-kernel relay lost track of the response framing")),
                Progress::InFlight { .. } => {}
            }
            self.check_alive()?;
            // Redirected bytes never reach this socket; what wakes it is the end of the
            // connection. The answer itself ends without a wakeup: poll, backing off.
            let _ = tokio::time::timeout(pause, self.stream.readable()).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Waits for the end of the connection (or bytes the router did not expect) while an
    /// answer is redirected: what the session watches beside its client.
    pub async fn watch(&self) -> BackendError {
        loop {
            if let Err(e) = self.stream.readable().await {
                return self.io(e);
            }
            if let Err(e) = self.check_alive() {
                return e;
            }
        }
    }

    /// Waits until the connection has something to read (data, its end, or an error).
    pub async fn readable(&self) -> std::io::Result<()> {
        self.stream.readable().await
    }

    /// (local, peer) addresses of a TCP connection.
    pub fn tcp_addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        self.stream.tcp_addrs()
    }

    /// Nothing but the end of the connection can be read on a redirecting connection.
    pub fn check_alive(&self) -> Result<(), BackendError> {
        let mut b = [0u8; 1];
        match self.stream.try_read(&mut b) {
            Ok(0) => Err(self.io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => Err(self.protocol_error("bytes reached the router on a redirected connection")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Forwards raw frames (LOCAL INFILE data) to the server.
    pub async fn send_raw(&mut self, frames: &[u8]) -> Result<(), BackendError> {
        let r = self.stream.write_all(frames).await;
        r.map_err(|e| self.io(e))
    }

    /// Runs a statement for the router itself and discards its results.
    pub async fn query(&mut self, sql: &str, capture: bool) -> Result<Summary, BackendError> {
        let mut payload = Vec::with_capacity(1 + sql.len());
        payload.push(0x03);
        payload.extend_from_slice(sql.as_bytes());
        self.send_command(&payload).await?;
        self.relay(Expect::Results, &mut Sink::Discard, capture).await.map_err(|e| match e {
            RelayError::Backend(b) => b,
            RelayError::Client(e) => self.io(e),
        })
    }

    /// Reads one response and passes its frames to `sink`.
    pub async fn relay(&mut self, expect: Expect, sink: &mut Sink<'_>, capture: bool) -> Result<Summary, RelayError> {
        let deprecate_eof = self.caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF);
        let track = self.caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK);
        let mut sum = Summary::default();
        let mut state = match expect {
            Expect::Rows => State::Rows,
            Expect::FieldList => State::FieldList,
            _ => State::First,
        };
        let mut continuing = false;
        let mut rows_seen = 0u64;
        self.relayed = false;
        loop {
            let mut pos = 0;
            while let Some((len, _seq)) = frame_header(&self.rbuf[pos..]) {
                let end = pos + 4 + len;
                if self.rbuf.len() < end {
                    break;
                }
                let frame = &self.rbuf[pos..end];
                let payload = &frame[4..];
                let cont = continuing;
                continuing = len == MAX_FRAME;
                let mut replacement: Option<Vec<u8>> = None;
                if !cont {
                    let b = payload.first().copied().unwrap_or(0);
                    state = match state {
                        State::First if b == 0xFF => {
                            sum.error = Some(parse_err(payload));
                            State::Done
                        }
                        State::First if expect == Expect::Single => {
                            if b == 0x00 {
                                sum.status = protocol::parse_ok_head(payload).map(|h| h.status);
                            }
                            State::Done
                        }
                        State::First if expect == Expect::Prepare && b == 0x00 && payload.len() >= 12 => {
                            let id = u32::from_le_bytes(payload[1..5].try_into().expect("4 bytes"));
                            let cols = u16::from_le_bytes([payload[5], payload[6]]);
                            let params = u16::from_le_bytes([payload[7], payload[8]]);
                            sum.prepared = Some((id, cols, params));
                            if let Sink::Client { stmt_id: Some(client_id), .. } = sink {
                                let mut p = payload.to_vec();
                                p[1..5].copy_from_slice(&client_id.to_le_bytes());
                                replacement = Some(p);
                            }
                            if params > 0 {
                                State::PrepParams(params, cols)
                            } else if cols > 0 {
                                State::PrepCols(cols)
                            } else {
                                State::Done
                            }
                        }
                        State::First if b == 0x00 => {
                            let head = protocol::parse_ok_head(payload);
                            replacement = self.on_ok(payload, head, track, sink, &mut sum);
                            match head {
                                Some(h) if h.status.contains(StatusFlags::SERVER_MORE_RESULTS_EXISTS) => State::First,
                                _ => State::Done,
                            }
                        }
                        State::First if b == 0xFB && expect == Expect::Results => {
                            sum.local_infile = true;
                            State::Done
                        }
                        State::First => {
                            let mut p = payload;
                            match protocol::read_lenenc(&mut p) {
                                Some(n) if n > 0 => State::Columns(n),
                                _ => return Err(self.protocol_error("bad column count").into()),
                            }
                        }
                        State::Columns(n) if n > 1 => State::Columns(n - 1),
                        State::Columns(_) if deprecate_eof => State::Rows,
                        State::Columns(_) => State::ColumnsEof,
                        State::ColumnsEof => {
                            let st = protocol::eof_status(payload);
                            sum.status = Some(st);
                            if st.contains(StatusFlags::SERVER_STATUS_CURSOR_EXISTS) {
                                State::Done
                            } else {
                                State::Rows
                            }
                        }
                        State::Rows if b == 0xFE && len < MAX_FRAME && (deprecate_eof || len < 9) => {
                            let status = if deprecate_eof {
                                let head = protocol::parse_ok_head(payload);
                                replacement = self.on_ok(payload, head, track, sink, &mut sum);
                                head.map(|h| h.status).unwrap_or_default()
                            } else {
                                let st = protocol::eof_status(payload);
                                sum.status = Some(st);
                                st
                            };
                            if status.contains(StatusFlags::SERVER_MORE_RESULTS_EXISTS) {
                                State::First
                            } else {
                                State::Done
                            }
                        }
                        State::Rows if b == 0xFF => {
                            sum.error = Some(parse_err(payload));
                            State::Done
                        }
                        State::Rows => {
                            if capture && rows_seen == 0 {
                                let mut p = payload;
                                sum.first_value = Some(if p.first() == Some(&0xFB) {
                                    None
                                } else {
                                    protocol::read_lenenc(&mut p).and_then(|n| p.get(..n as usize)).map(<[u8]>::to_vec)
                                });
                            }
                            rows_seen += 1;
                            State::Rows
                        }
                        State::PrepParams(n, cols) if n > 1 => State::PrepParams(n - 1, cols),
                        State::PrepParams(_, cols) if !deprecate_eof => State::PrepParamsEof(cols),
                        State::PrepParams(_, cols) | State::PrepParamsEof(cols) => {
                            if cols > 0 {
                                State::PrepCols(cols)
                            } else {
                                State::Done
                            }
                        }
                        State::PrepCols(n) if n > 1 => State::PrepCols(n - 1),
                        State::PrepCols(_) if !deprecate_eof => State::PrepColsEof,
                        State::PrepCols(_) | State::PrepColsEof => State::Done,
                        State::FieldList if b == 0xFE && (len < 9 || (deprecate_eof && len < MAX_FRAME)) => State::Done,
                        State::FieldList if b == 0xFF => {
                            sum.error = Some(parse_err(payload));
                            State::Done
                        }
                        State::FieldList => State::FieldList,
                        State::Done => State::Done,
                    };
                }
                if let Sink::Client { out, .. } = sink {
                    match replacement {
                        Some(p) => {
                            protocol::put_packet(out, frame[3], &p);
                        }
                        None => out.extend_from_slice(frame),
                    }
                }
                pos = end;
                if matches!(state, State::Done) && !continuing {
                    break;
                }
            }
            self.rbuf.advance(pos);
            let last = matches!(state, State::Done) && !continuing && !sum.local_infile;
            if let Sink::Client { stream, out, hold, .. } = sink {
                if !(out.is_empty() || last && *hold) {
                    self.relayed = true;
                    let r = stream.write_all(out).await;
                    out.clear();
                    r.map_err(RelayError::Client)?;
                }
            }
            if matches!(state, State::Done) && !continuing {
                return Ok(sum);
            }
            self.fill().await?;
        }
    }

    pub fn protocol_error(&self, what: &str) -> BackendError {
        BackendError::Protocol { addr: self.addr, what: what.into() }
    }

    /// Records what an OK packet says; returns a rewritten packet when the client must not
    /// see the session-state block.
    fn on_ok(&self, payload: &[u8], head: Option<protocol::OkHead>, track: bool, sink: &Sink<'_>, sum: &mut Summary) -> Option<Vec<u8>> {
        let head = head?;
        sum.status = Some(head.status);
        if !track || !head.status.contains(StatusFlags::SERVER_SESSION_STATE_CHANGED) {
            return None;
        }
        if let Some(g) = protocol::last_gtid(payload, self.caps) {
            sum.gtid = Some(g);
        }
        match sink {
            Sink::Client { strip_state: true, .. } => Some(protocol::strip_session_state(payload, head)),
            _ => None,
        }
    }
}

/// (code, SQL state, message) of an ERR packet; lenient with odd ones.
pub fn parse_err(payload: &[u8]) -> (u16, [u8; 5], String) {
    use mysql_common::packets::ErrPacket;
    match ParseBuf(payload).parse::<ErrPacket>(CapabilityFlags::CLIENT_PROTOCOL_41) {
        Ok(ErrPacket::Error(e)) => err_parts(&e),
        _ => (2027, *b"HY000", "malformed error packet".into()),
    }
}

fn err_parts(e: &ServerError<'_>) -> (u16, [u8; 5], String) {
    let state = e.sql_state_ref().map(|s| s.as_bytes()).unwrap_or(*b"HY000");
    (e.error_code(), state, e.message_str().into_owned())
}
