//! Packet fixtures through BPF_PROG_TEST_RUN, Katran's pattern: an ordered, stateful table
//! of {description, input frame, expected action, expected output frame}, compared byte for
//! byte, then the counters. Runs in a private network namespace whose routes and static
//! neighbours give the FIB lookups known answers. Needs root.

use std::net::Ipv4Addr;

use lb_common::{
    builder::{arp_request, echo_reply, frag_needed, icmp_too_big, ipip, ipv6_tcp_syn, Pkt, LB_MAC},
    firewall::Rule,
    flow::FlowKey,
    packet::{parse_frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::Counter,
};
use lb_userspace::{
    decap::Decap,
    testrun::{self, action_name, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    Dataplane, DataplaneError, LoadOptions,
};
use tests::{hex, lab::*, pin_to_cpu, privileged, sh};

/// Where a fixture's packet must go.
enum Expect {
    /// XDP_PASS, frame unchanged.
    Untouched,
    /// IPIP to backend `i` with the next hop's MACs, sent with `action`.
    Ipip(usize, u32),
    /// IPIP to backend `i`, original MACs, XDP_PASS (neighbour unresolved).
    IpipToKernel(usize),
    /// Only the MACs changed, to backend `i`'s, XDP_TX.
    L2(usize),
    /// ICMP "fragmentation needed" back to the sender, advertising this MTU, XDP_TX.
    TooBig(u16),
    /// ICMP echo reply, XDP_TX.
    Echo,
    /// An ICMP message for a VIP's flow, IPIP to backend `i` (not counted as the backend's
    /// traffic), XDP_TX.
    IcmpTo(usize),
}

struct Fixture {
    desc: String,
    input: Vec<u8>,
    expect: Expect,
}

fn fx(desc: &str, input: Vec<u8>, expect: Expect) -> Fixture {
    Fixture { desc: desc.to_string(), input, expect }
}

fn l2_len(frame: &[u8]) -> usize {
    if frame[12..14] == [0x81, 0x00] { 18 } else { 14 }
}

impl Fixture {
    fn expected(&self) -> (u32, Vec<u8>, Option<usize>) {
        let l2 = l2_len(&self.input);
        match self.expect {
            Expect::Untouched => (XDP_PASS, self.input.clone(), None),
            Expect::Ipip(i, action) => {
                let smac = if action == XDP_REDIRECT { LB2_MAC } else { LB_MAC };
                let out = ipip(&self.input, l2, LB_ADDR, REALS[i].addr, Some((smac, REALS[i].next_hop_mac)));
                (action, out, Some(i))
            }
            Expect::IpipToKernel(i) => (XDP_PASS, ipip(&self.input, l2, LB_ADDR, REALS[i].addr, None), Some(i)),
            Expect::L2(i) => {
                let mut out = self.input.clone();
                out[0..6].copy_from_slice(&REALS[i].next_hop_mac);
                out[6..12].copy_from_slice(&LB_MAC);
                (XDP_TX, out, Some(i))
            }
            Expect::TooBig(mtu) => (XDP_TX, icmp_too_big(&self.input, l2, mtu), None),
            Expect::Echo => (XDP_TX, echo_reply(&self.input, l2), None),
            Expect::IcmpTo(i) => (XDP_TX, ipip(&self.input, l2, LB_ADDR, REALS[i].addr, Some((LB_MAC, REALS[i].next_hop_mac))), None),
        }
    }
}

fn syn(sport: u16) -> Pkt {
    Pkt::tcp(CLIENT, sport, VIP, 80, TCP_SYN)
}

fn fixtures() -> Vec<Fixture> {
    use Expect::*;
    let flow1 = syn(40001);
    let mut f = vec![
        fx("SYN to VIP: new flow, first backend in the ring (A)", flow1.build(), Ipip(0, XDP_TX)),
        fx("SYN of a second flow: next backend (B)", syn(40002).build(), Ipip(1, XDP_TX)),
        fx("ACK of the first flow: stays on A", Pkt::tcp(CLIENT, 40001, VIP, 80, TCP_ACK).build(), Ipip(0, XDP_TX)),
        fx("retransmitted SYN of the first flow: stays on A", flow1.build(), Ipip(0, XDP_TX)),
        fx("data of the second flow: stays on B", Pkt::tcp(CLIENT, 40002, VIP, 80, TCP_ACK).payload(&[7; 100]).build(), Ipip(1, XDP_TX)),
        fx("SYN of a third flow: round-robin wraps to A", syn(40003).build(), Ipip(0, XDP_TX)),
        fx("UDP to the UDP VIP: first 5-tuple to A", Pkt::udp(CLIENT, 5000, VIP, 53).payload(b"q1").build(), Ipip(0, XDP_TX)),
        fx("UDP, second 5-tuple: B", Pkt::udp(CLIENT, 5001, VIP, 53).payload(b"q2").build(), Ipip(1, XDP_TX)),
        fx("UDP, first 5-tuple again: A", Pkt::udp(CLIENT, 5000, VIP, 53).payload(b"q3").build(), Ipip(0, XDP_TX)),
        fx("VIP address, unconfigured port", Pkt::tcp(CLIENT, 40001, VIP, 81, TCP_SYN).build(), Untouched),
        fx("VIP address and port, other protocol (UDP 80)", Pkt::udp(CLIENT, 40001, VIP, 80).build(), Untouched),
        fx("non-VIP TCP", Pkt::tcp(CLIENT, 40001, LB_ADDR, 22, TCP_SYN).build(), Untouched),
        fx("non-VIP UDP", Pkt::udp(CLIENT, 40001, LB_ADDR, 53).build(), Untouched),
        fx("ICMP echo to the VIP: answered", Pkt::icmp_echo(CLIENT, VIP).payload(b"ping data").build(), Echo),
        fx("ICMP echo to the VIP, VLAN-tagged, IPv4 options: answered", Pkt::icmp_echo(CLIENT, VIP).vlan(7).ip_options(&[1, 1, 1, 0]).build(), Echo),
        fx("ICMP echo to another address with the VIP's filter bit: untouched", Pkt::icmp_echo(CLIENT, filter_twin(VIP)).build(), Untouched),
        fx("ICMP echo to the balancer: untouched", Pkt::icmp_echo(CLIENT, LB_ADDR).build(), Untouched),
        fx("ICMP fragmentation needed about flow 40002's reply: to its backend (B)", frag_needed(ROUTER, VIP, &reply(40002), 1400).frag(0).build(), IcmpTo(1)),
        fx("... about a reply of a flow without an entry: where its hash places it", frag_needed(ROUTER, VIP, &reply(40999), 1400).frag(0).build(), IcmpTo(hash_backend(40999))),
        fx("... about a reply from a port without a VIP: untouched", frag_needed(ROUTER, VIP, &Pkt::tcp(VIP, 81, CLIENT, 40002, TCP_ACK).ip_packet(), 1400).build(), Untouched),
        fx("ICMP time exceeded to the VIP: untouched", frag_needed(ROUTER, VIP, &reply(40002), 1400).payload(&[11, 0, 0xf4, 0xff, 0, 0, 0, 0]).build(), Untouched),
        fx("ARP", arp_request(CLIENT, VIP), Untouched),
        fx("IPv6", ipv6_tcp_syn(), Untouched),
        fx("GRE to the VIP", Pkt::proto(CLIENT, VIP, 47).payload(&[0; 8]).build(), Untouched),
        fx("IPv4 with options (IHL 8) to the VIP: encapsulated whole (B)", syn(40004).ip_options(&[0x94, 4, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1]).build(), Ipip(1, XDP_TX)),
        fx("VLAN-tagged SYN to the VIP: tag kept (A)", syn(40005).vlan(42).build(), Ipip(0, XDP_TX)),
        fx("VLAN-tagged ACK of that flow: A", Pkt::tcp(CLIENT, 40005, VIP, 80, TCP_ACK).vlan(42).build(), Ipip(0, XDP_TX)),
        fx("TOS and DF copied to the outer header (B)", syn(40006).tos(0xb8).frag(0).build(), Ipip(1, XDP_TX)),
        fx("first fragment to the VIP", syn(40007).frag(0x2000).payload(&[1; 16]).build(), Untouched),
        fx("later fragment to the VIP", syn(40007).frag(0x0003).payload(&[1; 16]).build(), Untouched),
        fx("VIP with a routed backend: next hop is the router", Pkt::tcp(CLIENT, 40008, VIP_ROUTED, 80, TCP_SYN).build(), Ipip(2, XDP_TX)),
        fx("VIP whose backend is on another interface: XDP_REDIRECT", Pkt::tcp(CLIENT, 40009, VIP_REDIRECT, 80, TCP_SYN).build(), Ipip(3, XDP_REDIRECT)),
        fx("VIP whose backend's neighbour is unresolved: encapsulated, to the kernel", Pkt::tcp(CLIENT, 40010, VIP_NO_NEIGH, 80, TCP_SYN).build(), IpipToKernel(4)),
        fx("l2-mode VIP: only the MACs change", Pkt::tcp(CLIENT, 40011, VIP_L2, 80, TCP_SYN).payload(b"GET /").build(), L2(5)),
        fx("l2-mode VIP, VLAN-tagged", Pkt::tcp(CLIENT, 40011, VIP_L2, 80, TCP_ACK).vlan(9).build(), L2(5)),
        fx("too big once encapsulated (1481 + 20 > MTU 1500), DF: ICMP fragmentation needed, MTU 1480", Pkt::tcp(CLIENT, 40001, VIP, 80, TCP_ACK).payload(&[0; 1441]).build(), TooBig(1480)),
        fx("the same without DF: passed untouched", Pkt::tcp(CLIENT, 40001, VIP, 80, TCP_ACK).frag(0).payload(&[0; 1441]).build(), Untouched),
        fx("too big, VLAN-tagged, IPv4 options: the reply keeps the tag, quotes the options", Pkt::tcp(CLIENT, 40002, VIP, 80, TCP_ACK).vlan(42).ip_options(&[1, 1, 1, 0]).payload(&[9; 1500]).build(), TooBig(1480)),
        fx("too big from a multicast source: no ICMP, passed untouched", Pkt::tcp([224, 0, 0, 5], 40001, VIP, 80, TCP_ACK).payload(&[0; 1441]).build(), Untouched),
        fx("too big UDP, DF: ICMP", Pkt::udp(CLIENT, 5000, VIP, 53).payload(&[5; 1473]).build(), TooBig(1480)),
        fx("largest that fits (1480 + 20): encapsulated (A)", Pkt::tcp(CLIENT, 40001, VIP, 80, TCP_ACK).payload(&[0; 1440]).build(), Ipip(0, XDP_TX)),
        fx("FIN of the first flow: A", Pkt::tcp(CLIENT, 40001, VIP, 80, TCP_FIN | TCP_ACK).build(), Ipip(0, XDP_TX)),
    ];
    // Truncation at every byte (so at every header boundary) of a VLAN-tagged SYN with
    // options to the VIP: passed untouched, never aborted, no flow created. (BPF_PROG_TEST_RUN
    // refuses frames shorter than an Ethernet header, as drivers never deliver them.)
    let full = syn(40100).vlan(3).ip_options(&[1, 1, 1, 0]).build();
    for len in MIN_FRAME..full.len() {
        f.push(fx(&format!("VIP SYN truncated to {len} bytes"), full[..len].to_vec(), Untouched));
    }
    f
}

/// A router on the way from the backends to the clients.
const ROUTER: [u8; 4] = [172, 16, 9, 1];

/// A backend's reply on flow `sport` of the VIP (from the VIP to the client), as a router
/// quotes it.
fn reply(sport: u16) -> Vec<u8> {
    Pkt::tcp(VIP, 80, CLIENT, sport, TCP_ACK).payload(&[3; 1400]).ip_packet()
}

/// The backend (A or B) the hash places the client's flow `sport` on.
fn hash_backend(sport: u16) -> usize {
    (flow_key(sport).hash() % 2) as usize
}

/// An address that is not a VIP's but has `vip`'s bit in the VIP address filter.
fn filter_twin(vip: [u8; 4]) -> [u8; 4] {
    let bit = lb_common::vip::addr_filter_bit(vip);
    (1..=u32::MAX)
        .map(|i| (u32::from_be_bytes([10, 200, 0, 0]) + i).to_be_bytes())
        .find(|&a| lb_common::vip::addr_filter_bit(a) == bit)
        .unwrap()
}

fn flow_key(sport: u16) -> FlowKey {
    parse_frame(&syn(sport).build()[..]).unwrap().key()
}

#[test]
fn balancer_fixtures() {
    if !privileged("balancer_fixtures") {
        return;
    }
    pin_to_cpu(0);
    let (ingress, dp) = loaded();

    let mut sent = [(0u64, 0u64); 6];
    let table = fixtures();
    for (n, fx) in table.iter().enumerate() {
        let got = testrun::run(dp.program(), &fx.input, Some(ingress)).expect("test run");
        let (action, frame, backend) = fx.expected();
        assert!(
            got.action == action && got.frame == frame,
            "fixture {n} ({}):\n  action {} expected {}\n  got:\n{}\n  expected:\n{}",
            fx.desc,
            action_name(got.action),
            action_name(action),
            hex(&got.frame),
            hex(&frame)
        );
        if let Some(b) = backend {
            sent[b].0 += 1;
            sent[b].1 += (l2_len(&fx.input) + usize::from(u16::from_be_bytes([fx.input[l2_len(&fx.input) + 2], fx.input[l2_len(&fx.input) + 3]]))) as u64;
        }
    }
    eprintln!("{} fixtures passed", table.len());

    for (i, &(packets, bytes)) in sent.iter().enumerate() {
        let s = dp.backend_stats(i as u32).unwrap();
        assert_eq!((s.packets, s.bytes), (packets, bytes), "backend {i} counters");
    }
    let g = dp.global_stats().unwrap();
    // Flows opened: 4 TCP flows on VIP (40001, 40002, 40003, 40004), 40005, 40006, 2 UDP,
    // 40008..=40011.
    assert_eq!(g.get(Counter::NewFlow), 12);
    assert_eq!(dp.backend_stats(0).unwrap().new_flows + dp.backend_stats(1).unwrap().new_flows, 8);
    assert_eq!(g.get(Counter::Fragment), 2);
    assert_eq!(g.get(Counter::TooBig), 2);
    assert_eq!(g.get(Counter::IcmpTooBig), 3);
    assert_eq!(g.get(Counter::IcmpEcho), 2);
    assert_eq!(g.get(Counter::IcmpToBackend), 2);
    assert_eq!(g.get(Counter::Redirect), 1);
    assert_eq!(g.get(Counter::FibNoNeigh), 1);
    assert_eq!(g.get(Counter::Ipv6), 1);
    assert_eq!(g.get(Counter::NotIp), 1);
    let truncated = table.iter().filter(|f| f.desc.contains("truncated")).count();
    assert_eq!(g.get(Counter::Malformed), truncated as u64, "every truncation counted");
    assert_eq!(dp.flow(&flow_key(40001)).map(|v| v.backend), Some(0));
    assert_eq!(dp.flow(&flow_key(40002)).map(|v| v.backend), Some(1));
    assert_eq!(dp.flow(&flow_key(40100)), None, "no flow from a truncated SYN");
}

#[test]
fn lost_flow_state_falls_back_to_the_hash_and_recreates_the_entry() {
    if !privileged("lost_flow_state") {
        return;
    }
    pin_to_cpu(0);
    let (ingress, mut dp) = loaded();
    let ring = [0u32, 1];
    for sport in 41000..41040u16 {
        let ack = Pkt::tcp(CLIENT, sport, VIP, 80, TCP_ACK).build();
        let key = parse_frame(&ack[..]).unwrap().key();
        let expected = ring[(key.hash() % 2) as usize] as usize;
        let got = testrun::run(dp.program(), &ack, Some(ingress)).unwrap();
        let want = ipip(&ack, 14, LB_ADDR, REALS[expected].addr, Some((LB_MAC, REALS[expected].next_hop_mac)));
        assert_eq!((got.action, &got.frame), (XDP_TX, &want), "sport {sport}");
        assert_eq!(dp.flow(&key).map(|v| v.backend), Some(expected as u32), "entry re-created");
        // Same answer again (now from the table), and after the table is lost once more.
        assert_eq!(testrun::run(dp.program(), &ack, Some(ingress)).unwrap().frame, want);
    }
    dp.clear_flows().unwrap();
    let ack = Pkt::tcp(CLIENT, 41000, VIP, 80, TCP_ACK).build();
    let key = parse_frame(&ack[..]).unwrap().key();
    testrun::run(dp.program(), &ack, Some(ingress)).unwrap();
    assert_eq!(dp.flow(&key).map(|v| v.backend), Some(ring[(key.hash() % 2) as usize]));
    // A RST without an entry is placed the same way but creates no entry.
    let rst = Pkt::tcp(CLIENT, 41999, VIP, 80, TCP_RST).build();
    let got = testrun::run(dp.program(), &rst, Some(ingress)).unwrap();
    assert_eq!(got.action, XDP_TX);
    assert_eq!(dp.flow(&parse_frame(&rst[..]).unwrap().key()), None);
    assert_eq!(dp.global_stats().unwrap().get(Counter::HashFallback), 40 + 1 + 1);
    assert_eq!(dp.global_stats().unwrap().get(Counter::NewFlow), 0);
}

#[test]
fn decap_fixtures() {
    if !privileged("decap_fixtures") {
        return;
    }
    let mut d = Decap::load().expect("load decap");
    let host = [10, 0, 0, 2];
    d.add_local_address(Ipv4Addr::from(host)).unwrap();
    let inner = syn(40001).payload(b"hello").build();
    let enc = ipip(&inner, 14, LB_ADDR, host, None);
    let inner_v = syn(40002).vlan(12).build();
    let enc_v = ipip(&inner_v, 18, LB_ADDR, host, None);
    // Outer header with options (IHL 6).
    let mut enc_opt = enc[..14].to_vec();
    let mut outer = enc[14..34].to_vec();
    outer[0] = 0x46;
    let tot = u16::from_be_bytes([outer[2], outer[3]]) + 4;
    outer[2..4].copy_from_slice(&tot.to_be_bytes());
    outer[10] = 0;
    outer[11] = 0;
    outer.extend_from_slice(&[1, 1, 1, 0]);
    enc_opt.extend_from_slice(&outer);
    enc_opt.extend_from_slice(&enc[34..]);

    let cases: Vec<(String, Vec<u8>, Vec<u8>)> = {
        let mut c = vec![
            ("IPIP to this host: inner packet".to_string(), enc.clone(), inner.clone()),
            ("VLAN-tagged IPIP to this host: inner packet, tag kept".into(), enc_v.clone(), inner_v.clone()),
            ("IPIP with outer options: inner packet".into(), enc_opt.clone(), inner.clone()),
            ("IPIP to another host: untouched".into(), ipip(&inner, 14, LB_ADDR, [10, 0, 0, 3], None), ipip(&inner, 14, LB_ADDR, [10, 0, 0, 3], None)),
            ("plain TCP to this host: untouched".into(), Pkt::tcp(CLIENT, 1, host, 80, TCP_SYN).build(), Pkt::tcp(CLIENT, 1, host, 80, TCP_SYN).build()),
            ("ARP: untouched".into(), arp_request(CLIENT, host), arp_request(CLIENT, host)),
            ("IPv6: untouched".into(), ipv6_tcp_syn(), ipv6_tcp_syn()),
        ];
        for len in MIN_FRAME..enc.len() {
            c.push((format!("IPIP truncated to {len}: untouched"), enc[..len].to_vec(), enc[..len].to_vec()));
        }
        let mut bad_inner = enc.clone();
        bad_inner[34] = 0x55; // inner IHL 5 but version 5
        c.push(("inner not IPv4: untouched".into(), bad_inner.clone(), bad_inner));
        c
    };
    for (desc, input, output) in &cases {
        let got = testrun::run(d.program(), input, None).unwrap();
        assert!(
            got.action == XDP_PASS && &got.frame == output,
            "{desc}: action {}\n  got:\n{}\n  expected:\n{}",
            action_name(got.action),
            hex(&got.frame),
            hex(output)
        );
    }
    let s = d.stats().unwrap();
    assert_eq!(s.get(Counter::Decap), 3);
    assert_eq!(s.get(Counter::DecapNotLocal), 1);
    eprintln!("{} decap fixtures passed", cases.len());
}

/// Round-robin over k equal backends: each gets N/k within ± the number of CPUs, also with
/// flows arriving on every CPU at once.
#[test]
fn round_robin_spread_across_cpus() {
    if !privileged("round_robin_spread_across_cpus") {
        return;
    }
    let (ingress, mut dp) = loaded();
    let vip = [10, 100, 0, 9];
    let ring = lb_common::ring::build(&[(0, 1), (1, 1), (2, 1)]).unwrap();
    dp.set_vip(lb_common::vip::VipKey::new(vip, 80, lb_common::vip::PROTO_TCP), 9, lb_common::vip::ForwardMode::Ipip, &ring)
        .unwrap();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // Unequal shares per CPU, all at once.
    let per_cpu: Vec<u16> = (0..cpus).map(|c| 1000 + 337 * c as u16).collect();
    let total: u64 = per_cpu.iter().map(|&n| u64::from(n)).sum();
    std::thread::scope(|s| {
        for (cpu, &n) in per_cpu.iter().enumerate() {
            let dp = &dp;
            s.spawn(move || {
                pin_to_cpu(cpu);
                for i in 0..n {
                    let src = [172, 16, cpu as u8, (i % 200) as u8];
                    let f = Pkt::tcp(src, 1024 + i, vip, 80, TCP_SYN).build();
                    let got = testrun::run(dp.program(), &f, Some(ingress)).unwrap();
                    assert_eq!(got.action, XDP_TX);
                }
            });
        }
    });
    let counts: Vec<u64> = (0..3).map(|b| dp.backend_stats(b).unwrap().new_flows).collect();
    eprintln!("{total} new flows on {cpus} CPUs: {counts:?}");
    assert_eq!(counts.iter().sum::<u64>(), total);
    for c in &counts {
        assert!(c.abs_diff(total / 3) <= cpus as u64, "{counts:?} not within ±{cpus} of {}", total / 3);
    }
}

/// At least 512 VIPs (we hold 1024), each reached by its own traffic; a VIP whose ring is
/// empty drops and counts; a removed VIP passes untouched and the others stay reachable.
#[test]
fn a_thousand_vips_and_vips_without_backends() {
    use lb_common::vip::{ForwardMode, VipKey, MAX_VIPS, PROTO_TCP};
    if !privileged("a_thousand_vips") {
        return;
    }
    let (ingress, mut dp) = loaded();
    let key = |n: u32| VipKey::new([10, 200, (n >> 8) as u8, n as u8], 443, PROTO_TCP);
    // configure() installed 6 VIPs with numbers 0..=5; fill every other number.
    for n in 6..MAX_VIPS {
        dp.set_vip(key(n), n, ForwardMode::Ipip, &[n % 2]).unwrap();
    }
    for n in 6..MAX_VIPS {
        let f = Pkt::tcp(CLIENT, 40000, key(n).addr, 443, TCP_SYN).build();
        let b = (n % 2) as usize;
        let want = ipip(&f, 14, LB_ADDR, REALS[b].addr, Some((LB_MAC, REALS[b].next_hop_mac)));
        let got = testrun::run(dp.program(), &f, Some(ingress)).unwrap();
        assert_eq!((got.action, got.frame), (XDP_TX, want), "VIP number {n}");
    }
    // No backends: dropped, counted, nothing else changes.
    dp.set_vip(key(7), 7, ForwardMode::Ipip, &[]).unwrap();
    let f = Pkt::tcp(CLIENT, 40001, key(7).addr, 443, TCP_SYN).build();
    let got = testrun::run(dp.program(), &f, Some(ingress)).unwrap();
    assert_eq!((got.action, &got.frame), (lb_userspace::testrun::XDP_DROP, &f));
    assert_eq!(dp.global_stats().unwrap().get(Counter::NoBackend), 1);
    // Removed: passed untouched; its neighbours in the table are still found.
    dp.remove_vip(&key(8)).unwrap();
    let f = Pkt::tcp(CLIENT, 40002, key(8).addr, 443, TCP_SYN).build();
    let got = testrun::run(dp.program(), &f, Some(ingress)).unwrap();
    assert_eq!((got.action, &got.frame), (XDP_PASS, &f));
    for n in (9..MAX_VIPS).step_by(7) {
        let f = Pkt::tcp(CLIENT, 40003, key(n).addr, 443, TCP_SYN).build();
        assert_eq!(testrun::run(dp.program(), &f, Some(ingress)).unwrap().action, XDP_TX, "VIP number {n}");
    }
}

/// The VIP address filter (`lb_common::vip::addr_filter_bit`) lets a VIP's packets in from
/// the moment the VIP exists, and stops reading the TCP header of packets to an address once
/// its last VIP is gone. Observable through the counters: a packet with a truncated TCP
/// header is Malformed when its address has a VIP and NotVip when it has none.
#[test]
fn vip_address_filter_follows_vip_changes() {
    use lb_common::vip::{ForwardMode, VipKey, PROTO_TCP};
    if !privileged("vip_address_filter_follows_vip_changes") {
        return;
    }
    let (ingress, mut dp) = loaded();
    let addr = [10, 201, 0, 1];
    let (web, alt) = (VipKey::new(addr, 443, PROTO_TCP), VipKey::new(addr, 8443, PROTO_TCP));
    let syn = |port: u16| Pkt::tcp(CLIENT, 40000, addr, port, TCP_SYN).build();
    // IPv4 total length 30: the TCP header ends after 10 bytes.
    let truncated = {
        let mut f = syn(443);
        f.truncate(14 + 20 + 10);
        f[16..18].copy_from_slice(&30u16.to_be_bytes());
        f
    };
    let run = |dp: &Dataplane, f: &[u8]| testrun::run(dp.program(), f, Some(ingress)).unwrap();
    let counts = |dp: &Dataplane| {
        let g = dp.global_stats().unwrap();
        (g.get(Counter::NotVip), g.get(Counter::Malformed))
    };
    let (not_vip, malformed) = counts(&dp);
    assert_eq!(run(&dp, &truncated).action, XDP_PASS);
    assert_eq!(counts(&dp), (not_vip + 1, malformed), "no VIP on the address: filtered before TCP");

    dp.set_vip(web, 10, ForwardMode::Ipip, &[0]).unwrap();
    dp.set_vip(alt, 11, ForwardMode::Ipip, &[1]).unwrap();
    assert_eq!(run(&dp, &syn(443)).action, XDP_TX);
    assert_eq!(run(&dp, &syn(8443)).action, XDP_TX);
    let got = run(&dp, &truncated);
    assert_eq!((got.action, &got.frame), (XDP_PASS, &truncated));
    assert_eq!(counts(&dp), (not_vip + 1, malformed + 1), "a VIP's address: its TCP header is read");

    dp.remove_vip(&web).unwrap();
    assert_eq!(run(&dp, &syn(443)).action, XDP_PASS, "removed");
    assert_eq!(run(&dp, &syn(8443)).action, XDP_TX, "the address keeps its other VIP");
    dp.remove_vip(&alt).unwrap();
    assert_eq!(run(&dp, &syn(8443)).action, XDP_PASS, "removed");
    let before = counts(&dp);
    assert_eq!(run(&dp, &truncated).action, XDP_PASS);
    assert_eq!(counts(&dp), (before.0 + 1, before.1), "the last VIP gone: filtered again");
}

/// A backend marked down: its pinned flows move (by hash) to a live backend of the ring,
/// the move is remembered, new flows avoid it; back up, it takes new flows again.
#[test]
fn flows_of_a_dead_backend_are_resteered() {
    use lb_common::vip::{ForwardMode, VipKey, PROTO_TCP};
    if !privileged("flows_of_a_dead_backend_are_resteered") {
        return;
    }
    pin_to_cpu(0);
    let (ingress, mut dp) = loaded();
    let to = |b: usize, f: &[u8]| ipip(f, 14, LB_ADDR, REALS[b].addr, Some((LB_MAC, REALS[b].next_hop_mac)));
    // Two flows: 41001 on A, 41002 on B.
    for (sport, b) in [(41001u16, 0usize), (41002, 1)] {
        let f = syn(sport).build();
        assert_eq!(testrun::run(dp.program(), &f, Some(ingress)).unwrap().frame, to(b, &f), "SYN {sport}");
    }
    // A dies: rings first, then the flag.
    let key = VipKey::new(VIP, 80, PROTO_TCP);
    dp.set_vip(key, 0, ForwardMode::Ipip, &[1]).unwrap();
    dp.set_backend_down(0, true).unwrap();
    let ack_a = Pkt::tcp(CLIENT, 41001, VIP, 80, TCP_ACK).build();
    let got = testrun::run(dp.program(), &ack_a, Some(ingress)).unwrap();
    assert_eq!((got.action, &got.frame), (XDP_TX, &to(1, &ack_a)), "flow of the dead backend re-steered to B");
    assert_eq!(dp.flow(&flow_key(41001)).map(|v| v.backend), Some(1), "the move is remembered");
    let ack_b = Pkt::tcp(CLIENT, 41002, VIP, 80, TCP_ACK).build();
    assert_eq!(testrun::run(dp.program(), &ack_b, Some(ingress)).unwrap().frame, to(1, &ack_b), "B's flow untouched");
    let f = syn(41003).build();
    assert_eq!(testrun::run(dp.program(), &f, Some(ingress)).unwrap().frame, to(1, &f), "new flow avoids A");
    assert_eq!(dp.global_stats().unwrap().get(Counter::Resteer), 1);
    // A is back: new flows reach it again; the moved flow stays where it went.
    dp.set_backend_down(0, false).unwrap();
    dp.set_vip(key, 0, ForwardMode::Ipip, &[0, 1]).unwrap();
    assert_eq!(testrun::run(dp.program(), &ack_a, Some(ingress)).unwrap().frame, to(1, &ack_a));
    let placed: Vec<usize> = (41010..41014u16)
        .map(|sport| {
            let f = syn(sport).build();
            let out = testrun::run(dp.program(), &f, Some(ingress)).unwrap().frame;
            (0..2).find(|&b| out == to(b, &f)).expect("to A or B")
        })
        .collect();
    assert!(placed.contains(&0) && placed.contains(&1), "both in rotation again: {placed:?}");
}

/// The lab, on CPU 0, with a balancer whose flow table is one set (eight ways).
fn one_set_table() -> (u32, Dataplane) {
    pin_to_cpu(0);
    let ingress = topology();
    let mut dp = Dataplane::load(&LoadOptions { flow_table_size: 4, pin_dir: None, flow_seed: None }).expect("load balancer");
    configure(&mut dp);
    (ingress, dp)
}

#[test]
fn a_full_flow_set_replaces_the_flow_seen_longest_ago() {
    if !privileged("full_flow_set") {
        return;
    }
    // A table of one set: eight flows fit, a ninth replaces the one seen longest ago.
    let (ingress, dp) = one_set_table();
    let open = |dp: &Dataplane, sport: u16| {
        let got = testrun::run(dp.program(), &syn(sport).build(), Some(ingress)).unwrap();
        assert_eq!(got.action, XDP_TX, "SYN {sport}");
    };
    let sports: Vec<u16> = (42001..=42008).collect();
    for &s in &sports {
        open(&dp, s);
    }
    let pinned: Vec<Option<u32>> = sports.iter().map(|&s| dp.flow(&flow_key(s)).map(|v| v.backend)).collect();
    assert!(pinned.iter().all(Option::is_some), "eight flows fit one set: {pinned:?}");
    // Flows 2..8 are seen again (an ACK each), so flow 1 is the one seen longest ago, or
    // ties with them (all within one time unit) and sits in the first way: either way it goes.
    for &s in &sports[1..] {
        let ack = Pkt::tcp(CLIENT, s, VIP, 80, TCP_ACK).build();
        assert_eq!(testrun::run(dp.program(), &ack, Some(ingress)).unwrap().action, XDP_TX);
    }
    open(&dp, 42100);
    assert!(dp.flow(&flow_key(42100)).is_some(), "the new flow has an entry");
    assert_eq!(dp.flow(&flow_key(42001)), None, "the flow seen longest ago left");
    for (i, &s) in sports.iter().enumerate().skip(1) {
        assert_eq!(dp.flow(&flow_key(s)).map(|v| v.backend), pinned[i], "flow {s} kept its backend");
    }
    let g = dp.global_stats().unwrap();
    assert_eq!((g.get(Counter::NewFlow), g.get(Counter::FlowHit)), (9, 7));
}

/// A SYN flood against a table of one set: without the guard it replaces a pinned flow's
/// entry; with it (3 pinned SYNs per window and CPU), flooded SYNs are placed by their hash
/// without an entry, the pinned flow keeps its entry, and a flooded flow that goes on (its
/// ACK) lands where its SYN went and is pinned then.
#[test]
fn the_flood_guard_keeps_pinned_flows_through_a_syn_flood() {
    if !privileged("flood_guard") {
        return;
    }
    let (ingress, mut dp) = one_set_table();
    let send = |dp: &Dataplane, frame: Vec<u8>| {
        let got = testrun::run(dp.program(), &frame, Some(ingress)).unwrap();
        assert_eq!(got.action, XDP_TX);
        let l2 = l2_len(&got.frame);
        // The outer destination: which backend it went to.
        REALS.iter().position(|r| got.frame[l2 + 16..l2 + 20] == r.addr).unwrap()
    };
    let flood = 43000..43200u16;

    // No guard: eight SYNs fill the set, the ninth replaces the pinned flow's entry.
    dp.set_flood_limit(0).unwrap();
    send(&dp, syn(42000).build());
    for sport in flood.clone().take(8) {
        send(&dp, syn(sport).build());
    }
    assert_eq!(dp.flow(&flow_key(42000)), None, "without the guard the flood evicts the flow");

    dp.clear_flows().unwrap();
    dp.set_flood_limit(3).unwrap();
    let before = dp.global_stats().unwrap();
    let backend = send(&dp, syn(42000).build());
    for sport in flood.clone() {
        let went = send(&dp, syn(sport).build());
        if dp.flow(&flow_key(sport)).is_none() {
            assert_eq!(went, hash_backend(sport), "a flooded SYN {sport} goes where its hash says");
        }
    }
    let g = dp.global_stats().unwrap();
    let (pinned, guarded) = (g.get(Counter::NewFlow) - before.get(Counter::NewFlow), g.get(Counter::FloodGuard) - before.get(Counter::FloodGuard));
    eprintln!("flood of {}: {pinned} SYNs pinned (with the flow's own), {guarded} by hash", flood.len());
    assert_eq!(pinned + guarded, flood.len() as u64 + 1);
    // Three per window; the test takes far less than a window (1.07 s), so at most two.
    assert!((3..=6).contains(&pinned), "{pinned} pinned");
    assert_eq!(dp.flow(&flow_key(42000)).map(|v| v.backend), Some(backend as u32), "the pinned flow kept its entry");
    // A flooded flow's ACK: no entry, so the hash, as its SYN; pinned from then on.
    let sport = flood.clone().find(|&s| dp.flow(&flow_key(s)).is_none()).unwrap();
    assert_eq!(send(&dp, Pkt::tcp(CLIENT, sport, VIP, 80, TCP_ACK).build()), hash_backend(sport));
    assert_eq!(dp.flow(&flow_key(sport)).map(|v| v.backend), Some(hash_backend(sport) as u32));
    // UDP is not guarded: every new 5-tuple is pinned.
    let udp_before = dp.global_stats().unwrap().get(Counter::NewFlow);
    for sport in 6000..6010u16 {
        send(&dp, Pkt::udp(CLIENT, sport, VIP, 53).build());
    }
    assert_eq!(dp.global_stats().unwrap().get(Counter::NewFlow) - udp_before, 10);

    // Withdrawing (`HASH_NEW_FLOWS`): every new flow, TCP or UDP, goes where its hash says
    // (where another balancer would place its later packets) without an entry; pinned
    // flows keep theirs.
    dp.clear_flows().unwrap();
    dp.set_flood_limit(0).unwrap();
    let pinned_backend = send(&dp, syn(42001).build());
    dp.set_flood_limit(lb_common::flood::HASH_NEW_FLOWS).unwrap();
    let before = dp.global_stats().unwrap();
    for sport in 44100..44140u16 {
        assert_eq!(send(&dp, syn(sport).build()), hash_backend(sport), "SYN {sport} while withdrawing");
        assert_eq!(dp.flow(&flow_key(sport)), None, "no entry for {sport}");
    }
    for sport in 7000..7010u16 {
        let f = Pkt::udp(CLIENT, sport, VIP, 53).build();
        let key = parse_frame(&f[..]).unwrap().key();
        assert_eq!(send(&dp, f), (key.hash() % 2) as usize, "UDP {sport} while withdrawing");
    }
    assert_eq!(send(&dp, Pkt::tcp(CLIENT, 42001, VIP, 80, TCP_ACK).build()), pinned_backend, "a pinned flow stays");
    let g = dp.global_stats().unwrap();
    assert_eq!(g.get(Counter::Withdrawing) - before.get(Counter::Withdrawing), 50);
    assert_eq!(g.get(Counter::NewFlow), before.get(Counter::NewFlow));
}

/// The per-source limit: past it a source's new flows are dropped; its pinned flows, their
/// retransmitted SYNs and other sources go on; a new window admits it again.
#[test]
fn a_source_past_its_new_flow_limit_is_dropped() {
    if !privileged("source_limit") {
        return;
    }
    let (ingress, mut dp) = loaded();
    let run = |dp: &Dataplane, frame: Vec<u8>| action_name(testrun::run(dp.program(), &frame, Some(ingress)).unwrap().action);
    let other = [192, 168, 8, 20];
    // Off (the default): any number of new flows.
    for sport in 3000..3010u16 {
        assert_eq!(run(&dp, syn(sport).build()), "XDP_TX");
    }
    dp.set_source_limit(3).unwrap();
    let before = dp.global_stats().unwrap();
    let got: Vec<_> = (3100..3106u16).map(|sport| run(&dp, syn(sport).build())).collect();
    assert_eq!(got, ["XDP_TX", "XDP_TX", "XDP_TX", "XDP_DROP", "XDP_DROP", "XDP_DROP"], "three new flows a window");
    let got: Vec<_> = (7000..7004u16).map(|sport| run(&dp, Pkt::udp(CLIENT, sport, VIP, 53).build())).collect();
    assert_eq!(got, ["XDP_DROP"; 4], "UDP flows count too");
    assert_eq!(run(&dp, Pkt::tcp(other, 3100, VIP, 80, TCP_SYN).build()), "XDP_TX", "another source has its own count");
    // What is pinned goes on: the flows' packets and a retransmitted SYN.
    assert_eq!(run(&dp, Pkt::tcp(CLIENT, 3100, VIP, 80, TCP_ACK).build()), "XDP_TX");
    assert_eq!(run(&dp, syn(3101).build()), "XDP_TX", "a retransmitted SYN of a pinned flow");
    assert_eq!(run(&dp, Pkt::udp(CLIENT, 7000, VIP, 53).build()), "XDP_DROP", "an unpinned UDP flow stays new");
    let g = dp.global_stats().unwrap();
    assert_eq!(g.get(Counter::SourceLimit) - before.get(Counter::SourceLimit), 8);
    assert_eq!(g.get(Counter::NewFlow) - before.get(Counter::NewFlow), 4);
    // A window (2^30 ns) later the source may open flows again.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(run(&dp, syn(3200).build()), "XDP_TX");
    // Off again: nothing is dropped.
    dp.set_source_limit(0).unwrap();
    for sport in 3300..3310u16 {
        assert_eq!(run(&dp, syn(sport).build()), "XDP_TX");
    }
}

/// A VIP with an allow list takes packets from the sources it holds only; the VIP's other
/// ports, ring rebuilds and a cleared list behave as they should.
#[test]
fn a_vip_with_an_allow_list_drops_other_sources() {
    if !privileged("vip_allow") {
        return;
    }
    use lb_common::vip::{ForwardMode, VipKey, PROTO_TCP};
    let (ingress, mut dp) = loaded();
    let run = |dp: &Dataplane, frame: Vec<u8>| action_name(testrun::run(dp.program(), &frame, Some(ingress)).unwrap().action);
    let web = VipKey::new(VIP, 80, PROTO_TCP);
    let prefix = |s: &str| s.parse::<lb_common::firewall::Prefix>().unwrap();
    let other = [192, 168, 8, 20];
    let inside = [10, 9, 1, 2];
    dp.set_vip_allow(web, 0, ForwardMode::Ipip, &[0, 1], &[prefix("192.168.7.0/24"), prefix("10.9.0.0/16")]).unwrap();
    assert_eq!(dp.vip_allow_list(0).len(), 2);
    let before = dp.global_stats().unwrap().get(Counter::VipNotAllowed);
    assert_eq!(run(&dp, syn(5000).build()), "XDP_TX", "the client's /24 is allowed");
    assert_eq!(run(&dp, Pkt::tcp(inside, 5001, VIP, 80, TCP_SYN).build()), "XDP_TX", "so is 10.9/16");
    assert_eq!(run(&dp, Pkt::tcp(other, 5002, VIP, 80, TCP_SYN).build()), "XDP_DROP", "another source is not");
    assert_eq!(run(&dp, Pkt::tcp(other, 5002, VIP, 80, TCP_ACK).build()), "XDP_DROP", "nor its later packets");
    assert_eq!(run(&dp, Pkt::udp(other, 5003, VIP, 53).build()), "XDP_TX", "the same address's UDP VIP has no list");
    assert_eq!(dp.global_stats().unwrap().get(Counter::VipNotAllowed) - before, 2);
    // A ring rebuild (what the daemon does on every health change) keeps the list.
    dp.set_vip(web, 0, ForwardMode::Ipip, &[1]).unwrap();
    assert_eq!(run(&dp, Pkt::tcp(other, 5004, VIP, 80, TCP_SYN).build()), "XDP_DROP");
    assert_eq!(run(&dp, Pkt::tcp(inside, 5005, VIP, 80, TCP_SYN).build()), "XDP_TX");
    // Changed in place: 10.9/16 out, the other host in.
    dp.set_allow(&web, &[prefix("192.168.7.0/24"), prefix("192.168.8.20/32")]).unwrap();
    assert_eq!(run(&dp, Pkt::tcp(other, 5006, VIP, 80, TCP_SYN).build()), "XDP_TX");
    assert_eq!(run(&dp, Pkt::tcp(inside, 5007, VIP, 80, TCP_SYN).build()), "XDP_DROP");
    // Cleared: every source again.
    dp.set_allow(&web, &[]).unwrap();
    assert!(dp.vip_allow_list(0).is_empty());
    assert_eq!(run(&dp, Pkt::tcp(inside, 5008, VIP, 80, TCP_SYN).build()), "XDP_TX");
    // A removed VIP's list goes with it: the next VIP with its number starts open.
    dp.set_allow(&web, &[prefix("192.168.7.0/24")]).unwrap();
    dp.remove_vip(&web).unwrap();
    assert!(dp.vip_allow_list(0).is_empty());
    dp.set_vip(web, 0, ForwardMode::Ipip, &[0, 1]).unwrap();
    assert_eq!(run(&dp, Pkt::tcp(inside, 5009, VIP, 80, TCP_SYN).build()), "XDP_TX");
    assert!(matches!(dp.set_allow(&VipKey::new(VIP, 81, PROTO_TCP), &[]), Err(DataplaneError::NoVip(_))));
}

fn rule(prefix: &str, allow: bool) -> Rule {
    Rule { prefix: prefix.parse().unwrap(), allow }
}

/// The firewall's rules, each with the packets it decided.
fn rule_counts(dp: &Dataplane) -> Vec<(String, &'static str, u64, u64)> {
    dp.firewall_stats().unwrap().into_iter().map(|(r, s)| (r.prefix.to_string(), r.verdict(), s.packets, s.bytes)).collect()
}

#[test]
fn the_firewall_drops_denied_sources_before_anything_else() {
    if !privileged("firewall") {
        return;
    }
    let (ingress, mut dp) = loaded();
    let run = |dp: &Dataplane, frame: &[u8]| testrun::run(dp.program(), frame, Some(ingress)).unwrap();
    let denied = [203, 0, 113, 7];
    let excepted = [203, 0, 113, 200];
    let host = [198, 51, 100, 7];
    let neighbour = [198, 51, 100, 8];
    // No rules: the program does not look, and these flows are balanced as any other.
    assert_eq!(run(&dp, &Pkt::tcp(denied, 1000, VIP, 80, TCP_SYN).build()).action, XDP_TX);
    dp.set_firewall(&[rule("203.0.113.0/24", false), rule("203.0.113.128/25", true), rule("198.51.100.7", false)]).unwrap();

    // (what, frame, action; an XDP_PASS frame must come out unchanged)
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("SYN to the VIP from a denied /24", Pkt::tcp(denied, 1001, VIP, 80, TCP_SYN).build(), XDP_DROP),
        ("ACK of a flow pinned before the rule", Pkt::tcp(denied, 1000, VIP, 80, TCP_ACK).build(), XDP_DROP),
        ("SYN from the allowed /25 inside it (longest prefix wins)", Pkt::tcp(excepted, 1002, VIP, 80, TCP_SYN).build(), XDP_TX),
        ("TCP to a non-VIP address from the denied /24", Pkt::tcp(denied, 1003, LB_ADDR, 22, TCP_SYN).build(), XDP_DROP),
        ("UDP to the VIP from the denied host", Pkt::udp(host, 1004, VIP, 53).build(), XDP_DROP),
        ("UDP to the VIP from the host next to it", Pkt::udp(neighbour, 1005, VIP, 53).build(), XDP_TX),
        ("echo request to the VIP from the denied host", Pkt::icmp_echo(host, VIP).build(), XDP_DROP),
        ("fragment from the denied /24", Pkt::udp(denied, 1006, VIP, 53).frag(0x2001).build(), XDP_DROP),
        ("VLAN-tagged, IPv4 options, from the denied /24", Pkt::tcp(denied, 1007, VIP, 80, TCP_SYN).vlan(9).ip_options(&[1, 1, 1, 0]).build(), XDP_DROP),
        ("GRE from the denied host to another host", Pkt::proto(host, [10, 9, 9, 9], 47).build(), XDP_DROP),
        ("a fragment from an undenied source: passed as before", Pkt::udp(neighbour, 1008, VIP, 53).frag(0x2001).build(), XDP_PASS),
        ("ARP from the denied host: not IPv4", arp_request(host, LB_ADDR), XDP_PASS),
        ("IPv6: not IPv4", ipv6_tcp_syn(), XDP_PASS),
    ];
    let mut expect_bytes = std::collections::BTreeMap::<&str, (u64, u64)>::new();
    let before = dp.global_stats().unwrap();
    for (what, frame, action) in &cases {
        let got = run(&dp, frame);
        assert_eq!(action_name(got.action), action_name(*action), "{what}");
        if *action == XDP_PASS {
            assert_eq!(hex(&got.frame), hex(frame), "{what}: passed unchanged");
        }
        let src: [u8; 4] = if frame.len() >= l2_len(frame) + 20 && frame[12..14] != [0x08, 0x06] && frame[12..14] != [0x86, 0xdd] {
            frame[l2_len(frame) + 12..l2_len(frame) + 16].try_into().unwrap()
        } else {
            continue;
        };
        let p = if src == host { "198.51.100.7/32" } else if src == excepted { "203.0.113.128/25" } else if src == denied { "203.0.113.0/24" } else { continue };
        let e = expect_bytes.entry(p).or_default();
        e.0 += 1;
        e.1 += frame.len() as u64;
    }
    let dropped = cases.iter().filter(|c| c.2 == XDP_DROP).count() as u64;
    let g = dp.global_stats().unwrap();
    assert_eq!(g.get(Counter::Firewall) - before.get(Counter::Firewall), dropped);
    let counts = rule_counts(&dp);
    eprintln!("{counts:?}");
    for (prefix, verdict, packets, bytes) in &counts {
        let (p, b) = expect_bytes.get(prefix.as_str()).copied().unwrap_or_default();
        assert_eq!((*packets, *bytes), (p, b), "{verdict} {prefix}: packets and bytes it decided");
    }
    assert_eq!(counts.len(), 3);

    // A changed rule set: rules kept keep their counters, a new one starts at zero.
    dp.set_firewall(&[rule("198.51.100.7", false), rule("0.0.0.0/0", false), rule("192.168.7.0/24", true)]).unwrap();
    let counts = rule_counts(&dp);
    assert_eq!(
        counts.iter().map(|(p, v, n, _)| (p.as_str(), *v, *n)).collect::<Vec<_>>(),
        [("0.0.0.0/0", "deny", 0), ("192.168.7.0/24", "allow", 0), ("198.51.100.7/32", "deny", 3)]
    );
    // Deny all but the clients' network: an allow list.
    assert_eq!(run(&dp, &Pkt::tcp(CLIENT, 2000, VIP, 80, TCP_SYN).build()).action, XDP_TX);
    assert_eq!(run(&dp, &Pkt::tcp(excepted, 2001, VIP, 80, TCP_SYN).build()).action, XDP_DROP);
    assert_eq!(run(&dp, &Pkt::tcp(neighbour, 2002, LB_ADDR, 22, TCP_SYN).build()).action, XDP_DROP);
    let counts = rule_counts(&dp);
    assert_eq!(counts.iter().map(|c| c.2).collect::<Vec<_>>(), [2, 1, 3]);

    // A verdict flipped is a new rule: its counters start again.
    dp.set_firewall(&[rule("198.51.100.7", true)]).unwrap();
    assert_eq!(rule_counts(&dp).iter().map(|(p, v, n, _)| (p.as_str(), *v, *n)).collect::<Vec<_>>(), [("198.51.100.7/32", "allow", 0)]);
    assert_eq!(run(&dp, &Pkt::udp(host, 2003, VIP, 53).build()).action, XDP_TX);
    assert_eq!(rule_counts(&dp)[0].2, 1);

    // Refused: the same prefix twice, more rules than the trie holds. Nothing changes.
    assert!(matches!(dp.set_firewall(&[rule("10.0.0.0/8", false), rule("10.0.0.0/8", true)]), Err(DataplaneError::FirewallDuplicate(_))));
    let many: Vec<Rule> = (0..=lb_common::firewall::MAX_RULES).map(|i| rule(&format!("{}.{}.{}.0/24", 10 + (i >> 16), (i >> 8) & 255, i & 255), false)).collect();
    assert!(matches!(dp.set_firewall(&many), Err(DataplaneError::FirewallFull(_))));
    assert_eq!(rule_counts(&dp).len(), 1);

    // No rules: nothing is looked up or counted.
    dp.set_firewall(&[]).unwrap();
    assert!(rule_counts(&dp).is_empty());
    let before = dp.global_stats().unwrap().get(Counter::Firewall);
    assert_eq!(run(&dp, &Pkt::tcp(denied, 2004, VIP, 80, TCP_SYN).build()).action, XDP_TX);
    assert_eq!(dp.global_stats().unwrap().get(Counter::Firewall), before);
}

/// A bpffs of the test's own (unmounted and removed on drop, also on failure).
struct BpfFs(std::path::PathBuf);

impl BpfFs {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("pin dir");
        sh(&format!("mount -t bpf bpf {}", dir.display()));
        Self(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn pins_of_another_version_are_replaced_and_pins_of_this_one_reused() {
    if !privileged("pins_of_another_version") {
        return;
    }
    pin_to_cpu(0);
    let ingress = topology();
    let fs = BpfFs::new("pins");
    // What the previous version pinned: the flow table as an LRU hash map, an 8-byte CONFIG.
    sh(&format!("bpftool map create {}/FLOWS type lru_hash key 16 value 8 entries 1024 name FLOWS", fs.0.display()));
    sh(&format!("bpftool map create {}/CONFIG type array key 4 value 8 entries 1 name CONFIG", fs.0.display()));
    let opts = LoadOptions { flow_table_size: 4096, pin_dir: Some(fs.0.clone()), flow_seed: None };
    let mut dp = Dataplane::load(&opts).expect("load over another version's pins");
    configure(&mut dp);
    let got = testrun::run(dp.program(), &syn(43001).build(), Some(ingress)).unwrap();
    assert_eq!(got.action, XDP_TX);
    let pinned = dp.flow(&flow_key(43001)).map(|v| v.backend);
    assert!(pinned.is_some(), "the new flow table pins flows");
    drop(dp);
    // A restart of this version adopts the pinned maps, which the running program still
    // uses: while the VIPs come back one by one, the address filter keeps the bits of those
    // not back yet (else their packets would pass as not for a VIP), until the sync.
    use lb_common::vip::{ForwardMode, VipKey, PROTO_TCP};
    let mut dp = Dataplane::load(&opts).expect("load over this version's pins");
    dp.set_vip(VipKey::new(VIP_L2, 80, PROTO_TCP), 5, ForwardMode::L2, &[5]).unwrap();
    let to_routed = Pkt::tcp(CLIENT, 43002, VIP_ROUTED, 80, TCP_SYN).build();
    let got = testrun::run(dp.program(), &to_routed, Some(ingress)).unwrap();
    assert_eq!(action_name(got.action), "XDP_TX", "a VIP not re-added yet is still balanced");
    configure(&mut dp);
    dp.set_vip(VipKey::new(VIP_ROUTED, 8080, PROTO_TCP), 7, ForwardMode::Ipip, &[2]).unwrap();
    dp.remove_vip(&VipKey::new(VIP_ROUTED, 80, PROTO_TCP)).unwrap();
    dp.remove_vip(&VipKey::new(VIP_ROUTED, 8080, PROTO_TCP)).unwrap();
    dp.sync_addr_filter().unwrap();
    let before = dp.global_stats().unwrap().get(Counter::NotVip);
    let got = testrun::run(dp.program(), &to_routed, Some(ingress)).unwrap();
    assert_eq!((action_name(got.action), dp.global_stats().unwrap().get(Counter::NotVip) - before), ("XDP_PASS", 1), "a removed VIP's address is filtered out after the sync");
    // The pinned table, its seed included: the flow stays.
    assert_eq!(dp.flow(&flow_key(43001)).map(|v| v.backend), pinned, "flow kept across the restart");
    let ack = Pkt::tcp(CLIENT, 43001, VIP, 80, TCP_ACK).build();
    testrun::run(dp.program(), &ack, Some(ingress)).unwrap();
    assert_eq!(dp.global_stats().unwrap().get(Counter::FlowHit), 1, "the ACK found its flow");
}

/// Two balancers with the same flow-table seed (active-active behind ECMP): flows pinned by
/// round robin on the first reach the second through the flow sync (`lb_userspace::sync`,
/// its datagrams handed over in memory), and their later packets leave the second balancer
/// for the same backends, as hits; without the sync the second places them by their hash,
/// which differs for some of them.
#[test]
fn flows_synced_from_another_balancer_keep_their_backends() {
    use lb_userspace::sync::{flow_seed, Backends, Syncer};
    if !privileged("flow_sync") {
        return;
    }
    pin_to_cpu(0);
    let ingress = topology();
    let secret = b"the balancers' shared secret, 32";
    let load = |seed: Option<u64>| {
        let mut dp = Dataplane::load(&LoadOptions { flow_table_size: 4096, pin_dir: None, flow_seed: seed }).expect("load balancer");
        configure(&mut dp);
        dp
    };
    let (one, two, alone) = (load(Some(flow_seed(secret))), load(Some(flow_seed(secret))), load(None));
    let peer = |i: u8| std::net::SocketAddr::from(([192, 0, 2, i], 7946));
    let backends = || Backends::new(REALS.iter().enumerate().map(|(i, r)| (i as u32, Ipv4Addr::from(r.addr))));
    let (b1, b2) = (backends(), backends());
    let mut s1 = Syncer::new(one.flow_table().unwrap(), secret, &[peer(2)], 1);
    let mut s2 = Syncer::new(two.flow_table().unwrap(), secret, &[peer(1)], 2);
    let went = |dp: &Dataplane, frame: &[u8]| {
        let got = testrun::run(dp.program(), frame, Some(ingress)).unwrap();
        assert_eq!(got.action, XDP_TX);
        let l2 = l2_len(&got.frame);
        REALS.iter().position(|r| got.frame[l2 + 16..l2 + 20] == r.addr).unwrap()
    };
    let sports: Vec<u16> = (44000..44040).collect();
    let placed: Vec<usize> = sports.iter().map(|&s| went(&one, &syn(s).build())).collect();
    // One interval each way: the first contact, then what one pinned.
    fn interval(from: &mut Syncer, fb: &Backends, from_addr: std::net::SocketAddr, to: &mut Syncer, tb: &Backends) {
        let changed = from.scan(|i| fb.addr(i));
        for (_, d) in from.datagrams(&changed, |i| fb.addr(i)) {
            to.receive(from_addr, &d, |a| tb.index(a)).expect("accepted");
        }
    }
    interval(&mut s1, &b1, peer(1), &mut s2, &b2);
    interval(&mut s2, &b2, peer(2), &mut s1, &b1);
    interval(&mut s1, &b1, peer(1), &mut s2, &b2);
    assert!(s2.stats.inserted >= sports.len() as u64, "{:?}", s2.stats);
    let before = two.global_stats().unwrap();
    for (k, &s) in sports.iter().enumerate() {
        let ack = Pkt::tcp(CLIENT, s, VIP, 80, TCP_ACK).build();
        assert_eq!(went(&two, &ack), placed[k], "flow {s} on the second balancer");
        assert_eq!(two.flow(&flow_key(s)).map(|v| v.backend), Some(placed[k] as u32));
    }
    let g = two.global_stats().unwrap();
    assert_eq!(g.get(Counter::FlowHit) - before.get(Counter::FlowHit), sports.len() as u64);
    assert_eq!(g.get(Counter::HashFallback), before.get(Counter::HashFallback));
    // A balancer without the sync sends some of them elsewhere.
    let moved = sports.iter().enumerate().filter(|&(k, &s)| went(&alone, &Pkt::tcp(CLIENT, s, VIP, 80, TCP_ACK).build()) != placed[k]).count();
    assert!(moved > 0, "without the sync every flow would have landed right: the test shows nothing");
    eprintln!("flow sync: {} flows kept on the second balancer; without the sync {moved} of them would move", sports.len());
}
