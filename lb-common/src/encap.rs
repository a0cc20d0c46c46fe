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
}
const _: () = assert!(core::mem::size_of::<LbConfig>() == 8);
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
    // Callers bound inner_len by the egress MTU first (see `outer_len`); wrapping is unreachable.
    let len = inner_len.wrapping_add(IPIP_OVERHEAD as u16).to_be_bytes();
    let mut h = [
        0x45, tos, len[0], len[1], 0, 0, if df { 0x40 } else { 0 }, 0, OUTER_TTL, PROTO_IPIP, 0, 0,
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3],
    ];
    let c = csum::ipv4_header(&h).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    h
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
    fn outer_len_bounds() {
        assert_eq!(outer_len(1480), Some(1500));
        assert_eq!(outer_len(65515), Some(65535));
        assert_eq!(outer_len(65516), None);
    }
}
