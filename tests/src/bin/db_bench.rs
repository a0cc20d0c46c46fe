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
//! `cargo xtask bench` runs it; alone: `cargo run --release -p tests --bin db-bench [seconds]`.

use std::{process::Command, sync::Arc, time::Duration};

use db_router::{
    protocol,
    router::{self, Metrics, Settings, Shared, User},
    tier::{self, Pair, SYSBENCH},
    topology::{self, Routing},
};
use prometheus_client::registry::Registry;

const TABLES: u32 = 4;
const TABLE_SIZE: u32 = 10_000;
/// Each workload alternates direct and routed runs this many times.
const ROUNDS: u32 = 3;

struct Run {
    qps: f64,
    avg_ms: f64,
    errors: u64,
}

fn sysbench(port: u16, args: &[&str], threads: u32, seconds: u32) -> Run {
    let out = Command::new("sysbench")
        .args(args)
        .args([
            "--db-driver=mysql",
            "--mysql-host=127.0.0.1",
            &format!("--mysql-port={port}"),
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

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    rusage(libc::RUSAGE_SELF)
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

fn main() {
    let seconds: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    if !tier::available_or_skip("db-bench") {
        std::process::exit(1);
    }
    eprintln!("db-bench: starting a MariaDB primary/replica pair");
    let pair = Pair::start_default().expect("start a primary/replica pair");
    let primary = pair.primary.connect_addr();

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let (publisher, subscriber) =
        topology::channel(Routing { primary: Some(primary), replica: Some(pair.replica.connect_addr()), generation: 1 });
    let users = [(SYSBENCH.user.to_string(), User { stored: Some(protocol::native_stored_hash(SYSBENCH.password.as_bytes())) })].into();
    let shared = Shared::new(users, Settings::default(), Arc::clone(&metrics), subscriber);
    // The router runs on its own threads, as `db-router run` does.
    let _publisher = publisher;
    // As many as `db-router run` uses by default; DB_BENCH_ROUTER_THREADS overrides.
    let threads = std::env::var("DB_BENCH_ROUTER_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or_else(router::default_threads);
    let router_addr = router::serve_threads("127.0.0.1:0".parse().unwrap(), shared, threads).expect("router listens");

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

    let workloads: [(&str, &[&str], u32); 3] = [
        ("oltp_point_select, 1 thread", &["oltp_point_select"], 1),
        ("oltp_point_select, 4 threads", &["oltp_point_select"], 4),
        ("oltp_read_only --skip_trx=on, 4 threads", &["oltp_read_only", "--skip_trx=on"], 4),
    ];
    println!("db-router vs direct to the primary, sysbench {seconds} s per path and workload ({ROUNDS} alternating runs), same machine (2 vCPUs shared)");
    println!(
        "{:<42} {:>11} {:>11} {:>6} {:>15} {:>16} {:>7}",
        "workload", "direct QPS", "router QPS", "ratio", "added µs/query", "router CPU µs/q", "errors"
    );
    for (name, args, threads) in workloads {
        // Warm both paths (buffer pool, the router's connections), then measure.
        sysbench(primary.port(), args, threads, 2);
        sysbench(router_addr.port(), args, threads, 2);
        // Alternate short runs, so that both paths see the same background load.
        let (mut direct, mut routed, mut router_cpu) = (Run { qps: 0.0, avg_ms: 0.0, errors: 0 }, Run { qps: 0.0, avg_ms: 0.0, errors: 0 }, Duration::ZERO);
        let mut client_cpu = Duration::ZERO;
        let chunk = (seconds / ROUNDS).max(1);
        for _ in 0..ROUNDS {
            let c0 = children_cpu_time();
            let d = sysbench(primary.port(), args, threads, chunk);
            client_cpu += children_cpu_time() - c0;
            let cpu0 = cpu_time();
            let r = sysbench(router_addr.port(), args, threads, chunk);
            // This process is the router (the benchmark driver only waits for sysbench).
            router_cpu += cpu_time() - cpu0;
            direct.qps += d.qps / ROUNDS as f64;
            direct.avg_ms += d.avg_ms / ROUNDS as f64;
            routed.qps += r.qps / ROUNDS as f64;
            routed.avg_ms += r.avg_ms / ROUNDS as f64;
            routed.errors += r.errors;
        }
        let router_cpu_us = router_cpu.as_secs_f64() * 1e6 / (routed.qps * (chunk * ROUNDS) as f64);
        let client_cpu_us = client_cpu.as_secs_f64() * 1e6 / (direct.qps * (chunk * ROUNDS) as f64);
        let added_us = (threads as f64 / routed.qps - threads as f64 / direct.qps) * 1e6;
        println!(
            "{name:<42} {:>11.0} {:>11.0} {:>5.2}x {:>15.1} {:>16.1} {:>7}",
            direct.qps,
            routed.qps,
            routed.qps / direct.qps,
            added_us,
            router_cpu_us,
            routed.errors
        );
        eprintln!("db-bench: {name}: sysbench avg latency {:.3} ms direct, {:.3} ms through the router", direct.avg_ms, routed.avg_ms);
        println!("{:<42} sysbench's own CPU per query (direct, for scale): {client_cpu_us:.1} µs", "");
    }
    println!(
        "router statements: {} to the replica, {} to the primary",
        metrics.to_replica.get(),
        metrics.to_primary.get()
    );
    println!("targets (issue 6): ratio >= 0.90, added < 20 µs per point select at 1 thread");
    println!("router CPU: this process's user+system time per routed query, including the kernel's loopback TCP work it triggers");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average during the run: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    drop(pair);
}
