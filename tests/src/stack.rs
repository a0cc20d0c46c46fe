//! The whole stack in network namespaces: a client, the balancer, two web nodes, joined by a
//! bridge in a switch namespace. Used by the end-to-end tests, the benchmarks and
//! `cargo xtask run`. Everything it creates has a unique name (`xws-<pid>-<n>-...`), and
//! `Drop` removes it all: processes, XDP links, namespaces (with their links), files. A
//! leftover of a crashed run (its pid is gone) is removed by the next `Stack::up`.
//!
//! ```text
//!  client 10.77.0.10 ─┐
//!  lb     10.77.0.2  ─┤                      VIP 10.77.100.1 (routed by the client via lb)
//! (lb2    10.77.0.3  ─┼─ br0 (switch ns)     with `balancers: 2`: the client learns the VIP
//!                     │                      from lb and lb2 by BGP, BIRD with BFD, ECMP)
//!  web1   10.77.0.11 ─┤                      VIP bound on lo of web1 and web2
//!  web2   10.77.0.12 ─┘
//! ```
//! The balancer and web nodes get MTU 1600 so that full-size client packets fit once
//! encapsulated (+20 bytes); the client keeps 1500. With `Options::mtu` at 1500 they do not
//! fit, and the balancer's ICMP "fragmentation needed" makes the client send smaller ones.

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
pub const LB: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The second balancer (with `Options::balancers` 2): the client routes the VIP over both
/// (ECMP, by a hash of the 5-tuple), and the two sync their flows.
pub const LB2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
/// The balancers' flow-sync port (UDP).
pub const SYNC_PORT: u16 = 7946;
/// The kernel routing table the balancers' lbd keeps its VIP routes in, for BIRD to announce.
pub const ROUTE_TABLE: u32 = 100;

/// BIRD 2's daemon (Debian's bird2), for the two-balancer stack.
pub fn which_bird() -> String {
    for p in ["/usr/sbin/bird", "/usr/local/sbin/bird", "/usr/bin/bird"] {
        if Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("bird (BIRD 2) not found: the two-balancer stack needs it (apt-get install bird2; cargo xtask test installs it)");
}
pub const WEB: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 77, 0, 11), Ipv4Addr::new(10, 77, 0, 12)];
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
/// The database tier (with `database`): the router, the primary, the replica.
pub const DB_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 20);
pub const DB_PRIMARY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 21);
pub const DB_REPLICA: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 22);
pub const MYSQL_PORT: u16 = 3306;
/// db-router's admin API (/metrics, /status), in the router's namespace.
pub const DB_ADMIN: &str = "127.0.0.1:9104";
pub const HTTP_PORT: u16 = 80;
pub const HTTPS_PORT: u16 = 443;
/// The VIP's name in the client namespace's /etc/hosts and in the node certificates.
pub const VIP_NAME: &str = "www.xws.test";
/// The release every node starts on.
pub const FIRST_RELEASE: &str = "1.0.0";
pub const UDP_PORT: u16 = 5353;
/// A TCP service of the balancer's own (not a VIP).
pub const LB_LOCAL_PORT: u16 = 8080;
pub const ADMIN: &str = "127.0.0.1:9100";
pub const ADMIN_PORT: u16 = 9100;
/// Size of `big.bin` in each node's application directory.
pub const BIG_FILE: usize = 1 << 20;
const PREFIX: &str = "xws";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    Driver,
    Skb,
}

impl XdpMode {
    /// As lbd's `xdp_mode` and `--xdp-mode` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Driver => "driver",
            XdpMode::Skb => "skb",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Ipip,
    L2,
}

impl Forward {
    /// As lbd's `mode` and `--mode` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Forward::Ipip => "ipip",
            Forward::L2 => "l2",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub xdp_mode: XdpMode,
    pub forward: Forward,
    /// Where `lbd` and `web-app` are (default: the workspace's target/release).
    pub bin_dir: PathBuf,
    /// Start the balancer daemon (benchmarks may want HAProxy instead).
    pub balancer: bool,
    /// Give lbd a `pin_dir`, so that a restart (SIGUSR1, then start again) adopts the program.
    pub pinned: bool,
    /// `interval_ms, fast_interval_ms, timeout_ms, rise, fall` of lbd's health checks.
    pub health: (u32, u32, u32, u32, u32),
    /// HTTPS on the nodes (a local CA, node certificates for [`VIP_NAME`]) and a VIP on 443.
    pub tls: bool,
    /// A MariaDB primary and replica (namespaces db1, db2) behind db-router (namespace db);
    /// the web nodes' notes app stores through the router.
    pub database: bool,
    /// MTU of the balancer's and the web nodes' links (the client's is 1500): 1600 by
    /// default, room for the IPIP header; 1500 makes full-size client packets too big once
    /// encapsulated.
    pub mtu: u16,
    /// lbd's `source_flow_limit` (0: off, the default).
    pub source_flow_limit: u32,
    /// 1, or 2: a second balancer (namespace lb2, [`LB2`]), active-active with the first
    /// behind the client's ECMP route, the two syncing their flows.
    pub balancers: u8,
    /// With two balancers: their lbd sync flows (`[sync]`; default true).
    pub sync: bool,
}

/// The demo's checks: fast, yet with room for a loaded machine (HAProxy's defaults are
/// 2000 ms, rise 2, fall 3).
pub const DEMO_HEALTH: (u32, u32, u32, u32, u32) = (300, 100, 200, 2, 2);

impl Options {
    pub fn new(xdp_mode: XdpMode, forward: Forward) -> Self {
        Self { xdp_mode, forward, bin_dir: default_bin_dir(), balancer: true, pinned: false, health: DEMO_HEALTH, tls: false, database: false, mtu: 1600, source_flow_limit: 0, balancers: 1, sync: true }
    }
}

/// `target/release` of this workspace (or `$CARGO_TARGET_DIR/release`), or `LB_BIN_DIR`.
pub fn default_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LB_BIN_DIR") {
        return d.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("release");
    fs::canonicalize(&dir).unwrap_or(dir)
}

/// Runs `sh -c cmd`, returning stdout; panics with the output on failure.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh_ok(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(cmd).stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces, pins and state of stacks whose process is gone.
pub fn clean_leftovers() {
    let list = Command::new("ip").args(["netns", "list"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(pid) = name.strip_prefix(&format!("{PREFIX}-")).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) {
            if !pid_alive(pid) {
                eprintln!("stack: removing leftover namespace {name} (pid {pid} is gone)");
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    for dir in ["/sys/fs/bpf", "/tmp", "/etc/netns"] {
        let Ok(entries) = fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(&format!("{PREFIX}-")).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) {
                if !pid_alive(pid) {
                    eprintln!("stack: removing leftover {}", e.path().display());
                    let _ = Command::new("umount").arg(e.path().join("bpf")).stderr(Stdio::null()).status();
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Stack {
    pub name: String,
    pub opts: Options,
    pub work: PathBuf,
    pub pin_dir: PathBuf,
    procs: Vec<(String, Child)>,
    namespaces: Vec<String>,
    backends_set_up: Vec<String>,
    /// `--db-url` of the web nodes, when the stack has a database tier.
    pub db_url: Option<String>,
    /// The MariaDB servers (with `database`); dropped (killed, removed) after the stack's
    /// own teardown.
    pub db: Option<db_router::tier::Pair>,
}

impl Stack {
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.name)
    }

    /// `ip netns exec <ns> sh -c cmd`.
    pub fn exec(&self, role: &str, cmd: &str) -> String {
        sh(&format!("ip netns exec {} sh -c '{}'", self.ns(role), cmd.replace('\'', r"'\''")))
    }

    pub fn exec_ok(&self, role: &str, cmd: &str) -> bool {
        sh_ok(&format!("ip netns exec {} sh -c '{}'", self.ns(role), cmd.replace('\'', r"'\''")))
    }

    fn bin(&self, name: &str) -> String {
        let p = self.opts.bin_dir.join(name);
        assert!(p.exists(), "{} not found: build it first (cargo build --release -p lb-userspace -p web-app; cargo xtask test does)", p.display());
        p.display().to_string()
    }

    /// Starts `args` in `role`'s namespace; its output goes to `<work>/<label>.log`.
    pub fn spawn(&mut self, role: &str, label: &str, args: &[String]) {
        let log = fs::File::create(self.work.join(format!("{label}.log"))).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(role)]).args(args).stdout(log.try_clone().unwrap()).stderr(log);
        // The caller may block SIGINT/SIGTERM (the `stack` binary does, to tear down in order);
        // a child inherits the mask, and then would never see our SIGTERM.
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {label}: {e}"));
        self.procs.push((label.to_string(), child));
    }

    pub fn log(&self, label: &str) -> String {
        fs::read_to_string(self.work.join(format!("{label}.log"))).unwrap_or_default()
    }

    /// Waits until `cmd` succeeds in `role`'s namespace, up to `timeout`.
    pub fn wait_for(&self, role: &str, cmd: &str, timeout: Duration, what: &str) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.exec_ok(role, cmd) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{}: timed out waiting for {what}\n{}", self.name, self.log_tails());
    }

    /// The last lines of every process log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for (label, _) in &self.procs {
            let log = self.log(label);
            let lines: Vec<&str> = log.lines().collect();
            out += &format!("--- {label}.log (last lines):\n{}\n", lines[lines.len().saturating_sub(15)..].join("\n"));
        }
        out
    }

    pub fn up(opts: Options) -> Stack {
        clean_leftovers();
        let name = format!("{PREFIX}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let work = PathBuf::from("/tmp").join(&name);
        fs::create_dir_all(&work).expect("work dir");
        // `ip netns exec` remounts /sys, hiding /sys/fs/bpf: pin in a bpffs of our own, in
        // the work directory, visible from every namespace's exec (same mount tree).
        let pin_dir = work.join("bpf");
        fs::create_dir_all(&pin_dir).expect("pin dir");
        sh(&format!("mount -t bpf bpf {}", pin_dir.display()));
        let mut s = Stack { name, opts, work, pin_dir, procs: Vec::new(), namespaces: Vec::new(), backends_set_up: Vec::new(), db_url: None, db: None };
        s.build_network();
        if s.opts.database {
            s.start_database();
        }
        s.start_web_nodes();
        if s.opts.balancer {
            s.start_balancer();
        }
        s
    }

    fn build_network(&mut self) {
        let mut roles = vec!["sw", "client", "lb", "web1", "web2"];
        let mtu = self.opts.mtu;
        let mut hosts = vec![("client", CLIENT, 1500), ("lb", LB, mtu), ("web1", WEB[0], mtu), ("web2", WEB[1], mtu)];
        if self.opts.balancers > 1 {
            roles.push("lb2");
            hosts.push(("lb2", LB2, mtu));
        }
        if self.opts.database {
            roles.extend(["db", "db1", "db2"]);
            hosts.extend([("db", DB_ROUTER, 1500), ("db1", DB_PRIMARY, 1500), ("db2", DB_REPLICA, 1500)]);
        }
        for role in roles {
            let ns = self.ns(role);
            sh(&format!("ip netns add {ns}"));
            self.namespaces.push(ns);
            self.exec(role, "ip link set lo up");
        }
        self.exec("sw", &format!("ip link add br0 type bridge && ip link set br0 mtu {} up", mtu.max(1500)));
        for &(role, addr, mtu) in &hosts {
            sh(&format!("ip link add eth0 netns {} type veth peer name p-{role} netns {}", self.ns(role), self.ns("sw")));
            self.exec("sw", &format!("ip link set p-{role} mtu {mtu} master br0 up"));
            // No TX checksum offload: a veth hands CHECKSUM_PARTIAL packets to the peer, and an
            // XDP program that forwards them (XDP_TX) cannot complete the checksum. Frames from
            // a physical wire always carry complete checksums.
            self.exec(role, &format!("ip addr add {addr}/24 dev eth0 && ip link set eth0 mtu {mtu} up && ethtool -K eth0 tx off >/dev/null"));
        }
        // The client reaches the VIPs through the balancer; with two, over both: the client
        // is also the router, and learns the VIP's routes from the balancers by BGP (BIRD,
        // started with the balancers), ECMP by a hash of the 5-tuple.
        if self.opts.balancers > 1 {
            self.exec("client", "sysctl -qw net.ipv4.fib_multipath_hash_policy=1");
        } else {
            self.exec("client", &format!("ip route add {VIP}/32 via {LB}"));
        }
        for &(_, addr, _) in &hosts {
            self.wait_for("client", &format!("ping -c1 -W1 {addr}"), Duration::from_secs(5), "the bridge to forward");
        }
    }

    /// MariaDB primary (db1) and replica (db2), GTID + semi-sync replication
    /// (`db_router::tier`), and db-router in front of them (db); the web nodes get its URL.
    fn start_database(&mut self) {
        use db_router::tier::{InstanceConfig, Pair, PairConfig, APP};
        let server = |ns: String, addr: Ipv4Addr, parent: PathBuf| InstanceConfig {
            bind: addr.into(),
            port: MYSQL_PORT,
            command_prefix: vec!["ip".into(), "netns".into(), "exec".into(), ns],
            parent_dir: Some(parent),
            ..InstanceConfig::default()
        };
        let parent = self.work.join("db");
        fs::create_dir_all(&parent).unwrap();
        let pair = Pair::new(PairConfig {
            primary: server(self.ns("db1"), DB_PRIMARY, parent.clone()),
            replica: server(self.ns("db2"), DB_REPLICA, parent),
            ..PairConfig::default()
        })
        .unwrap_or_else(|e| panic!("{}: starting the MariaDB pair: {e}", self.name));
        self.db = Some(pair);
        let config = format!(
            "# generated by the stack for {name}\nlisten = \"{DB_ROUTER}:{MYSQL_PORT}\"\nadmin_listen = \"{DB_ADMIN}\"\n\
             primary = \"{DB_PRIMARY}:{MYSQL_PORT}\"\nreplica = \"{DB_REPLICA}:{MYSQL_PORT}\"\n\n[[user]]\nname = \"{user}\"\npassword = \"{pw}\"\n",
            name = self.name,
            user = APP.user,
            pw = APP.password
        );
        let path = self.work.join("db-router.toml");
        fs::write(&path, config).unwrap();
        let args = vec![self.bin("db-router"), "run".into(), "--config".into(), path.display().to_string()];
        self.spawn("db", "db-router", &args);
        self.wait_for("db", &format!("curl -sf http://{DB_ADMIN}/ready"), Duration::from_secs(20), "db-router to be ready");
        self.db_url = Some(format!("mysql://{}:{}@{DB_ROUTER}:{MYSQL_PORT}/{}", APP.user, APP.password, APP.database.expect("app database")));
    }

    /// A node's releases directory (`<version>/` directories and the `current` symlink).
    pub fn releases(&self, i: usize) -> PathBuf {
        self.work.join(["web1", "web2"][i]).join("releases")
    }

    /// Makes release `version` on node `i` with `web-app release create`: the node's site
    /// (an index page naming node and release, `big.bin`) plus `extra` files.
    pub fn make_release(&self, i: usize, version: &str, extra: &[(&str, &[u8])]) -> PathBuf {
        let role = ["web1", "web2"][i];
        let site = self.work.join(role).join(format!("site-{version}"));
        fs::create_dir_all(&site).unwrap();
        fs::write(site.join("index.html"), format!("<!doctype html><title>xdp-web-stack</title><h1>Hello from {role}, release {version}</h1>\n")).unwrap();
        fs::write(site.join("big.bin"), big_file()).unwrap();
        for (name, content) in extra {
            fs::write(site.join(name), content).unwrap();
        }
        sh(&format!("{} release create --from {} --version {version} --out {}", self.bin("web-app"), site.display(), self.releases(i).display()));
        fs::remove_dir_all(&site).unwrap();
        self.releases(i).join(version)
    }

    /// Pid of a process started with [`Stack::spawn`] (the program itself: `ip netns exec`
    /// execs it).
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.procs.iter().find(|(l, _)| l == label).map(|(_, c)| c.id())
    }

    /// Starts web node `i` (0 = web1) on its releases and waits until it answers on its
    /// own address.
    pub fn start_web(&mut self, i: usize) {
        let role = ["web1", "web2"][i];
        let mut args: Vec<String> = vec![
            self.bin("web-app"),
            "--listen".into(),
            format!("0.0.0.0:{HTTP_PORT}"),
            "--releases".into(),
            self.releases(i).display().to_string(),
            "--node".into(),
            role.to_string(),
            "--udp-echo".into(),
            format!("0.0.0.0:{UDP_PORT}"),
        ];
        if self.opts.tls {
            let tls = self.work.join("tls");
            args.extend([
                "--tls-listen".into(),
                format!("0.0.0.0:{HTTPS_PORT}"),
                "--tls-cert".into(),
                tls.join("node.pem").display().to_string(),
                "--tls-key".into(),
                tls.join("node-key.pem").display().to_string(),
            ]);
        }
        if let Some(url) = &self.db_url {
            args.extend(["--db-url".into(), url.clone()]);
        }
        self.spawn(role, role, &args);
        self.wait_for("client", &format!("curl -sf -o /dev/null http://{}:{HTTP_PORT}/healthz", WEB[i]), Duration::from_secs(20), "a web node");
    }

    /// The CA certificate clients trust for `https://{VIP_NAME}/` (with `tls`).
    pub fn ca_cert(&self) -> PathBuf {
        self.work.join("tls").join("ca.pem")
    }

    /// Writes a deploy plan for `lbd deploy` over both nodes (reload: SIGHUP to the node);
    /// `verify` adds the `web-app release verify` preflight.
    pub fn deploy_plan(&self, verify: bool) -> PathBuf {
        // Two balancers: a node is drained at both (their admin APIs listen on their own
        // addresses too, and share the token file).
        let admin = if self.opts.balancers > 1 { format!("[\"{LB}:{ADMIN_PORT}\", \"{LB2}:{ADMIN_PORT}\"]") } else { format!("\"{ADMIN}\"") };
        let mut plan = format!(
            "admin = {admin}\ntoken_file = \"{}/admin.token\"\ndrain_timeout_ms = 3000\nquiet_ms = 300\nhealth_timeout_ms = 10000\n",
            self.work.display()
        );
        if verify {
            plan += &format!("verify = [\"{}\", \"release\", \"verify\"]\n", self.bin("web-app"));
        }
        for (i, role) in ["web1", "web2"].iter().enumerate() {
            let pid = self.pid(role).expect("web node running");
            plan += &format!(
                "\n[[node]]\nbackend = \"{role}\"\nreleases = \"{}\"\nurl = \"http://{}:{HTTP_PORT}\"\nreload = [\"kill\", \"-HUP\", \"{pid}\"]\n",
                self.releases(i).display(),
                WEB[i]
            );
        }
        let path = self.work.join("deploy.toml");
        fs::write(&path, plan).unwrap();
        path
    }

    /// Runs `lbd deploy --plan <plan> <version>` in the balancer's namespace:
    /// `(success, stdout + stderr)`.
    pub fn deploy(&self, plan: &Path, version: &str) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("lb")])
            .arg(self.opts.bin_dir.join("lbd"))
            .args(["deploy", "--plan"])
            .arg(plan)
            .arg(version)
            .output()
            .expect("run lbd deploy");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    fn start_web_nodes(&mut self) {
        let lbd = self.bin("lbd");
        let web = self.bin("web-app");
        let (mode, xdp) = (self.opts.forward.as_str(), self.opts.xdp_mode.as_str());
        let state = self.work.join("state");
        if self.opts.tls {
            let tls = self.work.join("tls");
            sh(&format!("{web} devcert --out {} --name {VIP_NAME} --name {VIP}", tls.display()));
            // `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts.
            let etc = PathBuf::from("/etc/netns").join(self.ns("client"));
            fs::create_dir_all(&etc).unwrap();
            fs::write(etc.join("hosts"), format!("127.0.0.1 localhost\n{VIP} {VIP_NAME}\n")).unwrap();
        }
        for (i, role) in ["web1", "web2"].iter().enumerate() {
            // Each node has its own copy of the application files: a verified release.
            self.make_release(i, FIRST_RELEASE, &[]);
            sh(&format!("{web} release activate --releases {} --version {FIRST_RELEASE}", self.releases(i).display()));
            self.exec(
                role,
                &format!(
                    "{lbd} backend-setup --vip {VIP} --interface eth0 --mode {mode} --xdp-mode {xdp} --pin-dir {} --state-dir {}",
                    self.pin_dir.display(),
                    state.display()
                ),
            );
            self.backends_set_up.push(role.to_string());
            self.start_web(i);
        }
        // The balancer's own TCP service (not a VIP), and the veth peer that receives the
        // balancer's XDP_TX frames needs an XDP program of its own.
        let args: Vec<String> = vec![web, "--listen".into(), format!("{LB}:{LB_LOCAL_PORT}"), "--root".into(), self.work.display().to_string(), "--node".into(), "lb-local".into()];
        self.spawn("lb", "lb-local", &args);
        self.exec("sw", &format!("{lbd} backend-setup --interface p-lb --mode l2 --xdp-mode driver --pin-dir {} --state-dir {}", self.pin_dir.display(), state.display()));
        self.backends_set_up.push("sw:p-lb".into());
        if self.opts.balancers > 1 {
            self.exec("sw", &format!("{lbd} backend-setup --interface p-lb2 --mode l2 --xdp-mode driver --pin-dir {} --state-dir {}", self.pin_dir.display(), state.display()));
            self.backends_set_up.push("sw:p-lb2".into());
        }
    }

    pub fn config_text(&self) -> String {
        self.config_text_of(0)
    }

    /// The configuration of balancer `n` (0: lb, 1: lb2).
    pub fn config_text_of(&self, n: usize) -> String {
        let (mode, xdp) = (self.opts.forward.as_str(), self.opts.xdp_mode.as_str());
        let mut c = format!(
            "# generated by the stack for {name}\ninterfaces = [\"eth0\"]\nxdp_mode = \"{xdp}\"\nflow_table_size = 65536\n\n\
             [admin]\nlisten = \"{ADMIN}\"\ntoken_file = \"{work}/admin.token\"\nstate_file = \"{work}/runtime-state.json\"\n\n\
             [health]\ncheck = \"http\"\npath = \"/healthz\"\nport = {HTTP_PORT}\ninterval_ms = {}\nfast_interval_ms = {}\ntimeout_ms = {}\nrise = {}\nfall = {}\n",
            self.opts.health.0,
            self.opts.health.1,
            self.opts.health.2,
            self.opts.health.3,
            self.opts.health.4,
            name = self.name,
            work = self.work.display()
        );
        if self.opts.source_flow_limit != 0 {
            c = c.replacen("flow_table_size", &format!("source_flow_limit = {}\nflow_table_size", self.opts.source_flow_limit), 1);
        }
        if self.opts.pinned {
            c = c.replacen("flow_table_size", &format!("pin_dir = \"{}/lbd{}\"\nflow_table_size", self.pin_dir.display(), ["", "2"][n]), 1);
        }
        if self.opts.balancers > 1 {
            let (me, peer) = if n == 0 { (LB, LB2) } else { (LB2, LB) };
            c = c.replacen("runtime-state.json", &format!("runtime-state{}.json", ["", "-lb2"][n]), 1);
            // Reachable from the other balancer's namespace too (a deploy drains at both).
            c = c.replacen(&format!("listen = \"{ADMIN}\""), &format!("listen = \"0.0.0.0:{ADMIN_PORT}\""), 1);
            if self.opts.sync {
                c += &format!(
                    "\n[sync]\nlisten = \"{me}:{SYNC_PORT}\"\npeers = [\"{peer}:{SYNC_PORT}\"]\nsecret_file = \"{}/sync.key\"\ninterval_ms = 100\n",
                    self.work.display()
                );
            }
            c += &format!("\n[announce]\ntable = {ROUTE_TABLE}\nwithdraw_wait_ms = 1000\n");
        }
        let mut vips = vec![(format!("{VIP}:{HTTP_PORT}/tcp"), "web"), (format!("{VIP}:{UDP_PORT}/udp"), "echo")];
        if self.opts.tls {
            vips.push((format!("{VIP}:{HTTPS_PORT}/tcp"), "https"));
        }
        for (vip, name) in vips {
            c += &format!("\n[[vip]]\nname = \"{name}\"\nvip = \"{vip}\"\nmode = \"{mode}\"\n");
            for (i, addr) in WEB.iter().enumerate() {
                c += &format!("\n[[vip.backend]]\nname = \"web{}\"\naddress = \"{addr}\"\nweight = 1\n", i + 1);
            }
        }
        c
    }

    pub fn start_balancer(&mut self) {
        if self.opts.balancers > 1 {
            self.start_bgp();
        }
        for n in 0..usize::from(self.opts.balancers.max(1)) {
            self.start_balancer_n(n);
        }
        if self.opts.balancers > 1 {
            self.wait_route(&[LB, LB2], Duration::from_secs(30));
        }
    }

    /// BIRD (BGP with BFD) on the router (the client's namespace) and on each balancer: a
    /// balancer announces the routes lbd keeps in table [`ROUTE_TABLE`] (its VIPs, while it
    /// serves) with itself as next hop; the router installs them, ECMP over the balancers,
    /// and drops a balancer's when BFD (3 x 100 ms) or BGP loses it.
    pub fn start_bgp(&mut self) {
        let bird = which_bird();
        let bfd = "protocol bfd { interface \"eth0\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }\n";
        let mut router = format!(
            "router id {CLIENT};\nlog stderr all;\nprotocol device {{ }}\n\
             protocol kernel {{ merge paths on; ipv4 {{ import none; export all; }}; }}\n{bfd}\
             template bgp balancer {{ local {CLIENT} as 65000; hold time 3; connect delay time 1; connect retry time 1; error wait time 1, 5; bfd on; ipv4 {{ import all; export none; }}; }}\n"
        );
        for (i, addr) in [LB, LB2].iter().enumerate() {
            router += &format!("protocol bgp lb{} from balancer {{ neighbor {addr} as 65001; }}\n", i + 1);
        }
        let mut confs = vec![("client", router)];
        for (role, addr) in [("lb", LB), ("lb2", LB2)] {
            confs.push((
                role,
                format!(
                    "router id {addr};\nlog stderr all;\nprotocol device {{ }}\n\
                     protocol kernel vips {{ kernel table {ROUTE_TABLE}; learn; ipv4 {{ import all; export none; }}; }}\n{bfd}\
                     protocol bgp uplink {{ local {addr} as 65001; neighbor {CLIENT} as 65000; hold time 3; connect delay time 1; connect retry time 1; error wait time 1, 5; bfd on; \
                     ipv4 {{ import none; export where proto = \"vips\"; next hop self; }}; }}\n"
                ),
            ));
        }
        for (role, conf) in confs {
            let path = self.work.join(format!("bird-{role}.conf"));
            fs::write(&path, conf).unwrap();
            let sock = self.work.join(format!("bird-{role}.ctl"));
            let args = vec![bird.clone(), "-f".into(), "-c".into(), path.display().to_string(), "-s".into(), sock.display().to_string()];
            self.spawn(role, &format!("bird-{role}"), &args);
        }
    }

    /// Waits until the client's route to the VIP goes through exactly `via` (the balancers
    /// announcing it); returns how long that took.
    pub fn wait_route(&self, via: &[Ipv4Addr], timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let r = self.exec("client", &format!("ip -4 route show {VIP}/32"));
            let hops: Vec<Ipv4Addr> = r.split_whitespace().collect::<Vec<_>>().windows(2).filter(|w| w[0] == "via").filter_map(|w| w[1].parse().ok()).collect();
            if hops.len() == via.len() && via.iter().all(|v| hops.contains(v)) {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                panic!("{}: the client's route to {VIP} is {r:?}, not via {via:?}\n{}", self.name, self.log_tails());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts balancer `n` (0: `lbd` in namespace lb; 1: `lbd2` in lb2) and waits until it is ready.
    pub fn start_balancer_n(&mut self, n: usize) {
        let lbd = self.bin("lbd");
        if self.opts.balancers > 1 && !self.work.join("sync.key").exists() {
            fs::write(self.work.join("sync.key"), format!("{}-sync-secret-of-the-pair\n", self.name)).unwrap();
        }
        let (role, label) = [("lb", "lbd"), ("lb2", "lbd2")][n];
        let path = self.work.join(format!("{label}.toml"));
        fs::write(&path, self.config_text_of(n)).unwrap();
        let args = vec![lbd, "run".into(), "--config".into(), path.display().to_string()];
        self.spawn(role, label, &args);
        self.wait_for(role, &format!("curl -sf http://{ADMIN}/ready"), Duration::from_secs(15), "lbd to be ready");
    }

    /// Stops the balancer daemon with `signal` and waits for it to exit.
    pub fn stop_balancer(&mut self, signal: i32) -> Option<std::process::ExitStatus> {
        self.stop_process("lbd", signal)
    }

    /// Stops a process started with [`Stack::spawn`] and waits for it to exit.
    pub fn stop_process(&mut self, label: &str, signal: i32) -> Option<std::process::ExitStatus> {
        let i = self.procs.iter().position(|(l, _)| l == label)?;
        let (_, mut child) = self.procs.remove(i);
        stop(&mut child, signal)
    }

    /// `lbd ctl ...` against this stack's daemon; `Err(stderr)` when it fails.
    pub fn ctl(&self, args: &str) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("lb")])
            .arg(self.opts.bin_dir.join("lbd"))
            .args(["ctl", "--admin", ADMIN, "--token-file"])
            .arg(self.work.join("admin.token"))
            .args(args.split_whitespace())
            .output()
            .expect("run lbd ctl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `/status` of the daemon, parsed.
    pub fn status(&self) -> serde_json::Value {
        self.status_of("lb")
    }

    /// `/status` of the daemon in namespace `role` (lb or lb2), parsed.
    pub fn status_of(&self, role: &str) -> serde_json::Value {
        serde_json::from_str(&self.exec(role, &format!("curl -sf http://{ADMIN}/status"))).expect("status JSON")
    }

    /// Per-backend counters from `/status`: `(name, packets, new_flows)` for the named VIP.
    pub fn backend_counters(&self, vip_name: &str) -> Vec<(String, u64, u64)> {
        let s = self.status();
        let vip = s["vips"].as_array().unwrap().iter().find(|v| v["name"] == vip_name).expect("vip in status").clone();
        vip["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["name"].as_str().unwrap().to_string(), b["packets"].as_u64().unwrap(), b["new_flows"].as_u64().unwrap()))
            .collect()
    }

    /// Runs `f` on a thread that has entered `role`'s network namespace.
    pub fn in_ns<T: Send + 'static>(&self, role: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in_ns(role, f).join().expect("namespace thread panicked")
    }

    /// Starts `f` on a thread that has entered `role`'s network namespace (sockets it opens
    /// belong to that namespace, whichever thread uses them later).
    pub fn spawn_in_ns<T: Send + 'static>(&self, role: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.ns(role));
        std::thread::spawn(move || {
            let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Health state (`up`/`down`) of a backend of the first VIP, from `/status`.
    pub fn backend_state(&self, node: &str) -> String {
        let s = self.status();
        let b = s["vips"][0]["backends"].as_array().unwrap().iter().find(|b| b["name"] == node).cloned().expect("backend in status");
        b["state"].as_str().unwrap().to_string()
    }

    /// Waits until a backend's health state is `want`; how long it took.
    pub fn wait_backend_state(&self, node: &str, want: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        while self.backend_state(node) != want {
            assert!(start.elapsed() < timeout, "{node} never became {want}:\n{}", self.log("lbd"));
            std::thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    }
}

/// Deterministic 1 MiB content (every node has the same file).
pub fn big_file() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..BIG_FILE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn stop(child: &mut Child, signal: i32) -> Option<std::process::ExitStatus> {
    // `ip netns exec` execs the program, so the child's pid is the program's.
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Signal every process first, then wait for each: they shut down side by side.
        for (_, child) in &self.procs {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for (_, mut child) in self.procs.drain(..).rev() {
            stop(&mut child, libc::SIGTERM);
        }
        let lbd = self.opts.bin_dir.join("lbd");
        let state = self.work.join("state");
        for who in self.backends_set_up.drain(..) {
            let (role, iface) = match who.split_once(':') {
                Some((r, i)) => (r.to_string(), i.to_string()),
                None => (who.clone(), "eth0".to_string()),
            };
            let _ = Command::new("ip")
                .args(["netns", "exec", &format!("{}-{role}", self.name)])
                .arg(&lbd)
                .args(["backend-setup", "--interface", &iface, "--undo", "--state-dir"])
                .arg(&state)
                .stderr(Stdio::null())
                .status();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(&ns));
        }
        // Unmounting our bpffs frees anything still pinned in it.
        let _ = Command::new("umount").arg(&self.pin_dir).status();
        let _ = fs::remove_dir(&self.pin_dir);
        if std::env::var_os("LB_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}
