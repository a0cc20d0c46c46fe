//! Backends ("reals") and the per-VIP ring of backend slots.

use crate::user_pod;

/// Most backends the data plane holds (all VIPs together).
pub const MAX_BACKENDS: u32 = 4096;
/// Slots per VIP ring. Userspace repeats a backend `weight` times (after dividing the
/// weights by their gcd) and interleaves them; the kernel only indexes the ring.
pub const RING_SIZE: u32 = 512;

/// Value of the backend array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// IPv4 address, network order: the outer destination in `ipip` mode.
    pub addr: [u8; 4],
    /// Ethernet address for `l2` mode VIPs (unused for `ipip`).
    pub mac: [u8; 6],
    /// `BACKEND_DOWN`, ...
    pub flags: u8,
    pub _pad: u8,
}

/// The backend failed its health checks: flows pinned to it are re-steered (its rings no
/// longer hold it, so new flows never reach it).
pub const BACKEND_DOWN: u8 = 1;

impl Backend {
    #[inline(always)]
    pub fn is_down(&self) -> bool {
        self.flags & BACKEND_DOWN != 0
    }
}
const _: () = assert!(core::mem::size_of::<Backend>() == 12);

/// How many packets a CPU sends with a cached next hop (egress interface, MACs, MTU) before
/// it asks the FIB again. Time-based expiry is userspace's job: it bumps
/// `LbConfig::generation` (periodically, and on route or neighbour changes), which
/// invalidates every entry at once. Reading a clock in the kernel would cost a helper call
/// per packet, as much as the rest of the lookup work.
pub const NEXTHOP_BUDGET: u32 = 1 << 16;

/// A FIB answer for one backend, cached per CPU: `bpf_fib_lookup` costs more than the rest
/// of an established packet's work, and its answer changes only with routes and neighbours.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    /// Packets this entry may still serve; 0 = stale or never filled.
    pub budget: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// Ingress interface the lookup was made for.
    pub ingress: u32,
    /// `LbConfig::generation` at the time of the lookup.
    pub generation: u32,
    /// Path MTU to the backend (route or device).
    pub mtu: u16,
    pub _pad: u16,
    /// Destination then source MAC of the frames towards the backend, as three 4-byte
    /// words in memory order (see [`eth_macs`]): three word stores write them.
    pub macs: [u32; 3],
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);

impl NextHop {
    /// Whether the entry may serve one more packet (and takes that packet from its budget).
    #[inline(always)]
    pub fn take(&mut self, generation: u32, ingress: u32) -> bool {
        if self.budget == 0 || self.generation != generation || self.ingress != ingress {
            return false;
        }
        self.budget -= 1;
        true
    }
}

user_pod!(Backend, NextHop);

/// Destination and source MAC as the first 12 bytes of an Ethernet header, in 4-byte words
/// in memory order (`u32::from_ne_bytes` of each four bytes).
#[inline(always)]
pub fn eth_macs(dst: [u8; 6], src: [u8; 6]) -> [u32; 3] {
    [
        u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]),
        u32::from_ne_bytes([dst[4], dst[5], src[0], src[1]]),
        u32::from_ne_bytes([src[2], src[3], src[4], src[5]]),
    ]
}

/// The ring slot a new flow takes: the per-CPU new-flow counter of the VIP, offset by the
/// CPU number so that CPUs start at different slots. Each CPU walks the ring in order, so
/// over N flows each of k equal backends gets N/k within ± the number of CPUs, without
/// any shared (cache-line bouncing) counter.
#[inline(always)]
pub fn round_robin_slot(per_cpu_new_flows: u64, cpu: u32, ring_len: u32) -> u32 {
    ((per_cpu_new_flows + u64::from(cpu)) % u64::from(ring_len)) as u32
}

/// Index into the flat ring array for `slot` of ring `half` (0 or 1) of `vip_num`: every VIP
/// has two rings, the active one and the one userspace writes next.
#[inline(always)]
pub fn ring_index(vip_num: u32, half: u32, slot: u32) -> u32 {
    (vip_num * 2 + (half & 1)) * RING_SIZE + slot
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn eth_macs_are_the_header_bytes_in_words() {
        let (dst, src) = ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]);
        let bytes: Vec<u8> = eth_macs(dst, src).iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn slots_cycle_and_cpus_start_apart() {
        let cases: &[(u64, u32, u32, u32)] = &[
            // (counter, cpu, ring_len, expected)
            (0, 0, 3, 0),
            (1, 0, 3, 1),
            (2, 0, 3, 2),
            (3, 0, 3, 0),
            (0, 1, 3, 1),
            (2, 1, 3, 0),
            (0, 5, 2, 1),
            (u64::MAX, 0, 7, (u64::MAX % 7) as u32),
            (9, 3, 1, 0),
        ];
        for &(counter, cpu, len, expected) in cases {
            assert_eq!(round_robin_slot(counter, cpu, len), expected, "{counter} {cpu} {len}");
        }
    }

    #[test]
    fn spread_is_within_cpu_count() {
        // 4 CPUs taking flows unevenly, ring of 3 equal backends.
        let ring_len = 3u32;
        let per_cpu = [1000u64, 7, 333, 0];
        let mut hits = [0u64; 3];
        for (cpu, &n) in per_cpu.iter().enumerate() {
            for c in 0..n {
                hits[round_robin_slot(c, cpu as u32, ring_len) as usize] += 1;
            }
        }
        let total: u64 = per_cpu.iter().sum();
        for h in hits {
            assert!(h.abs_diff(total / 3) <= per_cpu.len() as u64, "{hits:?}");
        }
    }

    #[test]
    fn next_hop_freshness() {
        let mut nh = NextHop { budget: 2, generation: 3, ingress: 7, ..Default::default() };
        assert!(!nh.take(4, 7), "invalidated by userspace");
        assert!(!nh.take(3, 8), "other ingress interface");
        assert!(nh.take(3, 7));
        assert!(nh.take(3, 7));
        assert!(!nh.take(3, 7), "budget spent");
        assert!(!NextHop::default().take(0, 0), "never filled");
    }

    #[test]
    fn ring_index_is_flat() {
        assert_eq!(ring_index(0, 0, 0), 0);
        assert_eq!(ring_index(0, 1, 3), RING_SIZE + 3);
        assert_eq!(ring_index(2, 0, 5), 4 * RING_SIZE + 5);
        assert_eq!(ring_index(2, 1, RING_SIZE - 1), 6 * RING_SIZE - 1);
    }
}
