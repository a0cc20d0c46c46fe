//! The monitor against real MariaDB pairs: failover after kill -9, nothing acknowledged lost,
//! the returning old primary fenced, rejoin, lagging replicas get no reads; plus the admin API.
//! Without MariaDB the pair tests skip with a printed reason, or fail when `CI` is set.

use std::net::SocketAddr;
use std::time::Duration;

use db_router::admin::{self, Admin};
use db_router::monitor::{Monitor, MonitorConfig, MonitorHandle};
use db_router::tier::{self, Instance, Pair, TierError, APP};
use db_router::topology::{self, Routing, Subscriber};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::block_in_place;

const DEADLINE: Duration = Duration::from_secs(60);

struct Monitored {
    handle: MonitorHandle,
    routing: Subscriber,
    admin: SocketAddr,
    _admin_task: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn test_config() -> MonitorConfig {
    MonitorConfig { interval_ms: 100, fail_after: 3, ..Default::default() }
}

async fn monitor(cfg: MonitorConfig, backends: Vec<SocketAddr>) -> Monitored {
    // The monitor's log lines appear in a failing test's output.
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("db_router=info").try_init();
    let (publisher, routing) =
        topology::channel(Routing { primary: Some(backends[0]), replica: None, generation: 0, down: Vec::new() });
    let mut registry = Registry::default();
    let handle = Monitor::spawn(cfg, backends, publisher, &mut registry);
    let admin = Admin { registry: std::sync::Arc::new(registry), monitor: Some(handle.clone()) };
    let (admin, task) = admin::spawn("127.0.0.1:0".parse().unwrap(), admin).await.unwrap();
    Monitored { handle, routing, admin, _admin_task: AbortOnDrop(task) }
}

/// Waits (bounded) until the published routing satisfies `ok`.
async fn wait_routing(sub: &mut Subscriber, what: &str, ok: impl Fn(&Routing) -> bool) -> Routing {
    let got = match tokio::time::timeout(DEADLINE, sub.wait_for(|r| ok(r))).await {
        Ok(r) => Some(r.expect("monitor running").clone()),
        Err(_) => None,
    };
    got.unwrap_or_else(|| panic!("timed out waiting for {what}; routing is {:?}", *sub.borrow()))
}

/// Polls a blocking check (bounded) off the runtime's task threads.
fn poll<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    block_in_place(|| tier::poll(what, DEADLINE, f))
}

/// A minimal HTTP/1.1 request; returns (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn start_pair(test: &str) -> Option<Pair> {
    if !tier::available_or_skip(test) {
        return None;
    }
    Some(block_in_place(Pair::start_default).expect("start a primary/replica pair"))
}

fn is_read_only_error(r: Result<String, TierError>) -> bool {
    matches!(r, Err(TierError::Sql { stderr, .. }) if stderr.contains("1290"))
}

fn count(inst: &Instance, table: &str) -> String {
    inst.value(&format!("SELECT COUNT(*) FROM app.{table}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_primary_promotes_replica_fences_old_primary_and_rejoin_restores_it() {
    let Some(mut pair) = start_pair("kill9_primary_promotes_replica_fences_old_primary_and_rejoin_restores_it") else {
        return;
    };
    let (old, new) = (pair.primary.connect_addr(), pair.replica.connect_addr());
    let mut m = monitor(test_config(), vec![old, new]).await;
    let start = wait_routing(&mut m.routing, "the replica to serve reads", |r| {
        r.primary == Some(old) && r.replica == Some(new)
    })
    .await;

    // Writes acknowledged by the primary (semi-sync AFTER_SYNC: the replica has them).
    block_in_place(|| {
        pair.primary.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(40))").unwrap();
        for i in 0..20 {
            pair.primary.sql_as(&APP, &format!("INSERT INTO t VALUES ({i}, 'before the crash')")).unwrap();
        }
        pair.primary.kill9().unwrap();
    });

    let after = wait_routing(&mut m.routing, "the replica to be promoted", |r| r.primary == Some(new)).await;
    assert!(after.generation > start.generation, "{start:?} -> {after:?}");
    assert_eq!(after.replica, None, "no replica left for reads");

    let status = m.handle.status();
    assert_eq!(status.failovers, 1, "{status:?}");
    let record = status.last_failover.expect("failover recorded");
    assert_eq!((record.from, record.to), (old, new));

    block_in_place(|| {
        assert_eq!(pair.replica.value("SELECT @@read_only").unwrap(), "0");
        assert!(pair.replica.slave_status().unwrap().is_empty(), "RESET SLAVE ALL");
        // Nothing acknowledged was lost, and the new primary takes writes.
        assert_eq!(count(&pair.replica, "t"), "20");
        pair.replica.sql_as(&APP, "INSERT INTO t VALUES (100, 'after the failover')").unwrap();
        // The old primary comes back (as after a crash, read_only=OFF in its config).
        pair.primary.start().unwrap();
    });

    poll("the monitor to fence the returning old primary", || {
        (pair.primary.value("SELECT @@read_only").ok()? == "1").then_some(())
    });
    block_in_place(|| {
        assert!(is_read_only_error(pair.primary.sql_as(&APP, "INSERT INTO t VALUES (200, 'split brain')")));
        assert_eq!(count(&pair.primary, "t"), "20");
    });
    assert_eq!(m.routing.borrow().primary, Some(new), "the old primary takes no writes");
    // The monitor counts the fence and publishes its hint once the SET's reply is back,
    // which may be just after the test saw read_only=1.
    let lines = [r#"db_router_monitor_events_total{event="failover"} 1"#, r#"db_router_monitor_events_total{event="fence"} 1"#];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (code, metrics) = http(m.admin, "GET", "/metrics").await;
        let (status_code, body) = http(m.admin, "GET", "/status").await;
        assert_eq!((code, status_code), (200, 200));
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        let hint = status["hint"].as_str().unwrap_or("").contains("/rejoin");
        if lines.iter().all(|l| metrics.contains(l)) && hint {
            assert_eq!(status["failovers"], 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "after {DEADLINE:?}: {lines:?} in\n{metrics}\nand a /rejoin hint in {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Rejoin through the admin API: it replicates from the new primary and serves reads.
    let (code, body) = http(m.admin, "POST", "/rejoin").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&old.to_string()), "{body}");
    let r = wait_routing(&mut m.routing, "the old primary to serve reads", |r| r.replica == Some(old)).await;
    assert_eq!(r.primary, Some(new));
    block_in_place(|| {
        tier::wait_caught_up(&pair.replica, &pair.primary, DEADLINE).unwrap();
        assert_eq!(count(&pair.primary, "t"), "21");
        assert_eq!(pair.primary.value("SELECT @@read_only").unwrap(), "1");
        let s = pair.primary.slave_status().unwrap();
        assert_eq!(s.get("Master_Port").map(String::as_str), Some(new.port().to_string().as_str()));
    });
    // Nothing left to rejoin.
    let (code, body) = http(m.admin, "POST", "/rejoin").await;
    assert_eq!(code, 409, "{body}");

    // The new primary dies within the anti-flap window: no second automatic failover.
    block_in_place(|| pair.replica.kill9().unwrap());
    let primary = poll("the monitor to refuse a second failover", || {
        let s = m.handle.status();
        s.failover_blocked.is_some_and(|r| r.contains("anti-flap")).then_some(s.primary)
    });
    assert_eq!(primary, None, "writes wait: no primary published");
    assert_eq!(m.handle.status().failovers, 1);
    block_in_place(|| assert_eq!(pair.primary.value("SELECT @@read_only").unwrap(), "1", "not promoted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_or_stopped_replica_gets_no_reads() {
    let Some(pair) = start_pair("lagging_or_stopped_replica_gets_no_reads") else { return };
    let (p, r) = (pair.primary.connect_addr(), pair.replica.connect_addr());
    let cfg = MonitorConfig { max_replication_lag_s: Some(1), ..test_config() };
    let mut m = monitor(cfg, vec![p, r]).await;
    wait_routing(&mut m.routing, "the replica to serve reads", |x| x.replica == Some(r)).await;
    block_in_place(|| pair.primary.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY)").unwrap());

    // Applier stopped: lag unknown, no reads.
    block_in_place(|| {
        pair.stop_replica_sql().unwrap();
        pair.primary.sql_as(&APP, "INSERT INTO t VALUES (1)").unwrap();
    });
    wait_routing(&mut m.routing, "reads to leave the stopped replica", |x| x.replica.is_none()).await;
    assert_eq!(m.routing.borrow().primary, Some(p));
    block_in_place(|| pair.start_replica_sql().unwrap());
    wait_routing(&mut m.routing, "reads to come back", |x| x.replica == Some(r)).await;

    // Applier running but behind (delayed replication): lag over 1 s, no reads.
    block_in_place(|| {
        pair.replica.sql("STOP SLAVE; CHANGE MASTER TO MASTER_DELAY=3600; START SLAVE").unwrap();
        pair.primary.sql_as(&APP, "INSERT INTO t VALUES (2)").unwrap();
    });
    let lagging = poll("the replica's lag to exceed 1 s", || {
        let status = m.handle.status();
        let b = status.backends.into_iter().find(|b| b.addr == r).unwrap();
        let lag = b.check.replication.as_ref().and_then(|x| x.seconds_behind_master);
        lag.is_some_and(|l| l > 1).then_some(b)
    });
    assert!(!lagging.serves_reads, "{lagging:?}");
    // The status is stored before the routing view is sent.
    wait_routing(&mut m.routing, "reads to leave the lagging replica", |x| x.replica.is_none()).await;

    block_in_place(|| pair.replica.sql("STOP SLAVE; CHANGE MASTER TO MASTER_DELAY=0; START SLAVE").unwrap());
    wait_routing(&mut m.routing, "reads to come back", |x| x.replica == Some(r)).await;
    assert_eq!(m.handle.status().failovers, 0);

    // Rejoin does not apply to a healthy pair.
    let (code, body) = http(m.admin, "POST", "/rejoin").await;
    assert_eq!((code, body.contains("no reachable backend needs a rejoin")), (409, true), "{body}");
    let (code, body) = http(m.admin, "POST", &format!("/rejoin?backend={p}")).await;
    assert_eq!((code, body.contains("is the primary")), (409, true), "{body}");
    let (code, body) = http(m.admin, "POST", &format!("/rejoin?backend={r}")).await;
    assert_eq!((code, body.contains("already replicates")), (409, true), "{body}");

    // Holistic detection: a second monitor cannot reach the primary (nothing listens where
    // it looks) but the replica still replicates from it: the primary is not published, and
    // the replica is not promoted.
    let mut blind = monitor(MonitorConfig { fail_after: 2, ..test_config() }, vec![free_port(), r]).await;
    wait_routing(&mut blind.routing, "the unreachable primary to be declared down", |x| x.primary.is_none()).await;
    poll("the failover to be refused", || {
        blind.handle.status().failover_blocked.filter(|b| b.contains("still sees the primary"))
    });
    assert_eq!(blind.handle.status().failovers, 0);
    block_in_place(|| {
        assert_eq!(pair.replica.value("SELECT @@read_only").unwrap(), "1");
        assert_eq!(pair.replica.slave_status().unwrap().get("Slave_IO_Running").map(String::as_str), Some("Yes"));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_that_cannot_apply_what_it_received_is_not_promoted() {
    let Some(mut pair) = start_pair("replica_that_cannot_apply_what_it_received_is_not_promoted") else { return };
    let (p, r) = (pair.primary.connect_addr(), pair.replica.connect_addr());
    block_in_place(|| {
        pair.primary.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY)").unwrap();
        pair.wait_caught_up(DEADLINE).unwrap();
        // A row only the replica has (not binlogged) makes the primary's insert of the same
        // key fail to apply there: received, never applied.
        pair.replica.sql("SET SESSION sql_log_bin=0; INSERT INTO app.t VALUES (5)").unwrap();
        pair.primary.sql_as(&APP, "INSERT INTO t VALUES (5)").unwrap();
    });
    poll("the replica's applier to stop on the duplicate key", || {
        let s = pair.replica.slave_status().ok()?;
        (s.get("Slave_SQL_Running").map(String::as_str) == Some("No")).then_some(())
    });
    let cfg = MonitorConfig { promote_apply_timeout_ms: 500, ..test_config() };
    let m = monitor(cfg, vec![p, r]).await;
    block_in_place(|| pair.primary.kill9().unwrap());
    let status = poll("a promotion attempt to fail", || {
        let s = m.handle.status();
        s.last_promotion_error.is_some().then_some(s)
    });
    let error = status.last_promotion_error.unwrap();
    assert!(error.contains("did not apply"), "{error}");
    assert_eq!((status.failovers, status.primary), (0, None));
    block_in_place(|| {
        assert_eq!(pair.replica.value("SELECT @@read_only").unwrap(), "1", "not made writable");
        let s = pair.replica.slave_status().unwrap();
        assert_eq!(s.get("Master_Port").map(String::as_str), Some(p.port().to_string().as_str()), "still follows the old primary");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_of_a_diverged_old_primary_fails_with_the_reason() {
    let Some(mut pair) = start_pair("rejoin_of_a_diverged_old_primary_fails_with_the_reason") else { return };
    let (old, new) = (pair.primary.connect_addr(), pair.replica.connect_addr());
    let mut m = monitor(test_config(), vec![old, new]).await;
    wait_routing(&mut m.routing, "the replica to serve reads", |r| r.replica == Some(new)).await;
    block_in_place(|| {
        pair.primary.sql_as(&APP, "CREATE TABLE t (id INT PRIMARY KEY)").unwrap();
        pair.primary.kill9().unwrap();
    });
    wait_routing(&mut m.routing, "the replica to be promoted", |r| r.primary == Some(new)).await;
    block_in_place(|| {
        pair.replica.sql_as(&APP, "INSERT INTO t VALUES (1)").unwrap();
        pair.primary.start().unwrap();
    });
    poll("the old primary to be fenced", || (pair.primary.value("SELECT @@read_only").ok()? == "1").then_some(()));
    // root (SUPER) writes past read_only: a transaction the new primary never had.
    block_in_place(|| pair.primary.sql("INSERT INTO app.t VALUES (2)").unwrap());

    let (code, body) = http(m.admin, "POST", "/rejoin").await;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("replication stopped"), "{body}");
    let status = m.handle.status();
    assert_eq!((status.primary, status.replica, status.failovers), (Some(new), None, 1));
    block_in_place(|| assert_eq!(pair.primary.value("SELECT @@read_only").unwrap(), "1"));
}

/// A loopback port nothing listens on (bound, noted, closed).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// No MariaDB needed: nothing listens on the backends' ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backends_are_reported_down_and_no_primary_is_published() {
    let (p, r) = (free_port(), free_port());
    let mut m = monitor(test_config(), vec![p, r]).await;
    let routing = wait_routing(&mut m.routing, "the primary to be declared down", |x| x.primary.is_none()).await;
    assert!(routing.generation >= 1);
    let status = m.handle.status();
    assert!(status.primary_down);
    assert!(status.failover_blocked.as_deref().unwrap_or("").contains("no reachable replica"), "{status:?}");
    for b in &status.backends {
        assert!(!b.check.reachable && b.consecutive_failures >= 3, "{b:?}");
        assert!(b.check.error.as_deref().unwrap_or("").contains("connect"), "{b:?}");
    }
    let (code, body) = http(m.admin, "GET", "/ready").await;
    assert_eq!(code, 503, "{body}");
    // Bad requests are 4xx with a reason.
    let cases = [
        ("GET", "/nope", 404, "no such endpoint"),
        ("GET", "/rejoin", 405, "takes POST"),
        ("POST", "/status", 405, "takes GET"),
        ("POST", "/rejoin?backend=nonsense", 400, "not IP:PORT"),
        ("POST", "/rejoin?color=red", 400, "unknown parameter"),
        ("POST", "/rejoin?backend=10.9.9.9:1", 409, "not a monitored backend"),
    ];
    for (method, path, code, reason) in cases {
        let (got, body) = http(m.admin, method, path).await;
        assert_eq!(got, code, "{method} {path}: {body}");
        assert!(body.contains(reason), "{method} {path}: {body}");
    }
    let (code, _) = http(m.admin, "GET", "/live").await;
    assert_eq!(code, 200);
    let (code, body) = http(m.admin, "POST", "/rejoin").await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("no healthy primary"), "{body}");
    let (_, metrics) = http(m.admin, "GET", "/metrics").await;
    assert!(metrics.contains(&format!("db_router_monitor_backend_up{{backend=\"{p}\"}} 0")), "{metrics}");
    assert!(metrics.contains(r#"db_router_monitor_events_total{event="primary_down"} 1"#), "{metrics}");
}

/// No MariaDB needed: a monitor whose handles are all dropped keeps serving its readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_outlives_its_handles_while_the_routing_is_read() {
    let (publisher, mut routing) =
        topology::channel(Routing { primary: Some(free_port()), replica: None, generation: 0, down: Vec::new() });
    let backends = vec![publisher.borrow().primary.unwrap(), free_port()];
    drop(Monitor::spawn(test_config(), backends, publisher, &mut Registry::default()));
    let r = wait_routing(&mut routing, "the primary to be declared down", |x| x.primary.is_none()).await;
    assert!(r.generation >= 1);
}
