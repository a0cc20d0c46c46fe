//! Configuration of a web node: the command line (`Cli`) and what the servers use (`Config`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

/// Default HTTP listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default upload limit: 16 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 16 * 1024 * 1024;
/// Default time in-flight requests get to finish after a shutdown signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Everything a web node needs to run. Build it with [`Config::new`] and adjust the public
/// fields, or from the command line with [`Cli::into_config`].
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listen address (port 0 picks a free port; see `Node::local_addr`).
    pub listen: SocketAddr,
    /// The node's application directory; static files are served from here.
    pub root: PathBuf,
    /// Node name reported by `/whoami` and prefixed to UDP echo replies.
    pub node: String,
    /// Application version reported by `/whoami`.
    pub version: String,
    /// Optional UDP echo service address.
    pub udp_echo: Option<SocketAddr>,
    /// Largest accepted `/upload` body, in bytes.
    pub max_upload_bytes: u64,
    /// How long in-flight requests may take to finish after shutdown is requested.
    pub shutdown_grace: Duration,
}

impl Config {
    /// A configuration with the defaults: listen on 0.0.0.0:8080, node name from the hostname,
    /// version from `root/VERSION` (or "unknown"), no UDP echo, 16 MiB uploads, 10 s grace.
    pub fn new(root: impl Into<PathBuf>) -> Config {
        let root = root.into();
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default listen address"),
            version: version_from_root(&root),
            root,
            node: hostname(),
            udp_echo: None,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Web node behind the XDP load balancer.
///
/// Serves the static files of its application directory over HTTP/1.1 and HTTP/2 (cleartext),
/// plus a few endpoints that tell clients which node answered:
///
///   GET  /whoami    JSON {node, version, server_addr, client_addr}
///   GET  /healthz   "ok"
///   POST /upload    (or PUT) JSON {bytes, sha256} of the request body
///   GET  /any/path  static file from --root (index.html for directories)
///
/// Optionally also answers UDP datagrams on --udp-echo with "<node> <payload>".
/// Stops gracefully on SIGINT/SIGTERM. Logging: RUST_LOG (default "info").
#[derive(Debug, Parser)]
#[command(name = "web-app", version, verbatim_doc_comment)]
pub struct Cli {
    /// HTTP listen address (IP:PORT).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// The node's application directory; static files are served from it.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,

    /// Node name reported by /whoami and the UDP echo [default: this machine's hostname].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// Application version reported by /whoami [default: contents of DIR/VERSION, else "unknown"].
    #[arg(long, value_name = "V")]
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
}

impl Cli {
    /// Checks the arguments and fills in the defaults that depend on the machine or the root.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let meta = std::fs::metadata(&self.root)
            .with_context(|| format!("--root {}", self.root.display()))?;
        if !meta.is_dir() {
            bail!("--root {} is not a directory", self.root.display());
        }
        let mut config = Config::new(self.root);
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
        assert!(Cli::try_parse_from(["web-app"]).is_err());
    }
}
