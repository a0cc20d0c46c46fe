//! `lbd run`: loads the balancer, fills its maps from the configuration, attaches it, serves
//! the admin API, and on SIGINT or SIGTERM detaches and removes everything it created.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{xdp::XdpLinkId, XdpMode};
use lb_common::{ring, vip::{ForwardMode, VipKey}};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    config::{Config, XdpModeSetting},
    health, netutil, Dataplane, LoadOptions,
};

/// How often the next-hop cache is invalidated, bounding how long a changed neighbour MAC or
/// route can go unnoticed.
pub const NEXTHOP_REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
pub struct BackendInfo {
    pub index: u32,
    pub name: String,
    pub address: Ipv4Addr,
    pub mac: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VipBackend {
    pub backend: u32,
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct VipInfo {
    pub vip_num: u32,
    pub name: String,
    pub vip: String,
    pub mode: &'static str,
    pub ring_len: usize,
    pub backends: Vec<VipBackend>,
    #[serde(skip)]
    pub key: VipKey,
    #[serde(skip)]
    pub forward: ForwardMode,
}

/// The operator's word on a backend (HAProxy's `set server ... state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes new flows.
    #[default]
    Ready,
    /// No new flows; flows already pinned to it continue until they end.
    Drain,
    /// Out: no new flows, and pinned flows are moved to other backends (they get a reset).
    Maint,
}

impl std::str::FromStr for AdminState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "ready" => Ok(AdminState::Ready),
            "drain" => Ok(AdminState::Drain),
            "maint" => Ok(AdminState::Maint),
            other => Err(format!("state {other:?}: expected ready, drain or maint")),
        }
    }
}

/// Runtime settings of one backend, kept in the state file across restarts.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Runtime {
    pub state: AdminState,
    /// Overrides the configured weight in every VIP of the backend.
    pub weight: Option<u32>,
}

/// What the health checks say of a backend.
#[derive(Debug, Clone, Serialize)]
pub struct BackendHealth {
    pub up: bool,
    pub checks_ok: u64,
    pub checks_failed: u64,
    pub transitions: u64,
    pub last_latency_ms: Option<f64>,
    pub last_failure: Option<String>,
}

impl Default for BackendHealth {
    fn default() -> Self {
        Self { up: true, checks_ok: 0, checks_failed: 0, transitions: 0, last_latency_ms: None, last_failure: None }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub interface: String,
    pub mode: &'static str,
}

/// What the daemon set up: the data for `/status` and `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    pub version: &'static str,
    pub encap_source: Ipv4Addr,
    pub flow_table_size: u32,
    pub xdp: Vec<Attachment>,
    pub vips: Vec<VipInfo>,
    pub backends: Vec<BackendInfo>,
}

pub struct Shared {
    pub dataplane: Mutex<Dataplane>,
    pub topology: Mutex<Topology>,
    /// By backend index.
    pub health: Mutex<Vec<BackendHealth>>,
    /// By backend name.
    pub runtime: Mutex<BTreeMap<String, Runtime>>,
    pub state_file: std::path::PathBuf,
    pub token: String,
    /// Flag backends that fail their checks down, so that their pinned flows move.
    pub shutdown_sessions: bool,
    pub ready: AtomicBool,
}

/// Brings the data plane in line with health and runtime state: a backend is in its VIPs'
/// rings when it passes its checks, is `ready` and has a nonzero weight; it is flagged down
/// (pinned flows re-steered) when it fails its checks or is in `maint`. Flags are cleared
/// before the rings are rebuilt and set after, so that re-steered flows land on live backends.
pub fn reconcile(shared: &Shared) -> Result<()> {
    let mut dp = shared.dataplane.lock().expect("lock");
    let mut topo = shared.topology.lock().expect("lock");
    let health = shared.health.lock().expect("lock");
    let runtime = shared.runtime.lock().expect("lock");
    let rt = |name: &str| runtime.get(name).cloned().unwrap_or_default();
    let down: Vec<bool> = topo
        .backends
        .iter()
        .map(|b| (!health[b.index as usize].up && shared.shutdown_sessions) || rt(&b.name).state == AdminState::Maint)
        .collect();
    for b in &topo.backends {
        if !down[b.index as usize] {
            dp.set_backend_down(b.index, false)?;
        }
    }
    let backends = topo.backends.clone();
    for v in topo.vips.iter_mut() {
        let weights: Vec<(u32, u32)> = v
            .backends
            .iter()
            .filter_map(|m| {
                let b = &backends[m.backend as usize];
                let r = rt(&b.name);
                let weight = r.weight.unwrap_or(m.weight);
                (health[m.backend as usize].up && r.state == AdminState::Ready && weight > 0).then_some((m.backend, weight))
            })
            .collect();
        let ring = ring::build(&weights).unwrap_or_default();
        if ring.len() != v.ring_len || ring.is_empty() {
            let live: Vec<&str> = weights.iter().map(|&(b, _)| backends[b as usize].name.as_str()).collect();
            if ring.is_empty() {
                tracing::error!(vip = %v.vip, name = %v.name, "no live backend left: the VIP's packets are dropped until one comes back");
            } else {
                info!(vip = %v.vip, name = %v.name, ?live, "ring rebuilt");
            }
        }
        dp.set_vip(v.key, v.vip_num, v.forward, &ring)?;
        v.ring_len = ring.len();
    }
    for b in &topo.backends {
        if down[b.index as usize] {
            dp.set_backend_down(b.index, true)?;
        }
    }
    Ok(())
}

/// Applies an operator change to a backend, persists the runtime state, reconciles.
pub fn set_runtime(shared: &Shared, name: &str, change: impl FnOnce(&mut Runtime)) -> Result<Runtime, String> {
    if !shared.topology.lock().expect("lock").backends.iter().any(|b| b.name == name) {
        return Err(format!("no backend named {name:?}"));
    }
    let new = {
        let mut runtime = shared.runtime.lock().expect("lock");
        let r = runtime.entry(name.to_string()).or_default();
        change(r);
        let new = r.clone();
        let text = serde_json::to_vec_pretty(&*runtime).map_err(|e| e.to_string())?;
        if let Some(dir) = shared.state_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(&shared.state_file, text).map_err(|e| format!("cannot save {}: {e}", shared.state_file.display()))?;
        new
    };
    reconcile(shared).map_err(|e| format!("{e:#}"))?;
    info!(backend = name, state = ?new.state, weight = ?new.weight, "runtime state changed");
    Ok(new)
}

/// Reads the admin token, creating a random one (mode 0600) if the file does not exist.
fn admin_token(path: &std::path::Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(t) = std::fs::read_to_string(path) {
        return Ok(t.trim().to_string());
    }
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).context("reading /dev/urandom")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    info!(path = %path.display(), "admin token created");
    Ok(token)
}

/// Health-check settings of one backend: the port of the first VIP it serves unless given.
fn check_config(h: &crate::config::HealthSettings, port: u16) -> health::CheckConfig {
    let port = h.port.unwrap_or(port);
    let kind = if h.http {
        health::CheckKind::Http { port, path: h.path.clone(), expect_status: h.expect_status }
    } else {
        health::CheckKind::Tcp { port }
    };
    health::CheckConfig {
        kind,
        interval: Duration::from_millis(h.interval_ms),
        fast_interval: Duration::from_millis(h.fast_interval_ms),
        timeout: Duration::from_millis(h.timeout_ms),
        rise: h.rise,
        fall: h.fall,
    }
}

fn mode_name(m: XdpMode) -> &'static str {
    match m {
        XdpMode::Driver => "driver",
        XdpMode::Skb => "skb",
        _ => "default",
    }
}

/// Fills the maps of a loaded dataplane from the configuration.
pub fn program(dp: &mut Dataplane, config: &Config, encap_source: Ipv4Addr) -> Result<(Vec<VipInfo>, Vec<BackendInfo>)> {
    dp.set_encap_source(encap_source)?;
    let mut backends: Vec<BackendInfo> = Vec::new();
    let mut by_addr: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    let mut vips = Vec::new();
    for (vip_num, v) in config.vips.iter().enumerate() {
        let mut weights = Vec::new();
        let mut members = Vec::new();
        for b in &v.backends {
            let index = match by_addr.get(&b.addr) {
                Some(&i) => i,
                None => {
                    let i = backends.len() as u32;
                    by_addr.insert(b.addr, i);
                    backends.push(BackendInfo { index: i, name: b.name.clone(), address: b.addr, mac: None });
                    i
                }
            };
            let info = &mut backends[index as usize];
            if v.mode == ForwardMode::L2 && info.mac.is_none() {
                let mac = match b.mac {
                    Some(m) => m,
                    None => netutil::resolve_mac(b.addr).with_context(|| format!("backend {} of VIP {}", b.name, v.name))?,
                };
                info.mac = Some(netutil::format_mac(&mac));
                dp.set_backend(index, b.addr, mac)?;
            } else if info.mac.is_none() {
                dp.set_backend(index, b.addr, [0; 6])?;
            }
            weights.push((index, b.weight));
            members.push(VipBackend { backend: index, weight: b.weight });
        }
        let ring = ring::build(&weights).map_err(|e| anyhow!("VIP {}: cannot build its ring: {e:?}", v.name))?;
        let key = VipKey::new(v.addr.octets(), v.port, v.proto);
        dp.set_vip(key, vip_num as u32, v.mode, &ring)?;
        info!(vip = %v.spec(), name = %v.name, mode = ?v.mode, backends = v.backends.len(), ring = ring.len(), "VIP installed");
        vips.push(VipInfo {
            vip_num: vip_num as u32,
            name: v.name.clone(),
            vip: v.spec(),
            mode: if v.mode == ForwardMode::L2 { "l2" } else { "ipip" },
            ring_len: ring.len(),
            backends: members,
            key,
            forward: v.mode,
        });
    }
    Ok((vips, backends))
}

/// Restores sysctls the daemon changed, when dropped.
struct SysctlGuard(Vec<(String, String)>);

impl SysctlGuard {
    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let old = netutil::sysctl_get(key)?;
        if old != value {
            netutil::sysctl_set(key, value)?;
            info!(key, from = %old, to = value, "sysctl set");
            self.0.push((key.to_string(), old));
        }
        Ok(())
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        for (key, old) in self.0.drain(..).rev() {
            if let Err(e) = netutil::sysctl_set(&key, &old) {
                warn!(key, error = %e, "could not restore sysctl");
            }
        }
    }
}

pub async fn run(config: Config) -> Result<()> {
    let encap_source = match config.encap_source {
        Some(a) => a,
        None => *netutil::ipv4_addresses(&config.interfaces[0])?
            .first()
            .ok_or_else(|| anyhow!("interface {} has no IPv4 address: set encap_source", config.interfaces[0]))?,
    };
    if let Some(d) = &config.pin_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {} (a bpffs directory)", d.display()))?;
    }
    let mut dp = Dataplane::load(&LoadOptions { flow_table_size: config.flow_table_size, pin_dir: config.pin_dir.clone() })
        .context("loading the XDP program (are we root, with CAP_BPF and CAP_NET_ADMIN?)")?;
    let (vips, backends) = program(&mut dp, &config, encap_source)?;

    // The FIB lookup runs from the ingress interface's point of view: it must forward.
    let mut sysctls = SysctlGuard(Vec::new());
    let mut links: Vec<XdpLinkId> = Vec::new();
    let mut pinned_links: Vec<aya::programs::links::PinnedLink> = Vec::new();
    let mut xdp = Vec::new();
    for iface in &config.interfaces {
        let link_pin = config.pin_dir.as_ref().map(|d| d.join(format!("link-{iface}")));
        let index = netutil::ifindex(iface)?;
        dp.add_tx_port(index)?;
        sysctls.set(&format!("net.ipv4.conf.{iface}.forwarding"), "1")?;
        // Packets whose next hop is not resolved yet are handed to the kernel encapsulated,
        // with our own address as source: it must accept them (not a martian) and forward
        // them without ICMP redirects.
        sysctls.set(&format!("net.ipv4.conf.{iface}.accept_local"), "1")?;
        sysctls.set(&format!("net.ipv4.conf.{iface}.send_redirects"), "0")?;
        let modes: &[XdpMode] = match config.xdp_mode {
            XdpModeSetting::Driver => &[XdpMode::Driver],
            XdpModeSetting::Skb => &[XdpMode::Skb],
            XdpModeSetting::Auto => &[XdpMode::Driver, XdpMode::Skb],
        };
        if let Some(pin) = link_pin.as_ref().filter(|p| p.exists()) {
            // A previous daemon left the program attached: swap ours in atomically.
            let link = aya::programs::links::PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
            let fd: aya::programs::links::FdLink = link.into();
            let xdp_link = aya::programs::xdp::XdpLink::try_from(fd).context("pinned link is not an XDP link")?;
            links.push(dp.program_mut().attach_to_link(xdp_link).context("replacing the program in the pinned link")?);
            info!(interface = %iface, pin = %pin.display(), "adopted the running XDP link: program replaced in place, flows and counters kept");
            xdp.push(Attachment { interface: iface.clone(), mode: "adopted" });
            continue;
        }
        let mut attached = None;
        let mut last_err = None;
        for &m in modes {
            match dp.program_mut().attach(iface, m) {
                Ok(id) => {
                    attached = Some((id, m));
                    break;
                }
                Err(e) => {
                    warn!(interface = %iface, mode = mode_name(m), error = %e, "XDP attach failed");
                    last_err = Some(e);
                }
            }
        }
        let Some((id, m)) = attached else {
            bail!(
                "cannot attach XDP to {iface} in {:?} mode: {}; try xdp_mode = \"skb\"",
                config.xdp_mode,
                last_err.map(|e| e.to_string()).unwrap_or_default()
            );
        };
        info!(interface = %iface, mode = mode_name(m), "XDP program attached");
        if let Some(pin) = &link_pin {
            let link = dp.program_mut().take_link(id)?;
            let fd: aya::programs::links::FdLink = link.try_into().context("XDP link is not a bpf_link (kernel older than 5.9?)")?;
            pinned_links.push(fd.pin(pin).with_context(|| format!("pinning the XDP link at {}", pin.display()))?);
        } else {
            links.push(id);
        }
        xdp.push(Attachment { interface: iface.clone(), mode: mode_name(m) });
    }

    let topology = Topology {
        version: env!("CARGO_PKG_VERSION"),
        encap_source,
        flow_table_size: config.flow_table_size,
        xdp,
        vips,
        backends,
    };
    let health = Mutex::new(vec![BackendHealth::default(); topology.backends.len()]);
    let runtime: BTreeMap<String, Runtime> = match std::fs::read(&config.state_file) {
        Ok(text) => serde_json::from_slice(&text).with_context(|| format!("{} is not a runtime state file", config.state_file.display()))?,
        Err(_) => BTreeMap::new(),
    };
    if !runtime.is_empty() {
        info!(state_file = %config.state_file.display(), ?runtime, "runtime state restored");
    }
    let token = admin_token(&config.token_file)?;
    let shared = Arc::new(Shared {
        dataplane: Mutex::new(dp),
        topology: Mutex::new(topology),
        health,
        runtime: Mutex::new(runtime),
        state_file: config.state_file.clone(),
        token,
        shutdown_sessions: config.health.as_ref().is_none_or(|h| h.shutdown_sessions),
        ready: AtomicBool::new(false),
    });
    reconcile(&shared)?;

    // Health checks: one task per backend; reports come back here.
    let (report_tx, mut reports) = tokio::sync::mpsc::channel::<health::CheckReport>(256);
    let mut checkers = Vec::new();
    if let Some(h) = &config.health {
        let topo = shared.topology.lock().expect("lock").clone();
        for b in &topo.backends {
            let port = config.vips.iter().find(|v| v.backends.iter().any(|x| x.addr == b.address)).map(|v| v.port).unwrap_or(80);
            let cfg = check_config(h, port);
            info!(backend = %b.name, address = %b.address, check = ?cfg.kind, interval_ms = h.interval_ms, rise = h.rise, fall = h.fall, "health checks on");
            checkers.push(health::spawn(b.index, b.name.clone(), b.address, cfg, report_tx.clone()));
        }
    } else {
        info!("no [health] section: backends are never checked and always up");
    }
    drop(report_tx);

    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("admin API: cannot listen on {}", config.admin_listen))?;
    info!(listen = %config.admin_listen, "admin API: /metrics /status /live /ready");
    let admin = tokio::spawn(crate::admin::serve(listener, shared.clone()));
    shared.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    info!("ready");

    let mut refresh = tokio::time::interval(NEXTHOP_REFRESH);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let mut keep = false;
    loop {
        tokio::select! {
            Some(r) = reports.recv() => {
                {
                    let mut health = shared.health.lock().expect("lock");
                    let h = &mut health[r.backend as usize];
                    if r.ok { h.checks_ok += 1 } else { h.checks_failed += 1 }
                    h.last_latency_ms = r.latency.map(|l| l.as_secs_f64() * 1000.0);
                    if let Some(reason) = &r.reason {
                        h.last_failure = Some(reason.clone());
                    }
                    if r.transition.is_some() {
                        h.transitions += 1;
                    }
                }
                if let Some(up) = r.transition {
                    shared.health.lock().expect("lock")[r.backend as usize].up = up;
                    if let Err(e) = reconcile(&shared) {
                        warn!(backend = r.backend, error = %e, "could not apply a health change");
                    }
                }
            }
            _ = refresh.tick() => {
                if let Err(e) = shared.dataplane.lock().expect("lock").invalidate_next_hops() {
                    warn!(error = %e, "next-hop refresh failed");
                }
            }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: shutting down"); break; }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = usr1.recv() => {
                if config.pin_dir.is_some() {
                    info!("SIGUSR1: exiting for a restart; the program stays attached and pinned, the next lbd adopts it");
                    keep = true;
                } else {
                    warn!("SIGUSR1 without pin_dir: nothing can outlive this daemon, shutting down");
                }
                break;
            }
        }
    }
    shared.ready.store(false, std::sync::atomic::Ordering::SeqCst);
    admin.abort();
    for c in checkers {
        c.abort();
    }
    if keep {
        // Traffic keeps flowing through the pinned program; the next daemon needs the sysctls.
        std::mem::forget(sysctls);
        return Ok(());
    }
    let mut dp = shared.dataplane.lock().expect("lock");
    for id in links {
        if let Err(e) = dp.program_mut().detach(id) {
            warn!(error = %e, "detach failed");
        }
    }
    for link in pinned_links {
        if let Err(e) = link.unpin() {
            warn!(error = %e, "unpin failed");
        }
    }
    if let Some(d) = &config.pin_dir {
        // The adopted link (if any) is held by the program: remove its pin so it goes with us.
        for iface in &config.interfaces {
            let _ = std::fs::remove_file(d.join(format!("link-{iface}")));
        }
        for m in crate::dataplane::MAPS {
            let _ = std::fs::remove_file(d.join(m));
        }
    }
    info!("XDP program detached");
    drop(sysctls);
    Ok(())
}
