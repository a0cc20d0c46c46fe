//! Real MariaDB 10.11 servers for tests, `cargo xtask run` and benchmarks.
//!
//! - [`Instance`]: one `mariadbd` with its own directory (datadir, socket, pid file, error log,
//!   `my.cnf`) and port; `kill9()`, `stop()`, `start()` again on the same datadir; `Drop` kills
//!   it and removes the directory (unless [`Instance::keep`]).
//! - [`Pair`]: a primary and a replica with GTID replication (`gtid_strict_mode`), semi-sync
//!   replication with the `AFTER_SYNC` wait point and least-privilege accounts ([`REPL`],
//!   [`MONITOR`], [`APP`], [`SYSBENCH`]).
//!
//! Speed: `mariadb-install-db` takes 2–3 s, so each process initialises one template datadir
//! the first time it needs one and every instance starts from a copy of it (a copy plus a start
//! take a few hundred ms). The template is removed when the process exits.
//!
//! The API is blocking (`std::process`): call it from synchronous code, from `spawn_blocking`,
//! or from a multi-threaded tokio runtime (a blocking call on a current-thread runtime stalls
//! the tasks of that runtime for its duration).
//!
//! Statements run as root over the Unix socket through the `mariadb` command-line client:
//! setup runs a handful of statements, so a process per call is cheap enough, and the socket
//! works from outside a network namespace too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// An account created by [`Pair`] on the primary (and replicated to the replica).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Account {
    pub user: &'static str,
    pub password: &'static str,
    /// The only database the account has data rights on, if any.
    pub database: Option<&'static str>,
}

impl Account {
    /// A `mysql://` URL for this account at `addr` (mysql_async's `Opts::from_url`).
    pub fn url(&self, addr: SocketAddr) -> String {
        let mut url = format!("mysql://{}:{}@{}", self.user, self.password, addr);
        if let Some(db) = self.database {
            let _ = write!(url, "/{db}");
        }
        url
    }
}

/// Replication account: `REPLICATION SLAVE` only.
pub const REPL: Account = Account { user: "repl", password: "replpw", database: None };
/// The router's monitor: status and what failover needs, no data rights.
pub const MONITOR: Account = Account { user: "monitor", password: "monitorpw", database: None };
/// The application: all rights on [`APP_DB`] only; no `SUPER`, no `READ_ONLY ADMIN`, so it
/// cannot write to a `read_only` replica.
pub const APP: Account = Account { user: "app", password: "apppw", database: Some(APP_DB) };
/// sysbench: all rights on [`SYSBENCH_DB`] only.
pub const SYSBENCH: Account = Account { user: "sbtest", password: "sbpw", database: Some(SYSBENCH_DB) };
pub const APP_DB: &str = "app";
pub const SYSBENCH_DB: &str = "sbtest";

/// The monitor's global privileges (see [`MONITOR`]): stop/start/repoint replication and set
/// `gtid_slave_pos` (REPLICATION SLAVE ADMIN), fence and promote (READ_ONLY ADMIN), read
/// binlog and replica positions (BINLOG MONITOR, SLAVE MONITOR), see sessions (PROCESS),
/// `RESET SLAVE ALL` on promotion (RELOAD: MariaDB 10.11 requires it for RESET).
pub const MONITOR_PRIVILEGES: &str =
    "REPLICATION SLAVE ADMIN, READ_ONLY ADMIN, BINLOG MONITOR, SLAVE MONITOR, PROCESS, RELOAD";

#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("{program} not found on PATH or in /usr/sbin: install mariadb-server 10.11")]
    Missing { program: &'static str },
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("mariadb-install-db failed ({status}): {output}")]
    Install { status: ExitStatus, output: String },
    #[error("mariadbd in {dir} did not become ready: {reason}; error log tail:\n{log}")]
    NotReady { dir: PathBuf, reason: String, log: String },
    #[error("statement failed on {target}: {stmt}: {stderr}")]
    Sql { target: String, stmt: String, stderr: String },
    #[error("invalid tier configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Replication(String),
}

pub type Result<T, E = TierError> = std::result::Result<T, E>;

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> TierError {
    let action = action.into();
    move |source| TierError::Io { action, source }
}

/// Where the MariaDB programs are; `None` when one is missing.
struct Programs {
    mariadbd: PathBuf,
    install_db: PathBuf,
    client: PathBuf,
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn programs() -> Result<&'static Programs> {
    static PROGRAMS: OnceLock<Result<Programs, &'static str>> = OnceLock::new();
    let found = PROGRAMS.get_or_init(|| {
        Ok(Programs {
            mariadbd: find_program("mariadbd").ok_or("mariadbd")?,
            install_db: find_program("mariadb-install-db").ok_or("mariadb-install-db")?,
            client: find_program("mariadb").ok_or("mariadb")?,
        })
    });
    found.as_ref().map_err(|program| TierError::Missing { program })
}

/// Whether the MariaDB server and tools are installed.
pub fn prerequisites() -> Result<()> {
    programs().map(|_| ())
}

/// For tests that need MariaDB: `true` when it is installed. When it is not: panics if the
/// `CI` environment variable is set (a missing prerequisite is a failure there), else prints
/// why `test` is skipped and returns `false`.
pub fn available_or_skip(test: &str) -> bool {
    skip_or_fail(test, prerequisites(), std::env::var_os("CI").is_some())
}

fn skip_or_fail(test: &str, prerequisites: Result<()>, ci: bool) -> bool {
    match prerequisites {
        Ok(()) => true,
        Err(e) if ci => panic!("{test}: CI is set and {e}"),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            false
        }
    }
}

/// For tests: calls `f` every 50 ms until it returns `Some`, and panics naming `what` once
/// `deadline` has passed (a generous bound, not a timing assertion).
pub fn poll<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique, short directory name (Unix socket paths are limited to 107 bytes).
fn unique_dir(parent: &Path, kind: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent.join(format!("dbr-{kind}-{}-{n}", std::process::id()))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks whether the pid exists.
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Removes what processes that died without cleaning up (SIGKILL, Ctrl-C) left in `parent`:
/// `dbr-template-<pid>-<n>` of dead pids, and `dbr-db-<pid>-<n>` of dead pids whose server is
/// not running either (a running server is left alone).
fn sweep_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("dbr-") else { continue };
        let mut parts = rest.split('-');
        let (Some(kind), Some(pid), Some(_n), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        if pid_alive(pid) {
            continue;
        }
        let server_alive = || {
            fs::read_to_string(entry.path().join("mariadbd.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .is_some_and(pid_alive)
        };
        if kind == "template" || (kind == "db" && !server_alive()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// InnoDB sizes shared by the template and the instances copied from it (small: tests start
/// many servers; benchmarks raise the buffer pool with [`InstanceConfig::extra`]).
const INNODB_OPTIONS: &[&str] = &["innodb-log-file-size=16M", "innodb-buffer-pool-size=64M"];

static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

extern "C" fn remove_template() {
    if let Some(Ok(dir)) = TEMPLATE.get() {
        let _ = fs::remove_dir_all(dir.parent().unwrap_or(dir));
    }
}

/// The process-wide template datadir, initialised by `mariadb-install-db` on first use.
fn template() -> Result<&'static Path> {
    let programs = programs()?;
    let result = TEMPLATE.get_or_init(|| {
        sweep_stale(&std::env::temp_dir());
        let root = unique_dir(&std::env::temp_dir(), "template");
        let made = init_template(programs, &root).map_err(|e| {
            let _ = fs::remove_dir_all(&root);
            e.to_string()
        })?;
        // SAFETY: registering a plain extern "C" fn without captured state.
        unsafe { libc::atexit(remove_template) };
        Ok(made)
    });
    match result {
        Ok(dir) => Ok(dir),
        Err(e) => Err(TierError::Config(format!("template datadir: {e}"))),
    }
}

fn init_template(programs: &Programs, root: &Path) -> Result<PathBuf> {
    let data = root.join("data");
    fs::create_dir_all(&data).map_err(io_err(format!("create {}", data.display())))?;
    // Its own tmpdir, as for every instance: temporary tables of the bootstrap must not live
    // in a /tmp that other processes (and their clean-ups) share.
    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
    let cnf = root.join("my.cnf");
    let mut text = format!("[mariadbd]\ndatadir={}\ntmpdir={}\n", data.display(), tmp.display());
    for o in INNODB_OPTIONS {
        text.push_str(o);
        text.push('\n');
    }
    fs::write(&cnf, text).map_err(io_err(format!("write {}", cnf.display())))?;
    let mut cmd = Command::new(&programs.install_db);
    cmd.arg(format!("--defaults-file={}", cnf.display()))
        .args(["--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"])
        .stdin(Stdio::null());
    if is_root() {
        cmd.arg("--user=root");
    }
    let out = cmd.output().map_err(io_err("run mariadb-install-db"))?;
    if !out.status.success() {
        return Err(TierError::Install {
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(data)
}

fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// How to run one `mariadbd`.
#[derive(Clone, Debug)]
pub struct InstanceConfig {
    /// `bind-address`; default 127.0.0.1.
    pub bind: IpAddr,
    /// TCP port; 0 picks a free one (needs `bind` to be a local address of this namespace).
    pub port: u16,
    pub server_id: u32,
    /// Runs `prefix... mariadbd ...`, e.g. `["ip", "netns", "exec", "ns1"]`. The prefix must
    /// exec mariadbd (keep its pid), as `ip netns exec` does.
    pub command_prefix: Vec<String>,
    /// Extra `[mariadbd]` lines, e.g. `"max-connections=500"`.
    pub extra: Vec<String>,
    /// Directory that holds the instance's directory; default the system temp dir.
    pub parent_dir: Option<PathBuf>,
    /// Bounded wait for readiness (generous: the machine may be busy).
    pub ready_timeout: Duration,
    /// Leave the directory in place on drop (the process is still killed).
    pub keep: bool,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            server_id: 1,
            command_prefix: Vec::new(),
            extra: Vec::new(),
            parent_dir: None,
            ready_timeout: Duration::from_secs(60),
            keep: false,
        }
    }
}

/// One running (or stopped) `mariadbd`. Dropping it kills the process and removes its
/// directory.
#[derive(Debug)]
pub struct Instance {
    cfg: InstanceConfig,
    dir: PathBuf,
    port: u16,
    port_was_picked: bool,
    child: Option<Child>,
    pid: Option<i32>,
}

fn pick_port(bind: IpAddr) -> Result<u16> {
    let listener = TcpListener::bind((bind, 0)).map_err(|e| {
        TierError::Config(format!("cannot pick a free port on {bind} ({e}): give an explicit port"))
    })?;
    listener.local_addr().map(|a| a.port()).map_err(io_err("read a picked port"))
}

impl Instance {
    /// Creates the directory from the template datadir, writes `my.cnf` and starts the server.
    pub fn new(cfg: InstanceConfig) -> Result<Self> {
        let template = template()?;
        let parent = cfg.parent_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = unique_dir(&parent, "db");
        let port_was_picked = cfg.port == 0;
        let port = if port_was_picked { pick_port(cfg.bind)? } else { cfg.port };
        // sun_path holds 108 bytes including the terminating NUL.
        let socket_len = dir.join("mariadbd.sock").as_os_str().len();
        if socket_len > 107 {
            return Err(TierError::Config(format!(
                "the socket path under {} would be {socket_len} bytes (at most 107): use a shorter parent_dir",
                parent.display()
            )));
        }
        let mut inst = Instance { cfg, dir, port, port_was_picked, child: None, pid: None };
        // From here on, Drop removes the directory whatever fails.
        copy_dir(template, &inst.datadir())
            .map_err(io_err(format!("copy the template datadir to {}", inst.dir.display())))?;
        for attempt in 0.. {
            inst.write_cnf()?;
            match inst.start() {
                Err(TierError::NotReady { ref log, .. })
                    if inst.port_was_picked && attempt < 3 && log.contains("Address already in use") =>
                {
                    // Another process took the picked port between pick and bind.
                    inst.port = pick_port(inst.cfg.bind)?;
                }
                other => return other.map(|()| inst),
            }
        }
        unreachable!()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.cfg.bind, self.port)
    }

    /// An address clients connect to: `addr()`, with an unspecified bind address replaced by
    /// loopback.
    pub fn connect_addr(&self) -> SocketAddr {
        let ip = match self.cfg.bind {
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.port)
    }

    pub fn server_id(&self) -> u32 {
        self.cfg.server_id
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn datadir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("mariadbd.sock")
    }
    pub fn error_log(&self) -> PathBuf {
        self.dir.join("error.log")
    }
    fn cnf(&self) -> PathBuf {
        self.dir.join("my.cnf")
    }
    fn pid_file(&self) -> PathBuf {
        self.dir.join("mariadbd.pid")
    }
    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Keep the directory after drop (for post-mortems or a demo that outlives the process).
    pub fn keep(&mut self) {
        self.cfg.keep = true;
    }

    fn write_cnf(&self) -> Result<()> {
        let tmp = self.dir.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
        let mut text = String::from("[mariadbd]\n");
        let _ = writeln!(text, "datadir={}", self.datadir().display());
        let _ = writeln!(text, "tmpdir={}", tmp.display());
        let _ = writeln!(text, "socket={}", self.socket().display());
        let _ = writeln!(text, "pid-file={}", self.pid_file().display());
        let _ = writeln!(text, "log-error={}", self.error_log().display());
        let _ = writeln!(text, "bind-address={}", self.cfg.bind);
        let _ = writeln!(text, "port={}", self.port);
        let _ = writeln!(text, "server-id={}", self.cfg.server_id);
        if is_root() {
            text.push_str("user=root\n");
        }
        text.push_str("skip-name-resolve\nperformance-schema=OFF\n");
        for line in INNODB_OPTIONS.iter().copied().chain(self.cfg.extra.iter().map(String::as_str)) {
            if line.contains('\n') {
                return Err(TierError::Config(format!("extra option {line:?} spans lines")));
            }
            text.push_str(line);
            text.push('\n');
        }
        fs::write(self.cnf(), text).map_err(io_err(format!("write {}", self.cnf().display())))
    }

    /// Whether the server process is alive (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                self.pid = None;
                false
            }
            None => false,
        }
    }

    /// Starts the server on its existing datadir and waits until it accepts connections.
    /// Used after `stop()` or `kill9()` (e.g. an old primary coming back).
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Err(TierError::Config(format!("{} is already running", self.dir.display())));
        }
        let programs = programs()?;
        let _ = fs::remove_file(self.socket());
        let _ = fs::remove_file(self.pid_file());
        let log_start = fs::metadata(self.error_log()).map(|m| m.len()).unwrap_or(0);
        let mut cmd = match self.cfg.command_prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&programs.mariadbd);
                c
            }
            None => Command::new(&programs.mariadbd),
        };
        cmd.arg(format!("--defaults-file={}", self.cnf().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(io_err(format!("spawn {:?}", cmd.get_program())))?;
        self.pid = Some(child.id() as i32);
        self.child = Some(child);
        let deadline = Instant::now() + self.cfg.ready_timeout;
        loop {
            if !self.is_running() {
                return Err(self.not_ready("mariadbd exited", log_start));
            }
            if greeting_ok(&self.socket()) {
                break;
            }
            if Instant::now() > deadline {
                let reason = format!("no greeting on the socket within {:?}", self.cfg.ready_timeout);
                let err = self.not_ready(&reason, log_start);
                let _ = self.kill9();
                return Err(err);
            }
            std::thread::sleep(Duration::from_millis(15));
        }
        if let Some(pid) = fs::read_to_string(self.pid_file()).ok().and_then(|s| s.trim().parse().ok()) {
            self.pid = Some(pid);
        }
        Ok(())
    }

    fn not_ready(&self, reason: &str, log_start: u64) -> TierError {
        let log = fs::read(self.error_log()).unwrap_or_default();
        let new = &log[(log_start as usize).min(log.len())..];
        let text = String::from_utf8_lossy(new);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        TierError::NotReady { dir: self.dir.clone(), reason: reason.into(), log: tail }
    }

    fn signal(&self, sig: i32) {
        let child_pid = self.child.as_ref().map(|c| c.id() as i32);
        for pid in [self.pid, child_pid].into_iter().flatten() {
            // SAFETY: kill(2) with a pid we started; at worst ESRCH.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.take() {
            child.wait().map_err(io_err("reap mariadbd"))?;
        }
        self.wait_pid_gone(Duration::from_secs(10));
        self.pid = None;
        Ok(())
    }

    /// Stops the server where it stands (SIGSTOP): a hung server, whose connections stay
    /// open and unanswered. [`Instance::resume`] lets it go on; dropping the instance kills it
    /// either way.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Shuts the server down cleanly (SIGTERM), SIGKILL after a generous bounded wait.
    pub fn stop(&mut self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        self.signal(libc::SIGTERM);
        // A paused server (see `pause`) handles the SIGTERM once it runs again.
        self.signal(libc::SIGCONT);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.is_running() {
            if Instant::now() > deadline {
                return self.kill9();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait_pid_gone(Duration::from_secs(10));
        Ok(())
    }

    /// With a command prefix the server pid may differ from the child's: wait for it too.
    fn wait_pid_gone(&self, limit: Duration) {
        let Some(pid) = self.pid else { return };
        let deadline = Instant::now() + limit;
        // SAFETY: signal 0 only checks existence.
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs statements as root over the socket; returns the output, tab-separated columns and
    /// one line per row, without column names.
    pub fn sql(&self, stmts: &str) -> Result<String> {
        let mut cmd = Command::new(&programs()?.client);
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["--protocol=socket", "--user=root"]);
        run_client(cmd, stmts, &self.socket().display().to_string(), false)
    }

    /// Runs one query as root; rows as column name -> value (`NULL` as "NULL"). Values with
    /// tabs or newlines come back escaped (`\t`, `\n`) as the client prints them.
    pub fn rows(&self, query: &str) -> Result<Vec<BTreeMap<String, String>>> {
        let mut cmd = Command::new(&programs()?.client);
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["--protocol=socket", "--user=root"]);
        let out = run_client(cmd, query, &self.socket().display().to_string(), true)?;
        let mut lines = out.lines();
        let names: Vec<&str> = lines.next().map(|l| l.split('\t').collect()).unwrap_or_default();
        Ok(lines
            .map(|l| names.iter().zip(l.split('\t')).map(|(n, v)| (n.to_string(), v.to_string())).collect())
            .collect())
    }

    /// `SHOW SLAVE STATUS` as column name -> value; empty when this server is no replica.
    pub fn slave_status(&self) -> Result<BTreeMap<String, String>> {
        Ok(self.rows("SHOW SLAVE STATUS")?.into_iter().next().unwrap_or_default())
    }

    /// Runs statements as `account` over TCP (as an application would).
    pub fn sql_as(&self, account: &Account, stmts: &str) -> Result<String> {
        let addr = self.connect_addr();
        let mut cmd = Command::new(&programs()?.client);
        cmd.arg("--no-defaults")
            .args(["--protocol=tcp", "--skip-ssl"])
            .arg(format!("--host={}", addr.ip()))
            .arg(format!("--port={}", addr.port()))
            .arg(format!("--user={}", account.user))
            .arg(format!("--password={}", account.password));
        if let Some(db) = account.database {
            cmd.arg(format!("--database={db}"));
        }
        run_client(cmd, stmts, &format!("{}@{addr}", account.user), false)
    }

    /// The first column of the first row of `query` (as root); `NULL` comes back as "NULL".
    pub fn value(&self, query: &str) -> Result<String> {
        let out = self.sql(query)?;
        Ok(out.lines().next().unwrap_or("").split('\t').next().unwrap_or("").to_string())
    }

    /// A global status value (`SHOW GLOBAL STATUS LIKE name`), as root.
    pub fn status(&self, name: &str) -> Result<String> {
        let out = self.sql(&format!("SHOW GLOBAL STATUS LIKE '{name}'"))?;
        Ok(out.lines().next().and_then(|l| l.split('\t').nth(1)).unwrap_or("").to_string())
    }

    /// Makes this server a replica of `primary` (GTID `slave_pos`, retry every second) and
    /// starts replication. Also the rejoin of an old primary (whose `gtid_slave_pos` must
    /// first be set to its `gtid_binlog_pos`; this does that when it has written binlogs).
    pub fn replicate_from(&self, primary: SocketAddr) -> Result<()> {
        self.sql(&format!(
            "SET GLOBAL read_only=ON; STOP SLAVE; \
             SET GLOBAL gtid_slave_pos=IF(@@gtid_binlog_pos='', @@gtid_slave_pos, @@gtid_binlog_pos); \
             CHANGE MASTER TO MASTER_HOST='{}', MASTER_PORT={}, MASTER_USER='{}', \
             MASTER_PASSWORD='{}', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1, \
             MASTER_HEARTBEAT_PERIOD=1; START SLAVE;",
            primary.ip(),
            primary.port(),
            REPL.user,
            REPL.password
        ))
        .map(drop)
    }
}

fn run_client(mut cmd: Command, stmts: &str, target: &str, column_names: bool) -> Result<String> {
    cmd.args(["--batch", "--connect-timeout=10"]);
    if !column_names {
        cmd.arg("--skip-column-names");
    }
    cmd
        .arg(format!("--execute={stmts}"))
        .stdin(Stdio::null());
    let out = cmd.output().map_err(io_err("run the mariadb client"))?;
    if !out.status.success() {
        return Err(TierError::Sql {
            target: target.to_string(),
            stmt: stmts.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True once the server sends its handshake (protocol version 10) on the socket.
fn greeting_ok(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 5];
    s.read_exact(&mut head).is_ok() && head[4] == 10
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.kill9();
        if !self.cfg.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// How to build a [`Pair`]. `server_id`s are set by the pair (1 and 2).
#[derive(Clone, Debug)]
pub struct PairConfig {
    pub primary: InstanceConfig,
    pub replica: InstanceConfig,
    /// `rpl_semi_sync_master_timeout`: how long a commit waits for the replica's ack before
    /// the primary falls back to asynchronous replication.
    pub semi_sync_timeout: Duration,
    /// `slave_net_timeout`: how long a replica waits on a silent primary connection.
    pub replica_net_timeout: Duration,
}

impl Default for PairConfig {
    fn default() -> Self {
        Self {
            primary: InstanceConfig::default(),
            replica: InstanceConfig::default(),
            semi_sync_timeout: Duration::from_secs(5),
            replica_net_timeout: Duration::from_secs(4),
        }
    }
}

/// Options both servers get, so either can be the primary after a failover.
fn replication_options(cfg: &PairConfig) -> Vec<String> {
    let mut v: Vec<String> = [
        "log-bin=mariadb-bin",
        "log-bin-index=mariadb-bin.index",
        "relay-log=relay-bin",
        "relay-log-index=relay-bin.index",
        "log-slave-updates=ON",
        "binlog-format=ROW",
        "gtid-strict-mode=ON",
        "rpl-semi-sync-master-enabled=ON",
        "rpl-semi-sync-slave-enabled=ON",
        "rpl-semi-sync-master-wait-point=AFTER_SYNC",
        // With no semi-sync replica connected (e.g. just after a failover) commit at once
        // instead of waiting `semi_sync_timeout` for an ack that cannot come.
        "rpl-semi-sync-master-wait-no-slave=OFF",
    ]
    .map(String::from)
    .to_vec();
    v.push(format!("rpl-semi-sync-master-timeout={}", cfg.semi_sync_timeout.as_millis()));
    v.push(format!("slave-net-timeout={}", cfg.replica_net_timeout.as_secs().max(1)));
    v
}

/// A primary and a replica. Fields are public so tests can kill, restart or swap them.
#[derive(Debug)]
pub struct Pair {
    pub primary: Instance,
    pub replica: Instance,
}

impl Pair {
    /// A pair on 127.0.0.1 with free ports.
    pub fn start_default() -> Result<Self> {
        Self::new(PairConfig::default())
    }

    pub fn new(cfg: PairConfig) -> Result<Self> {
        let repl = replication_options(&cfg);
        let mut pc = cfg.primary.clone();
        pc.server_id = 1;
        pc.extra.splice(0..0, repl.iter().cloned());
        let mut rc = cfg.replica.clone();
        rc.server_id = 2;
        rc.extra.splice(0..0, repl);
        // Template first (once), then both servers start side by side.
        template()?;
        let (primary, replica) = std::thread::scope(|s| {
            let p = s.spawn(|| Instance::new(pc));
            let r = Instance::new(rc);
            (p.join().expect("primary start thread panicked"), r)
        });
        let (primary, replica) = (primary?, replica?);
        primary.sql(&setup_sql())?;
        replica.replicate_from(primary.connect_addr())?;
        let pair = Pair { primary, replica };
        pair.wait_caught_up(Duration::from_secs(60))?;
        pair.wait_semi_sync(Duration::from_secs(60))?;
        Ok(pair)
    }

    /// Waits until the replica has applied everything the primary has binlogged
    /// (`MASTER_GTID_WAIT` on the primary's `gtid_binlog_pos`).
    pub fn wait_caught_up(&self, timeout: Duration) -> Result<()> {
        wait_caught_up(&self.primary, &self.replica, timeout)
    }

    /// Waits until the primary has a semi-sync replica connected
    /// (`Rpl_semi_sync_master_clients` >= 1), so commits wait for its ack.
    pub fn wait_semi_sync(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let clients: u32 = self.primary.status("Rpl_semi_sync_master_clients")?.parse().unwrap_or(0);
            if clients >= 1 && self.primary.status("Rpl_semi_sync_master_status")? == "ON" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TierError::Replication(format!(
                    "no semi-sync replica on the primary within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Holds replication back: the replica keeps receiving (and acking) but stops applying.
    pub fn stop_replica_sql(&self) -> Result<()> {
        self.replica.sql("STOP SLAVE SQL_THREAD").map(drop)
    }

    pub fn start_replica_sql(&self) -> Result<()> {
        self.replica.sql("START SLAVE SQL_THREAD").map(drop)
    }
}

/// Waits until `replica` has applied `primary`'s `gtid_binlog_pos` (bounded by `timeout`).
pub fn wait_caught_up(primary: &Instance, replica: &Instance, timeout: Duration) -> Result<()> {
    let pos = primary.value("SELECT @@gtid_binlog_pos")?;
    if pos.is_empty() {
        return Ok(());
    }
    let got = replica.value(&format!("SELECT MASTER_GTID_WAIT('{pos}', {})", timeout.as_secs_f64()))?;
    if got == "0" {
        Ok(())
    } else {
        Err(TierError::Replication(format!(
            "replica {} did not apply {pos} within {timeout:?} (MASTER_GTID_WAIT returned {got})",
            replica.addr()
        )))
    }
}

/// Accounts and databases, run on the primary and replicated.
fn setup_sql() -> String {
    let mut s = String::from("DROP USER IF EXISTS ''@'localhost';\n");
    let create = |s: &mut String, a: &Account| {
        let _ = writeln!(s, "CREATE USER '{}'@'%' IDENTIFIED BY '{}';", a.user, a.password);
    };
    create(&mut s, &REPL);
    let _ = writeln!(s, "GRANT REPLICATION SLAVE ON *.* TO '{}'@'%';", REPL.user);
    create(&mut s, &MONITOR);
    let _ = writeln!(s, "GRANT {MONITOR_PRIVILEGES} ON *.* TO '{}'@'%';", MONITOR.user);
    for a in [APP, SYSBENCH] {
        let db = a.database.expect("data accounts have a database");
        let _ = writeln!(s, "CREATE DATABASE {db};");
        create(&mut s, &a);
        let _ = writeln!(s, "GRANT ALL PRIVILEGES ON {db}.* TO '{}'@'%';", a.user);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_url_includes_database_only_when_set() {
        let addr: SocketAddr = "127.0.0.1:3307".parse().unwrap();
        assert_eq!(APP.url(addr), "mysql://app:apppw@127.0.0.1:3307/app");
        assert_eq!(MONITOR.url(addr), "mysql://monitor:monitorpw@127.0.0.1:3307");
    }

    #[test]
    fn setup_grants_no_global_rights_to_data_accounts() {
        let sql = setup_sql();
        for a in [APP, SYSBENCH] {
            let grant = sql.lines().find(|l| l.starts_with("GRANT") && l.contains(&format!("'{}'@", a.user))).unwrap();
            assert!(grant.contains(&format!(" ON {}.* ", a.database.unwrap())), "{grant}");
        }
        assert!(!sql.contains("SUPER"));
    }

    #[test]
    fn sweep_removes_leftovers_of_dead_processes_only() {
        let parent = std::env::temp_dir().join(format!("dbr-sweep-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&parent);
        // A pid that is not running: beyond any pid_max.
        let dead = 1 << 23;
        let mine = std::process::id();
        let names = [
            format!("dbr-template-{dead}-0"),
            format!("dbr-db-{dead}-1"),
            format!("dbr-db-{dead}-2"),
            format!("dbr-db-{mine}-3"),
            format!("dbr-template-{mine}-4"),
            "dbr-unrelated".to_string(),
        ];
        for n in &names {
            fs::create_dir_all(parent.join(n)).unwrap();
        }
        // dbr-db-{dead}-2's server still runs (this process stands in for it).
        fs::write(parent.join(&names[2]).join("mariadbd.pid"), format!("{mine}\n")).unwrap();
        sweep_stale(&parent);
        let left: Vec<bool> = names.iter().map(|n| parent.join(n).exists()).collect();
        fs::remove_dir_all(&parent).unwrap();
        assert_eq!(left, [false, false, true, true, true, true]);
    }

    #[test]
    fn missing_mariadb_skips_locally_and_fails_under_ci() {
        let missing = || Err(TierError::Missing { program: "mariadbd" });
        assert!(skip_or_fail("t", Ok(()), true));
        assert!(!skip_or_fail("t", missing(), false));
        let under_ci = std::panic::catch_unwind(|| skip_or_fail("t", missing(), true));
        let msg = under_ci.expect_err("fails under CI");
        let msg = msg.downcast_ref::<String>().expect("panic message");
        assert!(msg.contains("CI is set") && msg.contains("mariadbd not found"), "{msg}");
    }

    #[test]
    fn unique_dirs_differ_and_are_short() {
        let a = unique_dir(Path::new("/tmp"), "db");
        let b = unique_dir(Path::new("/tmp"), "db");
        assert_ne!(a, b);
        assert!(a.join("mariadbd.sock").as_os_str().len() < 100);
    }
}
