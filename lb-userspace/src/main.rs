//! `lbd`: the load balancer daemon and its command line.

use std::{net::{Ipv4Addr, SocketAddr}, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::vip::ForwardMode;
use lb_userspace::{backend_setup, client, config::{Config, XdpModeSetting, DEFAULT_ADMIN}, daemon, deploy};

const CONFIG_EXAMPLE: &str = r#"Configuration (TOML):

  interfaces = ["eth0"]          # where VIP traffic arrives; the program attaches here
  xdp_mode = "auto"              # driver | skb | auto (driver, else skb)
  flow_table_size = 262144       # established flows held (twice as many slots)
  flood_guard = 125000           # new TCP flows a CPU pins per VIP a second; past it by hash, unpinned (0: off)
  source_flow_limit = 0          # new flows one client address may open a second; past it dropped (0: off)
  encap_source = "10.0.0.2"      # outer IPIP source; default: first IPv4 address of interfaces[0]
  pin_dir = "/sys/fs/bpf/lbd"    # optional: pin maps and links; a restart (SIGUSR1) adopts them

  [admin]
  listen = "127.0.0.1:9100"      # GET /metrics /status /live /ready; POST with the token
  token_file = "/run/lbd/admin.token"
  state_file = "/var/lib/lbd/runtime-state.json"

  [health]                       # optional: HAProxy's meaning and defaults
  check = "http"                 # or "tcp"
  path = "/healthz"
  interval_ms = 2000             # also fast_interval_ms, timeout_ms, rise = 2, fall = 3,
                                 # on_marked_down = "shutdown-sessions" | "none"
  [firewall]                     # optional: by source address, the longest prefix decides
  deny = ["203.0.113.0/24"]      # dropped in XDP before anything else
  allow = ["203.0.113.8/29"]     # exceptions out of wider deny rules
  # deny_files = ["/etc/lbd/drop.txt"]   # one prefix a line, `#`/`;` comments; also allow_files

  [sync]                         # optional: active-active balancers (behind ECMP) share pinned flows
  listen = "10.0.0.2:7946"       # UDP, on the balancers' network
  peers = ["10.0.0.3:7946"]      # the other balancers (same flow_table_size)
  secret_file = "/etc/lbd/sync.key"   # the same on every balancer: head -c 32 /dev/urandom | base64
  # interval_ms = 200            # how often pinned flows are sent

  [announce]                     # optional: a route per VIP address in this kernel table while serving,
  table = 100                    # for the routing daemon (BIRD, FRR) to announce by BGP
  # withdraw_wait_ms = 2000      # on shutdown: routes withdrawn, forwarding kept this long

  [[vip]]
  name = "web"
  vip = "10.0.100.1:80/tcp"      # address:port/protocol
  mode = "ipip"                  # or "l2"
  # allow = ["10.0.0.0/8"]       # optional: only these sources reach the VIP

  [[vip.backend]]
  name = "web1"
  address = "10.0.0.11"
  weight = 1                     # 0..=256
"#;

const DEPLOY_EXAMPLE: &str = r#"Plan (TOML):

  admin = "127.0.0.1:9100"            # the lbd admin API; a list for several balancers (one token)
  token_file = "/run/lbd/admin.token"
  verify = ["web-app", "release", "verify"]   # optional; the release directory is appended
  drain_timeout_ms = 10000            # wait at most this long for a drained node's traffic to stop
  quiet_ms = 500                      # no packets for this long: drained
  health_timeout_ms = 20000           # a reloaded node must be healthy on the new release by then

  [[node]]
  backend = "web1"                    # its name in lbd
  releases = "/srv/web1/releases"     # holds <version>/ directories and the `current` symlink
  url = "http://10.0.0.11:80"         # GET /healthz (200) and /whoami ("release") are read here
  reload = ["systemctl", "reload", "web-app"]
"#;

#[derive(Parser)]
#[command(
    name = "lbd",
    version,
    about = "XDP load balancer: steers each new flow of a VIP round-robin to a backend, with direct server return",
    long_about = "XDP load balancer: steers each new flow of a VIP round-robin to a backend, with direct server return.\n\n\
                  On the balancer:   lbd check-config lbd.toml && sudo lbd run --config lbd.toml\n\
                  On each backend:   sudo lbd backend-setup --vip 10.0.100.1 --interface eth0   (--undo to revert)\n\
                  Anywhere:          lbd status --admin 127.0.0.1:9100\n\
                  Change it live:    sudo lbd ctl backend drain web1   (ready, maint; weight web1 3)\n\
                  Firewall:          sudo lbd ctl firewall deny 203.0.113.0/24   (allow, remove, list)\n\n\
                  The configuration format: `lbd check-config --help` and README.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Ipip,
    L2,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    Driver,
    Skb,
    Auto,
}

impl From<XdpModeArg> for XdpModeSetting {
    fn from(m: XdpModeArg) -> Self {
        match m {
            XdpModeArg::Driver => XdpModeSetting::Driver,
            XdpModeArg::Skb => XdpModeSetting::Skb,
            XdpModeArg::Auto => XdpModeSetting::Auto,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the balancer, serve the admin API; SIGINT/SIGTERM detach and exit,
    /// SIGUSR1 exits leaving the program attached for the next `lbd run` (needs `pin_dir`).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and print what it defines; errors name the line.
    #[command(after_long_help = CONFIG_EXAMPLE)]
    CheckConfig { file: PathBuf },
    /// Ask a running daemon for its state.
    Status {
        /// The daemon's admin address.
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a running daemon: `lbd ctl backend drain web1`, `... ready web1`, `... maint web1`,
    /// `lbd ctl backend weight web1 3` (or `config`). Needs the admin token.
    Ctl {
        /// The daemon's admin API; repeat it for a balancer pair (the same change at each, in
        /// order; they share one token file).
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: Vec<SocketAddr>,
        /// The file holding the admin token (readable by root only).
        #[arg(long, default_value = lb_userspace::config::DEFAULT_TOKEN_FILE)]
        token_file: PathBuf,
        #[command(subcommand)]
        what: CtlCmd,
    },
    /// Rolling deploy of a web release: node by node, drain at the balancer, wait for its
    /// traffic to stop, switch its `current` release, reload, wait healthy on the new
    /// release, put it back; roll every node back if one fails. The plan format:
    /// `lbd deploy --help` and README.md.
    #[command(after_long_help = DEPLOY_EXAMPLE)]
    Deploy {
        /// The deploy plan (TOML): the lbd admin API and, per node, its releases directory,
        /// URL and reload command.
        #[arg(long)]
        plan: PathBuf,
        /// The release (a directory name under each node's releases directory).
        version: String,
    },
    /// Prepare this host as a backend for direct server return (run it on the backend).
    BackendSetup {
        /// A VIP this backend serves (repeatable); bound on loopback. Without any, only the
        /// XDP program is attached (e.g. `--mode l2` on a veth peer that must receive XDP_TX).
        #[arg(long = "vip")]
        vips: Vec<Ipv4Addr>,
        /// The interface the balancer's packets arrive on.
        #[arg(long)]
        interface: String,
        /// Forwarding mode of the VIPs: ipip attaches our decapsulation program.
        #[arg(long, value_enum, default_value = "ipip")]
        mode: Mode,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: XdpModeArg,
        /// Where the XDP link is pinned (bpffs).
        #[arg(long, default_value = "/sys/fs/bpf/lbd")]
        pin_dir: PathBuf,
        /// Where the record of what was changed is kept.
        #[arg(long, default_value = "/run/lbd")]
        state_dir: PathBuf,
        /// Revert a previous backend-setup on this interface.
        #[arg(long)]
        undo: bool,
    },
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Backend state or weight.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Add or remove VIPs, or backends of a VIP (kept across restarts).
    Vip {
        #[command(subcommand)]
        action: VipAction,
    },
    /// Firewall rules by source prefix (kept across restarts): `lbd ctl firewall deny
    /// 203.0.113.0/24`, `... allow 203.0.113.8/29`, `... remove 203.0.113.0/24`, `... list`,
    /// `... reload` (the configuration file's rules again).
    Firewall {
        #[command(subcommand)]
        action: FirewallAction,
    },
}

#[derive(Subcommand)]
enum FirewallAction {
    /// Drop packets from these prefixes (or addresses), unless a longer allow rule holds them.
    Deny {
        #[arg(required = true)]
        prefixes: Vec<String>,
    },
    /// Let packets from these prefixes through (exceptions out of wider deny rules).
    Allow {
        #[arg(required = true)]
        prefixes: Vec<String>,
    },
    /// Remove the rules of these prefixes.
    Remove {
        #[arg(required = true)]
        prefixes: Vec<String>,
    },
    /// Every rule with the packets and bytes it decided (needs no token).
    List,
    /// Re-read the configuration file's `[firewall]` (its rule files too) and make its rules
    /// the firewall's, replacing runtime changes (also on SIGHUP).
    Reload,
}

#[derive(Subcommand)]
enum VipAction {
    /// Add a VIP: `lbd ctl vip add web2 10.0.100.2:80/tcp --backend web1=10.0.0.11 --backend web2=10.0.0.12:3`.
    Add {
        name: String,
        /// address:port/protocol
        vip: String,
        #[arg(long, default_value = "ipip")]
        mode: String,
        /// name=address[:weight], repeatable.
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// Only sources this prefix holds reach the VIP (repeatable); none: all.
        #[arg(long = "allow")]
        allow: Vec<String>,
    },
    /// Replace a VIP's allow list: `lbd ctl vip allow web 10.0.0.0/8 192.168.0.0/16`; no
    /// prefix opens it to every source.
    Allow { name: String, prefixes: Vec<String> },
    /// Remove a VIP.
    Remove { name: String },
    /// Add a backend to a VIP.
    AddBackend {
        vip: String,
        name: String,
        address: Ipv4Addr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Remove a backend from a VIP.
    RemoveBackend { vip: String, name: String },
}

fn backend_arg(s: &str) -> Result<serde_json::Value> {
    let (name, rest) = s.split_once('=').with_context(|| format!("--backend {s:?}: expected name=address[:weight]"))?;
    let (addr, weight) = match rest.split_once(':') {
        Some((a, w)) => (a, w.parse::<u32>().with_context(|| format!("--backend {s:?}: bad weight"))?),
        None => (rest, 1),
    };
    let addr: Ipv4Addr = addr.parse().with_context(|| format!("--backend {s:?}: bad address"))?;
    Ok(serde_json::json!({"name": name, "address": addr, "weight": weight}))
}

#[derive(Subcommand)]
enum BackendAction {
    /// Takes new flows again.
    Ready { name: String },
    /// No new flows; pinned flows continue until they end.
    Drain { name: String },
    /// Out: no new flows, pinned flows moved elsewhere.
    Maint { name: String },
    /// Weight in every VIP of the backend (0..=256), or `config` to go back to the configured ones.
    Weight { name: String, weight: String },
}

async fn firewall_list(admin: SocketAddr) -> Result<()> {
    let body = client::get_ok(&format!("http://{admin}/firewall"))
        .await
        .with_context(|| format!("no daemon answering on {admin} (is `lbd run` up? --admin)"))?;
    let v: serde_json::Value = serde_json::from_str(&body).context("/firewall is not JSON")?;
    let rules = v["rules"].as_array().cloned().unwrap_or_default();
    println!("{} rules (at most {}), {} packets dropped", rules.len(), v["max_rules"], v["dropped"]);
    for r in rules {
        println!("  {:<5} {:<18} packets={} bytes={}", r["verdict"].as_str().unwrap_or("?"), r["prefix"].as_str().unwrap_or("?"), r["packets"], r["bytes"]);
    }
    Ok(())
}

async fn ctl(admins: Vec<SocketAddr>, token_file: PathBuf, what: CtlCmd) -> Result<()> {
    if let CtlCmd::Firewall { action: FirewallAction::List } = what {
        for admin in admins {
            firewall_list(admin).await?;
        }
        return Ok(());
    }
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the admin token {} (root only; --token-file)", token_file.display()))?;
    let requests: Vec<(&str, String, String)> = match what {
        CtlCmd::Firewall { action } => match action {
            FirewallAction::Deny { prefixes } => vec![("POST", "/firewall/deny".to_string(), prefixes.join(" "))],
            FirewallAction::Allow { prefixes } => vec![("POST", "/firewall/allow".to_string(), prefixes.join(" "))],
            FirewallAction::Remove { prefixes } => prefixes.iter().map(|p| ("DELETE", format!("/firewall/{p}"), String::new())).collect(),
            FirewallAction::Reload => vec![("POST", "/firewall/reload".to_string(), String::new())],
            FirewallAction::List => unreachable!("answered above"),
        },
        other => vec![one_request(other)?],
    };
    let several = admins.len() > 1;
    for admin in &admins {
        for (method, path, value) in &requests {
            let method: hyper::Method = method.parse().expect("a method");
            let (status, text) = client::request(method, &format!("http://{admin}{path}"), Some(&token), value.clone())
                .await
                .with_context(|| format!("no daemon answering on {admin} (is `lbd run` up? --admin)"))?;
            if !status.is_success() {
                anyhow::bail!("{}{status}: {}", if several { format!("{admin}: ") } else { String::new() }, text.trim());
            }
            println!("{}{}", if several { format!("{admin}: ") } else { String::new() }, text.trim());
        }
    }
    Ok(())
}

/// The admin request of a `ctl` command about backends or VIPs.
fn one_request(what: CtlCmd) -> Result<(&'static str, String, String)> {
    Ok(match what {
        CtlCmd::Backend { action } => {
            let (name, setting, value) = match action {
                BackendAction::Ready { name } => (name, "state", "ready".to_string()),
                BackendAction::Drain { name } => (name, "state", "drain".to_string()),
                BackendAction::Maint { name } => (name, "state", "maint".to_string()),
                BackendAction::Weight { name, weight } => (name, "weight", weight),
            };
            ("POST", format!("/backends/{name}/{setting}"), value)
        }
        CtlCmd::Vip { action } => match action {
            VipAction::Add { name, vip, mode, backends, allow } => {
                let backends = backends.iter().map(|b| backend_arg(b)).collect::<Result<Vec<_>>>()?;
                ("POST", "/vips".to_string(), serde_json::json!({"name": name, "vip": vip, "mode": mode, "allow": allow, "backends": backends}).to_string())
            }
            VipAction::Allow { name, prefixes } => ("POST", format!("/vips/{name}/allow"), prefixes.join(" ")),
            VipAction::Remove { name } => ("DELETE", format!("/vips/{name}"), String::new()),
            VipAction::AddBackend { vip, name, address, weight } => (
                "POST",
                format!("/vips/{vip}/backends"),
                serde_json::json!({"name": name, "address": address, "weight": weight}).to_string(),
            ),
            VipAction::RemoveBackend { vip, name } => ("DELETE", format!("/vips/{vip}/backends/{name}"), String::new()),
        },
        CtlCmd::Firewall { .. } => anyhow::bail!("firewall changes are not one request"),
    })
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}

fn check_config(file: &std::path::Path) -> Result<()> {
    let c = Config::load(file)?;
    println!("{}: ok", file.display());
    println!("  interfaces {:?}, xdp_mode {:?}, flow table {}, admin {}", c.interfaces, c.xdp_mode, c.flow_table_size, c.admin_listen);
    println!(
        "  flood guard {} SYNs a CPU per VIP, per-source limit {}",
        c.flood_guard,
        if c.source_flow_limit == 0 { "off".to_string() } else { format!("{} new flows", c.source_flow_limit) }
    );
    if !c.firewall.is_empty() {
        let deny = c.firewall.iter().filter(|r| !r.allow).count();
        println!("  firewall: {deny} deny rules, {} allow rules", c.firewall.len() - deny);
    }
    if let Some(y) = &c.sync {
        println!("  flow sync on {} with {} every {} ms", y.listen, y.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "), y.interval_ms);
    }
    if let Some(a) = &c.announce {
        println!("  VIP routes in table {} while serving, withdrawn {} ms before stopping", a.table, a.withdraw_wait_ms);
    }
    for v in &c.vips {
        println!("  vip {} ({}, {:?}): {}", v.spec(), v.name, v.mode,
            v.backends.iter().map(|b| format!("{} {} w{}", b.name, b.addr, b.weight)).collect::<Vec<_>>().join(", "));
        if !v.allow.is_empty() {
            println!("    allow {}", v.allow.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" "));
        }
    }
    Ok(())
}

async fn status(admin: SocketAddr, raw: bool) -> Result<()> {
    let body = client::get_ok(&format!("http://{admin}/status"))
        .await
        .with_context(|| format!("no daemon answering on {admin} (is `lbd run` up? --admin)"))?;
    let v: serde_json::Value = serde_json::from_str(&body).context("status is not JSON")?;
    if raw {
        println!("{v:#}");
        return Ok(());
    }
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    println!("lbd {} ready={} encap_source={}", s(&v["version"]), v["ready"], s(&v["encap_source"]));
    println!("  flood_guard={} source_flow_limit={}", v["flood_guard"], v["source_flow_limit"]);
    for a in v["xdp"].as_array().into_iter().flatten() {
        println!("  xdp on {} ({} mode)", s(&a["interface"]), s(&a["mode"]));
    }
    for vip in v["vips"].as_array().into_iter().flatten() {
        println!("  vip {} ({}) mode={} packets={} new_flows={}", s(&vip["vip"]), s(&vip["name"]), s(&vip["mode"]), vip["packets"], vip["new_flows"]);
        if let Some(allow) = vip["allow"].as_array().filter(|a| !a.is_empty()) {
            println!("    allow {}", allow.iter().map(s).collect::<Vec<_>>().join(" "));
        }
        for b in vip["backends"].as_array().into_iter().flatten() {
            println!(
                "    backend {} {} weight={} state={} (per node, all VIPs: packets={} new_flows={})",
                s(&b["name"]), s(&b["address"]), b["weight"], s(&b["state"]), b["packets"], b["new_flows"]
            );
        }
    }
    let fw = &v["firewall"];
    if fw["deny"].as_u64().unwrap_or(0) + fw["allow"].as_u64().unwrap_or(0) > 0 {
        println!("  firewall: {} deny rules, {} allow rules, {} packets dropped (lbd ctl firewall list)", fw["deny"], fw["allow"], fw["dropped"]);
    }
    let y = &v["sync"];
    if !y.is_null() {
        let st = &y["stats"];
        println!(
            "  flow sync on {}: entries sent {} received {} (inserted {}, moved {}), refused datagrams {}",
            s(&y["listen"]), st["entries_sent"], st["entries_received"], st["inserted"], st["updated"],
            st["rejected"].as_object().map(|m| m.values().filter_map(|x| x.as_u64()).sum::<u64>()).unwrap_or(0)
        );
        for p in y["peers"].as_array().into_iter().flatten() {
            println!("    peer {} up={} synced={} last heard {} ms ago", s(&p["address"]), p["up"], p["synced"], p["last_heard_ms"]);
        }
    }
    if !v["announce"].is_null() {
        println!("  VIP routes in table {}: {}", v["announce"]["table"], if v["announce"]["announcing"] == true { "announced" } else { "withdrawn" });
    }
    println!("  actions {}", v["actions"]);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Cmd::CheckConfig { file } => check_config(&file),
        Cmd::Run { config: path } => Config::load(&path).map_err(anyhow::Error::from).and_then(|c| {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(daemon::run(c, Some(path)))
        }),
        Cmd::Status { admin, json } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(status(admin, json))),
        Cmd::Ctl { admin, token_file, what } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ctl(admin, token_file, what))),
        Cmd::Deploy { plan, version } => deploy::Plan::load(&plan).map_err(anyhow::Error::from).and_then(|p| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            match rt.block_on(deploy::deploy(&p, &version, &mut |line| println!("{line}")))? {
                deploy::Outcome::Deployed => Ok(()),
                deploy::Outcome::Refused(why) => Err(anyhow::anyhow!("deploy refused, nothing changed: {why}")),
                deploy::Outcome::RolledBack(why) => Err(anyhow::anyhow!("deploy failed and was rolled back: {why}")),
            }
        }),
        Cmd::BackendSetup { vips, interface, mode, xdp_mode, pin_dir, state_dir, undo } => {
            let o = backend_setup::Options {
                vips,
                interface,
                mode: match mode {
                    Mode::Ipip => ForwardMode::Ipip,
                    Mode::L2 => ForwardMode::L2,
                },
                xdp_mode: xdp_mode.into(),
                pin_dir,
                state_dir,
            };
            if undo { backend_setup::undo(&o) } else { backend_setup::setup(&o) }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// The example in `check-config --help` is a valid configuration.
    #[test]
    fn help_example_parses() {
        let text: String = super::CONFIG_EXAMPLE.lines().skip(1).map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l))).collect();
        let c = lb_userspace::config::Config::parse("help", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.vips.len(), 1);
        assert!(c.health.is_some() && c.pin_dir.is_some());
    }

    /// The plan in `deploy --help` is a valid plan.
    #[test]
    fn deploy_example_parses() {
        let text: String = super::DEPLOY_EXAMPLE.lines().skip(1).map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l))).collect();
        let p = lb_userspace::deploy::Plan::parse("help", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(p.nodes.len(), 1);
        assert!(p.verify.is_some());
    }
}
