//! A small packet builder for fixtures, benchmarks and fuzzing (userspace only), in the
//! spirit of Katran's `PacketBuilder`: `Pkt::tcp(..).vlan(5).ip_options(..).build()`.
//! Lengths and the IPv4 and L4 checksums are computed unless overridden.

use alloc::vec::Vec;

use crate::{csum, packet::*, vip::{PROTO_TCP, PROTO_UDP}};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x1b];

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8, seq: u32 },
    Udp { sport: u16, dport: u16 },
    Icmp,
    Raw(u8),
}

#[derive(Clone, Debug)]
pub struct Pkt {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub vlan: Option<u16>,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub tos: u8,
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset field (0x4000 = DF).
    pub frag: u16,
    pub options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Pkt {
    fn new(src: [u8; 4], dst: [u8; 4], l4: L4) -> Self {
        Pkt {
            eth_dst: LB_MAC,
            eth_src: CLIENT_MAC,
            vlan: None,
            src,
            dst,
            tos: 0,
            ttl: 64,
            id: 0x1234,
            frag: 0x4000,
            options: Vec::new(),
            l4,
            payload: Vec::new(),
        }
    }
    pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Self {
        Self::new(src, dst, L4::Tcp { sport, dport, flags, seq: 1000 })
    }
    pub fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }
    pub fn icmp_echo(src: [u8; 4], dst: [u8; 4]) -> Self {
        Self::new(src, dst, L4::Icmp)
    }
    pub fn proto(src: [u8; 4], dst: [u8; 4], proto: u8) -> Self {
        Self::new(src, dst, L4::Raw(proto))
    }
    pub fn vlan(mut self, tci: u16) -> Self {
        self.vlan = Some(tci);
        self
    }
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        assert!(options.len().is_multiple_of(4) && options.len() <= 40);
        self.options = options.to_vec();
        self
    }
    pub fn frag(mut self, frag: u16) -> Self {
        self.frag = frag;
        self
    }
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let proto = match self.l4 {
            L4::Tcp { sport, dport, flags, seq } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&(if flags & TCP_ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
                b.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
                PROTO_TCP
            }
            L4::Udp { sport, dport } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                PROTO_UDP
            }
            L4::Icmp => {
                b.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
                1
            }
            L4::Raw(p) => p,
        };
        b.extend_from_slice(&self.payload);
        // L4 checksum over the pseudo header (TCP, UDP) or the message (ICMP).
        let csum_at = match self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } => Some(6),
            L4::Icmp => Some(2),
            L4::Raw(_) => None,
        };
        if let Some(at) = csum_at {
            let mut sum = 0u32;
            if !matches!(self.l4, L4::Icmp) {
                for w in [&self.src[..], &self.dst[..]] {
                    sum += u32::from(u16::from_be_bytes([w[0], w[1]])) + u32::from(u16::from_be_bytes([w[2], w[3]]));
                }
                sum += u32::from(proto) + b.len() as u32;
            }
            for c in b.chunks(2) {
                sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            let c = csum::fold(sum).to_be_bytes();
            b[at] = c[0];
            b[at + 1] = c[1];
        }
        b
    }

    /// The IPv4 packet without the Ethernet header.
    pub fn ip_packet(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let ihl = IPV4_HLEN + self.options.len();
        let tot = (ihl + l4.len()) as u16;
        let proto = match self.l4 {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Icmp => 1,
            L4::Raw(p) => p,
        };
        let mut h = Vec::with_capacity(tot as usize);
        h.push(0x40 | (ihl / 4) as u8);
        h.push(self.tos);
        h.extend_from_slice(&tot.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.extend_from_slice(&[self.ttl, proto, 0, 0]);
        h.extend_from_slice(&self.src);
        h.extend_from_slice(&self.dst);
        h.extend_from_slice(&self.options);
        let c = checksum(&h).to_be_bytes();
        h[10] = c[0];
        h[11] = c[1];
        h.extend_from_slice(&l4);
        h
    }

    /// The whole frame.
    pub fn build(&self) -> Vec<u8> {
        let mut f = eth_header(self.eth_dst, self.eth_src, self.vlan, ETH_P_IP);
        f.extend_from_slice(&self.ip_packet());
        f
    }
}

/// An Ethernet header, with an 802.1Q tag when `vlan` is set.
pub fn eth_header(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, proto: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(18);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(tci) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&proto.to_be_bytes());
    f
}

/// An ARP request frame.
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = eth_header([0xff; 6], CLIENT_MAC, None, 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// A minimal IPv6 TCP SYN frame.
pub fn ipv6_tcp_syn() -> Vec<u8> {
    let mut f = eth_header(LB_MAC, CLIENT_MAC, None, ETH_P_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, PROTO_TCP, 64]);
    f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// Encapsulates the IPv4 packet of `frame` (Ethernet header of `l2_len` bytes) in IPIP the
/// way the balancer does, with new MACs: the expected output of a fixture.
pub fn ipip(frame: &[u8], l2_len: usize, src: [u8; 4], dst: [u8; 4], macs: Option<([u8; 6], [u8; 6])>) -> Vec<u8> {
    let inner = &frame[l2_len..];
    let inner_len = u16::from_be_bytes([inner[2], inner[3]]);
    let outer = crate::encap::outer_ipv4(src, dst, inner_len, inner[1], inner[6] & 0x40 != 0);
    let mut out = frame[..l2_len].to_vec();
    if let Some((smac, dmac)) = macs {
        out[0..6].copy_from_slice(&dmac);
        out[6..12].copy_from_slice(&smac);
    }
    out.extend_from_slice(&outer);
    out.extend_from_slice(inner);
    out
}

/// The ICMP "fragmentation needed" the balancer answers `frame` (Ethernet header of
/// `l2_len` bytes) with, advertising `mtu`: MACs swapped, the VLAN tag kept, a new IPv4
/// header from the packet's destination to its source, the ICMP header, and the packet's
/// IPv4 header and first 8 bytes after it. Built byte by byte: the expected output of a
/// fixture.
pub fn icmp_too_big(frame: &[u8], l2_len: usize, mtu: u16) -> Vec<u8> {
    let inner = &frame[l2_len..];
    let quote = &inner[..usize::from(inner[0] & 0x0f) * 4 + 8];
    let mut out = Vec::new();
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..l2_len]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = 0xc0;
    ip[2..4].copy_from_slice(&((20 + 8 + quote.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&inner[16..20]);
    ip[16..20].copy_from_slice(&inner[12..16]);
    let c = csum::ipv4_header(&ip).to_be_bytes();
    ip[10..12].copy_from_slice(&c);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&frag_needed_message(quote, mtu));
    out
}

use csum::bytes as checksum;

/// An ICMP "fragmentation needed" message advertising `mtu`, quoting `quote` whole.
fn frag_needed_message(quote: &[u8], mtu: u16) -> Vec<u8> {
    let mut m = alloc::vec![3, 4, 0, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quote);
    let c = checksum(&m).to_be_bytes();
    m[2..4].copy_from_slice(&c);
    m
}

/// An ICMP "fragmentation needed" from `router` to `to` advertising `mtu`, about the IPv4
/// packet `quoted` (its header and the 8 bytes after it are quoted). With DF, as every
/// `Pkt`; routers (Linux among them) send theirs without: `.frag(0)`.
pub fn frag_needed(router: [u8; 4], to: [u8; 4], quoted: &[u8], mtu: u16) -> Pkt {
    let len = (usize::from(quoted[0] & 0x0f) * 4 + 8).min(quoted.len());
    Pkt::proto(router, to, 1).payload(&frag_needed_message(&quoted[..len], mtu))
}

/// The echo reply the balancer answers the echo request `frame` (Ethernet header of
/// `l2_len` bytes) with: MACs and addresses swapped, TTL 64, type 0, both checksums
/// recomputed, everything else as it came. Built byte by byte: a fixture's expected output.
pub fn echo_reply(frame: &[u8], l2_len: usize) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[0..6]);
    let ip = &mut out[l2_len..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    ip[8] = 64;
    ip[12..16].copy_from_slice(&frame[l2_len + 16..l2_len + 20]);
    ip[16..20].copy_from_slice(&frame[l2_len + 12..l2_len + 16]);
    ip[10..12].fill(0);
    let c = checksum(&ip[..ihl]).to_be_bytes();
    ip[10..12].copy_from_slice(&c);
    ip[ihl] = 0;
    ip[ihl + 2..ihl + 4].fill(0);
    let c = checksum(&ip[ihl..tot]).to_be_bytes();
    ip[ihl + 2..ihl + 4].copy_from_slice(&c);
    out
}
