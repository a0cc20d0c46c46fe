//! `web-app`: the web/app node behind the XDP load balancer. See the library docs (`web_app`)
//! and `web-app --help`.

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;
use tracing_subscriber::EnvFilter;
use web_app::config::{Command, ReleaseCommand};

/// mimalloc rather than glibc's malloc: with a new connection per request, the buffers of
/// each connection (hyper's read and write buffers, the task, the request) are allocated
/// and freed at a high rate; mimalloc's per-thread free lists take less CPU for that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = run() {
        eprintln!("web-app: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = web_app::Cli::parse();
    match cli.command {
        Some(Command::Release(command)) => release(command),
        Some(Command::Devcert { out, names }) => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let certs = web_app::devcert::generate(&out, &names)?;
            println!("CA certificate (trust it): {}", certs.ca_cert.display());
            println!("node certificate chain:    {}  (--tls-cert)", certs.cert.display());
            println!("node private key:          {}  (--tls-key)", certs.key.display());
            println!("try: curl --cacert {} https://{}/", certs.ca_cert.display(), names[0]);
            Ok(())
        }
        None => {
            let config = cli.into_config()?;
            // The HTTP threads run runtimes of their own; this one has signals, storage
            // migration and pings, and the UDP echo.
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(serve(config))
        }
    }
}

fn release(command: ReleaseCommand) -> anyhow::Result<()> {
    match command {
        ReleaseCommand::Create { from, version, out } => {
            let dir = web_app::release::create(&from, &version, &out)?;
            let manifest = web_app::release::read_manifest(&dir)?;
            println!("release {} created in {} ({} files)", manifest.version, dir.display(), manifest.files.len());
        }
        ReleaseCommand::Verify { dir } => {
            let verified = web_app::release::verify(&dir)?;
            println!(
                "release {} in {}: {} files match the manifest",
                verified.manifest.version,
                verified.dir.display(),
                verified.manifest.files.len()
            );
        }
        ReleaseCommand::Activate { releases, version } => {
            web_app::release::verify(&releases.join(&version))?;
            web_app::release::activate(&releases, &version)?;
            println!("{}/current -> {version}; send SIGHUP to the node to serve it", releases.display());
        }
    }
    Ok(())
}

async fn serve(config: web_app::Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut sigusr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    let node = web_app::bind(config).await?;
    let handle = node.handle();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = sighup.recv() => {
                    info!("SIGHUP: reloading the release");
                    // The outcome is logged by reload itself.
                    let _ = handle.reload().await;
                }
                Some(()) = sigusr1.recv() => handle.set_draining(true),
                Some(()) = sigusr2.recv() => handle.set_draining(false),
            }
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => info!("SIGINT received"),
            _ = sigterm.recv() => info!("SIGTERM received"),
        }
    };
    node.run(shutdown).await
}
