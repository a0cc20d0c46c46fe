//! web-app against Debian's nginx in one run, on loopback, the same files: a small page
//! (1 KiB) and a 100 KiB file, with wrk, keep-alive and a new connection per request
//! (`Connection: close`), plain HTTP and TLS (same ECDSA certificate). Reports requests/s and
//! p99 of each, and the ratios web-app/nginx for requests/s and nginx/web-app for p99 (so
//! >= 1.0 means web-app is at least as good on both).
//!
//! Two measurements per row. Throughput: wrk as fast as it can (closed loop, 32 connections),
//! requests/s and the p99 seen there. Latency: both servers get the same offered load, half
//! of what nginx sustained in the throughput runs of that row (each connection waits a think
//! time between a response and its next request, from wrk's `delay()`), and the p99 of that
//! is the one compared. Why not the p99 at full speed alone: there wrk's two threads and the
//! server's share the two CPUs of the machine, and once no thread runs out of work the tail
//! is whole scheduler ticks (4 ms at HZ=250) that a thread waits behind another; a faster
//! server keeps wrk's threads busier and so gets a longer tail there for serving more. At an
//! equal load below saturation, the tail is the server's. Both are printed.
//!
//! Fair setup: nginx has as many workers as web-app has HTTP threads (`WEB_BENCH_THREADS`,
//! default: the CPU count), `sendfile on`, `open_file_cache`, keep-alive without a request
//! limit, `listen ... deferred` (`TCP_DEFER_ACCEPT`, which web-app's listeners set too), no
//! access log; web-app serves a verified release (small files kept in memory) with
//! `RUST_LOG=warn` (no access log either). wrk runs on the same machine (2 threads, 32
//! connections); the rows run one after the other, alternating servers, each bounded in
//! time (`timeout -s KILL`). Everything it starts is stopped and its directory removed on
//! exit, also on panic.
//!
//! Needs no root. `cargo xtask bench` runs it; alone: build web-app in release mode, then
//! `cargo run --release -p tests --bin web-bench`. `WEB_BENCH_SECS` (default 5) per run,
//! `WEB_BENCH_ROUNDS` (default 3; the median of each measurement is kept), `WEB_BENCH_ROWS` (run only the
//! rows whose name contains one of these comma-separated words, e.g. `100 KiB plain`).
//!
//! Each server's CPU time per request (user and system, all its threads and processes, from
//! /proc) in the full-speed runs is printed too: where wrk, on the same two CPUs, sets the
//! pace, the requests/s move only by the share of the CPUs that a cheaper server leaves to
//! wrk, and the CPU time shows the servers' own cost. And the range of each row's per-round
//! ratios (round i of web-app against round i of nginx, run back to back): the noise.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const SMALL: usize = 1024;
const LARGE: usize = 100 * 1024;
const CONNS: u32 = 32;

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("web-bench-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A server process: SIGTERM on drop, SIGKILL if it has not exited after a bounded wait.
struct Server {
    name: &'static str,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("web-bench: {} did not stop on SIGTERM, killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_listening(addr: SocketAddr, server: &mut Server, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("{} exited ({status}) before listening on {addr}:\n{}", server.name, fs::read_to_string(log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "{} not listening on {addr} after 20 s", server.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[derive(Debug, Clone, Copy, Default)]
struct Result {
    rps: f64,
    p99_ms: f64,
    /// The server's CPU time (user and system, all its processes) per request of the run.
    cpu_us: f64,
    errors: u64,
}

/// CPU time so far of all of `pids`.
fn cpu_time(pids: &[u32]) -> Duration {
    pids.iter().map(|&p| tests::process_cpu_time(p)).sum()
}

/// One wrk run against the server made of `pids`; with `think`, a Lua script whose `delay()`
/// makes each connection wait that many milliseconds (wrk's unit, whole) before its next request.
fn wrk(url: &str, pids: &[u32], close: bool, secs: u32, think: Option<&Path>) -> Result {
    let mut cmd = Command::new("timeout");
    cmd.args(["-s", "KILL", &(secs + 20).to_string(), "wrk", "-t2", &format!("-c{CONNS}"), &format!("-d{secs}s"), "--latency"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    if let Some(script) = think {
        cmd.arg("-s").arg(script);
    }
    let before = cpu_time(pids);
    let out = run(cmd.arg(url));
    let cpu = cpu_time(pids).saturating_sub(before);
    let mut r = Result::default();
    for line in out.lines() {
        let l = line.trim();
        if let Some((n, _)) = l.split_once(" requests in ") {
            let requests: f64 = n.trim().parse().unwrap();
            r.cpu_us = cpu.as_secs_f64() * 1e6 / requests.max(1.0);
        } else if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap();
        } else if let Some(v) = l.strip_prefix("99%") {
            r.p99_ms = tests::wrk_ms(v);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            r.errors += v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    assert!(r.rps > 0.0, "wrk output not understood:\n{out}");
    r
}

/// The range of a row's per-round ratios, e.g. `0.94-1.08`.
fn spread(ratios: impl Iterator<Item = f64>) -> String {
    let (lo, hi) = ratios.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| (lo.min(r), hi.max(r)));
    if lo == hi {
        format!("{lo:.2}")
    } else {
        format!("{lo:.2}-{hi:.2}")
    }
}

/// The run whose `key` is the median of `runs` (the upper one of an even count).
fn median_by(runs: &mut [Result], key: impl Fn(&Result) -> f64) -> Result {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    runs[runs.len() / 2]
}

fn main() {
    let secs: u32 = std::env::var("WEB_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    // One round decides nothing on a shared host: a row moves by 5-10 % between rounds.
    let rounds: usize = std::env::var("WEB_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let rows: Vec<String> = std::env::var("WEB_BENCH_ROWS")
        .map(|s| s.split(',').map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()).collect())
        .unwrap_or_default();
    let threads: usize = std::env::var("WEB_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    for tool in ["wrk", "nginx", "timeout"] {
        assert!(Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status().unwrap().success(),
            "{tool} not found: install it (apt-get install wrk nginx-light coreutils)");
    }
    let web_app = tests::stack::default_bin_dir().join("web-app");
    assert!(web_app.exists(), "{} not found: cargo build --release -p web-app", web_app.display());
    let web_app = web_app.display().to_string();

    let work = TempDir::new();
    let w = &work.0;
    // The same files for both servers.
    let site = w.join("site");
    fs::create_dir_all(&site).unwrap();
    let small: String = "<p>web-bench small page</p>\n".chars().cycle().take(SMALL - 1).chain(['\n']).collect();
    fs::write(site.join("small.html"), &small).unwrap();
    let mut x: u32 = 1;
    let large: Vec<u8> = (0..LARGE).map(|_| { x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345); (x >> 16) as u8 }).collect();
    fs::write(site.join("large.bin"), &large).unwrap();
    let releases = w.join("releases");
    run(Command::new(&web_app).args(["release", "create", "--from"]).arg(&site).args(["--version", "bench", "--out"]).arg(&releases));
    run(Command::new(&web_app).args(["release", "activate", "--releases"]).arg(&releases).args(["--version", "bench"]));
    let certs = w.join("certs");
    run(Command::new(&web_app).args(["devcert", "--out"]).arg(&certs).args(["--name", "localhost", "--name", "127.0.0.1"]));

    // web-app.
    let (web_http, web_https) = (free_port(), free_port());
    let web_log = w.join("web-app.log");
    let mut web = Server {
        name: "web-app",
        child: Command::new(&web_app)
            .args(["--releases"]).arg(&releases)
            .args(["--listen", &format!("127.0.0.1:{web_http}"), "--tls-listen", &format!("127.0.0.1:{web_https}")])
            .args(["--tls-cert"]).arg(certs.join("node.pem")).args(["--tls-key"]).arg(certs.join("node-key.pem"))
            .args(["--node", "bench", "--threads", &threads.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(fs::File::create(&web_log).unwrap())
            .stderr(fs::File::create(w.join("web-app.err")).unwrap())
            .spawn()
            .expect("start web-app"),
    };
    wait_listening(format!("127.0.0.1:{web_http}").parse().unwrap(), &mut web, &web_log);
    wait_listening(format!("127.0.0.1:{web_https}").parse().unwrap(), &mut web, &web_log);

    // nginx, same files, same certificate.
    let (ngx_http, ngx_https) = (free_port(), free_port());
    for d in ["tmp", "logs"] {
        fs::create_dir_all(w.join(d)).unwrap();
    }
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 { "user root;\n" } else { "" };
    let conf = format!(
        "{user}worker_processes {threads};\ndaemon off;\npid {w}/nginx.pid;\nerror_log {w}/logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n\
           keepalive_timeout 65;\n  keepalive_requests 1000000;\n  open_file_cache max=1000 inactive=60s;\n\
           types {{ text/html html; application/octet-stream bin; }}\n\
           client_body_temp_path {w}/tmp/body;\n  proxy_temp_path {w}/tmp/proxy;\n  fastcgi_temp_path {w}/tmp/fastcgi;\n\
           uwsgi_temp_path {w}/tmp/uwsgi;\n  scgi_temp_path {w}/tmp/scgi;\n\
           ssl_protocols TLSv1.2 TLSv1.3;\n  ssl_session_cache shared:SSL:10m;\n\
           server {{\n    listen 127.0.0.1:{ngx_http} deferred;\n    listen 127.0.0.1:{ngx_https} ssl deferred;\n\
             ssl_certificate {c}/node.pem;\n    ssl_certificate_key {c}/node-key.pem;\n    root {s};\n  }}\n}}\n",
        w = w.display(),
        c = certs.display(),
        s = site.display(),
    );
    let conf_path = w.join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let ngx_log = w.join("logs/error.log");
    let mut nginx = Server {
        name: "nginx",
        child: Command::new("nginx")
            .args(["-p"]).arg(w).args(["-c"]).arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(fs::File::create(w.join("nginx.err")).unwrap())
            .spawn()
            .expect("start nginx"),
    };
    wait_listening(format!("127.0.0.1:{ngx_http}").parse().unwrap(), &mut nginx, &ngx_log);
    wait_listening(format!("127.0.0.1:{ngx_https}").parse().unwrap(), &mut nginx, &ngx_log);

    // Both serve the same bytes.
    for (port, scheme) in [(web_http, "http"), (ngx_http, "http"), (web_https, "https"), (ngx_https, "https")] {
        let out = run(Command::new("curl").args(["-sf", "--cacert"]).arg(certs.join("ca.pem"))
            .arg(format!("{scheme}://127.0.0.1:{port}/small.html")));
        assert_eq!(out, small, "{scheme} port {port} serves another small.html");
    }

    // Whose CPU time counts: web-app's process; nginx's master and its workers (the master
    // forks them after it listens: wait for all of them, bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let nginx_pids = loop {
        let pids: Vec<u32> = std::iter::once(nginx.child.id()).chain(tests::child_pids(nginx.child.id())).collect();
        if pids.len() > threads {
            break pids;
        }
        assert!(Instant::now() < deadline, "nginx's {threads} workers not found after 10 s: {pids:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let pids = [vec![web.child.id()], nginx_pids];

    let nginx_version = run(Command::new("sh").args(["-c", "nginx -v 2>&1"])).trim().to_owned();
    println!("web-bench: web-app ({threads} HTTP threads) vs {nginx_version} ({threads} workers), loopback, wrk -t2 -c{CONNS} -d{secs}s, {rounds} round(s)");
    let header = |c: [&str; 15]| {
        println!(
            "{:<28} {:>11} {:>11} {:>7} {:>8} {:>8} | {:>13} {:>8} {:>8} {:>7} | {:>11} {:>6} {:>6} | {:>9} {:>9}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13], c[14]
        )
    };
    header(["row", "web-app r/s", "nginx r/s", "r/s x", "p99 ms", "p99 ms", "at r/s (w/n)", "p99 ms", "p99 ms", "p99 x", "CPU us/req", "CPU x", "errors", "r/s x", "p99 x"]);
    header(["", "", "", "", "web-app", "nginx", "", "web-app", "nginx", "", "(w/n)", "", "", "rounds", "rounds"]);
    let mut below = 0;
    for (file, size) in [("small.html", "1 KiB"), ("large.bin", "100 KiB")] {
        for tls in [false, true] {
            for close in [false, true] {
                let row = format!("{size} {} {}", if tls { "TLS" } else { "plain" }, if close { "new-conn" } else { "keep-alive" });
                if !rows.is_empty() && !rows.iter().any(|r| row.contains(r.as_str())) {
                    continue;
                }
                let (wp, np, scheme) = if tls { (web_https, ngx_https, "https") } else { (web_http, ngx_http, "http") };
                let urls = [wp, np].map(|port| format!("{scheme}://127.0.0.1:{port}/{file}"));
                // Every round runs both servers, one after the other.
                let runs = |think: Option<&Path>| {
                    let mut runs: [Vec<Result>; 2] = Default::default();
                    for _ in 0..rounds {
                        for (i, url) in urls.iter().enumerate() {
                            runs[i].push(wrk(url, &pids[i], close, secs, think));
                        }
                    }
                    runs
                };
                // Throughput: the run with the median requests/s of the rounds (the best of
                // a few favours the server whose rate swings most: nginx's, whose keep-alive
                // connections fall on its workers as their accepts race, moves by 20 %).
                let mut fast_runs = runs(None);
                // The spread of the per-round ratios (round i of web-app against round i of
                // nginx, run back to back), taken before the medians reorder the runs.
                let rps_spread = spread(fast_runs[0].iter().zip(&fast_runs[1]).map(|(w, n)| w.rps / n.rps));
                let fast = fast_runs.each_mut().map(|r| median_by(r, |r| r.rps));
                // Each server's own cost per request, the median of the full-speed rounds: on
                // rows where wrk (on the same two CPUs) sets the pace, requests/s can only
                // move by the share of the CPUs a cheaper server leaves to wrk.
                let cpu = fast_runs.each_mut().map(|r| median_by(r, |r| r.cpu_us).cpu_us);
                // Latency at half of nginx's requests/s: think time = connections / rate.
                let think_ms = ((CONNS as f64 * 1000.0 / (fast[1].rps / 2.0)).round() as u32).max(1);
                let script = w.join(format!("think-{think_ms}.lua"));
                fs::write(&script, format!("function delay()\n  return {think_ms}\nend\n")).unwrap();
                let mut calm_runs = runs(Some(&script));
                let p99_spread = spread(calm_runs[0].iter().zip(&calm_runs[1]).map(|(w, n)| n.p99_ms / w.p99_ms));
                let calm = calm_runs.each_mut().map(|r| median_by(r, |r| r.p99_ms));
                let errors: u64 = fast_runs.iter().chain(&calm_runs).flatten().map(|r| r.errors).sum();
                let rps_ratio = fast[0].rps / fast[1].rps;
                let p99_ratio = calm[1].p99_ms / calm[0].p99_ms;
                if rps_ratio < 1.0 || p99_ratio < 1.0 {
                    below += 1;
                }
                println!(
                    "{row:<28} {:>11.0} {:>11.0} {:>6.2}x {:>8.2} {:>8.2} | {:>13} {:>8.2} {:>8.2} {:>6.2}x | {:>11} {:>5.2}x {:>6} | {:>9} {:>9}",
                    fast[0].rps,
                    fast[1].rps,
                    rps_ratio,
                    fast[0].p99_ms,
                    fast[1].p99_ms,
                    format!("{:.0}/{:.0}", calm[0].rps, calm[1].rps),
                    calm[0].p99_ms,
                    calm[1].p99_ms,
                    p99_ratio,
                    format!("{:.1}/{:.1}", cpu[0], cpu[1]),
                    cpu[1] / cpu[0],
                    errors,
                    rps_spread,
                    p99_spread
                );
            }
        }
    }
    println!(
        "left: as fast as wrk goes (the run with the median requests/s of the rounds, and its p99); right: both servers \
         offered the same load, half of nginx's requests/s (wrk think time {CONNS} connections / rate, whole ms), median p99 of the rounds"
    );
    println!(
        "r/s x = web-app/nginx requests per second; p99 x = nginx/web-app p99 at the same load; >= 1.00x means web-app is at \
         least as good (target on every row); {below} row(s) below"
    );
    println!(
        "CPU us/req: each server's CPU time (user and system, all its threads and processes) per request in the full-speed runs \
         (median of the rounds); CPU x = nginx/web-app, >= 1.00x means web-app spends no more (not a target: where wrk sets \
         the pace it shows what the requests/s cannot)"
    );
    println!(
        "rounds: the lowest and highest of the per-round ratios (round i of web-app against round i of nginx, run back to \
         back): how far one round can be trusted on this host"
    );
    drop(nginx);
    drop(web);
}
