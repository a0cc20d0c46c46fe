//! db-router overhead, side by side in one run: sysbench (Debian's 1.0.20) through the router
//! and directly to the primary, on one MariaDB primary/replica pair started by
//! `db_router::tier`:
//!
//! - `oltp_point_select` at 1 and 4 threads,
//! - `oltp_read_only --skip_trx=on` at 4 threads (autocommit reads: the router sends them to
//!   the replica).
//!
//! sysbench's default `--db-ps-mode=auto` uses prepared statements (COM_STMT_*), so the
//! router's prepared-statement path is what is measured. Reported: QPS both ways, their
//! ratio, and the latency the router adds per query (threads / QPS, router minus direct).
//! Targets from issue 6: at least 0.9x direct QPS, under 20 µs added per point select at one
//! thread. Everything shares the machine's CPUs (sysbench, router, both servers), so on a busy
//! machine every extra hop also waits for a CPU; the router's own CPU time per query
//! (`getrusage` of this process, which is the router) is reported beside it.
//!
//! Then, for the point select at one thread, where the hop costs most, the same rounds with
//! reference paths that show what the hop itself costs on this machine:
//!
//! - direct to the replica (where the router sends these reads),
//! - HAProxy in TCP mode in front of the replica: a relay that parses nothing and routes
//!   nothing, the floor for any proxy that relays over loopback TCP,
//! - the router with Unix sockets on both legs (`listen_socket`, `sockets`: a router beside
//!   the application and the servers), next to sysbench directly on the primary's socket.
//!
//! Placement: everything is measured twice, first as the scheduler places it, then
//! `colocated`: sysbench and the router (and HAProxy) pinned to CPU 0, both servers to CPU 1,
//! a router beside the application with the database on other hardware (the common ProxySQL
//! layout). Direct runs get the same pinning of sysbench and servers. `DB_BENCH_PIN=none`,
//! `colocated` or `one-cpu` (everything on CPU 0) measures that placement only.
//!
//! `cargo xtask bench` runs it; alone: `cargo run --release -p tests --bin db-bench [seconds]`;
//! `db-bench hold` starts everything, prints the addresses and waits (for profiling by hand).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Arc,
    time::Duration,
};

use db_router::{
    protocol,
    router::{self, Metrics, Settings, Shared, User},
    tier::{self, Pair, SYSBENCH},
    topology::{self, Routing},
};
use prometheus_client::registry::Registry;
use tests::process_cpu_time;

const TABLES: u32 = 4;
const TABLE_SIZE: u32 = 10_000;
/// Each workload alternates direct and routed runs this many times.
const ROUNDS: u32 = 5;

struct Run {
    qps: f64,
    avg_ms: f64,
    errors: u64,
}

/// Where sysbench connects.
#[derive(Clone, Copy)]
enum To<'a> {
    Tcp(u16),
    Socket(&'a Path),
}

impl To<'_> {
    fn args(&self) -> Vec<String> {
        match self {
            To::Tcp(port) => vec!["--mysql-host=127.0.0.1".into(), format!("--mysql-port={port}")],
            To::Socket(path) => vec![format!("--mysql-socket={}", path.display())],
        }
    }
}

/// CPU lists for the application side (sysbench, router, HAProxy) and the servers.
struct Placement {
    name: &'static str,
    app: Option<&'static str>,
    db: Option<&'static str>,
}

const NONE: Placement = Placement { name: "none pinned (the scheduler places everything)", app: None, db: None };
const COLOCATED: Placement =
    Placement { name: "colocated: sysbench, router and HAProxy pinned to CPU 0, both servers to CPU 1", app: Some("0"), db: Some("1") };
const ONE_CPU: Placement = Placement { name: "one-cpu: everything pinned to CPU 0", app: Some("0"), db: Some("0") };

/// The placement being measured (sysbench runs are pinned by it).
static PLACEMENT: std::sync::Mutex<&Placement> = std::sync::Mutex::new(&NONE);

fn placement() -> &'static Placement {
    *PLACEMENT.lock().unwrap_or_else(|e| e.into_inner())
}

fn placements() -> Vec<&'static Placement> {
    match std::env::var("DB_BENCH_PIN").as_deref() {
        Ok("none") => vec![&NONE],
        Ok("colocated") => vec![&COLOCATED],
        Ok("one-cpu") => vec![&ONE_CPU],
        Ok("") | Err(_) => vec![&NONE, &COLOCATED],
        Ok(other) => panic!("DB_BENCH_PIN={other:?}: use none, colocated or one-cpu (unset: none, then colocated)"),
    }
}

/// Pins the router threads, HAProxy and the servers as `place` says (all CPUs where it says
/// nothing, undoing an earlier placement); sysbench runs read it from [`placement`].
fn apply(place: &'static Placement, haproxy: u32, servers: [u32; 2]) {
    let all = format!("0-{}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) - 1);
    let app = place.app.unwrap_or(&all);
    pin_router_threads(app);
    pin_process(haproxy, app);
    for pid in servers {
        pin_process(pid, place.db.unwrap_or(&all));
    }
    *PLACEMENT.lock().unwrap_or_else(|e| e.into_inner()) = place;
}

/// `taskset -a -p` on a process (all its threads).
fn pin_process(pid: u32, cpus: &str) {
    let ok = Command::new("taskset").args(["-a", "-p", "-c", cpus, &pid.to_string()]).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "taskset -a -p -c {cpus} {pid} failed");
}

/// Pins this process's router threads (named `db-router-*`).
fn pin_router_threads(cpus: &str) {
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("db-router") {
            let tid = task.file_name().to_string_lossy().into_owned();
            let ok = Command::new("taskset").args(["-p", "-c", cpus, &tid]).output().map(|o| o.status.success()).unwrap_or(false);
            assert!(ok, "taskset -p -c {cpus} {tid} failed");
        }
    }
}

fn sysbench(to: To<'_>, args: &[&str], threads: u32, seconds: u32) -> Run {
    // Bounded in time even if a connection hangs (sysbench would wait for it forever):
    // killed a minute after its own run time.
    let mut cmd = Command::new("timeout");
    cmd.args(["-s", "KILL", &(seconds + 60).to_string()]);
    if let Some(cpus) = placement().app {
        cmd.args(["taskset", "-c", cpus]);
    }
    let out = cmd
        .arg("sysbench")
        .args(args)
        .args(to.args())
        .args([
            "--db-driver=mysql",
            &format!("--mysql-user={}", SYSBENCH.user),
            &format!("--mysql-password={}", SYSBENCH.password),
            &format!("--mysql-db={}", tier::SYSBENCH_DB),
            "--mysql-ssl=off",
            &format!("--tables={TABLES}"),
            &format!("--table-size={TABLE_SIZE}"),
            &format!("--threads={threads}"),
            &format!("--time={seconds}"),
            "run",
        ])
        .output()
        .expect("run sysbench (apt-get install sysbench)");
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!("sysbench failed ({}):\n{text}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    // "    queries:                             147361 (14735.41 per sec.)"
    let field = |label: &str| -> Option<&str> { text.lines().find(|l| l.trim_start().starts_with(label)).map(|l| l.trim()) };
    let per_sec = |line: &str| -> f64 { line.split('(').nth(1).and_then(|s| s.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    let qps = field("queries:").map(per_sec).unwrap_or(0.0);
    let errors = field("ignored errors:").and_then(|l| l.split_whitespace().nth(2)).and_then(|v| v.parse().ok()).unwrap_or(0);
    let avg_ms = field("avg:").and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(qps > 0.0, "no QPS in sysbench output:\n{text}");
    Run { qps, avg_ms, errors }
}

/// CPU time (user + system) of this process so far, plus the kernel workers' (`kworker/*`):
/// the in-kernel relay sends redirected answers from a workqueue, work the router caused
/// but its own threads do not run (on an otherwise idle machine, kworkers do little else).
fn cpu_time() -> Duration {
    rusage(libc::RUSAGE_SELF) + kworker_cpu_time()
}

fn kworker_cpu_time() -> Duration {
    let mut total = Duration::ZERO;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.starts_with("kworker")) {
            total += process_cpu_time(pid);
        }
    }
    total
}

/// CPU time of the waited-for children (the sysbench runs) so far.
fn children_cpu_time() -> Duration {
    rusage(libc::RUSAGE_CHILDREN)
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// HAProxy in TCP mode in front of `backend`, stopped (and its directory removed) on drop.
struct Haproxy {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Haproxy {
    fn start(backend: std::net::SocketAddr) -> Haproxy {
        let dir = std::env::temp_dir().join(format!("db-bench-haproxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("haproxy temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let cfg = dir.join("haproxy.cfg");
        let text = format!(
            "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1h\n    timeout server 1h\n\
             listen db\n    bind 127.0.0.1:{port}\n    server db {backend}\n"
        );
        std::fs::write(&cfg, text).expect("write haproxy.cfg");
        let child = Command::new("haproxy").arg("-db").arg("-f").arg(&cfg).spawn().expect("run haproxy (apt-get install haproxy)");
        let h = Haproxy { child, dir, port };
        tier::poll("haproxy listening", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        h
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One path of the comparison rows: where sysbench connects and whose CPU to charge.
struct Lane<'a> {
    name: &'a str,
    to: To<'a>,
    /// `Some(None)`: this process (the router); `Some(Some(pid))`: that process (HAProxy).
    relay: Option<Option<u32>>,
}

fn users_for_bench() -> std::collections::HashMap<String, User> {
    [(SYSBENCH.user.to_string(), User { stored: Some(protocol::native_stored_hash(SYSBENCH.password.as_bytes())) })].into()
}

fn main() {
    let arg = std::env::args().nth(1);
    let hold = arg.as_deref() == Some("hold");
    let seconds: u32 = arg.and_then(|s| s.parse().ok()).unwrap_or(10);
    if !tier::available_or_skip("db-bench") {
        std::process::exit(1);
    }
    eprintln!("db-bench: starting a MariaDB primary/replica pair");
    let pair = Pair::start_default().expect("start a primary/replica pair");
    let primary = pair.primary.connect_addr();

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let (publisher, subscriber) =
        topology::channel(Routing { primary: Some(primary), replica: Some(pair.replica.connect_addr()), generation: 1, down: Vec::new() });
    let shared = Shared::new(users_for_bench(), Settings::default(), Arc::clone(&metrics), subscriber);
    // The router runs on its own threads, as `db-router run` does.
    // As many as `db-router run` uses by default; DB_BENCH_ROUTER_THREADS overrides.
    let threads = std::env::var("DB_BENCH_ROUTER_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or_else(router::default_threads);
    let fast_path = shared.fast.get().is_some();
    let router_addr = router::serve_threads("127.0.0.1:0".parse().unwrap(), shared, threads).expect("router listens");
    // The same router with replica answers to plain reads sent by the kernel
    // (`kernel_relay = true`, off by default: see docs/benchmark-history.md).
    let kernel_settings = Settings { kernel_relay: true, kernel_fast_path: false, ..Settings::default() };
    let kernel_shared = Shared::new(users_for_bench(), kernel_settings, Arc::clone(&metrics), publisher.subscribe());
    let kernel_relay = kernel_shared.kernel.get().is_some();
    let kernel_router = router::serve_threads("127.0.0.1:0".parse().unwrap(), kernel_shared, threads).expect("router listens");
    // A second router for the Unix-socket row: clients on its socket, servers on theirs.
    // The default router without the in-kernel fast path for prepared reads.
    let slow_shared = Shared::new(users_for_bench(), Settings { kernel_fast_path: false, ..Settings::default() }, Arc::clone(&metrics), publisher.subscribe());
    let slow_router = router::serve_threads("127.0.0.1:0".parse().unwrap(), slow_shared, threads).expect("router listens");
    let unix_settings = Settings {
        kernel_fast_path: false,
        sockets: [(primary, pair.primary.socket()), (pair.replica.connect_addr(), pair.replica.socket())].into(),
        ..Settings::default()
    };
    let unix_shared = Shared::new(users_for_bench(), unix_settings, Arc::clone(&metrics), publisher.subscribe());
    let socket_path = std::env::temp_dir().join(format!("db-bench-router-{}.sock", std::process::id()));
    let router_socket = router::UnixSocket::bind(&socket_path).expect("router socket");
    router::serve_threads_with("127.0.0.1:0".parse().unwrap(), Some(&router_socket), unix_shared, threads).expect("router listens on its socket");
    let haproxy = Haproxy::start(pair.replica.connect_addr());
    let servers = [&pair.primary, &pair.replica].map(|s| s.pid().expect("server runs") as u32);

    eprintln!("db-bench: sysbench prepare ({TABLES} tables x {TABLE_SIZE} rows) on the primary");
    let prep = Command::new("sysbench")
        .args(["oltp_read_only", "--db-driver=mysql", "--mysql-host=127.0.0.1", "--mysql-ssl=off"])
        .arg(format!("--mysql-port={}", primary.port()))
        .arg(format!("--mysql-user={}", SYSBENCH.user))
        .arg(format!("--mysql-password={}", SYSBENCH.password))
        .arg(format!("--mysql-db={}", tier::SYSBENCH_DB))
        .arg(format!("--tables={TABLES}"))
        .arg(format!("--table-size={TABLE_SIZE}"))
        .arg("prepare")
        .output()
        .expect("run sysbench prepare");
    assert!(prep.status.success(), "sysbench prepare: {}", String::from_utf8_lossy(&prep.stderr));
    pair.wait_caught_up(Duration::from_secs(120)).expect("replica caught up");
    if hold {
        // For profiling by hand: everything stays up until stdin closes.
        println!(
            "router 127.0.0.1:{} (with the in-kernel read relay: 127.0.0.1:{}) (pid {}), primary {} (pid {:?}), replica {} (pid {:?}); close stdin to stop",
            router_addr.port(),
            kernel_router.port(),
            std::process::id(),
            primary,
            pair.primary.pid(),
            pair.replica.connect_addr(),
            pair.replica.pid()
        );
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        return;
    }

    let workloads: [(&str, &[&str], u32); 3] = [
        ("oltp_point_select, 1 thread", &["oltp_point_select"], 1),
        ("oltp_point_select, 4 threads", &["oltp_point_select"], 4),
        ("oltp_read_only --skip_trx=on, 4 threads", &["oltp_read_only", "--skip_trx=on"], 4),
    ];
    println!(
        "in-kernel read relay (the lane of that name only): {}",
        if kernel_relay { "loaded (replica answers to plain reads go from backend socket to client socket via BPF sockmap)" } else { "unavailable (see the warning above): that lane relays in user space" }
    );
    println!(
        "in-kernel fast path for prepared reads (default, on the router of the first table and the lane \"router, TCP\"): {}",
        if fast_path { "loaded (prepared reads go from the client's socket to the replica's and back via BPF sockmap, past the router)" } else { "unavailable (see the warning above): the router relays every statement" }
    );
    println!("db-router vs direct to the primary, sysbench {seconds} s per path and workload ({ROUNDS} alternating runs), same machine (2 vCPUs shared)");
    for place in placements() {
        apply(place, haproxy.child.id(), servers);
        println!();
        println!("placement: {}", place.name);
        measure(&workloads, seconds, primary.port(), router_addr.port());
        compare_lanes(&[
            Lane { name: "direct to the primary, TCP", to: To::Tcp(primary.port()), relay: None },
            Lane { name: "router, TCP", to: To::Tcp(router_addr.port()), relay: Some(None) },
            Lane { name: "router, TCP, no in-kernel fast path", to: To::Tcp(slow_router.port()), relay: Some(None) },
            Lane { name: "router, TCP, in-kernel read relay", to: To::Tcp(kernel_router.port()), relay: Some(None) },
            Lane { name: "direct to the replica, TCP", to: To::Tcp(pair.replica.connect_addr().port()), relay: None },
            Lane { name: "HAProxy tcp mode -> replica, TCP", to: To::Tcp(haproxy.port), relay: Some(Some(haproxy.child.id())) },
            Lane { name: "direct to the primary, Unix socket", to: To::Socket(&pair.primary.socket()), relay: None },
            Lane { name: "router, Unix sockets both legs", to: To::Socket(router_socket.path()), relay: Some(None) },
        ], seconds);
    }
    println!();
    println!(
        "router statements: {} to the replica, {} to the primary",
        metrics.to_replica.get(),
        metrics.to_primary.get()
    );
    println!("targets (issue 6): ratio >= 0.90, added < 20 µs per point select at 1 thread");
    println!("router CPU: this process's user+system time per routed query, including the kernel's loopback TCP work it triggers, plus the kworkers' time (the in-kernel relay's sends)");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the end: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    drop(haproxy);
    drop(router_socket);
    drop(pair);
}

/// The workloads through the router and directly to the primary, alternated.
fn measure(workloads: &[(&str, &[&str], u32)], seconds: u32, primary: u16, router: u16) {
    println!(
        "{:<42} {:>11} {:>11} {:>6} {:>12} {:>15} {:>16} {:>7}",
        "workload", "direct QPS", "router QPS", "ratio", "round ratios", "added µs/query", "router CPU µs/q", "errors"
    );
    for &(name, args, threads) in workloads {
        // Warm both paths (buffer pool, the router's connections), then measure.
        sysbench(To::Tcp(primary), args, threads, 2);
        sysbench(To::Tcp(router), args, threads, 2);
        // Alternate short runs, so that both paths see the same background load.
        let (mut direct, mut routed, mut router_cpu) = (Run { qps: 0.0, avg_ms: 0.0, errors: 0 }, Run { qps: 0.0, avg_ms: 0.0, errors: 0 }, Duration::ZERO);
        let mut client_cpu = Duration::ZERO;
        // Each round's router/direct ratio: their spread shows how much the machine's other
        // load moved the figures.
        let (mut lo, mut hi) = (f64::MAX, 0.0f64);
        let chunk = (seconds / ROUNDS).max(1);
        for _ in 0..ROUNDS {
            let c0 = children_cpu_time();
            let d = sysbench(To::Tcp(primary), args, threads, chunk);
            client_cpu += children_cpu_time().saturating_sub(c0);
            let cpu0 = cpu_time();
            let r = sysbench(To::Tcp(router), args, threads, chunk);
            // This process is the router (the benchmark driver only waits for sysbench).
            // Saturating: a kworker that exits takes its CPU time out of the sum.
            router_cpu += cpu_time().saturating_sub(cpu0);
            direct.qps += d.qps / ROUNDS as f64;
            direct.avg_ms += d.avg_ms / ROUNDS as f64;
            routed.qps += r.qps / ROUNDS as f64;
            routed.avg_ms += r.avg_ms / ROUNDS as f64;
            routed.errors += r.errors;
            lo = lo.min(r.qps / d.qps);
            hi = hi.max(r.qps / d.qps);
        }
        let router_cpu_us = router_cpu.as_secs_f64() * 1e6 / (routed.qps * (chunk * ROUNDS) as f64);
        let client_cpu_us = client_cpu.as_secs_f64() * 1e6 / (direct.qps * (chunk * ROUNDS) as f64);
        let added_us = (threads as f64 / routed.qps - threads as f64 / direct.qps) * 1e6;
        println!(
            "{name:<42} {:>11.0} {:>11.0} {:>5.2}x {:>12} {:>15.1} {:>16.1} {:>7}",
            direct.qps,
            routed.qps,
            routed.qps / direct.qps,
            format!("{lo:.2}-{hi:.2}"),
            added_us,
            router_cpu_us,
            routed.errors
        );
        eprintln!("db-bench: {name}: sysbench avg latency {:.3} ms direct, {:.3} ms through the router", direct.avg_ms, routed.avg_ms);
        println!("{:<42} sysbench's own CPU per query (direct, for scale): {client_cpu_us:.1} µs", "");
    }
}

/// The point select at one thread over several paths, alternated round by round; QPS, ratio
/// and added latency against the first path, and the relay's CPU per query.
fn compare_lanes(lanes: &[Lane<'_>], seconds: u32) {
    let args: &[&str] = &["oltp_point_select"];
    for p in lanes {
        sysbench(p.to, args, 1, 1);
    }
    let chunk = (seconds / ROUNDS).max(1);
    let mut qps = vec![0.0; lanes.len()];
    let mut cpu = vec![Duration::ZERO; lanes.len()];
    let mut spread = vec![(f64::MAX, 0.0f64); lanes.len()];
    for _ in 0..ROUNDS {
        let mut first = 0.0;
        for (i, p) in lanes.iter().enumerate() {
            let before = p.relay.map(|pid| pid.map(process_cpu_time).unwrap_or_else(cpu_time));
            let r = sysbench(p.to, args, 1, chunk);
            if let (Some(b), Some(pid)) = (before, p.relay) {
                cpu[i] += pid.map(process_cpu_time).unwrap_or_else(cpu_time).saturating_sub(b);
            }
            qps[i] += r.qps / ROUNDS as f64;
            if i == 0 {
                first = r.qps;
            }
            spread[i] = (spread[i].0.min(r.qps / first), spread[i].1.max(r.qps / first));
        }
    }
    println!();
    println!("oltp_point_select, 1 thread, by path ({ROUNDS} alternating runs of {chunk} s each):");
    println!("{:<42} {:>11} {:>14} {:>12} {:>15} {:>16}", "path", "QPS", "vs first row", "round ratios", "added µs/query", "relay CPU µs/q");
    for (i, p) in lanes.iter().enumerate() {
        let cpu_us = if p.relay.is_some() { format!("{:.1}", cpu[i].as_secs_f64() * 1e6 / (qps[i] * (chunk * ROUNDS) as f64)) } else { "-".into() };
        let (lo, hi) = spread[i];
        println!(
            "{:<42} {:>11.0} {:>13.2}x {:>12} {:>15.1} {:>16}",
            p.name,
            qps[i],
            qps[i] / qps[0],
            format!("{lo:.2}-{hi:.2}"),
            (1.0 / qps[i] - 1.0 / qps[0]) * 1e6,
            cpu_us
        );
    }
}
