//! Flow keys and the deterministic 5-tuple hash.

use crate::user_pod;

/// Default size of the flow table (LRU); the daemon may set another.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;

/// The full 5-tuple of a flow, network order: both addresses, both ports, protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    // Scalar padding, not an array: a zeroed array becomes a `memset` call in BPF.
    pub _pad1: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// Value of the flow table: where the flow is pinned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub backend: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 8);

/// Slots of the per-CPU flow cache, direct-mapped by [`FlowKey::hash`].
pub const FLOW_CACHE_SLOTS: u32 = 16384;

/// A per-CPU cache entry in front of the flow table: an established packet that finds its
/// flow here needs no hash-map helper call (the most expensive step left on its path). The
/// flow table stays the authority: entries are filled from it and are valid only for the
/// `LbConfig::generation` they were filled in; userspace bumps the generation at least once
/// a second, so every cached flow is looked up in the table again (which also keeps it
/// recent for the LRU) and any change userspace makes reaches the cache within that time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowCacheSlot {
    /// [`FlowKey::words`]; all zero (never a real flow: protocol 0) when empty.
    pub key: [u64; 2],
    pub backend: u32,
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<FlowCacheSlot>() == 24);

user_pod!(FlowKey, FlowValue, FlowCacheSlot);

#[inline(always)]
pub(crate) fn fmix(mut h: u32) -> u32 {
    // murmur3's finaliser: full avalanche in five cheap instructions.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

impl FlowKey {
    /// The key as two words, for a cheap comparison.
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        [
            u64::from_ne_bytes([self.src[0], self.src[1], self.src[2], self.src[3], self.dst[0], self.dst[1], self.dst[2], self.dst[3]]),
            u64::from_ne_bytes([self.sport[0], self.sport[1], self.dport[0], self.dport[1], self.proto, 0, 0, 0]),
        ]
    }

    /// A deterministic hash of the 5-tuple, the same on every CPU, every balancer and after
    /// every restart. It places TCP packets that are not a SYN and have no flow entry
    /// (the entry was evicted, or the table was lost in a restart): the choice depends on
    /// the flow alone, so all of the flow's later packets, and any other balancer with the
    /// same ring, agree on one backend instead of scattering the flow.
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        let w0 = u32::from_le_bytes(self.src);
        let w1 = u32::from_le_bytes(self.dst);
        let w2 = u32::from_le_bytes([self.sport[0], self.sport[1], self.dport[0], self.dport[1]]);
        let mut h = fmix(w0 ^ 0x9e37_79b9);
        h = fmix(h ^ w1);
        h = fmix(h ^ w2);
        fmix(h ^ u32::from(self.proto))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: [u8; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src,
            dst: [10, 0, 0, 100],
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            proto,
            _pad1: 0,
            _pad2: 0,
        }
    }

    #[test]
    fn hash_is_deterministic_and_uses_every_field() {
        let base = key([192, 168, 1, 1], 40000, 80, 6);
        assert_eq!(base.hash(), key([192, 168, 1, 1], 40000, 80, 6).hash());
        let variants = [
            key([192, 168, 1, 2], 40000, 80, 6),
            key([192, 168, 1, 1], 40001, 80, 6),
            key([192, 168, 1, 1], 40000, 81, 6),
            key([192, 168, 1, 1], 40000, 80, 17),
            FlowKey { dst: [10, 0, 0, 101], ..base },
        ];
        for v in variants {
            assert_ne!(v.hash(), base.hash(), "{v:?}");
        }
        // Swapping ports is a different flow.
        assert_ne!(key([1, 2, 3, 4], 80, 40000, 6).hash(), key([1, 2, 3, 4], 40000, 80, 6).hash());
    }

    #[test]
    fn words_distinguish_flows_and_are_never_empty() {
        let a = key([192, 168, 1, 1], 40000, 80, 6);
        assert_ne!(a.words(), [0, 0]);
        assert_ne!(a.words(), key([192, 168, 1, 1], 40000, 80, 17).words());
        assert_ne!(a.words(), key([192, 168, 1, 1], 40001, 80, 6).words());
        assert_ne!(a.words(), FlowKey { dst: [10, 0, 0, 9], ..a }.words());
        assert_eq!(a.words(), key([192, 168, 1, 1], 40000, 80, 6).words());
    }

    #[test]
    fn hash_spreads_over_a_small_ring() {
        // Sequential client ports (the common case) must spread evenly over 3 slots.
        let mut hits = [0u32; 3];
        for port in 0..30_000u16 {
            hits[(key([10, 1, 0, 1], port, 80, 6).hash() % 3) as usize] += 1;
        }
        for h in hits {
            assert!((9_500..=10_500).contains(&h), "{hits:?}");
        }
    }
}
