//! The fixture lab: a private network namespace whose routes and static neighbours give the
//! balancer's FIB lookups known answers, and a dataplane configured against it.

use std::net::Ipv4Addr;

use lb_common::{
    builder::LB_MAC,
    ring,
    vip::{ForwardMode, VipKey, PROTO_TCP, PROTO_UDP},
};
use lb_userspace::{Dataplane, LoadOptions};

use crate::{ifindex, private_netns, sh};

/// Shortest frame BPF_PROG_TEST_RUN accepts (an Ethernet header).
pub const MIN_FRAME: usize = 14;
pub const LB_ADDR: [u8; 4] = [10, 0, 0, 1];
pub const LB2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x2b];
pub const CLIENT: [u8; 4] = [192, 168, 7, 10];

/// A backend: address, the MAC its next hop has, and the VIP it serves alone (if any).
pub struct Real {
    pub addr: [u8; 4],
    pub next_hop_mac: [u8; 6],
}

pub const A: Real = Real { addr: [10, 0, 0, 2], next_hop_mac: [2, 0, 0, 0, 0, 0x0a] };
pub const B: Real = Real { addr: [10, 0, 0, 3], next_hop_mac: [2, 0, 0, 0, 0, 0x0b] };
/// Behind the router 10.0.0.254.
pub const C: Real = Real { addr: [10, 2, 0, 7], next_hop_mac: [2, 0, 0, 0, 0, 0xfe] };
/// On the second interface: XDP_REDIRECT.
pub const D: Real = Real { addr: [10, 1, 0, 2], next_hop_mac: [2, 0, 0, 0, 0, 0x0d] };
/// No neighbour entry.
pub const E: Real = Real { addr: [10, 0, 0, 9], next_hop_mac: [0; 6] };
/// `l2` mode backend.
pub const F: Real = Real { addr: [10, 0, 0, 5], next_hop_mac: [2, 0, 0, 0, 0, 0x0f] };
pub const REALS: [&Real; 6] = [&A, &B, &C, &D, &E, &F];

pub const VIP: [u8; 4] = [10, 100, 0, 1];
pub const VIP_ROUTED: [u8; 4] = [10, 100, 0, 2];
pub const VIP_REDIRECT: [u8; 4] = [10, 100, 0, 3];
pub const VIP_NO_NEIGH: [u8; 4] = [10, 100, 0, 4];
pub const VIP_L2: [u8; 4] = [10, 100, 0, 5];

/// Interfaces: lbt0 (ingress, 10.0.0.1/24, MAC LB_MAC) with A, B, E, F and the router on it;
/// lbt2 (10.1.0.1/24) with D.
pub fn topology() -> u32 {
    private_netns();
    let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let ip = |a: [u8; 4]| Ipv4Addr::from(a).to_string();
    sh(&format!(
        "ip link add lbt0 address {} type veth peer name lbt1 && \
         ip link add lbt2 address {} type veth peer name lbt3 && \
         ip addr add 10.0.0.1/24 dev lbt0 && ip addr add 10.1.0.1/24 dev lbt2 && \
         for i in lbt0 lbt1 lbt2 lbt3; do ip link set $i up; done && \
         ip route add 10.2.0.0/24 via 10.0.0.254 && \
         ip neigh add 10.0.0.254 lladdr {} dev lbt0 nud permanent && \
         echo 1 > /proc/sys/net/ipv4/conf/all/forwarding",
        mac(LB_MAC),
        mac(LB2_MAC),
        mac(C.next_hop_mac)
    ));
    for (r, dev) in [(&A, "lbt0"), (&B, "lbt0"), (&D, "lbt2"), (&F, "lbt0")] {
        sh(&format!("ip neigh add {} lladdr {} dev {dev} nud permanent", ip(r.addr), mac(r.next_hop_mac)));
    }
    ifindex("lbt0")
}

pub fn configure(dp: &mut Dataplane) {
    dp.set_encap_source(Ipv4Addr::from(LB_ADDR)).unwrap();
    dp.add_tx_port(ifindex("lbt2")).unwrap();
    for (i, r) in REALS.iter().enumerate() {
        dp.set_backend(i as u32, Ipv4Addr::from(r.addr), r.next_hop_mac).unwrap();
    }
    let ab = ring::build(&[(0, 1), (1, 1)]).unwrap();
    dp.set_vip(VipKey::new(VIP, 80, PROTO_TCP), 0, ForwardMode::Ipip, &ab).unwrap();
    dp.set_vip(VipKey::new(VIP, 53, PROTO_UDP), 1, ForwardMode::Ipip, &ab).unwrap();
    dp.set_vip(VipKey::new(VIP_ROUTED, 80, PROTO_TCP), 2, ForwardMode::Ipip, &[2]).unwrap();
    dp.set_vip(VipKey::new(VIP_REDIRECT, 80, PROTO_TCP), 3, ForwardMode::Ipip, &[3]).unwrap();
    dp.set_vip(VipKey::new(VIP_NO_NEIGH, 80, PROTO_TCP), 4, ForwardMode::Ipip, &[4]).unwrap();
    dp.set_vip(VipKey::new(VIP_L2, 80, PROTO_TCP), 5, ForwardMode::L2, &[5]).unwrap();
}


/// The lab's namespace (entered by the calling thread) and a balancer configured against
/// it: the ingress ifindex and the dataplane.
pub fn loaded() -> (u32, Dataplane) {
    let ingress = topology();
    let mut dp = Dataplane::load(&LoadOptions::default()).expect("load balancer");
    configure(&mut dp);
    (ingress, dp)
}
