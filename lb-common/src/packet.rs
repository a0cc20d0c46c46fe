//! The frame parser the XDP programs run, written once against [`Frame`] so that the host
//! tests exercise the very code the kernel executes.
//!
//! The parser never writes. It returns either the parsed headers of a TCP or UDP IPv4
//! packet, or the [`Counter`] that says why the frame is not one (and so is passed as is).

use crate::{flow::{FlowKey, Tuple}, stats::Counter, vip::{PROTO_TCP, PROTO_UDP}};

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPV4_HLEN: usize = 20;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_ICMP: u8 = 1;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO: u8 = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Bounds-checked read access to a frame. In the kernel every read is checked against
/// `data_end` (which is what the verifier demands); on the host it is a slice.
pub trait Frame {
    /// `N` bytes at `off`, or `None` if the frame is shorter than `off + N`.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
    /// `N` 4-byte words at `off` in memory order (`u32::from_ne_bytes` of each 4 bytes), or
    /// `None` if the frame is shorter than `off + 4 * N`. In the kernel each word is one
    /// (possibly misaligned) load, where a byte array would be split into byte loads.
    #[inline(always)]
    fn load_words<const N: usize>(&self, off: usize) -> Option<[u32; N]> {
        let mut w = [0u32; N];
        let mut i = 0;
        while i < N {
            w[i] = u32::from_ne_bytes(self.load(off + 4 * i)?);
            i += 1;
        }
        Some(w)
    }
    /// Whether the frame holds at least `len` bytes.
    fn holds(&self, len: usize) -> bool;
}

impl Frame for [u8] {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.get(off..off.checked_add(N)?)?.try_into().ok()
    }
    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        len <= self.len()
    }
}

/// The headers of an IPv4 TCP or UDP frame that the balancer needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Offset of the IPv4 header: 14, or 18 with one VLAN tag.
    pub l3_off: usize,
    /// IPv4 total length (the inner packet's length once encapsulated).
    pub ip_len: u16,
    /// Type of service byte.
    pub tos: u8,
    /// Don't-fragment bit of the packet.
    pub df: bool,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
    pub tuple: Tuple,
}

impl Parsed {
    /// A TCP SYN without ACK, or any UDP packet: may open a flow.
    #[inline(always)]
    pub fn opens_flow(&self) -> bool {
        self.tuple.proto == PROTO_UDP || self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// The 5-tuple as byte arrays.
    pub fn key(&self) -> FlowKey {
        self.tuple.key()
    }
}

/// The Ethernet part: the IPv4 header's offset, or why the frame is not IPv4.
#[inline(always)]
pub fn parse_l2<F: Frame + ?Sized>(f: &F) -> Result<usize, Counter> {
    let eth: [u8; ETH_HLEN] = f.load(0).ok_or(Counter::Malformed)?;
    let mut proto = u16::from_be_bytes([eth[12], eth[13]]);
    let mut l3_off = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let tag: [u8; VLAN_HLEN] = f.load(ETH_HLEN).ok_or(Counter::Malformed)?;
        proto = u16::from_be_bytes([tag[2], tag[3]]);
        l3_off = ETH_HLEN + VLAN_HLEN;
    }
    match proto {
        ETH_P_IP => Ok(l3_off),
        ETH_P_IPV6 => Err(Counter::Ipv6),
        _ => Err(Counter::NotIp),
    }
}

/// A checked IPv4 header at `l3_off`, as its first five 4-byte words in memory order
/// (each `u32::from_ne_bytes` of four header bytes), which is how the kernel loads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub words: [u32; 5],
    /// Header length including options (20..=60).
    pub ihl: usize,
    pub tot_len: u16,
}

/// Byte `i` (0..4) of a word loaded in memory order.
#[inline(always)]
fn byte(w: u32, i: usize) -> u8 {
    w.to_ne_bytes()[i]
}

impl Ipv4 {
    #[inline(always)]
    pub fn tos(&self) -> u8 {
        byte(self.words[0], 1)
    }
    #[inline(always)]
    pub fn proto(&self) -> u8 {
        byte(self.words[2], 1)
    }
    #[inline(always)]
    pub fn df(&self) -> bool {
        byte(self.words[1], 2) & 0x40 != 0
    }
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        // More-fragments flag or a fragment offset.
        u16::from_be_bytes([byte(self.words[1], 2), byte(self.words[1], 3)]) & 0x3fff != 0
    }
    #[inline(always)]
    pub fn src(&self) -> [u8; 4] {
        self.words[3].to_ne_bytes()
    }
    #[inline(always)]
    pub fn dst(&self) -> [u8; 4] {
        self.words[4].to_ne_bytes()
    }
}

/// Reads and checks an IPv4 header: version 4, 20 <= IHL*4 <= total length, and the
/// whole packet (total length) inside the frame. Trailing bytes (Ethernet padding) are fine.
#[inline(always)]
pub fn parse_ipv4<F: Frame + ?Sized>(f: &F, l3_off: usize) -> Option<Ipv4> {
    let words: [u32; 5] = f.load_words(l3_off)?;
    let b0 = byte(words[0], 0);
    if b0 >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b0 & 0x0f) * 4;
    let tot_len = u16::from_be_bytes([byte(words[0], 2), byte(words[0], 3)]);
    if ihl < IPV4_HLEN || usize::from(tot_len) < ihl || !f.holds(l3_off + usize::from(tot_len)) {
        return None;
    }
    Some(Ipv4 { words, ihl, tot_len })
}

/// Parses Ethernet (with at most one VLAN tag), IPv4 (with options) and TCP or UDP.
#[inline(always)]
pub fn parse_frame<F: Frame + ?Sized>(f: &F) -> Result<Parsed, Counter> {
    let (l3_off, ip) = parse_l3(f)?;
    parse_l4(f, l3_off, &ip)
}

/// The first half of [`parse_frame`]: Ethernet and an unfragmented IPv4 header, with the
/// IPv4 header's offset. The balancer looks at the destination address before it reads on.
#[inline(always)]
pub fn parse_l3<F: Frame + ?Sized>(f: &F) -> Result<(usize, Ipv4), Counter> {
    let l3_off = parse_l2(f)?;
    let ip = parse_ipv4(f, l3_off).ok_or(Counter::Malformed)?;
    if ip.is_fragment() {
        return Err(Counter::Fragment);
    }
    Ok((l3_off, ip))
}

/// The second half of [`parse_frame`]: the TCP or UDP header after `ip` at `l3_off`.
#[inline(always)]
pub fn parse_l4<F: Frame + ?Sized>(f: &F, l3_off: usize, ip: &Ipv4) -> Result<Parsed, Counter> {
    let l4_off = l3_off + ip.ihl;
    let l4_len = usize::from(ip.tot_len) - ip.ihl;
    let proto = ip.proto();
    // Both ports are the first word of TCP and UDP headers alike.
    let (ports, tcp_flags) = match proto {
        PROTO_TCP => {
            let tcp: [u32; 5] = f.load_words(l4_off).ok_or(Counter::Malformed)?;
            let doff = usize::from(byte(tcp[3], 0) >> 4) * 4;
            if doff < 20 || doff > l4_len {
                return Err(Counter::Malformed);
            }
            (tcp[0], byte(tcp[3], 1))
        }
        PROTO_UDP => {
            let udp: [u32; 2] = f.load_words(l4_off).ok_or(Counter::Malformed)?;
            let len = usize::from(u16::from_be_bytes([byte(udp[1], 0), byte(udp[1], 1)]));
            if len < 8 || len > l4_len {
                return Err(Counter::Malformed);
            }
            (udp[0], 0)
        }
        _ => return Err(Counter::OtherL4),
    };
    Ok(Parsed {
        l3_off,
        ip_len: ip.tot_len,
        tos: ip.tos(),
        df: ip.df(),
        tcp_flags,
        tuple: Tuple { src: ip.words[3], dst: ip.words[4], ports, proto },
    })
}

/// What the decapsulation program does with a frame: strip `outer_len` bytes of outer IPv4
/// header that follow the `l3_off` bytes of Ethernet header, or pass for the given reason.
/// An ICMP message to a VIP address that the balancer takes (see [`parse_icmp`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpToVip {
    /// Echo request (type 8): answered in place, if the address is a VIP's.
    Echo,
    /// "Fragmentation needed" (type 3, code 4) about a TCP or UDP packet that the VIP sent: a
    /// backend's reply, which leaves the backend with the VIP as its source, so a router on
    /// the way to the client sends its ICMP to the VIP, which is routed to the balancer. The
    /// flow as the client's packets carry it (client to VIP, the quoted addresses and ports
    /// reversed): the message goes to that flow's backend, whose TCP must learn the path MTU
    /// (else its full-size segments are lost for good).
    TooBig(Tuple),
}

/// The ICMP message of an IPv4 packet (`ip`, at `l3_off`) that the balancer takes, or why
/// not: [`Counter::OtherL4`] for other types and for quotes of anything else than a TCP or UDP
/// packet with ports from the packet's destination, [`Counter::Malformed`] when headers are
/// truncated or inconsistent.
#[inline(always)]
pub fn parse_icmp<F: Frame + ?Sized>(f: &F, l3_off: usize, ip: &Ipv4) -> Result<IcmpToVip, Counter> {
    let off = l3_off + ip.ihl;
    let len = usize::from(ip.tot_len) - ip.ihl;
    let [head]: [u32; 1] = f.load_words(off).ok_or(Counter::Malformed)?;
    if len < 8 {
        return Err(Counter::Malformed);
    }
    match (byte(head, 0), byte(head, 1)) {
        (ICMP_ECHO, 0) => Ok(IcmpToVip::Echo),
        (3, 4) => {
            // The quote: the packet's IPv4 header (its length field is the original
            // packet's, not the quote's) and at least the ports after it.
            let q = off + 8;
            let quoted: [u32; 5] = f.load_words(q).ok_or(Counter::Malformed)?;
            let b0 = byte(quoted[0], 0);
            let qihl = usize::from(b0 & 0x0f) * 4;
            if b0 >> 4 != 4 || qihl < IPV4_HLEN {
                return Err(Counter::Malformed);
            }
            // Loaded (checked against the frame's end) before the check against the packet's
            // length: in the kernel, LLVM would drop the frame check the other way round,
            // as implied by the two, and the verifier refuses an unchecked packet read.
            let [ports]: [u32; 1] = f.load_words(q + qihl).ok_or(Counter::Malformed)?;
            if 8 + qihl + 4 > len {
                return Err(Counter::Malformed);
            }
            let frag = u16::from_be_bytes([byte(quoted[1], 2), byte(quoted[1], 3)]) & 0x1fff;
            let proto = byte(quoted[2], 1);
            if frag != 0 || (proto != PROTO_TCP && proto != PROTO_UDP) || quoted[3] != ip.words[4] {
                return Err(Counter::OtherL4);
            }
            // Source and destination port swap places: the two 16-bit halves as they lie in
            // memory, the same in either byte order.
            Ok(IcmpToVip::TooBig(Tuple { src: quoted[4], dst: quoted[3], ports: ports.rotate_left(16), proto }))
        }
        _ => Err(Counter::OtherL4),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decap {
    pub l3_off: usize,
    pub outer_len: usize,
    /// Outer destination, to be checked against the host's addresses.
    pub outer_dst: [u8; 4],
}

/// Parses an IPIP frame: a valid, unfragmented outer IPv4 header with protocol 4 whose
/// payload is exactly one valid IPv4 packet.
#[inline(always)]
pub fn parse_ipip<F: Frame + ?Sized>(f: &F) -> Result<Decap, Counter> {
    let l3_off = parse_l2(f).map_err(|_| Counter::DecapNotIpip)?;
    let outer = parse_ipv4(f, l3_off).ok_or(Counter::DecapNotIpip)?;
    if outer.proto() != PROTO_IPIP {
        return Err(Counter::DecapNotIpip);
    }
    if outer.is_fragment() {
        return Err(Counter::DecapMalformed);
    }
    let inner = parse_ipv4(f, l3_off + outer.ihl).ok_or(Counter::DecapMalformed)?;
    if usize::from(inner.tot_len) + outer.ihl != usize::from(outer.tot_len) {
        return Err(Counter::DecapMalformed);
    }
    Ok(Decap { l3_off, outer_len: outer.ihl, outer_dst: outer.dst() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::*;
    use alloc::vec::Vec;

    const C: [u8; 4] = [192, 168, 1, 10];
    const V: [u8; 4] = [10, 100, 0, 1];

    fn check(frame: &[u8], expected: Result<(usize, u8, bool), Counter>) {
        let got = parse_frame(frame).map(|p| (p.l3_off, p.tuple.proto, p.opens_flow()));
        assert_eq!(got, expected, "{frame:02x?}");
    }

    #[test]
    fn parse_table() {
        let syn = Pkt::tcp(C, 40000, V, 80, TCP_SYN);
        check(&syn.build(), Ok((14, 6, true)));
        check(&Pkt::tcp(C, 40000, V, 80, TCP_ACK).build(), Ok((14, 6, false)));
        check(&Pkt::tcp(C, 40000, V, 80, TCP_SYN | TCP_ACK).build(), Ok((14, 6, false)));
        check(&Pkt::udp(C, 5000, V, 53).payload(b"hello").build(), Ok((14, 17, true)));
        check(&syn.clone().vlan(100).build(), Ok((18, 6, true)));
        check(&syn.clone().ip_options(&[1, 1, 1, 0]).build(), Ok((14, 6, true)));
        check(&syn.clone().ip_options(&[1; 40]).build(), Ok((14, 6, true)));
        check(&syn.clone().frag(0x2000).build(), Err(Counter::Fragment));
        check(&syn.clone().frag(0x0010).build(), Err(Counter::Fragment));
        check(&Pkt::icmp_echo(C, V).build(), Err(Counter::OtherL4));
        check(&Pkt::proto(C, V, 47).payload(&[0; 8]).build(), Err(Counter::OtherL4));
        check(&arp_request(C, V), Err(Counter::NotIp));
        check(&ipv6_tcp_syn(), Err(Counter::Ipv6));
        // Ethernet padding after the IP packet is fine.
        let mut padded = Pkt::udp(C, 1, V, 2).build();
        padded.resize(60, 0);
        check(&padded, Ok((14, 17, true)));
    }

    #[test]
    fn parsed_fields() {
        let f = Pkt::tcp(C, 40000, V, 443, TCP_SYN).tos(0x10).vlan(7).payload(b"xyz").build();
        let p = parse_frame(&f[..]).unwrap();
        let key = p.key();
        assert_eq!(key.src, C);
        assert_eq!(key.dst, V);
        assert_eq!(u16::from_be_bytes(key.sport), 40000);
        assert_eq!(u16::from_be_bytes(key.dport), 443);
        assert_eq!(key.tuple(), p.tuple);
        assert_eq!(p.tuple.dport_word(), u16::from_ne_bytes(443u16.to_be_bytes()));
        assert_eq!(p.ip_len, 20 + 20 + 3);
        assert_eq!(p.tos, 0x10);
        assert!(p.df);
        assert_eq!(p.tcp_flags, TCP_SYN);
    }

    fn icmp(frame: &[u8]) -> Result<IcmpToVip, Counter> {
        let (l3_off, ip) = parse_l3(frame)?;
        assert_eq!(ip.proto(), PROTO_ICMP);
        parse_icmp(frame, l3_off, &ip)
    }

    #[test]
    fn icmp_to_a_vip() {
        const R: [u8; 4] = [172, 16, 0, 1];
        assert_eq!(icmp(&Pkt::icmp_echo(C, V).build()), Ok(IcmpToVip::Echo));
        assert_eq!(icmp(&Pkt::icmp_echo(C, V).vlan(5).ip_options(&[1, 1, 1, 0]).build()), Ok(IcmpToVip::Echo));
        // A backend's reply from the VIP, too big for a router on the way to the client.
        let reply = Pkt::tcp(V, 443, C, 40000, TCP_ACK).payload(&[0; 1400]).ip_packet();
        let want = Pkt::tcp(C, 40000, V, 443, TCP_ACK).build();
        let want = parse_frame(&want[..]).unwrap().tuple;
        assert_eq!(icmp(&frag_needed(R, V, &reply, 1400).build()), Ok(IcmpToVip::TooBig(want)));
        assert_eq!(icmp(&frag_needed(R, V, &reply, 1400).vlan(3).build()), Ok(IcmpToVip::TooBig(want)));
        let with_options = Pkt::tcp(V, 443, C, 40000, TCP_ACK).ip_options(&[1; 8]).ip_packet();
        assert_eq!(icmp(&frag_needed(R, V, &with_options, 1400).build()), Ok(IcmpToVip::TooBig(want)));
        let udp = Pkt::udp(V, 53, C, 5000).payload(&[1; 1400]).ip_packet();
        let want = parse_frame(&Pkt::udp(C, 5000, V, 53).build()[..]).unwrap().tuple;
        assert_eq!(icmp(&frag_needed(R, V, &udp, 1400).build()), Ok(IcmpToVip::TooBig(want)));
        // Not taken: other types, quotes of other protocols, of fragments, of packets that
        // the destination did not send.
        assert_eq!(icmp(&Pkt::proto(R, V, 1).payload(&[11, 0, 0, 0, 0, 0, 0, 0]).build()), Err(Counter::OtherL4));
        let echo_quote = Pkt::icmp_echo(V, C).ip_packet();
        assert_eq!(icmp(&frag_needed(R, V, &echo_quote, 1400).build()), Err(Counter::OtherL4));
        let later_fragment = Pkt::tcp(V, 443, C, 40000, TCP_ACK).frag(0x0010).ip_packet();
        assert_eq!(icmp(&frag_needed(R, V, &later_fragment, 1400).build()), Err(Counter::OtherL4));
        let other = Pkt::tcp([10, 100, 0, 9], 443, C, 40000, TCP_ACK).ip_packet();
        assert_eq!(icmp(&frag_needed(R, V, &other, 1400).build()), Err(Counter::OtherL4));
        // Messages cut short: no ICMP header, a quote without the ports, a quoted header
        // that is not IPv4 or shorter than 20 bytes.
        assert_eq!(icmp(&Pkt::proto(R, V, 1).payload(&[8, 0, 0]).build()), Err(Counter::Malformed));
        for keep in [0, 8, 19, 20, 23] {
            let mut m = frag_needed(R, V, &reply, 1400);
            m.payload.truncate(8 + keep);
            assert_eq!(icmp(&m.build()), Err(Counter::Malformed), "quote of {keep} bytes");
        }
        let mut bad = reply.clone();
        bad[0] = 0x65;
        assert_eq!(icmp(&frag_needed(R, V, &bad, 1400).build()), Err(Counter::Malformed));
        bad[0] = 0x44;
        assert_eq!(icmp(&frag_needed(R, V, &bad, 1400).build()), Err(Counter::Malformed));
    }

    #[test]
    fn truncation_at_every_length_is_malformed_or_short() {
        for frame in [
            Pkt::tcp(C, 40000, V, 80, TCP_SYN).ip_options(&[1; 8]).vlan(3).build(),
            Pkt::udp(C, 40000, V, 80).payload(b"abc").build(),
        ] {
            for len in 0..frame.len() {
                let got = parse_frame(&frame[..len]);
                assert!(got == Err(Counter::Malformed), "len {len}: {got:?}");
            }
        }
    }

    #[test]
    fn inconsistent_headers_are_malformed() {
        let good = Pkt::tcp(C, 40000, V, 80, TCP_SYN).payload(b"0123").build();
        let mutate = |at: usize, v: u8| -> Vec<u8> {
            let mut f = good.clone();
            f[at] = v;
            f
        };
        check(&mutate(14, 0x65), Err(Counter::Malformed)); // version 6 in an IPv4 ethertype
        check(&mutate(14, 0x44), Err(Counter::Malformed)); // IHL 4
        check(&mutate(14, 0x4f), Err(Counter::Malformed)); // IHL 15 beyond total length
        check(&mutate(17, 19), Err(Counter::Malformed)); // total length < IHL
        check(&mutate(16, 0x10), Err(Counter::Malformed)); // total length beyond frame
        check(&mutate(46, 0x40), Err(Counter::Malformed)); // TCP data offset 4
        check(&mutate(46, 0x70), Err(Counter::Malformed)); // TCP header beyond IP packet
        let udp = Pkt::udp(C, 1, V, 2).build();
        let mut bad_len = udp.clone();
        bad_len[39] = 7;
        check(&bad_len, Err(Counter::Malformed));
        bad_len[39] = 9;
        check(&bad_len, Err(Counter::Malformed));
    }

    #[test]
    fn ipip_parsing() {
        let inner = Pkt::tcp(C, 40000, V, 80, TCP_SYN).build();
        let enc = ipip(&inner, 14, [10, 0, 0, 1], [10, 0, 0, 2], None);
        assert_eq!(parse_ipip(&enc[..]), Ok(Decap { l3_off: 14, outer_len: 20, outer_dst: [10, 0, 0, 2] }));
        let tagged = ipip(&Pkt::udp(C, 1, V, 2).vlan(9).build(), 18, [10, 0, 0, 1], [10, 0, 0, 3], None);
        assert_eq!(parse_ipip(&tagged[..]).map(|d| d.l3_off), Ok(18));
        assert_eq!(parse_ipip(&inner[..]), Err(Counter::DecapNotIpip));
        assert_eq!(parse_ipip(&arp_request(C, V)[..]), Err(Counter::DecapNotIpip));
        for len in 14 + 20..enc.len() {
            assert_eq!(parse_ipip(&enc[..len]).is_ok(), false, "len {len}");
        }
        // Outer length that disagrees with the inner packet.
        let mut short = enc.clone();
        short[17] -= 1;
        assert_eq!(parse_ipip(&short[..]), Err(Counter::DecapMalformed));
        // Outer fragment.
        let mut frag = enc.clone();
        frag[20] = 0x20;
        assert_eq!(parse_ipip(&frag[..]), Err(Counter::DecapMalformed));
    }
}
