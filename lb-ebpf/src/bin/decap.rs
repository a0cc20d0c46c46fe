//! Decapsulation for backend hosts (Katran's `decap`): strips the outer IPv4 header of IPIP
//! packets addressed to this host and passes the inner packet to the stack, where the VIP
//! is bound on loopback. Everything else passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    packet::parse_ipip,
    stats::{Counter, GlobalStats},
};
use lb_ebpf::{adjust_head, write_eth, XdpFrame};

/// The host's own addresses: outer destinations to decapsulate (value unused).
#[map]
static DECAP_ADDRS: HashMap<[u8; 4], u32> = HashMap::with_max_entries(64, 0);

#[map]
static STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let Some(stats) = STATS.get_ptr_mut(0) else { return xdp_action::XDP_PASS };
    // SAFETY: per-CPU value, only this program on this CPU touches it.
    let stats = unsafe { &mut *stats };
    let c = decap(&ctx);
    stats.counters[c as usize] += 1;
    xdp_action::XDP_PASS
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Counter {
    let frame = XdpFrame::new(ctx);
    let d = match parse_ipip(&frame) {
        Ok(d) => d,
        Err(c) => return c,
    };
    // SAFETY: read-only lookup, value unused.
    if unsafe { DECAP_ADDRS.get(&d.outer_dst) }.is_none() {
        return Counter::DecapNotLocal;
    }
    let (Some(macs), Some(tail)) = (frame.macs(), frame.eth_tail()) else {
        return Counter::DecapMalformed;
    };
    // outer_len is 20..=60 (checked by the parser); mask to let the verifier see it.
    let outer_len = (d.outer_len & 0x3c) as i32;
    if !adjust_head(ctx, outer_len) {
        return Counter::DecapMalformed;
    }
    if write_eth(&XdpFrame::new(ctx), d.l3_off, &macs, &tail) { Counter::Decap } else { Counter::DecapMalformed }
}
