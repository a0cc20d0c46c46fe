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
use lb_common::{
    firewall::{Prefix, Rule},
    ring,
    vip::{ForwardMode, VipKey},
};
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
    /// In no VIP any more (removed at runtime); its index stays reserved.
    #[serde(skip)]
    pub removed: bool,
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
    /// Only these sources reach the VIP (`a.b.c.d/len`); empty: all.
    pub allow: Vec<String>,
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
    pub flood_guard: u32,
    pub source_flow_limit: u32,
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
    /// Health settings and where checkers report, for backends added at runtime.
    pub health_settings: Option<crate::config::HealthSettings>,
    pub reports: tokio::sync::mpsc::Sender<health::CheckReport>,
    /// Running checkers, by backend index.
    pub checkers: Mutex<BTreeMap<u32, tokio::task::JoinHandle<()>>>,
    /// The VIPs were changed at runtime: the state file keeps the whole set.
    pub vips_changed: AtomicBool,
    /// The firewall's rules, sorted by prefix.
    pub firewall: Mutex<Vec<Rule>>,
    /// The firewall was changed at runtime: the state file keeps its rules.
    pub firewall_changed: AtomicBool,
    /// The configuration file, for `firewall reload` (and SIGHUP).
    pub config_path: Option<std::path::PathBuf>,
    pub ready: AtomicBool,
    /// The flow sync's state after its last round (`None`: no `[sync]`).
    pub sync: Mutex<Option<crate::sync::SyncReport>>,
    /// Makes the flow sync send a round at once.
    pub sync_now: Arc<tokio::sync::Notify>,
    /// `[announce]`: VIP routes for the routing daemon (`crate::announce`), on the device
    /// that goes with this process.
    pub announce: Option<crate::announce::Anchor>,
    /// Whether the VIP routes are up (after start, until shutdown).
    pub announcing: AtomicBool,
}

/// Makes the announced routes the VIP addresses (while announcing; none otherwise).
pub fn announce_vips(shared: &Shared) -> Result<()> {
    let Some(a) = &shared.announce else { return Ok(()) };
    let want: std::collections::BTreeSet<Ipv4Addr> = if shared.announcing.load(std::sync::atomic::Ordering::SeqCst) {
        shared.topology.lock().expect("lock").vips.iter().map(|v| Ipv4Addr::from(v.key.addr)).collect()
    } else {
        Default::default()
    };
    let (added, removed) = a.set_routes(&want)?;
    if !added.is_empty() || !removed.is_empty() {
        info!(table = a.table, ?added, ?removed, "VIP routes for the routing daemon changed");
    }
    Ok(())
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
        .map(|b| b.removed || (!health[b.index as usize].up && shared.shutdown_sessions) || rt(&b.name).state == AdminState::Maint)
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
        r.clone()
    };
    save_state(shared)?;
    reconcile(shared).map_err(|e| format!("{e:#}"))?;
    info!(backend = name, state = ?new.state, weight = ?new.weight, "runtime state changed");
    Ok(new)
}

/// What the state file holds.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct SavedState {
    #[serde(default)]
    pub backends: BTreeMap<String, Runtime>,
    /// The whole VIP set, when it was changed at runtime (it then replaces the config's).
    #[serde(default)]
    pub vips: Option<Vec<VipSpec>>,
    /// The firewall's rules, when they were changed at runtime (they then replace the
    /// config's).
    #[serde(default)]
    pub firewall: Option<Vec<RuleSpec>>,
}

/// A firewall rule as the admin API and the state file spell it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// `a.b.c.d/len`.
    pub prefix: String,
    /// `deny` or `allow`.
    pub verdict: String,
}

impl RuleSpec {
    pub fn from_rule(r: &Rule) -> RuleSpec {
        RuleSpec { prefix: r.prefix.to_string(), verdict: r.verdict().to_string() }
    }

    pub fn to_rule(&self) -> Result<Rule, String> {
        let prefix = self.prefix.parse::<Prefix>().map_err(|e| format!("{:?}: {e}", self.prefix))?;
        let allow = match self.verdict.as_str() {
            "deny" => false,
            "allow" => true,
            v => return Err(format!("verdict {v:?}: expected deny or allow")),
        };
        Ok(Rule { prefix, allow })
    }
}

/// A VIP as the admin API and the state file spell it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    pub name: String,
    /// `address:port/protocol`.
    pub vip: String,
    #[serde(default)]
    pub mode: Option<String>,
    /// Only these sources reach the VIP; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
}

/// Parses an allow list as the API and the state file spell it.
pub fn parse_allow(list: &[String]) -> Result<Vec<Prefix>, ApiError> {
    let mut out: Vec<Prefix> = Vec::new();
    for a in list {
        let p = a.parse::<Prefix>().map_err(|e| bad(format!("allow {a:?}: {e}")))?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub name: String,
    pub address: Ipv4Addr,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub mac: Option<String>,
}

fn one() -> u32 {
    1
}

/// An admin request that cannot be carried out: an HTTP status and why.
#[derive(Debug)]
pub struct ApiError(pub u16, pub String);

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(400, msg.into())
}

impl VipSpec {
    /// Validates and converts (the same rules as the configuration file).
    pub fn to_config(&self) -> Result<crate::config::VipConfig, ApiError> {
        let (addr, port, proto) = crate::config::parse_vip(&self.vip).map_err(|e| bad(format!("vip {:?}: {e}", self.vip)))?;
        let mode = match self.mode.as_deref() {
            None | Some("ipip") => ForwardMode::Ipip,
            Some("l2") => ForwardMode::L2,
            Some(m) => return Err(bad(format!("mode {m:?}: expected ipip or l2"))),
        };
        if self.name.is_empty() {
            return Err(bad("name is empty"));
        }
        let mut backends = Vec::new();
        for b in &self.backends {
            backends.push(b.to_config(mode)?);
            if backends.iter().filter(|x: &&crate::config::BackendConfig| x.addr == b.address).count() > 1 {
                return Err(bad(format!("backend {} listed twice", b.address)));
            }
        }
        let allow = parse_allow(&self.allow)?;
        Ok(crate::config::VipConfig { name: self.name.clone(), addr, port, proto, mode, allow, backends })
    }

    fn from_topology(v: &VipInfo, backends: &[BackendInfo]) -> VipSpec {
        VipSpec {
            name: v.name.clone(),
            vip: v.vip.clone(),
            mode: Some(v.mode.to_string()),
            allow: v.allow.clone(),
            backends: v
                .backends
                .iter()
                .map(|m| {
                    let b = &backends[m.backend as usize];
                    BackendSpec { name: b.name.clone(), address: b.address, weight: m.weight, mac: b.mac.clone() }
                })
                .collect(),
        }
    }
}

impl BackendSpec {
    fn to_config(&self, mode: ForwardMode) -> Result<crate::config::BackendConfig, ApiError> {
        if self.weight > crate::config::MAX_WEIGHT {
            return Err(bad(format!("weight {} is out of range 0..=256", self.weight)));
        }
        let mac = match (&self.mac, mode) {
            (None, _) => None,
            (Some(m), ForwardMode::L2) => Some(crate::config::parse_mac(m).map_err(bad)?),
            (Some(_), _) => return Err(bad("mac is only used by l2-mode VIPs")),
        };
        Ok(crate::config::BackendConfig { name: self.name.clone(), addr: self.address, weight: self.weight, mac })
    }
}

/// Writes the state file (runtime states and weights; the VIP set if changed at runtime).
pub fn save_state(shared: &Shared) -> Result<(), String> {
    // One lock at a time (a temporary guard in a struct literal would live to the end of the
    // statement, holding `runtime` while taking `topology`: the reverse of `/status`'s order).
    let backends = shared.runtime.lock().expect("lock").clone();
    let vips = shared.vips_changed.load(std::sync::atomic::Ordering::SeqCst).then(|| {
        let topo = shared.topology.lock().expect("lock");
        topo.vips.iter().map(|v| VipSpec::from_topology(v, &topo.backends)).collect()
    });
    let firewall = shared
        .firewall_changed
        .load(std::sync::atomic::Ordering::SeqCst)
        .then(|| shared.firewall.lock().expect("lock").iter().map(RuleSpec::from_rule).collect());
    let state = SavedState { backends, vips, firewall };
    let text = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
    if let Some(dir) = shared.state_file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&shared.state_file, text).map_err(|e| format!("cannot save {}: {e}", shared.state_file.display()))
}

fn start_checker(shared: &Shared, b: &BackendInfo, port: u16) {
    if let Some(h) = &shared.health_settings {
        let cfg = check_config(h, port);
        info!(backend = %b.name, address = %b.address, check = ?cfg.kind, interval_ms = h.interval_ms, rise = h.rise, fall = h.fall, "health checks on");
        let task = health::spawn(b.index, b.name.clone(), b.address, cfg, shared.reports.clone());
        if let Some(old) = shared.checkers.lock().expect("lock").insert(b.index, task) {
            old.abort();
        }
    }
}

/// The backend index for `b` in a VIP of `mode` on `port`: an existing backend with that
/// address, or a new one.
fn ensure_backend(shared: &Shared, dp: &mut Dataplane, topo: &mut Topology, b: &crate::config::BackendConfig, mode: ForwardMode, port: u16) -> Result<u32, ApiError> {
    let l2 = mode == ForwardMode::L2;
    if let Some(r) = crate::config::denied_backend(&shared.firewall.lock().expect("lock"), b.addr) {
        return Err(ApiError(409, format!("backend {} ({}) is denied by the firewall rule {}: the balancer would drop its health check answers; allow it first", b.name, b.addr, r.prefix)));
    }
    if let Some(info) = topo.backends.iter_mut().find(|x| x.address == b.addr) {
        if !info.removed && info.name != b.name {
            return Err(ApiError(409, format!("address {} already belongs to backend {:?}", b.addr, info.name)));
        }
        let revived = info.removed;
        info.removed = false;
        info.name = b.name.clone();
        if l2 && info.mac.is_none() {
            let mac = b.mac.map(Ok).unwrap_or_else(|| netutil::resolve_mac(b.addr)).map_err(|e| bad(format!("{e:#}")))?;
            info.mac = Some(netutil::format_mac(&mac));
            dp.set_backend(info.index, b.addr, mac).map_err(|e| ApiError(500, e.to_string()))?;
        }
        let info = info.clone();
        if revived {
            shared.health.lock().expect("lock")[info.index as usize] = BackendHealth::default();
            start_checker(shared, &info, port);
        }
        return Ok(info.index);
    }
    if topo.backends.iter().any(|x| !x.removed && x.name == b.name) {
        return Err(ApiError(409, format!("a backend named {:?} already exists with another address", b.name)));
    }
    let index = topo.backends.len() as u32;
    if index >= lb_common::backend::MAX_BACKENDS {
        return Err(bad("no room for another backend"));
    }
    let mac = if l2 { Some(b.mac.map(Ok).unwrap_or_else(|| netutil::resolve_mac(b.addr)).map_err(|e| bad(format!("{e:#}")))?) } else { None };
    dp.set_backend(index, b.addr, mac.unwrap_or([0; 6])).map_err(|e| ApiError(500, e.to_string()))?;
    let info = BackendInfo { index, name: b.name.clone(), address: b.addr, mac: mac.as_ref().map(netutil::format_mac), removed: false };
    topo.backends.push(info.clone());
    shared.health.lock().expect("lock").push(BackendHealth::default());
    start_checker(shared, &info, port);
    Ok(index)
}

/// Backends in no VIP any more: stop checking them and flag them down (pinned flows move).
fn retire_unused(shared: &Shared, topo: &mut Topology) {
    let used: Vec<u32> = topo.vips.iter().flat_map(|v| v.backends.iter().map(|m| m.backend)).collect();
    for b in topo.backends.iter_mut().filter(|b| !b.removed && !used.contains(&b.index)) {
        b.removed = true;
        if let Some(task) = shared.checkers.lock().expect("lock").remove(&b.index) {
            task.abort();
        }
        info!(backend = %b.name, "backend removed: in no VIP any more");
    }
}

/// Applies a topology change, then persists the VIP set and reconciles.
fn change_topology(shared: &Shared, f: impl FnOnce(&mut Dataplane, &mut Topology) -> Result<(), ApiError>) -> Result<(), ApiError> {
    {
        let mut dp = shared.dataplane.lock().expect("lock");
        let mut topo = shared.topology.lock().expect("lock");
        f(&mut dp, &mut topo)?;
        retire_unused(shared, &mut topo);
    }
    shared.vips_changed.store(true, std::sync::atomic::Ordering::SeqCst);
    save_state(shared).map_err(|e| ApiError(500, e))?;
    reconcile(shared).map_err(|e| ApiError(500, format!("{e:#}")))?;
    announce_vips(shared).map_err(|e| ApiError(500, format!("VIP routes: {e:#}")))
}

pub fn add_vip(shared: &Shared, spec: &VipSpec) -> Result<(), ApiError> {
    let v = spec.to_config()?;
    change_topology(shared, |dp, topo| {
        if topo.vips.iter().any(|x| x.name == v.name || x.vip == v.spec()) {
            return Err(ApiError(409, format!("VIP {} ({}) already exists", v.name, v.spec())));
        }
        let vip_num = (0..lb_common::vip::MAX_VIPS).find(|n| !topo.vips.iter().any(|x| x.vip_num == *n)).ok_or_else(|| bad("no room for another VIP"))?;
        let mut members = Vec::new();
        for b in &v.backends {
            let index = ensure_backend(shared, dp, topo, b, v.mode, v.port)?;
            members.push(VipBackend { backend: index, weight: b.weight });
        }
        info!(vip = %v.spec(), name = %v.name, backends = members.len(), "VIP added at runtime");
        topo.vips.push(VipInfo {
            vip_num,
            name: v.name.clone(),
            vip: v.spec(),
            mode: if v.mode == ForwardMode::L2 { "l2" } else { "ipip" },
            ring_len: 0,
            backends: members,
            key: VipKey::new(v.addr.octets(), v.port, v.proto),
            forward: v.mode,
            allow: v.allow.iter().map(|p| p.to_string()).collect(),
        });
        // Installed with its list and no backend yet (the reconcile that follows fills its
        // ring), so that no packet meets it unrestricted.
        let key = VipKey::new(v.addr.octets(), v.port, v.proto);
        dp.set_vip_allow(key, vip_num, v.mode, &[], &v.allow).map_err(|e| ApiError(500, e.to_string()))?;
        Ok(())
    })
}

/// `POST /vips/<name>/allow`: replaces the VIP's allow list (empty: every source).
pub fn set_vip_allow(shared: &Shared, name: &str, allow: &[Prefix]) -> Result<(), ApiError> {
    change_topology(shared, |dp, topo| {
        let v = topo.vips.iter_mut().find(|v| v.name == name).ok_or_else(|| ApiError(404, format!("no VIP named {name:?}")))?;
        dp.set_allow(&v.key, allow).map_err(|e| ApiError(409, e.to_string()))?;
        v.allow = allow.iter().map(|p| p.to_string()).collect();
        info!(vip = %v.vip, name, allow = ?v.allow, "allow list changed at runtime");
        Ok(())
    })
}

pub fn remove_vip(shared: &Shared, name: &str) -> Result<(), ApiError> {
    change_topology(shared, |dp, topo| {
        let i = topo.vips.iter().position(|v| v.name == name).ok_or_else(|| ApiError(404, format!("no VIP named {name:?}")))?;
        let v = topo.vips.remove(i);
        dp.remove_vip(&v.key).map_err(|e| ApiError(500, e.to_string()))?;
        info!(vip = %v.vip, name = %v.name, "VIP removed at runtime");
        Ok(())
    })
}

pub fn add_member(shared: &Shared, vip: &str, spec: &BackendSpec) -> Result<(), ApiError> {
    change_topology(shared, |dp, topo| {
        let i = topo.vips.iter().position(|v| v.name == vip).ok_or_else(|| ApiError(404, format!("no VIP named {vip:?}")))?;
        let (mode, port) = (topo.vips[i].forward, topo.vips[i].key.port);
        let b = spec.to_config(mode)?;
        let index = ensure_backend(shared, dp, topo, &b, mode, u16::from_be_bytes(port))?;
        if topo.vips[i].backends.iter().any(|m| m.backend == index) {
            return Err(ApiError(409, format!("backend {:?} is already in VIP {vip:?}", b.name)));
        }
        topo.vips[i].backends.push(VipBackend { backend: index, weight: b.weight });
        info!(vip, backend = %b.name, "backend added at runtime");
        Ok(())
    })
}

pub fn remove_member(shared: &Shared, vip: &str, backend: &str) -> Result<(), ApiError> {
    change_topology(shared, |_, topo| {
        let names: Vec<String> = topo.backends.iter().map(|b| b.name.clone()).collect();
        let v = topo.vips.iter_mut().find(|v| v.name == vip).ok_or_else(|| ApiError(404, format!("no VIP named {vip:?}")))?;
        let before = v.backends.len();
        v.backends.retain(|m| names[m.backend as usize] != backend);
        if v.backends.len() == before {
            return Err(ApiError(404, format!("VIP {vip:?} has no backend named {backend:?}")));
        }
        info!(vip, backend, "backend removed from the VIP at runtime");
        Ok(())
    })
}

/// Changes the firewall's rules (`change` edits them by prefix: `true` allows), refusing a
/// set that would deny a backend (its health check answers would be dropped); applies,
/// persists and logs the result. Returns the rules now in force.
pub fn change_firewall(
    shared: &Shared,
    what: &str,
    change: impl FnOnce(&mut BTreeMap<Prefix, bool>) -> Result<(), ApiError>,
) -> Result<Vec<Rule>, ApiError> {
    // The order of every path that holds several of these locks: dataplane, topology, firewall.
    let new = {
        let mut dp = shared.dataplane.lock().expect("lock");
        let topo = shared.topology.lock().expect("lock");
        let mut current = shared.firewall.lock().expect("lock");
        let mut rules: BTreeMap<Prefix, bool> = current.iter().map(|r| (r.prefix, r.allow)).collect();
        change(&mut rules)?;
        let new: Vec<Rule> = rules.into_iter().map(|(prefix, allow)| Rule { prefix, allow }).collect();
        if new.len() > lb_common::firewall::MAX_RULES as usize {
            return Err(ApiError(409, format!("{} rules: the firewall holds at most {}", new.len(), lb_common::firewall::MAX_RULES)));
        }
        for b in topo.backends.iter().filter(|b| !b.removed) {
            if let Some(r) = crate::config::denied_backend(&new, b.address) {
                return Err(ApiError(
                    409,
                    format!("{what} would deny backend {} ({}) through {}: the balancer would drop its health check answers; allow it first", b.name, b.address, r.prefix),
                ));
            }
        }
        dp.set_firewall(&new).map_err(|e| ApiError(500, format!("{e:#}")))?;
        *current = new.clone();
        new
    };
    shared.firewall_changed.store(true, std::sync::atomic::Ordering::SeqCst);
    save_state(shared).map_err(|e| ApiError(500, e))?;
    info!(change = what, rules = new.len(), "firewall changed");
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

/// The flow sync's shared secret: the file's bytes, without a trailing newline.
fn sync_secret(path: &std::path::Path) -> Result<Vec<u8>> {
    let mut secret = std::fs::read(path).with_context(|| {
        format!("sync secret_file {}: cannot read it; make one and copy it to every balancer: head -c 32 /dev/urandom | base64 > {}; chmod 600 {}", path.display(), path.display(), path.display())
    })?;
    while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
        secret.pop();
    }
    if secret.len() < 16 {
        bail!("sync secret_file {}: {} bytes; at least 16 (head -c 32 /dev/urandom | base64 makes one)", path.display(), secret.len());
    }
    Ok(secret)
}

/// Waits until every sync peer that answers has sent its whole table (or 30 s), so that a
/// balancer announced to the routers knows the flows they may send it.
async fn wait_for_peers(shared: &Shared, settings: &crate::config::SyncSettings) {
    let start = std::time::Instant::now();
    let grace = Duration::from_millis(settings.interval_ms * 3 + 500);
    loop {
        let pending: Vec<String> = match shared.sync.lock().expect("lock").as_ref() {
            Some(r) => r.peers.iter().filter(|p| !p.synced && (p.up || start.elapsed() < grace)).map(|p| p.address.to_string()).collect(),
            None => settings.peers.iter().map(|p| p.to_string()).collect(),
        };
        if pending.is_empty() {
            info!(waited_ms = start.elapsed().as_millis() as u64, "flow sync: every peer that answers has sent its flows");
            return;
        }
        if start.elapsed() > Duration::from_secs(30) {
            warn!(?pending, "flow sync: going on without these peers' whole tables");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Binds the flow sync's socket and starts it (`crate::sync`).
fn start_sync(shared: &Arc<Shared>, settings: &crate::config::SyncSettings, secret: &[u8]) -> Result<tokio::task::JoinHandle<()>> {
    use crate::sync;
    let table = shared.dataplane.lock().expect("lock").flow_table()?;
    let syncer = sync::Syncer::new(table, secret, &settings.peers, sync::new_instance());
    let socket = sync::bind(settings.listen).with_context(|| format!("flow sync: cannot listen on {} (UDP)", settings.listen))?;
    info!(listen = %settings.listen, peers = ?settings.peers, interval_ms = settings.interval_ms, "flow sync with the other balancers");
    let (for_backends, for_report) = (shared.clone(), shared.clone());
    let backends = move || {
        let topo = for_backends.topology.lock().expect("lock");
        sync::Backends::new(topo.backends.iter().map(|b| (b.index, b.address)))
    };
    let report = move |r: sync::SyncReport| *for_report.sync.lock().expect("lock") = Some(r);
    Ok(tokio::spawn(sync::serve(socket, syncer, settings.listen, Duration::from_millis(settings.interval_ms), shared.sync_now.clone(), backends, report)))
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
    dp.set_flood_limit(config.flood_guard)?;
    dp.set_source_limit(config.source_flow_limit)?;
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
                    backends.push(BackendInfo { index: i, name: b.name.clone(), address: b.addr, mac: None, removed: false });
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
        dp.set_vip_allow(key, vip_num as u32, v.mode, &ring, &v.allow)?;
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
            allow: v.allow.iter().map(|p| p.to_string()).collect(),
        });
    }
    dp.set_firewall(&config.firewall)?;
    if !config.firewall.is_empty() {
        let deny = config.firewall.iter().filter(|r| !r.allow).count();
        info!(deny, allow = config.firewall.len() - deny, "firewall rules installed");
    }
    // Every VIP is in place: the filter's exact words (stale bits of a reused map cleared).
    dp.sync_addr_filter()?;
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

/// `POST /firewall/reload` and SIGHUP: the configuration file's `[firewall]` (rule files
/// read again) replaces the firewall's rules, runtime changes included (the state file
/// drops its `firewall`). A configuration that does not load changes nothing; its error
/// names the file and line.
pub fn reload_firewall(shared: &Shared) -> Result<usize, ApiError> {
    let path = shared.config_path.as_ref().ok_or_else(|| ApiError(409, "the daemon was started without a configuration file".into()))?;
    let config = Config::load(path).map_err(|e| ApiError(400, format!("{e}")))?;
    let wanted: BTreeMap<Prefix, bool> = config.firewall.iter().map(|r| (r.prefix, r.allow)).collect();
    let rules = change_firewall(shared, &format!("reload from {}", path.display()), |rules| {
        *rules = wanted;
        Ok(())
    })?;
    shared.firewall_changed.store(false, std::sync::atomic::Ordering::SeqCst);
    save_state(shared).map_err(|e| ApiError(500, e))?;
    Ok(rules.len())
}

pub async fn run(mut config: Config, config_path: Option<std::path::PathBuf>) -> Result<()> {
    let saved: SavedState = match std::fs::read(&config.state_file) {
        Ok(text) => serde_json::from_slice(&text).with_context(|| format!("{} is not a runtime state file", config.state_file.display()))?,
        Err(_) => SavedState::default(),
    };
    let vips_changed = saved.vips.is_some();
    if let Some(vips) = &saved.vips {
        info!(state_file = %config.state_file.display(), vips = vips.len(), "using the VIP set changed at runtime (remove its \"vips\" from the state file to go back to the configuration's)");
        config.vips = vips.iter().map(|v| v.to_config().map_err(|e| anyhow!("state file: VIP {}: {}", v.name, e.1))).collect::<Result<_>>()?;
    }
    let firewall_changed = saved.firewall.is_some();
    if let Some(rules) = &saved.firewall {
        info!(state_file = %config.state_file.display(), rules = rules.len(), "using the firewall rules changed at runtime (remove its \"firewall\" from the state file to go back to the configuration's)");
        let mut set = crate::config::RuleSet::default();
        for r in rules {
            let rule = r.to_rule().map_err(|e| anyhow!("state file: firewall rule {e}"))?;
            set.add(rule.prefix, rule.allow, "the state file".into()).map_err(|e| anyhow!("state file: {e}"))?;
        }
        config.firewall = set.rules();
        for b in config.vips.iter().flat_map(|v| &v.backends) {
            if let Some(r) = crate::config::denied_backend(&config.firewall, b.addr) {
                bail!("state file: the firewall rule deny {} denies backend {} ({}): its health check answers would be dropped", r.prefix, b.name, b.addr);
            }
        }
    }
    let encap_source = match config.encap_source {
        Some(a) => a,
        None => *netutil::ipv4_addresses(&config.interfaces[0])?
            .first()
            .ok_or_else(|| anyhow!("interface {} has no IPv4 address: set encap_source", config.interfaces[0]))?,
    };
    if let Some(d) = &config.pin_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {} (a bpffs directory)", d.display()))?;
    }
    let sync_secret = match &config.sync {
        None => None,
        Some(s) => Some(sync_secret(&s.secret_file)?),
    };
    let flow_seed = sync_secret.as_deref().map(crate::sync::flow_seed);
    let mut dp = Dataplane::load(&LoadOptions { flow_table_size: config.flow_table_size, pin_dir: config.pin_dir.clone(), flow_seed })
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

    let anchor = match &config.announce {
        None => None,
        Some(a) => {
            let adopted = xdp.iter().any(|x| x.mode == "adopted");
            // A restart that kept the program forwarding left its routes on the device we
            // take over: they stay. Otherwise nothing is announced until we are ready.
            let anchor = crate::announce::Anchor::open(a.table)?;
            if !adopted {
                let stale = crate::announce::clear_routes(a.table).with_context(|| format!("clearing the VIP routes in table {}", a.table))?;
                if !stale.is_empty() {
                    warn!(table = a.table, ?stale, "withdrew VIP routes a previous daemon left");
                }
            }
            info!(device = %anchor.name, table = a.table, "VIP routes go on this TUN device: they go with this process");
            Some(anchor)
        }
    };
    let topology = Topology {
        version: env!("CARGO_PKG_VERSION"),
        encap_source,
        flow_table_size: config.flow_table_size,
        flood_guard: config.flood_guard,
        source_flow_limit: config.source_flow_limit,
        xdp,
        vips,
        backends,
    };
    let health = Mutex::new(vec![BackendHealth::default(); topology.backends.len()]);
    let runtime = saved.backends;
    if !runtime.is_empty() {
        info!(state_file = %config.state_file.display(), ?runtime, "runtime state restored");
    }
    let token = admin_token(&config.token_file)?;
    // Health checks: one task per backend; reports come back here.
    let (report_tx, mut reports) = tokio::sync::mpsc::channel::<health::CheckReport>(256);
    let shared = Arc::new(Shared {
        dataplane: Mutex::new(dp),
        topology: Mutex::new(topology),
        health,
        runtime: Mutex::new(runtime),
        state_file: config.state_file.clone(),
        token,
        shutdown_sessions: config.health.as_ref().is_none_or(|h| h.shutdown_sessions),
        health_settings: config.health.clone(),
        reports: report_tx,
        checkers: Mutex::new(BTreeMap::new()),
        vips_changed: AtomicBool::new(vips_changed),
        firewall: Mutex::new(config.firewall.clone()),
        firewall_changed: AtomicBool::new(firewall_changed),
        config_path,
        ready: AtomicBool::new(false),
        sync: Mutex::new(None),
        sync_now: Arc::new(tokio::sync::Notify::new()),
        announce: anchor,
        announcing: AtomicBool::new(false),
    });
    reconcile(&shared)?;
    if config.health.is_some() {
        let topo = shared.topology.lock().expect("lock").clone();
        for b in &topo.backends {
            let port = config.vips.iter().find(|v| v.backends.iter().any(|x| x.addr == b.address)).map(|v| v.port).unwrap_or(80);
            start_checker(&shared, b, port);
        }
    } else {
        info!("no [health] section: backends are never checked and always up");
    }

    let sync_task = match (&config.sync, &sync_secret) {
        (Some(settings), Some(secret)) => Some(start_sync(&shared, settings, secret)?),
        _ => None,
    };

    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("admin API: cannot listen on {}", config.admin_listen))?;
    info!(listen = %config.admin_listen, "admin API: /metrics /status /live /ready");
    let admin = tokio::spawn(crate::admin::serve(listener, shared.clone()));
    if let Some(s) = &config.sync {
        wait_for_peers(&shared, s).await;
    }
    if let Some(a) = &config.announce {
        shared.announcing.store(true, std::sync::atomic::Ordering::SeqCst);
        announce_vips(&shared).with_context(|| format!("announcing the VIP routes in table {}", a.table))?;
    }
    shared.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    info!("ready");

    let mut refresh = tokio::time::interval(NEXTHOP_REFRESH);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
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
            _ = hup.recv() => {
                match reload_firewall(&shared) {
                    Ok(n) => info!(rules = n, "SIGHUP: firewall rules reloaded from the configuration"),
                    Err(ApiError(_, why)) => warn!(error = %why, "SIGHUP: firewall not reloaded, rules unchanged"),
                }
            }
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
    if let (Some(a), true) = (&shared.announce, keep) {
        // The next lbd takes the device over: the routes stay announced meanwhile.
        if let Err(e) = a.set_persist(true) {
            warn!(error = %format!("{e:#}"), "the VIP routes will be withdrawn while the daemon restarts");
        }
    }
    if let (Some(a), false) = (&config.announce, keep) {
        // From now on new flows go where the other balancers, which have no entry for them,
        // will send their later packets; the flows pinned before reach them in one sync
        // round, sent before the routes go. Then the routers move the flows away while this
        // balancer still forwards what reaches it.
        if let Err(e) = shared.dataplane.lock().expect("lock").set_flood_limit(lb_common::flood::HASH_NEW_FLOWS) {
            warn!(error = %e, "new flows stay round robin while withdrawing");
        }
        if config.sync.is_some() {
            let sent = || shared.sync.lock().expect("lock").as_ref().map(|r| r.stats.messages_sent).unwrap_or(0);
            let before = sent();
            shared.sync_now.notify_one();
            let start = std::time::Instant::now();
            while sent() == before && start.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        shared.announcing.store(false, std::sync::atomic::Ordering::SeqCst);
        match announce_vips(&shared) {
            Ok(()) => {
                info!(table = a.table, wait_ms = a.withdraw_wait_ms, "new flows placed by hash, pinned flows sent to the peers, VIP routes withdrawn; forwarding until the routers move away");
                tokio::time::sleep(Duration::from_millis(a.withdraw_wait_ms)).await;
            }
            Err(e) => warn!(error = %format!("{e:#}"), "could not withdraw the VIP routes"),
        }
    }
    admin.abort();
    if let Some(t) = sync_task {
        t.abort();
    }
    for (_, c) in std::mem::take(&mut *shared.checkers.lock().expect("lock")) {
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
