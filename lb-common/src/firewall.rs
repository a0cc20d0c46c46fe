//! The XDP firewall: rules by source prefix, checked for every IPv4 packet that reaches the
//! balancer's interfaces before anything else is parsed, so that traffic from a denied
//! network costs one lookup and never reaches a VIP, a backend or the balancer's own stack.
//!
//! A rule is an IPv4 prefix and a verdict; the longest prefix that holds the packet's source
//! decides (an LPM trie, the kernel's `BPF_MAP_TYPE_LPM_TRIE`), so `allow` rules carve
//! exceptions out of wider `deny` ones (deny `0.0.0.0/0`, allow `10.0.0.0/8`: only 10/8 gets
//! in). A source no rule holds is allowed. Each rule counts the packets and bytes it decided
//! (per CPU). The trie's value is the rule's index into those counters, with
//! [`VERDICT_ALLOW`] set for an allow rule. With no rule at all the program does not look
//! (`LbConfig::firewall_rules` is 0), so the firewall costs nothing until it is used.
//!
//! The kernel's trie walks a node per prefix bit that branches, each a pointer to chase:
//! with a blocklist of 1,500 prefixes it cost a packet 70-120 ns. So a direct table of the
//! 65,536 /16 blocks comes first (DPDK's `rte_lpm` does the same with /24, its DIR-24-8):
//! for each block, no rule holds any of its addresses ([`DIR_NONE`]), or one rule of /16
//! or shorter decides all of them (the entry holds that rule), or a longer rule lies inside
//! it ([`DIR_TRIE`]: ask the trie). A packet reads one 64-byte line of the table, and only
//! sources in a block with a longer rule walk the trie. [`build_dir`] makes the table.

use crate::user_pod;

/// Rules the trie holds at most (a blocklist such as Spamhaus DROP has about 1,500).
pub const MAX_RULES: u32 = 16_384;
/// Set in a trie value: the rule allows (else it denies).
pub const VERDICT_ALLOW: u32 = 1 << 31;

/// The rule index (into the counters) of a trie value.
#[inline(always)]
pub const fn rule_index(value: u32) -> u32 {
    value & !VERDICT_ALLOW
}

/// Whether a trie value denies.
#[inline(always)]
pub const fn denies(value: u32) -> bool {
    value & VERDICT_ALLOW == 0
}

/// Entries of the direct table: one per /16 block, 32 to a 64-byte line.
pub const DIR_ENTRIES: u32 = 1 << 16;
pub const DIR_PER_LINE: u32 = 32;
pub const DIR_LINES: u32 = DIR_ENTRIES / DIR_PER_LINE;
/// No rule holds any address of the block.
pub const DIR_NONE: u16 = 0;
/// A rule longer than /16 lies in the block: the trie decides.
pub const DIR_TRIE: u16 = u16::MAX;

/// One line of the direct table (see the module's description).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirLine {
    pub entries: [u16; DIR_PER_LINE as usize],
}
const _: () = assert!(core::mem::size_of::<DirLine>() == 64);

impl Default for DirLine {
    fn default() -> Self {
        DirLine { entries: [DIR_NONE; DIR_PER_LINE as usize] }
    }
}

user_pod!(DirLine);

/// The direct-table entry of a rule that decides a whole block, from its trie value: the
/// rule index and the allow bit in 15 bits, plus one (so neither is `DIR_NONE` nor
/// `DIR_TRIE`).
#[inline(always)]
pub const fn dir_entry(value: u32) -> u16 {
    (rule_index(value) | if denies(value) { 0 } else { 1 << 14 }) as u16 + 1
}

/// The trie value of a direct entry that is neither `DIR_NONE` nor `DIR_TRIE`.
#[inline(always)]
pub const fn dir_value(entry: u16) -> u32 {
    let e = (entry - 1) as u32;
    (e & ((1 << 14) - 1)) | if e & (1 << 14) != 0 { VERDICT_ALLOW } else { 0 }
}
const _: () = assert!(MAX_RULES <= 1 << 14);

/// The /16 block of an address given as the program reads it: the native word of its four
/// bytes (first byte lowest on this little-endian target, as in the packet).
#[inline(always)]
pub const fn dir_block(addr_word: u32) -> u32 {
    (addr_word & 0xff) << 8 | (addr_word >> 8) & 0xff
}

/// The direct table for rules given with their trie values: `DIR_ENTRIES` entries, in
/// block order (line `i` holds blocks `32 i .. 32 i + 32`).
#[cfg(any(test, feature = "user"))]
pub fn build_dir(rules: &[(Prefix, u32)]) -> alloc::vec::Vec<u16> {
    let mut dir = alloc::vec![DIR_NONE; DIR_ENTRIES as usize];
    let mut by_len: alloc::vec::Vec<&(Prefix, u32)> = rules.iter().collect();
    // Shorter first, so that a longer rule of /16 or less overwrites the blocks it holds.
    by_len.sort_by_key(|(p, _)| p.len);
    for &&(p, value) in &by_len {
        let first = u32::from_be_bytes(p.addr) >> 16;
        if p.len <= 16 {
            let count = 1u32 << (16 - p.len);
            for b in first..first + count {
                dir[b as usize] = dir_entry(value);
            }
        } else {
            dir[first as usize] = DIR_TRIE;
        }
    }
    dir
}

/// What one rule decided, per CPU: packets and bytes (IPv4 total length plus the link
/// header, as the VIP counters count).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<RuleStats>() == 16);

impl core::ops::AddAssign for RuleStats {
    fn add_assign(&mut self, o: Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
    }
}

user_pod!(RuleStats);

/// An IPv4 prefix: the address (host bits zero) and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: [u8; 4],
    pub len: u8,
}

impl Prefix {
    /// The prefix of `len` bits holding `addr`, if `len` <= 32 and `addr` has no bit set past
    /// `len` (a rule like `10.1.2.3/8` is a mistake more often than it is meant as `10/8`).
    pub const fn new(addr: [u8; 4], len: u8) -> Option<Prefix> {
        if len > 32 || u32::from_be_bytes(addr) & !Self::mask(len) != 0 {
            return None;
        }
        Some(Prefix { addr, len })
    }

    /// The network mask of a `len`-bit prefix, host order.
    pub const fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len as u32) }
    }

    /// Whether the prefix holds `addr`.
    pub const fn contains(&self, addr: [u8; 4]) -> bool {
        u32::from_be_bytes(addr) & Self::mask(self.len) == u32::from_be_bytes(self.addr)
    }
}

/// A rule: packets whose source the prefix holds (and no longer prefix of another rule)
/// are dropped, or let through when `allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub prefix: Prefix,
    pub allow: bool,
}

impl Rule {
    pub const fn verdict(&self) -> &'static str {
        if self.allow { "allow" } else { "deny" }
    }
}

/// The rule that decides a packet from `addr`, as the program's trie finds it: the longest
/// prefix that holds it. (Userspace's reference; the program asks the kernel's trie.)
pub fn decide(rules: &[Rule], addr: [u8; 4]) -> Option<&Rule> {
    rules.iter().filter(|r| r.prefix.contains(addr)).max_by_key(|r| r.prefix.len)
}

/// Why a prefix was not understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixError {
    /// Not `a.b.c.d` or `a.b.c.d/len`.
    Syntax,
    /// Length above 32.
    Length,
    /// Bits set past the length; the prefix that was probably meant.
    HostBits(Prefix),
}

impl core::fmt::Display for PrefixError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PrefixError::Syntax => f.write_str("expected an IPv4 address or prefix, like 203.0.113.7 or 203.0.113.0/24"),
            PrefixError::Length => f.write_str("a prefix length is 0..=32"),
            PrefixError::HostBits(p) => write!(f, "bits set past the prefix length (did you mean {p}?)"),
        }
    }
}

impl core::str::FromStr for Prefix {
    type Err = PrefixError;

    /// `a.b.c.d/len`, or `a.b.c.d` alone for one address (`/32`).
    fn from_str(s: &str) -> Result<Prefix, PrefixError> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                (a, l.parse::<u8>().map_err(|_| PrefixError::Length)?)
            }
            Some(_) => return Err(PrefixError::Syntax),
            None => (s, 32),
        };
        let addr = addr.parse::<core::net::Ipv4Addr>().map_err(|_| PrefixError::Syntax)?.octets();
        if len > 32 {
            return Err(PrefixError::Length);
        }
        Prefix::new(addr, len).ok_or_else(|| {
            let net = (u32::from_be_bytes(addr) & Prefix::mask(len)).to_be_bytes();
            PrefixError::HostBits(Prefix { addr: net, len })
        })
    }
}

impl core::fmt::Display for Prefix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.addr;
        write!(f, "{a}.{b}.{c}.{d}/{}", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn prefixes_parse_and_print() {
        let cases: &[(&str, Result<Prefix, PrefixError>)] = &[
            ("203.0.113.0/24", Ok(Prefix { addr: [203, 0, 113, 0], len: 24 })),
            ("203.0.113.7", Ok(Prefix { addr: [203, 0, 113, 7], len: 32 })),
            ("0.0.0.0/0", Ok(Prefix { addr: [0; 4], len: 0 })),
            ("10.0.0.0/8", Ok(Prefix { addr: [10, 0, 0, 0], len: 8 })),
            ("255.255.255.255/32", Ok(Prefix { addr: [255; 4], len: 32 })),
            ("10.1.2.3/8", Err(PrefixError::HostBits(Prefix { addr: [10, 0, 0, 0], len: 8 }))),
            ("1.0.0.0/0", Err(PrefixError::HostBits(Prefix { addr: [0; 4], len: 0 }))),
            ("10.0.0.0/33", Err(PrefixError::Length)),
            ("10.0.0.0/300", Err(PrefixError::Length)),
            ("10.0.0.0/", Err(PrefixError::Syntax)),
            ("10.0.0.0/-1", Err(PrefixError::Syntax)),
            ("10.0.0/8", Err(PrefixError::Syntax)),
            ("10.0.0.256", Err(PrefixError::Syntax)),
            ("", Err(PrefixError::Syntax)),
            ("::1/128", Err(PrefixError::Syntax)),
            ("10.0.0.0 /8", Err(PrefixError::Syntax)),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Prefix>(), *want, "{text:?}");
            if let Ok(p) = want {
                let printed = p.to_string();
                assert_eq!(printed.parse::<Prefix>(), Ok(*p), "{printed}");
            }
        }
        assert_eq!("10.1.2.3/8".parse::<Prefix>().unwrap_err().to_string(), "bits set past the prefix length (did you mean 10.0.0.0/8?)");
    }

    #[test]
    fn contains_is_the_masked_compare() {
        let p = Prefix::new([192, 168, 0, 0], 16).unwrap();
        assert!(p.contains([192, 168, 255, 1]));
        assert!(!p.contains([192, 169, 0, 1]));
        assert!(Prefix::new([0; 4], 0).unwrap().contains([1, 2, 3, 4]));
        let host = Prefix::new([1, 2, 3, 4], 32).unwrap();
        assert!(host.contains([1, 2, 3, 4]) && !host.contains([1, 2, 3, 5]));
    }

    #[test]
    fn the_longest_prefix_decides() {
        let r = |p: &str, allow| Rule { prefix: p.parse().unwrap(), allow };
        let rules = [r("0.0.0.0/0", false), r("10.0.0.0/8", true), r("10.6.0.0/16", false), r("10.6.6.6", true)];
        let verdict = |a| decide(&rules, a).map(|r| (r.prefix.len, r.allow));
        assert_eq!(verdict([1, 1, 1, 1]), Some((0, false)));
        assert_eq!(verdict([10, 1, 1, 1]), Some((8, true)));
        assert_eq!(verdict([10, 6, 1, 1]), Some((16, false)));
        assert_eq!(verdict([10, 6, 6, 6]), Some((32, true)));
        assert_eq!(decide(&rules[1..], [11, 0, 0, 0]), None);
    }

    /// The direct table, then the trie where it says so, decides as the longest prefix does,
    /// for rule sets of every shape and addresses in and around their prefixes.
    #[test]
    fn the_direct_table_then_the_trie_decide_as_the_longest_prefix() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for round in 0..200 {
            let mut rules: alloc::vec::Vec<Rule> = alloc::vec::Vec::new();
            for _ in 0..(next() % 40) {
                let len = [0, 1, 8, 12, 15, 16, 17, 20, 24, 31, 32][(next() % 11) as usize];
                // Most prefixes near one another, so that they nest.
                let base = if next() % 2 == 0 { 0x0a00_0000 } else { next() as u32 };
                let addr = ((base | (next() as u32 & 0x00ff_ffff)) & Prefix::mask(len)).to_be_bytes();
                let prefix = Prefix::new(addr, len).unwrap();
                if rules.iter().all(|r| r.prefix != prefix) {
                    rules.push(Rule { prefix, allow: next() % 3 == 0 });
                }
            }
            let values: alloc::vec::Vec<(Prefix, u32)> =
                rules.iter().enumerate().map(|(i, r)| (r.prefix, i as u32 | if r.allow { VERDICT_ALLOW } else { 0 })).collect();
            let dir = build_dir(&values);
            let value_of = |r: &Rule| values.iter().find(|(p, _)| *p == r.prefix).unwrap().1;
            let mut probes: alloc::vec::Vec<[u8; 4]> = (0..64).map(|_| (next() as u32).to_be_bytes()).collect();
            for r in &rules {
                let a = u32::from_be_bytes(r.prefix.addr);
                for d in [0, 1, 0xffff, 0x1_0000] {
                    probes.push(a.wrapping_add(d).to_be_bytes());
                    probes.push(a.wrapping_sub(d).to_be_bytes());
                }
            }
            for addr in probes {
                let want = decide(&rules, addr).map(value_of);
                let entry = dir[dir_block(u32::from_ne_bytes(addr)) as usize];
                let got = match entry {
                    DIR_NONE => None,
                    DIR_TRIE => decide(&rules, addr).map(value_of),
                    e => Some(dir_value(e)),
                };
                assert_eq!(got, want, "round {round}, {addr:?}, entry {entry:#x}, rules {rules:?}");
                if entry == DIR_TRIE {
                    let block = Prefix { addr: [addr[0], addr[1], 0, 0], len: 16 };
                    assert!(rules.iter().any(|r| r.prefix.len > 16 && block.contains(r.prefix.addr)), "the trie only where a longer rule lies");
                }
            }
        }
        // The encoding round-trips every index and verdict.
        for value in [0, 1, MAX_RULES - 1, VERDICT_ALLOW, (MAX_RULES - 1) | VERDICT_ALLOW] {
            let e = dir_entry(value);
            assert!(e != DIR_NONE && e != DIR_TRIE);
            assert_eq!(dir_value(e), value);
        }
        assert_eq!(dir_block(u32::from_ne_bytes([10, 77, 0, 10])), 10 << 8 | 77);
    }

    #[test]
    fn trie_values_carry_index_and_verdict() {
        assert!(denies(7) && rule_index(7) == 7);
        assert!(!denies(7 | VERDICT_ALLOW) && rule_index(7 | VERDICT_ALLOW) == 7);
        assert!(MAX_RULES < VERDICT_ALLOW);
    }
}
