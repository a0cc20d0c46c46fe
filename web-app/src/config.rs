//! Configuration of a web node: the command line (`Cli`) and what the servers use (`Config`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::site::Content;

/// Default HTTP listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default HTTPS listen address (with --tls-cert/--tls-key).
pub const DEFAULT_TLS_LISTEN: &str = "0.0.0.0:8443";
/// Default upload limit: 16 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 16 * 1024 * 1024;
/// Default time in-flight requests get to finish after a shutdown signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default time a request (head and body) may take to be handled; 408 after it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a client may take to send a request head (slow-loris guard).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTPS listener settings.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain, node certificate first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Everything a web node needs to run. Build it with [`Config::new`] (a plain root) or
/// [`Config::with_releases`] and adjust the public fields, or from the command line with
/// [`Cli::into_config`].
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listen address (port 0 picks a free port; see `Node::local_addr`).
    pub listen: SocketAddr,
    /// Where the static files come from: a plain root or verified releases.
    pub content: Content,
    /// Node name reported by `/whoami`, the app page and prefixed to UDP echo replies.
    pub node: String,
    /// Version reported for a plain root (releases report their manifest's version).
    pub version: String,
    /// Optional UDP echo service address.
    pub udp_echo: Option<SocketAddr>,
    /// Largest accepted `/upload` body, in bytes.
    pub max_upload_bytes: u64,
    /// How long in-flight requests may take to finish after shutdown is requested.
    pub shutdown_grace: Duration,
    /// HTTPS listener, if any.
    pub tls: Option<TlsConfig>,
    /// With `tls`: the plain listener answers 308 to HTTPS (except /healthz and /metrics).
    pub redirect_http: bool,
    /// MySQL endpoint of the notes app (`mysql://user:pw@host:port/db`); without it the app
    /// routes answer 503.
    pub db_url: Option<String>,
    /// Time limit of a request's handling (reading its body included): 408 after it.
    pub request_timeout: Duration,
    /// Time limit for a request head to arrive (HTTP/1.1).
    pub header_read_timeout: Duration,
    /// HTTP threads: each runs its own single-threaded runtime and accepts on its own
    /// `SO_REUSEPORT` socket.
    pub threads: usize,
    /// HTTP/1.1 GET/HEAD of files kept in memory are answered by [`crate::quick`] (true), or
    /// every request by hyper.
    pub quick_path: bool,
}

impl Config {
    /// A configuration with the defaults: listen on 0.0.0.0:8080, node name from the hostname,
    /// version from `root/VERSION` (or "unknown"), no UDP echo, 16 MiB uploads, 10 s grace,
    /// no TLS, no storage.
    pub fn new(root: impl Into<PathBuf>) -> Config {
        let root = root.into();
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default listen address"),
            version: version_from_root(&root),
            content: Content::Root(root),
            node: hostname(),
            udp_echo: None,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            tls: None,
            redirect_http: false,
            db_url: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            threads: default_threads(),
            quick_path: true,
        }
    }

    /// Like [`Config::new`], serving `releases/current` (verified) instead of a plain root.
    pub fn with_releases(releases: impl Into<PathBuf>) -> Config {
        let releases = releases.into();
        let mut config = Config::new(&releases);
        config.version = "unknown".to_owned();
        config.content = Content::Releases(releases);
        config
    }
}

/// Web/app node behind the XDP load balancer.
///
/// Serves static files of its current release (or of a plain --root directory), a notes app
/// stored in MySQL, over HTTP/1.1 and HTTP/2 (h2c, and h2 over TLS by ALPN):
///
///   GET  /whoami          JSON {node, version, release, server_addr, client_addr, tls, ...}
///   GET  /healthz         "ok", or 503 with the reason (starting, draining, storage unreachable)
///   GET  /metrics         Prometheus text
///   POST /upload          (or PUT) JSON {bytes, sha256} of the request body
///   GET  /app             notes page (POST: its form); needs --db-url, else 503
///   GET  /api/notes       JSON notes; POST /api/notes {"author","text"}; GET /api/notes/{id}
///   GET  /any/path        static file (index.html for directories; ETag, ranges, gzip/br)
///
/// Every response has an x-release header with the version served.
///
/// Releases (--releases DIR): DIR/current -> DIR/<version>, each with a MANIFEST.toml of
/// sha256 and size of every file. Make one with `web-app release create`. The release is
/// verified at start (no valid release: exit) and on SIGHUP (invalid: refused, the node keeps
/// serving the one it has; valid: switched atomically).
///
/// Signals: SIGHUP reloads the release; SIGUSR1 starts draining (/healthz 503 "draining",
/// keep-alive clients are asked to reconnect), SIGUSR2 stops it; SIGINT/SIGTERM stop
/// gracefully. Logging: RUST_LOG (default "info"; one "access" line per request).
#[derive(Debug, Parser)]
#[command(name = "web-app", version, verbatim_doc_comment, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// HTTP listen address (IP:PORT).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// A plain application directory to serve as is (no manifest check).
    #[arg(long, value_name = "DIR", conflicts_with = "releases")]
    pub root: Option<PathBuf>,

    /// A releases directory: serve DIR/current after verifying its manifest.
    #[arg(long, value_name = "DIR")]
    pub releases: Option<PathBuf>,

    /// Node name reported by /whoami and the UDP echo [default: this machine's hostname].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// Version reported for --root [default: contents of DIR/VERSION, else "unknown"].
    #[arg(long, value_name = "V", conflicts_with = "releases")]
    pub app_version: Option<String>,

    /// Also run a UDP echo service on ADDR (IP:PORT); replies are "<node> " + the payload.
    #[arg(long, value_name = "ADDR")]
    pub udp_echo: Option<SocketAddr>,

    /// Largest accepted /upload body in bytes; larger ones get 413.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: u64,

    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs())]
    pub shutdown_grace: u64,

    /// PEM certificate chain for HTTPS (node certificate first); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for HTTPS; needs --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// HTTPS listen address.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_TLS_LISTEN)]
    pub tls_listen: SocketAddr,

    /// The plain HTTP listener answers 308 to https:// (except /healthz and /metrics).
    #[arg(long, requires = "tls_cert")]
    pub redirect_http: bool,

    /// MySQL endpoint of the notes app: mysql://USER:PASSWORD@HOST:PORT/DATABASE
    /// (MariaDB or the db-router).
    #[arg(long, value_name = "URL")]
    pub db_url: Option<String>,

    /// Seconds a request may take to be handled, its body included (then 408).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_REQUEST_TIMEOUT.as_secs())]
    pub request_timeout: u64,

    /// HTTP threads, each with its own runtime and SO_REUSEPORT socket [default: CPU count].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Seconds a client may take to send a request head (then the connection is closed).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    pub header_read_timeout: u64,

    /// Answer every request through hyper: no quick path for HTTP/1.1 GET and HEAD of the
    /// files kept in memory.
    #[arg(long)]
    pub no_quick_path: bool,
}

/// Subcommands besides serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make, check or activate releases.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Write a development CA and a node certificate (PEM) for the given names.
    Devcert {
        /// Directory for ca.pem, ca-key.pem, node.pem, node-key.pem.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// DNS name or IP address the certificate is valid for (repeatable).
        #[arg(long = "name", value_name = "NAME", required = true)]
        names: Vec<String>,
    },
}

/// `web-app release ...`
#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Copy a site directory to OUT/VERSION and write its MANIFEST.toml.
    Create {
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        #[arg(long, value_name = "V")]
        version: String,
        #[arg(long, value_name = "RELEASES_DIR")]
        out: PathBuf,
    },
    /// Verify a release directory against its manifest (exit 1 if it does not match).
    Verify {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Point RELEASES_DIR/current at a release (atomically); send SIGHUP to the node after.
    Activate {
        #[arg(long, value_name = "RELEASES_DIR")]
        releases: PathBuf,
        #[arg(long, value_name = "V")]
        version: String,
    },
}

impl Cli {
    /// Checks the serving arguments and fills in the defaults that depend on the machine or
    /// the root.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut config = match (self.root, self.releases) {
            (Some(root), None) => {
                let meta = std::fs::metadata(&root).with_context(|| format!("--root {}", root.display()))?;
                if !meta.is_dir() {
                    bail!("--root {} is not a directory", root.display());
                }
                Config::new(root)
            }
            (None, Some(releases)) => {
                let meta =
                    std::fs::metadata(&releases).with_context(|| format!("--releases {}", releases.display()))?;
                if !meta.is_dir() {
                    bail!("--releases {} is not a directory", releases.display());
                }
                Config::with_releases(releases)
            }
            (None, None) => bail!("say what to serve: --releases DIR (verified releases) or --root DIR (a plain directory)"),
            (Some(_), Some(_)) => bail!("--root and --releases exclude each other"),
        };
        config.listen = self.listen;
        if let Some(node) = self.node {
            if node.trim().is_empty() {
                bail!("--node must not be empty");
            }
            config.node = node;
        }
        if let Some(version) = self.app_version {
            config.version = version;
        }
        config.udp_echo = self.udp_echo;
        config.max_upload_bytes = self.max_upload_bytes;
        config.shutdown_grace = Duration::from_secs(self.shutdown_grace);
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            if self.tls_listen == self.listen {
                bail!("--tls-listen and --listen must differ ({})", self.listen);
            }
            config.tls = Some(TlsConfig { listen: self.tls_listen, cert, key });
        }
        config.redirect_http = self.redirect_http;
        if let Some(url) = &self.db_url {
            crate::storage::Storage::new(url).map_err(anyhow::Error::from)?;
        }
        config.db_url = self.db_url;
        if self.request_timeout == 0 || self.header_read_timeout == 0 {
            bail!("--request-timeout and --header-read-timeout must be at least 1 second");
        }
        config.request_timeout = Duration::from_secs(self.request_timeout);
        if let Some(threads) = self.threads {
            if !(1..=1024).contains(&threads) {
                bail!("--threads must be from 1 to 1024");
            }
            config.threads = threads;
        }
        config.header_read_timeout = Duration::from_secs(self.header_read_timeout);
        config.quick_path = !self.no_quick_path;
        Ok(config)
    }
}

/// Trimmed contents of `root/VERSION`, or "unknown" when it is missing, unreadable or empty.
pub fn version_from_root(root: &Path) -> String {
    match std::fs::read_to_string(root.join("VERSION")) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
        _ => "unknown".to_owned(),
    }
}

/// The number of CPUs this process may run on (1 if unknown).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// This machine's hostname, or "localhost" if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_owned();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if !name.is_empty() => name.to_owned(),
        _ => "localhost".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(version_from_root(dir.path()), "unknown");
        std::fs::write(dir.path().join("VERSION"), "  1.2.3\n").unwrap();
        assert_eq!(version_from_root(dir.path()), "1.2.3");
    }

    #[test]
    fn cli_defaults_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("VERSION"), "v7\n").unwrap();
        let root = dir.path().to_str().unwrap();
        let config = Cli::try_parse_from(["web-app", "--root", root]).unwrap().into_config().unwrap();
        assert_eq!(config.content, Content::Root(dir.path().to_owned()));
        assert!(config.tls.is_none() && config.db_url.is_none() && !config.redirect_http);
        assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.version, "v7");
        assert_eq!(config.node, hostname());
        assert_eq!(config.max_upload_bytes, 16 * 1024 * 1024);
        assert!(config.udp_echo.is_none());

        let config = Cli::try_parse_from([
            "web-app", "--root", root, "--node", "web1", "--app-version", "2", "--listen",
            "127.0.0.1:9000", "--udp-echo", "127.0.0.1:9001", "--max-upload-bytes", "10",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(config.node, "web1");
        assert_eq!(config.version, "2");
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.udp_echo, Some("127.0.0.1:9001".parse().unwrap()));
        assert_eq!(config.max_upload_bytes, 10);
    }

    #[test]
    fn missing_root_is_an_error() {
        let cli = Cli::try_parse_from(["web-app", "--root", "/nonexistent/web-app-root"]).unwrap();
        assert!(cli.into_config().is_err());
        let err = Cli::try_parse_from(["web-app"]).unwrap().into_config().unwrap_err().to_string();
        assert!(err.contains("--releases DIR"), "{err}");
        assert!(Cli::try_parse_from(["web-app", "--root", "/tmp", "--releases", "/tmp"]).is_err());
    }

    #[test]
    fn tls_storage_and_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let config = Cli::try_parse_from([
            "web-app", "--releases", d, "--tls-cert", "c.pem", "--tls-key", "k.pem", "--redirect-http",
            "--db-url", "mysql://u:p@127.0.0.1:3306/notes",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(config.content, Content::Releases(dir.path().to_owned()));
        let tls = config.tls.unwrap();
        assert_eq!(tls.listen, DEFAULT_TLS_LISTEN.parse().unwrap());
        assert_eq!(tls.cert, PathBuf::from("c.pem"));
        assert!(config.redirect_http);
        // Half a TLS configuration, a redirect without TLS, a database URL without a database.
        assert!(Cli::try_parse_from(["web-app", "--releases", d, "--tls-cert", "c.pem"]).is_err());
        assert!(Cli::try_parse_from(["web-app", "--releases", d, "--redirect-http"]).is_err());
        let cli = Cli::try_parse_from(["web-app", "--releases", d, "--db-url", "mysql://u:p@127.0.0.1:3306"]).unwrap();
        assert!(cli.into_config().unwrap_err().to_string().contains("no database name"));
        let cli = Cli::try_parse_from(["web-app", "--releases", d, "--db-url", "http://x"]).unwrap();
        assert!(cli.into_config().unwrap_err().to_string().contains("invalid --db-url"));
        // Subcommands.
        let cli = Cli::try_parse_from(["web-app", "release", "verify", d]).unwrap();
        assert!(matches!(cli.command, Some(Command::Release(ReleaseCommand::Verify { .. }))));
        let cli = Cli::try_parse_from(["web-app", "devcert", "--out", d, "--name", "a", "--name", "10.0.0.1"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Devcert { names, .. }) if names == ["a", "10.0.0.1"]));
    }
}
