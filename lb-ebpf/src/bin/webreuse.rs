//! web-app's listener balancing: an `sk_reuseport` program on the `SO_REUSEPORT` group of a
//! listening address (one socket per HTTP thread) that hands each new connection to the
//! next thread's socket in turn, as nginx's idle workers and HAProxy's round robin do.
//! Without it the kernel picks by a hash of the 4-tuple: with 32 connections over 2
//! threads, splits like 20/12 are common, and the busier thread's connections wait
//! longer (web-bench's keep-alive p90 and p99 rows).
//!
//! Maps (filled by web-app, `web-app/src/balance.rs`):
//! - `WEB_LISTENERS`: the group's sockets, at index 0..n;
//! - `WEB_RR`: `[0]` n, `[1]` the next turn (advanced here).
#![no_std]
#![no_main]
// The BPF target has no `AtomicU32` read-modify-write methods; the intrinsic compiles to a
// BPF atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{atomic_xadd, AtomicOrdering::SeqCst};

use aya_ebpf::{
    bindings::sk_action,
    macros::{map, sk_reuseport},
    maps::{Array, ReusePortSockArray},
    programs::SkReuseportContext,
};
#[allow(unused_imports)]
use lb_ebpf as _;

#[map]
static WEB_LISTENERS: ReusePortSockArray = ReusePortSockArray::with_max_entries(256, 0);

#[map]
static WEB_RR: Array<u32> = Array::with_max_entries(2, 0);

#[sk_reuseport]
pub fn web_pick(ctx: SkReuseportContext) -> u32 {
    let (Some(&n), Some(next)) = (WEB_RR.get(0), WEB_RR.get_ptr_mut(1)) else { return sk_action::SK_PASS };
    if n == 0 {
        return sk_action::SK_PASS;
    }
    // SAFETY: a map value, changed by this atomic add only.
    let turn = unsafe { atomic_xadd::<u32, u32, { SeqCst }>(next, 1) };
    // An empty slot (a thread's socket closed): the kernel falls back to its hash.
    let _ = WEB_LISTENERS.select_reuseport(&ctx, turn % n);
    sk_action::SK_PASS
}
