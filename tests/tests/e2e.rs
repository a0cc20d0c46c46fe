//! End to end, with real clients in the client namespace of a whole stack (client,
//! balancer, two web nodes; `tests::stack`). Needs root; with `CI` set a missing privilege
//! fails instead of skipping. Each test builds its own stack and removes it, even on failure.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use lb_common::builder::{frag_needed, Pkt};
use sha2::{Digest, Sha256};
use tests::{
    http::{node_of, Conn},
    privileged,
    stack::{big_file, sh, Forward, Options, Stack, XdpMode, CLIENT, HTTP_PORT, LB, LB2, LB_LOCAL_PORT, ROUTE_TABLE, UDP_PORT, VIP},
};

fn cpus() -> u64 {
    std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1)
}

/// Source ports the tests choose stay below the kernel's ephemeral range (32768 and up):
/// binding a port some earlier curl left in TIME_WAIT there fails with EADDRINUSE.
/// Load loops (one stack each) use LOOP_PORT_BASE.., bounded by LOOP_PORTS connections.
const LOOP_PORT_BASE: u16 = 1100;
const LOOP_PORTS: u32 = 18_000;

/// Next source port for `new_connections` (20000..32767): every batch uses ports no earlier
/// batch used, so each connection is a new flow (a reused 5-tuple would keep its old backend).
static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(20_000);

/// `n` new connections (one request each) from the client; requests served per node.
fn new_connections(stack: &Stack, n: usize) -> HashMap<String, u64> {
    new_connections_to(stack, SocketAddr::from((VIP, HTTP_PORT)), n)
}

fn new_connections_to(stack: &Stack, vip: SocketAddr, n: usize) -> HashMap<String, u64> {
    let base = NEXT_PORT.fetch_add(n as u16, std::sync::atomic::Ordering::SeqCst);
    assert!(u32::from(base) + n as u32 <= 32_000, "test source ports exhausted");
    stack.in_ns("client", move || {
        let mut per_node = HashMap::new();
        for i in 0..n {
            // Distinct source ports: n distinct flows.
            let port = base + i as u16;
            let mut c = Conn::open_from(port, vip).unwrap_or_else(|e| panic!("connection {i} (port {port}) to the VIP: {e}"));
            let (status, body) = c.get("/whoami", false).unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(status, 200);
            *per_node.entry(node_of(&body)).or_insert(0) += 1;
        }
        per_node
    })
}

fn new_flows(stack: &Stack, vip: &str) -> HashMap<String, u64> {
    stack.backend_counters(vip).into_iter().map(|(name, _, flows)| (name, flows)).collect()
}

/// 1000 new connections split 500/500 within ± CPUs, and the daemon's counters agree.
fn check_split(stack: &Stack, n: usize) {
    let before = new_flows(stack, "web");
    let served = new_connections(stack, n);
    let after = new_flows(stack, "web");
    eprintln!("{}: {n} connections served {served:?}", stack.name);
    for node in ["web1", "web2"] {
        let got = served.get(node).copied().unwrap_or(0);
        assert!(got.abs_diff(n as u64 / 2) <= cpus(), "{node} served {got} of {n} (±{} allowed): {served:?}", cpus());
        assert_eq!(after[node] - before[node], got, "daemon's new-flow counter for {node} disagrees with /whoami");
    }
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// 1 MiB down and 1 MiB up through the VIP, byte-exact (full-size packets both ways).
fn check_big_transfers(stack: &Stack) {
    let file = stack.work.join("down.bin");
    stack.exec("client", &format!("curl -sf --max-time 60 -o {} http://{VIP}/big.bin", file.display()));
    let got = std::fs::read(&file).unwrap();
    assert_eq!(got.len(), big_file().len(), "download size");
    assert!(got == big_file(), "download differs from the node's file");
    let up = stack.work.join("up.bin");
    let data: Vec<u8> = (0..1_048_576u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&up, &data).unwrap();
    let reply = stack.exec("client", &format!("curl -sf --max-time 60 --data-binary @{} http://{VIP}/upload", up.display()));
    let v: serde_json::Value = serde_json::from_str(&reply).expect("upload reply JSON");
    assert_eq!(v["bytes"], 1_048_576);
    assert_eq!(v["sha256"], sha256(&data), "upload arrived changed");
}

#[test]
fn driver_mode_ipip_whole_path() {
    if !privileged("driver_mode_ipip_whole_path") {
        return;
    }
    let stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    assert_eq!(stack.status()["xdp"][0]["mode"], "driver");
    check_split(&stack, 1000);

    // One keep-alive connection, 200 requests: one node.
    let nodes = stack.in_ns("client", || {
        let mut c = Conn::open(SocketAddr::from((VIP, HTTP_PORT))).unwrap();
        (0..200).map(|_| node_of(&c.get("/whoami", true).unwrap().1)).collect::<Vec<_>>()
    });
    assert!(nodes.iter().all(|n| *n == nodes[0]), "a keep-alive connection moved: {nodes:?}");

    // UDP VIP: 5-tuples spread round-robin, every datagram answered by its node.
    let before = new_flows(&stack, "echo");
    let served = stack.in_ns("client", || {
        let mut per_node: HashMap<String, u64> = HashMap::new();
        // Keep every socket open so that each has its own port: 200 distinct 5-tuples.
        let mut sockets = Vec::new();
        for i in 0..200 {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let msg = format!("ping {i}");
            s.send_to(msg.as_bytes(), (VIP, UDP_PORT)).unwrap();
            let mut buf = [0u8; 1500];
            let (n, _) = s.recv_from(&mut buf).unwrap_or_else(|e| panic!("UDP reply {i}: {e}"));
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            let (node, rest) = reply.split_once(' ').expect("<node> <payload>");
            assert_eq!(rest, msg);
            *per_node.entry(node.to_string()).or_default() += 1;
            sockets.push(s);
        }
        per_node
    });
    let after = new_flows(&stack, "echo");
    eprintln!("UDP: {served:?}");
    for node in ["web1", "web2"] {
        assert!(served[node].abs_diff(100) <= cpus(), "UDP {served:?}");
        assert_eq!(after[node] - before[node], served[node], "UDP new flows of {node}");
    }

    // The balancer's own traffic is untouched: ping, and a TCP service on its address.
    stack.exec("client", &format!("ping -c 3 -i 0.2 -W 2 {LB}"));
    let body = stack.exec("client", &format!("curl -sf http://{LB}:{LB_LOCAL_PORT}/whoami"));
    assert_eq!(node_of(body.as_bytes()), "lb-local");

    check_big_transfers(&stack);
}

/// The balancer's path to the nodes has the client's MTU (1500), so a full-size client
/// packet does not fit once encapsulated: the balancer answers it with ICMP "fragmentation
/// needed" (MTU 1480), the client's TCP sends smaller segments, and a 1 MiB upload arrives
/// whole. (With the packet passed or dropped instead, the upload would hang: a path-MTU
/// black hole.)
#[test]
fn one_mtu_everywhere_clients_learn_the_path_mtu() {
    if !privileged("one_mtu_everywhere_clients_learn_the_path_mtu") {
        return;
    }
    let stack = Stack::up(Options { mtu: 1500, ..Options::new(XdpMode::Driver, Forward::Ipip) });
    let before = stack.status()["counters"]["icmp_too_big"].as_u64().unwrap();
    check_big_transfers(&stack);
    let counters = &stack.status()["counters"];
    let sent = counters["icmp_too_big"].as_u64().unwrap() - before;
    eprintln!("ICMP fragmentation needed sent: {sent}, too big passed: {}", counters["too_big"]);
    assert!(sent >= 1, "the balancer told the client the path MTU");
    let route = stack.exec("client", &format!("ip route get {VIP}"));
    assert!(route.contains("mtu 1480"), "the client learnt the path MTU: {route}");
}

/// `Icmp: ... InDestUnreachs` of a namespace (/proc/net/snmp).
fn dest_unreachs_received(stack: &Stack, role: &str) -> u64 {
    let snmp = stack.exec(role, "cat /proc/net/snmp");
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next().unwrap(), icmp.next().unwrap());
    let at = names.split_whitespace().position(|n| n == "InDestUnreachs").unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// ICMP to the VIP: `ping` gets its answers from the balancer; a router's "fragmentation
/// needed" about a node's reply (sent to the VIP, since the reply's source is the VIP) goes
/// to the node that holds the flow, whose kernel takes the path MTU from it.
#[test]
fn icmp_to_the_vip() {
    if !privileged("icmp_to_the_vip") {
        return;
    }
    let stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    let echo_before = stack.status()["counters"]["icmp_echo"].as_u64().unwrap();
    stack.exec("client", &format!("ping -c 3 -i 0.2 -W 2 {VIP}"));
    let echo = stack.status()["counters"]["icmp_echo"].as_u64().unwrap() - echo_before;
    assert!(echo >= 3, "the balancer answered the pings ({echo})");

    // A UDP flow through the VIP, and the node that answers it.
    let (node, client_port) = stack.in_ns("client", || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"hello", (VIP, UDP_PORT)).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = s.recv_from(&mut buf).expect("UDP reply");
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        (reply.split_once(' ').expect("<node> <payload>").0.to_string(), s.local_addr().unwrap().port())
    });
    let other = if node == "web1" { "web2" } else { "web1" };
    let before = (dest_unreachs_received(&stack, &node), dest_unreachs_received(&stack, other));
    // What a router between the node and the client sends about a reply too big for its next
    // link: to the VIP, quoting the reply (VIP:port to the client). Sent from the client's
    // namespace, the only "router" this network has.
    let reply = Pkt::udp(VIP.octets(), UDP_PORT, CLIENT.octets(), client_port).payload(&[0; 1400]).ip_packet();
    let message = frag_needed(CLIENT.octets(), VIP.octets(), &reply, 1300).frag(0).ip_packet()[20..].to_vec();
    stack.in_ns("client", move || {
        // SAFETY: plain system calls on a socket of our own, closed at the end; the address
        // is a properly initialised sockaddr_in.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let mut to: libc::sockaddr_in = std::mem::zeroed();
            to.sin_family = libc::AF_INET as libc::sa_family_t;
            to.sin_addr.s_addr = u32::from_ne_bytes(VIP.octets());
            let n = libc::sendto(fd, message.as_ptr().cast(), message.len(), 0, (&raw const to).cast(), std::mem::size_of_val(&to) as libc::socklen_t);
            assert_eq!(n, message.len() as isize, "sendto: {}", std::io::Error::last_os_error());
            libc::close(fd);
        }
    });
    stack.wait_for(&node, &format!("ip route get {CLIENT} | grep -q \"mtu 1300\""), Duration::from_secs(5), "the node to learn the path MTU");
    let route = stack.exec(&node, &format!("ip route get {CLIENT}"));
    let after = (dest_unreachs_received(&stack, &node), dest_unreachs_received(&stack, other));
    eprintln!("{node}: {route}");
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 0), "the flow's node got the message, the other did not");
    assert_eq!(stack.status()["counters"]["icmp_to_backend"], 1);
}

#[test]
fn skb_mode_ipip() {
    if !privileged("skb_mode_ipip") {
        return;
    }
    let stack = Stack::up(Options::new(XdpMode::Skb, Forward::Ipip));
    assert_eq!(stack.status()["xdp"][0]["mode"], "skb");
    check_split(&stack, 1000);
    check_big_transfers(&stack);
}

#[test]
fn l2_mode_carries_http() {
    if !privileged("l2_mode_carries_http") {
        return;
    }
    let stack = Stack::up(Options::new(XdpMode::Driver, Forward::L2));
    assert_eq!(stack.status()["vips"][0]["mode"], "l2");
    check_split(&stack, 1000);
    check_big_transfers(&stack);
}

fn xdp_attached(stack: &Stack) -> bool {
    stack.exec("lb", "ip -d link show dev eth0").contains("prog/xdp")
}

#[test]
fn the_daemon_never_leaves_the_program_attached() {
    if !privileged("the_daemon_never_leaves_the_program_attached") {
        return;
    }
    let mut stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    assert!(xdp_attached(&stack));
    let status = stack.stop_balancer(libc::SIGTERM).expect("lbd was running");
    assert!(status.success(), "SIGTERM: lbd exited with {status}");
    assert!(!xdp_attached(&stack), "still attached after SIGTERM");
    assert_eq!(stack.exec("lb", "sysctl -n net.ipv4.conf.eth0.forwarding").trim(), "0", "sysctl restored");
    stack.start_balancer();
    assert!(xdp_attached(&stack));
    stack.stop_balancer(libc::SIGKILL);
    // The attachment is a bpf_link owned by the process: it goes with it.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!xdp_attached(&stack), "still attached after SIGKILL");
}

#[test]
fn a_bad_config_is_refused_naming_the_line() {
    if !privileged("a_bad_config_is_refused_naming_the_line") {
        return;
    }
    let stack = Stack::up(Options { balancer: false, ..Options::new(XdpMode::Driver, Forward::Ipip) });
    let path = stack.work.join("bad.toml");
    let text = stack.config_text().replacen("weight = 1", "weight = 1000", 1);
    std::fs::write(&path, &text).unwrap();
    let line = text.lines().position(|l| l.contains("weight = 1000")).unwrap() + 1;
    let lbd = stack.opts.bin_dir.join("lbd");
    for cmd in ["check-config", "run --config"] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &stack.ns("lb")])
            .arg(&lbd)
            .args(cmd.split(' '))
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "lbd {cmd} accepted a bad config");
        assert!(err.contains(&format!("line {line}: weight 1000")), "lbd {cmd}: {err}");
    }
    assert!(!xdp_attached(&stack));
    let _ = sh("true");
}

/// Health checks take a dead node out and put it back. web2 vanishes from the network (its
/// link goes down: no FIN, no RST, the worst case); once detected, every new connection is
/// served by web1, and a keep-alive connection pinned to web2 fails at once (re-steered to
/// web1, which resets it) instead of hanging; when web2 returns it gets new connections again.
#[test]
fn a_dead_node_is_taken_out_and_comes_back() {
    if !privileged("a_dead_node_is_taken_out_and_comes_back") {
        return;
    }
    let stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    assert_eq!(stack.backend_state("web2"), "up");
    // A keep-alive connection that lands on web2, kept open across the failure.
    let mut pinned = stack.in_ns("client", || {
        for port in 32_100..32_150u16 {
            let mut c = Conn::open_from(port, SocketAddr::from((VIP, HTTP_PORT))).unwrap();
            if node_of(&c.get("/whoami", true).unwrap().1) == "web2" {
                return c;
            }
        }
        panic!("no connection landed on web2");
    });
    stack.exec("web2", "ip link set eth0 down");
    let detection = stack.wait_backend_state("web2", "down", Duration::from_secs(10));
    eprintln!("web2 marked down {} ms after it vanished", detection.as_millis());
    let t = std::time::Instant::now();
    let result = pinned.get("/whoami", true);
    assert!(result.is_err(), "the connection pinned to the dead node must fail, got {result:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "it must fail promptly (reset), took {:?}", t.elapsed());
    let served = new_connections(&stack, 200);
    assert_eq!(served.get("web1"), Some(&200), "every new connection on web1 while web2 is down: {served:?}");
    assert!(stack.status()["counters"]["resteer"].as_u64().unwrap() >= 1, "the pinned flow was re-steered");
    // web2 comes back.
    stack.exec("web2", "ip link set eth0 up");
    let back = stack.wait_backend_state("web2", "up", Duration::from_secs(10));
    eprintln!("web2 back in rotation {} ms after its link came up", back.as_millis());
    let served = new_connections(&stack, 200);
    for node in ["web1", "web2"] {
        let got = served.get(node).copied().unwrap_or(0);
        assert!(got.abs_diff(100) <= cpus(), "after web2's return {served:?}");
    }
}

/// Runtime control: drain keeps pinned connections and sends new ones elsewhere, ready
/// restores the split, the state survives a daemon restart, and bad requests get a 4xx with
/// a reason.
#[test]
fn drain_ready_and_runtime_state() {
    if !privileged("drain_ready_and_runtime_state") {
        return;
    }
    let mut stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    let mut pinned = stack.in_ns("client", || {
        for port in 32_200..32_250u16 {
            let mut c = Conn::open_from(port, SocketAddr::from((VIP, HTTP_PORT))).unwrap();
            if node_of(&c.get("/whoami", true).unwrap().1) == "web1" {
                return c;
            }
        }
        panic!("no connection landed on web1");
    });
    let out = stack.ctl("backend drain web1").expect("drain");
    assert!(out.contains("drain"), "{out}");
    let served = new_connections(&stack, 100);
    assert_eq!(served.get("web2"), Some(&100), "new connections avoid the drained node: {served:?}");
    for _ in 0..10 {
        assert_eq!(node_of(&pinned.get("/whoami", true).expect("pinned connection keeps working").1), "web1");
    }
    // The state survives a restart of the daemon.
    stack.stop_balancer(libc::SIGTERM);
    stack.start_balancer();
    let s = stack.status();
    let web1 = s["vips"][0]["backends"].as_array().unwrap().iter().find(|b| b["name"] == "web1").unwrap().clone();
    assert_eq!(web1["admin_state"], "drain", "{web1}");
    let served = new_connections(&stack, 50);
    assert_eq!(served.get("web2"), Some(&50), "still drained after a restart: {served:?}");
    stack.ctl("backend ready web1").expect("ready");
    let served = new_connections(&stack, 200);
    for node in ["web1", "web2"] {
        assert!(served.get(node).copied().unwrap_or(0).abs_diff(100) <= cpus(), "ready restores the split: {served:?}");
    }
    // Bad requests: a reason and a 4xx.
    let err = stack.ctl("backend drain web9").unwrap_err();
    assert!(err.contains("404") && err.contains("no backend named"), "{err}");
    let err = stack.ctl("backend weight web1 999").unwrap_err();
    assert!(err.contains("400") && err.contains("0..=256"), "{err}");
    let code = stack.exec("lb", &format!("curl -s -o /dev/null -w '%{{http_code}}' -X POST -d drain http://{}/backends/web1/state", tests::stack::ADMIN));
    assert_eq!(code.trim(), "401", "no token");
}

/// A daemon restart under load drops nothing: lbd exits with SIGUSR1 leaving the program
/// attached and pinned, a new lbd adopts it (replacing the program in place), and meanwhile
/// new connections and a keep-alive connection keep being served. SIGTERM then removes all.
#[test]
fn a_daemon_restart_under_load_drops_nothing() {
    if !privileged("a_daemon_restart_under_load_drops_nothing") {
        return;
    }
    let mut stack = Stack::up(Options { pinned: true, ..Options::new(XdpMode::Driver, Forward::Ipip) });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let load = stack.spawn_in_ns("client", move || {
        let vip = SocketAddr::from((VIP, HTTP_PORT));
        let mut keep = Conn::open_from(19_999, vip).unwrap();
        let keep_node = node_of(&keep.get("/whoami", true).unwrap().1);
        let (mut ok, mut failed, mut moved) = (0u32, Vec::new(), 0u32);
        let start = std::time::Instant::now();
        for i in 0..LOOP_PORTS {
            if flag.load(std::sync::atomic::Ordering::SeqCst) || start.elapsed() > Duration::from_secs(30) {
                break;
            }
            let port = LOOP_PORT_BASE + i as u16;
            match Conn::open_from(port, vip).and_then(|mut c| c.get("/whoami", false)) {
                Ok((200, _)) => ok += 1,
                other => failed.push(format!("{i}: {other:?}")),
            }
            match keep.get("/whoami", true) {
                Ok((200, body)) if node_of(&body) == keep_node => ok += 1,
                Ok(_) => moved += 1,
                Err(e) => failed.push(format!("keep-alive {i}: {e}")),
            }
        }
        (ok, failed, moved)
    });
    let prog_id = |stack: &Stack| -> String {
        let link = stack.exec("lb", "ip -d link show dev eth0");
        link.split("prog/xdp id ").nth(1).and_then(|r| r.split_whitespace().next()).expect("an XDP program attached").to_string()
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = prog_id(&stack);
    let status = stack.stop_balancer(libc::SIGUSR1).expect("lbd was running");
    assert!(status.success(), "SIGUSR1: {status}");
    assert_eq!(prog_id(&stack), before, "still attached between daemons");
    std::thread::sleep(Duration::from_millis(300));
    stack.start_balancer();
    assert_eq!(stack.status()["xdp"][0]["mode"], "adopted");
    // The new daemon's program replaced the old one in the same link: an upgrade in place.
    assert_ne!(prog_id(&stack), before, "the program must have been replaced in place");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed, moved) = load.join().unwrap();
    eprintln!("{ok} requests served across the restart, {} failed, {moved} moved", failed.len());
    assert!(ok > 100, "the load must have run ({ok})");
    assert!(failed.is_empty(), "requests failed across the restart: {failed:?}");
    assert_eq!(moved, 0, "the keep-alive connection must stay on its node");
    // A real stop removes everything.
    stack.stop_balancer(libc::SIGTERM);
    assert!(!stack.exec("lb", "ip -d link show dev eth0").contains("prog/xdp"), "SIGTERM must detach");
    let left = stack.exec("lb", &format!("ls {}/lbd", stack.pin_dir.display()));
    assert!(left.trim().is_empty(), "pins left behind: {left}");
}

/// Failover under continuous load: web2 vanishes; once it is detected no request fails, and
/// the failures before were requests sent to web2 in that window. Then web1 vanishes too:
/// the VIP is reported down; web1 returns: the VIP recovers without a restart.
#[test]
fn failover_under_load_and_all_backends_down() {
    if !privileged("failover_under_load_and_all_backends_down") {
        return;
    }
    let stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let t0 = std::time::Instant::now();
    // (start offset, ok) of every request, new connection each, bounded in count and time.
    let load = stack.spawn_in_ns("client", move || {
        let vip = SocketAddr::from((VIP, HTTP_PORT));
        let mut log = Vec::new();
        for i in 0..LOOP_PORTS {
            if flag.load(std::sync::atomic::Ordering::SeqCst) || t0.elapsed() > Duration::from_secs(40) {
                break;
            }
            let start = t0.elapsed();
            let port = LOOP_PORT_BASE + i as u16;
            let ok = Conn::open_from_within(port, vip, Duration::from_millis(300))
                .and_then(|mut c| c.get("/whoami", false))
                .is_ok_and(|(status, _)| status == 200);
            log.push((start, ok));
        }
        log
    });
    std::thread::sleep(Duration::from_millis(500));
    let killed = t0.elapsed();
    stack.exec("web2", "ip link set eth0 down");
    stack.wait_backend_state("web2", "down", Duration::from_secs(20));
    let detected = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let log = load.join().unwrap();
    let failed: Vec<_> = log.iter().filter(|(_, ok)| !ok).collect();
    let in_window = log.iter().filter(|(t, _)| *t >= killed && *t < detected).count();
    let after = log.iter().filter(|(t, _)| *t >= detected).count();
    eprintln!(
        "detection {} ms; {} requests, {} failed, all started within the {} requests of the detection window; {after} after it",
        (detected - killed).as_millis(), log.len(), failed.len(), in_window
    );
    assert!(after > 50, "load continued after detection ({after})");
    assert!(failed.iter().all(|(t, _)| *t < detected), "a request failed after detection: {failed:?}");
    assert!(failed.len() <= in_window, "failures ({}) beyond the requests sent during detection ({in_window})", failed.len());

    // Every backend down: reported, packets dropped; one back: the VIP recovers by itself.
    stack.exec("web1", "ip link set eth0 down");
    let start = std::time::Instant::now();
    while stack.status()["vips"][0]["live_backends"] != 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "web1 never marked down");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = stack.status();
    assert!(s["vips"][0]["state"].as_str().unwrap().starts_with("down"), "{}", s["vips"][0]);
    // /status reads the health state, which the daemon sets before it reconciles the
    // data plane and logs: wait (bounded) for the line.
    db_router::tier::poll("the loss of every backend logged loudly", Duration::from_secs(10), || {
        stack.log("lbd").contains("no live backend left").then_some(())
    });
    stack.exec("web1", "ip link set eth0 up");
    stack.wait_backend_state("web1", "up", Duration::from_secs(10));
    let served = new_connections(&stack, 20);
    assert_eq!(served.get("web1"), Some(&20), "the VIP recovered without a restart: {served:?}");
}

/// VIPs and backends added and removed while running, kept across a restart; bad requests
/// get a 4xx with a reason.
#[test]
fn vips_and_backends_change_at_runtime() {
    if !privileged("vips_and_backends_change_at_runtime") {
        return;
    }
    let mut stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    stack.ctl("vip remove-backend web web2").expect("remove web2");
    assert_eq!(new_connections(&stack, 50).get("web1"), Some(&50), "web2 removed from the VIP");
    assert_eq!(stack.status()["vips"][0]["backends"].as_array().unwrap().len(), 1);
    stack.ctl("vip add-backend web web2 10.77.0.12").expect("add web2 back");
    let served = new_connections(&stack, 200);
    for node in ["web1", "web2"] {
        assert!(served.get(node).copied().unwrap_or(0).abs_diff(100) <= cpus(), "web2 back: {served:?}");
    }
    // A new VIP: the nodes and the client are told about its address (outside lbd's job).
    let vip_b = std::net::Ipv4Addr::new(10, 77, 100, 2);
    for node in ["web1", "web2"] {
        stack.exec(node, &format!("ip addr add {vip_b}/32 dev lo"));
    }
    stack.exec("client", &format!("ip route add {vip_b}/32 via {}", tests::stack::LB));
    stack
        .ctl(&format!("vip add web-b {vip_b}:{HTTP_PORT}/tcp --backend web1=10.77.0.11 --backend web2=10.77.0.12:1"))
        .expect("add VIP");
    let target = SocketAddr::from((vip_b, HTTP_PORT));
    let served = new_connections_to(&stack, target, 100);
    for node in ["web1", "web2"] {
        assert!(served.get(node).copied().unwrap_or(0).abs_diff(50) <= cpus(), "new VIP: {served:?}");
    }
    // Kept across a restart.
    stack.stop_balancer(libc::SIGTERM);
    stack.start_balancer();
    assert_eq!(new_connections_to(&stack, target, 20).values().sum::<u64>(), 20, "the added VIP survived a restart");
    // Bad requests.
    let err = stack.ctl(&format!("vip add web-b {vip_b}:{HTTP_PORT}/tcp")).unwrap_err();
    assert!(err.contains("409") && err.contains("already exists"), "{err}");
    let err = stack.ctl("vip add web-c 10.77.100.3/tcp").unwrap_err();
    assert!(err.contains("400") && err.contains("address:port/protocol"), "{err}");
    let err = stack.ctl("vip remove nope").unwrap_err();
    assert!(err.contains("404"), "{err}");
    // Removed: no longer served (the client's connection attempt fails), gone from /status.
    stack.ctl("vip remove web-b").expect("remove VIP");
    assert!(stack.status()["vips"].as_array().unwrap().iter().all(|v| v["name"] != "web-b"));
    let refused = stack.in_ns("client", move || Conn::open_from_within(19_000, target, Duration::from_millis(500)).and_then(|mut c| c.get("/whoami", false)).is_err());
    assert!(refused, "a removed VIP must not be served");
}

/// Whether one new connection from the client gets an answer through the VIP (within 1 s).
fn vip_answers(stack: &Stack) -> bool {
    let port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let vip = SocketAddr::from((VIP, HTTP_PORT));
    stack.in_ns("client", move || Conn::open_from_within(port, vip, Duration::from_secs(1)).and_then(|mut c| c.get("/whoami", false)).is_ok())
}

/// The firewall's rules as `GET /firewall` lists them: (prefix, verdict, packets).
fn firewall_rules(stack: &Stack) -> Vec<(String, String, u64)> {
    let v: serde_json::Value = serde_json::from_str(&stack.exec("lb", &format!("curl -sf http://{}/firewall", tests::stack::ADMIN))).expect("JSON");
    v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["prefix"].as_str().unwrap().to_string(), r["verdict"].as_str().unwrap().to_string(), r["packets"].as_u64().unwrap()))
        .collect()
}

#[test]
fn the_firewall_drops_denied_clients_at_the_balancer() {
    if !privileged("the_firewall_drops_denied_clients_at_the_balancer") {
        return;
    }
    let mut stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    let ping = |stack: &Stack, to: std::net::Ipv4Addr| stack.exec_ok("client", &format!("ping -c 1 -W 1 {to}"));
    assert!(vip_answers(&stack) && ping(&stack, VIP) && ping(&stack, LB), "before any rule");

    // Deny the client: the VIP and the balancer's own address stop answering it.
    let out = stack.ctl(&format!("firewall deny {CLIENT}")).expect("deny the client");
    assert!(out.contains(&format!("deny {CLIENT}/32")), "{out}");
    assert!(!vip_answers(&stack), "a denied client must not reach the VIP");
    assert!(!ping(&stack, VIP) && !ping(&stack, LB), "nor ping the VIP or the balancer");
    let rules = firewall_rules(&stack);
    assert_eq!(rules.len(), 1);
    assert!(rules[0].0 == format!("{CLIENT}/32") && rules[0].1 == "deny" && rules[0].2 >= 3, "{rules:?}");
    let metrics = stack.exec("lb", &format!("curl -sf http://{}/metrics", tests::stack::ADMIN));
    assert!(metrics.contains(&format!("lb_firewall_packets_total{{prefix=\"{CLIENT}/32\",verdict=\"deny\"}} {}", rules[0].2)), "{metrics}");
    let status = stack.status();
    assert_eq!(status["firewall"]["deny"], 1);
    assert!(status["counters"]["firewall"].as_u64().unwrap() >= rules[0].2);
    // The backends' health checks go on (their answers are not denied).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(stack.backend_state("web1"), "up");

    // Refused: a rule that would deny the backends (their check answers would be dropped),
    // a prefix with host bits, removing a rule that is not there.
    let err = stack.ctl("firewall deny 10.77.0.0/24").unwrap_err();
    assert!(err.contains("409") && err.contains("web1"), "{err}");
    let err = stack.ctl("firewall deny 10.77.0.1/16").unwrap_err();
    assert!(err.contains("400") && err.contains("did you mean 10.77.0.0/16"), "{err}");
    let err = stack.ctl("firewall remove 192.0.2.0/24").unwrap_err();
    assert!(err.contains("404"), "{err}");
    assert_eq!(firewall_rules(&stack).len(), 1, "refused changes change nothing");

    // An allow list: the segment denied but for the backends and, now, the client.
    stack.ctl(&format!("firewall allow {} {}", tests::stack::WEB[0], tests::stack::WEB[1])).expect("allow the backends");
    stack.ctl("firewall deny 10.77.0.0/24").expect("deny the segment");
    assert!(!vip_answers(&stack), "the client's own deny rule still holds");
    stack.ctl(&format!("firewall allow {CLIENT}")).expect("allow the client");
    assert!(vip_answers(&stack), "the client is an exception now");
    assert_eq!(
        firewall_rules(&stack).iter().map(|(p, v, _)| format!("{v} {p}")).collect::<Vec<_>>(),
        ["deny 10.77.0.0/24", "allow 10.77.0.10/32", "allow 10.77.0.11/32", "allow 10.77.0.12/32"]
    );

    // Kept across a restart (the state file), and enforced again by the new program.
    stack.stop_balancer(libc::SIGTERM);
    stack.start_balancer();
    assert_eq!(firewall_rules(&stack).len(), 4, "rules restored from the state file");
    assert!(vip_answers(&stack));
    stack.ctl(&format!("firewall remove {CLIENT}/32")).expect("remove the client's exception");
    assert!(!vip_answers(&stack), "the segment's deny rule applies to the client again");
    assert!(stack.ctl("firewall list").unwrap().contains("deny  10.77.0.0/24"));
    stack.ctl("firewall remove 10.77.0.0/24 10.77.0.11 10.77.0.12").expect("remove the rest");
    assert!(firewall_rules(&stack).is_empty());
    assert!(vip_answers(&stack) && ping(&stack, LB), "no rules, nothing denied");

    // A blocklist file named by the configuration, reloaded at runtime: the command, then
    // SIGHUP after the file changed; a file with a bad line changes nothing.
    let list = stack.work.join("drop.txt");
    std::fs::write(&list, format!("; a blocklist\n198.51.100.0/24 ; SBL1\n{CLIENT} # the client\n")).unwrap();
    let config = stack.work.join("lbd.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("\n[admin]", &format!("\n[firewall]\ndeny_files = [\"{}\"]\n\n[admin]", list.display()), 1);
    std::fs::write(&config, text).unwrap();
    let out = stack.ctl("firewall reload").expect("reload");
    assert!(out.contains("\"rules\":2"), "{out}");
    assert!(!vip_answers(&stack), "the reloaded list denies the client");
    std::fs::write(&list, "198.51.100.0/24\n10.77.0.10/33\n").unwrap();
    let err = stack.ctl("firewall reload").unwrap_err();
    assert!(err.contains("400") && err.contains("drop.txt line 2") && err.contains("0..=32"), "{err}");
    assert_eq!(firewall_rules(&stack).len(), 2, "a bad file changes nothing");
    std::fs::write(&list, "198.51.100.0/24\n").unwrap();
    let pid = stack.pid("lbd").expect("lbd runs");
    // SAFETY: a signal to the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while firewall_rules(&stack).len() != 1 {
        assert!(std::time::Instant::now() < deadline, "SIGHUP did not reload: {:?}", firewall_rules(&stack));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(vip_answers(&stack), "the client is out of the list again");
}

/// A VIP's allow list: sources outside it lose the VIP (not the VIP address's other VIPs),
/// the list changes at runtime and survives a restart.
#[test]
fn a_vip_allow_list_keeps_other_sources_out() {
    if !privileged("a_vip_allow_list_keeps_other_sources_out") {
        return;
    }
    let mut stack = Stack::up(Options::new(XdpMode::Driver, Forward::Ipip));
    let udp_answers = |stack: &Stack| {
        stack.in_ns("client", || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            s.send_to(b"allow?", (VIP, UDP_PORT)).unwrap();
            let mut buf = [0u8; 64];
            s.recv_from(&mut buf).is_ok()
        })
    };
    stack.ctl("vip allow web 192.0.2.0/24").expect("restrict the VIP");
    assert!(!vip_answers(&stack), "the client is not in the VIP's allow list");
    assert!(udp_answers(&stack), "the UDP VIP on the same address has no list");
    assert!(stack.status()["counters"]["vip_not_allowed"].as_u64().unwrap() >= 1);
    assert_eq!(stack.status()["vips"][0]["allow"], serde_json::json!(["192.0.2.0/24"]));
    stack.ctl("vip allow web 192.0.2.0/24 10.77.0.0/24").expect("add the client's network");
    assert!(vip_answers(&stack), "the client's network is allowed now");
    stack.ctl("vip allow web 192.0.2.0/24").expect("take it out again");
    // Kept across a restart (the VIP set changed at runtime is in the state file).
    stack.stop_balancer(libc::SIGTERM);
    stack.start_balancer();
    assert!(!vip_answers(&stack), "still restricted after the restart");
    let err = stack.ctl("vip allow web 10.77.0.1/24").unwrap_err();
    assert!(err.contains("400") && err.contains("did you mean 10.77.0.0/24"), "{err}");
    let err = stack.ctl("vip allow nope 10.0.0.0/8").unwrap_err();
    assert!(err.contains("404"), "{err}");
    stack.ctl("vip allow web").expect("open the VIP");
    assert!(vip_answers(&stack), "open to every source again");
    assert_eq!(stack.status()["vips"][0]["allow"], serde_json::json!([]));
}

/// lbd's per-source limit: a client that opens flows faster than `source_flow_limit` a
/// window gets its further SYNs dropped (its connection attempts stall), while its open
/// keep-alive connection goes on; a window later it connects again.
#[test]
fn a_client_past_its_new_flow_limit_waits() {
    if !privileged("a_client_past_its_new_flow_limit_waits") {
        return;
    }
    let mut opts = Options::new(XdpMode::Driver, Forward::Ipip);
    opts.source_flow_limit = 5;
    let stack = Stack::up(opts);
    assert_eq!(stack.status()["source_flow_limit"], 5);
    let base = NEXT_PORT.fetch_add(20, std::sync::atomic::Ordering::SeqCst);
    let vip = SocketAddr::from((VIP, HTTP_PORT));
    let (kept, opened) = stack.in_ns("client", move || {
        // The Stack's own checks opened flows from the client a while ago; wait out that window.
        std::thread::sleep(Duration::from_millis(1100));
        let mut keep = Conn::open_from(base, vip).expect("first connection");
        let mut opened = 1;
        // Eleven more within the window (1.07 s): the refused ones give up after 80 ms.
        for i in 1..12u16 {
            if Conn::open_from_within(base + i, vip, Duration::from_millis(80)).and_then(|mut c| c.get("/whoami", false)).is_ok() {
                opened += 1;
            }
        }
        (keep.get("/whoami", false).map(|(s, _)| s).unwrap_or(0), opened)
    });
    assert_eq!(opened, 5, "five new flows a window, the other attempts' SYNs dropped");
    assert_eq!(kept, 200, "an open connection of the limited client goes on");
    let dropped = stack.status()["counters"]["source_limit"].as_u64().unwrap();
    assert!(dropped >= 7, "{dropped} SYNs dropped");
    let port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let later = stack.in_ns("client", move || {
        std::thread::sleep(Duration::from_millis(1200));
        Conn::open_from_within(port, vip, Duration::from_secs(1)).and_then(|mut c| c.get("/whoami", false)).is_ok()
    });
    assert!(later, "a window later the client connects again");
}

/// HTTPS ends on the nodes (the balancer forwards packets): the client trusts the stack's
/// local CA, reaches the VIP by name, negotiates HTTP/2 over ALPN, and both nodes serve.
#[test]
fn https_through_the_vip() {
    if !privileged("https_through_the_vip") {
        return;
    }
    let stack = Stack::up(Options { tls: true, ..Options::new(XdpMode::Driver, Forward::Ipip) });
    let ca = stack.ca_cert();
    let url = format!("https://{}/whoami", tests::stack::VIP_NAME);
    let mut nodes = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let out = stack.exec("client", &format!("curl -sS --cacert {} -w '\\n%{{http_version}}' {url}", ca.display()));
        let (body, version) = out.rsplit_once('\n').expect("body and version");
        assert_eq!(version, "2", "HTTP/2 over ALPN: {out}");
        nodes.insert(node_of(body.as_bytes()));
    }
    assert_eq!(nodes.len(), 2, "both nodes answer over HTTPS: {nodes:?}");
    // Without the CA the certificate is not trusted.
    assert!(!stack.exec_ok("client", &format!("curl -sS -o /dev/null {url}")), "an untrusted certificate must fail");
    // The whole 1 MiB file, byte-exact, over TLS through the VIP.
    let got = stack.exec("client", &format!("curl -sS --cacert {} https://{}/big.bin | sha256sum", ca.display(), tests::stack::VIP_NAME));
    assert_eq!(got.split_whitespace().next().unwrap(), sha256(&big_file()));
}

/// The notes app through the VIP over HTTPS, stored in MariaDB through db-router: notes
/// written through both nodes land on the primary (server-side count), replicate, and every
/// node's page lists all of them, naming the node and release that served it.
#[test]
fn notes_app_through_the_vip_on_the_database_tier() {
    if !privileged("notes_app_through_the_vip_on_the_database_tier") {
        return;
    }
    let stack = Stack::up(Options { tls: true, database: true, ..Options::new(XdpMode::Driver, Forward::Ipip) });
    let ca = stack.ca_cert();
    let mut writers = std::collections::BTreeSet::new();
    let n = 10;
    for i in 0..n {
        let out = stack.exec(
            "client",
            &format!(
                "curl -sS --cacert {} -H 'content-type: application/json' -d '{{\"author\":\"e2e\",\"text\":\"note {i}\"}}' -w '\\n%{{http_code}}' https://{}/api/notes",
                ca.display(),
                tests::stack::VIP_NAME
            ),
        );
        let (body, code) = out.rsplit_once('\n').expect("body and status");
        assert_eq!(code, "201", "POST /api/notes: {out}");
        let note: serde_json::Value = serde_json::from_str(body).expect("note JSON");
        writers.insert(note["node"].as_str().expect("node").to_string());
    }
    assert_eq!(writers.len(), 2, "both nodes wrote notes: {writers:?}");
    let db = stack.db.as_ref().expect("database tier");
    assert_eq!(db.primary.value("SELECT COUNT(*) FROM app.notes").unwrap(), n.to_string(), "every note on the primary");
    db.wait_caught_up(Duration::from_secs(30)).expect("replica catches up");
    assert_eq!(db.replica.value("SELECT COUNT(*) FROM app.notes").unwrap(), n.to_string(), "and on the replica");
    for (i, web) in tests::stack::WEB.iter().enumerate() {
        let page = stack.exec("client", &format!("curl -sS http://{web}/app"));
        for k in 0..n {
            assert!(page.contains(&format!("note {k}")), "web{}'s page lists note {k}:\n{page}", i + 1);
        }
        assert!(page.contains(&format!("Served by node <b>web{}</b>, release <b>1.0.0</b>", i + 1)), "{page}");
    }
}

/// The new-flow counts of a VIP's backends summed, on the balancer in namespace `role`.
fn pinned_on(stack: &Stack, role: &str) -> u64 {
    let s = stack.status_of(role);
    let vip = s["vips"].as_array().unwrap().iter().find(|v| v["name"] == "web").expect("vip web").clone();
    vip["backends"].as_array().unwrap().iter().map(|b| b["new_flows"].as_u64().unwrap()).sum()
}

fn counter(stack: &Stack, role: &str, name: &str) -> u64 {
    stack.status_of(role)["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name}"))
}

/// Waits until `check` holds of balancer `role`'s `/status` (up to 10 s).
fn wait_status(stack: &Stack, role: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let start = std::time::Instant::now();
    while !check(&stack.status_of(role)) {
        assert!(start.elapsed() < Duration::from_secs(10), "{role}: timed out waiting for {what}: {:#}", stack.status_of(role)["sync"]);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two balancers, active-active behind the client's ECMP route (a router in front of a
/// balancer pair spreads flows by their 5-tuple), syncing their pinned flows. Keep-alive
/// connections spread over both; balancer 1 fails (its daemon killed: its XDP program goes
/// with it) and the route is withdrawn, as a router does on losing a balancer: every
/// connection goes on through balancer 2, on the node it was on, found in balancer 2's flow
/// table (no hash fallback). Balancer 1 comes back, gets balancer 2's whole table, and the
/// route spreads again: the connections it takes over go on as well.
#[test]
fn a_failed_balancer_hands_its_flows_to_the_other() {
    if !privileged("a_failed_balancer_hands_its_flows_to_the_other") {
        return;
    }
    let mut opts = Options::new(XdpMode::Driver, Forward::Ipip);
    opts.balancers = 2;
    opts.pinned = true;
    let mut stack = Stack::up(opts);
    let vip = SocketAddr::from((VIP, HTTP_PORT));
    let ports: Vec<u16> = (32_200..32_240).collect();
    let mut conns: Vec<(u16, Conn, String)> = stack.in_ns("client", move || {
        ports
            .into_iter()
            .map(|p| {
                let mut c = Conn::open_from(p, vip).unwrap_or_else(|e| panic!("connect from {p}: {e}"));
                let node = node_of(&c.get("/whoami", true).unwrap().1);
                (p, c, node)
            })
            .collect()
    });
    // Which balancer each connection went through: the client's route for its 5-tuple.
    let via = |stack: &Stack, port: u16| {
        let r = stack.exec("client", &format!("ip route get {VIP} from {CLIENT} ipproto tcp sport {port} dport {HTTP_PORT}"));
        if r.contains(&format!("via {LB} ")) { "lb" } else { "lb2" }
    };
    let on_lb1 = conns.iter().filter(|(p, ..)| via(&stack, *p) == "lb").count() as u64;
    eprintln!("{on_lb1} of {} connections through balancer 1, the rest through balancer 2", conns.len());
    assert!(on_lb1 > 0 && on_lb1 < conns.len() as u64, "ECMP spreads the connections over both balancers");
    assert_eq!(pinned_on(&stack, "lb"), on_lb1, "balancer 1 pinned the connections routed to it");
    assert_eq!(pinned_on(&stack, "lb2"), conns.len() as u64 - on_lb1, "balancer 2 pinned the others");
    let nodes: HashMap<&str, usize> = conns.iter().fold(HashMap::new(), |mut m, (_, _, n)| {
        *m.entry(n.as_str()).or_default() += 1;
        m
    });
    assert_eq!(nodes.len(), 2, "round robin on each balancer uses both nodes: {nodes:?}");
    wait_status(&stack, "lb2", "balancer 1's flows", |s| s["sync"]["stats"]["entries_received"].as_u64().unwrap_or(0) >= on_lb1);
    wait_status(&stack, "lb", "balancer 2's flows", |s| s["sync"]["stats"]["entries_received"].as_u64().unwrap_or(0) >= conns.len() as u64 - on_lb1);
    assert_eq!(stack.status_of("lb2")["sync"]["peers"][0]["up"], true);
    let metrics = stack.exec("lb2", "curl -sf http://127.0.0.1:9100/metrics");
    for line in [format!("lb_sync_peer_up{{peer=\"{LB}:7946\"}} 1"), format!("lb_sync_peer_synced{{peer=\"{LB}:7946\"}} 1"), "lb_sync_rejected_total{reason=\"auth\"} 0".to_string()] {
        assert!(metrics.lines().any(|l| l == line), "lb2's /metrics lacks {line:?}");
    }
    assert!(metrics.contains(&format!("lb_vip_routes_announced{{table=\"{ROUTE_TABLE}\",device=\"lbd-t{ROUTE_TABLE}\"}} 1")), "lb2 announces");
    let received = metrics.lines().find(|l| l.starts_with("lb_sync_entries_received_total")).and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok());
    assert!(received.is_some_and(|n| n >= on_lb1), "lb_sync_entries_received_total {received:?}: {}", metrics.lines().filter(|l| l.starts_with("lb_sync")).collect::<Vec<_>>().join("\n"));

    // Balancer 1's daemon restarts (SIGUSR1, then a new lbd adopts the pinned program): its
    // route stays announced throughout, the connections go on.
    let status = stack.stop_process("lbd", libc::SIGUSR1).expect("lbd exits");
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(300));
    stack.wait_route(&[LB, LB2], Duration::ZERO);
    stack.start_balancer_n(0);
    stack.wait_route(&[LB, LB2], Duration::ZERO);
    for (p, c, node) in conns.iter_mut() {
        let got = c.get("/whoami", true).unwrap_or_else(|e| panic!("connection from port {p} after balancer 1 restarted: {e}"));
        assert_eq!(&node_of(&got.1), node, "connection from port {p} stays on its node");
    }

    // Balancer 1 fails: its link goes (no FIN, no BGP notification), its daemon with it.
    stack.exec("lb", "ip link set eth0 down");
    let gone = stack.wait_route(&[LB2], Duration::from_secs(10));
    eprintln!("the router dropped balancer 1's route {} ms after its link went (BFD)", gone.as_millis());
    stack.stop_process("lbd", libc::SIGKILL);
    let (hits, fallbacks) = (counter(&stack, "lb2", "flow_hit"), counter(&stack, "lb2", "hash_fallback"));
    for (p, c, node) in conns.iter_mut() {
        let got = c.get("/whoami", true).unwrap_or_else(|e| panic!("connection from port {p} after balancer 1 failed: {e}"));
        assert_eq!(&node_of(&got.1), node, "connection from port {p} stays on its node");
    }
    assert_eq!(counter(&stack, "lb2", "hash_fallback"), fallbacks, "every moved flow found its entry on balancer 2");
    assert!(counter(&stack, "lb2", "flow_hit") >= hits + conns.len() as u64);
    let served = new_connections(&stack, 40);
    assert_eq!(served.values().sum::<u64>(), 40, "new connections through balancer 2 alone: {served:?}");

    // Balancer 1 comes back (a reboot: its pinned program and its routes are gone); lbd
    // gets balancer 2's whole table before it announces the VIP, then the router spreads
    // flows again.
    assert_eq!(stack.exec("lb", &format!("ip route show table {ROUTE_TABLE}")).trim(), "", "its routes went with its daemon");
    std::fs::remove_dir_all(stack.pin_dir.join("lbd")).unwrap();
    stack.exec("lb", "ip link set eth0 up");
    stack.start_balancer_n(0);
    assert_eq!(stack.status_of("lb")["sync"]["peers"][0]["synced"], true, "ready only once balancer 2's table arrived");
    let back_in = stack.wait_route(&[LB, LB2], Duration::from_secs(30));
    eprintln!("balancer 1 back in the route {} ms after it was ready", back_in.as_millis());
    let back = conns.iter().filter(|(p, ..)| via(&stack, *p) == "lb").count();
    for (p, c, node) in conns.iter_mut() {
        let got = c.get("/whoami", true).unwrap_or_else(|e| panic!("connection from port {p} after balancer 1 returned: {e}"));
        assert_eq!(&node_of(&got.1), node, "connection from port {p} stays on its node");
    }
    assert_eq!(counter(&stack, "lb", "hash_fallback"), 0, "balancer 1 found every flow it took back");
    assert!(back > 0 && counter(&stack, "lb", "flow_hit") >= back as u64, "balancer 1 took back {back} connections, each a hit");
    eprintln!("balancer 1 failed: {} connections went on through balancer 2; it returned and took {back} back", conns.len());

    // Balancer 2's daemon crashes (SIGKILL): its pinned program goes on forwarding, and its
    // routes, bound to a device that dies with the daemon, are withdrawn at once; the
    // connections go on through balancer 1. A new lbd takes the program over and announces
    // again once it has balancer 1's table.
    stack.stop_process("lbd2", libc::SIGKILL);
    let gone = stack.wait_route(&[LB], Duration::from_secs(10));
    eprintln!("balancer 2's route withdrawn {} ms after its daemon was killed", gone.as_millis());
    for (p, c, node) in conns.iter_mut() {
        let got = c.get("/whoami", true).unwrap_or_else(|e| panic!("connection from port {p} after balancer 2's daemon died: {e}"));
        assert_eq!(&node_of(&got.1), node, "connection from port {p} stays on its node");
    }
    stack.start_balancer_n(1);
    stack.wait_route(&[LB, LB2], Duration::from_secs(30));

    // Balancer 2 is stopped for maintenance (SIGTERM): it withdraws its route, and forwards
    // until the router has moved its flows to balancer 1. Under a stream of new connections
    // and on the keep-alive ones, no request fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let until = stop.clone();
    let load = stack.spawn_in_ns("client", move || {
        let (mut ok, mut failed) = (0u32, Vec::new());
        for i in 0..10_000u16 {
            if until.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            match Conn::open_from_within(LOOP_PORT_BASE + i, vip, Duration::from_secs(2)).and_then(|mut c| c.get("/whoami", false)) {
                Ok((200, _)) => ok += 1,
                other => failed.push(format!("connection {i}: {other:?}")),
            }
        }
        (ok, failed)
    });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling a child of ours.
    unsafe { libc::kill(stack.pid("lbd2").expect("lbd2") as i32, libc::SIGTERM) };
    let moved = stack.wait_route(&[LB], Duration::from_secs(10));
    eprintln!("balancer 2 withdrawn from the route {} ms after SIGTERM", moved.as_millis());
    for (p, c, node) in conns.iter_mut() {
        let got = c.get("/whoami", true).unwrap_or_else(|e| panic!("connection from port {p} while balancer 2 stops: {e}"));
        assert_eq!(&node_of(&got.1), node, "connection from port {p} stays on its node");
    }
    let status = stack.stop_process("lbd2", libc::SIGTERM).expect("lbd2 exits");
    assert!(status.success(), "lbd2 exits cleanly: {status:?}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = load.join().expect("load thread");
    assert!(failed.is_empty(), "{} of {} new connections failed while balancer 2 stopped: {:?}", failed.len(), ok as usize + failed.len(), &failed[..failed.len().min(5)]);
    assert!(ok > 0);
    for (p, c, node) in conns.iter_mut() {
        let got = c.get("/whoami", true).unwrap_or_else(|e| panic!("connection from port {p} after balancer 2 stopped: {e}"));
        assert_eq!(&node_of(&got.1), node, "connection from port {p} stays on its node");
    }
    eprintln!("balancer 2 stopped gracefully: {ok} new connections meanwhile, none failed; the keep-alive ones went on");
}
