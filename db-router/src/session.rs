//! One client session: login, then a command loop that picks a backend per statement.
//!
//! State kept per session, so that the split is invisible to the client:
//! - the backend connections, opened lazily: one to the primary, one to the replica;
//! - the session-command history (`SET ...`), run on every open connection and replayed on
//!   connections opened later, and the current database;
//! - transaction state, from the server's own status flags (`IN_TRANS`, `AUTOCOMMIT`) in every
//!   OK/EOF, so that `BEGIN`, `SET autocommit=0`, implicit commits all behave as on a direct
//!   connection; pins (temporary tables, `LOCK TABLES`);
//! - the GTID of the session's last write (read-your-writes);
//! - prepared statements: client ids mapped to per-connection ids, prepared on a backend the
//!   first time an execution goes there.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use bytes::{Buf, BytesMut};
use mysql_common::{
    constants::{CapabilityFlags, StatusFlags},
    io::ParseBuf,
    packets::{AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse},
    proto::MySerialize,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    backend::{Backend, BackendError, Expect, Login, RelayError, Sink, Summary},
    classify::{self, Class},
    kernel_relay::Progress,
    protocol::{self, codes, frame_header, MAX_FRAME},
    router::Shared,
    stream::Stream,
};

const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_FIELD_LIST: u8 = 0x04;
const COM_STATISTICS: u8 = 0x09;
const COM_PING: u8 = 0x0e;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_RESET: u8 = 0x1a;
const COM_SET_OPTION: u8 = 0x1b;
const COM_STMT_FETCH: u8 = 0x1c;
const COM_CHANGE_USER: u8 = 0x11;
const COM_RESET_CONNECTION: u8 = 0x1f;

/// Session commands kept for replay before the session gives up replaying and stays on the
/// primary (an application that sets a user variable per request would grow it forever).
const MAX_HISTORY: usize = 1000;

/// After a failed replica connection, reads go to the primary this long before a retry.
const REPLICA_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Primary = 0,
    Replica = 1,
}

/// The session ends (client gone, or a protocol violation the session cannot recover from).
#[derive(Debug)]
struct End;

enum Forwarded {
    Done(Summary),
    /// The backend failed; the client got an ERR packet.
    Failed,
    /// The backend failed before the client got anything; nothing was sent to the client.
    Untouched,
}

struct Prepared {
    sql: Vec<u8>,
    class: Class,
    params: u16,
    /// Per target: (connection serial, backend statement id).
    on: [Option<(u64, u32)>; 2],
    /// Parameter types from the last execution that sent them.
    types: Option<Vec<u8>>,
    /// Per target: the connection has the current parameter types.
    types_on: [bool; 2],
    long_data: Vec<Vec<u8>>,
    last: Target,
}

struct Session {
    shared: Arc<Shared>,
    client: Stream,
    /// The client's host as MariaDB would name it in errors ("localhost" for the Unix socket).
    peer: String,
    cbuf: BytesMut,
    out: BytesMut,
    caps: CapabilityFlags,
    collation: u8,
    user: Vec<u8>,
    sha1_password: Option<[u8; 20]>,
    /// The scramble of the handshake: `COM_CHANGE_USER` answers it too.
    scramble: [u8; 20],
    db: Option<Vec<u8>>,
    routing: crate::topology::Subscriber,
    primary: Option<Backend>,
    primary_generation: u64,
    replica: Option<Backend>,
    /// The last failed attempt to open a replica connection: reads go to the primary for
    /// a second instead of paying a connect timeout each.
    replica_failed: Option<(SocketAddr, std::time::Instant)>,
    history: Vec<Vec<u8>>,
    history_overflow: bool,
    /// Where the open transaction runs.
    trx: Option<Target>,
    autocommit: bool,
    /// Pinned to the primary for the rest of the session: temporary tables, or a
    /// multi-statement that changed session state there.
    temp_tables: bool,
    locked_tables: bool,
    last_target: Target,
    /// GTID of the session's last write not yet seen on the replica connection.
    pending_gtid: Option<String>,
    /// The last wait for `pending_gtid` timed out: check without waiting until it arrives.
    ryw_timed_out: bool,
    stmts: HashMap<u32, Prepared>,
    next_stmt: u32,
    /// The client's place in the in-kernel relay (declared after the backends, which leave
    /// the relay's maps first).
    kslot: Option<crate::kernel_relay::ClientSlot>,
    /// The last command's payload (see `kernel_backend_lost`).
    last_command: Vec<u8>,
    /// The session's place in the in-kernel fast path for prepared reads.
    fast: Option<crate::fast_path::FastClient>,
    /// Bytes read from the client (the fast path compares it with what the kernel passed).
    client_bytes: u64,
}

pub async fn run(stream: Stream, peer: String, shared: Arc<Shared>) {
    let metrics = shared.metrics.clone();
    metrics.sessions.inc();
    metrics.sessions_active.inc();
    let mut s = Session {
        routing: shared.routing.clone(),
        shared,
        client: stream,
        peer,
        cbuf: BytesMut::with_capacity(16 * 1024),
        out: BytesMut::with_capacity(64 * 1024),
        caps: CapabilityFlags::empty(),
        collation: 45,
        user: Vec::new(),
        sha1_password: None,
        scramble: [0; 20],
        db: None,
        primary: None,
        primary_generation: 0,
        replica: None,
        replica_failed: None,
        history: Vec::new(),
        history_overflow: false,
        trx: None,
        autocommit: true,
        temp_tables: false,
        locked_tables: false,
        last_target: Target::Primary,
        pending_gtid: None,
        ryw_timed_out: false,
        stmts: HashMap::new(),
        next_stmt: 1,
        kslot: None,
        last_command: Vec::new(),
        fast: None,
        client_bytes: 0,
    };
    // Before the first byte is read: the kernel counts every byte it passes to the router.
    if let (Some(f), Some((local, peer))) = (s.shared.fast.get(), s.client.tcp_addrs()) {
        s.fast = f.client(&s.client, local, peer);
        tracing::debug!(%local, %peer, registered = s.fast.is_some(), "fast path client");
    }
    if s.login().await.is_ok() {
        // One in-kernel path per session: the fast path's, else the answer relay's.
        if s.client.is_tcp() && s.fast.is_none() {
            s.kslot = s.shared.kernel.get().and_then(|k| k.client(&s.client));
        }
        let _ = s.command_loop().await;
    }
    if let Some(f) = s.fast.as_mut() {
        // Reads the kernel routed since the session last came to the router.
        let routed = f.pause();
        metrics.to_replica.inc_by(routed.into());
        metrics.kernel_routed.inc_by(routed.into());
    }
    metrics.sessions_active.dec();
}

impl Session {
    // ---- client side -------------------------------------------------------------------

    /// Reads one packet from the client: (first sequence id, payload). `Ok(None)` at a clean
    /// end of stream.
    async fn read_client(&mut self) -> Result<Option<(u8, Vec<u8>)>, End> {
        let mut payload = Vec::new();
        let mut first_seq = None;
        loop {
            if let Some((len, seq)) = frame_header(&self.cbuf) {
                if payload.len() + len > self.shared.settings.max_packet {
                    self.shared.metrics.errors_client.inc();
                    let msg = format!("db-router: packet larger than {} bytes", self.shared.settings.max_packet);
                    let _ = self.send_err(seq.wrapping_add(1), codes::MALFORMED, &msg).await;
                    return Err(End);
                }
                if self.cbuf.len() >= 4 + len {
                    first_seq.get_or_insert(seq);
                    payload.extend_from_slice(&self.cbuf[4..4 + len]);
                    self.cbuf.advance(4 + len);
                    if len < MAX_FRAME {
                        return Ok(Some((first_seq.unwrap_or(seq), payload)));
                    }
                    continue;
                }
            }
            self.cbuf.reserve(16 * 1024);
            match self.client.read_buf(&mut self.cbuf).await {
                Ok(0) if self.cbuf.is_empty() && payload.is_empty() => return Ok(None),
                Ok(0) => {
                    // Truncated packet: the client went away mid-packet.
                    self.shared.metrics.errors_client.inc();
                    return Err(End);
                }
                Ok(n) => self.client_bytes += n as u64,
                Err(_) => return Err(End),
            }
        }
    }

    /// Sends what the last answer left in `out`.
    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.client.write_all(&self.out).await;
        self.out.clear();
        r.map_err(|_| End)
    }

    /// Sends a packet, after whatever the last answer left in `out`.
    async fn send_packet(&mut self, seq: u8, payload: &[u8]) -> Result<(), End> {
        protocol::put_packet(&mut self.out, seq, payload);
        let r = self.client.write_all(&self.out).await;
        self.out.clear();
        r.map_err(|_| End)
    }

    async fn send_err(&mut self, seq: u8, (code, state): (u16, &[u8; 5]), message: &str) -> Result<(), End> {
        self.send_packet(seq, &protocol::err_payload(code, state, message)).await
    }

    async fn send_ok(&mut self, seq: u8) -> Result<(), End> {
        let mut status = StatusFlags::empty();
        if self.autocommit {
            status |= StatusFlags::SERVER_STATUS_AUTOCOMMIT;
        }
        if self.trx.is_some() {
            status |= StatusFlags::SERVER_STATUS_IN_TRANS;
        }
        self.send_packet(seq, &protocol::ok_payload(status)).await
    }

    async fn login(&mut self) -> Result<(), End> {
        let conn_id = self.shared.next_conn_id();
        let scramble = protocol::new_scramble();
        let mut part2 = scramble[8..].to_vec();
        part2.push(0);
        let version = self.shared.server_version.read().map(|v| v.clone()).unwrap_or_default();
        let tls = self.shared.settings.tls.clone();
        let offered = match tls {
            Some(_) => protocol::server_capabilities() | CapabilityFlags::CLIENT_SSL,
            None => protocol::server_capabilities(),
        };
        let hs = HandshakePacket::new(
            10,
            version.as_bytes(),
            conn_id,
            scramble[..8].try_into().expect("8 bytes"),
            Some(part2),
            offered,
            45, // utf8mb4_general_ci
            StatusFlags::SERVER_STATUS_AUTOCOMMIT,
            Some(&b"mysql_native_password"[..]),
        );
        let mut payload = Vec::with_capacity(96);
        hs.serialize(&mut payload);
        self.send_packet(0, &payload).await?;

        let Some((mut seq, mut reply)) = self.read_client().await? else { return Err(End) };
        match &tls {
            Some(tls) if crate::tls::is_ssl_request(&reply) => {
                // The in-kernel paths read the MySQL protocol on the socket: not for this one.
                self.fast = None;
                let plain = std::mem::replace(&mut self.client, Stream::Gone);
                // The client did not wait: the start of its TLS handshake may be read already.
                let early = self.cbuf.split();
                match tls.accept(plain, early).await {
                    Ok(s) => self.client = s,
                    Err(e) => {
                        tracing::info!(peer = %self.peer, error = %e, "TLS handshake failed");
                        self.shared.metrics.errors_client.inc();
                        return Err(End);
                    }
                }
                self.shared.metrics.tls_sessions.inc();
                let Some(next) = self.read_client().await? else { return Err(End) };
                (seq, reply) = next;
            }
            _ if self.shared.settings.require_tls => {
                self.shared.metrics.errors_client.inc();
                let msg = "Connections using insecure transport are prohibited: this db-router requires TLS (require_tls)";
                let _ = self.send_err(seq.wrapping_add(1), codes::INSECURE_TRANSPORT, msg).await;
                return Err(End);
            }
            _ => {}
        }
        let resp = match ParseBuf(&reply).parse::<HandshakeResponse>(()) {
            Ok(r) => r,
            Err(_) => {
                self.shared.metrics.errors_client.inc();
                let tls = reply.len() >= 4 && u32::from_le_bytes(reply[..4].try_into().expect("4")) & CapabilityFlags::CLIENT_SSL.bits() != 0;
                let msg = if tls { "db-router: TLS is not configured here (tls_cert, tls_key); connect without TLS" } else { "db-router: bad handshake" };
                let _ = self.send_err(seq.wrapping_add(1), codes::BAD_HANDSHAKE, msg).await;
                return Err(End);
            }
        };
        self.caps = resp.capabilities() & protocol::server_capabilities();
        if !self.caps.contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
            let _ = self.send_err(seq.wrapping_add(1), codes::BAD_HANDSHAKE, "db-router: clients must speak protocol 4.1").await;
            return Err(End);
        }
        self.collation = resp.collation();
        self.user = resp.user().to_vec();
        self.db = resp.db_name().filter(|d| !d.is_empty()).map(<[u8]>::to_vec);
        self.scramble = scramble;
        let native = matches!(resp.auth_plugin(), None | Some(AuthPlugin::MysqlNativePassword));
        let token = resp.scramble_buf().to_vec();
        let user = self.user.clone();
        let (sha1, next) = self.authenticate(&user, token, native, seq.wrapping_add(1)).await?;
        self.sha1_password = sha1;
        self.send_ok(next).await
    }

    /// Checks `token`, the client's answer to the handshake's scramble, as `user`'s
    /// `mysql_native_password` token, after switching the client to that plugin if it
    /// answered for another (`native` false); `next` is the sequence id of the router's next
    /// packet. Verified: `SHA1(password)` (`None` for an account without a password) and the
    /// sequence id for the OK. Refused: the client gets MariaDB's access-denied ERR and the
    /// session ends.
    async fn authenticate(&mut self, user: &[u8], mut token: Vec<u8>, native: bool, mut next: u8) -> Result<(Option<[u8; 20]>, u8), End> {
        let scramble = self.scramble;
        if !native {
            let mut data = scramble.to_vec();
            data.push(0);
            let mut p = Vec::new();
            AuthSwitchRequest::new(&b"mysql_native_password"[..], data).serialize(&mut p);
            self.send_packet(next, &p).await?;
            let Some((seq, t)) = self.read_client().await? else { return Err(End) };
            token = t;
            next = seq.wrapping_add(1);
        }
        let account = self.shared.users.get(&*String::from_utf8_lossy(user)).cloned();
        let verified = match account {
            Some(u) => match u.stored {
                None => token.is_empty().then_some(None),
                Some(stored) => protocol::verify_native(&scramble, &token, &stored).map(Some),
            },
            None => None,
        };
        match verified {
            Some(sha1) => Ok((sha1, next)),
            None => {
                self.shared.metrics.auth_failures.inc();
                let msg = format!(
                    "Access denied for user '{}'@'{}' (using password: {})",
                    String::from_utf8_lossy(user),
                    self.peer,
                    if token.is_empty() { "NO" } else { "YES" }
                );
                let _ = self.send_err(next, codes::ACCESS_DENIED, &msg).await;
                Err(End)
            }
        }
    }

    async fn command_loop(&mut self) -> Result<(), End> {
        loop {
            let Some((seq, mut payload)) = self.next_command().await? else { return Ok(()) };
            // The kernel routes nothing more until this command is dealt with.
            self.fast_pause().await?;
            self.flush().await?;
            // A client that pipelines may send this before a redirected answer has ended.
            self.settle_all().await?;
            if seq != 0 {
                self.shared.metrics.errors_client.inc();
                let _ = self.send_err(seq.wrapping_add(1), codes::MALFORMED, "db-router: packets out of order").await;
                return Err(End);
            }
            let Some(&cmd) = payload.first() else {
                self.shared.metrics.errors_client.inc();
                self.send_err(1, codes::MALFORMED, "db-router: empty command packet").await?;
                continue;
            };
            tracing::trace!(cmd, sql = %String::from_utf8_lossy(&payload[1..payload.len().min(80)]), "command");
            match cmd {
                COM_QUIT => return Ok(()),
                COM_PING => self.send_ok(1).await?,
                COM_QUERY => self.query(&payload).await?,
                COM_INIT_DB => self.session_command(&payload, Expect::Single, None).await?,
                COM_SET_OPTION => self.session_command(&payload, Expect::Single, None).await?,
                COM_FIELD_LIST => {
                    let target = self.route(Class::Read).await;
                    self.execute(target, &payload, Expect::FieldList, Class::Read).await?;
                }
                COM_STATISTICS => self.execute(Target::Primary, &payload, Expect::Single, Class::Write).await?,
                COM_RESET_CONNECTION => self.reset_connection(&payload).await?,
                COM_CHANGE_USER => self.change_user(&payload).await?,
                COM_STMT_PREPARE => self.prepare(&payload).await?,
                COM_STMT_EXECUTE => self.stmt_execute(&payload, true).await?,
                COM_STMT_SEND_LONG_DATA => self.stmt_long_data(std::mem::take(&mut payload)),
                COM_STMT_CLOSE => self.stmt_close(&payload).await,
                COM_STMT_RESET => self.stmt_reset(&payload).await?,
                COM_STMT_FETCH => self.stmt_fetch(&payload).await?,
                other => {
                    self.shared.metrics.errors_client.inc();
                    let msg = format!("db-router: command 0x{other:02x} is not supported");
                    self.send_err(1, codes::UNKNOWN_COMMAND, &msg).await?;
                }
            }
            // Kept (no copy) in case its answer was redirected and the backend fails first.
            self.last_command = payload;
        }
    }

    /// The next command; while an answer goes through the in-kernel relay, the backend is
    /// watched too (if it ends the connection, the client must not wait forever).
    async fn next_command(&mut self) -> Result<Option<(u8, Vec<u8>)>, End> {
        // While the kernel routes this session's prepared reads, the router waits for what
        // it passes on, and watches the replica connection and the routing view.
        loop {
            // The last answer's end is still here: the fast path goes on first (with the
            // kernel handing answers over until it is sent), so that a client that answers
            // at once already finds it on.
            let held = !self.out.is_empty();
            let on = self.cbuf.is_empty() && self.fast_resume(held);
            if held {
                self.flush().await?;
                if on {
                    self.fast.as_mut().expect("on").release_hold();
                }
            }
            if !on {
                break;
            }
            let replica = self.replica.as_ref().expect("the fast path runs with a replica");
            tokio::select! {
                biased;
                _ = self.client.readable() => break,
                // An answer the kernel handed over, or the end of the connection.
                _ = replica.readable() => {}
                _ = self.routing.changed() => {}
            };
            self.fast_pause().await?;
        }
        if self.cbuf.is_empty() {
            for t in [Target::Primary, Target::Replica] {
                let Some(be) = (match t {
                    Target::Primary => self.primary.as_ref(),
                    Target::Replica => self.replica.as_ref(),
                }) else {
                    continue;
                };
                if be.kernel_progress() == Progress::Settled {
                    continue;
                }
                let lost = tokio::select! {
                    biased;
                    _ = self.client.readable() => None,
                    e = be.watch() => Some(e),
                };
                if let Some(e) = lost {
                    self.kernel_backend_lost(t, e).await?;
                }
                break;
            }
        }
        self.read_client().await
    }

    /// Turns the in-kernel fast path on if the session allows it: a replica connection the
    /// kernel can reach with statements registered, the routing view still reading from it,
    /// and nothing that would send a read elsewhere (transaction, autocommit off, pins, a
    /// write of the session's not yet on the replica); true when on.
    fn fast_resume(&mut self, hold: bool) -> bool {
        let Some(f) = self.fast.as_ref() else { return false };
        if f.is_on() {
            return true;
        }
        let Some(r) = self.replica.as_ref() else {
            self.fast.as_mut().expect("checked").detach_backend();
            return false;
        };
        if f.backend_serial() != Some(r.serial) {
            self.fast.as_mut().expect("checked").detach_backend();
            return false;
        }
        let routed_here = self.routing.borrow_and_update().replica == Some(r.addr);
        let ryw_pending = self.shared.settings.read_your_writes && self.pending_gtid.is_some();
        let settled = r.kernel_progress() == Progress::Settled && self.primary.as_ref().is_none_or(|p| p.kernel_progress() == Progress::Settled);
        if !f.has_statements() || !routed_here || ryw_pending || !settled || self.trx.is_some() || self.sticky().is_some() {
            return false;
        }
        let read = self.client_bytes;
        self.fast.as_mut().expect("checked").resume(read, hold)
    }

    /// Turns the fast path off and waits until every answer to a command the kernel routed
    /// has reached the client: redirected by the kernel, or relayed here when the kernel
    /// handed it over (answers larger than one message). If the replica connection ends
    /// first, the client gets an ERR for each read it has no answer to.
    async fn fast_pause(&mut self) -> Result<(), End> {
        let Some(f) = self.fast.as_mut() else { return Ok(()) };
        if !f.is_on() {
            return Ok(());
        }
        let routed = f.pause();
        self.shared.metrics.to_replica.inc_by(routed.into());
        self.shared.metrics.kernel_routed.inc_by(routed.into());
        let mut wait = std::time::Duration::from_micros(20);
        loop {
            let progress = self.fast.as_ref().expect("checked").progress(routed);
            let failure = match progress {
                crate::fast_path::Progress::Settled => None,
                crate::fast_path::Progress::HandedOver(n) => {
                    self.relay_handed_over(n).await?;
                    None
                }
                crate::fast_path::Progress::InFlight => {
                    let Some(r) = self.replica.as_ref() else { unreachable!("the fast path runs with a replica") };
                    if tokio::time::timeout(wait, r.readable()).await.is_err() {
                        // The answer goes to the client without waking the router: poll,
                        // backing off.
                        wait = (wait * 2).min(std::time::Duration::from_millis(5));
                        continue;
                    }
                    if !matches!(self.fast.as_ref().expect("checked").progress(routed), crate::fast_path::Progress::InFlight) {
                        continue;
                    }
                    // Redirection is still on, so the server sent nothing the router may
                    // read: only the end of the connection wakes it.
                    match r.check_alive() {
                        Ok(()) => continue,
                        Err(e) => Some((e, routed.wrapping_sub(self.fast.as_ref().expect("checked").done()))),
                    }
                }
            };
            self.fast.as_mut().expect("checked").stop_redirect();
            // Nothing may be read on the replica connection now but its end (the kernel
            // stops routing to a server end that closed, but only the router drops it).
            let failure = failure.or_else(|| self.replica.as_ref().and_then(|r| r.check_alive().err()).map(|e| (e, 0)));
            let Some((e, unanswered)) = failure else { return Ok(()) };
            tracing::warn!(error = %e, unanswered, "replica connection failed while the kernel routed reads");
            self.drop_backend(Target::Replica);
            for _ in 0..unanswered {
                self.send_err(1, codes::BACKEND_LOST, "db-router: replica connection lost; the read did not run").await?;
            }
            return Ok(());
        }
    }

    /// Relays `n` answers the kernel handed over from the replica connection to the client.
    /// If the replica fails before the client got any byte of one, the client gets an ERR for
    /// it and for the rest; the session ends if it got part of one.
    async fn relay_handed_over(&mut self, n: u32) -> Result<(), End> {
        let strip_state = !self.caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK);
        for i in 0..n {
            let be = self.replica.as_mut().expect("the fast path runs with a replica");
            be.relayed = false;
            // The last answer's end may wait in `out` (see `next_command`).
            let mut sink = Sink::Client { stream: &mut self.client, out: &mut self.out, strip_state, stmt_id: None, hold: i + 1 == n };
            match be.relay(Expect::Results, &mut sink, false).await {
                Ok(_) => {}
                Err(RelayError::Client(_)) => return Err(End),
                Err(RelayError::Backend(e)) if !be.relayed => {
                    self.out.clear();
                    tracing::warn!(error = %e, "replica connection failed before a handed-over answer");
                    self.drop_backend(Target::Replica);
                    for _ in i..n {
                        self.send_err(1, codes::BACKEND_LOST, "db-router: replica connection lost; the read did not run").await?;
                    }
                    return Ok(());
                }
                Err(RelayError::Backend(_)) => return Err(End),
            }
        }
        Ok(())
    }

    /// Waits until no answer of this session is still on its way through the in-kernel relay.
    async fn settle_all(&mut self) -> Result<(), End> {
        for t in [Target::Primary, Target::Replica] {
            let Some(be) = self.backend(t) else { continue };
            if be.kernel_progress() == Progress::Settled {
                continue;
            }
            if let Err(e) = be.settle().await {
                self.kernel_backend_lost(t, e).await?;
            }
        }
        Ok(())
    }

    /// A backend failed while (or after) the kernel relayed its answer: if the client got
    /// none of it, it gets an ERR; if it got part, the session ends (the client sees the
    /// connection close, as with a server that died mid-result).
    async fn kernel_backend_lost(&mut self, t: Target, e: BackendError) -> Result<(), End> {
        let progress = self.backend(t).map_or(Progress::Settled, |b| b.kernel_progress());
        tracing::warn!(backend = ?t, error = %e, ?progress, "backend failed while the kernel relayed its answer");
        self.drop_backend(t);
        match progress {
            Progress::Settled => Ok(()),
            Progress::InFlight { started: false } => {
                // The client has none of the answer to its last command, a read (only reads
                // are redirected): it runs again, elsewhere, as a read that finds the replica
                // gone before answering does.
                let cmd = std::mem::take(&mut self.last_command);
                match cmd.first() {
                    Some(&COM_QUERY) => self.query(&cmd).await,
                    Some(&COM_STMT_EXECUTE) => self.stmt_execute(&cmd, false).await,
                    _ => {
                        let msg = format!("db-router: {e}; the statement may or may not have run");
                        self.send_err(1, codes::BACKEND_LOST, &msg).await
                    }
                }
            }
            Progress::InFlight { started: true } | Progress::Lost => Err(End),
        }
    }

    // ---- routing -----------------------------------------------------------------------

    /// The backend a statement of `class` goes to, before replica availability and RYW.
    fn sticky(&self) -> Option<Target> {
        if self.trx.is_some() {
            return self.trx;
        }
        (self.temp_tables || self.locked_tables || !self.autocommit || self.history_overflow).then_some(Target::Primary)
    }

    /// Picks the backend for a statement of `class`; for the replica, checks it is there and
    /// (read-your-writes) has the session's last write.
    async fn route(&mut self, class: Class) -> Target {
        let target = match class {
            Class::Read | Class::Begin { read_only: true } => self.sticky().unwrap_or(Target::Replica),
            Class::Previous => self.sticky().unwrap_or(self.last_target),
            Class::Begin { read_only: false } => Target::Primary,
            _ => self.trx.unwrap_or(Target::Primary),
        };
        if target == Target::Primary {
            return target;
        }
        if self.ensure_replica().await.is_err() {
            return Target::Primary;
        }
        if self.trx.is_none() && self.shared.settings.read_your_writes && !self.replica_has_writes().await {
            return Target::Primary;
        }
        Target::Replica
    }

    /// Read-your-writes: waits (bounded) on the replica connection for the GTID of the
    /// session's last write. Only this session waits; others keep going.
    async fn replica_has_writes(&mut self) -> bool {
        let Some(gtid) = self.pending_gtid.clone() else { return true };
        if !gtid.bytes().all(|b| b.is_ascii_digit() || b == b'-' || b == b',') {
            return false;
        }
        let timeout = if self.ryw_timed_out { 0.0 } else { self.shared.settings.ryw_timeout.as_secs_f64() };
        let sql = format!("SELECT MASTER_GTID_WAIT('{gtid}', {timeout:.3})");
        let Some(replica) = self.replica.as_mut() else { return false };
        match replica.query(&sql, true).await {
            Ok(sum) if sum.error.is_none() && sum.first_value.as_ref().and_then(|v| v.as_deref()) == Some(b"0") => {
                self.shared.metrics.ryw_waits.inc();
                self.pending_gtid = None;
                self.ryw_timed_out = false;
                true
            }
            Ok(_) => {
                self.shared.metrics.ryw_fallbacks.inc();
                self.ryw_timed_out = true;
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "replica lost during read-your-writes wait");
                self.shared.metrics.errors_backend.inc();
                self.replica = None;
                self.shared.metrics.ryw_fallbacks.inc();
                false
            }
        }
    }

    fn login_params(&self, addr: SocketAddr, session_track: bool) -> Login<'_> {
        Login {
            user: &self.user,
            sha1_password: self.sha1_password.as_ref(),
            database: self.db.as_deref(),
            client_caps: self.caps,
            collation: self.collation,
            session_track,
            timeout: self.shared.settings.connect_timeout,
            unix_socket: self.shared.settings.sockets.get(&addr).map(|p| p.as_path()),
            fast: None,
            tls: self.shared.settings.backend_tls.as_ref(),
        }
    }

    /// Runs the setup and the session history on a new connection.
    async fn prepare_connection(&self, be: &mut Backend, primary: bool) -> Result<(), String> {
        // TCP only: on this kernel the verdict program does not see a Unix socket's stream.
        if let (Some(c), None, true) = (&self.kslot, &be.kernel, be.is_tcp()) {
            be.kernel = c.backend(if primary { 0 } else { 1 }, &be.raw_fd(), be.caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF));
        }
        if let Ok(mut v) = self.shared.server_version.write() {
            if *v != be.server_version {
                *v = be.server_version.clone();
            }
        }
        if primary && self.shared.settings.read_your_writes {
            let sql = "SET SESSION session_track_system_variables = CONCAT_WS(',', NULLIF(@@session.session_track_system_variables, ''), 'last_gtid')";
            match be.query(sql, false).await {
                Ok(s) if s.error.is_none() => {}
                Ok(s) => return Err(format!("session tracking setup failed: {}", s.error.map(|e| e.2).unwrap_or_default())),
                Err(e) => return Err(e.to_string()),
            }
        }
        for cmd in &self.history {
            let expect = if cmd.first() == Some(&COM_QUERY) { Expect::Results } else { Expect::Single };
            be.send_command(cmd).await.map_err(|e| e.to_string())?;
            let sum = be.relay(expect, &mut Sink::Discard, false).await.map_err(|e| e.to_string())?;
            if let Some((_, _, msg)) = sum.error {
                return Err(format!("replaying {:?}: {msg}", String::from_utf8_lossy(&cmd[1..])));
            }
        }
        Ok(())
    }

    async fn ensure_replica(&mut self) -> Result<(), String> {
        let want = self.routing.borrow().replica;
        let Some(addr) = want else {
            self.replica = None;
            return Err("no replica".into());
        };
        if self.replica.as_ref().is_some_and(|b| b.addr == addr) {
            return Ok(());
        }
        self.replica = None;
        if let Some((failed, at)) = self.replica_failed {
            if failed == addr && at.elapsed() < REPLICA_RETRY {
                return Err("replica unavailable (retrying shortly)".into());
            }
        }
        let result = self.open_replica(addr).await;
        self.replica_failed = result.is_err().then(|| (addr, std::time::Instant::now()));
        result
    }

    async fn open_replica(&mut self, addr: SocketAddr) -> Result<(), String> {
        let mut login = self.login_params(addr, false);
        if self.fast.is_some() && login.unix_socket.is_none() {
            login.fast = self.shared.fast.get().map(|f| &**f);
        }
        match Backend::connect(addr, &login).await {
            Ok(mut be) => {
                be.watch_routing(&self.shared.watchlist, crate::topology::ConnRole::Replica);
                if let Err(e) = self.prepare_connection(&mut be, false).await {
                    tracing::warn!(replica = %addr, error = %e, "cannot restore the session on the replica; reading from the primary");
                    self.shared.metrics.errors_backend.inc();
                    return Err(e);
                }
                self.replica = Some(be);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(replica = %addr, error = %e, "replica unreachable; reading from the primary");
                self.shared.metrics.errors_backend.inc();
                Err(e.to_string())
            }
        }
    }

    /// Makes sure the primary connection matches the current routing view; waits up to
    /// `failover_wait` while there is no primary or it cannot be reached.
    async fn ensure_primary(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.shared.settings.failover_wait;
        let mut last_error = String::from("no primary (failover in progress)");
        loop {
            let r = self.routing.borrow_and_update().clone();
            if let Some(addr) = r.primary {
                if let Some(be) = &self.primary {
                    if be.addr == addr && self.primary_generation == r.generation {
                        return Ok(());
                    }
                    self.drop_primary();
                }
                let login = self.login_params(addr, self.shared.settings.read_your_writes);
                match Backend::connect(addr, &login).await {
                    Ok(mut be) => {
                        be.watch_routing(&self.shared.watchlist, crate::topology::ConnRole::Primary);
                        if let Err(e) = self.prepare_connection(&mut be, true).await {
                            return Err(format!("cannot set up the session on primary {addr}: {e}"));
                        }
                        self.primary = Some(be);
                        self.primary_generation = r.generation;
                        return Ok(());
                    }
                    Err(BackendError::Login { message, .. }) => return Err(format!("primary {addr} refused the login: {message}")),
                    Err(e) => {
                        self.shared.metrics.errors_backend.inc();
                        last_error = e.to_string();
                    }
                }
            }
            // Wait for the monitor to publish a (new) primary.
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(last_error);
            }
            let wait = (deadline - now).min(std::time::Duration::from_millis(500));
            let _ = tokio::time::timeout(wait, self.routing.changed()).await;
        }
    }

    fn drop_primary(&mut self) {
        if self.primary.take().is_some() && self.trx == Some(Target::Primary) {
            // The transaction died with the connection; the client learns it on its next
            // statement (the server rolled it back).
            self.trx = None;
        }
    }

    fn backend(&mut self, t: Target) -> Option<&mut Backend> {
        match t {
            Target::Primary => self.primary.as_mut(),
            Target::Replica => self.replica.as_mut(),
        }
    }

    fn drop_backend(&mut self, t: Target) {
        self.shared.metrics.errors_backend.inc();
        match t {
            Target::Primary => self.drop_primary(),
            Target::Replica => self.replica = None,
        }
    }

    async fn ensure(&mut self, t: Target) -> Result<(), String> {
        match t {
            Target::Primary => self.ensure_primary().await,
            Target::Replica => self.ensure_replica().await,
        }
    }

    fn note_response(&mut self, t: Target, sum: &Summary, class: Class) {
        tracing::debug!(?t, status = ?sum.status, "response");
        if let Some(st) = sum.status {
            self.autocommit = st.contains(StatusFlags::SERVER_STATUS_AUTOCOMMIT);
            if st.contains(StatusFlags::SERVER_STATUS_IN_TRANS) {
                self.trx = Some(t);
            } else if self.trx == Some(t) {
                self.trx = None;
            }
        }
        if let (Some(g), Target::Primary) = (&sum.gtid, t) {
            self.pending_gtid = Some(g.clone());
            self.ryw_timed_out = false;
        }
        self.last_target = t;
        if sum.error.is_none() {
            match class {
                Class::TempTable => self.temp_tables = true,
                Class::LockTables => self.locked_tables = true,
                Class::UnlockTables => self.locked_tables = false,
                _ => {}
            }
        }
    }

    /// The answer to this statement may go from the backend straight to the client (the
    /// in-kernel relay): a plain autocommit read on the replica, whose answer changes nothing
    /// the router tracks.
    fn kernel_eligible(&self, target: Target, expect: Expect, class: Class) -> bool {
        target == Target::Replica && expect == Expect::Results && class == Class::Read && self.trx.is_none() && self.autocommit && self.kslot.is_some()
    }

    // ---- commands ----------------------------------------------------------------------

    async fn query(&mut self, payload: &[u8]) -> Result<(), End> {
        let class = classify::classify(&payload[1..]);
        if class.is_session_command() {
            return self.session_command(payload, Expect::Results, Some(class)).await;
        }
        if class == Class::Write && !self.temp_tables && classify::multi_changes_session(&payload[1..]) {
            // Session state changed on the primary only: stay there (as `temp_tables` does).
            self.temp_tables = true;
        }
        let target = self.route(class).await;
        tracing::debug!(?class, ?target, trx = ?self.trx, autocommit = self.autocommit, "route");
        self.execute(target, payload, Expect::Results, class).await
    }

    /// Sends one command to `target` and relays the response to the client.
    async fn execute(&mut self, target: Target, payload: &[u8], expect: Expect, class: Class) -> Result<(), End> {
        if let Err(e) = self.ensure(target).await {
            let code = if target == Target::Primary { codes::NO_PRIMARY } else { codes::BACKEND_LOST };
            return self.send_err(1, code, &format!("db-router: {e}")).await;
        }
        match target {
            Target::Primary => self.shared.metrics.to_primary.inc(),
            Target::Replica => self.shared.metrics.to_replica.inc(),
        };
        let direct = self.kernel_eligible(target, expect, class);
        match self.try_forward(target, payload, expect, None, target == Target::Replica, direct).await? {
            Forwarded::Done(sum) => self.note_response(target, &sum, class),
            Forwarded::Failed => {}
            // The replica went away before answering: the read runs on the primary.
            Forwarded::Untouched => return Box::pin(self.execute(Target::Primary, payload, expect, class)).await,
        }
        Ok(())
    }

    /// Sends `payload` to an open backend and relays the answer; `Ok(None)` when the backend
    /// failed (the client got an ERR packet, the connection is dropped).
    async fn forward(&mut self, target: Target, payload: &[u8], expect: Expect, stmt_id: Option<u32>) -> Result<Option<Summary>, End> {
        match self.try_forward(target, payload, expect, stmt_id, false, false).await? {
            Forwarded::Done(sum) => Ok(Some(sum)),
            Forwarded::Failed | Forwarded::Untouched => Ok(None),
        }
    }

    /// [`Session::forward`]; with `retryable`, a backend that fails before the client got any
    /// byte of the answer is dropped without an ERR to the client (`Untouched`), so that a
    /// read can run elsewhere.
    async fn try_forward(&mut self, target: Target, payload: &[u8], expect: Expect, stmt_id: Option<u32>, retryable: bool, direct: bool) -> Result<Forwarded, End> {
        let strip_state = !self.caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK);
        let Some(be) = (match target {
            Target::Primary => self.primary.as_mut(),
            Target::Replica => self.replica.as_mut(),
        }) else {
            self.send_err(1, codes::BACKEND_LOST, "db-router: no backend connection").await?;
            return Ok(Forwarded::Failed);
        };
        be.relayed = false;
        if direct {
            let relayed = &self.shared.metrics.kernel_relayed;
            match be.send_command_redirected(payload, || { relayed.inc(); }).await {
                Ok(true) => return Ok(Forwarded::Done(Summary::default())),
                Ok(false) => {}
                Err(e) => return self.backend_failed(target, RelayError::Backend(e), retryable).await,
            }
        }
        let be = match target {
            Target::Primary => self.primary.as_mut(),
            Target::Replica => self.replica.as_mut(),
        }
        .expect("open");
        let mut sink = Sink::Client { stream: &mut self.client, out: &mut self.out, strip_state, stmt_id, hold: true };
        let mut result = match be.send_command(payload).await {
            Ok(()) => be.relay(expect, &mut sink, false).await,
            Err(e) => Err(RelayError::Backend(e)),
        };
        // LOCAL INFILE: the client streams the file, ending with an empty packet.
        while let Ok(sum) = &result {
            if !sum.local_infile {
                break;
            }
            result = self.pump_infile(target).await;
        }
        match result {
            Ok(sum) => Ok(Forwarded::Done(sum)),
            Err(e) => self.backend_failed(target, e, retryable).await,
        }
    }

    async fn backend_failed(&mut self, target: Target, e: RelayError, retryable: bool) -> Result<Forwarded, End> {
        match e {
            RelayError::Client(_) => Err(End),
            RelayError::Backend(e) => {
                tracing::warn!(backend = ?target, error = %e, "backend failed during a statement");
                let untouched = self.backend(target).is_some_and(|b| !b.relayed);
                self.drop_backend(target);
                self.out.clear();
                if retryable && untouched {
                    return Ok(Forwarded::Untouched);
                }
                // The client may have received part of the answer; the ERR ends it.
                let msg = format!("db-router: {e}; the statement may or may not have run");
                self.send_err(1, codes::BACKEND_LOST, &msg).await?;
                Ok(Forwarded::Failed)
            }
        }
    }

    async fn pump_infile(&mut self, target: Target) -> Result<Summary, RelayError> {
        loop {
            let (len, frame) = loop {
                if let Some((len, _)) = frame_header(&self.cbuf) {
                    if self.cbuf.len() >= 4 + len {
                        break (len, self.cbuf.split_to(4 + len));
                    }
                }
                self.cbuf.reserve(64 * 1024);
                match self.client.read_buf(&mut self.cbuf).await {
                    Ok(0) => return Err(RelayError::Client(std::io::ErrorKind::UnexpectedEof.into())),
                    Ok(n) => self.client_bytes += n as u64,
                    Err(e) => return Err(RelayError::Client(e)),
                }
            };
            let be = self.backend(target).expect("open");
            be.send_raw(&frame).await?;
            if len == 0 {
                break;
            }
        }
        let strip_state = !self.caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK);
        let be = match target {
            Target::Primary => self.primary.as_mut(),
            Target::Replica => self.replica.as_mut(),
        }
        .expect("open");
        let mut sink = Sink::Client { stream: &mut self.client, out: &mut self.out, strip_state, stmt_id: None, hold: true };
        be.relay(Expect::Results, &mut sink, false).await
    }

    /// A command for every backend connection of the session (SET, USE, COM_INIT_DB,
    /// COM_SET_OPTION): the primary's answer (else the replica's) goes to the client.
    async fn session_command(&mut self, payload: &[u8], expect: Expect, class: Option<Class>) -> Result<(), End> {
        if self.primary.is_none() && self.replica.is_none() {
            // Nothing open yet: the replica answers if there is one, the primary otherwise;
            // the other connection gets the command from the history when it opens.
            let first = if self.sticky().is_none() && self.ensure_replica().await.is_ok() { Target::Replica } else { Target::Primary };
            if first == Target::Primary {
                if let Err(e) = self.ensure_primary().await {
                    return self.send_err(1, codes::NO_PRIMARY, &format!("db-router: {e}")).await;
                }
            }
        }
        if let Some(p) = &self.primary {
            // A stale primary (failover) is replaced before it gets session commands.
            let r = self.routing.borrow().clone();
            if r.primary != Some(p.addr) || r.generation != self.primary_generation {
                self.drop_primary();
                if let Err(e) = self.ensure_primary().await {
                    return self.send_err(1, codes::NO_PRIMARY, &format!("db-router: {e}")).await;
                }
            }
        }
        self.shared.metrics.to_all.inc();
        let responder = if self.primary.is_some() { Target::Primary } else { Target::Replica };
        let other = match responder {
            Target::Primary => Target::Replica,
            Target::Replica => Target::Primary,
        };
        // The other connection first, its answer discarded; then the answering one.
        if let Some(be) = self.backend(other) {
            let ok = match be.send_command(payload).await {
                Ok(()) => match be.relay(expect, &mut Sink::Discard, false).await {
                    Ok(sum) => sum.error.map(|e| e.2),
                    Err(e) => Some(e.to_string()),
                },
                Err(e) => Some(e.to_string()),
            };
            if let Some(err) = ok {
                // Drop it: when it reopens, the history replay reports the problem, and reads
                // fall back to the primary meanwhile.
                tracing::warn!(backend = ?other, error = %err, "session command failed on one backend only");
                self.drop_backend(other);
            }
        }
        let Some(sum) = self.forward(responder, payload, expect, None).await? else { return Ok(()) };
        let cls = class.unwrap_or(Class::SessionSet);
        self.note_response(responder, &sum, cls);
        if sum.error.is_none() {
            match (payload[0], cls) {
                (COM_INIT_DB, _) => self.db = Some(payload[1..].to_vec()),
                (COM_QUERY, Class::Use) => {
                    if let Some(db) = classify::use_database(&payload[1..]) {
                        self.db = Some(db.into_bytes());
                    }
                }
                (COM_QUERY, Class::SessionOnce) => {}
                _ => {
                    if self.history.len() >= MAX_HISTORY {
                        self.history_overflow = true;
                    } else {
                        self.history.push(payload.to_vec());
                    }
                }
            }
        }
        Ok(())
    }

    /// Forgets the session state a server forgets on `COM_RESET_CONNECTION` or
    /// `COM_CHANGE_USER` (replayed commands, pins, transaction, prepared statements).
    fn forget_session_state(&mut self) {
        self.history.clear();
        self.history_overflow = false;
        self.temp_tables = false;
        self.locked_tables = false;
        self.trx = None;
        self.autocommit = true;
        self.stmts.clear();
        if let Some(f) = self.fast.as_mut() {
            f.unregister_all();
        }
    }

    /// `COM_CHANGE_USER`: the new user is authenticated as at login (the handshake's
    /// scramble), then the session starts over as that user, as on a server: session state
    /// gone (variables, temporary tables, transaction, prepared statements) and both backend
    /// connections closed, so the next statement opens them as the new user on the new
    /// database. A refused change ends the connection with the access-denied ERR, as MySQL
    /// does; a malformed packet too (what the client meant is unknown).
    async fn change_user(&mut self, payload: &[u8]) -> Result<(), End> {
        let Some(cu) = protocol::parse_change_user(payload, self.caps) else {
            self.shared.metrics.errors_client.inc();
            let _ = self.send_err(1, codes::MALFORMED, "db-router: malformed COM_CHANGE_USER packet").await;
            return Err(End);
        };
        let user = cu.user.to_vec();
        let db = (!cu.db.is_empty()).then(|| cu.db.to_vec());
        let collation = cu.collation.and_then(|c| u8::try_from(c).ok());
        let native = matches!(cu.plugin, None | Some(b"mysql_native_password"));
        let token = cu.auth.to_vec();
        let (sha1, next) = self.authenticate(&user, token, native, 1).await?;
        self.forget_session_state();
        self.drop_primary();
        self.replica = None;
        self.pending_gtid = None;
        self.ryw_timed_out = false;
        self.user = user;
        self.sha1_password = sha1;
        self.db = db;
        if let Some(c) = collation {
            self.collation = c;
        }
        self.send_ok(next).await
    }

    async fn reset_connection(&mut self, payload: &[u8]) -> Result<(), End> {
        self.forget_session_state();
        // The replica connection is simply dropped (reopened clean when needed); the primary
        // is reset and its session tracking set up again.
        self.replica = None;
        if self.primary.is_none() {
            return self.send_ok(1).await;
        }
        let Some(_) = self.forward(Target::Primary, payload, Expect::Single, None).await? else { return Ok(()) };
        let mut be = self.primary.take().expect("open");
        match self.prepare_connection(&mut be, true).await {
            Ok(()) => self.primary = Some(be),
            Err(e) => tracing::warn!(error = %e, "primary setup after reset failed; reconnecting on next use"),
        }
        Ok(())
    }

    // ---- prepared statements -----------------------------------------------------------

    async fn prepare(&mut self, payload: &[u8]) -> Result<(), End> {
        let sql = payload[1..].to_vec();
        let class = match classify::classify(&sql) {
            c @ (Class::Read | Class::Previous | Class::TxnControl) => c,
            _ => Class::Write,
        };
        // Prepare where executions will most likely go; other backends prepare on demand.
        let target = match class {
            Class::Read if self.sticky().is_none() && self.ensure_replica().await.is_ok() => Target::Replica,
            _ => self.trx.unwrap_or(Target::Primary),
        };
        if let Err(e) = self.ensure(target).await {
            return self.send_err(1, codes::NO_PRIMARY, &format!("db-router: {e}")).await;
        }
        let client_id = self.next_stmt;
        let Some(sum) = self.forward(target, payload, Expect::Prepare, Some(client_id)).await? else { return Ok(()) };
        if let Some((id, _cols, params)) = sum.prepared {
            self.next_stmt = self.next_stmt.wrapping_add(1).max(1);
            let serial = self.backend(target).map(|b| b.serial).unwrap_or(0);
            let mut on = [None, None];
            on[target as usize] = Some((serial, id));
            self.stmts.insert(client_id, Prepared { sql, class, params, on, types: None, types_on: [false; 2], long_data: Vec::new(), last: target });
        }
        Ok(())
    }

    /// The backend statement id of `client_id` on `target`, preparing it there if needed.
    async fn backend_stmt(&mut self, client_id: u32, target: Target) -> Result<Result<u32, String>, End> {
        let Some(serial) = self.backend(target).map(|b| b.serial) else { return Ok(Err("no backend connection".into())) };
        let st = self.stmts.get(&client_id).expect("checked");
        if let Some((s, id)) = st.on[target as usize] {
            if s == serial {
                return Ok(Ok(id));
            }
        }
        let mut p = Vec::with_capacity(1 + st.sql.len());
        p.push(COM_STMT_PREPARE);
        p.extend_from_slice(&st.sql);
        let be = self.backend(target).expect("open");
        let res = match be.send_command(&p).await {
            Ok(()) => be.relay(Expect::Prepare, &mut Sink::Discard, false).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match res {
            Ok(Summary { prepared: Some((id, _, _)), .. }) => {
                let st = self.stmts.get_mut(&client_id).expect("checked");
                st.on[target as usize] = Some((serial, id));
                st.types_on[target as usize] = false;
                Ok(Ok(id))
            }
            Ok(sum) => Ok(Err(sum.error.map(|e| e.2).unwrap_or_else(|| "prepare failed".into()))),
            Err(e) => {
                self.drop_backend(target);
                Ok(Err(e))
            }
        }
    }

    fn unknown_stmt(&self, id: u32, what: &str) -> String {
        format!("Unknown prepared statement handler ({id}) given to {what}")
    }

    async fn stmt_execute(&mut self, payload: &[u8], retry: bool) -> Result<(), End> {
        if payload.len() < 10 {
            self.shared.metrics.errors_client.inc();
            return self.send_err(1, codes::MALFORMED, "db-router: malformed COM_STMT_EXECUTE").await;
        }
        let client_id = u32::from_le_bytes(payload[1..5].try_into().expect("4"));
        let Some(st) = self.stmts.get(&client_id) else {
            let msg = self.unknown_stmt(client_id, "mysqld_stmt_execute");
            return self.send_err(1, codes::UNKNOWN_STMT, &msg).await;
        };
        let (class, params) = (st.class, st.params as usize);
        // Parameter block: null bitmap, new-params-bound flag, types (when bound), values.
        let bitmap = params.div_ceil(8);
        let flag_at = 10 + bitmap;
        let mut new_types = None;
        let mut bound = false;
        if params > 0 {
            if payload.len() <= flag_at {
                self.shared.metrics.errors_client.inc();
                return self.send_err(1, codes::MALFORMED, "db-router: malformed COM_STMT_EXECUTE").await;
            }
            bound = payload[flag_at] == 1;
            if bound {
                let Some(types) = payload.get(flag_at + 1..flag_at + 1 + 2 * params) else {
                    self.shared.metrics.errors_client.inc();
                    return self.send_err(1, codes::MALFORMED, "db-router: malformed COM_STMT_EXECUTE").await;
                };
                new_types = Some(types.to_vec());
            }
        }
        if new_types.is_some() && new_types != self.stmts.get(&client_id).and_then(|s| s.types.clone()) {
            // The kernel sends executions without types, or with the same ones, as they are:
            // only while the replica has these.
            if let Some(f) = self.fast.as_mut() {
                f.unregister_stmt(client_id);
            }
        }
        let target = self.route(class).await;
        if let Err(e) = self.ensure(target).await {
            return self.send_err(1, codes::NO_PRIMARY, &format!("db-router: {e}")).await;
        }
        let id = match self.backend_stmt(client_id, target).await? {
            Ok(id) => id,
            Err(e) => return self.send_err(1, codes::BACKEND_LOST, &format!("db-router: cannot prepare on {target:?}: {e}")).await,
        };
        let st = self.stmts.get_mut(&client_id).expect("checked");
        if let Some(t) = new_types {
            st.types = Some(t);
            st.types_on = [false; 2];
        }
        let mut p;
        if params > 0 && !bound && !st.types_on[target as usize] {
            // This backend never saw the types (the client bound them on another one).
            let Some(types) = &st.types else {
                return self.send_err(1, codes::MALFORMED, "db-router: COM_STMT_EXECUTE without parameter types").await;
            };
            p = payload[..flag_at].to_vec();
            p.push(1);
            p.extend_from_slice(types);
            p.extend_from_slice(&payload[flag_at + 1..]);
        } else {
            p = payload.to_vec();
        }
        p[1..5].copy_from_slice(&id.to_le_bytes());
        if params > 0 {
            st.types_on[target as usize] = true;
        }
        st.last = target;
        let long_data = std::mem::take(&mut st.long_data);
        let retry = retry && long_data.is_empty();
        match target {
            Target::Primary => self.shared.metrics.to_primary.inc(),
            Target::Replica => self.shared.metrics.to_replica.inc(),
        };
        if !long_data.is_empty() {
            let be = self.backend(target).expect("open");
            for mut chunk in long_data {
                chunk[1..5].copy_from_slice(&id.to_le_bytes());
                be.queue_command(&chunk);
            }
            if be.flush().await.is_err() {
                self.drop_backend(target);
                return self.send_err(1, codes::BACKEND_LOST, "db-router: backend lost while sending long data").await;
            }
        }
        // With a cursor the answer stops after the column definitions and the rows come by
        // COM_STMT_FETCH: the router keeps it (the relay counts whole result sets only).
        let cursor = payload[5] != 0;
        let direct = !cursor && self.kernel_eligible(target, Expect::Results, class);
        let fast_eligible = target == Target::Replica && class == Class::Read && !cursor && (params == 0 || self.stmts.get(&client_id).is_some_and(|s| s.types_on[Target::Replica as usize]));
        match self.try_forward(target, &p, Expect::Results, None, target == Target::Replica && retry, direct).await? {
            Forwarded::Done(sum) => {
                self.note_response(target, &sum, class);
                // Later executions may go through the kernel, past the router.
                if let (true, Some(f), Some(r)) = (fast_eligible, self.fast.as_mut(), self.replica.as_ref()) {
                    if f.backend_serial() != Some(r.serial) {
                        if let Some((local, peer)) = r.tcp_addrs() {
                            let ok = f.attach_backend(local, peer, r.serial, r.caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF));
                            tracing::debug!(%local, %peer, ok, "fast path replica connection");
                        }
                    }
                    if f.backend_serial() == Some(r.serial) {
                        let types = self.stmts.get(&client_id).and_then(|s| s.types.as_deref());
                        f.register_stmt(client_id, id, params as u16, types.filter(|t| t.len() <= 32));
                    }
                }
            }
            Forwarded::Failed => {}
            // The replica went away before answering; once more (it is reconnected or, if it
            // is down, the primary runs it). Long data was consumed: no retry with it.
            Forwarded::Untouched => return Box::pin(self.stmt_execute(payload, false)).await,
        }
        Ok(())
    }

    fn stmt_long_data(&mut self, payload: Vec<u8>) {
        // No response either way; kept until the execution picks its backend.
        if payload.len() >= 7 {
            let id = u32::from_le_bytes(payload[1..5].try_into().expect("4"));
            // The execution must come to the router, which holds the data.
            if let Some(f) = self.fast.as_mut() {
                f.unregister_stmt(id);
            }
            if let Some(st) = self.stmts.get_mut(&id) {
                st.long_data.push(payload);
            }
        }
    }

    async fn stmt_close(&mut self, payload: &[u8]) {
        if payload.len() < 5 {
            return;
        }
        let id = u32::from_le_bytes(payload[1..5].try_into().expect("4"));
        if let Some(f) = self.fast.as_mut() {
            f.unregister_stmt(id);
        }
        let Some(st) = self.stmts.remove(&id) else { return };
        for t in [Target::Primary, Target::Replica] {
            if let (Some((serial, bid)), Some(be)) = (st.on[t as usize], self.backend(t)) {
                if be.serial == serial {
                    let mut p = vec![COM_STMT_CLOSE];
                    p.extend_from_slice(&bid.to_le_bytes());
                    if be.send_command(&p).await.is_err() {
                        self.drop_backend(t);
                    }
                }
            }
        }
    }

    async fn stmt_reset(&mut self, payload: &[u8]) -> Result<(), End> {
        if payload.len() < 5 {
            return self.send_err(1, codes::MALFORMED, "db-router: malformed COM_STMT_RESET").await;
        }
        let id = u32::from_le_bytes(payload[1..5].try_into().expect("4"));
        let Some(st) = self.stmts.get_mut(&id) else {
            let msg = self.unknown_stmt(id, "mysqld_stmt_reset");
            return self.send_err(1, codes::UNKNOWN_STMT, &msg).await;
        };
        st.long_data.clear();
        let t = st.last;
        let on = st.on[t as usize];
        match (on, self.backend(t).map(|b| b.serial)) {
            (Some((serial, bid)), Some(cur)) if serial == cur => {
                let mut p = vec![COM_STMT_RESET];
                p.extend_from_slice(&bid.to_le_bytes());
                self.forward(t, &p, Expect::Single, None).await?;
                Ok(())
            }
            _ => self.send_ok(1).await,
        }
    }

    async fn stmt_fetch(&mut self, payload: &[u8]) -> Result<(), End> {
        if payload.len() < 9 {
            return self.send_err(1, codes::MALFORMED, "db-router: malformed COM_STMT_FETCH").await;
        }
        let id = u32::from_le_bytes(payload[1..5].try_into().expect("4"));
        let Some(st) = self.stmts.get(&id) else {
            let msg = self.unknown_stmt(id, "mysqld_stmt_fetch");
            return self.send_err(1, codes::UNKNOWN_STMT, &msg).await;
        };
        let t = st.last;
        let Some((serial, bid)) = st.on[t as usize] else { return self.send_err(1, codes::UNKNOWN_STMT, "db-router: statement has no cursor").await };
        if self.backend(t).map(|b| b.serial) != Some(serial) {
            return self.send_err(1, codes::BACKEND_LOST, "db-router: the cursor's backend connection is gone").await;
        }
        let mut p = payload.to_vec();
        p[1..5].copy_from_slice(&bid.to_le_bytes());
        self.forward(t, &p, Expect::Rows, None).await?;
        Ok(())
    }
}
