//! The trivial program: XDP_PASS. Benchmark floor, and the program a veth peer needs so
//! that frames sent to it with XDP_TX or XDP_REDIRECT are received.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
#[allow(unused_imports)]
use lb_ebpf as _;

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
