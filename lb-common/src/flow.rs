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

/// Sets of the per-CPU [`FlowCache`], chosen by [`FlowKey::hash`].
pub const FLOW_CACHE_SETS: u32 = 256;
/// Flows a set holds.
pub const FLOW_CACHE_WAYS: usize = 4;

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
    pub _pad: u64,
}
const _: () = assert!(core::mem::size_of::<FlowCacheSlot>() == 32);

/// One set: four flows in two cache lines. Way 0 holds the most recently filled flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowCacheSet {
    pub ways: [FlowCacheSlot; FLOW_CACHE_WAYS],
}

/// The per-CPU flow cache, one per-CPU value of 32 KiB (the largest the kernel allows):
/// every packet finds it through the same per-CPU pointer and it spans few pages, where a
/// per-CPU array of slots costs a pointer load and a scattered slot (and TLB entry) per
/// flow. 256 sets x 4 ways: a few hundred active flows per CPU hit it; the rest go to the
/// flow table, as they would without it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowCache {
    pub sets: [FlowCacheSet; FLOW_CACHE_SETS as usize],
}
const _: () = assert!(core::mem::size_of::<FlowCache>() == 32 * 1024);

impl FlowCache {
    /// The backend cached for the flow with these `words` and `hash`, if filled in `generation`.
    #[inline(always)]
    pub fn get(&self, hash: u32, words: [u64; 2], generation: u32) -> Option<u32> {
        let set = &self.sets[(hash & (FLOW_CACHE_SETS - 1)) as usize];
        let mut i = 0;
        while i < FLOW_CACHE_WAYS {
            let w = &set.ways[i];
            if w.key == words && w.generation == generation {
                return Some(w.backend);
            }
            i += 1;
        }
        None
    }

    /// Caches `backend` for the flow: in place if the flow is in the set already, else in
    /// way 0, every other flow moving one way down (the oldest leaves).
    #[inline(always)]
    pub fn put(&mut self, hash: u32, words: [u64; 2], backend: u32, generation: u32) {
        let set = &mut self.sets[(hash & (FLOW_CACHE_SETS - 1)) as usize];
        let slot = FlowCacheSlot { key: words, backend, generation, _pad: 0 };
        let mut i = 0;
        while i < FLOW_CACHE_WAYS {
            if set.ways[i].key == words {
                set.ways[i] = slot;
                return;
            }
            i += 1;
        }
        let mut i = FLOW_CACHE_WAYS - 1;
        while i > 0 {
            set.ways[i] = set.ways[i - 1];
            i -= 1;
        }
        set.ways[0] = slot;
    }
}

user_pod!(FlowKey, FlowValue, FlowCacheSlot, FlowCache);

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
    use alloc::vec::Vec;

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
    fn flow_cache_keeps_four_flows_per_set_and_honours_the_generation() {
        let mut c = FlowCache { sets: [FlowCacheSet::default(); FLOW_CACHE_SETS as usize] };
        let flows: Vec<FlowKey> = (1..=5).map(|i| key([10, 0, 0, i], u16::from(i), 80, 6)).collect();
        // Five flows in one set (same hash on purpose): the oldest filled leaves.
        let h = 7;
        assert_eq!(c.get(h, flows[0].words(), 1), None, "empty");
        for (i, f) in flows[..4].iter().enumerate() {
            c.put(h, f.words(), i as u32, 1);
        }
        let got = |c: &FlowCache| flows.iter().map(|f| c.get(h, f.words(), 1)).collect::<Vec<_>>();
        assert_eq!(got(&c), [Some(0), Some(1), Some(2), Some(3), None]);
        c.put(h, flows[1].words(), 11, 1);
        assert_eq!(got(&c), [Some(0), Some(11), Some(2), Some(3), None], "updated in place");
        c.put(h, flows[4].words(), 4, 1);
        assert_eq!(got(&c), [None, Some(11), Some(2), Some(3), Some(4)], "the oldest fill left");
        assert_eq!(c.get(h, flows[1].words(), 2), None, "another generation");
        assert_eq!(c.get(h + FLOW_CACHE_SETS, flows[1].words(), 1), Some(11), "the set is the hash modulo the sets");
        assert_eq!(c.get(h + 1, flows[1].words(), 1), None, "another set");
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
