//! 100,000 random and mutated frames through the balancer: never XDP_ABORTED, and every frame
//! that is not addressed to a VIP comes out byte-identical with XDP_PASS. Frames for a VIP
//! keep their IPv4 packet intact inside whatever the program built (ICMP to a VIP's address
//! too: echo requests come back as their replies, "fragmentation needed" about a VIP's
//! packet goes to a backend like the flow's packets). The same frames through a balancer
//! with firewall rules and two VIPs with allow lists: dropped exactly when the longest rule
//! holding a sound IPv4 header's source denies, or when a restricted VIP's list does not
//! hold it, otherwise what the balancer without rules makes of them. Seeded; set
//! LB_FUZZ_SEED to vary, LB_FUZZ_FRAMES to change the count.

use lb_common::{
    builder::{arp_request, echo_reply, frag_needed, icmp_too_big, ipv6_tcp_syn, Pkt},
    firewall::Rule,
    csum,
    packet::{parse_frame, parse_icmp, parse_l3, IcmpToVip, Parsed, PROTO_ICMP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    vip::VipKey,
};
use lb_userspace::{
    testrun::{self, action_name, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    Dataplane, LoadOptions,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tests::{hex, lab::*, pin_to_cpu, privileged};

fn vip_keys() -> Vec<(VipKey, bool)> {
    use lb_common::vip::{PROTO_TCP, PROTO_UDP};
    vec![
        (VipKey::new(VIP, 80, PROTO_TCP), false),
        (VipKey::new(VIP, 53, PROTO_UDP), false),
        (VipKey::new(VIP_ROUTED, 80, PROTO_TCP), false),
        (VipKey::new(VIP_REDIRECT, 80, PROTO_TCP), false),
        (VipKey::new(VIP_NO_NEIGH, 80, PROTO_TCP), false),
        (VipKey::new(VIP_L2, 80, PROTO_TCP), true),
    ]
}

/// Whether the balancer takes `frame` as a VIP's: the packet as the balancer places it (for
/// ICMP about a VIP's flow, the client's side of that flow), whether the VIP is in `l2`
/// mode, and the ICMP message if it is one. Parsed with the kernel's own parser.
fn for_a_vip(frame: &[u8], vips: &[(VipKey, bool)]) -> Option<(Parsed, bool, Option<IcmpToVip>)> {
    let vip_of = |k: lb_common::flow::FlowKey| {
        let key = VipKey { addr: k.dst, port: k.dport, proto: k.proto, _pad: 0 };
        vips.iter().find(|(k, _)| *k == key).map(|&(_, l2)| l2)
    };
    if let Ok(p) = parse_frame(frame) {
        return vip_of(p.key()).map(|l2| (p, l2, None));
    }
    let (l3_off, ip) = parse_l3(frame).ok()?;
    if ip.proto() != PROTO_ICMP {
        return None;
    }
    let kind = parse_icmp(frame, l3_off, &ip).ok()?;
    let (tuple, l2) = match kind {
        // Answered if the address is a VIP's, whatever the port.
        IcmpToVip::Echo => {
            vips.iter().find(|(k, _)| k.addr == ip.dst())?;
            (lb_common::flow::Tuple { src: ip.words[3], dst: ip.words[4], ports: 0, proto: PROTO_ICMP }, false)
        }
        IcmpToVip::TooBig(t) => (t, vip_of(t.key())?),
    };
    let p = Parsed { l3_off, ip_len: ip.tot_len, tos: ip.tos(), df: false, tcp_flags: 0, tuple };
    Some((p, l2, Some(kind)))
}

/// `got` is the echo reply to `input`: as `echo_reply` builds it, except that checksums are
/// updated rather than recomputed, so a wrong one stays wrong (by the same amount).
fn check_echo_reply(input: &[u8], l3_off: usize, got: &[u8], ctx: &dyn Fn() -> String) {
    let mut want = echo_reply(input, l3_off);
    let ihl = usize::from(input[l3_off] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([input[l3_off + 2], input[l3_off + 3]]));
    let sums = |f: &[u8]| {
        let ip = &f[l3_off..l3_off + tot];
        (csum::bytes(&ip[..ihl]), csum::bytes(&ip[ihl..]))
    };
    let valid = sums(input) == (0, 0);
    if !valid {
        // Take the checksums as they came out; the rest must match.
        for at in [l3_off + 10, l3_off + 11, l3_off + ihl + 2, l3_off + ihl + 3] {
            want[at] = got[at];
        }
    }
    assert!(got == want, "echo reply ({} checksums): {}", if valid { "valid" } else { "invalid" }, ctx());
    if valid {
        assert_eq!(sums(got), (0, 0), "checksums of the reply verify: {}", ctx());
    }
}

fn base_frame(rng: &mut StdRng) -> Vec<u8> {
    let src = [rng.gen(), rng.gen(), rng.gen(), rng.gen()];
    let vips = [VIP, VIP_ROUTED, VIP_REDIRECT, VIP_NO_NEIGH, VIP_L2, LB_ADDR, [rng.gen(), rng.gen(), rng.gen(), rng.gen()]];
    let dst = vips[rng.gen_range(0..vips.len())];
    let dport = [80, 53, 81, 22, rng.gen()][rng.gen_range(0..5)];
    let flags = [TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK, TCP_RST, TCP_FIN | TCP_ACK, rng.gen()][rng.gen_range(0..6)];
    let payload: Vec<u8> = (0..rng.gen_range(0..1500)).map(|_| rng.gen()).collect();
    let mut message = false;
    let mut p = if rng.gen_bool(0.6) {
        // Aimed at a configured VIP.
        let vips = vip_keys();
        let (k, _) = vips[rng.gen_range(0..vips.len())];
        let port = u16::from_be_bytes(k.port);
        if k.proto == lb_common::vip::PROTO_UDP {
            Pkt::udp(src, rng.gen(), k.addr, port)
        } else {
            Pkt::tcp(src, rng.gen(), k.addr, port, flags)
        }
    } else {
        match rng.gen_range(0..12) {
            0..=5 => Pkt::tcp(src, rng.gen(), dst, dport, flags),
            6..=8 => Pkt::udp(src, rng.gen(), dst, dport),
            9 => Pkt::icmp_echo(src, dst),
            // A router's "fragmentation needed" about a reply from a VIP (or from another
            // port or address).
            _ => {
                let vips = vip_keys();
                let (k, _) = vips[rng.gen_range(0..vips.len())];
                let (from, port) = if rng.gen_bool(0.8) { (k.addr, u16::from_be_bytes(k.port)) } else { (dst, dport) };
                let reply = if k.proto == lb_common::vip::PROTO_UDP {
                    Pkt::udp(from, port, src, rng.gen())
                } else {
                    Pkt::tcp(from, port, src, rng.gen(), TCP_ACK)
                };
                let router = [rng.gen(), rng.gen(), rng.gen(), rng.gen()];
                message = true;
                frag_needed(router, from, &reply.payload(&[0; 1000]).ip_packet(), rng.gen())
            }
        }
    };
    if !message {
        p = p.payload(&payload);
    }
    if rng.gen_bool(0.2) {
        p = p.vlan(rng.gen_range(0..4096));
    }
    if rng.gen_bool(0.2) {
        let words = rng.gen_range(1..=10);
        p = p.ip_options(&vec![1u8; words * 4]);
    }
    if rng.gen_bool(0.1) {
        p = p.frag(rng.gen());
    }
    if rng.gen_bool(0.2) {
        p = p.tos(rng.gen());
    }
    p.build()
}

fn frame(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..100) {
        // Pure noise.
        0..=14 => (0..rng.gen_range(14..300)).map(|_| rng.gen()).collect(),
        // Noise behind an IPv4 (or VLAN + IPv4) Ethernet header.
        15..=29 => {
            let mut f: Vec<u8> = (0..rng.gen_range(14..200)).map(|_| rng.gen()).collect();
            f[12] = 0x08;
            f[13] = 0x00;
            if f.len() > 34 && rng.gen_bool(0.5) {
                f[14] = 0x40 | (rng.gen::<u8>() & 0x0f);
            }
            f
        }
        30..=33 => arp_request([1, 2, 3, 4], VIP),
        34..=36 => ipv6_tcp_syn(),
        // A valid frame, mutated: byte flips, truncation, padding.
        _ => {
            let mut f = base_frame(rng);
            if rng.gen_bool(0.4) {
                for _ in 0..rng.gen_range(1..=4) {
                    let at = rng.gen_range(0..f.len().min(80));
                    f[at] = rng.gen();
                }
            }
            if rng.gen_bool(0.3) {
                let len = rng.gen_range(14..=f.len());
                f.truncate(len);
            }
            if rng.gen_bool(0.1) {
                f.extend((0..rng.gen_range(1..40)).map(|_| rng.gen::<u8>()));
            }
            f
        }
    }
}

#[test]
fn random_and_mutated_frames() {
    if !privileged("random_and_mutated_frames") {
        return;
    }
    let seed: u64 = std::env::var("LB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1b);
    let count: usize = std::env::var("LB_FUZZ_FRAMES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let (ingress, dp) = loaded();
    let vips = vip_keys();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut by_action = [0u64; 5];
    let mut to_vip = 0u64;
    let mut icmp = 0u64;
    let mut echo = 0u64;
    let mut icmp_forwarded = 0u64;
    for n in 0..count {
        let input = frame(&mut rng);
        let got = testrun::run(dp.program(), &input, Some(ingress)).expect("test run");
        let ctx = || format!("frame {n} (seed {seed}): action {}\n  in:\n{}\n  out:\n{}", action_name(got.action), hex(&input), hex(&got.frame));
        assert_ne!(got.action, XDP_ABORTED, "{}", ctx());
        by_action[got.action.min(4) as usize] += 1;
        let vip = for_a_vip(&input, &vips);
        let Some((p, l2_mode, icmp_kind)) = vip else {
            assert!(got.action == XDP_PASS && got.frame == input, "not for a VIP, must pass untouched: {}", ctx());
            continue;
        };
        if icmp_kind == Some(IcmpToVip::Echo) {
            assert_eq!(got.action, XDP_TX, "echo request to a VIP's address answered: {}", ctx());
            check_echo_reply(&input, p.l3_off, &got.frame, &ctx);
            echo += 1;
            to_vip += 1;
            continue;
        }
        to_vip += 1;
        let ip = p.l3_off..p.l3_off + usize::from(p.ip_len);
        match got.action {
            XDP_TX | XDP_REDIRECT if l2_mode => {
                assert_eq!(got.frame[12..], input[12..], "l2 mode changes only MACs: {}", ctx());
            }
            XDP_TX | XDP_REDIRECT | XDP_PASS if got.frame.len() == input.len() + 20 => {
                let inner = p.l3_off + 20..p.l3_off + 20 + ip.len();
                assert_eq!(got.frame[inner], input[ip.clone()], "inner packet intact: {}", ctx());
                assert_eq!(got.frame[12..p.l3_off], input[12..p.l3_off], "ethertype/VLAN kept: {}", ctx());
                if icmp_kind.is_some() {
                    icmp_forwarded += 1;
                }
            }
            XDP_TX if got.frame.len() < input.len() && got.frame.get(p.l3_off + 9) == Some(&1) => {
                // ICMP "fragmentation needed" back to the sender: the packet (with DF) would
                // not fit once encapsulated.
                let mtu = u16::from_be_bytes([got.frame[p.l3_off + 26], got.frame[p.l3_off + 27]]);
                assert_eq!(got.frame, icmp_too_big(&input, p.l3_off, mtu), "ICMP reply: {}", ctx());
                assert!(p.df && ip.len() > usize::from(mtu), "only a too big packet with DF is answered: {}", ctx());
                assert!(lb_common::icmp::answerable(p.tuple.src), "not to a source that names no host: {}", ctx());
                icmp += 1;
            }
            XDP_PASS | XDP_DROP => assert_eq!(got.frame, input, "passed or dropped untouched: {}", ctx()),
            _ => panic!("unexpected outcome: {}", ctx()),
        }
    }
    eprintln!(
        "{count} frames (seed {seed}): {to_vip} for a VIP; drop {} pass {} tx {} (of which ICMP too big {icmp}, echo replies {echo}) redirect {}; ICMP to a flow's backend {icmp_forwarded}",
        by_action[1], by_action[2], by_action[3], by_action[4]
    );
    assert!(to_vip > count as u64 / 10, "the generator must reach the VIP path often");
}

#[test]
fn random_frames_through_the_firewall() {
    if !privileged("random_frames_through_the_firewall") {
        return;
    }
    let seed: u64 = std::env::var("LB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1b);
    let count: usize = std::env::var("LB_FUZZ_FRAMES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    // Both balancers count round robin per CPU: one CPU, so that they take the same turns.
    pin_to_cpu(0);
    let (ingress, plain) = loaded();
    let mut fw = Dataplane::load(&LoadOptions::default()).expect("load balancer");
    configure(&mut fw);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xf1);
    let mut rules: std::collections::BTreeMap<lb_common::firewall::Prefix, bool> = [
        ("0.0.0.0/1", false),
        ("64.0.0.0/2", true),
        ("100.64.0.0/10", false),
        ("192.0.0.0/3", false),
        ("192.0.2.0/24", true),
    ]
    .into_iter()
    .map(|(p, allow)| (p.parse().unwrap(), allow))
    .collect();
    while rules.len() < 400 {
        let len = rng.gen_range(4..=32u8);
        let addr = (rng.gen::<u32>() & lb_common::firewall::Prefix::mask(len)).to_be_bytes();
        rules.insert(lb_common::firewall::Prefix::new(addr, len).unwrap(), rng.gen_bool(0.3));
    }
    let list: Vec<Rule> = rules.iter().map(|(&prefix, &allow)| Rule { prefix, allow }).collect();
    fw.set_firewall(&list).unwrap();
    // And two VIPs with allow lists (the others open): their packets from other sources are
    // dropped once past the firewall.
    use lb_common::{firewall::Prefix, vip::{PROTO_TCP, PROTO_UDP}};
    let mut allow_lists: Vec<(VipKey, Vec<Prefix>)> = Vec::new();
    for key in [VipKey::new(VIP_ROUTED, 80, PROTO_TCP), VipKey::new(VIP, 53, PROTO_UDP)] {
        let mut list: Vec<Prefix> = (0..20)
            .map(|_| {
                let len = rng.gen_range(1..=24u8);
                Prefix::new((rng.gen::<u32>() & Prefix::mask(len)).to_be_bytes(), len).unwrap()
            })
            .collect();
        list.sort();
        list.dedup();
        fw.set_allow(&key, &list).unwrap();
        allow_lists.push((key, list));
    }
    let vips = vip_keys();
    let not_allowed = |frame: &[u8]| -> bool {
        let Some((p, _, None)) = for_a_vip(frame, &vips) else { return false };
        let key = p.key();
        let key = VipKey { addr: key.dst, port: key.dport, proto: key.proto, _pad: 0 };
        allow_lists.iter().any(|(k, list)| *k == key && !list.iter().any(|q| q.contains(p.tuple.src.to_ne_bytes())))
    };
    // The rule that decides a source: the longest prefix that holds it.
    let decide = |src: [u8; 4]| rules.iter().filter(|(p, _)| p.contains(src)).max_by_key(|(p, _)| p.len).map(|(&p, &a)| (p, a));

    let mut want: std::collections::BTreeMap<lb_common::firewall::Prefix, (u64, u64)> = Default::default();
    let mut frames = StdRng::seed_from_u64(seed);
    let (mut dropped, mut allowed, mut unmatched, mut kept_out) = (0u64, 0u64, 0u64, 0u64);
    for n in 0..count {
        let input = frame(&mut frames);
        let got = testrun::run(fw.program(), &input, Some(ingress)).expect("test run");
        let ctx = || format!("frame {n} (seed {seed}): action {}\n  in:\n{}", action_name(got.action), hex(&input));
        assert_ne!(got.action, XDP_ABORTED, "{}", ctx());
        let sound = lb_common::packet::parse_l2(input.as_slice())
            .ok()
            .and_then(|l3| lb_common::packet::parse_ipv4(input.as_slice(), l3).map(|ip| (l3, ip)));
        let verdict = sound.as_ref().and_then(|(l3, ip)| decide(ip.src()).map(|(p, allow)| (p, allow, (l3 + usize::from(ip.tot_len)) as u64)));
        if let Some((p, allow, bytes)) = verdict {
            let e = want.entry(p).or_default();
            e.0 += 1;
            e.1 += bytes;
            if !allow {
                assert_eq!(got.action, XDP_DROP, "denied by {p}: {}", ctx());
                assert_eq!(got.frame, input, "dropped untouched: {}", ctx());
                dropped += 1;
                continue;
            }
            allowed += 1;
        } else {
            unmatched += 1;
        }
        if not_allowed(&input) {
            assert_eq!(got.action, XDP_DROP, "to a VIP whose allow list does not hold the source: {}", ctx());
            assert_eq!(got.frame, input, "dropped untouched: {}", ctx());
            kept_out += 1;
            continue;
        }
        // Not denied: exactly what the balancer without rules does with it.
        let base = testrun::run(plain.program(), &input, Some(ingress)).expect("test run");
        assert_eq!((action_name(got.action), hex(&got.frame)), (action_name(base.action), hex(&base.frame)), "as without rules: {}", ctx());
    }
    let counted: std::collections::BTreeMap<_, _> =
        fw.firewall_stats().unwrap().into_iter().filter(|(_, s)| s.packets > 0).map(|(r, s)| (r.prefix, (s.packets, s.bytes))).collect();
    assert_eq!(counted, want, "per-rule packets and bytes");
    let g = fw.global_stats().unwrap();
    assert_eq!(g.get(lb_common::stats::Counter::Firewall), dropped);
    assert_eq!(g.get(lb_common::stats::Counter::VipNotAllowed), kept_out);
    eprintln!(
        "{count} frames (seed {seed}), {} rules: {dropped} dropped, {allowed} allowed by a rule, {unmatched} matched no rule or were no IPv4; {} rules matched; {kept_out} kept out by a VIP's allow list",
        list.len(),
        want.len()
    );
    assert!(kept_out > count as u64 / 400, "the allow lists must decide many frames");
    assert!(dropped > count as u64 / 10 && allowed > count as u64 / 20, "the rules must decide many frames both ways");
}
