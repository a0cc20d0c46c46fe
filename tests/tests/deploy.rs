//! Rolling deploys through the balancer (`lbd deploy`), under continuous load from the client
//! namespace: a good release reaches every node with no failed request; a corrupted release is
//! refused before anything changes; a release a node will not serve is rolled back on every
//! node. Needs root; with `CI` set a missing privilege fails instead of skipping.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tests::{
    http::Conn,
    privileged,
    stack::{Forward, Options, Stack, XdpMode, ADMIN_PORT, FIRST_RELEASE, HTTP_PORT, LB, LB2, VIP, WEB},
};

/// Source ports of the load (below the ephemeral range; see e2e.rs).
const LOOP_PORT_BASE: u16 = 1100;
const LOOP_PORTS: u32 = 15_000;

/// (node, release) pairs seen answering through the VIP.
type Seen = BTreeSet<(String, String)>;

struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: std::thread::JoinHandle<(u32, Vec<String>)>,
}

/// At least this long per new connection (at most 500/s), so that LOOP_PORTS last 30 s: a
/// deploy that takes longer than the load would otherwise end unobserved.
const PACE: Duration = Duration::from_millis(2);

/// New connections (one GET /whoami each) plus a keep-alive connection, until stopped
/// (bounded: 120 s, LOOP_PORTS connections, paced by PACE).
fn start_load(stack: &Stack, first_port: u16) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::new()));
    let (flag, seen_by_load) = (stop.clone(), seen.clone());
    let thread = stack.spawn_in_ns("client", move || {
        let vip = SocketAddr::from((VIP, HTTP_PORT));
        let mut keep = Conn::open_from(first_port - 1, vip).expect("keep-alive connection");
        let (mut ok, mut failed) = (0u32, Vec::new());
        let start = Instant::now();
        let mut note = |r: std::io::Result<(u16, Vec<u8>)>, what: String| match r {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let release = v["release"].as_str().or(v["version"].as_str()).unwrap_or("?").to_string();
                seen_by_load.lock().unwrap().insert((v["node"].as_str().unwrap_or("?").to_string(), release));
                ok += 1;
            }
            other => failed.push(format!("{what}: {other:?}")),
        };
        let mut exhausted = true;
        for i in 0..LOOP_PORTS {
            if flag.load(Ordering::SeqCst) || start.elapsed() > Duration::from_secs(120) {
                exhausted = false;
                break;
            }
            let began = Instant::now();
            let port = first_port + i as u16;
            note(Conn::open_from(port, vip).and_then(|mut c| c.get("/whoami", false)), format!("connection {i}"));
            if i % 4 == 0 {
                note(keep.get("/whoami", true), format!("keep-alive {i}"));
            }
            std::thread::sleep(PACE.saturating_sub(began.elapsed()));
        }
        if exhausted {
            failed.push(format!("the load ran out of its {LOOP_PORTS} source ports before it was stopped"));
        }
        (ok, failed)
    });
    Load { stop, seen, thread }
}

impl Load {
    /// Waits (at most `limit`) until every node has answered through the VIP on `release`.
    fn wait_for_every_node_on(&self, release: &str, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            let seen = self.seen.lock().unwrap();
            if ["web1", "web2"].iter().all(|n| seen.contains(&(n.to_string(), release.to_string()))) {
                return;
            }
            drop(seen);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(self) -> (u32, Vec<String>, Seen) {
        self.stop.store(true, Ordering::SeqCst);
        let (ok, failed) = self.thread.join().expect("load thread");
        let seen = self.seen.lock().unwrap().clone();
        (ok, failed, seen)
    }
}

/// The release each node reports in `/whoami`, asked directly (not through the VIP).
fn releases(stack: &Stack) -> Vec<String> {
    WEB.iter()
        .map(|addr| {
            let body = stack.exec("client", &format!("curl -sf http://{addr}:{HTTP_PORT}/whoami"));
            let v: serde_json::Value = serde_json::from_str(&body).expect("whoami JSON");
            v["release"].as_str().or(v["version"].as_str()).expect("release field").to_string()
        })
        .collect()
}

fn current(stack: &Stack, i: usize) -> String {
    lb_userspace::deploy::current_release(&stack.releases(i)).expect("current release")
}

#[test]
fn rolling_deploys_under_load() {
    if !privileged("rolling_deploys_under_load") {
        return;
    }
    let stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    assert_eq!(releases(&stack), [FIRST_RELEASE, FIRST_RELEASE]);
    let checked = stack.deploy_plan(true);

    // 1. A good release, node by node, under load: no request fails.
    for i in 0..2 {
        stack.make_release(i, "2.0.0", &[]);
    }
    let load = start_load(&stack, LOOP_PORT_BASE + 1);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = stack.deploy(&checked, "2.0.0");
    load.wait_for_every_node_on("2.0.0", Duration::from_secs(10));
    let (served, failed, seen) = load.finish();
    eprintln!("{out}\n{served} requests served during the deploy, {} failed; seen {seen:?}", failed.len());
    assert!(ok, "deploy 2.0.0 failed:\n{out}");
    assert!(out.contains("[1/2] web1") && out.contains("[2/2] web2") && out.contains("deployed 2.0.0"), "progress: {out}");
    assert!(served > 100, "the load must have run ({served})");
    assert!(failed.is_empty(), "requests failed during the deploy: {failed:?}");
    assert_eq!(releases(&stack), ["2.0.0", "2.0.0"]);
    for node in ["web1", "web2"] {
        assert!(seen.contains(&(node.to_string(), "2.0.0".to_string())), "{node} served 2.0.0 through the VIP: {seen:?}");
    }

    // 2. A corrupted release (one file changed after its manifest was written, on web2 only):
    //    refused by the preflight, nothing changes.
    for i in 0..2 {
        stack.make_release(i, "3.0.0", &[]);
    }
    std::fs::write(stack.releases(1).join("3.0.0").join("index.html"), "tampered").unwrap();
    let (ok, out) = stack.deploy(&checked, "3.0.0");
    assert!(!ok, "a corrupted release must be refused:\n{out}");
    assert!(out.contains("refused") && out.contains("web2") && out.contains("index.html"), "the reason names node and file: {out}");
    assert_eq!([current(&stack, 0), current(&stack, 1)], ["2.0.0", "2.0.0"], "nothing switched");
    assert_eq!(releases(&stack), ["2.0.0", "2.0.0"]);
    assert!(stack.status()["vips"][0]["backends"].as_array().unwrap().iter().all(|b| b["admin_state"] == "ready"), "nothing drained");

    // 3. Without the preflight, web2 itself refuses the corrupted release and never becomes
    //    healthy on it: web2 and the node done before it (web1) are rolled back, under load.
    let unchecked = stack.deploy_plan(false);
    let load = start_load(&stack, LOOP_PORT_BASE + 2 + LOOP_PORTS as u16);
    let (ok, out) = stack.deploy(&unchecked, "3.0.0");
    let (served, failed, _) = load.finish();
    eprintln!("{out}\n{served} requests served during the failed deploy, {} failed", failed.len());
    assert!(!ok, "the deploy must fail:\n{out}");
    assert!(out.contains("rolled back web2 to 2.0.0") && out.contains("rolled back web1 to 2.0.0"), "rollback steps: {out}");
    assert!(out.contains("web2 not healthy on release 3.0.0"), "the reason: {out}");
    assert_eq!([current(&stack, 0), current(&stack, 1)], ["2.0.0", "2.0.0"]);
    assert_eq!(releases(&stack), ["2.0.0", "2.0.0"]);
    assert!(failed.is_empty(), "requests failed during the rolled-back deploy: {failed:?}");
    let status = stack.status();
    for b in status["vips"][0]["backends"].as_array().unwrap() {
        assert_eq!((b["state"].as_str(), b["admin_state"].as_str()), (Some("up"), Some("ready")), "back in service: {b}");
    }
}

/// Two balancers (active-active behind the client's ECMP route): the plan names both admin
/// APIs, each node is drained at both, and a deploy under load through the pair fails no
/// request.
#[test]
fn a_rolling_deploy_through_two_balancers() {
    if !privileged("a_rolling_deploy_through_two_balancers") {
        return;
    }
    let mut opts = Options::new(XdpMode::Driver, Forward::Ipip);
    opts.balancers = 2;
    let stack = Stack::up(opts);
    // `lbd ctl` with both admin APIs makes the same change at each balancer.
    let admin_state = |role: &str| stack.status_of(role)["vips"][0]["backends"][0]["admin_state"].as_str().unwrap().to_string();
    for state in ["drain", "ready"] {
        let lbd = stack.opts.bin_dir.join("lbd");
        stack.exec("lb", &format!("{} ctl --admin {LB}:{ADMIN_PORT} --admin {LB2}:{ADMIN_PORT} --token-file {}/admin.token backend {state} web1", lbd.display(), stack.work.display()));
        assert_eq!([admin_state("lb"), admin_state("lb2")], [state, state], "web1 {state} at both balancers");
    }
    let plan = stack.deploy_plan(true);
    for i in 0..2 {
        stack.make_release(i, "2.0.0", &[]);
    }
    let load = start_load(&stack, LOOP_PORT_BASE + 1);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = stack.deploy(&plan, "2.0.0");
    load.wait_for_every_node_on("2.0.0", Duration::from_secs(10));
    let (served, failed, _) = load.finish();
    eprintln!("{out}\n{served} requests served through two balancers during the deploy, {} failed", failed.len());
    assert!(ok, "deploy 2.0.0 failed:\n{out}");
    assert!(served > 100, "the load must have run ({served})");
    assert!(failed.is_empty(), "requests failed during the deploy: {failed:?}");
    assert_eq!(releases(&stack), ["2.0.0", "2.0.0"]);
    for role in ["lb", "lb2"] {
        let s = stack.status_of(role);
        let pinned: u64 = s["vips"][0]["backends"].as_array().unwrap().iter().map(|b| b["new_flows"].as_u64().unwrap()).sum();
        assert!(pinned > 0, "{role} carried part of the load");
        for b in s["vips"][0]["backends"].as_array().unwrap() {
            assert_eq!((b["state"].as_str(), b["admin_state"].as_str()), (Some("up"), Some("ready")), "{role}: back in service: {b}");
        }
    }
}
