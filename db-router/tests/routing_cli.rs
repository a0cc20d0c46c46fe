//! The `db-router` binary: `check-config`, `--help`, and `run` in front of a real pair with the
//! `mariadb` CLI as the client and `/metrics` on the admin address.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use db_router::tier::{self, Pair};

const BIN: &str = env!("CARGO_BIN_EXE_db-router");

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("dbr-cli-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, killed on drop.
struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn check(text: &str) -> (bool, String) {
    let dir = TempDir::new("check");
    let path = dir.0.join("router.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn check_config_accepts_the_help_example_and_names_the_line_of_errors() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let example = help.split("Example configuration (router.toml):").nth(1).expect("--help shows an example");
    let (ok, out) = check(example);
    assert!(ok, "the --help example is valid: {out}");

    let (ok, out) = check("listen = \"127.0.0.1:3307\"\nprimary = \"127.0.0.1:1\"\nreplicas = \"x\"\n");
    assert!(!ok);
    assert!(out.contains("line 3") && out.contains("replicas"), "{out}");
    let (ok, out) = check("listen = \"127.0.0.1:3307\"\nprimary = \"localhost\"\n[[user]]\nname = \"a\"\npassword = \"\"\n");
    assert!(!ok);
    assert!(out.contains("line 2") && out.contains("not an address"), "{out}");
    let missing = Command::new(BIN).args(["check-config", "--config", "/nonexistent/router.toml"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read"));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn run_serves_the_mariadb_cli_and_metrics() {
    if !tier::available_or_skip("run_serves_the_mariadb_cli_and_metrics") {
        return;
    }
    let pair = Pair::start_default().expect("start a primary/replica pair");
    let dir = TempDir::new("run");
    let (port, admin_port) = (free_port(), free_port());
    let sock = dir.0.join("router.sock");
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nlisten_socket = \"{}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nprimary = \"{}\"\nreplica = \"{}\"\n\n[[user]]\nname = \"app\"\npassword = \"apppw\"\n\n[monitor]\ninterval_ms = 100\n",
        sock.display(),
        pair.primary.connect_addr(),
        pair.replica.connect_addr()
    );
    let path = dir.0.join("router.toml");
    std::fs::write(&path, config).unwrap();
    let mut router = Running(Command::new(BIN).args(["run", "--config"]).arg(&path).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mariadb = |sql: &str| {
        Command::new("mariadb")
            .args(["--no-defaults", "--protocol=tcp", "--skip-ssl", "-h127.0.0.1", "--batch", "--skip-column-names"])
            .arg(format!("-P{port}"))
            .args(["-uapp", "-papppw", "app", "-e", sql])
            .output()
            .unwrap()
    };
    // Wait (bounded) until the router serves and the monitor has published a readable replica.
    loop {
        let out = mariadb("SELECT @@server_id");
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "2" {
            break;
        }
        assert!(Instant::now() < deadline, "router never served a read from the replica: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = mariadb("CREATE TABLE t (id INT PRIMARY KEY); INSERT INTO t VALUES (1), (2); SELECT COUNT(*) FROM t");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    let metrics = http_get(admin, "/metrics").expect("admin answers");
    assert!(metrics.contains("db_router_statements_total{target=\"replica\"}"), "{metrics}");
    assert!(metrics.contains("db_router_sessions_total"), "{metrics}");
    // The admin commands of the CLI: status names both backends; rejoin with nothing fenced
    // is refused with the reason and a non-zero exit.
    let cli = |args: &[&str]| Command::new(BIN).args(args).arg("--admin").arg(admin.to_string()).output().unwrap();
    let status = cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(text.contains(&pair.primary.addr().to_string()) && text.contains(&pair.replica.addr().to_string()), "{text}");
    let rejoin = cli(&["rejoin"]);
    let err = String::from_utf8_lossy(&rejoin.stderr);
    assert!(!rejoin.status.success() && err.contains("409"), "rejoin with nothing to rejoin: {err}");

    // listen_socket: the same router on its Unix socket.
    let out = Command::new("mariadb")
        .args(["--no-defaults", "--protocol=socket", "--batch", "--skip-column-names"])
        .arg(format!("--socket={}", sock.display()))
        .args(["-uapp", "-papppw", "app", "-e", "SELECT COUNT(*) FROM t"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    // SIGTERM: the router stops and removes its socket file.
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(router.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while router.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "router did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!sock.exists(), "the router removes its socket file when it stops");
}
