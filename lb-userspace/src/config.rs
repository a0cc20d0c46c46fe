//! The daemon's TOML configuration. Unknown keys, duplicates and impossible values are
//! errors that name the line.
//!
//! ```toml
//! interfaces = ["eth0"]          # where VIP traffic arrives; the program attaches here
//! xdp_mode = "auto"              # driver | skb | auto (driver, else skb; the outcome is logged)
//! flow_table_size = 262144       # established flows held (twice as many slots)
//! flood_guard = 125000           # new TCP flows a CPU pins per VIP a second; past it by hash, unpinned (0: off)
//! source_flow_limit = 0          # new flows one client address may open a second; past it dropped (0: off)
//! encap_source = "10.0.0.2"      # outer IPIP source; default: first IPv4 address of interfaces[0]
//! pin_dir = "/sys/fs/bpf/lbd"    # optional: pin maps and links here; a restart adopts them
//!
//! [admin]
//! listen = "127.0.0.1:9100"      # /metrics, /status, /live, /ready
//!
//! [firewall]                     # optional: by source, longest prefix decides
//! deny = ["203.0.113.0/24"]      # dropped in XDP before anything else
//! allow = ["203.0.113.8/29"]     # exceptions out of wider deny rules
//! deny_files = ["/etc/lbd/drop.txt"]   # one prefix a line, `#`/`;` comments (also allow_files)
//!
//! [sync]                         # optional: active-active balancers keep each other's flows
//! listen = "10.0.0.2:7946"       # UDP; this balancer's address on the balancers' network
//! peers = ["10.0.0.3:7946"]      # the other balancers
//! secret_file = "/etc/lbd/sync.key"    # the same on every balancer, 16+ bytes, root-only
//! interval_ms = 200              # how often changed flows are sent (10..=10000)
//!
//! [announce]                     # optional: VIP routes for a routing daemon to announce (BGP)
//! table = 100                    # kernel routing table lbd keeps a route per VIP address in
//! withdraw_wait_ms = 2000        # on shutdown: routes withdrawn, forwarding kept this long
//!
//! [[vip]]
//! name = "web"
//! vip = "10.0.100.1:80/tcp"      # address:port/protocol (tcp or udp)
//! mode = "ipip"                  # ipip (default) or l2
//! # allow = ["10.0.0.0/8"]       # optional: only these sources reach the VIP, others dropped
//!
//! [[vip.backend]]
//! name = "web1"
//! address = "10.0.0.11"
//! weight = 1                     # 0..=256; 0 takes no new flows
//! # mac = "02:00:00:00:00:11"    # l2 mode only; default: from the neighbour table
//! ```

use std::{collections::HashMap, fmt, net::{Ipv4Addr, SocketAddr}, path::Path};

use lb_common::{
    backend::MAX_BACKENDS,
    firewall::{decide, Prefix, Rule, MAX_RULES},
    vip::{ForwardMode, MAX_VIPS, PROTO_TCP, PROTO_UDP},
};
use serde::Deserialize;
use serde_spanned::Spanned;

pub const MAX_WEIGHT: u32 = 256;
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9100";
pub const DEFAULT_TOKEN_FILE: &str = "/run/lbd/admin.token";
pub const DEFAULT_STATE_FILE: &str = "/var/lib/lbd/runtime-state.json";

/// A configuration error, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    interfaces: Spanned<Vec<String>>,
    #[serde(default)]
    xdp_mode: Option<Spanned<String>>,
    #[serde(default)]
    flow_table_size: Option<Spanned<i64>>,
    #[serde(default)]
    flood_guard: Option<Spanned<i64>>,
    #[serde(default)]
    source_flow_limit: Option<Spanned<i64>>,
    #[serde(default)]
    encap_source: Option<Spanned<String>>,
    #[serde(default)]
    pin_dir: Option<Spanned<String>>,
    #[serde(default)]
    admin: Option<AdminFile>,
    #[serde(default)]
    health: Option<HealthFile>,
    #[serde(default)]
    firewall: Option<FirewallFile>,
    #[serde(default)]
    sync: Option<SyncFile>,
    #[serde(default)]
    announce: Option<AnnounceFile>,
    #[serde(default)]
    vip: Vec<VipFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnnounceFile {
    table: Spanned<i64>,
    #[serde(default)]
    withdraw_wait_ms: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncFile {
    listen: Spanned<String>,
    peers: Spanned<Vec<Spanned<String>>>,
    secret_file: Spanned<String>,
    #[serde(default)]
    interval_ms: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FirewallFile {
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny_files: Vec<Spanned<String>>,
    #[serde(default)]
    allow_files: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthFile {
    check: Spanned<String>,
    #[serde(default)]
    port: Option<Spanned<i64>>,
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    expect_status: Option<Spanned<i64>>,
    #[serde(default)]
    interval_ms: Option<Spanned<i64>>,
    #[serde(default)]
    fast_interval_ms: Option<Spanned<i64>>,
    #[serde(default)]
    timeout_ms: Option<Spanned<i64>>,
    #[serde(default)]
    rise: Option<Spanned<i64>>,
    #[serde(default)]
    fall: Option<Spanned<i64>>,
    #[serde(default)]
    on_marked_down: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    state_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VipFile {
    #[serde(default)]
    name: Option<Spanned<String>>,
    vip: Spanned<String>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    backend: Vec<BackendFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendFile {
    #[serde(default)]
    name: Option<Spanned<String>>,
    address: Spanned<String>,
    #[serde(default)]
    weight: Option<Spanned<i64>>,
    #[serde(default)]
    mac: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpModeSetting {
    Driver,
    Skb,
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeSetting,
    pub flow_table_size: u32,
    /// New TCP flows a CPU pins to one VIP per window (about a second) before the SYN flood
    /// guard places them by hash, without an entry (`lb_common::flood`); 0: off.
    pub flood_guard: u32,
    /// New flows one source address may open per window (about a second); its SYNs and
    /// first datagrams past it are dropped (`lb_common::flood`); 0: off.
    pub source_flow_limit: u32,
    pub encap_source: Option<Ipv4Addr>,
    /// Where maps and XDP links are pinned (bpffs), so that a restart adopts them; `None`:
    /// nothing outlives the daemon.
    pub pin_dir: Option<std::path::PathBuf>,
    pub admin_listen: SocketAddr,
    /// Mutating admin calls need the token in this root-only file (created if missing).
    pub token_file: std::path::PathBuf,
    /// Runtime state (ready/drain/maint, weights) kept across restarts.
    pub state_file: std::path::PathBuf,
    /// Health checks of every backend; `None`: no checks, backends are always up.
    pub health: Option<HealthSettings>,
    /// Firewall rules by source prefix, sorted (`lb_common::firewall`); empty: no firewall.
    pub firewall: Vec<Rule>,
    /// Flow-state sync with other balancers (`crate::sync`); `None`: this balancer alone.
    pub sync: Option<SyncSettings>,
    /// VIP routes for a routing daemon to announce (`crate::announce`); `None`: none.
    pub announce: Option<AnnounceSettings>,
    pub vips: Vec<VipConfig>,
}

/// `[announce]`: the kernel routing table lbd keeps a route per VIP address in while it
/// serves, and how long it keeps forwarding after withdrawing them on shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceSettings {
    pub table: u32,
    pub withdraw_wait_ms: u64,
}

pub const DEFAULT_WITHDRAW_WAIT_MS: u64 = 2000;

/// `[sync]`: the balancers this one shares its pinned flows with (`crate::sync`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// Where peers' datagrams arrive (UDP).
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    /// The shared secret: authenticates the datagrams and seeds the flow table's hash.
    pub secret_file: std::path::PathBuf,
    pub interval_ms: u64,
}

pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 200;

/// `[health]`: how every backend is checked (HAProxy's meaning and defaults: interval
/// 2000 ms, rise 2, fall 3; fast interval and timeout default to the interval).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// `tcp` (connect) or `http` (GET `path`, expect `expect_status`).
    pub http: bool,
    /// Port to check; `None`: the port of the first VIP the backend serves.
    pub port: Option<u16>,
    pub path: String,
    pub expect_status: u16,
    pub interval_ms: u64,
    pub fast_interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    /// HAProxy's `on-marked-down shutdown-sessions` (default): flows pinned to a backend that
    /// fails its checks are moved (and so reset) at once; `false` (`"none"`): they stay.
    pub shutdown_sessions: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConfig {
    pub name: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub mode: ForwardMode,
    /// Only sources these prefixes hold reach the VIP (others are dropped); empty: all.
    pub allow: Vec<Prefix>,
    pub backends: Vec<BackendConfig>,
}

impl VipConfig {
    pub fn proto_name(&self) -> &'static str {
        if self.proto == PROTO_TCP { "tcp" } else { "udp" }
    }
    /// `address:port/protocol`.
    pub fn spec(&self) -> String {
        format!("{}:{}/{}", self.addr, self.port, self.proto_name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    pub addr: Ipv4Addr,
    pub weight: u32,
    pub mac: Option<[u8; 6]>,
}

/// Parses `a.b.c.d:port/proto`.
pub fn parse_vip(s: &str) -> Result<(Ipv4Addr, u16, u8), String> {
    let (addr_port, proto) = s.rsplit_once('/').ok_or("expected address:port/protocol, e.g. 10.0.0.1:80/tcp")?;
    let proto = match proto {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        p => return Err(format!("protocol {p:?} is neither tcp nor udp")),
    };
    let (addr, port) = addr_port.rsplit_once(':').ok_or("expected address:port/protocol, e.g. 10.0.0.1:80/tcp")?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let port: u16 = port.parse().map_err(|_| format!("port {port:?} is not a number in 1..=65535"))?;
    if port == 0 {
        return Err("port 0 is not a valid VIP port".into());
    }
    Ok((addr, port, proto))
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address like 02:00:00:00:00:01"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address like 02:00:00:00:00:01"))?;
    }
    Ok(mac)
}

/// A prefix list (`deny_files`, `allow_files`): one address or prefix a line; `#` or `;`
/// starts a comment, so Spamhaus DROP's lines (`1.10.16.0/20 ; SBL256894`) read as they
/// are. The prefixes with their line numbers; an error names the file and line.
pub fn parse_prefix_list(file: &str, text: &str) -> Result<Vec<(Prefix, usize)>, ConfigError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split(['#', ';']).next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let prefix = entry.parse::<Prefix>().map_err(|e| ConfigError { file: file.into(), line: Some(i + 1), message: format!("{entry:?}: {e}") })?;
        out.push((prefix, i + 1));
    }
    Ok(out)
}

/// Firewall rules being collected, each with where it was given (for error messages).
#[derive(Default)]
pub struct RuleSet {
    rules: std::collections::BTreeMap<Prefix, (bool, String)>,
}

impl RuleSet {
    /// Adds a rule; the same prefix again with the same verdict is merged (blocklists
    /// overlap), with the other verdict it is an error naming where the first one is.
    pub fn add(&mut self, prefix: Prefix, allow: bool, at: String) -> Result<(), String> {
        match self.rules.get(&prefix) {
            Some((a, first)) if *a != allow => Err(format!(
                "{prefix} is {} here but {} at {first}: one verdict per prefix",
                if allow { "allowed" } else { "denied" },
                if *a { "allowed" } else { "denied" }
            )),
            Some(_) => Ok(()),
            None => {
                self.rules.insert(prefix, (allow, at));
                Ok(())
            }
        }
    }

    pub fn rules(&self) -> Vec<Rule> {
        self.rules.iter().map(|(&prefix, &(allow, _))| Rule { prefix, allow }).collect()
    }

    /// Where the rule for `prefix` was given.
    pub fn place(&self, prefix: &Prefix) -> &str {
        self.rules.get(prefix).map(|(_, at)| at.as_str()).unwrap_or("?")
    }
}

/// Why a backend may not sit behind `rules`: the balancer would drop its health check
/// answers (and, in `l2` mode, nothing else changes that). `None` if no rule denies it.
pub fn denied_backend(rules: &[Rule], addr: Ipv4Addr) -> Option<Rule> {
    decide(rules, addr.octets()).filter(|r| !r.allow).copied()
}

/// A file being parsed: turns byte spans into line numbers for errors.
pub(crate) struct Ctx<'a> {
    pub(crate) file: &'a str,
    pub(crate) text: &'a str,
}

impl Ctx<'_> {
    pub(crate) fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].matches('\n').count() + 1
    }
    /// A `toml` error (syntax, unknown key, wrong type), located.
    pub(crate) fn toml_error(&self, e: toml::de::Error) -> ConfigError {
        ConfigError { file: self.file.into(), line: e.span().map(|s| self.line_of(s.start)), message: e.message().trim().to_string() }
    }
    pub(crate) fn err<T>(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> Result<T, ConfigError> {
        Err(ConfigError { file: self.file.into(), line: Some(self.line_of(span.start)), message: message.into() })
    }
}

impl Config {
    fn health(cx: &Ctx, h: &HealthFile) -> Result<HealthSettings, ConfigError> {
        let int = |v: &Option<Spanned<i64>>, name: &str, range: std::ops::RangeInclusive<i64>, default: i64| -> Result<i64, ConfigError> {
            match v {
                None => Ok(default),
                Some(x) if range.contains(x.get_ref()) => Ok(*x.get_ref()),
                Some(x) => cx.err(x.span(), format!("{name} {} is out of range {}..={}", x.get_ref(), range.start(), range.end())),
            }
        };
        let http = match h.check.get_ref().as_str() {
            "http" => true,
            "tcp" => false,
            other => return cx.err(h.check.span(), format!("check {other:?}: expected tcp or http")),
        };
        if !http {
            for (field, span) in [("path", h.path.as_ref().map(|p| p.span())), ("expect_status", h.expect_status.as_ref().map(|p| p.span()))] {
                if let Some(span) = span {
                    return cx.err(span, format!("{field} is only used by check = \"http\""));
                }
            }
        }
        let path = h.path.as_ref().map(|p| p.get_ref().clone()).unwrap_or_else(|| "/healthz".into());
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            return cx.err(h.path.as_ref().expect("given").span(), format!("path {path:?} must start with / and have no spaces"));
        }
        let interval_ms = int(&h.interval_ms, "interval_ms", 10..=3_600_000, 2000)? as u64;
        Ok(HealthSettings {
            http,
            port: h.port.as_ref().map(|_| int(&h.port, "port", 1..=65535, 0)).transpose()?.map(|p| p as u16),
            path,
            expect_status: int(&h.expect_status, "expect_status", 100..=599, 200)? as u16,
            interval_ms,
            fast_interval_ms: int(&h.fast_interval_ms, "fast_interval_ms", 10..=3_600_000, interval_ms as i64)? as u64,
            timeout_ms: int(&h.timeout_ms, "timeout_ms", 10..=3_600_000, interval_ms as i64)? as u64,
            rise: int(&h.rise, "rise", 1..=100, 2)? as u32,
            fall: int(&h.fall, "fall", 1..=100, 3)? as u32,
            shutdown_sessions: match h.on_marked_down.as_ref().map(|v| (v.get_ref().as_str(), v.span())) {
                None | Some(("shutdown-sessions", _)) => true,
                Some(("none", _)) => false,
                Some((other, span)) => return cx.err(span, format!("on_marked_down {other:?}: expected shutdown-sessions or none")),
            },
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let cx = Ctx { file, text };
        let f: File = toml::from_str(text).map_err(|e| cx.toml_error(e))?;

        if f.interfaces.get_ref().is_empty() {
            return cx.err(f.interfaces.span(), "interfaces is empty: name at least one, e.g. [\"eth0\"]");
        }
        let mut seen = HashMap::new();
        for i in f.interfaces.get_ref() {
            if i.is_empty() || i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
                return cx.err(f.interfaces.span(), format!("{i:?} is not a valid interface name"));
            }
            if seen.insert(i.clone(), ()).is_some() {
                return cx.err(f.interfaces.span(), format!("interface {i:?} listed twice"));
            }
        }
        let xdp_mode = match &f.xdp_mode {
            None => XdpModeSetting::Auto,
            Some(m) => match m.get_ref().as_str() {
                "driver" => XdpModeSetting::Driver,
                "skb" => XdpModeSetting::Skb,
                "auto" => XdpModeSetting::Auto,
                other => return cx.err(m.span(), format!("xdp_mode {other:?}: expected driver, skb or auto")),
            },
        };
        let flow_table_size = match &f.flow_table_size {
            None => lb_common::flow::DEFAULT_FLOW_TABLE_SIZE,
            Some(n) => match *n.get_ref() {
                v @ 1024..=67_108_864 => v as u32,
                v => return cx.err(n.span(), format!("flow_table_size {v} is out of range 1024..=67108864")),
            },
        };
        let flood_guard = match &f.flood_guard {
            None => lb_common::flood::DEFAULT_FLOOD_LIMIT,
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(v) if v != lb_common::flood::HASH_NEW_FLOWS => v,
                _ => return cx.err(n.span(), format!("flood_guard {} is out of range 0..={}", n.get_ref(), u32::MAX - 1)),
            },
        };
        let source_flow_limit = match &f.source_flow_limit {
            None => 0,
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(v) => v,
                Err(_) => return cx.err(n.span(), format!("source_flow_limit {} is out of range 0..={}", n.get_ref(), u32::MAX)),
            },
        };
        let encap_source = match &f.encap_source {
            None => None,
            Some(a) => Some(a.get_ref().parse::<Ipv4Addr>().or_else(|_| cx.err(a.span(), format!("encap_source {:?} is not an IPv4 address", a.get_ref())))?),
        };
        let admin_listen = match f.admin.as_ref().and_then(|a| a.listen.as_ref()) {
            None => DEFAULT_ADMIN.parse().expect("valid default"),
            Some(l) => l.get_ref().parse().or_else(|_| cx.err(l.span(), format!("admin listen {:?} is not an address:port", l.get_ref())))?,
        };
        let path = |v: Option<&Spanned<String>>, default: &str| -> Result<std::path::PathBuf, ConfigError> {
            match v {
                None => Ok(default.into()),
                Some(p) if p.get_ref().starts_with('/') => Ok(p.get_ref().into()),
                Some(p) => cx.err(p.span(), format!("{:?} must be an absolute path", p.get_ref())),
            }
        };
        let pin_dir = f.pin_dir.as_ref().map(|p| path(Some(p), "")).transpose()?;
        let token_file = path(f.admin.as_ref().and_then(|a| a.token_file.as_ref()), DEFAULT_TOKEN_FILE)?;
        let state_file = path(f.admin.as_ref().and_then(|a| a.state_file.as_ref()), DEFAULT_STATE_FILE)?;

        let health = match &f.health {
            None => None,
            Some(h) => Some(Self::health(&cx, h)?),
        };
        let sync = f.sync.as_ref().map(|y| Self::sync(&cx, y)).transpose()?;
        let announce = f.announce.as_ref().map(|a| Self::announce(&cx, a)).transpose()?;

        let firewall = match &f.firewall {
            None => RuleSet::default(),
            Some(fw) => Self::firewall(&cx, fw)?,
        };
        let firewall_rules = firewall.rules();
        if firewall_rules.len() > MAX_RULES as usize {
            return Err(ConfigError { file: file.into(), line: None, message: format!("{} firewall rules; at most {MAX_RULES}", firewall_rules.len()) });
        }

        if f.vip.len() > MAX_VIPS as usize {
            return Err(ConfigError { file: file.into(), line: None, message: format!("{} VIPs; at most {MAX_VIPS}", f.vip.len()) });
        }
        let mut vips = Vec::new();
        let mut vip_lines: HashMap<(Ipv4Addr, u16, u8), usize> = HashMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut all_backends: HashMap<Ipv4Addr, ()> = HashMap::new();
        for v in &f.vip {
            let (addr, port, proto) = parse_vip(v.vip.get_ref()).or_else(|m| cx.err(v.vip.span(), format!("vip {:?}: {m}", v.vip.get_ref())))?;
            let line = cx.line_of(v.vip.span().start);
            if let Some(first) = vip_lines.insert((addr, port, proto), line) {
                return cx.err(v.vip.span(), format!("vip {} is already defined at line {first}", v.vip.get_ref()));
            }
            let name = v.name.as_ref().map(|n| n.get_ref().clone()).unwrap_or_else(|| v.vip.get_ref().clone());
            if let Some(first) = names.insert(name.clone(), line) {
                let span = v.name.as_ref().map(|n| n.span()).unwrap_or(v.vip.span());
                return cx.err(span, format!("VIP name {name:?} is already used at line {first}"));
            }
            let mode = match &v.mode {
                None => ForwardMode::Ipip,
                Some(m) => match m.get_ref().as_str() {
                    "ipip" => ForwardMode::Ipip,
                    "l2" => ForwardMode::L2,
                    other => return cx.err(m.span(), format!("mode {other:?}: expected ipip or l2")),
                },
            };
            let mut allow: Vec<Prefix> = Vec::new();
            for a in &v.allow {
                let p = a.get_ref().parse::<Prefix>().or_else(|e| cx.err(a.span(), format!("allow {:?}: {e}", a.get_ref())))?;
                if allow.contains(&p) {
                    return cx.err(a.span(), format!("allow lists {p} twice"));
                }
                allow.push(p);
            }
            allow.sort();
            if v.backend.is_empty() {
                return cx.err(v.vip.span(), format!("vip {} has no [[vip.backend]]", v.vip.get_ref()));
            }
            let mut backends = Vec::new();
            let mut seen: HashMap<Ipv4Addr, usize> = HashMap::new();
            for b in &v.backend {
                let addr: Ipv4Addr = b.address.get_ref().parse().or_else(|_| {
                    cx.err(b.address.span(), format!("backend address {:?} is not an IPv4 address", b.address.get_ref()))
                })?;
                if let Some(first) = seen.insert(addr, cx.line_of(b.address.span().start)) {
                    return cx.err(b.address.span(), format!("backend {addr} is already listed for this VIP at line {first}"));
                }
                all_backends.insert(addr, ());
                if let Some(r) = denied_backend(&firewall_rules, addr) {
                    return cx.err(
                        b.address.span(),
                        format!(
                            "backend {addr} is denied by the firewall rule {} ({}): the balancer would drop its health check answers; allow it (allow = [\"{addr}\"])",
                            r.prefix,
                            firewall.place(&r.prefix)
                        ),
                    );
                }
                let weight = match &b.weight {
                    None => 1,
                    Some(w) => match *w.get_ref() {
                        v @ 0..=256 => v as u32,
                        v => return cx.err(w.span(), format!("weight {v} is out of range 0..={MAX_WEIGHT}")),
                    },
                };
                let mac = match &b.mac {
                    None => None,
                    Some(m) if mode == ForwardMode::L2 => Some(parse_mac(m.get_ref()).or_else(|e| cx.err(m.span(), e))?),
                    Some(m) => return cx.err(m.span(), "mac is only used by l2-mode VIPs"),
                };
                let name = b.name.as_ref().map(|n| n.get_ref().clone()).unwrap_or_else(|| addr.to_string());
                backends.push(BackendConfig { name, addr, weight, mac });
            }
            if backends.iter().all(|b| b.weight == 0) {
                return cx.err(v.vip.span(), format!("vip {}: every backend has weight 0", v.vip.get_ref()));
            }
            vips.push(VipConfig { name, addr, port, proto, mode, allow, backends });
        }
        if all_backends.len() > MAX_BACKENDS as usize {
            return Err(ConfigError { file: file.into(), line: None, message: format!("{} backends; at most {MAX_BACKENDS}", all_backends.len()) });
        }
        Ok(Config {
            interfaces: f.interfaces.into_inner(),
            xdp_mode,
            flow_table_size,
            flood_guard,
            source_flow_limit,
            encap_source,
            pin_dir,
            admin_listen,
            token_file,
            state_file,
            health,
            firewall: firewall_rules,
            sync,
            announce,
            vips,
        })
    }

    fn announce(cx: &Ctx, f: &AnnounceFile) -> Result<AnnounceSettings, ConfigError> {
        let table = match *f.table.get_ref() {
            253..=255 => return cx.err(f.table.span(), format!("announce table {} is the kernel's default, main or local table: choose one of its own, e.g. 100", f.table.get_ref())),
            v @ 1..=0xffff_ffff => v as u32,
            v => return cx.err(f.table.span(), format!("announce table {v} is out of range 1..=4294967295")),
        };
        let withdraw_wait_ms = match &f.withdraw_wait_ms {
            None => DEFAULT_WITHDRAW_WAIT_MS,
            Some(n) => match *n.get_ref() {
                v @ 0..=60_000 => v as u64,
                v => return cx.err(n.span(), format!("announce withdraw_wait_ms {v} is out of range 0..=60000")),
            },
        };
        Ok(AnnounceSettings { table, withdraw_wait_ms })
    }

    fn sync(cx: &Ctx, f: &SyncFile) -> Result<SyncSettings, ConfigError> {
        let addr = |v: &Spanned<String>, what: &str| -> Result<SocketAddr, ConfigError> {
            match v.get_ref().parse::<SocketAddr>() {
                Ok(a) if a.is_ipv4() && a.port() != 0 => Ok(a),
                _ => cx.err(v.span(), format!("sync {what} {:?} is not an IPv4 address:port", v.get_ref())),
            }
        };
        let listen = addr(&f.listen, "listen")?;
        if f.peers.get_ref().is_empty() {
            return cx.err(f.peers.span(), "sync peers is empty: name the other balancers' listen addresses");
        }
        let mut peers: Vec<SocketAddr> = Vec::new();
        for p in f.peers.get_ref() {
            let a = addr(p, "peer")?;
            if a.ip() == listen.ip() {
                return cx.err(p.span(), format!("sync peer {a} is this balancer's own listen address"));
            }
            // Peers are told apart by their address.
            if peers.iter().any(|q| q.ip() == a.ip()) {
                return cx.err(p.span(), format!("sync peer {} listed twice", a.ip()));
            }
            peers.push(a);
        }
        let secret_file = f.secret_file.get_ref();
        if !secret_file.starts_with('/') {
            return cx.err(f.secret_file.span(), format!("{secret_file:?} must be an absolute path"));
        }
        let interval_ms = match &f.interval_ms {
            None => DEFAULT_SYNC_INTERVAL_MS,
            Some(n) => match *n.get_ref() {
                v @ 10..=10_000 => v as u64,
                v => return cx.err(n.span(), format!("sync interval_ms {v} is out of range 10..=10000")),
            },
        };
        Ok(SyncSettings { listen, peers, secret_file: secret_file.into(), interval_ms })
    }

    fn firewall(cx: &Ctx, fw: &FirewallFile) -> Result<RuleSet, ConfigError> {
        let mut set = RuleSet::default();
        for (list, allow) in [(&fw.deny, false), (&fw.allow, true)] {
            for entry in list {
                let prefix = entry.get_ref().parse::<Prefix>().or_else(|e| cx.err(entry.span(), format!("firewall {}: {:?}: {e}", if allow { "allow" } else { "deny" }, entry.get_ref())))?;
                let at = format!("line {}", cx.line_of(entry.span().start));
                set.add(prefix, allow, at).or_else(|e| cx.err(entry.span(), e))?;
            }
        }
        for (files, allow) in [(&fw.deny_files, false), (&fw.allow_files, true)] {
            for name in files {
                let path = name.get_ref();
                if !path.starts_with('/') {
                    return cx.err(name.span(), format!("{path:?} must be an absolute path"));
                }
                let text = std::fs::read_to_string(path).or_else(|e| cx.err(name.span(), format!("cannot read the prefix list {path}: {e}")))?;
                for (prefix, line) in parse_prefix_list(path, &text)? {
                    set.add(prefix, allow, format!("{path} line {line}"))
                        .map_err(|message| ConfigError { file: path.clone(), line: Some(line), message })?;
                }
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interfaces = ["eth0"]
xdp_mode = "driver"
flow_table_size = 4096

[admin]
listen = "127.0.0.1:9999"

[[vip]]
name = "web"
vip = "10.0.100.1:80/tcp"

[[vip.backend]]
name = "web1"
address = "10.0.0.11"

[[vip.backend]]
address = "10.0.0.12"
weight = 3

[[vip]]
vip = "10.0.100.1:53/udp"
mode = "l2"

[[vip.backend]]
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
"#;

    #[test]
    fn parses_a_full_config() {
        let c = Config::parse("t.toml", GOOD).unwrap();
        assert_eq!(c.interfaces, ["eth0"]);
        assert_eq!(c.xdp_mode, XdpModeSetting::Driver);
        assert_eq!(c.flow_table_size, 4096);
        let c = Config::parse("t.toml", &GOOD.replacen("flow_table_size = 4096", "flow_table_size = 4096\nflood_guard = 500", 1)).unwrap();
        assert_eq!(c.flood_guard, 500);
        let c = Config::parse("t.toml", &GOOD.replacen("flow_table_size = 4096", "flow_table_size = 4096\nsource_flow_limit = 20", 1)).unwrap();
        assert_eq!(c.source_flow_limit, 20);
        assert_eq!(c.admin_listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.vips[0].name, "web");
        assert_eq!(c.vips[0].backends[1], BackendConfig { name: "10.0.0.12".into(), addr: "10.0.0.12".parse().unwrap(), weight: 3, mac: None });
        assert_eq!(c.vips[1].mode, ForwardMode::L2);
        assert_eq!(c.vips[1].proto, PROTO_UDP);
        assert_eq!(c.vips[1].backends[0].mac, Some([2, 0, 0, 0, 0, 0x11]));
        assert_eq!(c.vips[1].spec(), "10.0.100.1:53/udp");
    }

    /// (change to GOOD, expected line, expected message fragment)
    fn check(edit: (&str, &str), line: Option<usize>, fragment: &str) {
        assert!(GOOD.contains(edit.0), "bad edit {edit:?}");
        let text = GOOD.replacen(edit.0, edit.1, 1);
        let err = Config::parse("t.toml", &text).expect_err(&text);
        assert_eq!(err.line, line, "{err}");
        assert!(err.message.contains(fragment), "{err} does not mention {fragment:?}");
        assert!(err.to_string().starts_with("t.toml"), "{err}");
    }

    #[test]
    fn errors_name_the_line() {
        check(("xdp_mode = \"driver\"", "xdp_mod = \"driver\""), Some(3), "unknown field");
        check(("xdp_mode = \"driver\"", "xdp_mode = \"fast\""), Some(3), "expected driver, skb or auto");
        check(("flow_table_size = 4096", "flow_table_size = 10"), Some(4), "out of range");
        check(("flow_table_size = 4096", "flow_table_size = \"big\""), Some(4), "invalid type");
        check(("flow_table_size = 4096", "flow_table_size = 4096\nflood_guard = -1"), Some(5), "out of range");
        check(("flow_table_size = 4096", "flow_table_size = 4096\nflood_guard = 5000000000"), Some(5), "out of range");
        check(("flow_table_size = 4096", "flow_table_size = 4096\nsource_flow_limit = -5"), Some(5), "source_flow_limit -5 is out of range");
        check(("listen = \"127.0.0.1:9999\"", "listen = \"localhost\""), Some(7), "not an address:port");
        check(("vip = \"10.0.100.1:80/tcp\"", "vip = \"10.0.100.1:80/sctp\""), Some(11), "neither tcp nor udp");
        check(("vip = \"10.0.100.1:80/tcp\"", "vip = \"10.0.100.1/tcp\""), Some(11), "address:port/protocol");
        check(("vip = \"10.0.100.1:80/tcp\"", "vip = \"10.0.100.1:0/tcp\""), Some(11), "port 0");
        check(("vip = \"10.0.100.1:53/udp\"", "vip = \"10.0.100.1:80/tcp\""), Some(22), "already defined at line 11");
        check(("address = \"10.0.0.11\"", "address = \"10.0.0.300\""), Some(15), "not an IPv4 address");
        check(("address = \"10.0.0.12\"", "address = \"10.0.0.11\""), Some(18), "already listed for this VIP at line 15");
        check(("weight = 3", "weight = 300"), Some(19), "out of range 0..=256");
        check(("weight = 3", "weight = -1"), Some(19), "out of range");
        check(("mac = \"02:00:00:00:00:11\"", "mac = \"02:00\""), Some(27), "not a MAC address");
        check(("name = \"web1\"", "name = \"web1\"\nfoo = 1"), Some(15), "unknown field");
        // Duplicate key: a TOML error, located.
        check(("xdp_mode = \"driver\"", "xdp_mode = \"driver\"\nxdp_mode = \"skb\""), Some(4), "duplicate");
        check(("interfaces = [\"eth0\"]", "interfaces = []"), Some(2), "interfaces is empty");
        check(("interfaces = [\"eth0\"]", "interfaces = [\"eth0\", \"eth0\"]"), Some(2), "listed twice");
        check(("[admin]", "[admin"), Some(6), "");
    }

    #[test]
    fn mac_only_for_l2_and_backends_required() {
        let text = GOOD.replacen("name = \"web1\"", "name = \"web1\"\nmac = \"02:00:00:00:00:01\"", 1);
        let err = Config::parse("t.toml", &text).unwrap_err();
        assert_eq!(err.line, Some(15));
        assert!(err.message.contains("only used by l2"));
        let err = Config::parse("t.toml", "interfaces = [\"eth0\"]\n[[vip]]\nvip = \"1.2.3.4:80/tcp\"\n").unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("no [[vip.backend]]"));
    }

    #[test]
    fn health_section() {
        let base = "interfaces = [\"eth0\"]\n[health]\n";
        let c = Config::parse("t.toml", &format!("{base}check = \"http\"\ninterval_ms = 500\nrise = 1\n")).unwrap();
        let h = c.health.unwrap();
        assert!(h.http);
        assert_eq!((h.interval_ms, h.fast_interval_ms, h.timeout_ms, h.rise, h.fall), (500, 500, 500, 1, 3));
        assert_eq!((h.path.as_str(), h.expect_status, h.port), ("/healthz", 200, None));
        let c = Config::parse("t.toml", &format!("{base}check = \"tcp\"\nport = 8080\n")).unwrap();
        assert_eq!(c.health.unwrap().port, Some(8080));
        assert_eq!(Config::parse("t.toml", "interfaces = [\"eth0\"]\n").unwrap().health, None);
        for (body, line, fragment) in [
            ("check = \"icmp\"\n", 3, "expected tcp or http"),
            ("check = \"tcp\"\npath = \"/x\"\n", 4, "only used by check"),
            ("check = \"http\"\nfall = 0\n", 4, "fall 0 is out of range"),
            ("check = \"http\"\ninterval_ms = 1\n", 4, "out of range"),
            ("check = \"http\"\npath = \"healthz\"\n", 4, "must start with /"),
            ("check = \"http\"\nretries = 3\n", 4, "unknown field"),
            ("check = \"http\"\non_marked_down = \"kill\"\n", 4, "expected shutdown-sessions or none"),
        ] {
            let err = Config::parse("t.toml", &format!("{base}{body}")).unwrap_err();
            assert_eq!(err.line, Some(line), "{err}");
            assert!(err.message.contains(fragment), "{err}");
        }
    }

    #[test]
    fn vip_allow_lists() {
        let c = Config::parse("t.toml", &GOOD.replacen("vip = \"10.0.100.1:80/tcp\"", "vip = \"10.0.100.1:80/tcp\"\nallow = [\"192.168.0.0/16\", \"10.0.0.0/8\"]", 1)).unwrap();
        assert_eq!(c.vips[0].allow, ["10.0.0.0/8".parse().unwrap(), "192.168.0.0/16".parse().unwrap()]);
        assert!(c.vips[1].allow.is_empty());
        check(("vip = \"10.0.100.1:80/tcp\"", "vip = \"10.0.100.1:80/tcp\"\nallow = [\"10.0.0.1/8\"]"), Some(12), "did you mean 10.0.0.0/8");
        check(("vip = \"10.0.100.1:80/tcp\"", "vip = \"10.0.100.1:80/tcp\"\nallow = [\"10.0.0.0/8\", \"10.0.0.0/8\"]"), Some(12), "lists 10.0.0.0/8 twice");
    }

    #[test]
    fn sync_section() {
        let with = |body: &str| GOOD.replacen("[[vip]]", &format!("[sync]\n{body}\n[[vip]]"), 1);
        let ok = "listen = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\", \"10.0.0.4:7000\"]\nsecret_file = \"/etc/lbd/sync.key\"";
        let c = Config::parse("t.toml", &with(ok)).unwrap();
        let s = c.sync.unwrap();
        assert_eq!(s.listen, "10.0.0.2:7946".parse().unwrap());
        assert_eq!(s.peers, ["10.0.0.3:7946".parse().unwrap(), "10.0.0.4:7000".parse().unwrap()]);
        assert_eq!((s.secret_file.to_str(), s.interval_ms), (Some("/etc/lbd/sync.key"), DEFAULT_SYNC_INTERVAL_MS));
        assert!(Config::parse("t.toml", GOOD).unwrap().sync.is_none());
        // The [sync] header is line 9, its keys lines 10-12 (13 for a fourth).
        for (body, line, fragment) in [
            (ok.replace("10.0.0.2:7946", "10.0.0.2"), 10, "sync listen \"10.0.0.2\" is not an IPv4 address:port"),
            (ok.replace("\"10.0.0.4:7000\"", "\"10.0.0.2:7000\""), 11, "sync peer 10.0.0.2:7000 is this balancer's own listen address"),
            (ok.replace("10.0.0.4:7000", "10.0.0.3:7000"), 11, "sync peer 10.0.0.3 listed twice"),
            (ok.replace("[\"10.0.0.3:7946\", \"10.0.0.4:7000\"]", "[]"), 11, "sync peers is empty"),
            (ok.replace("/etc/lbd/sync.key", "sync.key"), 12, "must be an absolute path"),
            (format!("{ok}\ninterval_ms = 5"), 13, "sync interval_ms 5 is out of range"),
            (format!("{ok}\nintervall_ms = 50"), 13, "unknown field"),
            (ok.replace("secret_file", "secret"), 12, "unknown field"),
        ] {
            let err = Config::parse("t.toml", &with(&body)).expect_err(&body);
            assert_eq!(err.line, Some(line), "{err}");
            assert!(err.message.contains(fragment), "{err} does not mention {fragment:?}");
        }
    }

    #[test]
    fn announce_section() {
        let with = |body: &str| GOOD.replacen("[[vip]]", &format!("[announce]\n{body}\n[[vip]]"), 1);
        let a = Config::parse("t.toml", &with("table = 100")).unwrap().announce.unwrap();
        assert_eq!(a, AnnounceSettings { table: 100, withdraw_wait_ms: DEFAULT_WITHDRAW_WAIT_MS });
        let a = Config::parse("t.toml", &with("table = 7\nwithdraw_wait_ms = 0")).unwrap().announce.unwrap();
        assert_eq!(a, AnnounceSettings { table: 7, withdraw_wait_ms: 0 });
        assert!(Config::parse("t.toml", GOOD).unwrap().announce.is_none());
        for (body, line, fragment) in [
            ("table = 254", 10, "the kernel's default, main or local table"),
            ("table = 0", 10, "out of range"),
            ("table = 100\nwithdraw_wait_ms = 70000", 11, "withdraw_wait_ms 70000 is out of range"),
            ("withdraw_wait_ms = 10", 9, "missing field `table`"),
        ] {
            let err = Config::parse("t.toml", &with(body)).expect_err(body);
            assert_eq!(err.line, Some(line), "{err}");
            assert!(err.message.contains(fragment), "{err} does not mention {fragment:?}");
        }
    }

    #[test]
    fn firewall_section() {
        let dir = std::env::temp_dir().join(format!("lbd-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let drop_list = dir.join("drop.txt");
        std::fs::write(&drop_list, "; Spamhaus DROP List\n1.10.16.0/20 ; SBL256894\n\n203.0.113.0/24 # again, same verdict\n  198.18.0.0/15\n").unwrap();
        let bad_list = dir.join("bad.txt");
        std::fs::write(&bad_list, "1.10.16.0/20\n1.10.16.1/20 ; SBL1\n").unwrap();
        let allow_list = dir.join("allow.txt");
        std::fs::write(&allow_list, "1.10.16.0/20\n").unwrap();
        let fw = |body: &str| GOOD.replacen("[[vip]]", &format!("[firewall]\n{body}\n[[vip]]"), 1);
        let rule = |p: &str, allow| Rule { prefix: p.parse().unwrap(), allow };

        let c = Config::parse("t.toml", &fw(&format!(
            "deny = [\"203.0.113.0/24\", \"0.0.0.0/0\"]\nallow = [\"10.0.0.0/8\", \"203.0.113.9\"]\ndeny_files = [\"{}\"]",
            drop_list.display()
        )))
        .unwrap();
        assert_eq!(
            c.firewall,
            [
                rule("0.0.0.0/0", false),
                rule("1.10.16.0/20", false),
                rule("10.0.0.0/8", true),
                rule("198.18.0.0/15", false),
                rule("203.0.113.0/24", false),
                rule("203.0.113.9/32", true)
            ]
        );
        assert!(Config::parse("t.toml", GOOD).unwrap().firewall.is_empty());

        // The [firewall] header is line 9, its first key line 10.
        for (body, line, fragment) in [
            ("deny = [\"10.1.2.3/8\"]".to_string(), 10, "did you mean 10.0.0.0/8"),
            ("deny = [\"nope\"]".into(), 10, "expected an IPv4 address or prefix"),
            ("deny = [\"1.2.3.0/24\"]\nallow = [\n  \"1.2.3.0/24\",\n]".into(), 12, "allowed here but denied at line 10"),
            ("deny = [\"10.0.0.0/16\"]".into(), 17, "backend 10.0.0.11 is denied by the firewall rule 10.0.0.0/16 (line 10)"),
            ("reject = []".into(), 10, "unknown field"),
            ("deny_files = [\"drop.txt\"]".into(), 10, "must be an absolute path"),
            (format!("deny_files = [\"{}\"]", dir.join("missing").display()), 10, "cannot read the prefix list"),
        ] {
            let err = Config::parse("t.toml", &fw(&body)).unwrap_err();
            assert_eq!((err.file.as_str(), err.line), ("t.toml", Some(line)), "{err}");
            assert!(err.message.contains(fragment), "{err}");
        }
        // Errors in a list file name the list file and its line.
        let err = Config::parse("t.toml", &fw(&format!("deny_files = [\"{}\"]", bad_list.display()))).unwrap_err();
        assert_eq!((err.file.as_str(), err.line), (bad_list.to_str().unwrap(), Some(2)), "{err}");
        assert!(err.message.contains("did you mean 1.10.16.0/20"), "{err}");
        let err = Config::parse("t.toml", &fw(&format!("deny_files = [\"{}\"]\nallow_files = [\"{}\"]", drop_list.display(), allow_list.display()))).unwrap_err();
        assert_eq!((err.file.as_str(), err.line), (allow_list.to_str().unwrap(), Some(1)), "{err}");
        assert!(err.message.contains(&format!("allowed here but denied at {} line 2", drop_list.display())), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults() {
        let c = Config::parse("t.toml", "interfaces = [\"eth0\"]\n").unwrap();
        assert_eq!(c.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(c.flow_table_size, lb_common::flow::DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(c.flood_guard, lb_common::flood::DEFAULT_FLOOD_LIMIT);
        assert_eq!(c.source_flow_limit, 0);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN);
        assert!(c.vips.is_empty());
    }
}
