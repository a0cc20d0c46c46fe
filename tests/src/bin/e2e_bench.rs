//! End-to-end comparison in one run, same topology and same two web nodes: wrk from the
//! client namespace through our XDP VIP, and through HAProxy (`mode tcp`, `balance
//! roundrobin`) bound in the balancer namespace, each with keep-alive and with a new
//! connection per request. Reports requests/s, p50 and p99 latency, and the machine's CPU
//! time per 1,000 requests (from /proc/stat), with our/HAProxy ratios.
//!
//! Run as root: `cargo xtask bench`. wrk runs under `timeout -s KILL`, bounded in time.

use std::{fs, time::Duration};

use tests::stack::{Forward, Options, Stack, XdpMode, HTTP_PORT, LB, VIP, WEB};

const HAPROXY_PORT: u16 = 8081;

#[derive(Debug, Clone, Copy, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms_per_1k: f64,
    errors: u64,
}

/// Busy and total jiffies of the whole machine.
fn cpu_jiffies() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<u64> = stat.lines().next().unwrap().split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
    // user nice system idle iowait irq softirq steal
    f.iter().take(8).sum::<u64>() - f[3] - f[4]
}

fn to_ms(s: &str) -> f64 {
    let s = s.trim();
    if let Some(v) = s.strip_suffix("us") {
        v.parse::<f64>().unwrap() / 1000.0
    } else if let Some(v) = s.strip_suffix("ms") {
        v.parse().unwrap()
    } else if let Some(v) = s.strip_suffix('s') {
        v.parse::<f64>().unwrap() * 1000.0
    } else {
        panic!("latency {s:?}")
    }
}

fn wrk(stack: &Stack, url: &str, close: bool, secs: u32) -> Run {
    let header = if close { "-H 'Connection: close'" } else { "" };
    let before = cpu_jiffies();
    let out = stack.exec(
        "client",
        &format!("timeout -s KILL {} wrk -t2 -c32 -d{secs}s --latency {header} {url}", secs + 20),
    );
    let busy = cpu_jiffies() - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut r = Run::default();
    let mut total = 0.0;
    for line in out.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap();
        } else if let Some(v) = l.strip_prefix("50%") {
            r.p50_ms = to_ms(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            r.p99_ms = to_ms(v);
        } else if l.contains("requests in") {
            total = l.split_whitespace().next().unwrap().parse().unwrap();
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            r.errors += v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    assert!(r.rps > 0.0 && total > 0.0, "wrk output not understood:\n{out}");
    r.cpu_ms_per_1k = busy as f64 / hz * 1000.0 / total * 1000.0;
    r
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("e2e-bench needs root (namespaces, XDP): run `sudo -E cargo xtask bench`");
        std::process::exit(2);
    }
    let secs: u32 = std::env::var("LB_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let rounds: usize = std::env::var("LB_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let mut stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    stack.exec("client", "sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range='1024 65000'");
    let cfg = stack.work.join("haproxy.cfg");
    fs::write(
        &cfg,
        format!(
            "global\n  maxconn 50000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind {LB}:{HAPROXY_PORT}\n  default_backend be\n\
             backend be\n  balance roundrobin\n  server web1 {}:{HTTP_PORT}\n  server web2 {}:{HTTP_PORT}\n",
            WEB[0], WEB[1]
        ),
    )
    .unwrap();
    let version = stack.exec("lb", "haproxy -v | head -1");
    let xdp_url = format!("http://{VIP}:{HTTP_PORT}/whoami");
    let ha_url = format!("http://{LB}:{HAPROXY_PORT}/whoami");
    // [xdp keep-alive, xdp close, haproxy keep-alive, haproxy close]
    let mut runs: [Vec<Run>; 4] = Default::default();
    for round in 0..rounds {
        if round > 0 {
            stack.start_balancer();
        }
        runs[0].push(wrk(&stack, &xdp_url, false, secs));
        runs[1].push(wrk(&stack, &xdp_url, true, secs));
        // HAProxy alone: no XDP program on the balancer while it is measured.
        stack.stop_balancer(libc::SIGTERM);
        stack.spawn("lb", "haproxy", &["haproxy".into(), "-db".into(), "-f".into(), cfg.display().to_string()]);
        stack.wait_for("client", &format!("curl -sf -o /dev/null {ha_url}"), Duration::from_secs(10), "haproxy");
        runs[2].push(wrk(&stack, &ha_url, false, secs));
        runs[3].push(wrk(&stack, &ha_url, true, secs));
        stack.stop_process("haproxy", libc::SIGTERM);
    }
    let avg = |v: &[Run]| {
        let n = v.len() as f64;
        Run {
            rps: v.iter().map(|r| r.rps).sum::<f64>() / n,
            p50_ms: v.iter().map(|r| r.p50_ms).sum::<f64>() / n,
            p99_ms: v.iter().map(|r| r.p99_ms).sum::<f64>() / n,
            cpu_ms_per_1k: v.iter().map(|r| r.cpu_ms_per_1k).sum::<f64>() / n,
            errors: v.iter().map(|r| r.errors).sum(),
        }
    };
    println!(
        "\nEnd to end: wrk -t2 -c32 -d{secs}s GET /whoami from the client namespace, two web nodes, {rounds} rounds averaged, \
         XDP in driver mode on veth; HAProxy: {}",
        version.trim()
    );
    println!("{:<26} {:>10} {:>9} {:>9} {:>12} {:>7}", "", "req/s", "p50 ms", "p99 ms", "CPU ms/1k", "errors");
    for (i, name) in ["XDP VIP, keep-alive", "XDP VIP, new conn/req", "HAProxy, keep-alive", "HAProxy, new conn/req"].iter().enumerate() {
        let r = avg(&runs[i]);
        println!("{name:<26} {:>10.0} {:>9.3} {:>9.3} {:>12.1} {:>7}", r.rps, r.p50_ms, r.p99_ms, r.cpu_ms_per_1k, r.errors);
    }
    for (label, ours, theirs, target) in [("keep-alive", 0, 2, 1.2), ("new conn/req", 1, 3, 1.5)] {
        let (o, t) = (avg(&runs[ours]), avg(&runs[theirs]));
        println!(
            "ours/HAProxy, {label:<13} req/s {:.2} (target >= {target}), p50 {:.2}, p99 {:.2} (target <= 1), CPU per request {:.2}",
            o.rps / t.rps,
            o.p50_ms / t.p50_ms,
            o.p99_ms / t.p99_ms,
            o.cpu_ms_per_1k / t.cpu_ms_per_1k
        );
    }
}
