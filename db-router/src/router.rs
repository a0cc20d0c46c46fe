//! The listener and what every session shares: users, settings, metrics, the routing view.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::{TcpListener, UnixListener};

use crate::topology::Subscriber;

/// An account clients log in with; the same account (same password) must exist on the
/// backends, because the router logs in to them as the client's user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// `SHA1(SHA1(password))`; `None` for an account without a password.
    pub stored: Option<[u8; 20]>,
}

/// Per-session behaviour, from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Reads after a write wait on the replica for the write's GTID (else go to the primary).
    pub read_your_writes: bool,
    /// How long a read waits on the replica for the session's last write.
    pub ryw_timeout: Duration,
    /// How long a write waits for a primary while there is none (failover), before an error.
    pub failover_wait: Duration,
    pub connect_timeout: Duration,
    /// Largest packet accepted from a client.
    pub max_packet: usize,
    /// Servers on this host, by the address the routing view knows them by: the router
    /// connects to them over this Unix socket instead (less kernel work per statement than
    /// loopback TCP; the monitor still checks the TCP address).
    pub sockets: HashMap<SocketAddr, PathBuf>,
    /// Plain reads on the replica are answered through the in-kernel relay
    /// ([`crate::kernel_relay`]) when the kernel allows it (root or CAP_BPF + CAP_NET_ADMIN).
    /// Off by default: on the 2-vCPU test machine it did not make the router faster (the
    /// kernel sends redirected data from a workqueue, a wakeup of its own; see docs/benchmark-history.md).
    pub kernel_relay: bool,
    /// Prepared reads of clients on this host go to a replica on this host and back through
    /// the kernel, past the router ([`crate::fast_path`]), when the kernel allows it (root
    /// or CAP_BPF + CAP_NET_ADMIN, cgroup v2).
    pub kernel_fast_path: bool,
    /// TLS for clients that ask for it (`tls_cert`, `tls_key`).
    pub tls: Option<crate::tls::Tls>,
    /// Refuse clients that do not use TLS (`require_tls`; needs `tls`).
    pub require_tls: bool,
    /// Connect to the servers over TLS, checking their certificates (`backend_tls_ca`,
    /// `backend_tls_server_name`); the in-kernel paths are then off. Unix-socket
    /// connections to a server on this host stay plain.
    pub backend_tls: Option<crate::tls::BackendTls>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            read_your_writes: true,
            ryw_timeout: Duration::from_secs(1),
            failover_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_packet: 64 * 1024 * 1024,
            sockets: HashMap::new(),
            kernel_relay: false,
            kernel_fast_path: true,
            tls: None,
            require_tls: false,
            backend_tls: None,
        }
    }
}

/// Router counters, registered in the admin endpoint's registry.
#[derive(Debug, Default)]
pub struct Metrics {
    pub to_primary: Counter,
    pub to_replica: Counter,
    /// Session commands (SET, USE, ...) sent to every backend connection of a session.
    pub to_all: Counter,
    pub ryw_waits: Counter,
    pub ryw_fallbacks: Counter,
    /// Statements whose answer went through the in-kernel relay.
    pub kernel_relayed: Counter,
    /// Prepared reads the kernel routed to the replica (counted when the session next wakes).
    pub kernel_routed: Counter,
    pub sessions: Counter,
    pub sessions_active: Gauge,
    pub errors_client: Counter,
    pub errors_backend: Counter,
    pub auth_failures: Counter,
    pub tls_sessions: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Metrics> {
        let statements = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register("db_router_statements", "Statements routed, by target: primary, replica, or all (session commands such as SET and USE)", statements.clone());
        // A family's counters share their value with their clones: keep one per target.
        let target = |t: &'static str| statements.get_or_create(&vec![("target", t)]).clone();
        let m = Arc::new(Metrics { to_primary: target("primary"), to_replica: target("replica"), to_all: target("all"), ..Default::default() });
        registry.register("db_router_ryw_waits", "Reads that waited on the replica for the session's last write and got it", m.ryw_waits.clone());
        registry.register("db_router_ryw_fallbacks", "Reads sent to the primary because the replica had not applied the session's last write in time", m.ryw_fallbacks.clone());
        registry.register("db_router_kernel_relayed", "Reads whose answer went from the replica to the client through the in-kernel relay (BPF sockmap)", m.kernel_relayed.clone());
        registry.register("db_router_kernel_routed", "Prepared reads routed to the replica and answered through the in-kernel fast path, past the router (counted when the session next comes to the router; also in db_router_statements)", m.kernel_routed.clone());
        registry.register("db_router_sessions", "Client sessions accepted", m.sessions.clone());
        registry.register("db_router_sessions_active", "Client sessions open now", m.sessions_active.clone());
        registry.register("db_router_client_errors", "Sessions ended or statements refused because of the client (malformed packets, unknown commands)", m.errors_client.clone());
        registry.register("db_router_backend_errors", "Backend connections that failed or were lost", m.errors_backend.clone());
        registry.register("db_router_auth_failures", "Client logins refused", m.auth_failures.clone());
        registry.register("db_router_tls_sessions", "Client sessions that logged in over TLS", m.tls_sessions.clone());
        m
    }
}

pub struct Shared {
    pub users: HashMap<String, User>,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub routing: Subscriber,
    /// The backend connections sessions wait on, flagged when the view takes their server out.
    pub watchlist: Arc<crate::topology::Watchlist>,
    /// The version string clients see: the last one a backend announced.
    pub server_version: RwLock<String>,
    /// The in-kernel read relay, when loaded ([`crate::kernel_relay`]).
    pub kernel: std::sync::OnceLock<Arc<crate::kernel_relay::KernelRelay>>,
    /// The in-kernel fast path for prepared reads, when loaded ([`crate::fast_path`]).
    pub fast: std::sync::OnceLock<Arc<crate::fast_path::FastPath>>,
    conn_ids: AtomicU32,
}

impl Shared {
    pub fn new(users: HashMap<String, User>, settings: Settings, metrics: Arc<Metrics>, routing: Subscriber) -> Arc<Shared> {
        let s = Arc::new(Shared {
            users,
            settings,
            metrics,
            watchlist: crate::topology::Watchlist::new(routing.clone()),
            routing,
            server_version: RwLock::new("5.5.5-10.11.0-MariaDB-db-router".into()),
            kernel: std::sync::OnceLock::new(),
            fast: std::sync::OnceLock::new(),
            conn_ids: AtomicU32::new(1),
        });
        // The in-kernel paths read the MySQL protocol on the server sockets: not over TLS.
        if s.settings.backend_tls.is_some() && (s.settings.kernel_relay || s.settings.kernel_fast_path) {
            tracing::info!("backend_tls_ca is set: the in-kernel relay and fast path stay off");
        } else if s.settings.kernel_relay {
            if let Some(k) = crate::kernel_relay::KernelRelay::load_or_log() {
                let _ = s.kernel.set(k);
            }
        }
        if s.settings.kernel_fast_path && s.settings.backend_tls.is_none() {
            if let Some(f) = crate::fast_path::FastPath::load_or_log() {
                let _ = s.fast.set(f);
            }
        }
        s
    }

    pub fn next_conn_id(&self) -> u32 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }
}

/// Accepts clients until the listener fails for good; one task per session.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(crate::session::run(stream.into(), peer.ip().to_string(), shared.clone()));
            }
            Err(e) => {
                // EMFILE and friends: keep serving the sessions we have, retry shortly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts clients on a Unix socket (several threads may share the listener: whichever
/// wakes first takes the connection).
pub async fn serve_unix(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(crate::session::run(stream.into(), "localhost".into(), shared.clone()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the Unix socket");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The router's Unix socket (`listen_socket`): created on bind, removed on drop.
pub struct UnixSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
}

impl UnixSocket {
    /// Binds `path`, readable and writable by every local user as mariadbd's own socket is
    /// (logins are checked by password). A socket file left by a router that is gone is
    /// replaced; one a live router answers on, or a file that is not a socket, is an error.
    pub fn bind(path: &Path) -> std::io::Result<UnixSocket> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, format!("{} exists and is not a socket", path.display())));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("{}: another process listens there", path.display())));
            }
            std::fs::remove_file(path)?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
        listener.set_nonblocking(true)?;
        Ok(UnixSocket { listener, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The default number of session threads: half the CPUs, at least one. A session's work is
/// almost all the kernel's (two socket reads, two writes and two wakeups per statement), so
/// one thread relays tens of thousands of statements per second; what more threads add is
/// wakeups. Measured with db-bench on the 2-vCPU machine (sysbench and both servers on the
/// same CPUs, load average 5-12): with one thread instead of two, the router's CPU per query
/// at 4 clients was 31-45 µs instead of 36-58 µs, its QPS ratio 0.48-0.66x instead of
/// 0.51-0.58x (the noise of a shared machine is as large as the difference).
pub fn default_threads() -> usize {
    (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) / 2).max(1)
}

/// Serves on `threads` threads, each with its own single-threaded tokio runtime and its own
/// `SO_REUSEPORT` listener on `addr` (the kernel spreads new connections over them). A session
/// then lives on one thread: no work-stealing wakeups between threads per statement, which on
/// a small machine cost more CPU than the relay itself. Returns the bound address once every
/// thread listens (port 0: the first thread picks, the others join it).
pub fn serve_threads(addr: SocketAddr, shared: Arc<Shared>, threads: usize) -> std::io::Result<SocketAddr> {
    serve_threads_with(addr, None, shared, threads)
}

/// [`serve_threads`], and with `unix`, every thread also accepts clients on that socket.
pub fn serve_threads_with(addr: SocketAddr, unix: Option<&UnixSocket>, shared: Arc<Shared>, threads: usize) -> std::io::Result<SocketAddr> {
    let mut bound = addr;
    for i in 0..threads.max(1) {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::clone(&shared);
        let unix = unix.map(|u| u.listener.try_clone()).transpose()?;
        std::thread::Builder::new().name(format!("db-router-{i}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(tx.send(Err(e))),
            };
            rt.block_on(async move {
                let listener = match reuseport_listener(bound) {
                    Ok(l) => l,
                    Err(e) => return drop(tx.send(Err(e))),
                };
                let unix = match unix.map(UnixListener::from_std).transpose() {
                    Ok(u) => u,
                    Err(e) => return drop(tx.send(Err(e))),
                };
                fast_listen(&shared, &listener);
                let _ = tx.send(listener.local_addr());
                match unix {
                    Some(u) => {
                        tokio::spawn(serve_unix(u, Arc::clone(&shared)));
                        serve(listener, shared).await
                    }
                    None => serve(listener, shared).await,
                }
            })
        })?;
        bound = rx.recv().map_err(|_| std::io::Error::other("router thread died"))??;
    }
    Ok(bound)
}

/// Clients connecting to `listener` from this host may use the in-kernel fast path: before
/// the first client can connect (a client whose connection was set up earlier never does).
fn fast_listen(shared: &Shared, listener: &TcpListener) {
    if let (Some(f), Ok(addr)) = (shared.fast.get(), listener.local_addr()) {
        f.listen(addr);
    }
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves clients of `socket` in the background (on the current runtime).
pub fn spawn_unix(socket: &UnixSocket, shared: Arc<Shared>) -> std::io::Result<()> {
    let listener = UnixListener::from_std(socket.listener.try_clone()?)?;
    tokio::spawn(serve_unix(listener, shared));
    Ok(())
}

/// Binds `addr` and serves in the background; returns the bound address (port 0 picks one).
pub async fn spawn(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    fast_listen(&shared, &listener);
    tokio::spawn(serve(listener, shared));
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unique temp path, removed (if anything is there) when the test ends, even on failure.
    struct TempPath(PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp_path(tag: &str) -> TempPath {
        static N: AtomicU32 = AtomicU32::new(0);
        TempPath(std::env::temp_dir().join(format!("dbr-{tag}-{}-{}.sock", std::process::id(), N.fetch_add(1, Ordering::Relaxed))))
    }

    #[test]
    fn unix_socket_replaces_a_stale_file_refuses_others_and_cleans_up() {
        // A socket file nobody listens on any more (std leaves the file behind).
        let guard = temp_path("stale");
        let stale = &guard.0;
        drop(std::os::unix::net::UnixListener::bind(stale).unwrap());
        assert!(stale.exists());
        let s = UnixSocket::bind(stale).expect("a stale socket file is replaced");
        assert!(std::os::unix::net::UnixStream::connect(stale).is_ok(), "the new socket accepts");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(stale).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o777, "local clients of any user may connect");
        drop(s);
        assert!(!stale.exists(), "removed on drop");

        // A regular file is never removed.
        let guard = temp_path("file");
        let file = &guard.0;
        std::fs::write(file, b"data").unwrap();
        let err = UnixSocket::bind(file).err().expect("not a socket");
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read(file).unwrap(), b"data");
    }

    #[test]
    fn backend_socket_errors_name_the_socket() {
        let guard = temp_path("missing");
        let path = &guard.0;
        let login = crate::backend::Login {
            user: b"u",
            sha1_password: None,
            database: None,
            client_caps: crate::protocol::server_capabilities(),
            collation: 45,
            session_track: false,
            timeout: Duration::from_secs(5),
            unix_socket: Some(path),
            fast: None,
            tls: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let err = rt.block_on(crate::backend::Backend::connect("127.0.0.1:1".parse().unwrap(), &login)).err().expect("no socket there");
        let msg = err.to_string();
        assert!(msg.contains("127.0.0.1:1") && msg.contains(&*path.to_string_lossy()), "{msg}");
    }
}
