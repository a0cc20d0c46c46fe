//! Virtual IPs: the key the XDP program matches on and what it finds there.

use crate::user_pod;

/// Most VIPs the data plane holds (the issue asks for at least 512).
pub const MAX_VIPS: u32 = 1024;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `(address, port, protocol)` of a VIP, all in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 8);

impl VipKey {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self { addr, port: port.to_be_bytes(), proto, _pad: 0 }
    }

    /// The key as one word, as the VIP table stores it. Never 0 (the protocol is not 0)
    /// and never `u64::MAX` (the pad byte is 0).
    #[inline(always)]
    pub fn packed(&self) -> u64 {
        pack(u32::from_ne_bytes(self.addr), u16::from_ne_bytes(self.port), self.proto)
    }

    /// [`home_slot`] of the packed key.
    #[inline(always)]
    pub fn home_slot(&self) -> u32 {
        home_slot(self.packed())
    }
}

/// [`VipKey::packed`] from the address and port as read from the headers (network byte order
/// read natively): the key's bytes in memory order, as one word.
#[inline(always)]
pub fn pack(addr: u32, port: u16, proto: u8) -> u64 {
    if cfg!(target_endian = "little") {
        u64::from(addr) | u64::from(port) << 32 | u64::from(proto) << 48
    } else {
        let (a, p) = (addr.to_ne_bytes(), port.to_ne_bytes());
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], p[0], p[1], proto, 0])
    }
}

/// First slot of a packed key's probe window in the VIP table: Fibonacci hashing (one
/// multiply; the top bits spread neighbouring addresses and ports).
#[inline(always)]
pub fn home_slot(packed: u64) -> u32 {
    (packed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - VIP_TABLE_SIZE.trailing_zeros())) as u32
}

/// Words of the VIP address filter: a bitmap of 4096 bits, one per hash of a destination
/// address ([`addr_filter_bit`]), set for the address of every VIP. A packet whose
/// destination's bit is clear is for no VIP: the program passes it without reading its
/// TCP or UDP header or probing the VIP table. Userspace sets a bit before it adds a VIP
/// and clears it after the last VIP with that bit is gone, so no VIP is ever filtered out.
pub const VIP_ADDR_FILTER_WORDS: u32 = 64;
/// The `VIP_ADDRS` map holds two filters, interleaved so that a packet finds both words of
/// its bit in one cache line: the gate (even words), which every IPv4 packet meets, and the
/// filter proper (odd words). They are equal while the firewall has no rules; with rules
/// the gate is all ones, so that every packet reaches the firewall (which then reads the
/// filter proper), and the non-VIP path costs nothing more without rules.
pub const VIP_ADDRS_MAP_WORDS: u32 = 2 * VIP_ADDR_FILTER_WORDS;

/// Where the gate's word for filter bit `bit` is in the `VIP_ADDRS` map; the filter proper's
/// is the next one.
#[inline(always)]
pub const fn gate_word(bit: u32) -> u32 {
    bit / 64 * 2
}

/// The filter bit of a destination address (0..4096): Fibonacci hashing, one multiply.
#[inline(always)]
pub fn addr_filter_bit(addr: [u8; 4]) -> u32 {
    u32::from_ne_bytes(addr).wrapping_mul(0x9e37_79b1) >> (32 - (VIP_ADDR_FILTER_WORDS * 64).trailing_zeros())
}

/// The filter words for a set of VIP addresses.
pub fn addr_filter<I: IntoIterator<Item = [u8; 4]>>(addrs: I) -> [u64; VIP_ADDR_FILTER_WORDS as usize] {
    let mut words = [0u64; VIP_ADDR_FILTER_WORDS as usize];
    for a in addrs {
        let bit = addr_filter_bit(a);
        words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    words
}

/// Slots of the VIP table: an open-addressing hash table in a BPF array, eight slots per
/// VIP at most load. The kernel finds a VIP with at most [`VIP_PROBES`] inlined array reads
/// instead of a hash-map helper call (jhash and a bucket walk): the lookup every packet,
/// VIP or not, pays first.
pub const VIP_TABLE_SIZE: u32 = 8192;
const _: () = assert!(VIP_TABLE_SIZE.is_power_of_two() && VIP_TABLE_SIZE >= 8 * MAX_VIPS);
/// Longest probe sequence; userspace never places a VIP further from its home slot.
pub const VIP_PROBES: u32 = 8;
/// A slot that never held a VIP: ends a probe sequence.
pub const SLOT_EMPTY: u64 = 0;
/// A slot whose VIP was removed: probing continues past it; a new VIP may take it.
pub const SLOT_TOMBSTONE: u64 = u64::MAX;

/// A VIP table slot: a packed key ([`VipKey::packed`]) and its metadata.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipSlot {
    pub key: u64,
    pub meta: VipMeta,
}
const _: () = assert!(core::mem::size_of::<VipSlot>() == 24);

/// Finds `key` in the VIP table, reading slots with `get` (the BPF array in the kernel, a
/// slice on the host). Stops at the first empty slot or after [`VIP_PROBES`] slots.
#[inline(always)]
pub fn find_vip<'a, F>(key: &VipKey, get: F) -> Option<&'a VipMeta>
where
    F: Fn(u32) -> Option<&'a VipSlot>,
{
    find_packed_vip(key.packed(), get)
}

/// [`find_vip`] by the packed key ([`pack`]).
#[inline(always)]
pub fn find_packed_vip<'a, F>(packed: u64, get: F) -> Option<&'a VipMeta>
where
    F: Fn(u32) -> Option<&'a VipSlot>,
{
    let home = home_slot(packed);
    let mut i = 0;
    while i < VIP_PROBES {
        let slot = get((home + i) & (VIP_TABLE_SIZE - 1))?;
        if slot.key == packed {
            return Some(&slot.meta);
        }
        if slot.key == SLOT_EMPTY {
            return None;
        }
        i += 1;
    }
    None
}

/// How packets of a VIP reach its backends (direct server return in both cases).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMode {
    /// IPIP encapsulation to the backend; next hop from the kernel FIB.
    Ipip = 0,
    /// Backend on the balancer's own segment: only the Ethernet addresses change.
    L2 = 1,
}

/// Value of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index of this VIP's two rings and its counters.
    pub vip_num: u32,
    /// The active ring: its length (low 16 bits; 0 means no backend, packets are dropped)
    /// and which of the VIP's two rings it is (bit 16). One aligned word, so that a reader
    /// never pairs one ring with the other's length: userspace writes the inactive ring, then
    /// flips this word (double buffering; no packet sees a half-written ring).
    pub ring: u32,
    /// A [`ForwardMode`] as u32.
    pub mode: u32,
    /// [`VIP_RESTRICTED`], or 0.
    pub flags: u32,
}

/// The VIP takes packets only from sources its allow list holds (the `VIP_ALLOW` trie,
/// keyed by [`allow_key`]); the others are dropped.
pub const VIP_RESTRICTED: u32 = 1;
/// Entries of the `VIP_ALLOW` trie, over every VIP.
pub const MAX_VIP_ALLOW: u32 = 16_384;

/// The `VIP_ALLOW` trie's key data for a source of VIP `vip_num`: the VIP number's bytes,
/// most significant first, then the address's bytes, as native words. A rule for prefix
/// `p` of that VIP has prefix length `32 + p.len` over the same data.
#[inline(always)]
pub const fn allow_key(vip_num: u32, addr_word: u32) -> [u32; 2] {
    [vip_num.to_be(), addr_word]
}
const _: () = assert!(core::mem::size_of::<VipMeta>() == 16);

impl VipMeta {
    #[inline(always)]
    pub fn is_l2(&self) -> bool {
        self.mode == ForwardMode::L2 as u32
    }
    #[inline(always)]
    pub fn is_restricted(&self) -> bool {
        self.flags & VIP_RESTRICTED != 0
    }
    #[inline(always)]
    pub fn ring_len(&self) -> u32 {
        self.ring & 0xffff
    }
    /// 0 or 1: which of the VIP's two rings is active.
    #[inline(always)]
    pub fn ring_half(&self) -> u32 {
        (self.ring >> 16) & 1
    }
    pub const fn ring_word(len: u32, half: u32) -> u32 {
        (len & 0xffff) | ((half & 1) << 16)
    }
}

user_pod!(VipKey, VipMeta, VipSlot);

/// Userspace placement of VIPs in the table (linear probing, tombstones on removal, so an
/// installed VIP never moves and its lookups never miss while others change).
#[cfg(any(test, feature = "user"))]
pub mod table {
    use super::*;
    use alloc::{vec, vec::Vec};

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum VipTableError {
        /// All slots of the key's probe window hold other VIPs.
        Crowded,
    }

    pub struct VipTable {
        keys: Vec<u64>,
    }

    impl Default for VipTable {
        fn default() -> Self {
            Self { keys: vec![SLOT_EMPTY; VIP_TABLE_SIZE as usize] }
        }
    }

    impl VipTable {
        fn window(key: &VipKey) -> impl Iterator<Item = usize> {
            let home = key.home_slot();
            (0..VIP_PROBES).map(move |i| ((home + i) & (VIP_TABLE_SIZE - 1)) as usize)
        }

        /// The slot holding `key`, if any.
        pub fn find(&self, key: &VipKey) -> Option<u32> {
            for i in Self::window(key) {
                match self.keys[i] {
                    k if k == key.packed() => return Some(i as u32),
                    SLOT_EMPTY => return None,
                    _ => {}
                }
            }
            None
        }

        /// The slot for `key`: where it already is, or the first free slot of its window.
        /// Returns the slot and whether the key is new.
        pub fn place(&mut self, key: &VipKey) -> Result<(u32, bool), VipTableError> {
            if let Some(i) = self.find(key) {
                return Ok((i, false));
            }
            let free = Self::window(key)
                .find(|&i| matches!(self.keys[i], SLOT_EMPTY | SLOT_TOMBSTONE))
                .ok_or(VipTableError::Crowded)?;
            self.keys[free] = key.packed();
            Ok((free as u32, true))
        }

        /// Removes `key`, leaving a tombstone; returns its former slot.
        pub fn remove(&mut self, key: &VipKey) -> Option<u32> {
            let i = self.find(key)?;
            self.keys[i as usize] = SLOT_TOMBSTONE;
            Some(i)
        }

        /// What the slot now holds (for writing it to the kernel).
        pub fn key_at(&self, slot: u32) -> u64 {
            self.keys[slot as usize]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{table::*, *};
    use alloc::vec::Vec;

    #[test]
    fn pack_is_the_keys_bytes_in_memory_order() {
        for (addr, port, proto) in [([10, 0, 0, 1], 80u16, 6u8), ([255, 1, 128, 7], 65535, 17), ([0, 0, 0, 0], 1, 6)] {
            let k = VipKey::new(addr, port, proto);
            let p = port.to_be_bytes();
            let bytes = u64::from_ne_bytes([addr[0], addr[1], addr[2], addr[3], p[0], p[1], proto, 0]);
            assert_eq!(k.packed(), bytes);
            assert_eq!(pack(u32::from_ne_bytes(addr), u16::from_ne_bytes(p), proto), bytes);
            assert_eq!(k.home_slot(), home_slot(bytes));
        }
    }

    fn kernel_view(t: &VipTable, metas: &[(VipKey, u32)]) -> Vec<VipSlot> {
        let mut slots = alloc::vec![VipSlot::default(); VIP_TABLE_SIZE as usize];
        for i in 0..VIP_TABLE_SIZE {
            slots[i as usize].key = t.key_at(i);
        }
        for (k, num) in metas {
            if let Some(i) = t.find(k) {
                slots[i as usize].meta.vip_num = *num;
            }
        }
        slots
    }

    #[test]
    fn addr_filter_has_the_bit_of_every_vip_and_few_others() {
        let vips: Vec<[u8; 4]> = (0..512u32).map(|i| [10, 100, (i >> 8) as u8, i as u8]).collect();
        let words = addr_filter(vips.iter().copied());
        let has = |a: [u8; 4]| {
            let b = addr_filter_bit(a);
            assert!(b < VIP_ADDR_FILTER_WORDS * 64);
            words[(b / 64) as usize] >> (b % 64) & 1 == 1
        };
        assert!(vips.iter().all(|&a| has(a)), "no VIP is ever filtered out");
        // 512 VIP addresses set at most 512 of 4096 bits: most other addresses are filtered.
        let others = (0..65536u32).filter(|&i| has([192, 168, (i >> 8) as u8, i as u8])).count();
        assert!(others < 65536 / 4, "{others} of 65536 other addresses pass the filter");
        assert_eq!(addr_filter(core::iter::empty()), [0; VIP_ADDR_FILTER_WORDS as usize]);
    }

    #[test]
    fn packed_keys_are_never_empty_or_tombstones() {
        for k in [VipKey::new([0, 0, 0, 0], 0, PROTO_TCP), VipKey::new([255; 4], 65535, PROTO_UDP)] {
            assert_ne!(k.packed(), SLOT_EMPTY);
            assert_ne!(k.packed(), SLOT_TOMBSTONE);
        }
    }

    #[test]
    fn a_thousand_vips_fit_and_are_found_by_the_kernel_lookup() {
        let mut t = VipTable::default();
        let mut metas = Vec::new();
        // Worst case for the hash: one address, consecutive ports, both protocols.
        for n in 0..MAX_VIPS {
            let k = VipKey::new([10, 0, (n / 256) as u8, n as u8], 80 + (n % 3) as u16, if n % 2 == 0 { PROTO_TCP } else { PROTO_UDP });
            t.place(&k).expect("fits");
            metas.push((k, n));
        }
        let slots = kernel_view(&t, &metas);
        for (k, n) in &metas {
            let got = find_vip(k, |i| slots.get(i as usize)).map(|m| m.vip_num);
            assert_eq!(got, Some(*n), "{k:?}");
        }
        let absent = VipKey::new([10, 9, 9, 9], 80, PROTO_TCP);
        assert_eq!(find_vip(&absent, |i| slots.get(i as usize)), None);
    }

    #[test]
    fn removal_leaves_others_reachable_and_slots_reusable() {
        let mut t = VipTable::default();
        // Keys sharing a home slot: find some by search.
        let base = VipKey::new([10, 0, 0, 1], 80, PROTO_TCP);
        let mut same_home: Vec<VipKey> = (2..=255u8)
            .flat_map(|a| (0..=65535u16).map(move |p| VipKey::new([10, 0, 0, a], p, PROTO_TCP)))
            .filter(|k| k.home_slot() == base.home_slot())
            .take(3)
            .collect();
        same_home.insert(0, base);
        let slots: Vec<u32> = same_home.iter().map(|k| t.place(k).unwrap().0).collect();
        assert_eq!(slots, [0, 1, 2, 3].map(|i| (base.home_slot() + i) & (VIP_TABLE_SIZE - 1)));
        assert_eq!(t.remove(&same_home[1]), Some(slots[1]));
        assert_eq!(t.find(&same_home[1]), None);
        // The VIPs behind the tombstone are still found.
        assert_eq!(t.find(&same_home[3]), Some(slots[3]));
        let view = kernel_view(&t, &[(same_home[3], 33)]);
        assert_eq!(find_vip(&same_home[3], |i| view.get(i as usize)).map(|m| m.vip_num), Some(33));
        // Re-adding takes the tombstone; placing an existing key is idempotent.
        assert_eq!(t.place(&same_home[1]), Ok((slots[1], true)));
        assert_eq!(t.place(&same_home[1]), Ok((slots[1], false)));
    }

    #[test]
    fn a_full_window_is_an_error() {
        let mut t = VipTable::default();
        let base = VipKey::new([10, 0, 0, 1], 80, PROTO_TCP);
        let crowd: Vec<VipKey> = (0..=255u8)
            .flat_map(|a| (0..=65535u16).map(move |p| VipKey::new([10, 0, 0, a], p, PROTO_TCP)))
            .filter(|k| k.home_slot() == base.home_slot())
            .take(VIP_PROBES as usize + 1)
            .collect();
        for k in &crowd[..VIP_PROBES as usize] {
            t.place(k).unwrap();
        }
        assert_eq!(t.place(&crowd[VIP_PROBES as usize]), Err(VipTableError::Crowded));
    }
}
