//! IPIP encapsulation: the outer header the balancer puts in front of a VIP packet.

use crate::{csum, packet::PROTO_IPIP, user_pod};

/// Global settings of the balancer program (array of one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbConfig {
    /// Source address of outer IPIP headers: the balancer's own address.
    pub encap_src: [u8; 4],
    /// Bumped by userspace to invalidate every cached next hop (`backend::NextHop`).
    pub generation: u32,
    /// Sets of the flow table (`flow::FlowSet`); 0 until userspace set up the table.
    pub flow_sets: u32,
    /// SYN flood guard: new TCP flows a CPU may pin to a VIP per [`crate::flood`] window;
    /// those past it are placed by hash, without an entry. 0: off.
    pub flood_limit: u32,
    /// Seed of the flow table's hash (`flow::Tuple::hash64`).
    pub flow_seed: u64,
    /// Rules in the firewall's trie (`firewall`); 0: the program does not look.
    pub firewall_rules: u32,
    /// New flows one source address may open per [`crate::flood`] window; its SYNs (and
    /// first datagrams) past it are dropped. 0: off.
    pub source_limit: u32,
}
const _: () = assert!(core::mem::size_of::<LbConfig>() == 32);
user_pod!(LbConfig);

/// Bytes the outer header adds.
pub const IPIP_OVERHEAD: usize = 20;
pub const OUTER_TTL: u8 = 64;

/// Length of the encapsulated packet, `None` if it would not fit an IPv4 total length.
#[inline(always)]
pub fn outer_len(inner_len: u16) -> Option<u16> {
    inner_len.checked_add(IPIP_OVERHEAD as u16)
}

/// The outer IPv4 header for an inner packet of `inner_len` bytes: TOS and DF copied from
/// the inner packet (RFC 2003 §3.1), ID 0, TTL 64, protocol 4, correct checksum.
#[inline(always)]
pub fn outer_ipv4(src: [u8; 4], dst: [u8; 4], inner_len: u16, tos: u8, df: bool) -> [u8; 20] {
    let w = outer_ipv4_words(u32::from_ne_bytes(src), u32::from_ne_bytes(dst), inner_len, tos, df);
    let mut h = [0u8; 20];
    let mut i = 0;
    while i < 5 {
        let b = w[i].to_ne_bytes();
        h[4 * i..4 * i + 4].copy_from_slice(&b);
        i += 1;
    }
    h
}

/// [`outer_ipv4`] as five 4-byte words in memory order (`u32::from_ne_bytes` of each four
/// header bytes; `src` and `dst` given the same way), which the XDP program stores with five
/// word stores. The checksum is summed over the words' 16-bit halves as they lie in memory:
/// the one's-complement sum does not depend on byte order (RFC 1071 §2(B)).
#[inline(always)]
pub fn outer_ipv4_words(src: u32, dst: u32, inner_len: u16, tos: u8, df: bool) -> [u32; 5] {
    // Callers bound inner_len by the egress MTU first (see `outer_len`); wrapping is unreachable.
    let len = inner_len.wrapping_add(IPIP_OVERHEAD as u16);
    let w0 = u32::from_ne_bytes([0x45, tos, (len >> 8) as u8, len as u8]);
    let w1 = u32::from_ne_bytes([0, 0, if df { 0x40 } else { 0 }, 0]);
    let w2 = u32::from_ne_bytes([OUTER_TTL, PROTO_IPIP, 0, 0]);
    let halves = csum::halves;
    let sum = halves(w0) + halves(w1) + halves(w2) + halves(src) + halves(dst);
    // The checksum of the halves as they are read natively: written back the same way.
    let c = csum::fold(sum).to_ne_bytes();
    [w0, w1, u32::from_ne_bytes([OUTER_TTL, PROTO_IPIP, c[0], c[1]]), src, dst]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_header_fields() {
        let h = outer_ipv4([10, 0, 0, 1], [10, 0, 0, 2], 60, 0x10, true);
        assert_eq!(h[0], 0x45);
        assert_eq!(h[1], 0x10);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 80);
        assert_eq!(h[6], 0x40);
        assert_eq!(h[8], 64);
        assert_eq!(h[9], 4);
        assert_eq!(&h[12..16], &[10, 0, 0, 1]);
        assert_eq!(&h[16..20], &[10, 0, 0, 2]);
        assert_eq!(crate::csum::ipv4_header(&h), 0, "checksum verifies");
        let h = outer_ipv4([10, 0, 0, 1], [10, 0, 0, 2], 60, 0, false);
        assert_eq!(h[6], 0);
        assert_eq!(crate::csum::ipv4_header(&h), 0);
    }

    #[test]
    fn outer_header_checksum_for_many_headers() {
        for (i, len) in [0u16, 1, 20, 40, 1480, 9000, 65515].into_iter().enumerate() {
            let i = i as u8;
            for (tos, df) in [(0, false), (0xff, true), (0x2e, false)] {
                let (src, dst) = ([10, i, 255, 1], [192, 168, 255 - i, 254]);
                let h = outer_ipv4(src, dst, len, tos, df);
                assert_eq!(crate::csum::ipv4_header(&h), 0, "checksum verifies for {len} {tos} {df}");
                let mut zeroed = h;
                zeroed[10..12].fill(0);
                assert_eq!(crate::csum::ipv4_header(&zeroed).to_be_bytes(), [h[10], h[11]], "the RFC 1071 value");
                assert_eq!(u16::from_be_bytes([h[2], h[3]]), len + 20);
                assert_eq!((h[1], h[6] & 0x40 != 0, &h[12..16], &h[16..20]), (tos, df, &src[..], &dst[..]));
            }
        }
    }

    #[test]
    fn outer_len_bounds() {
        assert_eq!(outer_len(1480), Some(1500));
        assert_eq!(outer_len(65515), Some(65535));
        assert_eq!(outer_len(65516), None);
    }
}
