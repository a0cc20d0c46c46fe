//! Failover, side by side in one run on the same topology: a web node vanishes (its link goes
//! down) under a steady load of new connections; we report how long until the balancer
//! marks it down, and how many requests failed. Three setups: lbd with fast checks, lbd with
//! HAProxy's default check settings, and HAProxy 2.6 (`mode tcp`, `balance roundrobin`,
//! `check` with its defaults: inter 2000 ms, fall 3, rise 2).
//!
//! Then a balancer of a pair fails, side by side: two lbd with flow sync, two lbd without
//! it, and two HAProxy (`mode tcp`), each pair behind the same router (BIRD: BGP with BFD,
//! ECMP) in the same run. Under a steady load of new connections with 40 keep-alive
//! connections open, balancer 1's link goes down: we report how long until the router's
//! route drops it, the new connections that failed, and the keep-alive connections that
//! broke.
//!
//! Run as root: `cargo xtask bench` (`FAILOVER_BENCH=pairs` runs only the pairs). Load
//! loops are bounded in count and time.

use std::{
    net::SocketAddr,
    sync::{atomic::{AtomicBool, Ordering}, Arc},
    time::{Duration, Instant},
};

use tests::{
    http::Conn,
    http::node_of,
    stack::{Forward, Options, Stack, XdpMode, CLIENT, HTTP_PORT, LB, LB2, ROUTE_TABLE, VIP, WEB},
};

const HAPROXY_PORT: u16 = 8081;

struct Outcome {
    detection: Duration,
    requests: usize,
    failed: usize,
}

/// Load on `target` from the client until `stop`; (start offset, ok) per request.
fn load(stack: &Stack, target: SocketAddr, stop: Arc<AtomicBool>, t0: Instant) -> std::thread::JoinHandle<Vec<(Duration, bool)>> {
    stack.spawn_in_ns("client", move || {
        let mut log = Vec::new();
        for i in 0..18_000u32 {
            if stop.load(Ordering::SeqCst) || t0.elapsed() > Duration::from_secs(60) {
                break;
            }
            let start = t0.elapsed();
            let ok = Conn::open_from_within(1100 + i as u16, target, Duration::from_millis(500))
                .and_then(|mut c| c.get("/whoami", false))
                .is_ok_and(|(s, _)| s == 200);
            log.push((start, ok));
        }
        log
    })
}

fn run(stack: &Stack, target: SocketAddr, is_down: impl Fn() -> bool) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let l = load(stack, target, stop.clone(), t0);
    std::thread::sleep(Duration::from_millis(1000));
    let killed = t0.elapsed();
    stack.exec("web2", "ip link set eth0 down");
    while !is_down() {
        assert!(t0.elapsed() < Duration::from_secs(40), "never detected");
        std::thread::sleep(Duration::from_millis(10));
    }
    let detection = t0.elapsed() - killed;
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    let log = l.join().unwrap();
    stack.exec("web2", "ip link set eth0 up");
    Outcome { detection, requests: log.len(), failed: log.iter().filter(|(_, ok)| !ok).count() }
}

/// HAProxy 2.6 in `mode tcp`, `balance roundrobin` over both web nodes with its default
/// checks, listening on `bind`: the configuration file written in the stack's work directory.
fn haproxy_config(stack: &Stack, file: &str, bind: SocketAddr) -> std::path::PathBuf {
    let cfg = stack.work.join(file);
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind {bind}\n  default_backend be\n\
             backend be\n  balance roundrobin\n  server web1 {}:{HTTP_PORT} check\n  server web2 {}:{HTTP_PORT} check\n",
            WEB[0], WEB[1]
        ),
    )
    .unwrap();
    cfg
}

struct PairOutcome {
    detection: Duration,
    requests: usize,
    failed: usize,
    through_failed: usize,
    broken: usize,
}

/// Keep-alive connections open, a steady load of new ones, then balancer 1's link goes.
fn pair_run(stack: &Stack) -> PairOutcome {
    let vip = SocketAddr::from((VIP, HTTP_PORT));
    let mut keep: Vec<(u16, Conn, String)> = stack.in_ns("client", move || {
        (32_300..32_340u16)
            .map(|p| {
                let mut c = Conn::open_from_within(p, vip, Duration::from_millis(500)).expect("keep-alive connection");
                let node = node_of(&c.get("/whoami", true).expect("first request").1);
                (p, c, node)
            })
            .collect()
    });
    let through_failed = keep
        .iter()
        .filter(|(p, ..)| stack.exec("client", &format!("ip route get {VIP} from {CLIENT} ipproto tcp sport {p} dport {HTTP_PORT}")).contains(&format!("via {LB} ")))
        .count();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let l = load(stack, vip, stop.clone(), t0);
    std::thread::sleep(Duration::from_millis(1000));
    stack.exec("lb", "ip link set eth0 down");
    let detection = stack.wait_route(&[LB2], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    let log = l.join().unwrap();
    let broken = keep.iter_mut().map(|(_, c, node)| !c.get("/whoami", true).is_ok_and(|(s, b)| s == 200 && node_of(&b) == *node)).filter(|&b| b).count();
    PairOutcome { detection, requests: log.len(), failed: log.iter().filter(|(_, ok)| !ok).count(), through_failed, broken }
}

/// The balancer pair part: lbd with and without flow sync, and HAProxy, each pair behind the
/// same BGP router.
fn balancer_pairs() {
    let mut rows = Vec::new();
    for (name, sync) in [("lbd pair, flow sync", true), ("lbd pair, no flow sync", false)] {
        let stack = Stack::up(Options { balancers: 2, sync, ..Options::new(XdpMode::Driver, Forward::Ipip) });
        rows.push((name, pair_run(&stack)));
    }
    // HAProxy on both balancers: the VIP on their loopback, announced by the same BIRD
    // setup (the route lbd would keep in its table, put there by hand).
    let mut stack = Stack::up(Options { balancers: 2, balancer: false, ..Options::new(XdpMode::Driver, Forward::Ipip) });
    stack.start_bgp();
    for role in ["lb", "lb2"] {
        let cfg = haproxy_config(&stack, &format!("haproxy-{role}.cfg"), SocketAddr::from((VIP, HTTP_PORT)));
        stack.exec(role, &format!("ip addr add {VIP}/32 dev lo && ip route add blackhole {VIP}/32 table {ROUTE_TABLE} proto 186"));
        stack.spawn(role, &format!("haproxy-{role}"), &["haproxy".into(), "-db".into(), "-f".into(), cfg.display().to_string()]);
    }
    stack.wait_route(&[LB, LB2], Duration::from_secs(30));
    stack.wait_for("client", &format!("curl -sf -o /dev/null http://{VIP}/whoami"), Duration::from_secs(10), "haproxy");
    rows.push(("HAProxy 2.6 pair (mode tcp)", pair_run(&stack)));
    println!("\nBalancer failover: balancer 1's link goes down under a steady load of new connections, 40 keep-alive connections open");
    println!("{:<30} {:>13} {:>9} {:>7} {:>22} {:>7}", "", "route gone ms", "requests", "failed", "keep-alive via failed", "broken");
    for (name, o) in &rows {
        println!("{name:<30} {:>13} {:>9} {:>7} {:>22} {:>7}", o.detection.as_millis(), o.requests, o.failed, o.through_failed, o.broken);
    }
    println!(
        "keep-alive connections broken by the failure: lbd with sync {}, without {}, HAProxy {} (of {}, {}, {} through the failed balancer)",
        rows[0].1.broken, rows[1].1.broken, rows[2].1.broken, rows[0].1.through_failed, rows[1].1.through_failed, rows[2].1.through_failed
    );
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("failover-bench needs root: run `sudo -E cargo xtask bench`");
        std::process::exit(2);
    }
    if std::env::var("FAILOVER_BENCH").as_deref() == Ok("pairs") {
        balancer_pairs();
        return;
    }
    let vip = SocketAddr::from((VIP, HTTP_PORT));
    let mut rows = Vec::new();
    for (name, health) in [("lbd, fast checks (100 ms, fall 2)", (100, 50, 100, 2, 2)), ("lbd, HAProxy's default checks", (2000, 2000, 2000, 2, 3))] {
        let stack = Stack::up(Options { health, ..Options::new(XdpMode::Driver, Forward::Ipip) });
        let o = run(&stack, vip, || stack.backend_state("web2") == "down");
        rows.push((name.to_string(), o));
    }
    let mut stack = Stack::up(Options { balancer: false, ..Options::new(XdpMode::Driver, Forward::Ipip) });
    let cfg = haproxy_config(&stack, "haproxy.cfg", SocketAddr::from((LB, HAPROXY_PORT)));
    stack.spawn("lb", "haproxy", &["haproxy".into(), "-db".into(), "-f".into(), cfg.display().to_string()]);
    stack.wait_for("client", &format!("curl -sf -o /dev/null http://{LB}:{HAPROXY_PORT}/whoami"), Duration::from_secs(10), "haproxy");
    let o = run(&stack, SocketAddr::from((LB, HAPROXY_PORT)), || stack.log("haproxy").contains("web2 is DOWN"));
    rows.push(("HAProxy 2.6, default checks".into(), o));
    println!("\nFailover: web2's link goes down under a steady load of new connections (500 ms client timeout)");
    println!("{:<36} {:>14} {:>10} {:>8}", "", "detection ms", "requests", "failed");
    for (name, o) in &rows {
        println!("{name:<36} {:>14} {:>10} {:>8}", o.detection.as_millis(), o.requests, o.failed);
    }
    println!(
        "lbd fast / HAProxy default: detection {:.2}x, failed requests {} vs {}",
        rows[0].1.detection.as_secs_f64() / rows[2].1.detection.as_secs_f64(),
        rows[0].1.failed,
        rows[2].1.failed
    );
    drop(stack);
    balancer_pairs();
}
