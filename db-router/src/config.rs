//! The `db-router` configuration file. Unknown keys, duplicates and impossible values are
//! errors that name the line.
//!
//! ```toml
//! listen = "127.0.0.1:3307"          # where clients connect (MySQL protocol)
//! listen_socket = "/run/db-router.sock"  # and, for clients on this host, a Unix socket (optional)
//! admin_listen = "127.0.0.1:9104"    # /metrics and /status (optional)
//! primary = "127.0.0.1:33061"        # the writable server at start; the monitor follows failovers
//! replica = "127.0.0.1:33062"        # serves autocommit reads
//! read_your_writes = true            # a session's reads wait on the replica for its own writes
//! ryw_timeout_ms = 1000              # ... this long, then go to the primary
//! max_replication_lag_s = 10         # a replica further behind gets no reads
//! failover_wait_ms = 10000           # writes wait this long for a new primary, then fail
//! connect_timeout_ms = 2000
//! threads = 1                        # session threads (default: half the CPUs, at least 1)
//! kernel_relay = false               # true: replica answers to plain reads go to the client
//!                                    # through the kernel (BPF sockmap, needs root)
//! kernel_fast_path = true            # true: prepared reads of clients on this host go to a
//!                                    # replica on this host and back through the kernel,
//!                                    # past the router (BPF sockmap, needs root, cgroup v2)
//! tls_cert = "/etc/db-router/cert.pem"   # optional: TLS for clients that ask (PEM chain,
//! tls_key = "/etc/db-router/key.pem"     # the router's certificate first; PEM key)
//! require_tls = false                # true: refuse clients without TLS
//! backend_tls_ca = "/etc/db-router/db-ca.pem"  # optional: reach the servers over TLS,
//!                                    # their certificates signed by this CA and naming
//! backend_tls_server_name = "db.internal"      # this name (default: the server's IP)
//!
//! [sockets]                          # optional: servers on this host, reached over their
//! "127.0.0.1:33061" = "/run/mysqld/a.sock"   # Unix socket (the monitor still uses TCP)
//!
//! [[user]]                           # accounts clients log in with; the same accounts
//! name = "app"                       # (same passwords) must exist on both servers
//! password = "apppw"
//!
//! [[user]]
//! name = "report"
//! password_hash = "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"   # SELECT PASSWORD('...')
//!
//! [monitor]                          # optional; see monitor::MonitorConfig for every key
//! user = "monitor"
//! password = "monitorpw"
//! interval_ms = 250
//! fail_after = 3
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_spanned::Spanned;

use crate::{
    monitor::MonitorConfig,
    protocol,
    router::{Settings, User},
};

/// The example above, checked by a test so that `--help` never shows a broken one.
pub const EXAMPLE: &str = include_str!("config_example.toml");

/// A configuration error, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Spanned<String>,
    #[serde(default)]
    listen_socket: Option<Spanned<String>>,
    #[serde(default)]
    admin_listen: Option<Spanned<String>>,
    primary: Spanned<String>,
    #[serde(default)]
    replica: Option<Spanned<String>>,
    #[serde(default)]
    read_your_writes: Option<bool>,
    #[serde(default)]
    ryw_timeout_ms: Option<Spanned<i64>>,
    #[serde(default)]
    max_replication_lag_s: Option<Spanned<i64>>,
    #[serde(default)]
    failover_wait_ms: Option<Spanned<i64>>,
    #[serde(default)]
    connect_timeout_ms: Option<Spanned<i64>>,
    #[serde(default)]
    threads: Option<Spanned<i64>>,
    #[serde(default)]
    kernel_relay: Option<bool>,
    #[serde(default)]
    kernel_fast_path: Option<bool>,
    #[serde(default)]
    tls_cert: Option<Spanned<String>>,
    #[serde(default)]
    tls_key: Option<Spanned<String>>,
    #[serde(default)]
    require_tls: Option<Spanned<bool>>,
    #[serde(default)]
    backend_tls_ca: Option<Spanned<String>>,
    #[serde(default)]
    backend_tls_server_name: Option<Spanned<String>>,
    #[serde(default)]
    sockets: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    user: Vec<UserFile>,
    #[serde(default)]
    monitor: Option<Spanned<MonitorConfig>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    name: Spanned<String>,
    #[serde(default)]
    password: Option<Spanned<String>>,
    #[serde(default)]
    password_hash: Option<Spanned<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    /// A Unix socket clients on this host may use instead of `listen`.
    pub listen_socket: Option<PathBuf>,
    pub admin_listen: Option<SocketAddr>,
    pub primary: SocketAddr,
    pub replica: Option<SocketAddr>,
    pub max_replication_lag: Duration,
    /// `[monitor]` (the tier's monitor: checks, failover, fencing); `max_replication_lag_s`
    /// above is copied into it.
    pub monitor: MonitorConfig,
    pub settings: Settings,
    pub users: HashMap<String, User>,
    /// Threads serving client sessions (`router::serve_threads`).
    pub threads: usize,
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].matches('\n').count() + 1
    }
    fn err<T>(&self, span: Range<usize>, message: impl Into<String>) -> Result<T, ConfigError> {
        Err(ConfigError { file: self.file.into(), line: Some(self.line_of(span.start)), message: message.into() })
    }
    fn addr(&self, v: &Spanned<String>, what: &str) -> Result<SocketAddr, ConfigError> {
        v.get_ref()
            .parse()
            .or_else(|_| self.err(v.span(), format!("{what} {:?} is not an address:port such as \"127.0.0.1:3307\"", v.get_ref())))
    }
    fn path(&self, v: &Spanned<String>, what: &str) -> Result<PathBuf, ConfigError> {
        let p = PathBuf::from(v.get_ref());
        if !p.is_absolute() {
            return self.err(v.span(), format!("{what} {:?} must be an absolute path", v.get_ref()));
        }
        Ok(p)
    }
    fn int(&self, v: &Option<Spanned<i64>>, what: &str, range: Range<i64>, default: i64) -> Result<u64, ConfigError> {
        match v {
            None => Ok(default as u64),
            Some(x) if range.contains(x.get_ref()) => Ok(*x.get_ref() as u64),
            Some(x) => self.err(x.span(), format!("{what} {} is out of range {}..{}", x.get_ref(), range.start, range.end)),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let cx = Ctx { file, text };
        let f: File = toml::from_str(text).map_err(|e| ConfigError {
            file: file.into(),
            line: e.span().map(|s| cx.line_of(s.start)),
            message: e.message().trim().to_string(),
        })?;
        let listen = cx.addr(&f.listen, "listen")?;
        let admin_listen = f.admin_listen.as_ref().map(|a| cx.addr(a, "admin_listen")).transpose()?;
        let primary = cx.addr(&f.primary, "primary")?;
        let replica = f.replica.as_ref().map(|a| cx.addr(a, "replica")).transpose()?;
        if replica == Some(primary) {
            return cx.err(f.replica.as_ref().expect("set").span(), "replica is the same address as primary");
        }
        if let Some(a) = &f.admin_listen {
            if admin_listen == Some(listen) {
                return cx.err(a.span(), "admin_listen is the same address as listen");
            }
        }
        let listen_socket = f.listen_socket.as_ref().map(|p| cx.path(p, "listen_socket")).transpose()?;
        let mut sockets = HashMap::new();
        for (addr, path) in &f.sockets {
            let a = cx.addr(addr, "sockets key")?;
            if a != primary && Some(a) != replica {
                return cx.err(addr.span(), format!("sockets: {a} is neither the primary nor the replica"));
            }
            sockets.insert(a, cx.path(path, "socket")?);
        }
        let tls = match (&f.tls_cert, &f.tls_key) {
            (None, None) => None,
            (Some(c), None) => return cx.err(c.span(), "tls_cert without tls_key: both or neither"),
            (None, Some(k)) => return cx.err(k.span(), "tls_key without tls_cert: both or neither"),
            (Some(c), Some(k)) => {
                let (cert, key) = (cx.path(c, "tls_cert")?, cx.path(k, "tls_key")?);
                match crate::tls::Tls::load(&cert, &key) {
                    Ok(t) => Some(t),
                    Err(e) => return cx.err(c.span(), e),
                }
            }
        };
        let require_tls = match &f.require_tls {
            Some(r) if *r.get_ref() && tls.is_none() => return cx.err(r.span(), "require_tls = true needs tls_cert and tls_key"),
            Some(r) => *r.get_ref(),
            None => false,
        };
        let backend_tls = match (&f.backend_tls_ca, &f.backend_tls_server_name) {
            (None, None) => None,
            (None, Some(n)) => return cx.err(n.span(), "backend_tls_server_name without backend_tls_ca"),
            (Some(ca), name) => {
                let path = cx.path(ca, "backend_tls_ca")?;
                match crate::tls::BackendTls::load(&path, name.as_ref().map(|n| n.get_ref().as_str())) {
                    Ok(t) => Some(t),
                    Err(e) => return cx.err(if e.starts_with("backend_tls_server_name") { name.as_ref().expect("named").span() } else { ca.span() }, e),
                }
            }
        };
        let defaults = Settings::default();
        let settings = Settings {
            read_your_writes: f.read_your_writes.unwrap_or(defaults.read_your_writes),
            ryw_timeout: Duration::from_millis(cx.int(&f.ryw_timeout_ms, "ryw_timeout_ms", 0..600_001, 1000)?),
            failover_wait: Duration::from_millis(cx.int(&f.failover_wait_ms, "failover_wait_ms", 0..600_001, 10_000)?),
            connect_timeout: Duration::from_millis(cx.int(&f.connect_timeout_ms, "connect_timeout_ms", 1..600_001, 2000)?),
            max_packet: defaults.max_packet,
            sockets,
            kernel_relay: f.kernel_relay.unwrap_or(defaults.kernel_relay),
            kernel_fast_path: f.kernel_fast_path.unwrap_or(defaults.kernel_fast_path),
            tls,
            require_tls,
            backend_tls,
        };
        let threads = cx.int(&f.threads, "threads", 1..257, crate::router::default_threads() as i64)? as usize;
        let max_replication_lag = Duration::from_secs(cx.int(&f.max_replication_lag_s, "max_replication_lag_s", 0..86_401, 10)?);
        let mut monitor = f.monitor.as_ref().map(|m| m.get_ref().clone()).unwrap_or_default();
        if let Some(m) = &f.monitor {
            if let Err(e) = monitor.validate() {
                return cx.err(m.span(), e);
            }
            if m.get_ref().max_replication_lag_s != MonitorConfig::default().max_replication_lag_s && f.max_replication_lag_s.is_some() {
                return cx.err(m.span(), "set max_replication_lag_s at the top level or in [monitor], not both");
            }
        }
        monitor.tls = settings.backend_tls.clone();
        if f.max_replication_lag_s.is_some() || f.monitor.is_none() {
            monitor.max_replication_lag_s = Some(max_replication_lag.as_secs());
        }
        if f.user.is_empty() {
            return cx.err(0..0, "no [[user]]: clients log in with the accounts listed here");
        }
        let mut users = HashMap::new();
        for u in &f.user {
            let name = u.name.get_ref();
            if name.is_empty() || name.len() > 80 {
                return cx.err(u.name.span(), format!("user name {name:?} must have 1 to 80 characters"));
            }
            let stored = match (&u.password, &u.password_hash) {
                (Some(_), Some(h)) => return cx.err(h.span(), format!("user {name:?}: give password or password_hash, not both")),
                (None, None) => return cx.err(u.name.span(), format!("user {name:?}: password or password_hash is required (password = \"\" for none)")),
                (Some(p), None) => (!p.get_ref().is_empty()).then(|| protocol::native_stored_hash(p.get_ref().as_bytes())),
                (None, Some(h)) => Some(protocol::parse_native_hash(h.get_ref()).ok_or_else(|| ConfigError {
                    file: file.into(),
                    line: Some(cx.line_of(h.span().start)),
                    message: format!("user {name:?}: password_hash must be '*' and 40 hex digits, as SELECT PASSWORD('...') prints"),
                })?),
            };
            if users.insert(name.clone(), User { stored }).is_some() {
                return cx.err(u.name.span(), format!("user {name:?} is listed twice"));
            }
        }
        Ok(Config { listen, listen_socket, admin_listen, primary, replica, max_replication_lag, monitor, settings, users, threads })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses() {
        let c = Config::parse("ex.toml", EXAMPLE).unwrap();
        assert_eq!(c.listen, "127.0.0.1:3307".parse().unwrap());
        assert_eq!(c.replica, Some("127.0.0.1:33062".parse().unwrap()));
        assert_eq!(c.users.len(), 2);
        assert_eq!(c.users["app"].stored, Some(protocol::native_stored_hash(b"apppw")));
        assert!(c.settings.read_your_writes);
        assert_eq!(c.threads, crate::router::default_threads());
    }

    fn err_line(text: &str) -> (Option<usize>, String) {
        let e = Config::parse("t.toml", text).unwrap_err();
        (e.line, e.message)
    }

    #[test]
    fn errors_name_the_line() {
        let base = "listen = \"127.0.0.1:3307\"\nprimary = \"127.0.0.1:1\"\n";
        let users = "[[user]]\nname = \"a\"\npassword = \"b\"\n";
        let (line, msg) = err_line(&format!("{base}lisen = 3\n{users}"));
        assert_eq!(line, Some(3), "{msg}");
        assert!(msg.contains("lisen"), "{msg}");
        let (line, msg) = err_line(&format!("{base}replica = \"nowhere\"\n{users}"));
        assert_eq!(line, Some(3));
        assert!(msg.contains("not an address"), "{msg}");
        let (line, _) = err_line(&format!("{base}ryw_timeout_ms = -1\n{users}"));
        assert_eq!(line, Some(3));
        let (line, msg) = err_line(&format!("{base}threads = 0\n{users}"));
        assert_eq!(line, Some(3));
        assert!(msg.contains("threads"), "{msg}");
        assert_eq!(Config::parse("t.toml", &format!("{base}threads = 3\n{users}")).unwrap().threads, 3);
        let (line, msg) = err_line(&format!("{base}{users}[[user]]\nname = \"a\"\npassword_hash = \"*00\"\n"));
        assert_eq!(line, Some(8), "{msg}");
        let (line, msg) = err_line(&format!("{base}{users}[[user]]\nname = \"a\"\npassword = \"x\"\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("twice"), "{msg}");
        let (_, msg) = err_line(base);
        assert!(msg.contains("[[user]]"), "{msg}");
        let (line, msg) = err_line(&format!("{base}{users}[monitor]\ninterval_ms = 0\n"));
        assert_eq!(line, Some(6), "{msg}");
        assert!(msg.contains("interval_ms"), "{msg}");
        let (line, msg) = err_line(&format!("{base}{users}[monitor]\nintervall_ms = 5\n"));
        assert_eq!(line, Some(7), "{msg}");
        let (line, msg) = err_line(&format!("{base}listen_socket = \"rel.sock\"\n{users}"));
        assert_eq!(line, Some(3), "{msg}");
        assert!(msg.contains("absolute"), "{msg}");
        let (line, msg) = err_line(&format!("{base}{users}[sockets]\n\"127.0.0.1:2\" = \"/s\"\n"));
        assert_eq!(line, Some(7), "{msg}");
        assert!(msg.contains("neither the primary nor the replica"), "{msg}");
        let (line, msg) = err_line(&format!("{base}{users}[sockets]\n\"127.0.0.1:1\" = \"s\"\n"));
        assert_eq!(line, Some(7), "{msg}");
        assert!(msg.contains("absolute"), "{msg}");
        let c = Config::parse("t.toml", &format!("{base}listen_socket = \"/r.sock\"\n{users}[sockets]\n\"127.0.0.1:1\" = \"/p.sock\"\n")).unwrap();
        assert_eq!(c.listen_socket, Some(PathBuf::from("/r.sock")));
        assert_eq!(c.settings.sockets, [("127.0.0.1:1".parse().unwrap(), PathBuf::from("/p.sock"))].into());
    }

    #[test]
    fn tls_settings_are_checked_with_their_line() {
        let base = "listen = \"127.0.0.1:3307\"\nprimary = \"127.0.0.1:1\"\n";
        let users = "[[user]]\nname = \"a\"\npassword = \"b\"\n";
        let (line, msg) = err_line(&format!("{base}tls_cert = \"/c.pem\"\n{users}"));
        assert_eq!(line, Some(3), "{msg}");
        assert!(msg.contains("both or neither"), "{msg}");
        let (line, msg) = err_line(&format!("{base}require_tls = true\n{users}"));
        assert_eq!(line, Some(3), "{msg}");
        assert!(msg.contains("needs tls_cert"), "{msg}");
        let (line, msg) = err_line(&format!("{base}tls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n{users}"));
        assert_eq!(line, Some(3), "{msg}");
        assert!(msg.contains("/nonexistent/c.pem"), "{msg}");
        let (line, msg) = err_line(&format!("{base}tls_cert = \"c.pem\"\ntls_key = \"/k.pem\"\n{users}"));
        assert_eq!(line, Some(3), "{msg}");
        assert!(msg.contains("absolute"), "{msg}");

        let dir = std::env::temp_dir().join(format!("dbr-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let text = format!("{base}tls_cert = {:?}\ntls_key = {:?}\nrequire_tls = true\n{users}", cert.display().to_string(), key.display().to_string());
        let c = Config::parse("t.toml", &text).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.settings.tls.as_ref().map(|t| t.cert.clone()), Some(cert.clone()));
        assert!(c.settings.require_tls);

        // To the servers: a CA file, and optionally the name their certificates carry.
        let (line, msg) = err_line(&format!("{base}backend_tls_server_name = \"db\"\n{users}"));
        assert_eq!(line, Some(3), "{msg}");
        assert!(msg.contains("without backend_tls_ca"), "{msg}");
        let (line, msg) = err_line(&format!("{base}backend_tls_ca = \"/nonexistent/ca.pem\"\n{users}"));
        assert_eq!(line, Some(3), "{msg}");
        assert!(msg.contains("/nonexistent/ca.pem"), "{msg}");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        let ca = format!("backend_tls_ca = {:?}\n", cert.display().to_string());
        let (line, msg) = err_line(&format!("{base}{ca}backend_tls_server_name = \"not a name!\"\n{users}"));
        assert_eq!(line, Some(4), "{msg}");
        let c = Config::parse("t.toml", &format!("{base}{ca}{users}")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let b = c.settings.backend_tls.expect("backend TLS");
        assert_eq!((b.ca, b.server_name), (cert, None));
    }
}
