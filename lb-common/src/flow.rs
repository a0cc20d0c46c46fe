//! Flow keys and the deterministic 5-tuple hash.

use crate::user_pod;

/// Default number of flows the flow table holds (see [`FlowSet`]); the daemon may set another.
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

/// Ways of a flow-table set: eight 8-byte entries, one 64-byte cache line.
pub const FLOW_WAYS: usize = 8;

/// Sets of the flow table for a table meant to hold `flows` flows: twice as many slots as
/// flows (see [`FlowSet`]), at least one set.
pub const fn flow_sets(flows: u32) -> u32 {
    let sets = flows / (FLOW_WAYS as u32 / 2);
    if sets == 0 {
        1
    } else {
        sets
    }
}

/// Bits of an entry: tag (36) | backend index (12) | last seen (16).
const TAG_SHIFT: u32 = 28;
const BACKEND_SHIFT: u32 = 16;
const BACKEND_MASK: u64 = 0xfff;
const TAG_MASK: u64 = (1 << 36) - 1;
const _: () = assert!(crate::backend::MAX_BACKENDS as u64 == BACKEND_MASK + 1);

/// Jiffies per unit of an entry's "last seen" time: about a quarter second at HZ=1000,
/// a second at HZ=250. 16 bits of it wrap after 4.6 hours (18 at HZ=250); the time only
/// chooses which entry of a full set to replace, so a wrap costs nothing but that choice.
pub const FLOW_TIME_SHIFT: u32 = 8;

/// Where a flow lives in the flow table: its set and its tag, both from one seeded 64-bit
/// hash of the 5-tuple ([`FlowKey::hash64`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSlot {
    pub set: u32,
    tag: u64,
}

impl FlowSlot {
    #[inline(always)]
    pub fn new(hash: u64, sets: u32) -> Self {
        // The set from the high half ("fastrange": any number of sets, no division), the tag
        // from the low 36 bits, never 0 (an empty entry).
        let set = ((hash >> 32) * u64::from(sets) >> 32) as u32;
        Self { set, tag: (hash & TAG_MASK) | 1 }
    }

    /// The entry that pins this flow to `backend`, seen at `now` (a jiffies count).
    #[inline(always)]
    pub fn entry(&self, backend: u32, now: u64) -> u64 {
        self.tag << TAG_SHIFT | (u64::from(backend) & BACKEND_MASK) << BACKEND_SHIFT | (now >> FLOW_TIME_SHIFT) & 0xffff
    }

    #[inline(always)]
    pub fn matches(&self, entry: u64) -> bool {
        entry >> TAG_SHIFT == self.tag
    }
}

/// The backend an entry pins its flow to.
#[inline(always)]
pub fn entry_backend(entry: u64) -> u32 {
    (entry >> BACKEND_SHIFT & BACKEND_MASK) as u32
}

/// The flow's tag in an entry (0 for an empty entry): with the set, what identifies the
/// flow in every table of the same size and hash seed (flow-state sync between balancers).
#[inline(always)]
pub fn entry_tag(entry: u64) -> u64 {
    entry >> TAG_SHIFT
}

/// The time unit an entry was last seen in (see [`FLOW_TIME_SHIFT`]).
#[inline(always)]
pub fn entry_time(entry: u64) -> u16 {
    entry as u16
}

/// An entry from its parts: `tag` as [`entry_tag`] gives it (nonzero), `backend`, and the
/// time unit `unit` (jiffies >> [`FLOW_TIME_SHIFT`]).
#[inline(always)]
pub fn make_entry(tag: u64, backend: u32, unit: u16) -> u64 {
    (tag & TAG_MASK) << TAG_SHIFT | (u64::from(backend) & BACKEND_MASK) << BACKEND_SHIFT | u64::from(unit)
}

/// Whether the entry was last seen in the time unit of `now` (jiffies): refreshing it
/// again would only cost a store.
#[inline(always)]
pub fn entry_fresh(entry: u64, now: u64) -> bool {
    (entry ^ (now >> FLOW_TIME_SHIFT)) & 0xffff == 0
}

/// One set of the flow table: the flow table is an array of these, a set-associative cache
/// of pinned flows in place of a kernel LRU hash map. A flow's set and tag come from a
/// seeded hash of its 5-tuple; each entry is one 8-byte word (tag, backend, last seen), so
/// a lookup is one cache line and eight compares, an insert one store, and every CPU reads
/// and writes entries whole (no lock, no torn entry: 8-byte stores are atomic). A full set
/// replaces the entry seen longest ago, the LRU rule within the set. Twice as many slots as
/// the configured flows keeps set overflow (nine live flows hashed to one set) rare: at the
/// configured number of live flows it moves under 1 % of them, at half of it 0.02 %.
///
/// Two flows with the same set and tag (one chance in 2^36 per pair in a set) share an
/// entry: the second one is pinned where the first one is, and stays there. That costs the
/// round-robin one choice, nothing else.
///
/// Known race: a CPU refreshing an entry's time (at most once per time unit per flow) while
/// another CPU replaces that entry for a new flow of the same set can put the old entry
/// back; the new flow's next packet then finds no entry and is placed by the hash fallback.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSet {
    pub ways: [u64; FLOW_WAYS],
}
const _: () = assert!(core::mem::size_of::<FlowSet>() == 64);

impl FlowSet {
    /// The way holding the flow, and its entry.
    #[inline(always)]
    pub fn find(&self, slot: &FlowSlot) -> Option<(usize, u64)> {
        let mut i = 0;
        while i < FLOW_WAYS {
            let e = self.ways[i];
            if slot.matches(e) {
                return Some((i, e));
            }
            i += 1;
        }
        None
    }

    /// The way a new flow takes at `now` (jiffies): an empty one, else the one seen longest ago
    /// (the first of equals). (A branch-free maximum measured no faster: the ages in a set
    /// are mostly equal, so these jumps are predicted well.)
    #[inline(always)]
    pub fn victim(&self, now: u64) -> usize {
        let now = (now >> FLOW_TIME_SHIFT) as u16;
        let mut best = 0;
        let mut best_age = 0u32;
        let mut i = 0;
        while i < FLOW_WAYS {
            let e = self.ways[i];
            // An empty entry is older than any: age 0x10000.
            let age = if e == 0 { 0x1_0000 } else { u32::from(now.wrapping_sub(e as u16)) };
            if age > best_age {
                best_age = age;
                best = i;
            }
            i += 1;
        }
        best
    }
}

user_pod!(FlowKey, FlowValue, FlowSet);

#[inline(always)]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

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

/// A 5-tuple as the data plane reads it from the headers: each address, and both ports
/// (the source port's two bytes, then the destination port's), as one word each in memory
/// order (network byte order read natively), and the protocol. [`FlowKey`] is the same tuple
/// as byte arrays. The program hashes these words as they come: assembling them from bytes
/// cost it dozens of shifts per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Tuple {
    pub src: u32,
    pub dst: u32,
    pub ports: u32,
    pub proto: u8,
}

impl Tuple {
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        let ports = self.ports.to_ne_bytes();
        FlowKey {
            src: self.src.to_ne_bytes(),
            dst: self.dst.to_ne_bytes(),
            sport: [ports[0], ports[1]],
            dport: [ports[2], ports[3]],
            proto: self.proto,
            _pad1: 0,
            _pad2: 0,
        }
    }

    /// The destination port's two bytes read natively.
    #[inline(always)]
    pub fn dport_word(&self) -> u16 {
        let ports = self.ports.to_ne_bytes();
        u16::from_ne_bytes([ports[2], ports[3]])
    }

    /// The tuple as two words: both addresses; both ports and the protocol.
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        if cfg!(target_endian = "little") {
            [u64::from(self.src) | u64::from(self.dst) << 32, u64::from(self.ports) | u64::from(self.proto) << 32]
        } else {
            let (s, d, p) = (self.src.to_ne_bytes(), self.dst.to_ne_bytes(), self.ports.to_ne_bytes());
            [
                u64::from_ne_bytes([s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]]),
                u64::from_ne_bytes([p[0], p[1], p[2], p[3], self.proto, 0, 0, 0]),
            ]
        }
    }

    /// The flow table's hash of the 5-tuple, keyed by `seed` (random per table, so that
    /// nobody can aim flows at one set from outside): murmur3's 64-bit finaliser over the
    /// tuple's two words.
    #[inline(always)]
    pub fn hash64(&self, seed: u64) -> u64 {
        let [a, b] = self.words();
        let mut h = (a ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= b;
        fmix64(h)
    }

    /// A deterministic hash of the 5-tuple, the same on every CPU, every balancer and after
    /// every restart. It places TCP packets that are not a SYN and have no flow entry
    /// (the entry was evicted, or the table was lost in a restart): the choice depends on
    /// the flow alone, so all of the flow's later packets, and any other balancer with the
    /// same ring, agree on one backend instead of scattering the flow.
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        // The words as little-endian numbers, whatever the host (a no-op on little-endian).
        let mut h = fmix(u32::from_le(self.src) ^ 0x9e37_79b9);
        h = fmix(h ^ u32::from_le(self.dst));
        h = fmix(h ^ u32::from_le(self.ports));
        fmix(h ^ u32::from(self.proto))
    }
}

impl FlowKey {
    #[inline(always)]
    pub fn tuple(&self) -> Tuple {
        Tuple {
            src: u32::from_ne_bytes(self.src),
            dst: u32::from_ne_bytes(self.dst),
            ports: u32::from_ne_bytes([self.sport[0], self.sport[1], self.dport[0], self.dport[1]]),
            proto: self.proto,
        }
    }

    /// [`Tuple::words`].
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        self.tuple().words()
    }

    /// [`Tuple::hash64`].
    #[inline(always)]
    pub fn hash64(&self, seed: u64) -> u64 {
        self.tuple().hash64(seed)
    }

    /// [`Tuple::hash`].
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        self.tuple().hash()
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
    fn an_entry_comes_apart_into_what_made_it() {
        let slot = FlowSlot::new(0x0123_4567_89ab_cdef, 65_536);
        let e = slot.entry(4095, 0x0042_3500);
        assert!(slot.matches(make_entry(entry_tag(e), 7, 9)));
        assert_eq!(make_entry(entry_tag(e), entry_backend(e), entry_time(e)), e);
        assert_eq!((entry_backend(e), entry_time(e)), (4095, 0x4235));
        assert_eq!(entry_tag(0), 0);
        assert_ne!(entry_tag(e), 0, "a tag is never 0");
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

    /// The word-based hashes give what the byte-based ones of the previous version gave: a
    /// restarted daemon keeps its pinned flow table (same seed), so its sets must not move.
    #[test]
    fn tuple_hashes_are_those_of_the_byte_arrays() {
        let old_words = |k: &FlowKey| {
            [
                u64::from_ne_bytes([k.src[0], k.src[1], k.src[2], k.src[3], k.dst[0], k.dst[1], k.dst[2], k.dst[3]]),
                u64::from_ne_bytes([k.sport[0], k.sport[1], k.dport[0], k.dport[1], k.proto, 0, 0, 0]),
            ]
        };
        let old_hash = |k: &FlowKey| {
            let w2 = u32::from_le_bytes([k.sport[0], k.sport[1], k.dport[0], k.dport[1]]);
            let mut h = fmix(u32::from_le_bytes(k.src) ^ 0x9e37_79b9);
            h = fmix(h ^ u32::from_le_bytes(k.dst));
            h = fmix(h ^ w2);
            fmix(h ^ u32::from(k.proto))
        };
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..1000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let b = x.to_le_bytes();
            let k = FlowKey { src: [b[0], b[1], b[2], b[3]], dst: [b[4], b[5], b[6], b[7]], sport: [b[1], b[7]], dport: [b[3], b[5]], proto: b[2] | 1, _pad1: 0, _pad2: 0 };
            let t = k.tuple();
            assert_eq!(t.key(), k);
            assert_eq!(t.words(), old_words(&k));
            assert_eq!(t.hash(), old_hash(&k));
            assert_eq!(t.hash64(x), {
                let [a, b] = old_words(&k);
                fmix64((a ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b)
            });
            assert_eq!(t.dport_word(), u16::from_ne_bytes(k.dport));
        }
    }

    /// The victim is the first way of the greatest age (empty ways oldest), for
    /// random sets with empty ways, equal ages and ages across the 16-bit wrap.
    #[test]
    fn victim_is_the_first_of_the_oldest() {
        let reference = |s: &FlowSet, now: u64| {
            let now = (now >> FLOW_TIME_SHIFT) as u16;
            let age = |e: u64| if e == 0 { 0x1_0000 } else { u32::from(now.wrapping_sub(e as u16)) };
            (0..FLOW_WAYS).fold(0, |best, i| if age(s.ways[i]) > age(s.ways[best]) { i } else { best })
        };
        let mut x = 7u64;
        let mut next = || {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            x >> 16
        };
        for _ in 0..20_000 {
            let now = next() << FLOW_TIME_SHIFT;
            let mut s = FlowSet::default();
            for w in &mut s.ways {
                *w = match next() % 8 {
                    0 => 0,
                    // few distinct times: equal ages
                    1..=4 => (next() | 1) << TAG_SHIFT | (now >> FLOW_TIME_SHIFT).wrapping_sub(next() % 3) & 0xffff,
                    _ => (next() | 1) << TAG_SHIFT | next() & 0xffff,
                };
            }
            assert_eq!(s.victim(now), reference(&s, now), "{s:x?} at {now}");
        }
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
    fn flow_set_finds_its_flows_and_replaces_the_one_seen_longest_ago() {
        let sets = 1000;
        let flows: Vec<FlowSlot> = (0..9u64).map(|i| FlowSlot { set: 3, tag: i * 0x1234_5678 + 1 }).collect();
        let mut s = FlowSet::default();
        assert_eq!(s.find(&flows[0]), None, "empty");
        // Eight flows fill the empty ways first, seen at times 0..8 (units).
        for (i, f) in flows[..8].iter().enumerate() {
            let t = (i as u64) << FLOW_TIME_SHIFT;
            let w = s.victim(t);
            assert_eq!(s.ways[w], 0, "an empty way first");
            s.ways[w] = f.entry(i as u32 + 100, t);
        }
        for (i, f) in flows[..8].iter().enumerate() {
            let (_, e) = s.find(f).unwrap();
            assert_eq!(entry_backend(e), i as u32 + 100);
        }
        assert_eq!(s.find(&flows[8]), None);
        // Refresh flow 0: flow 1 is now the one seen longest ago.
        let now = 20u64 << FLOW_TIME_SHIFT;
        let (w0, e0) = s.find(&flows[0]).unwrap();
        assert!(!entry_fresh(e0, now));
        s.ways[w0] = flows[0].entry(entry_backend(e0), now);
        assert!(entry_fresh(s.ways[w0], now + 1));
        let (w1, _) = s.find(&flows[1]).unwrap();
        assert_eq!(s.victim(now), w1);
        // Time wraps at 16 bits: ages stay right across the wrap.
        let wrapped = (0x1_0000u64 + 25) << FLOW_TIME_SHIFT;
        assert_eq!(s.victim(wrapped), w1);
        // The backend field keeps 12 bits, the tag never collides with an empty entry.
        let f = FlowSlot::new(u64::MAX, sets);
        assert!(f.set < sets);
        assert_eq!(entry_backend(f.entry(4095, 0)), 4095);
        assert!(f.matches(f.entry(7, 0)) && !f.matches(0));
        assert!(FlowSlot::new(0, sets).matches(FlowSlot::new(0, sets).entry(0, 0)));
        assert_ne!(FlowSlot::new(0, sets).entry(0, 0), 0);
    }

    #[test]
    fn flow_slots_spread_over_the_sets_and_depend_on_the_seed() {
        let sets = 4096u32;
        let mut per_set = alloc::vec![0u32; sets as usize];
        for port in 0..40_960u16 {
            per_set[FlowSlot::new(key([10, 1, 0, 1], port, 80, 6).hash64(1), sets).set as usize] += 1;
        }
        // 10 flows per set on average; sequential ports must not pile up.
        assert!(per_set.iter().all(|&n| n <= 30), "max {}", per_set.iter().max().unwrap());
        let k = key([10, 1, 0, 1], 1, 80, 6);
        assert_ne!(k.hash64(1), k.hash64(2));
        assert_eq!(flow_sets(262_144), 65_536);
        assert_eq!(flow_sets(1), 1);
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
