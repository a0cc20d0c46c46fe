//! The balancer's maps, typed. One `Dataplane` owns one loaded copy of `lb_xdp`.

use std::net::Ipv4Addr;

use aya::{
    maps::{lpm_trie::{Key, LpmTrie}, Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{ProgramError, Xdp},
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::{
    backend::{ring_index, Backend, BACKEND_DOWN, MAX_BACKENDS, RING_SIZE},
    encap::LbConfig,
    firewall::{build_dir, rule_index, DirLine, Prefix, Rule, RuleStats, DIR_PER_LINE, MAX_RULES, VERDICT_ALLOW},
    flow::{entry_backend, flow_sets, FlowKey, FlowSet, FlowSlot, FlowValue, DEFAULT_FLOW_TABLE_SIZE},
    stats::{GlobalStats, TrafficStats},
    vip::{addr_filter, allow_key, table::VipTable, ForwardMode, VipKey, VipMeta, VipSlot, MAX_VIPS, MAX_VIP_ALLOW, SLOT_EMPTY, SLOT_TOMBSTONE, VIP_RESTRICTED},
};

use crate::objects;

pub const PROGRAM: &str = "lb_xdp";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("failed to load the balancer object")]
    Load(#[from] EbpfError),
    #[error("failed to load program {PROGRAM} (the verifier log is in the source error)")]
    Program(#[from] ProgramError),
    #[error("map {name}")]
    Map { name: &'static str, #[source] source: MapError },
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("vip number {0} out of range (max {MAX_VIPS})")]
    VipNumber(u32),
    #[error("backend index {0} out of range (max {MAX_BACKENDS})")]
    BackendIndex(u32),
    #[error("ring of {0} slots does not fit (0..={RING_SIZE})")]
    RingLength(usize),
    #[error("no room for VIP {0:?} in its probe window of the VIP table")]
    VipTableCrowded(VipKey),
    #[error("cannot remove the incompatible pin {0}")]
    Pin(std::path::PathBuf, #[source] std::io::Error),
    #[error("devmap insert for ifindex {0} failed: {1}")]
    TxPort(u32, String),
    #[error("cannot map the flow table (FLOWS) into memory")]
    MapFlows(#[source] std::io::Error),
    #[error("cannot count the possible CPUs")]
    Cpus(#[source] std::io::Error),
    #[error("{0} firewall rules: at most {MAX_RULES}")]
    FirewallFull(usize),
    #[error("firewall prefix {0} given twice")]
    FirewallDuplicate(Prefix),
    #[error("{0} allow-list entries over all VIPs: at most {MAX_VIP_ALLOW}")]
    AllowFull(usize),
    #[error("no VIP {0:?} installed")]
    NoVip(VipKey),
}

fn trie_key(p: &Prefix) -> Key<u32> {
    Key::new(u32::from(p.len), u32::from_ne_bytes(p.addr))
}

/// The `VIP_ALLOW` key of VIP `vip_num`'s entry for `p`.
fn allow_trie_key(vip_num: u32, p: &Prefix) -> Key<[u32; 2]> {
    Key::new(32 + u32::from(p.len), allow_key(vip_num, u32::from_ne_bytes(p.addr)))
}

fn key_prefix(k: &Key<u32>) -> Prefix {
    Prefix { addr: k.data().to_ne_bytes(), len: k.prefix_len() as u8 }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Flows the flow table is sized for (it has twice as many slots, see `FlowSet`).
    pub flow_table_size: u32,
    /// Pin every map under this bpffs directory, or reuse the maps already pinned there
    /// (a restarted daemon keeps the flow table, the rings and the counters).
    pub pin_dir: Option<std::path::PathBuf>,
    /// The flow table's hash seed; `None`: random. Balancers that sync their flows
    /// (`crate::sync`) share one.
    pub flow_seed: Option<u64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { flow_table_size: DEFAULT_FLOW_TABLE_SIZE, pin_dir: None, flow_seed: None }
    }
}

/// The balancer's maps, by name (also their pin file names).
pub const MAPS: [&str; 17] = [
    "VIPS",
    "VIP_ADDRS",
    "VIP_ADDR_SET",
    "RINGS",
    "BACKENDS",
    "FLOWS",
    "NEXTHOPS",
    "CONFIG",
    "TX_PORTS",
    "FIREWALL",
    "FIREWALL_DIR",
    "FIREWALL_STATS",
    "SOURCES",
    "VIP_ALLOW",
    "STATS",
    "VIP_STATS",
    "BACKEND_STATS",
];

pub struct Dataplane {
    ebpf: Ebpf,
    vips: Array<MapData, VipSlot>,
    vip_addrs: Array<MapData, u64>,
    /// What `VIP_ADDRS` holds, once written.
    vip_addrs_written: Option<[u64; lb_common::vip::VIP_ADDRS_MAP_WORDS as usize]>,
    /// The firewall has rules: the filter's gate is all ones (see `VIP_ADDRS_MAP_WORDS`).
    firewall_on: bool,
    /// The VIP addresses exactly (read natively), which echo requests are answered.
    vip_addr_set: HashMap<MapData, u32, u32>,
    /// What `vip_addr_set` holds, once written.
    vip_addr_set_written: Option<std::collections::BTreeSet<u32>>,
    /// Where each VIP sits in `vips`.
    vip_table: VipTable,
    rings: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    flows: Array<MapData, FlowSet>,
    config: Array<MapData, LbConfig>,
    tx_ports: DevMapHash<MapData>,
    firewall: LpmTrie<MapData, u32, u32>,
    firewall_dir: Array<MapData, DirLine>,
    /// What `firewall_dir` holds, once written.
    firewall_dir_written: Option<Vec<DirLine>>,
    firewall_stats: PerCpuArray<MapData, RuleStats>,
    vip_allow: LpmTrie<MapData, [u32; 2], u32>,
    /// The allow list of each restricted VIP, by VIP number, as `vip_allow` holds them.
    allow_lists: std::collections::BTreeMap<u32, std::collections::BTreeSet<Prefix>>,
    stats: PerCpuArray<MapData, GlobalStats>,
    vip_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let map = ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Removes the pins under `dir` whose map differs in type, key or value size, flags or
/// (except the flow table, which `init_flow_table` handles) size from this object's map of
/// the same name: pins left by another version of the balancer. Reusing one would fail to
/// load the program, or worse; its state (flows, counters, rings) is lost instead, with a
/// warning, and the daemon rebuilds rings and backends from its configuration.
fn drop_incompatible_pins(object: &[u8], dir: &std::path::Path) -> Result<(), DataplaneError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| DataplaneError::Load(e.into()))?;
    for name in MAPS {
        let path = dir.join(name);
        let Some(def) = obj.maps.get(name) else { continue };
        let Ok(pinned) = aya::maps::MapInfo::from_pin(&path) else { continue };
        let same_type = pinned.map_type().is_ok_and(|t| t as u32 == def.map_type());
        let same_size = name == "FLOWS" || pinned.max_entries() == def.max_entries();
        if same_type
            && same_size
            && pinned.key_size() == def.key_size()
            && pinned.value_size() == def.value_size()
            && pinned.map_flags() == def.map_flags()
        {
            continue;
        }
        tracing::warn!(map = name, path = %path.display(), "pinned map has another layout (left by another version): replacing it, its state is lost");
        std::fs::remove_file(&path).map_err(|e| DataplaneError::Pin(path.clone(), e))?;
    }
    Ok(())
}

impl Dataplane {
    /// Loads the object and the program into the kernel (nothing is attached yet).
    pub fn load(opts: &LoadOptions) -> Result<Self, DataplaneError> {
        Self::load_object(objects::balancer(), opts)
    }

    /// [`Dataplane::load`] from another build of the balancer object with the same maps (the
    /// benchmark compares a baseline build with this one in the same run).
    pub fn load_object(object: &[u8], opts: &LoadOptions) -> Result<Self, DataplaneError> {
        if let Some(dir) = &opts.pin_dir {
            drop_incompatible_pins(object, dir)?;
        }
        let pins: Vec<(&str, std::path::PathBuf)> =
            opts.pin_dir.iter().flat_map(|d| MAPS.iter().map(move |&m| (m, d.join(m)))).collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries("FLOWS", flow_sets(opts.flow_table_size));
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingMap(PROGRAM))?
            .try_into()?;
        prog.load()?;
        let mut dp = Self {
            vips: take(&mut ebpf, "VIPS")?,
            vip_addrs: take(&mut ebpf, "VIP_ADDRS")?,
            vip_addrs_written: None,
            firewall_on: false,
            vip_addr_set: take(&mut ebpf, "VIP_ADDR_SET")?,
            vip_addr_set_written: None,
            vip_table: VipTable::default(),
            rings: take(&mut ebpf, "RINGS")?,
            backends: take(&mut ebpf, "BACKENDS")?,
            flows: take(&mut ebpf, "FLOWS")?,
            config: take(&mut ebpf, "CONFIG")?,
            tx_ports: take(&mut ebpf, "TX_PORTS")?,
            firewall: take(&mut ebpf, "FIREWALL")?,
            firewall_dir: take(&mut ebpf, "FIREWALL_DIR")?,
            firewall_dir_written: None,
            firewall_stats: take(&mut ebpf, "FIREWALL_STATS")?,
            vip_allow: take(&mut ebpf, "VIP_ALLOW")?,
            allow_lists: Default::default(),
            stats: take(&mut ebpf, "STATS")?,
            vip_stats: take(&mut ebpf, "VIP_STATS")?,
            backend_stats: take(&mut ebpf, "BACKEND_STATS")?,
            ebpf,
        };
        dp.init_flow_table(opts.flow_seed)?;
        // A reused trie: what a previous run left (cleared by `set_vip_allow` and the sync).
        for entry in dp.vip_allow.keys() {
            let k = entry.map_err(map_err("VIP_ALLOW"))?;
            let [num, addr] = k.data();
            let prefix = Prefix { addr: addr.to_ne_bytes(), len: (k.prefix_len() - 32) as u8 };
            dp.allow_lists.entry(u32::from_be(num)).or_default().insert(prefix);
        }
        Ok(dp)
    }

    /// Writes the flow table's size and hash seed (`seed`, or a random one) into `CONFIG`,
    /// unless a table reused from the pin directory already has them (a restarted daemon
    /// keeps its flows); a reused table with another seed is cleared.
    fn init_flow_table(&mut self, seed: Option<u64>) -> Result<(), DataplaneError> {
        use std::hash::{BuildHasher, Hasher};
        let mut cfg = self.config.get(&0, 0).map_err(map_err("CONFIG"))?;
        let sets = self.flows.len();
        if cfg.flow_sets == sets && cfg.flow_seed != 0 && seed.is_none_or(|s| s | 1 == cfg.flow_seed) {
            return Ok(());
        }
        if cfg.flow_sets == sets && cfg.flow_seed != 0 {
            tracing::warn!("the reused flow table has another hash seed than the flow sync's: its flows are forgotten");
        }
        // std's SipHash keys come from the OS's random source: a random u64 without a
        // dependency.
        cfg.flow_seed = seed.unwrap_or_else(|| std::collections::hash_map::RandomState::new().build_hasher().finish()) | 1;
        cfg.flow_sets = sets;
        self.clear_flows()?;
        self.config.set(0, cfg, 0).map_err(map_err("CONFIG"))
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf.program(PROGRAM).expect("loaded").try_into().expect("xdp")
    }

    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(PROGRAM).expect("loaded").try_into().expect("xdp")
    }

    /// The balancer's own address: the source of outer IPIP headers.
    pub fn set_encap_source(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        self.update_config(|cfg| {
            cfg.encap_src = addr.octets();
            cfg.generation = cfg.generation.wrapping_add(1);
        })
    }

    /// Reads `CONFIG`, changes it, writes it back.
    fn update_config(&mut self, change: impl FnOnce(&mut LbConfig)) -> Result<(), DataplaneError> {
        let mut cfg = self.config.get(&0, 0).map_err(map_err("CONFIG"))?;
        change(&mut cfg);
        self.config.set(0, cfg, 0).map_err(map_err("CONFIG"))
    }

    /// The SYN flood guard's limit: new TCP flows a CPU pins to one VIP per window before
    /// it places them by hash, without an entry (`lb_common::flood`); 0 turns it off.
    pub fn set_flood_limit(&mut self, limit: u32) -> Result<(), DataplaneError> {
        self.update_config(|cfg| cfg.flood_limit = limit)
    }

    /// The per-source limit: new flows one source address may open per window before its
    /// SYNs and first datagrams are dropped (`lb_common::flood`); 0 turns it off.
    pub fn set_source_limit(&mut self, limit: u32) -> Result<(), DataplaneError> {
        self.update_config(|cfg| cfg.source_limit = limit)
    }

    /// Bumps `LbConfig::generation`: the program asks the FIB again for every backend (after
    /// route or neighbour changes; entries also expire after `NEXTHOP_BUDGET` packets) and
    /// re-reads every cached flow from the flow table. The daemon does it every second.
    pub fn invalidate_next_hops(&mut self) -> Result<(), DataplaneError> {
        self.update_config(|cfg| cfg.generation = cfg.generation.wrapping_add(1))
    }

    /// Allows XDP_REDIRECT out of `ifindex`.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| DataplaneError::TxPort(ifindex, e.to_string()))
    }

    pub fn set_backend(&mut self, index: u32, addr: Ipv4Addr, mac: [u8; 6]) -> Result<(), DataplaneError> {
        if index >= MAX_BACKENDS {
            return Err(DataplaneError::BackendIndex(index));
        }
        let b = Backend { addr: addr.octets(), mac, flags: 0, _pad: 0 };
        self.backends.set(index, b, 0).map_err(map_err("BACKENDS"))
    }

    /// Marks a backend down (or up again). Take it out of its VIPs' rings first: flows still
    /// pinned to a down backend are re-steered by the program, over the rings as they are.
    /// Also bumps the generation (every CPU asks the FIB again for its next hops).
    pub fn set_backend_down(&mut self, index: u32, down: bool) -> Result<(), DataplaneError> {
        if index >= MAX_BACKENDS {
            return Err(DataplaneError::BackendIndex(index));
        }
        let mut b = self.backends.get(&index, 0).map_err(map_err("BACKENDS"))?;
        b.flags = if down { b.flags | BACKEND_DOWN } else { b.flags & !BACKEND_DOWN };
        self.backends.set(index, b, 0).map_err(map_err("BACKENDS"))?;
        self.invalidate_next_hops()
    }

    /// Installs or replaces a VIP with its ring of backend indexes (see
    /// `lb_common::ring::build`). The ring goes into the VIP's inactive ring, then one word of
    /// the VIP entry switches to it: the program sees the old ring or the new one, never a
    /// mix. An empty ring is a VIP without backends: its packets are dropped and counted.
    pub fn set_vip(&mut self, key: VipKey, vip_num: u32, mode: ForwardMode, ring: &[u32]) -> Result<(), DataplaneError> {
        if vip_num >= MAX_VIPS {
            return Err(DataplaneError::VipNumber(vip_num));
        }
        if ring.len() > RING_SIZE as usize {
            return Err(DataplaneError::RingLength(ring.len()));
        }
        if let Some(&b) = ring.iter().find(|&&b| b >= MAX_BACKENDS) {
            return Err(DataplaneError::BackendIndex(b));
        }
        let (slot, new) = self.vip_table.place(&key).map_err(|_| DataplaneError::VipTableCrowded(key))?;
        // The address filter lets the VIP's packets through before the VIP exists.
        self.write_addr_filter()?;
        let current = self.vips.get(&slot, 0).map_err(map_err("VIPS"))?;
        let half = if new { 0 } else { current.meta.ring_half() ^ 1 };
        for (i, &backend) in ring.iter().enumerate() {
            self.rings.set(ring_index(vip_num, half, i as u32), backend, 0).map_err(map_err("RINGS"))?;
        }
        let meta = VipMeta { vip_num, ring: VipMeta::ring_word(ring.len() as u32, half), mode: mode as u32, flags: self.vip_flags(vip_num) };
        if new {
            // First the metadata under the old (free) key, then the key: a concurrent reader
            // sees either no VIP or the whole VIP, never the key with stale metadata.
            self.vips.set(slot, VipSlot { key: current.key, meta }, 0).map_err(map_err("VIPS"))?;
        }
        self.vips.set(slot, VipSlot { key: key.packed(), meta }, 0).map_err(map_err("VIPS"))
    }

    /// [`Dataplane::set_vip`] with the VIP's allow list: only sources one of `allow` holds
    /// reach it, the others are dropped; empty: every source. (`set_vip` keeps the list a
    /// VIP has.)
    pub fn set_vip_allow(&mut self, key: VipKey, vip_num: u32, mode: ForwardMode, ring: &[u32], allow: &[Prefix]) -> Result<(), DataplaneError> {
        if vip_num >= MAX_VIPS {
            return Err(DataplaneError::VipNumber(vip_num));
        }
        let removed = self.stage_allow(vip_num, allow)?;
        self.set_vip(key, vip_num, mode, ring)?;
        self.unstage_allow(vip_num, &removed)
    }

    /// Changes the allow list of an installed VIP (see [`Dataplane::set_vip_allow`]).
    pub fn set_allow(&mut self, key: &VipKey, allow: &[Prefix]) -> Result<(), DataplaneError> {
        let slot = self.vip_table.find(key).ok_or(DataplaneError::NoVip(*key))?;
        let current = self.vips.get(&slot, 0).map_err(map_err("VIPS"))?;
        let vip_num = current.meta.vip_num;
        let removed = self.stage_allow(vip_num, allow)?;
        let meta = VipMeta { flags: self.vip_flags(vip_num), ..current.meta };
        self.vips.set(slot, VipSlot { key: current.key, meta }, 0).map_err(map_err("VIPS"))?;
        self.unstage_allow(vip_num, &removed)
    }

    fn vip_flags(&self, vip_num: u32) -> u32 {
        if self.allow_lists.contains_key(&vip_num) { VIP_RESTRICTED } else { 0 }
    }

    /// The first half of an allow-list change: new entries into the trie and the list
    /// recorded (the VIP is written with its flag next); returns the entries to remove
    /// after that write, so that no allowed source is dropped on the way.
    fn stage_allow(&mut self, vip_num: u32, allow: &[Prefix]) -> Result<Vec<Prefix>, DataplaneError> {
        let wanted: std::collections::BTreeSet<Prefix> = allow.iter().copied().collect();
        let old = self.allow_lists.get(&vip_num).cloned().unwrap_or_default();
        let total = self.allow_lists.iter().filter(|(&n, _)| n != vip_num).map(|(_, l)| l.len()).sum::<usize>() + wanted.len();
        if total > MAX_VIP_ALLOW as usize {
            return Err(DataplaneError::AllowFull(total));
        }
        for p in wanted.difference(&old) {
            self.vip_allow.insert(&allow_trie_key(vip_num, p), 1, 0).map_err(map_err("VIP_ALLOW"))?;
        }
        let removed = old.difference(&wanted).copied().collect();
        if wanted.is_empty() {
            self.allow_lists.remove(&vip_num);
        } else {
            self.allow_lists.insert(vip_num, wanted);
        }
        Ok(removed)
    }

    fn unstage_allow(&mut self, vip_num: u32, removed: &[Prefix]) -> Result<(), DataplaneError> {
        for p in removed {
            self.vip_allow.remove(&allow_trie_key(vip_num, p)).map_err(map_err("VIP_ALLOW"))?;
        }
        Ok(())
    }

    /// Drops the allow-list entries of VIP numbers no VIP has (left in a reused trie by a
    /// previous run, or by a VIP removed).
    fn prune_allow_lists(&mut self) -> Result<(), DataplaneError> {
        let live: std::collections::BTreeSet<u32> = (0..lb_common::vip::VIP_TABLE_SIZE)
            .filter(|&slot| {
                let k = self.vip_table.key_at(slot);
                k != SLOT_EMPTY && k != SLOT_TOMBSTONE
            })
            .filter_map(|slot| self.vips.get(&slot, 0).ok().map(|s| s.meta.vip_num))
            .collect();
        let gone: Vec<u32> = self.allow_lists.keys().copied().filter(|n| !live.contains(n)).collect();
        for n in gone {
            for p in self.allow_lists.remove(&n).unwrap_or_default() {
                self.vip_allow.remove(&allow_trie_key(n, &p)).map_err(map_err("VIP_ALLOW"))?;
            }
        }
        Ok(())
    }

    /// The allow list of VIP `vip_num` (empty: every source).
    pub fn vip_allow_list(&self, vip_num: u32) -> Vec<Prefix> {
        self.allow_lists.get(&vip_num).map(|l| l.iter().copied().collect()).unwrap_or_default()
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        if let Some(slot) = self.vip_table.remove(key) {
            let tomb = VipSlot { key: self.vip_table.key_at(slot), meta: VipMeta::default() };
            self.vips.set(slot, tomb, 0).map_err(map_err("VIPS"))?;
            self.write_addr_filter()?;
            self.prune_allow_lists()?;
        }
        Ok(())
    }

    /// Writes the exact VIP address filter once every VIP is in place (the first write keeps
    /// the bits a reused map had: see `write_addr_filter`).
    pub fn sync_addr_filter(&mut self) -> Result<(), DataplaneError> {
        self.prune_allow_lists()?;
        self.write_addr_filter()
    }

    /// Writes the VIP address filter for the VIPs of the table (see
    /// `lb_common::vip::VIP_ADDR_FILTER_WORDS`), and the gate in front of it (the same
    /// words, or all ones while the firewall has rules: `VIP_ADDRS_MAP_WORDS`): the words
    /// that changed, and every word the first time (which clears bits that a previous run
    /// left in a pinned map).
    fn write_addr_filter(&mut self) -> Result<(), DataplaneError> {
        // The addresses as the program reads them (native words of the address bytes, which
        // are a packed key's first four).
        let set: std::collections::BTreeSet<u32> = (0..lb_common::vip::VIP_TABLE_SIZE)
            .map(|slot| self.vip_table.key_at(slot))
            .filter(|&k| k != SLOT_EMPTY && k != SLOT_TOMBSTONE)
            .map(|k| {
                let b = k.to_ne_bytes();
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
            })
            .collect();
        let filter = addr_filter(set.iter().map(|a| a.to_ne_bytes()));
        let mut words = [0u64; lb_common::vip::VIP_ADDRS_MAP_WORDS as usize];
        for (i, &w) in filter.iter().enumerate() {
            let gate = lb_common::vip::gate_word(i as u32 * 64) as usize;
            words[gate] = if self.firewall_on { u64::MAX } else { w };
            words[gate + 1] = w;
        }
        // New addresses into the exact set before the filter lets their packets through, gone
        // ones out of it after.
        let old = match self.vip_addr_set_written.take() {
            Some(old) => old,
            // The first time: whatever a previous run left in a pinned map.
            None => self.vip_addr_set.keys().collect::<Result<_, _>>().map_err(map_err("VIP_ADDR_SET"))?,
        };
        for &a in set.difference(&old) {
            self.vip_addr_set.insert(a, 1, 0).map_err(map_err("VIP_ADDR_SET"))?;
        }
        if self.vip_addrs_written.is_none() {
            // The first write: a map reused from the pin directory still serves the running
            // program, and its VIPs come back one by one; keep the bits it has until
            // `sync_addr_filter` (after the last VIP) writes the exact words.
            for (i, w) in words.iter_mut().enumerate() {
                *w |= self.vip_addrs.get(&(i as u32), 0).map_err(map_err("VIP_ADDRS"))?;
            }
        }
        for (i, &w) in words.iter().enumerate() {
            if self.vip_addrs_written.is_none_or(|old| old[i] != w) {
                self.vip_addrs.set(i as u32, w, 0).map_err(map_err("VIP_ADDRS"))?;
            }
        }
        self.vip_addrs_written = Some(words);
        for a in old.difference(&set) {
            self.vip_addr_set.remove(a).map_err(map_err("VIP_ADDR_SET"))?;
        }
        self.vip_addr_set_written = Some(set);
        Ok(())
    }

    /// The firewall's rules as the trie holds them, with each one's counter index.
    fn firewall_entries(&self) -> Result<std::collections::BTreeMap<Prefix, u32>, DataplaneError> {
        self.firewall.iter().map(|e| e.map(|(k, v)| (key_prefix(&k), v))).collect::<Result<_, _>>().map_err(map_err("FIREWALL"))
    }

    /// Makes `rules` the firewall's rules. A rule kept (same prefix and verdict) keeps its
    /// counters; a new one starts from zero. New and changed rules go into the trie first,
    /// then the direct table is rewritten (the lines that changed), then the program is told
    /// how many rules there are, and removed rules leave the trie last: no table entry
    /// points at a rule the trie lacks, and a packet meets the old rules or the new ones for
    /// each prefix. The count only says whether to look at all.
    pub fn set_firewall(&mut self, rules: &[Rule]) -> Result<(), DataplaneError> {
        if rules.len() > MAX_RULES as usize {
            return Err(DataplaneError::FirewallFull(rules.len()));
        }
        let mut wanted = std::collections::BTreeMap::new();
        for r in rules {
            if wanted.insert(r.prefix, r.allow).is_some() {
                return Err(DataplaneError::FirewallDuplicate(r.prefix));
            }
        }
        let current = self.firewall_entries()?;
        let kept = |p: &Prefix, allow: bool| current.get(p).filter(|&&v| (v & VERDICT_ALLOW != 0) == allow).copied();
        let used: std::collections::BTreeSet<u32> = wanted.iter().filter_map(|(p, &allow)| kept(p, allow)).map(rule_index).collect();
        let mut free = (0..MAX_RULES).filter(|i| !used.contains(i));
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        // Every wanted rule with its trie value, for the direct table.
        let mut values: Vec<(Prefix, u32)> = Vec::with_capacity(wanted.len());
        for (p, &allow) in &wanted {
            if let Some(value) = kept(p, allow) {
                values.push((*p, value));
                continue;
            }
            let index = free.next().expect("no more rules than indexes");
            let zero = PerCpuValues::try_from(vec![RuleStats::default(); cpus]).map_err(DataplaneError::Cpus)?;
            self.firewall_stats.set(index, zero, 0).map_err(map_err("FIREWALL_STATS"))?;
            let value = index | if allow { VERDICT_ALLOW } else { 0 };
            self.firewall.insert(&trie_key(p), value, 0).map_err(map_err("FIREWALL"))?;
            values.push((*p, value));
        }
        let dir = build_dir(&values);
        let lines: Vec<DirLine> = dir
            .chunks(DIR_PER_LINE as usize)
            .map(|c| DirLine { entries: c.try_into().expect("whole lines") })
            .collect();
        for (i, line) in lines.iter().enumerate() {
            // Every line the first time: clears what a previous run left in a pinned map.
            if self.firewall_dir_written.as_ref().is_none_or(|old| old[i] != *line) {
                self.firewall_dir.set(i as u32, *line, 0).map_err(map_err("FIREWALL_DIR"))?;
            }
        }
        self.firewall_dir_written = Some(lines);
        // Turned on: the count first, then the gate opens; turned off: the gate first.
        let on = !wanted.is_empty();
        if on {
            self.update_config(|cfg| cfg.firewall_rules = wanted.len() as u32)?;
        }
        if on != self.firewall_on {
            self.firewall_on = on;
            self.write_addr_filter()?;
        }
        if !on {
            self.update_config(|cfg| cfg.firewall_rules = 0)?;
        }
        for p in current.keys().filter(|p| !wanted.contains_key(p)) {
            self.firewall.remove(&trie_key(p)).map_err(map_err("FIREWALL"))?;
        }
        Ok(())
    }

    /// Each firewall rule with what it decided (summed over CPUs), by prefix.
    pub fn firewall_stats(&self) -> Result<Vec<(Rule, RuleStats)>, DataplaneError> {
        self.firewall_entries()?
            .into_iter()
            .map(|(prefix, v)| {
                let per_cpu = self.firewall_stats.get(&rule_index(v), 0).map_err(map_err("FIREWALL_STATS"))?;
                let mut sum = RuleStats::default();
                for s in per_cpu.iter() {
                    sum += *s;
                }
                Ok((Rule { prefix, allow: v & VERDICT_ALLOW != 0 }, sum))
            })
            .collect()
    }

    /// Where the flow table pins `key`, if it holds the flow.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        let cfg = self.config.get(&0, 0).ok()?;
        let slot = FlowSlot::new(key.hash64(cfg.flow_seed), cfg.flow_sets);
        let set = self.flows.get(&slot.set, 0).ok()?;
        set.find(&slot).map(|(_, e)| FlowValue { backend: entry_backend(e), _pad: 0 })
    }

    /// The flow table mapped into our memory, for the flow sync (`crate::sync`).
    pub fn flow_table(&self) -> Result<crate::sync::FlowTable, DataplaneError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self.flows.map().fd().as_fd();
        crate::sync::FlowTable::map(fd, self.flows.len()).map_err(DataplaneError::MapFlows)
    }

    /// Forgets every pinned flow (as a restart without state would).
    pub fn clear_flows(&mut self) -> Result<(), DataplaneError> {
        for i in 0..self.flows.len() {
            self.flows.set(i, FlowSet::default(), 0).map_err(map_err("FLOWS"))?;
        }
        Ok(())
    }

    /// Global counters summed over CPUs.
    pub fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err("STATS"))?;
        Ok(GlobalStats::sum(per_cpu.iter()))
    }

    pub fn vip_stats(&self, vip_num: u32) -> Result<TrafficStats, DataplaneError> {
        sum_traffic(&self.vip_stats, vip_num, "VIP_STATS")
    }

    pub fn backend_stats(&self, index: u32) -> Result<TrafficStats, DataplaneError> {
        sum_traffic(&self.backend_stats, index, "BACKEND_STATS")
    }
}

fn sum_traffic(map: &PerCpuArray<MapData, TrafficStats>, index: u32, name: &'static str) -> Result<TrafficStats, DataplaneError> {
    let per_cpu = map.get(&index, 0).map_err(map_err(name))?;
    let mut sum = TrafficStats::default();
    for s in per_cpu.iter() {
        sum += *s;
    }
    Ok(sum)
}
