//! The load balancer: steers each new flow of a VIP round-robin to a backend, pins the flow
//! there, and forwards with direct server return (IPIP, or L2 rewrite). Packets that are
//! not for a VIP leave untouched with XDP_PASS. The program never loops over backends:
//! userspace builds each VIP's ring and the kernel only indexes it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    backend::{eth_macs, ring_index, round_robin_slot, Backend, NextHop, MAX_BACKENDS, NEXTHOP_BUDGET, RING_SIZE},
    encap::{outer_ipv4_words, outer_len, LbConfig, IPIP_OVERHEAD},
    csum::{self, halves},
    firewall::{denies, dir_block, dir_value, rule_index, DirLine, RuleStats, DIR_LINES, DIR_NONE, DIR_PER_LINE, DIR_TRIE, MAX_RULES},
    flood::{admit, HASH_NEW_FLOWS, SOURCE_TABLE_SIZE},
    flow::{entry_backend, entry_fresh, flow_sets, FlowSet, FlowSlot, Tuple, DEFAULT_FLOW_TABLE_SIZE, FLOW_WAYS},
    icmp::{answerable, quote_len, swap_macs, too_big_words, MAX_QUOTE_WORDS, REPLY_TTL, TOO_BIG_OVERHEAD},
    packet::{parse_icmp, parse_ipv4, parse_l2, parse_l4, Frame, IcmpToVip, Ipv4, Parsed, ICMP_ECHO_REPLY, PROTO_ICMP, TCP_RST},
    stats::{Counter, GlobalStats, TrafficStats},
    vip::{addr_filter_bit, allow_key, find_packed_vip, gate_word, pack, VipSlot, MAX_VIPS, MAX_VIP_ALLOW, PROTO_TCP, VIP_ADDRS_MAP_WORDS, VIP_TABLE_SIZE},
};
use lb_ebpf::{adjust_head, write_eth, XdpFrame};

/// Open-addressing table of VIPs (see `lb_common::vip::find_vip`).
#[map]
static VIPS: Array<VipSlot> = Array::with_max_entries(VIP_TABLE_SIZE, 0);
/// Bitmaps of the hashes of VIP addresses (see `lb_common::vip::addr_filter_bit`): the gate
/// and the filter proper (see `lb_common::vip::VIP_ADDRS_MAP_WORDS`).
#[map]
static VIP_ADDRS: Array<u64> = Array::with_max_entries(VIP_ADDRS_MAP_WORDS, 0);
/// The VIP addresses, exactly (the filter above has false positives): which echo requests
/// are answered.
#[map]
static VIP_ADDR_SET: HashMap<u32, u32> = HashMap::with_max_entries(MAX_VIPS, 0);
/// Two rings of `RING_SIZE` backend indexes per VIP (active and next), flat.
#[map]
static RINGS: Array<u32> = Array::with_max_entries(MAX_VIPS * 2 * RING_SIZE, 0);
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Pinned flows: a set-associative table shared by every CPU (see `FlowSet`); userspace
/// sizes it and writes its size and hash seed into `CONFIG`. Mmapable, so that its values
/// start on a page and every 64-byte set is one cache line.
#[map]
static FLOWS: Array<FlowSet> = Array::with_max_entries(flow_sets(DEFAULT_FLOW_TABLE_SIZE), BPF_F_MMAPABLE);
/// Per-CPU cache of FIB answers, by backend index.
#[map]
static NEXTHOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);
/// Egress interfaces for XDP_REDIRECT, keyed by ifindex.
#[map]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);
/// Firewall rules by source prefix: the rule's index into `FIREWALL_STATS`, with
/// `firewall::VERDICT_ALLOW` for an allow rule (see `lb_common::firewall`).
#[map]
static FIREWALL: LpmTrie<u32, u32> = LpmTrie::with_max_entries(MAX_RULES, 0);
/// The firewall's direct table of /16 blocks, asked before the trie (see
/// `lb_common::firewall`).
#[map]
static FIREWALL_DIR: Array<DirLine> = Array::with_max_entries(DIR_LINES, 0);
#[map]
static FIREWALL_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_RULES, 0);
/// The allow lists of restricted VIPs (`lb_common::vip::allow_key`).
#[map]
static VIP_ALLOW: LpmTrie<[u32; 2], u32> = LpmTrie::with_max_entries(MAX_VIP_ALLOW, 0);
/// The per-source limit's counts (`lb_common::flood`), by source address.
#[map]
static SOURCES: LruHashMap<u32, u64> = LruHashMap::with_max_entries(SOURCE_TABLE_SIZE, 0);
#[map]
static STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);
#[map]
static VIP_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

const AF_INET: u8 = 2;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Zeroes a FIB lookup parameter block in place with eight 8-byte stores. `mem::zeroed()`
/// (or any by-value copy of a zeroed block) compiles to a call of a byte-by-byte `memset`
/// subprogram, which cost more than the rest of the packet's work.
#[inline(always)]
fn zero_fib(fib: &mut core::mem::MaybeUninit<bpf_fib_lookup>) -> &mut bpf_fib_lookup {
    let words = fib.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < core::mem::size_of::<bpf_fib_lookup>() / 8 {
        // SAFETY: in bounds of the 64-byte block; volatile keeps LLVM from making a memset.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte was written above; the type is plain old data.
    unsafe { fib.assume_init_mut() }
}
const _: () = assert!(core::mem::size_of::<bpf_fib_lookup>() == 64);

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let Some(stats) = STATS.get_ptr_mut(0) else { return xdp_action::XDP_PASS };
    // SAFETY: per-CPU value; XDP programs do not nest on a CPU.
    let stats = unsafe { &mut *stats };
    process(&ctx, stats)
}

#[inline(always)]
fn bump(stats: &mut GlobalStats, c: Counter) {
    stats.counters[c as usize] += 1;
}

#[inline(always)]
fn process(ctx: &XdpContext, stats: &mut GlobalStats) -> u32 {
    let frame = XdpFrame::new(ctx);
    let l3_off = match parse_l2(&frame) {
        Ok(off) => off,
        Err(c) => {
            bump(stats, c);
            return xdp_action::XDP_PASS;
        }
    };
    let Some(ip) = parse_ipv4(&frame, l3_off) else {
        bump(stats, Counter::Malformed);
        return xdp_action::XDP_PASS;
    };
    // Most traffic that is not for a VIP is not even for a VIP address: passed here, before
    // its TCP or UDP header is read. While the firewall has rules this gate lets every packet
    // through to it, and the filter proper comes after it (see `VIP_ADDRS_MAP_WORDS`).
    let bit = addr_filter_bit(ip.dst());
    if VIP_ADDRS.get(gate_word(bit)).is_some_and(|w| w >> (bit % 64) & 1 == 0) {
        bump(stats, if ip.is_fragment() { Counter::Fragment } else { Counter::NotVip });
        return xdp_action::XDP_PASS;
    }
    let Some(cfg) = CONFIG.get(0) else {
        bump(stats, Counter::FibError);
        return xdp_action::XDP_PASS;
    };
    if cfg.firewall_rules != 0 {
        // Every IPv4 packet with a sound header, fragments too.
        if firewall_denies(&ip, l3_off) {
            bump(stats, Counter::Firewall);
            return xdp_action::XDP_DROP;
        }
        if VIP_ADDRS.get(gate_word(bit) + 1).is_some_and(|w| w >> (bit % 64) & 1 == 0) {
            bump(stats, if ip.is_fragment() { Counter::Fragment } else { Counter::NotVip });
            return xdp_action::XDP_PASS;
        }
    }
    if ip.is_fragment() {
        bump(stats, Counter::Fragment);
        return xdp_action::XDP_PASS;
    }
    let p = match parse_l4(&frame, l3_off, &ip) {
        Ok(p) => p,
        Err(Counter::OtherL4) if ip.proto() == PROTO_ICMP => return icmp(ctx, &frame, l3_off, &ip, stats),
        Err(c) => {
            bump(stats, c);
            return xdp_action::XDP_PASS;
        }
    };
    // The flow's set first: it is the one line a packet needs that is likely not in the
    // cache (flows are many), so its load starts here and overlaps the VIP lookup.
    let slot = FlowSlot::new(p.tuple.hash64(cfg.flow_seed), cfg.flow_sets);
    let Some(set) = FLOWS.get_ptr_mut(slot.set) else {
        // Cannot happen: the slot's set is below flow_sets, which is the table's size.
        bump(stats, Counter::NoBackend);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: a map value; other CPUs write its entries whole (8-byte stores), see `FlowSet`.
    // Volatile: the load stays here instead of moving down to its first use.
    let first = unsafe { core::ptr::read_volatile(&(*set).ways[0]) };
    // SAFETY: as above.
    let set = unsafe { &mut *set };
    let vip_key = pack(p.tuple.dst, p.tuple.dport_word(), p.tuple.proto);
    let Some(vip) = find_packed_vip(vip_key, |i| VIPS.get(i)).copied() else {
        bump(stats, Counter::NotVip);
        return xdp_action::XDP_PASS;
    };
    if vip.is_restricted() && VIP_ALLOW.get(Key::new(64, allow_key(vip.vip_num, p.tuple.src))).is_none() {
        bump(stats, Counter::VipNotAllowed);
        return xdp_action::XDP_DROP;
    }
    let (Some(vip_stats), true) = (VIP_STATS.get_ptr_mut(vip.vip_num), vip.ring_len() > 0) else {
        bump(stats, Counter::NoBackend);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: per-CPU value.
    let vip_stats = unsafe { &mut *vip_stats };

    // SAFETY: inlined by the verifier into a load of jiffies.
    let now = unsafe { bpf_jiffies64() };

    let mut new_flow = false;
    let found = if slot.matches(first) { Some((0, first)) } else { set.find(&slot) };
    let (way, backend_idx) = match found {
        Some((way, entry)) => {
            // A known flow, also a retransmitted SYN: it keeps its backend.
            bump(stats, Counter::FlowHit);
            let idx = entry_backend(entry);
            if !entry_fresh(entry, now) {
                set.ways[way] = slot.entry(idx, now);
            }
            (way, idx)
        }
        None => {
            if cfg.source_limit != 0 && p.opens_flow() && !source_admits(p.tuple.src, cfg.source_limit) {
                bump(stats, Counter::SourceLimit);
                return xdp_action::XDP_DROP;
            }
            let mut pin = p.tcp_flags & TCP_RST == 0;
            let withdrawing = cfg.flood_limit == HASH_NEW_FLOWS;
            let ring_slot = if p.opens_flow() && !withdrawing && !(p.tuple.proto == PROTO_TCP && flooded(cfg, vip_stats)) {
                // A SYN, or the first UDP packet of a 5-tuple: the next backend in turn.
                bump(stats, Counter::NewFlow);
                new_flow = true;
                // SAFETY: plain helper call.
                let cpu = unsafe { bpf_get_smp_processor_id() };
                let ring_slot = round_robin_slot(vip_stats.new_flows, cpu, vip.ring_len());
                vip_stats.new_flows += 1;
                ring_slot
            } else if p.opens_flow() {
                // A SYN past the flood guard's limit, or any new flow while withdrawing: by
                // the hash, as its later packets will be, and no entry (see
                // `lb_common::flood`).
                bump(stats, if withdrawing { Counter::Withdrawing } else { Counter::FloodGuard });
                new_flow = true;
                pin = false;
                p.tuple.hash() % vip.ring_len()
            } else {
                // Mid-flow without an entry (evicted, or lost in a restart): by the hash,
                // so every packet of the flow, on any balancer, goes to one backend.
                bump(stats, Counter::HashFallback);
                p.tuple.hash() % vip.ring_len()
            };
            let Some(&idx) = RINGS.get(ring_index(vip.vip_num, vip.ring_half(), ring_slot)) else {
                bump(stats, Counter::NoBackend);
                return xdp_action::XDP_DROP;
            };
            let way = set.victim(now) & (FLOW_WAYS - 1);
            // A RST ends the flow: place it, but do not create an entry for it.
            if pin {
                set.ways[way] = slot.entry(idx, now);
            }
            (way, idx)
        }
    };
    let Some(mut backend) = BACKENDS.get(backend_idx) else {
        bump(stats, Counter::NoBackend);
        return xdp_action::XDP_DROP;
    };
    let mut backend_idx = backend_idx;
    if backend.is_down() && !new_flow {
        // Pinned to a dead backend: move the flow by its hash over the VIP's ring (which no
        // longer holds the dead one) and remember the move. The new backend answers with a
        // reset, so the client learns at once.
        let Some(&idx) = RINGS.get(ring_index(vip.vip_num, vip.ring_half(), p.tuple.hash() % vip.ring_len())) else {
            bump(stats, Counter::NoBackend);
            return xdp_action::XDP_DROP;
        };
        let Some(b) = BACKENDS.get(idx) else {
            bump(stats, Counter::NoBackend);
            return xdp_action::XDP_DROP;
        };
        bump(stats, Counter::Resteer);
        set.ways[way & (FLOW_WAYS - 1)] = slot.entry(idx, now);
        backend_idx = idx;
        backend = b;
    }
    let Some(backend_stats) = BACKEND_STATS.get_ptr_mut(backend_idx) else {
        bump(stats, Counter::NoBackend);
        return xdp_action::XDP_DROP;
    };
    let (action, sent) = if vip.is_l2() {
        forward_l2(&frame, backend, stats)
    } else {
        forward_ipip(ctx, &frame, &p, cfg, backend_idx, backend, stats)
    };
    // Count what left towards the backend (not what was passed back untouched).
    let bytes = (p.l3_off + usize::from(p.ip_len)) as u64;
    vip_stats.packets += 1;
    vip_stats.bytes += bytes;
    if sent {
        // SAFETY: per-CPU value.
        let backend_stats = unsafe { &mut *backend_stats };
        backend_stats.packets += 1;
        backend_stats.bytes += bytes;
        if new_flow {
            backend_stats.new_flows += 1;
        }
    }
    action
}

/// Whether the longest firewall rule holding the packet's source denies it (the direct
/// table of its /16 block, and the trie if a longer rule lies in the block); counts the
/// packet to that rule either way.
#[inline(always)]
fn firewall_denies(ip: &Ipv4, l3_off: usize) -> bool {
    let block = dir_block(ip.words[3]);
    let Some(line) = FIREWALL_DIR.get(block / DIR_PER_LINE) else { return false };
    let value = match line.entries[(block % DIR_PER_LINE) as usize] {
        DIR_NONE => return false,
        DIR_TRIE => match FIREWALL.get(Key::new(32, ip.words[3])) {
            Some(&v) => v,
            None => return false,
        },
        entry => dir_value(entry),
    };
    if let Some(rs) = FIREWALL_STATS.get_ptr_mut(rule_index(value)) {
        // SAFETY: per-CPU value.
        let rs = unsafe { &mut *rs };
        rs.packets += 1;
        rs.bytes += (l3_off + usize::from(ip.tot_len)) as u64;
    }
    denies(value)
}

/// Whether `src` may open one more flow under the per-source limit (and counts it); see
/// `lb_common::flood`. A source seen for the first time starts its count.
#[inline(always)]
fn source_admits(src: u32, limit: u32) -> bool {
    match SOURCES.get_ptr_mut(&src) {
        Some(state) => {
            // SAFETY: a map value; CPUs update it without a lock (a count may be lost, see
            // `lb_common::flood`), whole 8-byte stores.
            let (next, within) = admit(unsafe { *state }, limit, || unsafe { bpf_ktime_get_coarse_ns() });
            unsafe { *state = next };
            within
        }
        None => {
            // SAFETY: plain helper call.
            let (first, _) = admit(0, limit, || unsafe { bpf_ktime_get_coarse_ns() });
            // A full map forgets its least recently used source; an error only forgets this one.
            let _ = SOURCES.insert(&src, &first, 0);
            true
        }
    }
}

/// Whether this CPU has pinned as many new TCP flows to the VIP in the current window as
/// the flood guard allows (counting this one); see `lb_common::flood`.
#[inline(always)]
fn flooded(cfg: &LbConfig, vip_stats: &mut TrafficStats) -> bool {
    if cfg.flood_limit == 0 {
        return false;
    }
    // SAFETY: plain helper call (made only at the limit, see `admit`).
    let (state, within) = admit(vip_stats.flood, cfg.flood_limit, || unsafe { bpf_ktime_get_coarse_ns() });
    vip_stats.flood = state;
    !within
}

/// `l2` mode: the backend is on our segment; point the frame at its MAC and send it back out.
#[inline(always)]
fn forward_l2(frame: &XdpFrame, backend: &Backend, stats: &mut GlobalStats) -> (u32, bool) {
    let Some(old) = frame.load::<6>(0) else {
        bump(stats, Counter::Malformed);
        return (xdp_action::XDP_PASS, false);
    };
    // Our own MAC is the one the frame was sent to; the rest of the header stays.
    if !frame.store_words(0, &eth_macs(backend.mac, old)) {
        bump(stats, Counter::EncapError);
        return (xdp_action::XDP_PASS, false);
    }
    bump(stats, Counter::Tx);
    (xdp_action::XDP_TX, true)
}

/// Why no next hop could be used.
enum NoNextHop {
    /// Route found, neighbour not resolved: let the kernel resolve it and forward.
    Neighbour,
    /// No route, forwarding disabled, or another FIB failure.
    Route,
}

/// The next hop towards `backend`: from the per-CPU cache while valid, else from
/// `bpf_fib_lookup` (twice: once with the largest length to learn the path MTU, once without
/// a length for the MACs, since the helper stops before the neighbour when the MTU check fails).
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    cfg: &LbConfig,
    backend_idx: u32,
    backend: &Backend,
    ingress: u32,
    tos: u8,
) -> Result<*const NextHop, NoNextHop> {
    let Some(nh) = NEXTHOPS.get_ptr_mut(backend_idx) else { return Err(NoNextHop::Route) };
    // SAFETY: per-CPU value.
    if unsafe { &mut *nh }.take(cfg.generation, ingress) {
        return Ok(nh);
    }
    let mut block = core::mem::MaybeUninit::uninit();
    let fib = zero_fib(&mut block);
    fib.family = AF_INET;
    fib.l4_protocol = lb_common::packet::PROTO_IPIP;
    fib.__bindgen_anon_1.tot_len = u16::MAX;
    fib.__bindgen_anon_2.tos = tos;
    fib.ifindex = ingress;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.encap_src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(backend.addr);
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: helper call with a properly sized parameter block.
    let mut rc = unsafe { fib_lookup(ctx.as_ptr(), fib, size, 0) } as u32;
    let mut mtu = u16::MAX;
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // SAFETY: the helper wrote the union's mtu_result member.
        mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
        fib.__bindgen_anon_1.tot_len = 0;
        // SAFETY: as above.
        rc = unsafe { fib_lookup(ctx.as_ptr(), fib, size, 0) } as u32;
    }
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(NoNextHop::Neighbour),
        _ => return Err(NoNextHop::Route),
    }
    // SAFETY: per-CPU value.
    let entry = unsafe { &mut *nh };
    entry.budget = NEXTHOP_BUDGET;
    entry.ifindex = fib.ifindex;
    entry.ingress = ingress;
    entry.generation = cfg.generation;
    entry.mtu = mtu;
    entry.macs = fib_macs(fib);
    Ok(nh)
}

/// `eth_macs(fib.dmac, fib.smac)`, read as 2-byte words: the verifier refuses misaligned
/// stack reads, into which LLVM would otherwise merge the byte reads (dmac is at offset 58).
#[inline(always)]
fn fib_macs(fib: &bpf_fib_lookup) -> [u32; 3] {
    let (d, s) = (fib.dmac.as_ptr().cast::<u16>(), fib.smac.as_ptr().cast::<u16>());
    // SAFETY: both are 2-byte aligned (offsets 58 and 52) and 6 bytes long; volatile keeps
    // LLVM from merging the reads into misaligned 4-byte ones.
    let h = |p: *const u16, i: usize| u32::from(unsafe { core::ptr::read_volatile(p.add(i)) });
    // Little-endian (the only BPF target we build): the low half is the first two bytes.
    [h(d, 0) | h(d, 1) << 16, h(d, 2) | h(s, 0) << 16, h(s, 1) | h(s, 2) << 16]
}
#[cfg(target_endian = "big")]
compile_error!("fib_macs assumes a little-endian target");

/// Forwarding returns the action and whether the packet went (or was handed to the kernel
/// encapsulated) towards the backend.
///
/// `ipip` mode: route to the backend (cached FIB answer), encapsulate, and send out of the
/// egress interface (XDP_TX if it is the ingress one, XDP_REDIRECT otherwise).
#[inline(always)]
fn forward_ipip(
    ctx: &XdpContext,
    frame: &XdpFrame,
    p: &Parsed,
    cfg: &LbConfig,
    backend_idx: u32,
    backend: &Backend,
    stats: &mut GlobalStats,
) -> (u32, bool) {
    let Some(total) = outer_len(p.ip_len) else {
        bump(stats, Counter::TooBig);
        return (xdp_action::XDP_PASS, false);
    };
    let ingress = ctx.ingress_ifindex() as u32;
    let nh = match next_hop(ctx, cfg, backend_idx, backend, ingress, p.tos) {
        // SAFETY: per-CPU value, read in place below (a copy of it in an `Option` left the
        // copy's bytes undefined on the `None` path, and LLVM then stored a register the
        // verifier knows is unset: `R1 !read_ok`).
        Ok(nh) => Some(unsafe { &*nh }),
        Err(NoNextHop::Neighbour) => None,
        Err(NoNextHop::Route) => {
            bump(stats, Counter::FibError);
            return (xdp_action::XDP_PASS, false);
        }
    };
    if let Some(nh) = nh {
        if total > nh.mtu {
            if p.df && answerable(p.tuple.src) {
                return (icmp_too_big(ctx, frame, p, nh.mtu.saturating_sub(IPIP_OVERHEAD as u16), stats), false);
            }
            bump(stats, Counter::TooBig);
            return (xdp_action::XDP_PASS, false);
        }
    }

    // The Ethernet header as received: the MACs, and what follows them up to the IPv4
    // header (bytes 12..18 exist in any frame the parser accepted).
    let (Some(old_macs), Some(tail)) = (frame.macs(), frame.eth_tail()) else {
        bump(stats, Counter::Malformed);
        return (xdp_action::XDP_PASS, false);
    };
    let outer = outer_ipv4_words(
        u32::from_ne_bytes(cfg.encap_src),
        u32::from_ne_bytes(backend.addr),
        p.ip_len,
        p.tos,
        p.df,
    );
    if !adjust_head(ctx, -(IPIP_OVERHEAD as i32)) {
        bump(stats, Counter::EncapError);
        return (xdp_action::XDP_PASS, false);
    }
    let frame = XdpFrame::new(ctx);
    let l3_off = p.l3_off;
    if !frame.store_words(l3_off, &outer) {
        // Cannot happen (the frame just grew by 20 bytes); undo to leave it as it came.
        adjust_head(ctx, IPIP_OVERHEAD as i32);
        bump(stats, Counter::EncapError);
        return (xdp_action::XDP_PASS, false);
    }
    let (action, counter, macs) = match nh {
        // The kernel resolves the neighbour and forwards the encapsulated packet itself.
        None => (xdp_action::XDP_PASS, Counter::FibNoNeigh, old_macs),
        Some(nh) if nh.ifindex == ingress => (xdp_action::XDP_TX, Counter::Tx, nh.macs),
        Some(nh) => match TX_PORTS.redirect(nh.ifindex, 0) {
            Ok(action) => (action, Counter::Redirect, nh.macs),
            // Not a port of ours: let the kernel forward the encapsulated packet.
            Err(_) => (xdp_action::XDP_PASS, Counter::EncapError, old_macs),
        },
    };
    write_eth(&frame, l3_off, &macs, &tail);
    bump(stats, counter);
    (action, true)
}

/// A packet with DF that would not fit the path to the backend once encapsulated: the frame
/// becomes an ICMP "fragmentation needed" to its sender, advertising `mtu` (the largest
/// packet that fits), and goes back out (`XDP_TX`); see `lb_common::icmp`. Anything that
/// keeps the reply from being built passes the packet untouched (counted `TooBig`).
#[inline(always)]
fn icmp_too_big(ctx: &XdpContext, frame: &XdpFrame, p: &Parsed, mtu: u16, stats: &mut GlobalStats) -> u32 {
    let l3_off = p.l3_off;
    let (Some(macs), Some(tail), Some([vihl])) = (frame.macs(), frame.eth_tail(), frame.load::<1>(l3_off)) else {
        bump(stats, Counter::TooBig);
        return xdp_action::XDP_PASS;
    };
    let quote = quote_len(usize::from(vihl & 0x0f) * 4);
    if quote > usize::from(p.ip_len) {
        bump(stats, Counter::TooBig);
        return xdp_action::XDP_PASS;
    }
    // The ICMP checksum covers the quote: summed here, where it lies now.
    let mut sum = 0u32;
    let mut i = 0;
    while i < MAX_QUOTE_WORDS && 4 * i < quote {
        let Some([w]) = frame.load_words::<1>(l3_off + 4 * i) else {
            bump(stats, Counter::TooBig);
            return xdp_action::XDP_PASS;
        };
        sum += halves(w);
        i += 1;
    }
    let headers = too_big_words(p.tuple.dst, p.tuple.src, mtu, quote as u16, sum);
    if !adjust_head(ctx, -(TOO_BIG_OVERHEAD as i32)) {
        bump(stats, Counter::TooBig);
        return xdp_action::XDP_PASS;
    }
    let frame = XdpFrame::new(ctx);
    if !frame.store_words(l3_off, &headers) {
        // Cannot happen (the frame just grew by 28 bytes); undo to leave it as it came.
        adjust_head(ctx, TOO_BIG_OVERHEAD as i32);
        bump(stats, Counter::TooBig);
        return xdp_action::XDP_PASS;
    }
    write_eth(&frame, l3_off, &swap_macs(macs), &tail);
    // Cut after the quote. Should the kernel refuse, the bytes after it go too, and the
    // receiver ignores them (the IPv4 total length ends before them).
    let keep = (l3_off + TOO_BIG_OVERHEAD + quote) as i32;
    // SAFETY: plain helper calls on our own context.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as i32;
    // SAFETY: as above.
    let _ = unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep - len) };
    bump(stats, Counter::IcmpTooBig);
    xdp_action::XDP_TX
}

/// ICMP to a VIP address: echo requests are answered, "fragmentation needed" about a VIP's
/// packet goes to the backend of its flow (see `lb_common::packet::IcmpToVip`); anything
/// else passes untouched.
#[inline(always)]
fn icmp(ctx: &XdpContext, frame: &XdpFrame, l3_off: usize, ip: &Ipv4, stats: &mut GlobalStats) -> u32 {
    match parse_icmp(frame, l3_off, ip) {
        Ok(IcmpToVip::Echo) => echo_reply(ctx, l3_off, ip, stats),
        Ok(IcmpToVip::TooBig(tuple)) => icmp_to_backend(ctx, frame, l3_off, ip, tuple, stats),
        Err(c) => {
            bump(stats, c);
            xdp_action::XDP_PASS
        }
    }
}

/// An echo request to a VIP address becomes its reply in place: MACs and addresses swapped,
/// TTL 64, type 0, both checksums updated for the two fields that changed (RFC 1624).
#[inline(always)]
fn echo_reply(ctx: &XdpContext, l3_off: usize, ip: &Ipv4, stats: &mut GlobalStats) -> u32 {
    // SAFETY: a hash map lookup; the value is not used.
    if unsafe { VIP_ADDR_SET.get(&ip.words[4]) }.is_none() {
        // Another address whose filter bit a VIP's address shares.
        bump(stats, Counter::OtherL4);
        return xdp_action::XDP_PASS;
    }
    // Bounds read anew after the helper call, and offsets LLVM cannot see through
    // (volatile): it would otherwise drop checks it can prove from others, for pointers
    // whose range the verifier does not know.
    let frame = XdpFrame::new(ctx);
    // SAFETY: reads of two locals.
    let (l3_off, icmp_off) = unsafe { (core::ptr::read_volatile(&l3_off), core::ptr::read_volatile(&(l3_off + ip.ihl))) };
    let [ttl, proto, c0, c1] = ip.words[2].to_ne_bytes();
    let check = csum::replace(u16::from_ne_bytes([c0, c1]), u16::from_ne_bytes([ttl, proto]), u16::from_ne_bytes([REPLY_TTL, proto]));
    let [c0, c1] = check.to_ne_bytes();
    // Swapping the addresses leaves the IPv4 checksum as it is.
    let words = [u32::from_ne_bytes([REPLY_TTL, proto, c0, c1]), ip.words[4], ip.words[3]];
    let (Some(macs), Some([head])) = (frame.macs(), frame.load_words::<1>(icmp_off)) else {
        bump(stats, Counter::Malformed);
        return xdp_action::XDP_PASS;
    };
    let [kind, code, i0, i1] = head.to_ne_bytes();
    let check = csum::replace(u16::from_ne_bytes([i0, i1]), u16::from_ne_bytes([kind, code]), u16::from_ne_bytes([ICMP_ECHO_REPLY, code]));
    let [i0, i1] = check.to_ne_bytes();
    if !(frame.store_words(l3_off + 8, &words)
        && frame.store_words(icmp_off, &[u32::from_ne_bytes([ICMP_ECHO_REPLY, code, i0, i1])])
        && frame.store_words(0, &swap_macs(macs)))
    {
        // Cannot happen: every byte written was read before.
        bump(stats, Counter::Malformed);
        return xdp_action::XDP_DROP;
    }
    bump(stats, Counter::IcmpEcho);
    xdp_action::XDP_TX
}

/// "Fragmentation needed" about a VIP's packet: to the backend its flow is pinned to (or
/// where the flow's hash places it, as its next packet would be), encapsulated whole. No flow
/// entry is made or refreshed, and it never gets an ICMP error of its own (`df` false: if
/// too big once encapsulated, it is passed).
#[inline(always)]
fn icmp_to_backend(ctx: &XdpContext, frame: &XdpFrame, l3_off: usize, ip: &Ipv4, tuple: Tuple, stats: &mut GlobalStats) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        bump(stats, Counter::FibError);
        return xdp_action::XDP_PASS;
    };
    let Some(vip) = find_packed_vip(pack(tuple.dst, tuple.dport_word(), tuple.proto), |i| VIPS.get(i)).copied() else {
        bump(stats, Counter::NotVip);
        return xdp_action::XDP_PASS;
    };
    if vip.ring_len() == 0 {
        bump(stats, Counter::NoBackend);
        return xdp_action::XDP_DROP;
    }
    let slot = FlowSlot::new(tuple.hash64(cfg.flow_seed), cfg.flow_sets);
    let pinned = FLOWS.get(slot.set).and_then(|set| set.find(&slot)).map(|(_, e)| entry_backend(e));
    let by_hash = RINGS.get(ring_index(vip.vip_num, vip.ring_half(), tuple.hash() % vip.ring_len())).copied();
    let Some(mut idx) = pinned.or(by_hash) else {
        bump(stats, Counter::NoBackend);
        return xdp_action::XDP_DROP;
    };
    let Some(mut backend) = BACKENDS.get(idx) else {
        bump(stats, Counter::NoBackend);
        return xdp_action::XDP_DROP;
    };
    if backend.is_down() {
        // As the flow's next packet would be re-steered.
        let Some(b) = by_hash.and_then(|i| BACKENDS.get(i).map(|b| (i, b))) else {
            bump(stats, Counter::NoBackend);
            return xdp_action::XDP_DROP;
        };
        (idx, backend) = b;
    }
    bump(stats, Counter::IcmpToBackend);
    let p = Parsed { l3_off, ip_len: ip.tot_len, tos: ip.tos(), df: false, tcp_flags: 0, tuple };
    if vip.is_l2() {
        forward_l2(frame, backend, stats).0
    } else {
        forward_ipip(ctx, frame, &p, cfg, idx, backend, stats).0
    }
}
