//! `web-app`: the web/app node behind the XDP load balancer. See the library docs (`web_app`)
//! and `web-app --help`.

use std::alloc::{GlobalAlloc, Layout};

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
static ALLOCATOR: Allocator = Allocator;

/// mimalloc, asked the way Rust's own `System` allocator asks malloc: blocks that need no
/// more than mimalloc's natural alignment (16 bytes) come from `mi_malloc`. (The `mimalloc`
/// crate asks `mi_malloc_aligned` for every block, and mimalloc answers that for blocks over
/// 1 KiB, such as hyper's read buffer or a connection's state, by a slow path that
/// over-allocates: about 2,000 instructions per connection measured under callgrind.)
struct Allocator;

/// mimalloc aligns every block to this (`MI_MAX_ALIGN_SIZE`), and blocks smaller than it to
/// their size's largest power of two.
const NATURAL_ALIGN: usize = 16;

fn natural(layout: Layout) -> bool {
    layout.align() <= NATURAL_ALIGN && layout.align() <= layout.size()
}

// SAFETY: every block comes from mimalloc (plain or aligned, both freed by `mi_free`), with at
// least the size and alignment asked for: `mi_malloc` only for layouts mimalloc aligns
// anyway (see `natural`).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if natural(layout) {
            // SAFETY: plain allocation, no precondition.
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if natural(layout) {
            // SAFETY: plain allocation, no precondition.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from mimalloc (the caller's guarantee and `alloc` above).
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= NATURAL_ALIGN && layout.align() <= new_size {
            // SAFETY: `ptr` came from mimalloc; the new block keeps the natural alignment.
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

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
