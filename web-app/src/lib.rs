//! # web-app: the web/app node behind the XDP load balancer
//!
//! One of the backends the load balancer spreads traffic over. Each node serves the static
//! files of its current release (verified against its manifest, see [`release`]) or of a
//! plain `--root` directory, a small notes app stored in MySQL ([`app`], [`storage`]), and a
//! few endpoints that make the balancing visible and operable:
//!
//! - `GET /whoami`: JSON `{"node", "version", "release", "server_addr", "client_addr", ...}`.
//! - `GET /healthz`: `ok`, or 503 with the reason ([`health`]).
//! - `GET /metrics`: Prometheus text ([`metrics`]).
//! - `POST /upload` (or `PUT`): JSON `{"bytes", "sha256"}` of the request body (413 above the
//!   limit), so a client can check that a large request arrived intact.
//! - `/app`, `/api/notes`, `/api/notes/{id}`: the notes app.
//! - GET/HEAD on any other path: a static file ([`site`]).
//! - Optionally a UDP echo service answering each datagram with `<node> <payload>`.
//!
//! HTTP/1.1 (keep-alive) and HTTP/2 are served (h2c by prior knowledge; h2 over TLS by ALPN,
//! [`tls`]), one tokio task per connection. Shutdown is graceful: stop accepting, let
//! in-flight requests finish within a grace period. A reload ([`NodeHandle::reload`], SIGHUP)
//! verifies `releases/current` and switches to it atomically, or refuses it and keeps serving.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let mut config = web_app::Config::new("/srv/app");
//! config.listen = "127.0.0.1:0".parse()?;
//! let node = web_app::bind(config).await?;
//! println!("listening on {}", node.local_addr());
//! node.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod app;
pub mod balance;
pub mod config;
pub mod devcert;
pub mod health;
pub mod http;
pub mod metrics;
pub mod quick;
pub mod release;
pub mod sendfile;
pub mod site;
pub mod storage;
pub mod tls;
pub mod udp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use config::{Cli, Config};
pub use site::{Content, Site};
pub use udp::UdpEcho;

use health::Health;
use http::{Listener, ListenerKind};
use metrics::Metrics;
use storage::Storage;

/// How often the storage is pinged for `/healthz`.
pub const STORAGE_PING_INTERVAL: Duration = Duration::from_secs(1);

/// State shared by every request of a node.
pub struct State {
    pub node: String,
    /// The site being served; a reload swaps it, in-flight requests keep the one they loaded.
    pub site: ArcSwap<Site>,
    pub content: Content,
    root_version: String,
    pub health: Health,
    pub metrics: Metrics,
    pub storage: Option<Storage>,
    pub max_upload_bytes: u64,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    /// See [`Config::quick_path`].
    pub quick_path: bool,
    reload_lock: tokio::sync::Mutex<()>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// Now serving `to` (was `from`).
    Switched { from: String, to: String },
    /// `current` still points to the release being served.
    Unchanged { version: String },
}

/// Operates a running node: reload, drain, version. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    state: Arc<State>,
}

impl NodeHandle {
    /// Resolves and verifies the current release and switches to it atomically: requests
    /// already running finish on the old one. A release that fails verification is refused
    /// (logged, counted, returned as the error) and the node keeps serving what it has.
    pub async fn reload(&self) -> Result<Reloaded, release::ReleaseError> {
        let state = &self.state;
        let _one_at_a_time = state.reload_lock.lock().await;
        let (content, root_version) = (state.content.clone(), state.root_version.clone());
        let loaded = tokio::task::spawn_blocking(move || Site::load(&content, &root_version))
            .await
            .unwrap_or_else(|e| Err(release::ReleaseError::Invalid(format!("release check panicked: {e}"))));
        let old = state.site.load_full();
        match loaded {
            Ok(site) if site.dir == old.dir && site.version == old.version => {
                state.metrics.reload("unchanged");
                info!(version = %old.version, "reload: release unchanged");
                Ok(Reloaded::Unchanged { version: old.version.clone() })
            }
            Ok(site) => {
                let to = site.version.clone();
                state.metrics.set_release(&to);
                info!(from = %old.version, to = %to, dir = %site.dir.display(), cached_files = site.cached_files(), "release switched");
                state.site.store(Arc::new(site));
                state.metrics.reload("switched");
                Ok(Reloaded::Switched { from: old.version.clone(), to })
            }
            Err(e) => {
                state.metrics.reload("refused");
                error!(error = %e, still_serving = %old.version, "release refused; still serving the previous one");
                Err(e)
            }
        }
    }

    /// Starts (`true`) or stops draining: `/healthz` says 503 "draining", HTTP/1.1 responses
    /// carry `Connection: close`, HTTP/2 connections get a GOAWAY.
    pub fn set_draining(&self, draining: bool) {
        info!(draining, "drain state changed");
        self.state.health.set_draining(draining);
    }

    /// The version being served.
    pub fn version(&self) -> String {
        self.state.site.load().version.clone()
    }

    /// `Ok` when ready, else why not (what `/healthz` says).
    pub fn health(&self) -> Result<(), String> {
        self.state.health.check()
    }
}

/// A bound web node: its listeners and, if configured, the UDP echo service.
pub struct Node {
    state: Arc<State>,
    listeners: Vec<Listener>,
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    udp: Option<UdpEcho>,
    shutdown_grace: Duration,
    threads: usize,
}

/// Loads and verifies the site, binds the listeners (and the UDP echo socket if configured)
/// and logs the startup line. Nothing is served until [`Node::run`]. Fails when there is no
/// valid release to serve, the TLS files are unusable or an address is taken.
pub async fn bind(config: Config) -> anyhow::Result<Node> {
    let (content, root_version) = (config.content.clone(), config.version.clone());
    let site = tokio::task::spawn_blocking(move || Site::load(&content, &root_version))
        .await?
        .map_err(|e| anyhow::anyhow!("no valid release to serve: {e}"))?;
    let storage = config.db_url.as_deref().map(Storage::new).transpose()?;
    let tls = match &config.tls {
        Some(tls) => Some((tls.listen, tls::server_config(&tls.cert, &tls.key)?)),
        None => None,
    };

    let mut listeners = Vec::new();
    let plain_kind = match (&tls, config.redirect_http) {
        (Some((addr, _)), true) => ListenerKind::RedirectToHttps { https_port: addr.port() },
        _ => ListenerKind::Plain,
    };
    let plain = Listener::bind(config.listen, plain_kind).await?;
    let local_addr = plain.local_addr();
    listeners.push(plain);
    let mut tls_addr = None;
    if let Some((addr, server_config)) = tls {
        let listener = Listener::bind(addr, ListenerKind::Tls(tokio_rustls::TlsAcceptor::from(server_config))).await?;
        tls_addr = Some(listener.local_addr());
        // A port-0 TLS listener: redirect to the port it got.
        if let Some(plain) = listeners.first_mut() {
            plain.set_https_port(listener.local_addr().port());
        }
        listeners.push(listener);
    }
    let udp = match config.udp_echo {
        Some(addr) => Some(UdpEcho::bind(addr, &config.node).await?),
        None => None,
    };

    let health = Health::default();
    if storage.is_some() {
        health.set_starting(Some("migrating the storage schema".to_owned()));
    }
    let metrics = Metrics::default();
    metrics.set_release(&site.version);
    info!(
        node = %config.node,
        version = %site.version,
        content = ?config.content,
        serving = %site.dir.display(),
        cached_files = site.cached_files(),
        listen = %local_addr,
        tls_listen = ?tls_addr,
        redirect_http = config.redirect_http,
        http_threads = config.threads,
        quick_path = config.quick_path,
        storage = storage.is_some(),
        udp_echo = ?udp.as_ref().map(UdpEcho::local_addr),
        "web node started"
    );
    let state = State {
        node: config.node,
        site: ArcSwap::from_pointee(site),
        content: config.content,
        root_version: config.version,
        health,
        metrics,
        storage,
        max_upload_bytes: config.max_upload_bytes,
        request_timeout: config.request_timeout,
        header_read_timeout: config.header_read_timeout,
        quick_path: config.quick_path,
        reload_lock: tokio::sync::Mutex::new(()),
    };
    Ok(Node {
        state: Arc::new(state),
        listeners,
        local_addr,
        tls_addr,
        udp,
        shutdown_grace: config.shutdown_grace,
        threads: config.threads,
    })
}

/// [`bind`] then [`Node::run`]: serves until `shutdown` completes.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    bind(config).await?.run(shutdown).await
}

impl Node {
    /// The bound plain HTTP address (the real port when the configuration said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound HTTPS address, if TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The bound UDP echo address, if the echo service is configured.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().map(UdpEcho::local_addr)
    }

    /// A handle to reload, drain and query the node while it runs.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle { state: Arc::clone(&self.state) }
    }

    /// Serves until `shutdown` completes, then shuts everything down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Node { state, listeners, udp, shutdown_grace, threads, .. } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let storage_tasks = storage_tasks(Arc::clone(&state), stop_rx.clone());
        let http = http::serve(listeners, threads, Arc::clone(&state), stop_rx.clone(), shutdown_grace);
        let udp = async {
            match udp {
                Some(udp) => {
                    let mut rx = stop_rx.clone();
                    udp.run(async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    })
                    .await
                }
                None => Ok(()),
            }
        };
        let all = async {
            let (_, udp, _) = tokio::join!(http, udp, storage_tasks);
            udp
        };
        tokio::pin!(all, shutdown);
        let result = tokio::select! {
            result = &mut all => result,
            () = &mut shutdown => {
                info!("shutdown requested");
                let _ = stop_tx.send(true);
                all.await
            }
        };
        if let Some(storage) = state.storage.clone() {
            storage.close().await;
        }
        info!("web node stopped");
        result
    }
}

/// With storage: migrate the schema (retrying every second until it works; `/healthz` says
/// "starting" meanwhile), then ping it every second for `/healthz`. Both stop at shutdown.
async fn storage_tasks(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let Some(storage) = state.storage.clone() else { return };
    let work = async {
        loop {
            match storage.migrate().await {
                Ok(version) => {
                    info!(schema_version = version, "storage ready");
                    state.health.set_starting(None);
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "storage schema not ready yet, retrying");
                    state.health.set_starting(Some(format!("storage schema not ready: {e}")));
                    tokio::time::sleep(STORAGE_PING_INTERVAL).await;
                }
            }
        }
        let mut was_ok = true;
        loop {
            let result = storage.ping().await.map_err(|e| e.to_string());
            if result.is_ok() != was_ok {
                match &result {
                    Ok(()) => info!("storage reachable again"),
                    Err(e) => warn!(error = %e, "storage unreachable"),
                }
                was_ok = result.is_ok();
            }
            state.health.set_storage(result);
            tokio::time::sleep(STORAGE_PING_INTERVAL).await;
        }
    };
    tokio::select! {
        () = work => {}
        _ = stop.wait_for(|stop| *stop) => {}
    }
}
