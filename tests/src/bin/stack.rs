//! `cargo xtask run`: the whole stack in network namespaces until Ctrl-C.

use tests::stack::{Forward, Options, Stack, XdpMode, ADMIN, CLIENT, DB_ADMIN, DB_PRIMARY, DB_REPLICA, DB_ROUTER, HTTP_PORT, LB, LB2, LB_LOCAL_PORT, MYSQL_PORT, UDP_PORT, VIP, VIP_NAME};

/// Blocks SIGINT and SIGTERM on this thread (and the threads it spawns later), so that
/// they wait for `sigwait` instead of killing the process before it tears down.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set manipulation.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal() {
    let set = block_signals();
    let mut sig = 0;
    // SAFETY: waits for one of the blocked signals.
    unsafe { libc::sigwait(&set, &mut sig) };
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the stack needs root (network namespaces, XDP): run `sudo -E cargo xtask run`");
        std::process::exit(2);
    }
    let args: Vec<String> = std::env::args().collect();
    let skb = args.iter().any(|a| a == "--skb");
    let l2 = args.iter().any(|a| a == "--l2");
    let mut opts = Options::new(if skb { XdpMode::Skb } else { XdpMode::Driver }, if l2 { Forward::L2 } else { Forward::Ipip });
    // Before any thread exists, so that Ctrl-C during setup also waits for the teardown.
    block_signals();
    opts.balancer = true;
    opts.tls = true;
    opts.database = !args.iter().any(|a| a == "--no-db");
    // The seed's load balancer is an active-active pair; --one-balancer for a single one.
    opts.balancers = if args.iter().any(|a| a == "--one-balancer") { 1 } else { 2 };
    eprintln!("stack: building the topology (client, {} web1, web2, switch)...", if opts.balancers > 1 { "balancers lb and lb2," } else { "balancer," });
    let stack = Stack::up(opts);
    let n = |r: &str| stack.ns(r);
    if std::env::var_os("STACK_NO_SELFCHECK").is_some() {
        println!("stack {} up (no self-check)", stack.name);
        wait_for_signal();
        drop(stack);
        return;
    }
    // Show that full-size packets work both ways through the VIP.
    let down = stack.exec("client", &format!("curl -sf -o /dev/null -w '%{{size_download}}' http://{VIP}/big.bin"));
    let up = stack.exec("client", &format!("head -c 1048576 /dev/urandom > {w}/up.bin && curl -sf --data-binary @{w}/up.bin http://{VIP}/upload", w = stack.work.display()));
    let https = stack.exec("client", &format!("curl -sS --cacert {} https://{VIP_NAME}/whoami", stack.ca_cert().display()));
    let app = if stack.opts.database {
        let out = stack.exec(
            "client",
            &format!(
                "curl -sS --cacert {} -H 'content-type: application/json' -d '{{\"author\":\"xtask run\",\"text\":\"the stack is up\"}}' https://{VIP_NAME}/api/notes",
                stack.ca_cert().display()
            ),
        );
        format!(
            "Self-check of the notes app (stored through db-router): {out}\n\
             Database tier: db-router {DB_ROUTER}:{MYSQL_PORT} (admin {DB_ADMIN} in {db}), primary {DB_PRIMARY}, replica {DB_REPLICA}\n\
             \x20 sudo ip netns exec {client} curl --cacert {ca} https://{VIP_NAME}/app          # the notes page\n\
             \x20 sudo ip netns exec {db} curl http://{DB_ADMIN}/status                      # router: roles, lag, failovers\n\
             \x20 sudo ip netns exec {db} mariadb -h{DB_ROUTER} -u{user} -p{pw} {dbname} -e 'SELECT * FROM notes'\n",
            db = stack.ns("db"),
            client = stack.ns("client"),
            ca = stack.ca_cert().display(),
            user = db_router::tier::APP.user,
            pw = db_router::tier::APP.password,
            dbname = db_router::tier::APP_DB,
        )
    } else {
        String::new()
    };
    // A second release on every node, ready for a rolling deploy.
    for i in 0..2 {
        stack.make_release(i, "2.0.0", &[]);
    }
    let plan = stack.deploy_plan(true);
    let mode = stack.status()["xdp"].to_string();
    let pair = if stack.opts.balancers > 1 {
        format!(
            "Balancers lb {LB} and lb2 {LB2}, active-active: the router (the client's namespace) learns the VIP from both by BGP \
             (BIRD, with BFD) and spreads flows over them (ECMP); they sync their pinned flows, so either can fail or stop.\n\
             \x20 sudo ip netns exec {client} ip route show {VIP}   # one route, a next hop per balancer\n\
             \x20 sudo ip netns exec {lb2} {lbd} status             # flow sync: peer, entries sent and received\n\
             \x20 sudo ip netns exec {lb} ip link set eth0 down     # balancer 1 fails: BFD drops it, lb2 carries its flows (then: up)\n\
             \x20 sudo ip netns exec {lb} {lbd} ctl --admin {LB}:9100 --admin {LB2}:9100 --token-file {work}/admin.token backend drain web1   # at both\n",
            client = n("client"),
            lb = n("lb"),
            lb2 = n("lb2"),
            lbd = stack.opts.bin_dir.join("lbd").display(),
            work = stack.work.display(),
        )
    } else {
        String::new()
    };
    println!(
        "\nThe stack {name} is up. XDP attached: {mode}\n\
         VIP http://{VIP}:{HTTP_PORT}/ (TCP, round-robin over web1 and web2) and {VIP}:{UDP_PORT}/udp (echo)\n\
         HTTPS: https://{VIP_NAME}/ (HTTP/2; TLS ends on the nodes; a local CA signed their certificates)\n\
         Self-check through the VIP: downloaded {down} bytes of /big.bin; uploaded 1 MiB: {up}\n\
         Self-check over HTTPS: {https}\n{app}{pair}\n\
         Try:\n\
         \x20 sudo ip netns exec {client} curl --cacert {ca} https://{VIP_NAME}/whoami   # trust the local CA for this name\n\
         \x20 sudo ip netns exec {client} curl http://{VIP}/whoami\n\
         \x20 sudo ip netns exec {client} curl http://{VIP}/\n\
         \x20 sudo ip netns exec {client} sh -c 'for i in 1 2 3 4; do curl -s http://{VIP}/whoami; echo; done'\n\
         \x20 echo hi | sudo ip netns exec {client} nc -u -w1 {VIP} {UDP_PORT}\n\
         \x20 sudo ip netns exec {client} ping -c 3 {VIP}   # answered by the balancer (XDP)\n\
         \x20 sudo ip netns exec {lb} curl http://{ADMIN}/status      # or /metrics\n\
         \x20 sudo ip netns exec {lb} {lbd} status\n\
         \x20 sudo ip netns exec {lb} {lbd} ctl --token-file {work}/admin.token backend drain web1   # then: ready web1\n\
         \x20 sudo ip netns exec {lb} {lbd} ctl --token-file {work}/admin.token firewall deny {CLIENT}   # dropped in XDP; then: firewall remove {CLIENT}\n\
         \x20 sudo ip netns exec {client} curl http://{LB}:{LB_LOCAL_PORT}/whoami   # the balancer's own service, not a VIP\n\
         \x20 sudo ip netns exec {lb} {lbd} deploy --plan {plan} 2.0.0   # rolling deploy of the prepared release 2.0.0\n\
         Logs: {work}\n\nCtrl-C tears everything down.",
        name = stack.name,
        client = n("client"),
        lb = n("lb"),
        lbd = stack.opts.bin_dir.join("lbd").display(),
        work = stack.work.display(),
        ca = stack.ca_cert().display(),
        plan = plan.display(),
    );
    wait_for_signal();
    eprintln!("stack: tearing down {}", stack.name);
    drop(stack);
    eprintln!("stack: done");
}
