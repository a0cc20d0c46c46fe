//! Counters. All are per-CPU on the kernel side and summed by userspace.

use crate::user_pod;

/// Global counters by action and reason, indexes into [`GlobalStats::counters`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    // The counters every common packet touches come first, in one cache line.
    /// TCP or UDP not addressed to a VIP: passed untouched.
    NotVip = 0,
    /// VIP packet found in the flow table.
    FlowHit,
    /// First packet of a flow, placed round-robin.
    NewFlow,
    /// Sent out of the ingress interface (`XDP_TX`).
    Tx,
    /// Sent out of another interface through the devmap (`XDP_REDIRECT`).
    Redirect,
    /// Non-SYN TCP without a flow entry, placed by the 5-tuple hash.
    HashFallback,
    /// SYN past the flood guard's limit: placed by the 5-tuple hash, without an entry.
    FloodGuard,
    /// A flow pinned to a backend marked down, moved by the 5-tuple hash to a live one (whose
    /// reset tells the client at once, instead of a hang).
    Resteer,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed untouched.
    NotIp,
    /// IPv6 (recognised; IPv6 VIPs come later): passed untouched.
    Ipv6,
    /// IPv4 but neither TCP nor UDP (nor ICMP the balancer takes): passed untouched.
    OtherL4,
    /// IPv4 fragment (first or later): passed untouched.
    Fragment,
    /// Truncated or inconsistent headers: passed untouched.
    Malformed,
    /// VIP without backends: dropped.
    NoBackend,
    /// Neighbour of the next hop not resolved: encapsulated and passed to the kernel.
    FibNoNeigh,
    /// ICMP echo request to a VIP address: answered (`XDP_TX`).
    IcmpEcho,
    /// ICMP "fragmentation needed" about a VIP's packet (a backend's reply): sent to the
    /// backend of that flow, as its packets are (counted besides the action).
    IcmpToBackend,
    /// Encapsulated packet would exceed the egress MTU and may not be fragmented (DF):
    /// answered with ICMP "fragmentation needed" (`XDP_TX`), see `icmp`.
    IcmpTooBig,
    /// Encapsulated packet would exceed the egress MTU, without DF (or past 64 KiB): passed
    /// untouched.
    TooBig,
    /// No route, forwarding disabled or another FIB failure: passed untouched.
    FibError,
    /// `bpf_xdp_adjust_head` or the devmap refused: passed (untouched, or encapsulated to
    /// the kernel when only the devmap refused).
    EncapError,
    /// Source denied by a firewall rule: dropped (see `firewall`).
    Firewall,
    /// A new flow past its source's limit of new flows per window: dropped (see `flood`).
    SourceLimit,
    /// To a VIP with an allow list that does not hold the source: dropped.
    VipNotAllowed,
    /// A new flow while the balancer withdraws from the routers: placed by the 5-tuple hash,
    /// without an entry, where its peers will place its later packets (see
    /// `flood::HASH_NEW_FLOWS`).
    Withdrawing,
    // --- decapsulation program ---
    /// IPIP packet for this host, outer header removed.
    Decap,
    /// IPIP packet for another host: passed untouched.
    DecapNotLocal,
    /// Not IPIP: passed untouched.
    DecapNotIpip,
    /// IPIP with truncated or inconsistent outer or inner header: passed untouched.
    DecapMalformed,
}

pub const COUNTER_COUNT: usize = Counter::DecapMalformed as usize + 1;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT] = [
        Counter::NotVip,
        Counter::FlowHit,
        Counter::NewFlow,
        Counter::Tx,
        Counter::Redirect,
        Counter::HashFallback,
        Counter::FloodGuard,
        Counter::Resteer,
        Counter::NotIp,
        Counter::Ipv6,
        Counter::OtherL4,
        Counter::Fragment,
        Counter::Malformed,
        Counter::NoBackend,
        Counter::FibNoNeigh,
        Counter::IcmpEcho,
        Counter::IcmpToBackend,
        Counter::IcmpTooBig,
        Counter::TooBig,
        Counter::FibError,
        Counter::EncapError,
        Counter::Firewall,
        Counter::SourceLimit,
        Counter::VipNotAllowed,
        Counter::Withdrawing,
        Counter::Decap,
        Counter::DecapNotLocal,
        Counter::DecapNotIpip,
        Counter::DecapMalformed,
    ];

    /// The counters the balancer program keeps (the rest belong to the decapsulation program).
    pub const BALANCER: &'static [Counter] = Counter::ALL.split_at(Counter::Decap as usize).0;

    /// The XDP action a packet counted here left with, for the balancer's counters that
    /// count packets (not `FlowHit`, `NewFlow`, `HashFallback`, which count placements).
    pub const fn action(self) -> Option<&'static str> {
        match self {
            Counter::Tx | Counter::IcmpTooBig | Counter::IcmpEcho => Some("tx"),
            Counter::Redirect => Some("redirect"),
            Counter::NoBackend | Counter::Firewall | Counter::SourceLimit | Counter::VipNotAllowed => Some("drop"),
            Counter::NotVip
            | Counter::NotIp
            | Counter::Ipv6
            | Counter::OtherL4
            | Counter::Fragment
            | Counter::Malformed
            | Counter::FibNoNeigh
            | Counter::TooBig
            | Counter::FibError
            | Counter::EncapError => Some("pass"),
            _ => None,
        }
    }

    /// Stable snake_case name, used as a metrics label.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::NotIp => "not_ip",
            Counter::Ipv6 => "ipv6",
            Counter::OtherL4 => "other_l4",
            Counter::NotVip => "not_vip",
            Counter::Fragment => "fragment",
            Counter::Malformed => "malformed",
            Counter::NewFlow => "new_flow",
            Counter::FlowHit => "flow_hit",
            Counter::HashFallback => "hash_fallback",
            Counter::FloodGuard => "flood_guard",
            Counter::Resteer => "resteer",
            Counter::NoBackend => "no_backend",
            Counter::Tx => "tx",
            Counter::Redirect => "redirect",
            Counter::FibNoNeigh => "fib_no_neigh",
            Counter::IcmpEcho => "icmp_echo",
            Counter::IcmpToBackend => "icmp_to_backend",
            Counter::IcmpTooBig => "icmp_too_big",
            Counter::TooBig => "too_big",
            Counter::FibError => "fib_error",
            Counter::EncapError => "encap_error",
            Counter::Firewall => "firewall",
            Counter::SourceLimit => "source_limit",
            Counter::VipNotAllowed => "vip_not_allowed",
            Counter::Withdrawing => "withdrawing",
            Counter::Decap => "decap",
            Counter::DecapNotLocal => "decap_not_local",
            Counter::DecapNotIpip => "decap_not_ipip",
            Counter::DecapMalformed => "decap_malformed",
        }
    }
}

/// One per-CPU array entry holding every global counter, so a packet costs one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalStats {
    pub counters: [u64; COUNTER_COUNT],
}
const _: () = assert!(core::mem::size_of::<GlobalStats>() == 8 * COUNTER_COUNT);

impl Default for GlobalStats {
    fn default() -> Self {
        Self { counters: [0; COUNTER_COUNT] }
    }
}

impl GlobalStats {
    #[inline(always)]
    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize]
    }

    /// Sum of per-CPU values.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a GlobalStats>) -> GlobalStats {
        let mut sum = GlobalStats::default();
        for s in per_cpu {
            for (a, b) in sum.counters.iter_mut().zip(s.counters.iter()) {
                *a += b;
            }
        }
        sum
    }
}

/// Traffic of one VIP or one backend: packets, bytes (of the frame as received) and new flows.
/// For a VIP, the per-CPU `new_flows` is also its round-robin position on that CPU, and
/// `flood` the flood guard's count in its current window ([`crate::flood`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub flood: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficStats>() == 32);

impl core::ops::AddAssign for TrafficStats {
    fn add_assign(&mut self, o: Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
    }
}

user_pod!(GlobalStats, TrafficStats);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancer_counters_and_actions() {
        assert_eq!(Counter::BALANCER.len(), 25);
        assert!(!Counter::BALANCER.contains(&Counter::Decap));
        assert_eq!(Counter::Tx.action(), Some("tx"));
        assert_eq!(Counter::TooBig.action(), Some("pass"));
        assert_eq!(Counter::IcmpTooBig.action(), Some("tx"));
        assert_eq!(Counter::NoBackend.action(), Some("drop"));
        assert_eq!(Counter::FlowHit.action(), None);
        // Every packet is counted under exactly one action: the action counters of the
        // balancer partition its packets (placements are counted besides).
        let placements = [Counter::FlowHit, Counter::NewFlow, Counter::HashFallback, Counter::Resteer, Counter::IcmpToBackend, Counter::FloodGuard, Counter::Withdrawing];
        for c in Counter::BALANCER {
            assert_eq!(c.action().is_none(), placements.contains(c), "{c:?}");
        }
    }

    #[test]
    fn all_is_in_index_order_with_unique_names() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for d in &Counter::ALL[..i] {
                assert_ne!(c.name(), d.name());
            }
        }
    }
}
