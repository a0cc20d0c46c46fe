//! ICMP "fragmentation needed" (type 3, code 4, RFC 792 and RFC 1191): what the balancer
//! answers a client whose packet, with the don't-fragment bit, would not fit the path to the
//! backend once encapsulated, as a router on the way would. The client's TCP lowers its
//! segment size for the VIP and sends again, where a dropped or passed packet would be lost
//! for good (a path-MTU black hole). Katran does the same (`ICMP_TOOBIG_GENERATION`).
//!
//! The reply is built in place: the frame grows at the front by [`TOO_BIG_OVERHEAD`] bytes
//! (a new IPv4 header and the ICMP header, [`too_big_words`]), and is cut after the quote
//! (the packet's IPv4 header and the first 8 bytes after it, [`quote_len`]).

use crate::csum::{self, halves};

/// Bytes the reply puts in front of the quoted packet: an IPv4 header and the ICMP header.
pub const TOO_BIG_OVERHEAD: usize = 28;
/// Bytes quoted after the IPv4 header (RFC 792: "the first 64 bits of the datagram").
pub const QUOTED_PAYLOAD: usize = 8;
/// The longest quote in 4-byte words: a 60-byte IPv4 header and 8 bytes.
pub const MAX_QUOTE_WORDS: usize = 17;
/// TOS of the reply: precedence "internetwork control", as Linux sends its ICMP errors.
pub const REPLY_TOS: u8 = 0xc0;
pub const REPLY_TTL: u8 = 64;
pub const PROTO_ICMP: u8 = 1;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// Bytes the reply quotes of a packet whose IPv4 header is `ihl_bytes` long (a multiple of
/// 4, so the quote is whole words).
#[inline(always)]
pub const fn quote_len(ihl_bytes: usize) -> usize {
    ihl_bytes + QUOTED_PAYLOAD
}

/// The reply's IPv4 and ICMP headers as seven 4-byte words in memory order
/// (`u32::from_ne_bytes` of each four bytes; `src`, `dst` given the same way): from `src`
/// (the VIP the packet was sent to) to `dst` (its sender), advertising `next_hop_mtu`, with
/// both checksums. `quote_sum` is the sum of [`halves`] of the quote's words, which the ICMP
/// checksum covers; `quote` its length in bytes.
#[inline(always)]
pub fn too_big_words(src: u32, dst: u32, next_hop_mtu: u16, quote: u16, quote_sum: u32) -> [u32; 7] {
    let len = quote.wrapping_add(TOO_BIG_OVERHEAD as u16);
    let w0 = u32::from_ne_bytes([0x45, REPLY_TOS, (len >> 8) as u8, len as u8]);
    let w1 = 0;
    let w2 = u32::from_ne_bytes([REPLY_TTL, PROTO_ICMP, 0, 0]);
    let ip = csum::fold(halves(w0) + halves(w1) + halves(w2) + halves(src) + halves(dst)).to_ne_bytes();
    let i0 = u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0]);
    let i1 = u32::from_ne_bytes([0, 0, (next_hop_mtu >> 8) as u8, next_hop_mtu as u8]);
    let icmp = csum::fold(halves(i0) + halves(i1) + quote_sum).to_ne_bytes();
    [
        w0,
        w1,
        u32::from_ne_bytes([REPLY_TTL, PROTO_ICMP, ip[0], ip[1]]),
        src,
        dst,
        u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, icmp[0], icmp[1]]),
        i1,
    ]
}

/// Whether a packet from `src` (read natively) may be answered with an ICMP error: not from
/// "this network" (0/8), loopback (127/8), multicast or the reserved and broadcast range
/// (224/3), none of which names one host that sent it (RFC 1812 §4.3.2.7).
#[inline(always)]
pub fn answerable(src: u32) -> bool {
    let first = src.to_ne_bytes()[0];
    first != 0 && first != 127 && first < 224
}

/// The MAC words of a reply to a frame whose header starts with `macs` (its first 12 bytes
/// as three words in memory order): destination and source swapped.
#[inline(always)]
pub fn swap_macs(macs: [u32; 3]) -> [u32; 3] {
    let (a, b, c) = (macs[0].to_ne_bytes(), macs[1].to_ne_bytes(), macs[2].to_ne_bytes());
    // Received: dst = a0 a1 a2 a3 b0 b1, src = b2 b3 c0 c1 c2 c3.
    crate::backend::eth_macs([b[2], b[3], c[0], c[1], c[2], c[3]], [a[0], a[1], a[2], a[3], b[0], b[1]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// RFC 1071 over bytes, independent of the word trick above.
    use csum::bytes as checksum;

    fn bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn headers_and_checksums() {
        let (vip, client) = ([10, 100, 0, 1], [192, 168, 7, 10]);
        for (quote, mtu) in [(28usize, 1480u16), (40, 1380), (68, 576), (28, 65515)] {
            let q: Vec<u8> = (0..quote).map(|i| (i * 37 + 11) as u8).collect();
            let words: Vec<u32> = q.chunks(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
            let sum = words.iter().map(|&w| halves(w)).sum();
            let h = bytes(&too_big_words(u32::from_ne_bytes(vip), u32::from_ne_bytes(client), mtu, quote as u16, sum));
            assert_eq!(h.len(), TOO_BIG_OVERHEAD);
            let ip: [u8; 20] = h[..20].try_into().unwrap();
            assert_eq!(csum::ipv4_header(&ip), 0, "IPv4 checksum verifies");
            assert_eq!((ip[0], ip[1], u16::from_be_bytes([ip[2], ip[3]]) as usize), (0x45, REPLY_TOS, 28 + quote));
            assert_eq!((&ip[4..8], ip[8], ip[9]), (&[0u8; 4][..], REPLY_TTL, PROTO_ICMP));
            assert_eq!((&ip[12..16], &ip[16..20]), (&vip[..], &client[..]));
            let mut msg = h[20..].to_vec();
            assert_eq!((msg[0], msg[1], &msg[4..6]), (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, &[0u8, 0][..]));
            assert_eq!(u16::from_be_bytes([msg[6], msg[7]]), mtu);
            msg.extend_from_slice(&q);
            assert_eq!(checksum(&msg), 0, "ICMP checksum verifies over header and quote");
            msg[2..4].fill(0);
            assert_eq!(checksum(&msg).to_be_bytes(), [h[22], h[23]], "the RFC 1071 value");
        }
    }

    #[test]
    fn macs_swapped() {
        let (dst, src) = ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]);
        assert_eq!(swap_macs(crate::backend::eth_macs(dst, src)), crate::backend::eth_macs(src, dst));
    }

    #[test]
    fn who_gets_an_answer() {
        let yes = [[192, 168, 7, 10], [10, 0, 0, 1], [1, 1, 1, 1], [223, 255, 255, 254]];
        let no = [[0, 0, 0, 0], [0, 1, 2, 3], [127, 0, 0, 1], [224, 0, 0, 5], [239, 1, 1, 1], [240, 0, 0, 1], [255, 255, 255, 255]];
        for a in yes {
            assert!(answerable(u32::from_ne_bytes(a)), "{a:?}");
        }
        for a in no {
            assert!(!answerable(u32::from_ne_bytes(a)), "{a:?}");
        }
    }

    #[test]
    fn quote_lengths() {
        assert_eq!(quote_len(20), 28);
        assert_eq!(quote_len(60), MAX_QUOTE_WORDS * 4);
    }
}
