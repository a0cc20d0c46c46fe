//! Virtual IPs: the key the XDP program matches on and what it finds there.

use crate::user_pod;

/// Most VIPs the data plane holds (the issue asks for at least 512).
pub const MAX_VIPS: u32 = 1024;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `(address, port, protocol)` of a VIP, all in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 8);

impl VipKey {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self { addr, port: port.to_be_bytes(), proto, _pad: 0 }
    }
}

/// How packets of a VIP reach its backends (direct server return in both cases).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMode {
    /// IPIP encapsulation to the backend; next hop from the kernel FIB.
    Ipip = 0,
    /// Backend on the balancer's own segment: only the Ethernet addresses change.
    L2 = 1,
}

/// Value of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index of this VIP's ring (`RINGS[vip_num * RING_SIZE ..]`) and counters.
    pub vip_num: u32,
    /// Number of used slots in the ring; 0 means no backend (packets are dropped).
    pub ring_len: u32,
    /// A [`ForwardMode`] as u32.
    pub mode: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VipMeta>() == 16);

impl VipMeta {
    #[inline(always)]
    pub fn is_l2(&self) -> bool {
        self.mode == ForwardMode::L2 as u32
    }
}

user_pod!(VipKey, VipMeta);
