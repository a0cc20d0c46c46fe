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

/// Concurrent connections of every wrk run.
const CONNS: u32 = 32;

/// One wrk run. `pace_ms`: each connection waits that long before its next request (wrk's
/// `delay()`), which fixes the offered load, so that latencies compare at equal load.
fn wrk(stack: &Stack, url: &str, close: bool, secs: u32, pace_ms: Option<u32>) -> Run {
    let header = if close { "-H 'Connection: close'" } else { "" };
    let script = match pace_ms {
        Some(ms) => {
            let path = stack.work.join(format!("pace{ms}.lua"));
            fs::write(&path, format!("function delay()\n  return {ms}\nend\n")).unwrap();
            format!("-s {}", path.display())
        }
        None => String::new(),
    };
    let before = cpu_jiffies();
    let out = stack.exec(
        "client",
        &format!("timeout -s KILL {} wrk -t2 -c{CONNS} -d{secs}s --latency {header} {script} {url}", secs + 20),
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
            r.p50_ms = tests::wrk_ms(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            r.p99_ms = tests::wrk_ms(v);
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
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind {LB}:{HAPROXY_PORT}\n  default_backend be\n\
             backend be\n  balance roundrobin\n  server web1 {}:{HTTP_PORT}\n  server web2 {}:{HTTP_PORT}\n",
            WEB[0], WEB[1]
        ),
    )
    .unwrap();
    let version = stack.exec("lb", "haproxy -v | head -1");
    let xdp_url = format!("http://{VIP}:{HTTP_PORT}/whoami");
    let ha_url = format!("http://{LB}:{HAPROXY_PORT}/whoami");
    // Closed loop (as fast as it goes): throughput and CPU. Paced (the same offered load for
    // both, below HAProxy's capacity): latency.
    // [xdp keep-alive, xdp close, haproxy keep-alive, haproxy close] x [closed, paced]
    let mut runs: [Vec<Run>; 4] = Default::default();
    let mut paced: [Vec<Run>; 4] = Default::default();
    const PACE_KEEPALIVE_MS: u32 = 2;
    const PACE_CLOSE_MS: u32 = 10;
    for round in 0..rounds {
        if round > 0 {
            stack.start_balancer();
        }
        runs[0].push(wrk(&stack, &xdp_url, false, secs, None));
        runs[1].push(wrk(&stack, &xdp_url, true, secs, None));
        paced[0].push(wrk(&stack, &xdp_url, false, secs, Some(PACE_KEEPALIVE_MS)));
        paced[1].push(wrk(&stack, &xdp_url, true, secs, Some(PACE_CLOSE_MS)));
        // HAProxy alone: no XDP program on the balancer while it is measured.
        stack.stop_balancer(libc::SIGTERM);
        stack.spawn("lb", "haproxy", &["haproxy".into(), "-db".into(), "-f".into(), cfg.display().to_string()]);
        stack.wait_for("client", &format!("curl -sf -o /dev/null {ha_url}"), Duration::from_secs(10), "haproxy");
        runs[2].push(wrk(&stack, &ha_url, false, secs, None));
        runs[3].push(wrk(&stack, &ha_url, true, secs, None));
        paced[2].push(wrk(&stack, &ha_url, false, secs, Some(PACE_KEEPALIVE_MS)));
        paced[3].push(wrk(&stack, &ha_url, true, secs, Some(PACE_CLOSE_MS)));
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
        "\nEnd to end: wrk -t2 -c{CONNS} -d{secs}s GET /whoami from the client namespace, two web nodes, {rounds} rounds \
         averaged, XDP in driver mode on veth; HAProxy: {}",
        version.trim()
    );
    let names = ["XDP VIP, keep-alive", "XDP VIP, new conn/req", "HAProxy, keep-alive", "HAProxy, new conn/req"];
    println!("\nClosed loop (as fast as it goes):");
    println!("{:<26} {:>10} {:>9} {:>9} {:>12} {:>7}", "", "req/s", "p50 ms", "p99 ms", "CPU ms/1k", "errors");
    for (i, name) in names.iter().enumerate() {
        let r = avg(&runs[i]);
        println!("{name:<26} {:>10.0} {:>9.3} {:>9.3} {:>12.1} {:>7}", r.rps, r.p50_ms, r.p99_ms, r.cpu_ms_per_1k, r.errors);
    }
    println!(
        "\nPaced, the same offered load for both (each connection waits {PACE_KEEPALIVE_MS} ms (keep-alive) or \
         {PACE_CLOSE_MS} ms (new conn) between requests):"
    );
    println!("{:<26} {:>10} {:>9} {:>9} {:>12} {:>7}", "", "req/s", "p50 ms", "p99 ms", "CPU ms/1k", "errors");
    for (i, name) in names.iter().enumerate() {
        let r = avg(&paced[i]);
        println!("{name:<26} {:>10.0} {:>9.3} {:>9.3} {:>12.1} {:>7}", r.rps, r.p50_ms, r.p99_ms, r.cpu_ms_per_1k, r.errors);
    }
    println!();
    for (label, ours, theirs, target) in [("keep-alive", 0, 2, 1.2), ("new conn/req", 1, 3, 1.5)] {
        let (o, t) = (avg(&runs[ours]), avg(&runs[theirs]));
        let (po, pt) = (avg(&paced[ours]), avg(&paced[theirs]));
        println!(
            "ours/HAProxy, {label:<13} req/s {:.2} (target >= {target}); at equal load p50 {:.2}, p99 {:.2} (target <= 1); \
             closed-loop p99 {:.2}; CPU per request {:.2}",
            o.rps / t.rps,
            po.p50_ms / pt.p50_ms,
            po.p99_ms / pt.p99_ms,
            o.p99_ms / t.p99_ms,
            o.cpu_ms_per_1k / t.cpu_ms_per_1k
        );
    }
}
