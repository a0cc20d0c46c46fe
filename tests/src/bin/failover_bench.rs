//! Failover, side by side in one run on the same topology: a web node vanishes (its link goes
//! down) under a steady load of new connections; we report how long until the balancer
//! marks it down, and how many requests failed. Three setups: lbd with fast checks, lbd with
//! HAProxy's default check settings, and HAProxy 2.6 (`mode tcp`, `balance roundrobin`,
//! `check` with its defaults: inter 2000 ms, fall 3, rise 2).
//!
//! Run as root: `cargo xtask bench`. Load loops are bounded in count and time.

use std::{
    net::SocketAddr,
    sync::{atomic::{AtomicBool, Ordering}, Arc},
    time::{Duration, Instant},
};

use tests::{
    http::Conn,
    stack::{Forward, Options, Stack, XdpMode, HTTP_PORT, LB, VIP, WEB},
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

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("failover-bench needs root: run `sudo -E cargo xtask bench`");
        std::process::exit(2);
    }
    let vip = SocketAddr::from((VIP, HTTP_PORT));
    let mut rows = Vec::new();
    for (name, health) in [("lbd, fast checks (100 ms, fall 2)", (100, 50, 100, 2, 2)), ("lbd, HAProxy's default checks", (2000, 2000, 2000, 2, 3))] {
        let stack = Stack::up(Options { health, ..Options::new(XdpMode::Driver, Forward::Ipip) });
        let o = run(&stack, vip, || stack.backend_state("web2") == "down");
        rows.push((name.to_string(), o));
    }
    let mut stack = Stack::up(Options { balancer: false, ..Options::new(XdpMode::Driver, Forward::Ipip) });
    let cfg = stack.work.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind {LB}:{HAPROXY_PORT}\n  default_backend be\n\
             backend be\n  balance roundrobin\n  server web1 {}:{HTTP_PORT} check\n  server web2 {}:{HTTP_PORT} check\n",
            WEB[0], WEB[1]
        ),
    )
    .unwrap();
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
}
