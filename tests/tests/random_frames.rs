//! 100,000 random and mutated frames through the balancer: never XDP_ABORTED, and every frame
//! that is not addressed to a VIP comes out byte-identical with XDP_PASS. Frames for a VIP
//! keep their IPv4 packet intact inside whatever the program built. Seeded; set
//! LB_FUZZ_SEED to vary, LB_FUZZ_FRAMES to change the count.

use lb_common::{
    builder::{arp_request, icmp_too_big, ipv6_tcp_syn, Pkt},
    packet::{parse_frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    vip::VipKey,
};
use lb_userspace::{
    testrun::{self, action_name, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tests::{hex, lab::*, privileged};

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

fn base_frame(rng: &mut StdRng) -> Vec<u8> {
    let src = [rng.gen(), rng.gen(), rng.gen(), rng.gen()];
    let vips = [VIP, VIP_ROUTED, VIP_REDIRECT, VIP_NO_NEIGH, VIP_L2, LB_ADDR, [rng.gen(), rng.gen(), rng.gen(), rng.gen()]];
    let dst = vips[rng.gen_range(0..vips.len())];
    let dport = [80, 53, 81, 22, rng.gen()][rng.gen_range(0..5)];
    let flags = [TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK, TCP_RST, TCP_FIN | TCP_ACK, rng.gen()][rng.gen_range(0..6)];
    let payload: Vec<u8> = (0..rng.gen_range(0..1500)).map(|_| rng.gen()).collect();
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
        match rng.gen_range(0..10) {
            0..=5 => Pkt::tcp(src, rng.gen(), dst, dport, flags),
            6..=8 => Pkt::udp(src, rng.gen(), dst, dport),
            _ => Pkt::icmp_echo(src, dst),
        }
    }
    .payload(&payload);
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
    for n in 0..count {
        let input = frame(&mut rng);
        let got = testrun::run(dp.program(), &input, Some(ingress)).expect("test run");
        let ctx = || format!("frame {n} (seed {seed}): action {}\n  in:\n{}\n  out:\n{}", action_name(got.action), hex(&input), hex(&got.frame));
        assert_ne!(got.action, XDP_ABORTED, "{}", ctx());
        by_action[got.action.min(4) as usize] += 1;
        let vip = parse_frame(&input[..]).ok().and_then(|p| {
            let k = p.key();
            let key = VipKey { addr: k.dst, port: k.dport, proto: k.proto, _pad: 0 };
            vips.iter().find(|(k, _)| *k == key).map(|&(_, l2)| (p, l2))
        });
        let Some((p, l2_mode)) = vip else {
            assert!(got.action == XDP_PASS && got.frame == input, "not for a VIP, must pass untouched: {}", ctx());
            continue;
        };
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
        "{count} frames (seed {seed}): {to_vip} for a VIP; drop {} pass {} tx {} (of which ICMP too big {icmp}) redirect {}",
        by_action[1], by_action[2], by_action[3], by_action[4]
    );
    assert!(to_vip > count as u64 / 10, "the generator must reach the VIP path often");
}
