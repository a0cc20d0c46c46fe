//! # web-app: a web node behind the XDP load balancer
//!
//! One of the backends the load balancer spreads traffic over. Each node serves the static
//! files of its own application directory (`--root`) and a few endpoints that make the
//! balancing visible and testable:
//!
//! - `GET /whoami`: JSON `{"node", "version", "server_addr", "client_addr"}`; which node
//!   answered, on which local address, and whom it saw as the client.
//! - `GET /healthz`: `ok`, for health checks.
//! - `POST /upload` (or `PUT`): JSON `{"bytes", "sha256"}` of the request body, so a client
//!   can check that a large request arrived intact through the balancer (413 above the limit).
//! - GET/HEAD on any other path: a static file from the root (`index.html` for directories).
//! - Optionally a UDP echo service answering each datagram with `<node> <payload>`.
//!
//! HTTP/1.1 (keep-alive) and cleartext HTTP/2 are both served, one tokio task per connection.
//! Shutdown is graceful: stop accepting, let in-flight requests finish within a grace period.
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

pub mod config;
pub mod http;
pub mod udp;

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::watch;
use tracing::info;

pub use config::{Cli, Config};
pub use http::HttpServer;
pub use udp::UdpEcho;

/// A bound web node: the HTTP server and, if configured, the UDP echo service.
pub struct Node {
    http: HttpServer,
    udp: Option<UdpEcho>,
}

/// Binds the HTTP listener (and the UDP echo socket if `config.udp_echo` is set) and logs the
/// startup line. Nothing is served until [`Node::run`].
pub async fn bind(config: Config) -> anyhow::Result<Node> {
    let http = HttpServer::bind(&config).await?;
    let udp = match config.udp_echo {
        Some(addr) => Some(UdpEcho::bind(addr, &config.node).await?),
        None => None,
    };
    info!(
        node = %config.node,
        version = %config.version,
        listen = %http.local_addr(),
        root = %config.root.display(),
        udp_echo = ?udp.as_ref().map(UdpEcho::local_addr),
        max_upload_bytes = config.max_upload_bytes,
        "web node started"
    );
    Ok(Node { http, udp })
}

/// [`bind`] then [`Node::run`]: serves until `shutdown` completes.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    bind(config).await?.run(shutdown).await
}

impl Node {
    /// The bound HTTP address (the real port when the configuration said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// The bound UDP echo address, if the echo service is configured.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().map(UdpEcho::local_addr)
    }

    /// Serves until `shutdown` completes, then shuts both services down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(());
        let stopped = |mut rx: watch::Receiver<()>| async move {
            // Changed, or the sender is gone: either way it is time to stop.
            let _ = rx.changed().await;
        };
        let http = self.http.run(stopped(stop_rx.clone()));
        let udp = async {
            match self.udp {
                Some(udp) => udp.run(stopped(stop_rx)).await,
                None => Ok(()),
            }
        };
        let both = async { tokio::try_join!(http, udp).map(|_| ()) };
        tokio::pin!(both, shutdown);
        tokio::select! {
            result = &mut both => result,
            () = &mut shutdown => {
                info!("shutdown requested");
                let _ = stop_tx.send(());
                both.await
            }
        }
    }
}
