//! The router against real MariaDB (a primary/replica pair from `db_router::tier`). Routing is
//! proven by the servers' own counters (`SHOW GLOBAL STATUS`), not by the router's word.
//! Without MariaDB these skip with a printed reason, or fail when `CI` is set.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use db_router::{
    monitor::{Monitor, MonitorConfig, MonitorHandle},
    protocol,
    router::{self, Metrics, Settings, Shared, User},
    tier::{self, Instance, Pair, PairConfig, APP, SYSBENCH},
    topology::{self, Publisher, Routing},
};
use mysql_async::{prelude::*, ChangeUserOpts, Conn, Opts};
use prometheus_client::registry::Registry;

const DEADLINE: Duration = Duration::from_secs(60);

/// A pair plus a router in front of it, on its own runtime; all of it goes away on drop.
struct Rig {
    // Field order: the runtime (router tasks, client sockets) stops before the servers do.
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    /// The in-kernel read relay loaded (root, a kernel with sockmap).
    kernel: bool,
    /// The in-kernel fast path for prepared reads loaded.
    fast: bool,
    /// The routing view's publisher, or the monitor that owns it (it runs while the handle lives).
    _publisher: Result<Publisher, MonitorHandle>,
    pair: Pair,
}

fn users() -> HashMap<String, User> {
    [APP, SYSBENCH]
        .iter()
        .map(|a| (a.user.to_string(), User { stored: Some(protocol::native_stored_hash(a.password.as_bytes())) }))
        .collect()
}

fn rig(test: &str, settings: Settings) -> Option<Rig> {
    rig_with(test, settings, None)
}

/// With `monitor`, the tier's monitor watches the pair and publishes the routing view.
fn rig_with(test: &str, settings: Settings, monitor: Option<MonitorConfig>) -> Option<Rig> {
    rig_pair(test, settings, monitor, PairConfig::default())
}

fn rig_pair(test: &str, settings: Settings, monitor: Option<MonitorConfig>, pair: PairConfig) -> Option<Rig> {
    if !tier::available_or_skip(test) {
        return None;
    }
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).try_init();
    let pair = Pair::new(pair).expect("start a primary/replica pair");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let (publisher, subscriber) = topology::channel(Routing {
        primary: Some(pair.primary.connect_addr()),
        replica: Some(pair.replica.connect_addr()),
        generation: 1,
        down: Vec::new(),
    });
    let shared = Shared::new(users(), settings, metrics.clone(), subscriber);
    let kernel = shared.kernel.get().is_some();
    let fast = shared.fast.get().is_some();
    let addr = rt.block_on(router::spawn("127.0.0.1:0".parse().unwrap(), shared)).expect("router listens");
    let publisher = match monitor {
        Some(cfg) => {
            let backends = vec![pair.primary.connect_addr(), pair.replica.connect_addr()];
            let _guard = rt.enter();
            Err(Monitor::spawn(cfg, backends, publisher, &mut registry))
        }
        None => Ok(publisher),
    };
    Some(Rig { rt, addr, metrics, kernel, fast, _publisher: publisher, pair })
}

impl Rig {
    /// `prefer_socket=false`: otherwise mysql_async asks `@@socket` and reconnects over the
    /// Unix socket of whichever server answered, around the router.
    fn url(&self) -> String {
        format!("{}?prefer_socket=false", APP.url(self.addr))
    }
    async fn conn(&self) -> Conn {
        Conn::new(Opts::from_url(&self.url()).unwrap()).await.expect("connect through the router")
    }
}

fn counter(inst: &Instance, name: &str) -> i64 {
    inst.status(name).expect("SHOW GLOBAL STATUS").parse().unwrap_or_else(|_| panic!("{name} is a number"))
}

/// Server-side counters of both servers, for deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    p_select: i64,
    r_select: i64,
    p_insert: i64,
    p_exec: i64,
    r_exec: i64,
}

fn counts(pair: &Pair) -> Counts {
    Counts {
        p_select: counter(&pair.primary, "Com_select"),
        r_select: counter(&pair.replica, "Com_select"),
        p_insert: counter(&pair.primary, "Com_insert"),
        p_exec: counter(&pair.primary, "Com_stmt_execute"),
        r_exec: counter(&pair.replica, "Com_stmt_execute"),
    }
}

fn delta(before: Counts, after: Counts) -> Counts {
    Counts {
        p_select: after.p_select - before.p_select,
        r_select: after.r_select - before.r_select,
        p_insert: after.p_insert - before.p_insert,
        p_exec: after.p_exec - before.p_exec,
        r_exec: after.r_exec - before.r_exec,
    }
}

fn no_ryw() -> Settings {
    Settings { read_your_writes: false, ..Settings::default() }
}

#[test]
fn statements_go_where_they_belong() {
    let Some(rig) = rig("statements_go_where_they_belong", no_ryw()) else { return };
    let pair = &rig.pair;
    pair.primary.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT, v INT) ENGINE=InnoDB").unwrap();
    pair.wait_caught_up(DEADLINE).unwrap();
    rig.rt.block_on(async {
        let mut c = rig.conn().await;
        // Warm up: the session opens its backend connections.
        c.query_drop("SELECT 1").await.unwrap();
        c.query_drop("INSERT INTO t (v) VALUES (0)").await.unwrap();

        let before = counts(pair);
        for i in 0..20 {
            let v: Option<i64> = c.query_first(format!("SELECT {i} + 1")).await.unwrap();
            assert_eq!(v, Some(i + 1));
        }
        assert_eq!(delta(before, counts(pair)), Counts { p_select: 0, r_select: 20, p_insert: 0, p_exec: 0, r_exec: 0 });

        let before = counts(pair);
        for i in 0..10 {
            c.query_drop(format!("insert into t (v) values ({i})")).await.unwrap();
        }
        let d = delta(before, counts(pair));
        assert_eq!((d.p_insert, d.r_select, d.p_select), (10, 0, 0));

        // Locking reads, primary-only functions, transactions: primary.
        let before = counts(pair);
        c.query_drop("SELECT * FROM t WHERE id = 1 FOR UPDATE").await.unwrap();
        c.query_drop("SELECT v FROM t LOCK IN SHARE MODE").await.unwrap();
        let id: Option<u64> = c.query_first("SELECT LAST_INSERT_ID()").await.unwrap();
        assert!(id.unwrap() > 0, "LAST_INSERT_ID comes from the primary connection that inserted");
        c.query_drop("BEGIN").await.unwrap();
        c.query_drop("SELECT COUNT(*) FROM t").await.unwrap();
        c.query_drop("COMMIT").await.unwrap();
        c.query_drop("START TRANSACTION").await.unwrap();
        c.query_drop("SELECT COUNT(*) FROM t").await.unwrap();
        c.query_drop("ROLLBACK").await.unwrap();
        c.query_drop("/* a comment */ SELECT GET_LOCK('x', 1)").await.unwrap();
        c.query_drop("SELECT RELEASE_LOCK('x')").await.unwrap();
        let d = delta(before, counts(pair));
        assert_eq!((d.p_select, d.r_select), (7, 0), "{d:?}");

        // autocommit off: everything on the primary until it is back on.
        let before = counts(pair);
        c.query_drop("SET autocommit = 0").await.unwrap();
        c.query_drop("SELECT COUNT(*) FROM t").await.unwrap();
        c.query_drop("INSERT INTO t (v) VALUES (100)").await.unwrap();
        c.query_drop("COMMIT").await.unwrap();
        c.query_drop("SELECT COUNT(*) FROM t").await.unwrap();
        c.query_drop("SET autocommit = 1").await.unwrap();
        c.query_drop("SELECT 1").await.unwrap();
        let d = delta(before, counts(pair));
        assert_eq!((d.p_select, d.r_select), (2, 1), "{d:?}");

        // A read-only transaction may run on the replica.
        let before = counts(pair);
        c.query_drop("START TRANSACTION READ ONLY").await.unwrap();
        c.query_drop("SELECT COUNT(*) FROM t").await.unwrap();
        c.query_drop("SELECT MAX(id) FROM t").await.unwrap();
        c.query_drop("COMMIT").await.unwrap();
        let d = delta(before, counts(pair));
        assert_eq!((d.p_select, d.r_select), (0, 2), "{d:?}");

        // Multi-statements: primary, all results relayed.
        let before = counts(pair);
        let rows: Vec<i64> = c.query("SELECT 1; SELECT 2").await.unwrap();
        assert_eq!(rows, vec![1], "mysql_async returns the first result set");
        let d = delta(before, counts(pair));
        assert_eq!((d.p_select, d.r_select), (2, 0), "{d:?}");
        // The connection is still in step after a multi-result.
        let v: Option<i64> = c.query_first("SELECT 41 + 1").await.unwrap();
        assert_eq!(v, Some(42));
        // A multi-statement that sets session state keeps the session on the primary.
        c.query_drop("SET time_zone = '+03:00'; SELECT 1").await.unwrap();
        let before = counts(pair);
        let tz: Option<String> = c.query_first("SELECT @@session.time_zone").await.unwrap();
        assert_eq!(tz.as_deref(), Some("+03:00"));
        assert_eq!(delta(before, counts(pair)).p_select, 1);
        c.disconnect().await.unwrap();
    });
    let text = format!("{:?}", rig.metrics.to_replica.get());
    assert!(rig.metrics.to_replica.get() >= 23, "{text}");
}

#[test]
fn session_state_behaves_as_on_a_direct_connection() {
    let Some(rig) = rig("session_state_behaves_as_on_a_direct_connection", no_ryw()) else { return };
    let pair = &rig.pair;
    pair.primary.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))").unwrap();
    pair.wait_caught_up(DEADLINE).unwrap();
    rig.rt.block_on(async {
        let mut c = rig.conn().await;
        // SET before any read: the replica connection opened later gets it replayed.
        c.query_drop("SET SESSION time_zone = '+05:00', @greeting = 'hi'").await.unwrap();
        c.query_drop("INSERT INTO t VALUES (1, 'one')").await.unwrap();
        let before = counts(pair);
        let tz: Option<String> = c.query_first("SELECT @@session.time_zone").await.unwrap();
        assert_eq!(tz.as_deref(), Some("+05:00"));
        let d = delta(before, counts(pair));
        assert_eq!((d.p_select, d.r_select), (0, 1), "the read ran on the replica: {d:?}");
        let g: Option<String> = c.query_first("SELECT @greeting").await.unwrap();
        assert_eq!(g.as_deref(), Some("hi"));

        // USE reaches both connections.
        c.query_drop("USE information_schema").await.unwrap();
        let before = counts(pair);
        let db: Option<String> = c.query_first("SELECT DATABASE()").await.unwrap();
        assert_eq!(db.as_deref(), Some("information_schema"));
        assert_eq!(delta(before, counts(pair)).r_select, 1);
        c.query_drop("USE app").await.unwrap();
        c.query_drop("INSERT INTO t VALUES (2, 'two')").await.unwrap();

        // Prepared statements: a read executes on the replica, a write on the primary.
        let before = counts(pair);
        let v: Option<String> = c.exec_first("SELECT v FROM t WHERE id = ?", (1,)).await.unwrap();
        assert_eq!(v.as_deref(), Some("one"));
        let v: Option<i64> = c.exec_first("SELECT ? + ?", (40, 2)).await.unwrap();
        assert_eq!(v, Some(42));
        c.exec_drop("INSERT INTO t VALUES (?, ?)", (3, "three")).await.unwrap();
        c.exec_drop("UPDATE t SET v = ? WHERE id = ?", ("THREE", 3)).await.unwrap();
        let d = delta(before, counts(pair));
        assert_eq!((d.r_exec, d.p_exec), (2, 2), "{d:?}");
        // The same prepared read again (mysql_async caches the statement: no new-params-bound).
        let v: Option<String> = c.exec_first("SELECT v FROM t WHERE id = ?", (2,)).await.unwrap();
        assert_eq!(v.as_deref(), Some("two"));

        // Temporary tables pin the session to the primary.
        c.query_drop("CREATE TEMPORARY TABLE tmp (x INT)").await.unwrap();
        c.query_drop("INSERT INTO tmp VALUES (7)").await.unwrap();
        let before = counts(pair);
        let x: Option<i64> = c.query_first("SELECT x FROM tmp").await.unwrap();
        assert_eq!(x, Some(7));
        let n: Option<i64> = c.query_first("SELECT COUNT(*) FROM t").await.unwrap();
        assert_eq!(n, Some(3));
        let d = delta(before, counts(pair));
        assert_eq!((d.p_select, d.r_select), (2, 0), "{d:?}");

        // Errors from the server reach the client and the session goes on.
        let e = c.query_drop("SELECT * FROM no_such_table").await.unwrap_err();
        assert!(e.to_string().contains("no_such_table"), "{e}");
        let e = c.query_drop("INSERT INTO t VALUES (1, 'dup')").await.unwrap_err();
        assert!(e.to_string().contains("Duplicate"), "{e}");
        // COM_RESET_CONNECTION clears the pin and the variables.
        c.reset().await.unwrap();
        let before = counts(pair);
        let g: Option<Option<String>> = c.query_first("SELECT @@session.time_zone = '+05:00'").await.unwrap();
        assert_eq!(g, Some(Some("0".into())));
        assert_eq!(delta(before, counts(pair)).r_select, 1);
        c.disconnect().await.unwrap();
    });
}

/// A directory of test files (certificates), removed when the test ends, also when it fails.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        TempDir(std::env::temp_dir().join(format!("{name}-{}", std::process::id())))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// TLS for clients: the `mariadb` CLI checks the router's certificate against the CA that
/// signed it and runs statements over TLS (its `\s` status shows the cipher; reads still go to
/// the replica); with `require_tls` a plain client is refused with the error for it, and a
/// client that trusts another CA refuses the router's certificate.
#[test]
fn mariadb_cli_over_tls_and_require_tls() {
    let tmp = TempDir::new("dbr-tls-test");
    let dir = &tmp.0;
    let certs = web_app::devcert::generate(&dir.join("router"), &["127.0.0.1"]).unwrap();
    let other_ca = web_app::devcert::generate(&dir.join("other"), &["127.0.0.1"]).unwrap().ca_cert;
    let tls = db_router::tls::Tls::load(&certs.cert, &certs.key).unwrap();
    let settings = Settings { tls: Some(tls), require_tls: true, ..no_ryw() };
    let Some(rig) = rig("mariadb_cli_over_tls_and_require_tls", settings) else { return };
    let cli = |tls: &[String], sql: &str| {
        std::process::Command::new("mariadb")
            .args(["--no-defaults", "--protocol=tcp", "-h127.0.0.1"])
            .arg(format!("-P{}", rig.addr.port()))
            .args(tls)
            .args(["-uapp", "-papppw", "app", "--batch", "-e", sql])
            .output()
            .expect("run mariadb")
    };
    let trusting = |ca: &std::path::Path| vec!["--ssl".to_string(), format!("--ssl-ca={}", ca.display()), "--ssl-verify-server-cert".to_string()];

    let before = counts(&rig.pair);
    let out = cli(&trusting(&certs.ca_cert), "SELECT @@server_id; \\s");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("@@server_id\n2\n"), "{stdout}");
    assert!(stdout.contains("Cipher in use is TLS"), "{stdout}");
    assert!(delta(before, counts(&rig.pair)).r_select >= 1);
    assert!(rig.metrics.tls_sessions.get() >= 1);

    let out = cli(&["--skip-ssl".to_string()], "SELECT 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("3159") && stderr.contains("requires TLS"), "{stderr}");

    let out = cli(&trusting(&other_ca), "SELECT 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("2026"), "a CA that did not sign the router's certificate: {stderr}");
    // The servers stop (the rig) before their certificate files go (`tmp`).
    drop(rig);
}

/// TLS from the router to the servers (`backend_tls_ca`): both servers offer TLS with a
/// certificate for 127.0.0.1 from a test CA; the monitor checks them over TLS (before any
/// client came, the replica counts accepted TLS connections), and every backend connection
/// of a session (the replica's for reads, the primary's for a transaction) runs TLS 1.3,
/// which each server reports for the connection itself. A router that trusts another CA
/// refuses the servers.
#[test]
fn the_router_reaches_the_servers_over_tls() {
    let tmp = TempDir::new("dbr-backend-tls");
    let dir = &tmp.0;
    let certs = web_app::devcert::generate(&dir.join("db"), &["127.0.0.1"]).unwrap();
    let other_ca = web_app::devcert::generate(&dir.join("other"), &["127.0.0.1"]).unwrap().ca_cert;
    let mut pair = PairConfig::default();
    let ssl = vec![
        format!("ssl-cert={}", certs.cert.display()),
        format!("ssl-key={}", certs.key.display()),
        format!("ssl-ca={}", certs.ca_cert.display()),
    ];
    pair.primary.extra.extend(ssl.iter().cloned());
    pair.replica.extra.extend(ssl);
    let backend_tls = Some(db_router::tls::BackendTls::load(&certs.ca_cert, None).unwrap());
    let monitor = MonitorConfig { interval_ms: 100, tls: backend_tls.clone(), ..MonitorConfig::default() };
    let settings = Settings { backend_tls, ..no_ryw() };
    let Some(rig) = rig_pair("the_router_reaches_the_servers_over_tls", settings, Some(monitor), pair) else { return };
    // The monitor account may only log in over TLS from now on; its connections are cut,
    // and it must come back (over TLS) to both servers.
    rig.pair.primary.sql("ALTER USER 'monitor'@'%' REQUIRE SSL").unwrap();
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    let monitor_ids = |inst: &Instance| -> Vec<String> {
        inst.sql("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'monitor'").unwrap().lines().map(str::to_string).collect()
    };
    for inst in [&rig.pair.primary, &rig.pair.replica] {
        for id in monitor_ids(inst) {
            let _ = inst.sql(&format!("KILL {id}"));
        }
    }
    let Err(handle) = &rig._publisher else { unreachable!("with a monitor") };
    let rounds = handle.status().rounds;
    poll("the monitor back on both servers over TLS", || {
        let back = [&rig.pair.primary, &rig.pair.replica].iter().all(|i| !monitor_ids(i).is_empty());
        (back && handle.status().rounds > rounds + 3 && rig.pair.replica.status("Ssl_accepts").ok()? != "0").then_some(())
    });
    let routing = handle.status();
    assert!(routing.primary.is_some() && routing.replica.is_some(), "both servers checked and serving: {routing:?}");
    let tls_of_this_connection = "SELECT @@server_id, VARIABLE_VALUE FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'Ssl_version'";
    rig.rt.block_on(async {
        let mut c = rig.conn().await;
        let read: Option<(i64, String)> = c.query_first(tls_of_this_connection).await.unwrap();
        assert_eq!(read, Some((2, "TLSv1.3".to_string())), "the read ran on the replica, over TLS");
        c.query_drop("START TRANSACTION").await.unwrap();
        let in_trx: Option<(i64, String)> = c.query_first(tls_of_this_connection).await.unwrap();
        assert_eq!(in_trx, Some((1, "TLSv1.3".to_string())), "the transaction ran on the primary, over TLS");
        c.query_drop("ROLLBACK").await.unwrap();
    });

    // A router that trusts another CA: the servers' certificates are refused.
    let distrust = Settings { backend_tls: Some(db_router::tls::BackendTls::load(&other_ca, None).unwrap()), ..no_ryw() };
    let (_publisher, subscriber) = topology::channel(Routing {
        primary: Some(rig.pair.primary.connect_addr()),
        replica: Some(rig.pair.replica.connect_addr()),
        generation: 1,
        down: Vec::new(),
    });
    let shared = Shared::new(users(), distrust, Metrics::register(&mut Registry::default()), subscriber);
    let addr = rig.rt.block_on(router::spawn("127.0.0.1:0".parse().unwrap(), shared)).unwrap();
    let err = rig.rt.block_on(async {
        // mysql_async reads settings on connect: that read already needs a server.
        match Conn::new(Opts::from_url(&format!("{}?prefer_socket=false", APP.url(addr))).unwrap()).await {
            Err(e) => e.to_string(),
            Ok(mut c) => c.query_drop("SELECT 1").await.unwrap_err().to_string(),
        }
    });
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");
    drop(rig);
}

/// `COM_CHANGE_USER` (what connection pools send to reuse a connection as another account):
/// the session starts over as the new user, on both servers, with none of the old session's
/// state; a wrong password is refused with MariaDB's error and ends that connection only.
#[test]
fn change_user_starts_a_clean_session_as_the_new_user() {
    let Some(rig) = rig("change_user_starts_a_clean_session_as_the_new_user", no_ryw()) else { return };
    let pair = &rig.pair;
    let account = |a: &tier::Account| {
        ChangeUserOpts::default()
            .with_user(Some(a.user.into()))
            .with_pass(Some(a.password.into()))
            .with_db_name(a.database.map(Into::into))
    };
    rig.rt.block_on(async {
        let mut c = rig.conn().await;
        c.query_drop("SET @greeting = 'hi'").await.unwrap();
        c.query_drop("CREATE TEMPORARY TABLE scratch (x INT)").await.unwrap();
        let user: Option<String> = c.query_first("SELECT CURRENT_USER()").await.unwrap();
        assert!(user.as_deref().is_some_and(|u| u.starts_with("app@")), "{user:?}");

        c.change_user(account(&SYSBENCH)).await.expect("change to sbtest");
        // A read runs on the replica again (the temporary table's pin went with the old
        // session), as the new user, on the new database.
        let before = counts(pair);
        let row: Option<(String, String, i64)> = c.query_first("SELECT CURRENT_USER(), DATABASE(), @@server_id").await.unwrap();
        let (user, db, server) = row.unwrap();
        assert!(user.starts_with("sbtest@"), "{user}");
        assert_eq!((db.as_str(), server), ("sbtest", 2));
        assert_eq!(delta(before, counts(pair)).r_select, 1);
        // The primary connection is the new user's too.
        c.query_drop("START TRANSACTION").await.unwrap();
        let row: Option<(String, i64)> = c.query_first("SELECT CURRENT_USER(), @@server_id").await.unwrap();
        let (user, server) = row.unwrap();
        assert!(user.starts_with("sbtest@") && server == 1, "{user} on {server}");
        c.query_drop("ROLLBACK").await.unwrap();
        let greeting: Option<Option<String>> = c.query_first("SELECT @greeting").await.unwrap();
        assert_eq!(greeting, Some(None), "user variables went with the old session");

        // Back to app: its temporary table is gone with the old session.
        c.change_user(account(&APP)).await.expect("change back to app");
        c.query_drop("START TRANSACTION").await.unwrap();
        let gone = c.query_drop("SELECT * FROM scratch").await.unwrap_err().to_string();
        assert!(gone.contains("1146"), "{gone}");
        c.query_drop("ROLLBACK").await.unwrap();

        // A wrong password: refused as MariaDB refuses it, and that connection ends.
        let failures = rig.metrics.auth_failures.get();
        let wrong = ChangeUserOpts::default().with_user(Some("app".into())).with_pass(Some("wrong".into()));
        let err = c.change_user(wrong).await.unwrap_err().to_string();
        assert!(err.contains("1045") && err.contains("Access denied for user 'app'"), "{err}");
        assert_eq!(rig.metrics.auth_failures.get(), failures + 1);
        assert!(c.query_drop("SELECT 1").await.is_err(), "the refused connection ended");
        let mut other = rig.conn().await;
        let one: Option<i64> = other.query_first("SELECT 1").await.unwrap();
        assert_eq!(one, Some(1), "other sessions go on");
    });
}

#[test]
fn read_your_writes_with_replication_held_back() {
    // Generous: with replication running, the wait must succeed even on a slow CI machine.
    let settings = Settings { ryw_timeout: Duration::from_secs(5), ..Settings::default() };
    let Some(rig) = rig("read_your_writes_with_replication_held_back", settings) else { return };
    let pair = &rig.pair;
    pair.primary.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY)").unwrap();
    pair.wait_caught_up(DEADLINE).unwrap();
    rig.rt.block_on(async {
        let mut writer = rig.conn().await;
        let mut other = rig.conn().await;
        // With replication running, the writer's read waits for its GTID on the replica.
        writer.query_drop("INSERT INTO t VALUES (1)").await.unwrap();
        let before = counts(pair);
        let n: Option<i64> = writer.query_first("SELECT COUNT(*) FROM t WHERE id = 1").await.unwrap();
        assert_eq!(n, Some(1));
        let d = delta(before, counts(pair));
        // MASTER_GTID_WAIT plus the read itself, both on the replica.
        assert_eq!((d.p_select, d.r_select), (0, 2), "{d:?}");
        assert_eq!(rig.metrics.ryw_waits.get(), 1);

        pair.stop_replica_sql().unwrap();
        writer.query_drop("INSERT INTO t VALUES (2)").await.unwrap();
        // The writer sees its write (the replica does not have it: fallback to the primary).
        let before = counts(pair);
        let n: Option<i64> = writer.query_first("SELECT COUNT(*) FROM t WHERE id = 2").await.unwrap();
        assert_eq!(n, Some(1), "a session reads its own write");
        let d = delta(before, counts(pair));
        assert_eq!(d.p_select, 1, "{d:?}");
        assert_eq!(rig.metrics.ryw_fallbacks.get(), 1);
        // Another session reads on the replica, without waiting for the writer's GTID.
        let before = counts(pair);
        let n: Option<i64> = other.query_first("SELECT COUNT(*) FROM t WHERE id = 2").await.unwrap();
        assert_eq!(n, Some(0), "the other session read the held-back replica");
        let d = delta(before, counts(pair));
        assert_eq!((d.p_select, d.r_select), (0, 1), "{d:?}");
        // The writer's next read checks without waiting again, still from the primary.
        let n: Option<i64> = writer.query_first("SELECT COUNT(*) FROM t").await.unwrap();
        assert_eq!(n, Some(2));

        pair.start_replica_sql().unwrap();
        pair.wait_caught_up(DEADLINE).unwrap();
        let before = counts(pair);
        let n: Option<i64> = writer.query_first("SELECT COUNT(*) FROM t").await.unwrap();
        assert_eq!(n, Some(2));
        let d = delta(before, counts(pair));
        assert_eq!((d.p_select, d.r_select), (0, 2), "back on the replica once it caught up: {d:?}");
    });
}

fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)?;
    let len = h[0] as usize | (h[1] as usize) << 8 | (h[2] as usize) << 16;
    let mut p = vec![0; len];
    s.read_exact(&mut p)?;
    Ok((h[3], p))
}

#[test]
fn garbage_and_truncated_packets_affect_only_their_session() {
    let Some(rig) = rig("garbage_and_truncated_packets_affect_only_their_session", no_ryw()) else { return };
    rig.rt.block_on(async {
        let mut good = rig.conn().await;
        good.query_drop("SELECT 1").await.unwrap();

        let addr = rig.addr;
        tokio::task::spawn_blocking(move || {
            let timeout = Some(Duration::from_secs(20));
            // 1. Garbage instead of a handshake response: an ERR packet, then the close.
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(timeout).unwrap();
            let (_, hello) = read_packet(&mut s).unwrap();
            assert_eq!(hello[0], 10, "protocol 10 handshake");
            s.write_all(&[5, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef, 0x00]).unwrap();
            let (_, err) = read_packet(&mut s).unwrap();
            assert_eq!(err[0], 0xFF, "ERR for a bad handshake");
            assert_eq!(u16::from_le_bytes([err[1], err[2]]), 1043, "ER_HANDSHAKE_ERROR: {:?}", String::from_utf8_lossy(&err));
            // 2. A truncated packet, then the client vanishes.
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(timeout).unwrap();
            read_packet(&mut s).unwrap();
            s.write_all(&[200, 0, 0, 1, 1, 2, 3]).unwrap();
            drop(s);
            // 3. A length header beyond any limit.
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(timeout).unwrap();
            read_packet(&mut s).unwrap();
            s.write_all(&[0xff, 0xff, 0xff, 1]).unwrap();
            s.write_all(&vec![0x41; 64 * 1024]).unwrap();
            drop(s);
        })
        .await
        .unwrap();

        // Logged-in garbage: an unknown command and a malformed execute get ERR packets.
        let mut raw = mysql_async::Conn::new(Opts::from_url(&rig.url()).unwrap()).await.unwrap();
        let e = raw.query_drop("SELECT * FROM").await.unwrap_err();
        assert!(e.to_string().contains("syntax"), "{e}");
        raw.disconnect().await.unwrap();

        // The good session still works, and so does a new one.
        let v: Option<i64> = good.query_first("SELECT 2 + 2").await.unwrap();
        assert_eq!(v, Some(4));
        let mut fresh = rig.conn().await;
        let v: Option<i64> = fresh.query_first("SELECT 3").await.unwrap();
        assert_eq!(v, Some(3));
    });
    // Unknown commands and malformed packets after login, with a hand-made client.
    let addr = rig.addr;
    let mut s = login_raw(addr);
    for (payload, what) in [(vec![0x12u8, 0, 0], "unsupported command"), (vec![0xEEu8], "unknown command"), (vec![0x17, 1, 0], "short execute"), (vec![0x17, 9, 9, 9, 9, 0, 1, 0, 0, 0], "unknown statement")] {
        write_packet(&mut s, 0, &payload);
        let (_, reply) = read_packet(&mut s).unwrap();
        assert_eq!(reply[0], 0xFF, "{what}: ERR packet, got {reply:?}");
    }
    write_packet(&mut s, 0, b"\x03SELECT 5");
    // Column count, column definition, EOF, row, EOF (the client did not ask for DEPRECATE_EOF).
    let mut got_row = false;
    let mut eofs = 0;
    while eofs < 2 {
        let (_, p) = read_packet(&mut s).unwrap();
        assert_ne!(p[0], 0xFF, "{:?}", String::from_utf8_lossy(&p));
        if p[0] == 0xFE && p.len() < 9 {
            eofs += 1;
        } else if eofs == 1 && p == [1, b'5'] {
            got_row = true;
        }
    }
    assert!(got_row, "the session answers queries after the bad packets");

    // A malformed COM_CHANGE_USER: what the client meant is unknown, so after the ERR the
    // connection ends (as after a refused change); other sessions are not touched.
    let mut bad = login_raw(addr);
    write_packet(&mut bad, 0, &[0x11, b'a', b'p', b'p']);
    let (_, reply) = read_packet(&mut bad).unwrap();
    assert_eq!(reply[0], 0xFF, "{reply:?}");
    assert!(String::from_utf8_lossy(&reply).contains("malformed COM_CHANGE_USER"), "{:?}", String::from_utf8_lossy(&reply));
    assert!(read_packet(&mut bad).is_err(), "the connection ended");
    write_packet(&mut s, 0, b"\x0e");
    assert_eq!(read_packet(&mut s).unwrap().1[0], 0x00, "the other session answers a ping");
}

fn write_packet(s: &mut TcpStream, seq: u8, payload: &[u8]) {
    let mut p = vec![payload.len() as u8, (payload.len() >> 8) as u8, (payload.len() >> 16) as u8, seq];
    p.extend_from_slice(payload);
    s.write_all(&p).unwrap();
}

/// A minimal client: protocol 4.1, no DEPRECATE_EOF, mysql_native_password.
fn login_raw(addr: SocketAddr) -> TcpStream {
    login_raw_caps(addr, 0)
}

fn login_raw_caps(addr: SocketAddr, extra_caps: u32) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (_, hello) = read_packet(&mut s).unwrap();
    let ver_end = hello[1..].iter().position(|&b| b == 0).unwrap() + 1;
    let rest = &hello[ver_end + 1..];
    let mut nonce = rest[4..12].to_vec();
    nonce.extend_from_slice(&rest[31..43]);
    let token = mysql_common_token(&nonce, APP.password.as_bytes());
    let caps: u32 = 0x0000_0200 | 0x0000_8000 | 0x0008_0000 | 0x1 | 0x8 | extra_caps; // 4.1, secure conn, plugin auth, long pw, with db
    let mut p = Vec::new();
    p.extend_from_slice(&caps.to_le_bytes());
    p.extend_from_slice(&(1u32 << 24).to_le_bytes());
    p.push(45);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(APP.user.as_bytes());
    p.push(0);
    p.push(20);
    p.extend_from_slice(&token);
    p.extend_from_slice(b"app\0mysql_native_password\0");
    write_packet(&mut s, 1, &p);
    let (_, ok) = read_packet(&mut s).unwrap();
    assert_eq!(ok[0], 0, "login OK, got {ok:?}");
    s
}

fn mysql_common_token(nonce: &[u8], password: &[u8]) -> [u8; 20] {
    let sha1pw = protocol::sha1(&[password]);
    protocol::native_token(nonce, &sha1pw)
}

#[test]
fn wrong_password_is_refused() {
    let Some(rig) = rig("wrong_password_is_refused", no_ryw()) else { return };
    rig.rt.block_on(async {
        let url = format!("mysql://app:wrong@{}/app?prefer_socket=false", rig.addr);
        let e = Conn::new(Opts::from_url(&url).unwrap()).await.unwrap_err();
        assert!(e.to_string().contains("Access denied"), "{e}");
        let url = format!("mysql://nobody:x@{}/app?prefer_socket=false", rig.addr);
        assert!(Conn::new(Opts::from_url(&url).unwrap()).await.is_err());
    });
    assert_eq!(rig.metrics.auth_failures.get(), 2);
}

#[test]
fn mariadb_cli_through_the_router() {
    let Some(rig) = rig("mariadb_cli_through_the_router", no_ryw()) else { return };
    let pair = &rig.pair;
    pair.primary.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(10)); INSERT INTO t VALUES (1, 'a'), (2, NULL)").unwrap();
    pair.wait_caught_up(DEADLINE).unwrap();
    let before = counts(pair);
    let out = std::process::Command::new("mariadb")
        .args(["--no-defaults", "--protocol=tcp", "--skip-ssl", "-h127.0.0.1"])
        .arg(format!("-P{}", rig.addr.port()))
        .args(["-uapp", "-papppw", "app", "--batch", "-e"])
        .arg("SELECT id, name FROM t ORDER BY id; SELECT COUNT(*) FROM t")
        .output()
        .expect("run mariadb");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "id\tname\n1\ta\n2\tNULL\nCOUNT(*)\n2\n");
    let d = delta(before, counts(pair));
    // The CLI sends the two statements one by one; its startup query runs as well.
    assert!(d.r_select >= 2 && d.p_select == 0, "{d:?}");

    // LOAD DATA LOCAL INFILE: the client streams the file through the router to the primary.
    let file = std::env::temp_dir().join(format!("dbr-infile-{}.tsv", std::process::id()));
    std::fs::write(&file, "10\tx\n11\ty\n12\tz\n").unwrap();
    let out = std::process::Command::new("mariadb")
        .args(["--no-defaults", "--protocol=tcp", "--skip-ssl", "--local-infile=1", "-h127.0.0.1"])
        .arg(format!("-P{}", rig.addr.port()))
        .args(["-uapp", "-papppw", "app", "--batch", "-e"])
        .arg(format!("LOAD DATA LOCAL INFILE '{}' INTO TABLE t; SELECT COUNT(*) FROM t", file.display()))
        .output()
        .expect("run mariadb");
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(pair.primary.value("SELECT COUNT(*) FROM app.t").unwrap(), "5");
}

#[test]
fn failover_under_continuous_writes_loses_no_acknowledged_write() {
    let monitor = MonitorConfig { interval_ms: 100, fail_after: 3, ..MonitorConfig::default() };
    let settings = Settings { failover_wait: Duration::from_secs(30), ..Settings::default() };
    let Some(mut rig) = rig_with("failover_under_continuous_writes_loses_no_acknowledged_write", settings, Some(monitor)) else { return };
    rig.pair.primary.sql_as(&APP, "CREATE TABLE w (id INT PRIMARY KEY, client INT)").unwrap();
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    const CLIENTS: i64 = 4;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(i64, Instant)>::new()));
    let url = rig.url();
    let writers: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (stop, acked, url) = (stop.clone(), acked.clone(), url.clone());
            rig.rt.spawn(async move {
                let mut errors = 0u64;
                let mut conn: Option<Conn> = None;
                // Bounded: at most 100k attempts, and the test sets `stop`.
                for n in 0..100_000i64 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if conn.is_none() {
                        match Conn::new(Opts::from_url(&url).unwrap()).await {
                            Ok(c) => conn = Some(c),
                            Err(_) => {
                                errors += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        }
                    }
                    let id = n * CLIENTS + client;
                    let c = conn.as_mut().expect("connected");
                    match c.query_drop(format!("INSERT INTO w VALUES ({id}, {client})")).await {
                        Ok(()) => acked.lock().unwrap().push((id, Instant::now())),
                        Err(_) => {
                            // Unknown outcome: the row may or may not exist; only acks count.
                            errors += 1;
                            conn = None;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                errors
            })
        })
        .collect();
    let acks = |acked: &std::sync::Mutex<Vec<(i64, Instant)>>| acked.lock().unwrap().len();
    poll("writes before the crash", || (acks(&acked) >= 200).then_some(()));
    let killed_at = Instant::now();
    rig.pair.primary.kill9().unwrap();
    let resumed = poll("writes through the router after the crash", || {
        acked.lock().unwrap().iter().find(|(_, t)| *t > killed_at + Duration::from_millis(1)).map(|(_, t)| *t)
    });
    let after = acks(&acked);
    poll("more writes on the new primary", || (acks(&acked) >= after + 100).then_some(()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let errors: u64 = writers.into_iter().map(|w| rig.rt.block_on(w).unwrap()).sum();
    println!("writes resumed {:?} after kill -9; {} acknowledged, {errors} failed attempts", resumed - killed_at, acks(&acked));

    // Every acknowledged write is on the new primary (the old replica).
    let new_primary = &rig.pair.replica;
    assert_eq!(new_primary.value("SELECT @@read_only").unwrap(), "0", "the replica was promoted");
    let present: std::collections::HashSet<i64> =
        new_primary.sql("SELECT id FROM app.w").unwrap().lines().map(|l| l.trim().parse().unwrap()).collect();
    let missing: Vec<i64> = acked.lock().unwrap().iter().map(|(id, _)| *id).filter(|id| !present.contains(id)).collect();
    assert!(missing.is_empty(), "{} acknowledged writes lost, e.g. {:?}", missing.len(), &missing[..missing.len().min(10)]);

    // The old primary returns: fenced, it takes no writes, and the router keeps writing to the
    // new primary.
    rig.pair.primary.start().unwrap();
    poll("the returning old primary fenced", || (rig.pair.primary.value("SELECT @@read_only").ok()? == "1").then_some(()));
    let direct = rig.pair.primary.sql_as(&APP, "INSERT INTO w VALUES (-1, -1)");
    assert!(direct.is_err(), "the fenced old primary accepted a write");
    rig.rt.block_on(async {
        let mut c = rig.conn().await;
        c.query_drop("INSERT INTO w VALUES (-2, -2)").await.unwrap();
    });
    assert_eq!(new_primary.value("SELECT COUNT(*) FROM app.w WHERE id = -2").unwrap(), "1");
}

/// A primary that hangs (SIGSTOP: its connections stay open and nothing answers) holds a
/// statement sent to it only until the routing view stops naming it the primary, as after a
/// failover: then the statement fails with an error that says why, and the session's next
/// statement goes to the new primary. Reads of other sessions go on from the replica
/// meanwhile.
#[test]
fn a_statement_waiting_on_a_hung_primary_ends_when_the_routing_view_drops_it() {
    let Some(rig) = rig("a_statement_waiting_on_a_hung_primary_ends_when_the_routing_view_drops_it", no_ryw()) else { return };
    let Ok(publisher) = &rig._publisher else { unreachable!("no monitor: the test publishes the view") };
    let (primary, replica) = (rig.pair.primary.connect_addr(), rig.pair.replica.connect_addr());
    let mut c = rig.rt.block_on(async {
        let mut c = rig.conn().await;
        c.query_drop("CREATE TABLE hung (id INT PRIMARY KEY)").await.unwrap();
        c
    });
    rig.pair.primary.pause();
    let stuck = rig.rt.spawn(async move {
        let r = c.query_drop("INSERT INTO hung VALUES (1)").await;
        (r, c)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!stuck.is_finished(), "the paused primary cannot have answered");
    rig.rt.block_on(async {
        let mut other = rig.conn().await;
        let id: Option<i64> = other.query_first("SELECT @@server_id").await.unwrap();
        assert_eq!(id, Some(2), "another session reads from the replica while the primary hangs");
    });
    assert!(!stuck.is_finished(), "still waiting: nothing told the session yet");

    // What the monitor publishes once it has promoted the replica.
    let dropped_at = Instant::now();
    publisher.send_replace(Routing { primary: Some(replica), replica: None, generation: 2, down: Vec::new() });
    let (result, mut c) = rig
        .rt
        .block_on(async { tokio::time::timeout(DEADLINE, stuck).await })
        .expect("the statement ends once the view drops its primary")
        .unwrap();
    let waited = dropped_at.elapsed();
    let err = result.expect_err("the hung primary never answered").to_string();
    assert!(err.contains("taken out by the monitor") && err.contains(&primary.to_string()), "{err}");
    println!("the statement ended {waited:?} after the view dropped its primary: {err}");
    assert!(rig.metrics.errors_backend.get() >= 1);

    // The same session goes on, on the new primary (a transaction runs there).
    rig.rt.block_on(async {
        c.query_drop("START TRANSACTION").await.unwrap();
        let id: Option<i64> = c.query_first("SELECT @@server_id").await.unwrap();
        assert_eq!(id, Some(2), "the session's primary is now the promoted replica");
        c.query_drop("ROLLBACK").await.unwrap();
    });
    rig.pair.primary.resume();
}

/// A replica that hangs: a read waiting on it is not cut off when the view only stops
/// sending reads there (as for lag), but once the view lists the replica as down the read
/// runs on the primary instead, and the client gets its answer, not an error (it had no
/// byte of it yet).
#[test]
fn a_read_waiting_on_a_hung_replica_runs_on_the_primary_once_the_view_marks_it_down() {
    let Some(rig) = rig("a_read_waiting_on_a_hung_replica_runs_on_the_primary_once_the_view_marks_it_down", no_ryw()) else { return };
    let Ok(publisher) = &rig._publisher else { unreachable!("no monitor: the test publishes the view") };
    let (primary, replica) = (rig.pair.primary.connect_addr(), rig.pair.replica.connect_addr());
    let mut c = rig.rt.block_on(async {
        let mut c = rig.conn().await;
        let id: Option<i64> = c.query_first("SELECT @@server_id").await.unwrap();
        assert_eq!(id, Some(2), "reads go to the replica");
        c
    });
    rig.pair.replica.pause();
    let stuck = rig.rt.spawn(async move {
        let r: Result<Option<i64>, _> = c.query_first("SELECT @@server_id").await;
        (r, c)
    });
    std::thread::sleep(Duration::from_millis(500));
    if stuck.is_finished() {
        let (r, _) = rig.rt.block_on(stuck).unwrap();
        panic!("the paused replica cannot have answered: {r:?}");
    }
    publisher.send_replace(Routing { primary: Some(primary), replica: None, generation: 1, down: Vec::new() });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!stuck.is_finished(), "out of the view for reads only: the read may still finish there");

    publisher.send_replace(Routing { primary: Some(primary), replica: None, generation: 1, down: vec![replica] });
    let (result, mut c) = rig
        .rt
        .block_on(async { tokio::time::timeout(DEADLINE, stuck).await })
        .expect("the read ends once the view marks its replica down")
        .unwrap();
    assert_eq!(result.expect("answered by the primary"), Some(1));
    rig.rt.block_on(async {
        let id: Option<i64> = c.query_first("SELECT @@server_id").await.unwrap();
        assert_eq!(id, Some(1), "the session reads from the primary while there is no replica");
    });
    rig.pair.replica.resume();
}

/// The same with the monitor: it finds the hung primary down (its probes time out), promotes
/// the replica, and the session whose write waited on the hung primary gets an error as
/// soon as the monitor takes the primary out, instead of waiting for ever; its next write lands on the new primary, and the
/// old primary, once it runs again, is fenced.
#[test]
fn monitor_failover_from_a_hung_primary_frees_the_sessions_waiting_on_it() {
    let monitor = MonitorConfig { interval_ms: 100, fail_after: 3, connect_timeout_ms: 300, query_timeout_ms: 300, ..MonitorConfig::default() };
    let settings = Settings { failover_wait: Duration::from_secs(30), ..no_ryw() };
    let Some(rig) = rig_with("monitor_failover_from_a_hung_primary_frees_the_sessions_waiting_on_it", settings, Some(monitor)) else { return };
    let primary = rig.pair.primary.connect_addr();
    let mut c = rig.rt.block_on(async {
        let mut c = rig.conn().await;
        c.query_drop("CREATE TABLE hung (id INT PRIMARY KEY)").await.unwrap();
        c.query_drop("INSERT INTO hung VALUES (0)").await.unwrap();
        c
    });
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    let paused_at = Instant::now();
    rig.pair.primary.pause();
    let stuck = rig.rt.spawn(async move {
        let r = c.query_drop("INSERT INTO hung VALUES (1)").await;
        (r, c)
    });
    let (result, mut c) = rig
        .rt
        .block_on(async { tokio::time::timeout(DEADLINE, stuck).await })
        .expect("the statement ends once the monitor replaces the hung primary")
        .unwrap();
    let err = result.expect_err("the hung primary never answered").to_string();
    assert!(err.contains("taken out by the monitor") && err.contains(&primary.to_string()), "{err}");
    println!("the write on the hung primary ended {:?} after the pause: {err}", paused_at.elapsed());
    // The view dropped the hung primary when the monitor found it down (no primary while it
    // promotes); the session's next write waits for the new one.
    rig.rt.block_on(async { c.query_drop("INSERT INTO hung VALUES (2)").await }).expect("the next write goes to the new primary");
    assert_eq!(rig.pair.replica.value("SELECT @@read_only").unwrap(), "0", "the replica was promoted");
    assert_eq!(rig.pair.replica.value("SELECT COUNT(*) FROM app.hung WHERE id = 2").unwrap(), "1");
    rig.pair.primary.resume();
    poll("the resumed old primary fenced", || (rig.pair.primary.value("SELECT @@read_only").ok()? == "1").then_some(()));
}

/// Polls a blocking check until it returns `Some` (bounded by a generous deadline).
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sysbench_read_write_through_the_router() {
    let Some(rig) = rig("sysbench_read_write_through_the_router", Settings::default()) else { return };
    let pair = &rig.pair;
    let sb = |args: &[&str]| {
        let out = std::process::Command::new("sysbench")
            .args(args)
            .args(["--db-driver=mysql", "--mysql-host=127.0.0.1", "--mysql-ssl=off", "--tables=2", "--table-size=1000"])
            .arg(format!("--mysql-port={}", rig.addr.port()))
            .arg(format!("--mysql-user={}", SYSBENCH.user))
            .arg(format!("--mysql-password={}", SYSBENCH.password))
            .arg(format!("--mysql-db={}", tier::SYSBENCH_DB))
            .output()
            .expect("run sysbench (apt-get install sysbench)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "sysbench {args:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
        text
    };
    // prepare (DDL, bulk inserts) through the router, then the read/write mix: transactions
    // with prepared statements (sysbench's default --db-ps-mode=auto), and autocommit reads.
    sb(&["oltp_read_write", "prepare"]);
    let commits = counter(&pair.primary, "Com_commit");
    let text = sb(&["oltp_read_write", "--threads=2", "--time=3", "run"]);
    // sysbench stops on any error but deadlocks (1213) and lock wait timeouts, which two
    // threads on small tables may hit on a direct connection too.
    let transactions: u64 = text.lines().find(|l| l.trim_start().starts_with("transactions:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(transactions > 10, "{text}");
    assert!(counter(&pair.primary, "Com_commit") > commits, "the transactions ran on the primary");
    let before = counts(pair);
    sb(&["oltp_point_select", "--threads=2", "--time=2", "run"]);
    let d = delta(before, counts(pair));
    assert!(d.r_exec > 100 && d.p_exec == 0, "point selects ran on the replica: {d:?}");
}

/// Reads one text-protocol response (no DEPRECATE_EOF): the OK packet, or the rows' first
/// column values.
fn read_response(s: &mut TcpStream) -> Result<Vec<u8>, Vec<Vec<u8>>> {
    let (_, first) = read_packet(s).unwrap();
    assert_ne!(first[0], 0xFF, "ERR: {:?}", String::from_utf8_lossy(&first));
    if first[0] == 0x00 {
        return Ok(first);
    }
    let (mut eofs, mut rows) = (0, Vec::new());
    while eofs < 2 {
        let (_, p) = read_packet(s).unwrap();
        if p[0] == 0xFE && p.len() < 9 {
            eofs += 1;
        } else if eofs == 1 {
            rows.push(p[1..1 + p[0] as usize].to_vec());
        }
    }
    Err(rows)
}

#[test]
fn read_your_writes_for_a_client_without_session_tracking() {
    let settings = Settings { ryw_timeout: Duration::from_secs(5), ..Settings::default() };
    let Some(rig) = rig("read_your_writes_for_a_client_without_session_tracking", settings) else { return };
    rig.pair.primary.sql_as(&APP, "CREATE TABLE x (a INT)").unwrap();
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    // The hand-made client negotiates neither CLIENT_SESSION_TRACK nor DEPRECATE_EOF; the
    // router's primary connection tracks last_gtid all the same.
    let mut s = login_raw(rig.addr);
    write_packet(&mut s, 0, b"\x03INSERT INTO x VALUES (7)");
    let ok = read_response(&mut s).expect("an OK packet");
    let head = protocol::parse_ok_head(&ok).expect("a well-formed OK");
    assert_eq!(ok.len(), head.rest, "no session-state block for this client: {ok:?}");
    assert_eq!(head.status.bits() & 0x4000, 0, "SERVER_SESSION_STATE_CHANGED cleared");
    assert_eq!(ok[1], 1, "one row affected");
    write_packet(&mut s, 0, b"\x03SELECT a FROM x");
    let rows = read_response(&mut s).expect_err("a result set");
    assert_eq!(rows, vec![b"7".to_vec()]);
    assert_eq!(rig.metrics.ryw_waits.get(), 1, "the read waited for the write's GTID on the replica");
    // COM_FIELD_LIST (the CLI's completion uses it): column definitions, then EOF.
    write_packet(&mut s, 0, b"\x04x\0");
    let mut defs = 0;
    loop {
        let (_, p) = read_packet(&mut s).unwrap();
        assert_ne!(p[0], 0xFF, "{:?}", String::from_utf8_lossy(&p));
        if p[0] == 0xFE {
            break;
        }
        defs += 1;
    }
    assert_eq!(defs, 1, "table x has one column");
    write_packet(&mut s, 0, b"\x03SELECT 1");
    assert_eq!(read_response(&mut s).expect_err("a result set"), vec![b"1".to_vec()], "still in step");
}

#[test]
fn reads_fall_back_to_the_primary_when_the_replica_is_down() {
    let Some(mut rig) = rig("reads_fall_back_to_the_primary_when_the_replica_is_down", no_ryw()) else { return };
    let mut c = rig.rt.block_on(async {
        let mut c = rig.conn().await;
        let id: Option<i64> = c.query_first("SELECT @@server_id").await.unwrap();
        assert_eq!(id, Some(2), "reads go to the replica while it is up");
        let id: Option<i64> = c.exec_first("SELECT @@server_id + ?", (0,)).await.unwrap();
        assert_eq!(id, Some(2), "prepared reads too");
        c
    });
    // The routing view still lists the replica (no monitor here): the session finds out.
    rig.pair.replica.kill9().unwrap();
    rig.rt.block_on(async {
        // The replica connection is dead: the prepared read runs on the primary instead.
        let id: Option<i64> = c.exec_first("SELECT @@server_id + ?", (0,)).await.unwrap();
        assert_eq!(id, Some(1), "the primary answered the prepared read");
        for _ in 0..3 {
            let before = counter(&rig.pair.primary, "Com_select");
            let id: Option<i64> = c.query_first("SELECT @@server_id").await.unwrap();
            assert_eq!(id, Some(1), "the primary answered");
            assert_eq!(counter(&rig.pair.primary, "Com_select") - before, 1);
        }
        // A new session too.
        let mut fresh = rig.conn().await;
        let id: Option<i64> = fresh.query_first("SELECT @@server_id").await.unwrap();
        assert_eq!(id, Some(1));
    });
    assert!(rig.metrics.errors_backend.get() >= 1);
}

/// A client on the router's Unix socket, and the router on the servers' Unix sockets
/// (`Settings::sockets`): each server names the connection that ran the statement
/// "localhost" (a TCP connection would be "127.0.0.1:port"); reads still go to the replica,
/// transactions to the primary.
#[test]
fn unix_sockets_on_both_sides() {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if !tier::available_or_skip("unix_sockets_on_both_sides") {
        return;
    }
    let pair = Pair::start_default().expect("start a primary/replica pair");
    let (p, r) = (pair.primary.connect_addr(), pair.replica.connect_addr());
    let settings = Settings {
        read_your_writes: false,
        sockets: [(p, pair.primary.socket()), (r, pair.replica.socket())].into(),
        ..Settings::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let metrics = Metrics::register(&mut Registry::default());
    let (_publisher, subscriber) = topology::channel(Routing { primary: Some(p), replica: Some(r), generation: 1, down: Vec::new() });
    let shared = Shared::new(users(), settings, metrics, subscriber);
    let path = std::env::temp_dir().join(format!("dbr-router-{}-{}.sock", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let socket = router::UnixSocket::bind(&path).expect("bind the router's socket");
    // A second bind while the first serves is refused; the file is not taken over.
    {
        let _guard = rt.enter();
        router::spawn_unix(&socket, shared).expect("serve the socket");
    }
    let err = router::UnixSocket::bind(&path).err().expect("a live socket is not replaced");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    let sql = "SELECT @@server_id, HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID(); \
               BEGIN; SELECT @@server_id, HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID(); COMMIT";
    let out = std::process::Command::new("mariadb")
        .args(["--no-defaults", "--protocol=socket"])
        .arg(format!("--socket={}", socket.path().display()))
        .args(["-uapp", "-papppw", "app", "--batch", "--skip-column-names", "-e", sql])
        .output()
        .expect("run mariadb");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let (rid, pid) = (pair.replica.server_id(), pair.primary.server_id());
    assert_eq!(text, format!("{rid}\tlocalhost\n{pid}\tlocalhost\n"), "read on the replica, transaction on the primary, both over Unix sockets");
    drop(rt);
    drop(socket);
    assert!(!path.exists(), "the router's socket file is removed on drop");
}

// ---- the in-kernel read relay -------------------------------------------------------------

const CLIENT_DEPRECATE_EOF: u32 = 0x0100_0000;

/// The relay needs root (or CAP_BPF and CAP_NET_ADMIN) and sockmap support: without them the
/// router relays in user space and these tests have nothing to check. Under CI that is a
/// failure.
fn kernel_rig(test: &str, settings: Settings) -> Option<Rig> {
    let rig = rig(test, Settings { kernel_relay: true, kernel_fast_path: false, ..settings })?;
    if rig.kernel {
        return Some(rig);
    }
    let why = "the in-kernel read relay did not load (not root, or no BPF sockmap support)";
    assert!(std::env::var_os("CI").is_none(), "{test}: {why}");
    eprintln!("skipping {test}: {why}");
    None
}

/// One whole response exactly as it arrived (frame headers included), for a single
/// statement: an OK or ERR, or a result set up to its terminator.
fn read_raw_response(s: &mut TcpStream, deprecate_eof: bool) -> Vec<u8> {
    let mut raw = Vec::new();
    let frame = |s: &mut TcpStream, raw: &mut Vec<u8>| {
        let (seq, p) = read_packet(s).unwrap();
        raw.extend_from_slice(&[p.len() as u8, (p.len() >> 8) as u8, (p.len() >> 16) as u8, seq]);
        raw.extend_from_slice(&p);
        p
    };
    let first = frame(s, &mut raw);
    if first[0] == 0x00 || first[0] == 0xFF {
        return raw;
    }
    let mut terminators = if deprecate_eof { 1 } else { 2 };
    loop {
        let p = frame(s, &mut raw);
        assert!(p.len() < 0xFF_FFFF, "no 16 MiB packets in these tests");
        if p[0] == 0xFF {
            return raw;
        }
        if p[0] == 0xFE && (p.len() < 9 || deprecate_eof) {
            terminators -= 1;
            if terminators == 0 {
                return raw;
            }
        }
    }
}

#[test]
fn kernel_relayed_answers_are_byte_exact() {
    let Some(rig) = kernel_rig("kernel_relayed_answers_are_byte_exact", no_ryw()) else { return };
    let queries: &[&str] = &[
        "SELECT 1",
        "SELECT NULL, 'a', 3.5, CAST('2024-01-02' AS DATE), -7, _binary x'00feff'",
        // Many small rows: frame headers cross skb boundaries.
        "SELECT seq, REPEAT('x', seq % 300) FROM seq_1_to_20000",
        // One row larger than any skb.
        "SELECT REPEAT('y', 3000000)",
        // No rows; an error as the first packet; rows that start with 0xFE-like bytes.
        "SELECT 1 FROM DUAL WHERE 0",
        "SELECT nosuch FROM DUAL",
        "SELECT CHAR(254), CHAR(255), '' FROM seq_1_to_50",
    ];
    let replica = rig.pair.replica.connect_addr();
    for caps in [0, CLIENT_DEPRECATE_EOF] {
        let deprecate = caps != 0;
        let mut routed = login_raw_caps(rig.addr, caps);
        let mut direct = login_raw_caps(replica, caps);
        for q in queries {
            let before = rig.metrics.kernel_relayed.get();
            let mut cmd = vec![0x03];
            cmd.extend_from_slice(q.as_bytes());
            write_packet(&mut direct, 0, &cmd);
            let want = read_raw_response(&mut direct, deprecate);
            write_packet(&mut routed, 0, &cmd);
            let got = read_raw_response(&mut routed, deprecate);
            assert!(got == want, "{q} (deprecate_eof {deprecate}): {} bytes through the router, {} direct", got.len(), want.len());
            assert_eq!(rig.metrics.kernel_relayed.get() - before, 1, "{q}: answered by the kernel");
        }
        // Still in step: the router reads the next command normally.
        write_packet(&mut routed, 0, b"\x03SELECT @@server_id");
        let raw = read_raw_response(&mut routed, deprecate);
        assert!(raw.ends_with(&[0xFE, 0, 0, 2, 0]) || deprecate, "EOF status: autocommit, {raw:?}");
    }
}

/// Reads, writes, SET, USE, prepared statements and a transaction in one session: the
/// relay switches the replica connection between the kernel and the router as needed.
#[test]
fn kernel_relay_session_mixes_reads_writes_set_and_prepared_statements() {
    let Some(rig) = kernel_rig("kernel_relay_session_mixes_reads_writes_set_and_prepared_statements", Settings { ryw_timeout: Duration::from_secs(5), ..Settings::default() }) else { return };
    rig.pair.primary.sql_as(&APP, "CREATE TABLE m (id INT PRIMARY KEY, v VARCHAR(20))").unwrap();
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    rig.rt.block_on(async {
        let mut c = rig.conn().await;
        let kernel0 = rig.metrics.kernel_relayed.get();
        for i in 0..5i64 {
            c.exec_drop("INSERT INTO m VALUES (?, ?)", (i, format!("v{i}"))).await.unwrap();
            // Read-your-writes: the replica waits for the write (the router asks it), then
            // the read's answer goes through the kernel.
            let n: Option<i64> = c.query_first("SELECT COUNT(*) FROM m").await.unwrap();
            assert_eq!(n, Some(i + 1));
            let v: Option<String> = c.exec_first("SELECT v FROM m WHERE id = ?", (i,)).await.unwrap();
            assert_eq!(v.as_deref(), Some(format!("v{i}").as_str()));
            c.query_drop(format!("SET SESSION div_precision_increment = {}", i + 1)).await.unwrap();
            let third: Option<String> = c.query_first("SELECT 1/3").await.unwrap();
            assert_eq!(third, Some(format!("0.{}", "3".repeat(i as usize + 1))), "SET reached the replica connection");
        }
        c.query_drop("USE app").await.unwrap();
        let rows: Vec<(i64, String)> = c.exec("SELECT id, v FROM m WHERE id >= ? ORDER BY id", (3,)).await.unwrap();
        assert_eq!(rows, vec![(3, "v3".into()), (4, "v4".into())]);
        c.query_drop("BEGIN").await.unwrap();
        c.query_drop("UPDATE m SET v = 'in trx' WHERE id = 0").await.unwrap();
        let v: Option<String> = c.query_first("SELECT v FROM m WHERE id = 0").await.unwrap();
        assert_eq!(v.as_deref(), Some("in trx"), "the transaction's read sees its write (primary)");
        c.query_drop("COMMIT").await.unwrap();
        let kernel1 = rig.metrics.kernel_relayed.get();
        assert!(kernel1 - kernel0 >= 15, "reads went through the kernel: {}", kernel1 - kernel0);
        let v: Option<String> = c.query_first("SELECT v FROM m WHERE id = 0").await.unwrap();
        assert_eq!(v.as_deref(), Some("in trx"));
        assert_eq!(rig.metrics.kernel_relayed.get(), kernel1 + 1, "after the transaction, reads go through the kernel again");
    });
}

/// A client that sends its next commands before reading the answer (a redirected read, then a
/// write the router must answer, then a read): the answers arrive whole and in order.
#[test]
fn kernel_relay_keeps_pipelined_answers_in_order() {
    let Some(rig) = kernel_rig("kernel_relay_keeps_pipelined_answers_in_order", no_ryw()) else { return };
    rig.pair.primary.sql_as(&APP, "CREATE TABLE p (a INT)").unwrap();
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    let mut s = login_raw(rig.addr);
    let mut batch = Vec::new();
    for q in ["SELECT seq FROM seq_1_to_30000", "INSERT INTO p VALUES (1)", "SELECT seq FROM seq_1_to_3"] {
        let mut cmd = vec![0x03];
        cmd.extend_from_slice(q.as_bytes());
        batch.extend_from_slice(&[cmd.len() as u8, (cmd.len() >> 8) as u8, 0, 0]);
        batch.extend_from_slice(&cmd);
    }
    s.write_all(&batch).unwrap();
    let rows = read_response(&mut s).expect_err("rows");
    assert_eq!(rows.len(), 30000);
    assert_eq!(rows.last().map(|r| r.as_slice()), Some(&b"30000"[..]));
    let ok = read_response(&mut s).expect("the INSERT's OK");
    assert_eq!(ok[1], 1, "one row affected");
    let rows = read_response(&mut s).expect_err("rows");
    assert_eq!(rows, vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
    assert_eq!(counter(&rig.pair.primary, "Com_insert"), 1);
}

/// A client that goes away in the middle of a large redirected answer: its session ends, the
/// others (and new ones) keep working.
#[test]
fn kernel_relay_client_gone_mid_result_harms_no_other_session() {
    let Some(rig) = kernel_rig("kernel_relay_client_gone_mid_result_harms_no_other_session", no_ryw()) else { return };
    rig.rt.block_on(async {
        let mut other = rig.conn().await;
        let id: Option<i64> = other.query_first("SELECT @@server_id").await.unwrap();
        assert_eq!(id, Some(2));
        for _ in 0..3 {
            let mut s = login_raw(rig.addr);
            write_packet(&mut s, 0, b"\x03SELECT seq, REPEAT('z', 100) FROM seq_1_to_2000000");
            let mut some = [0u8; 4096];
            s.read_exact(&mut some).unwrap();
            drop(s);
            let n: Option<i64> = other.query_first("SELECT COUNT(*) FROM seq_1_to_1000").await.unwrap();
            assert_eq!(n, Some(1000), "the other session is unharmed");
        }
        poll("sessions of the gone clients closed", || (rig.metrics.sessions_active.get() == 1).then_some(()));
        let mut fresh = rig.conn().await;
        let rows: Vec<i64> = fresh.exec("SELECT seq FROM seq_1_to_5 WHERE seq > ?", (2,)).await.unwrap();
        assert_eq!(rows, vec![3, 4, 5]);
    });
}

/// A prepared read executed with a cursor: the answer stops after the column definitions and
/// the rows come by COM_STMT_FETCH, so the router relays it itself; plain executions of the
/// same statement go through the kernel.
#[test]
fn kernel_relay_leaves_cursors_to_the_router() {
    let Some(rig) = kernel_rig("kernel_relay_leaves_cursors_to_the_router", no_ryw()) else { return };
    let mut s = login_raw(rig.addr);
    write_packet(&mut s, 0, b"\x16SELECT seq FROM seq_1_to_5");
    let (_, ok) = read_packet(&mut s).unwrap();
    assert_eq!(ok[0], 0, "prepared: {ok:?}");
    let id = &ok[1..5];
    // One column definition and its EOF (no DEPRECATE_EOF), no parameters.
    for _ in 0..2 {
        read_packet(&mut s).unwrap();
    }
    let exec = |flags: u8| [&[0x17][..], id, &[flags, 1, 0, 0, 0]].concat();
    let before = rig.metrics.kernel_relayed.get();
    write_packet(&mut s, 0, &exec(1)); // CURSOR_TYPE_READ_ONLY
    let mut eof = Vec::new();
    for _ in 0..3 {
        eof = read_packet(&mut s).unwrap().1;
    }
    assert_eq!(eof[0], 0xFE);
    assert_ne!(u16::from_le_bytes([eof[3], eof[4]]) & 0x0040, 0, "SERVER_STATUS_CURSOR_EXISTS");
    assert_eq!(rig.metrics.kernel_relayed.get(), before, "the router relayed the cursor's answer");
    write_packet(&mut s, 0, &[&[0x1c][..], id, &10u32.to_le_bytes()].concat());
    let mut rows = 0;
    loop {
        let (_, p) = read_packet(&mut s).unwrap();
        if p[0] == 0xFE && p.len() < 9 {
            break;
        }
        assert_eq!(p[0], 0, "a binary row");
        rows += 1;
    }
    assert_eq!(rows, 5);
    write_packet(&mut s, 0, &exec(0));
    let raw = read_raw_response(&mut s, false);
    let mut frames = 0;
    let mut at = 0;
    while at < raw.len() {
        at += 4 + (raw[at] as usize | (raw[at + 1] as usize) << 8 | (raw[at + 2] as usize) << 16);
        frames += 1;
    }
    assert_eq!(frames, 1 + 1 + 1 + 5 + 1, "column count, definition, EOF, 5 rows, EOF");
    assert_eq!(rig.metrics.kernel_relayed.get(), before + 1, "a plain execution goes through the kernel");
}

fn fast_rig(test: &str, settings: Settings) -> Option<Rig> {
    let rig = rig(test, Settings { kernel_fast_path: true, ..settings })?;
    if rig.fast {
        return Some(rig);
    }
    let why = "the in-kernel fast path did not load (not root, no cgroup v2, or no BPF sockmap support)";
    assert!(std::env::var_os("CI").is_none(), "{test}: {why}");
    eprintln!("skipping {test}: {why}");
    None
}

/// Prepared reads of a client on this host go through the kernel to the replica and back:
/// same answers as a direct connection, counted by the replica (server-side evidence) and
/// not by the primary, and the router is not involved (its replica statement counter moves
/// only when the session next comes to it).
#[test]
fn fast_path_routes_prepared_reads_in_the_kernel() {
    let Some(rig) = fast_rig("fast_path_routes_prepared_reads_in_the_kernel", no_ryw()) else { return };
    rig.pair.primary.sql_as(&APP, "CREATE TABLE f (id INT PRIMARY KEY, v VARCHAR(3000))").unwrap();
    rig.pair.primary.sql_as(&APP, "INSERT INTO f SELECT seq, REPEAT(CHAR(65 + seq % 26), seq % 3000) FROM seq_1_to_2000").unwrap();
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    rig.rt.block_on(async {
        let mut c = rig.conn().await;
        let stmt = c.prep("SELECT id, v FROM f WHERE id = ?").await.unwrap();
        let range = c.prep("SELECT id, v FROM f WHERE id BETWEEN ? AND ? ORDER BY id").await.unwrap();
        // The first executions teach the router (types), the rest may go through the kernel.
        let replica0 = counter(&rig.pair.replica, "Com_stmt_execute");
        let primary0 = counter(&rig.pair.primary, "Com_stmt_execute");
        let routed0 = rig.metrics.kernel_routed.get();
        for i in 1..=200i64 {
            let row: Option<(i64, String)> = c.exec_first(&stmt, (i,)).await.unwrap();
            let want = char::from(65 + (i % 26) as u8).to_string().repeat((i % 3000) as usize);
            assert_eq!(row, Some((i, want)), "row {i}");
        }
        let rows: Vec<(i64, String)> = c.exec(&range, (1, 2000)).await.unwrap();
        assert_eq!(rows.len(), 2000);
        assert!(rows.iter().enumerate().all(|(k, (id, v))| *id == k as i64 + 1 && v.len() == (*id % 3000) as usize));
        // Wakes the session: it counts what the kernel routed.
        let one: Option<i64> = c.query_first("SELECT 1").await.unwrap();
        assert_eq!(one, Some(1));
        let routed = rig.metrics.kernel_routed.get() - routed0;
        assert_eq!(counter(&rig.pair.replica, "Com_stmt_execute") - replica0, 201, "every execution ran on the replica");
        assert_eq!(counter(&rig.pair.primary, "Com_stmt_execute") - primary0, 0);
        eprintln!("routed by the kernel: {routed}");
        assert!(routed >= 198, "executions routed by the kernel: {routed}");
    });
}

/// Prepares `sql` with a hand-made client; returns the statement id (reads the whole answer:
/// the OK, then parameter and column definitions, each followed by an EOF without
/// DEPRECATE_EOF).
fn prepare_raw(s: &mut TcpStream, sql: &str, deprecate_eof: bool) -> u32 {
    let mut cmd = vec![0x16];
    cmd.extend_from_slice(sql.as_bytes());
    write_packet(s, 0, &cmd);
    let (_, ok) = read_packet(s).unwrap();
    assert_eq!(ok[0], 0, "prepare {sql}: {:?}", String::from_utf8_lossy(&ok));
    let id = u32::from_le_bytes(ok[1..5].try_into().unwrap());
    let (cols, params) = (u16::from_le_bytes([ok[5], ok[6]]), u16::from_le_bytes([ok[7], ok[8]]));
    for n in [params, cols] {
        for _ in 0..n {
            read_packet(s).unwrap();
        }
        if n > 0 && !deprecate_eof {
            let (_, eof) = read_packet(s).unwrap();
            assert_eq!(eof[0], 0xFE);
        }
    }
    id
}

fn execute_raw(s: &mut TcpStream, id: u32) {
    let mut cmd = vec![0x17];
    cmd.extend_from_slice(&id.to_le_bytes());
    cmd.extend_from_slice(&[0, 1, 0, 0, 0]);
    write_packet(s, 0, &cmd);
}

/// Wakes a session (a ping goes through the router) so that it counts what the kernel routed.
fn ping_raw(s: &mut TcpStream) {
    write_packet(s, 0, &[0x0e]);
    let (_, ok) = read_packet(s).unwrap();
    assert_eq!(ok[0], 0, "ping");
}

/// Answers that went through the kernel are byte for byte what a direct connection to the
/// replica gets: text and binary values, 20,000 rows (frames cross message boundaries), one
/// 3 MB row, no rows, an error at execution time, rows that begin with 0xFE-like bytes; with
/// and without CLIENT_DEPRECATE_EOF.
#[test]
fn fast_path_answers_are_byte_exact() {
    let Some(rig) = fast_rig("fast_path_answers_are_byte_exact", no_ryw()) else { return };
    let queries: &[&str] = &[
        "SELECT 1",
        "SELECT NULL, 'a', 3.5, CAST('2024-01-02' AS DATE), -7, _binary x'00feff', 1e300",
        "SELECT seq, REPEAT('x', seq % 300) FROM seq_1_to_20000",
        "SELECT REPEAT('y', 3000000)",
        "SELECT 1 FROM DUAL WHERE 0",
        "SELECT 1 FROM seq_1_to_3 WHERE 1 = (SELECT seq FROM seq_1_to_2)",
        "SELECT CHAR(254), CHAR(255), '' FROM seq_1_to_50",
    ];
    let replica = rig.pair.replica.connect_addr();
    for caps in [0, CLIENT_DEPRECATE_EOF] {
        let deprecate = caps != 0;
        let mut routed = login_raw_caps(rig.addr, caps);
        let mut direct = login_raw_caps(replica, caps);
        let routed0 = rig.metrics.kernel_routed.get();
        let executes0 = counter(&rig.pair.replica, "Com_stmt_execute");
        for q in queries {
            let (rid, did) = (prepare_raw(&mut routed, q, deprecate), prepare_raw(&mut direct, q, deprecate));
            // The first execution goes through the router (which registers the statement).
            for round in 0..3 {
                execute_raw(&mut direct, did);
                let want = read_raw_response(&mut direct, deprecate);
                execute_raw(&mut routed, rid);
                let got = read_raw_response(&mut routed, deprecate);
                assert!(got == want, "{q} (deprecate_eof {deprecate}, round {round}): {} bytes through the router, {} direct", got.len(), want.len());
            }
        }
        ping_raw(&mut routed);
        assert_eq!(rig.metrics.kernel_routed.get() - routed0, 2 * queries.len() as u64, "deprecate_eof {deprecate}: executions routed by the kernel");
        assert_eq!(counter(&rig.pair.replica, "Com_stmt_execute") - executes0, 6 * queries.len() as i64, "all ran on the replica");
    }
}

/// The fast path gives way whenever the session's state says a read must go elsewhere or
/// wait: read-your-writes after a write, a transaction, autocommit off, a temporary table; it
/// resumes afterwards. Proven by what each server sees.
#[test]
fn fast_path_follows_session_state() {
    let Some(rig) = fast_rig("fast_path_follows_session_state", Settings { ryw_timeout: Duration::from_secs(5), ..Settings::default() }) else { return };
    rig.pair.primary.sql_as(&APP, "CREATE TABLE s (id INT PRIMARY KEY, v INT)").unwrap();
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    rig.rt.block_on(async {
        let mut c = rig.conn().await;
        let read = c.prep("SELECT v FROM s WHERE id = ?").await.unwrap();
        let executes = |inst: &Instance| counter(inst, "Com_stmt_execute");
        for i in 0..20i64 {
            // Read-your-writes: each read sees the write just before it, on the replica.
            c.exec_drop("INSERT INTO s VALUES (?, ?)", (i, i * 10)).await.unwrap();
            for _ in 0..3 {
                let v: Option<i64> = c.exec_first(&read, (i,)).await.unwrap();
                assert_eq!(v, Some(i * 10), "row {i} after its write");
            }
        }
        // Wake the session so that it counts.
        c.query_drop("DO 1").await.unwrap();
        let routed = rig.metrics.kernel_routed.get();
        assert!(routed >= 20, "reads after the first following each write went through the kernel: {routed}");

        // In a transaction the read runs on the primary and sees the uncommitted write.
        c.query_drop("BEGIN").await.unwrap();
        c.exec_drop("UPDATE s SET v = -1 WHERE id = 0", ()).await.unwrap();
        let (p0, r0) = (executes(&rig.pair.primary), executes(&rig.pair.replica));
        for _ in 0..5 {
            let v: Option<i64> = c.exec_first(&read, (0,)).await.unwrap();
            assert_eq!(v, Some(-1), "the transaction reads its own write");
        }
        assert_eq!((executes(&rig.pair.primary) - p0, executes(&rig.pair.replica) - r0), (5, 0), "in the transaction: primary only");
        c.query_drop("ROLLBACK").await.unwrap();

        // Autocommit off: reads are part of the implicit transaction, on the primary.
        c.query_drop("SET autocommit = 0").await.unwrap();
        let (p0, r0) = (executes(&rig.pair.primary), executes(&rig.pair.replica));
        for _ in 0..5 {
            let v: Option<i64> = c.exec_first(&read, (1,)).await.unwrap();
            assert_eq!(v, Some(10));
        }
        assert_eq!((executes(&rig.pair.primary) - p0, executes(&rig.pair.replica) - r0), (5, 0), "autocommit off: primary only");
        c.query_drop("COMMIT").await.unwrap();
        c.query_drop("SET autocommit = 1").await.unwrap();

        // Back to normal: the replica answers, through the kernel after the first read.
        let (p0, r0, k0) = (executes(&rig.pair.primary), executes(&rig.pair.replica), rig.metrics.kernel_routed.get());
        for _ in 0..10 {
            let v: Option<i64> = c.exec_first(&read, (2,)).await.unwrap();
            assert_eq!(v, Some(20));
        }
        c.query_drop("DO 1").await.unwrap();
        assert_eq!((executes(&rig.pair.primary) - p0, executes(&rig.pair.replica) - r0), (0, 10), "autocommit reads: replica");
        assert!(rig.metrics.kernel_routed.get() - k0 >= 9, "through the kernel again");

        // A temporary table pins the session to the primary, reads included.
        c.query_drop("CREATE TEMPORARY TABLE t (a INT)").await.unwrap();
        c.query_drop("INSERT INTO t VALUES (7)").await.unwrap();
        let (p0, r0) = (executes(&rig.pair.primary), executes(&rig.pair.replica));
        for _ in 0..5 {
            let v: Option<i64> = c.exec_first(&read, (3,)).await.unwrap();
            assert_eq!(v, Some(30));
        }
        let t: Option<i64> = c.exec_first("SELECT a FROM t", ()).await.unwrap();
        assert_eq!(t, Some(7), "the temporary table is there (primary)");
        assert_eq!((executes(&rig.pair.primary) - p0, executes(&rig.pair.replica) - r0), (6, 0), "pinned: primary only");
    });
}

/// A change of the routing view (the monitor takes the replica out) stops the kernel from
/// routing at once, also for a session that is idle with its fast path on; reads go to the
/// primary, and through the kernel again once the replica is back.
#[test]
fn fast_path_stops_when_the_replica_leaves_the_routing_view() {
    let Some(rig) = fast_rig("fast_path_stops_when_the_replica_leaves_the_routing_view", no_ryw()) else { return };
    let Ok(publisher) = &rig._publisher else { unreachable!("no monitor") };
    let mut s = login_raw(rig.addr);
    let id = prepare_raw(&mut s, "SELECT @@server_id", false);
    let server_id = |s: &mut TcpStream| {
        execute_raw(s, id);
        let rows = read_binary_rows(s);
        assert_eq!(rows.len(), 1);
        rows[0].clone()
    };
    for _ in 0..5 {
        assert_eq!(server_id(&mut s), 2u64.to_le_bytes(), "the replica (server id 2) answers");
    }
    let mut r = publisher.borrow().clone();
    let replica = r.replica.take();
    publisher.send(r.clone()).unwrap();
    // The session reacts to the change by itself (no command needed); give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        assert_eq!(server_id(&mut s), 1u64.to_le_bytes(), "the primary (server id 1) answers");
    }
    r.replica = replica;
    publisher.send(r).unwrap();
    let k0 = rig.metrics.kernel_routed.get();
    for _ in 0..5 {
        assert_eq!(server_id(&mut s), 2u64.to_le_bytes(), "the replica again");
    }
    ping_raw(&mut s);
    assert!(rig.metrics.kernel_routed.get() - k0 >= 4, "through the kernel again");
}

/// A client that sends its next commands before reading the answers (a read the kernel
/// routes, a write the router must handle, another read): the answers arrive whole and in
/// order.
#[test]
fn fast_path_keeps_pipelined_answers_in_order() {
    let Some(rig) = fast_rig("fast_path_keeps_pipelined_answers_in_order", no_ryw()) else { return };
    rig.pair.primary.sql_as(&APP, "CREATE TABLE pp (a INT)").unwrap();
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    let mut s = login_raw(rig.addr);
    let big = prepare_raw(&mut s, "SELECT seq FROM seq_1_to_30000", false);
    let small = prepare_raw(&mut s, "SELECT seq FROM seq_1_to_3", false);
    for id in [big, small] {
        execute_raw(&mut s, id);
        read_binary_rows(&mut s);
    }
    for round in 0..5 {
        // Separate writes: each is its own message for the kernel to route or pass.
        execute_raw(&mut s, big);
        write_packet(&mut s, 0, b"\x03INSERT INTO pp VALUES (1)");
        execute_raw(&mut s, small);
        execute_raw(&mut s, big);
        let rows = read_binary_rows(&mut s);
        assert_eq!(rows.len(), 30000, "round {round}");
        let (_, ok) = read_packet(&mut s).unwrap();
        assert_eq!(ok[0..2], [0, 1], "round {round}: the INSERT's OK, one row");
        assert_eq!(read_binary_rows(&mut s).len(), 3, "round {round}");
        let rows = read_binary_rows(&mut s);
        assert_eq!(rows.len(), 30000, "round {round}");
        assert_eq!(rows.last().map(|r| r.as_slice()), Some(&30000u64.to_le_bytes()[..]), "round {round}");
    }
    assert_eq!(counter(&rig.pair.primary, "Com_insert"), 5);
}

/// Reads one binary result set (no DEPRECATE_EOF) of one non-null integer column: each row's
/// value bytes.
fn read_binary_rows(s: &mut TcpStream) -> Vec<Vec<u8>> {
    let (_, first) = read_packet(s).unwrap();
    assert_ne!(first[0], 0xFF, "{:?}", String::from_utf8_lossy(&first));
    let mut eofs = 0;
    let mut rows = Vec::new();
    while eofs < 2 {
        let (_, p) = read_packet(s).unwrap();
        assert_ne!(p[0], 0xFF, "{:?}", String::from_utf8_lossy(&p));
        if p[0] == 0xFE && p.len() < 9 {
            eofs += 1;
        } else if eofs == 1 {
            // 0x00, null bitmap (1 byte for one column), the value (integers here).
            rows.push(p[2..].to_vec());
        }
    }
    rows
}

/// A client that pipelines hard: 400 commands, each its own message, sent without waiting
/// (executions of three statements the kernel may route, text queries and a write the router
/// answers, an answer too large for one message): every answer arrives, in order.
#[test]
fn fast_path_keeps_heavy_pipelining_in_order() {
    let Some(rig) = fast_rig("fast_path_keeps_heavy_pipelining_in_order", no_ryw()) else { return };
    rig.pair.primary.sql_as(&APP, "CREATE TABLE hp (a INT)").unwrap();
    rig.pair.wait_caught_up(DEADLINE).unwrap();
    let mut s = login_raw(rig.addr);
    let ids: Vec<u32> = (1..=3).map(|k| prepare_raw(&mut s, &format!("SELECT {k}"), false)).collect();
    let big = prepare_raw(&mut s, "SELECT seq FROM seq_1_to_5000", false);
    for &id in ids.iter().chain([&big]) {
        execute_raw(&mut s, id);
        read_binary_rows(&mut s);
    }
    let mut reader = s.try_clone().unwrap();
    // The command of each step (statement, large answer, write, text query).
    let plan: Vec<u32> = (0..400u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % 23).collect();
    let expected = plan.clone();
    let check = std::thread::spawn(move || {
        for (i, &p) in expected.iter().enumerate() {
            match p {
                0..=2 | 5..=19 => {
                    let rows = read_binary_rows(&mut reader);
                    assert_eq!(rows, vec![(p % 3 + 1).to_le_bytes().to_vec()], "answer {i}");
                }
                3 => assert_eq!(read_binary_rows(&mut reader).len(), 5000, "answer {i}"),
                4 => {
                    let (_, ok) = read_packet(&mut reader).unwrap();
                    assert_eq!(ok[0], 0, "answer {i}: the INSERT's OK");
                }
                _ => {
                    let rows = read_response(&mut reader).expect_err("rows");
                    assert_eq!(rows, vec![b"q".to_vec()], "answer {i}");
                }
            }
        }
    });
    for (i, &p) in plan.iter().enumerate() {
        // Bursts: the router catches up between them and turns the fast path on, so that
        // kernel-routed answers and the router's interleave.
        if i % 4 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        match p {
            0..=2 => execute_raw(&mut s, ids[p as usize]),
            3 => execute_raw(&mut s, big),
            4 => write_packet(&mut s, 0, b"\x03INSERT INTO hp VALUES (1)"),
            // Mostly reads the kernel routes, some text queries in between.
            5..=19 => execute_raw(&mut s, ids[(p % 3) as usize]),
            _ => write_packet(&mut s, 0, b"\x03SELECT 'q'"),
        }
    }
    check.join().expect("answers in order");
    ping_raw(&mut s);
    let routed = rig.metrics.kernel_routed.get();
    eprintln!("routed by the kernel: {routed} of {}", plan.len());
    assert!(routed > 0, "the kernel routed some of them");
    assert_eq!(counter(&rig.pair.primary, "Com_insert"), plan.iter().filter(|&&p| p == 4).count() as i64);
}

/// A client that goes away while the kernel routed its read (the replica's answer then has
/// nowhere to go): its session ends, and other sessions, old and new, keep reading through the
/// kernel.
#[test]
fn fast_path_client_gone_mid_read_harms_no_other_session() {
    let Some(rig) = fast_rig("fast_path_client_gone_mid_read_harms_no_other_session", no_ryw()) else { return };
    let mut other = login_raw(rig.addr);
    let id = prepare_raw(&mut other, "SELECT @@server_id", false);
    for _ in 0..3 {
        execute_raw(&mut other, id);
        assert_eq!(read_binary_rows(&mut other), vec![2u64.to_le_bytes().to_vec()]);
    }
    for round in 0..5 {
        let mut s = login_raw(rig.addr);
        let slow = prepare_raw(&mut s, "SELECT SLEEP(0.2) + seq FROM seq_1_to_2", false);
        execute_raw(&mut s, slow);
        read_binary_rows(&mut s);
        // Through the kernel this time (the router turned the path on after the first).
        execute_raw(&mut s, slow);
        drop(s);
        std::thread::sleep(Duration::from_millis(300));
        execute_raw(&mut other, id);
        assert_eq!(read_binary_rows(&mut other), vec![2u64.to_le_bytes().to_vec()], "round {round}: the other session");
        let mut fresh = login_raw(rig.addr);
        let fid = prepare_raw(&mut fresh, "SELECT @@server_id", false);
        for _ in 0..3 {
            execute_raw(&mut fresh, fid);
            assert_eq!(read_binary_rows(&mut fresh), vec![2u64.to_le_bytes().to_vec()], "round {round}: a new session");
        }
    }
    ping_raw(&mut other);
    assert!(rig.metrics.kernel_routed.get() >= 5, "reads went through the kernel: {}", rig.metrics.kernel_routed.get());
}
