//! `db-router`: the MySQL-protocol read/write-split proxy.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use db_router::{
    admin::{self, Admin},
    config::Config,
    monitor::Monitor,
    router::{self, Metrics, Shared},
    topology::{self, Routing},
};
use prometheus_client::registry::Registry;

#[derive(Parser)]
#[command(name = "db-router", version, about = "MySQL-protocol read/write-split router for a MariaDB primary and replica")]
#[command(after_help = concat!("Example configuration (router.toml):\n\n", include_str!("config_example.toml")))]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve clients until stopped (SIGINT/SIGTERM).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration file and exit (errors name the line).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask a running router for its view of the backends (GET /status on its admin API).
    Status {
        /// The router's `admin_listen` address.
        #[arg(long, default_value = "127.0.0.1:9104")]
        admin: std::net::SocketAddr,
    },
    /// Make a fenced old primary (or the named backend) a replica of the current primary
    /// (POST /rejoin on the router's admin API); it serves reads once it has caught up.
    Rejoin {
        #[arg(long, default_value = "127.0.0.1:9104")]
        admin: std::net::SocketAddr,
        /// The backend to rejoin (IP:PORT); default: the fenced one.
        #[arg(long)]
        backend: Option<std::net::SocketAddr>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => Config::load(&config).map(|_| println!("{}: ok", config.display())).map_err(anyhow::Error::from),
        Command::Run { config } => run(&config),
        Command::Status { admin } => admin_request(hyper::Method::GET, format!("http://{admin}/status")),
        Command::Rejoin { admin, backend } => admin_request(
            hyper::Method::POST,
            match backend {
                Some(b) => format!("http://{admin}/rejoin?backend={b}"),
                None => format!("http://{admin}/rejoin"),
            },
        ),
    };
    if let Err(e) = result {
        eprintln!("db-router: {e:#}");
        std::process::exit(1);
    }
}

fn run(path: &std::path::Path) -> Result<()> {
    let cfg = Config::load(path)?;
    // Monitor and admin API on this thread; client sessions on `threads` threads
    // (router::serve_threads).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let (publisher, subscriber) = topology::channel(Routing { primary: Some(cfg.primary), replica: cfg.replica, generation: 1, down: Vec::new() });
        let backends: Vec<_> = std::iter::once(cfg.primary).chain(cfg.replica).collect();
        let monitor = Monitor::spawn(cfg.monitor.clone(), backends, publisher, &mut registry);
        let shared = Shared::new(cfg.users.clone(), cfg.settings.clone(), metrics, subscriber);
        // Removed again when this scope ends (shutdown).
        let unix = match &cfg.listen_socket {
            Some(p) => Some(router::UnixSocket::bind(p).with_context(|| format!("cannot listen on listen_socket {}", p.display()))?),
            None => None,
        };
        let addr = router::serve_threads_with(cfg.listen, unix.as_ref(), Arc::clone(&shared), cfg.threads)
            .with_context(|| format!("cannot listen on {}: is another process using it?", cfg.listen))?;
        if let Some(a) = cfg.admin_listen {
            let (bound, _) = admin::spawn(a, Admin { registry: Arc::new(registry), monitor: Some(monitor) })
                .await
                .with_context(|| format!("cannot listen on admin_listen {a}: is another process using it?"))?;
            tracing::info!(admin = %bound, "admin API serving /metrics /status /live /ready, POST /rejoin");
        }
        tracing::info!(listen = %addr, listen_socket = ?cfg.listen_socket, primary = %cfg.primary, replica = ?cfg.replica, "db-router serving");
        shutdown_signal().await;
        tracing::info!("stopping");
        Ok(())
    })
}

/// One request to a running router's admin API; prints the answer, fails on a non-2xx status.
fn admin_request(method: hyper::Method, uri: String) -> Result<()> {
    use http_body_util::{BodyExt, Empty};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Empty<bytes::Bytes>>();
        let req = hyper::Request::builder().method(method).uri(&uri).body(Empty::new())?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(60), client.request(req))
            .await
            .with_context(|| format!("{uri}: no answer within 60 s"))?
            .with_context(|| format!("{uri}: no router answering (is `db-router run` up? --admin)"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body);
        anyhow::ensure!(status.is_success(), "{status}: {}", text.trim());
        println!("{}", text.trim());
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
