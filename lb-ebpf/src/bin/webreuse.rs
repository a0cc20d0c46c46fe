//! web-app's listener balancing: an `sk_reuseport` program on the `SO_REUSEPORT` group of a
//! listening address (one socket per HTTP thread) that hands each new connection to the
//! thread with the fewest open connections (HAProxy's `leastconn`); among equals, the first
//! from a turn that advances per connection (with two threads and equal counts: in turn).
//! Without it the kernel picks by a hash of the 4-tuple: with 32 connections over 2
//! threads, splits like 20/12 are common, and the busier thread's connections wait
//! longer (web-bench's keep-alive p90 and p99 rows). Turns alone balance long connections
//! but not short ones: a new connection then waits behind a busy thread's work while the
//! other thread idles (a connection per request had a 25 % higher median latency than with
//! nginx's one shared accept queue, and nginx with `reuseport` showed the same).
//!
//! Maps (filled by web-app, `web-app/src/balance.rs`):
//! - `WEB_LISTENERS`: the group's sockets, at index 0..n;
//! - `WEB_RR`: `[0]` n, `[1]` the next turn (advanced here);
//! - `WEB_LOAD`: socket i's line of `LOAD_STRIDE` words (one cache line each; the map is
//!   mmapped by web-app, which keeps them, read here): `[i * LOAD_STRIDE]` its open
//!   connections, `[i * LOAD_STRIDE + 1]` 1 while its thread sleeps for want of work.
//!
//! A thread that is not asleep counts one connection more: among threads with as many open
//! connections, a new one goes to a thread that waits for work rather than behind a busy
//! (or preempted) one's (what nginx's single accept queue gives: its idle workers take new
//! connections first). Connections answered at once in the accept loop are never open for
//! long, so with a connection per request the counts alone left only the turns.
#![no_std]
#![no_main]
// The BPF target has no `AtomicU32` read-modify-write methods; the intrinsic compiles to a
// BPF atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{atomic_xadd, AtomicOrdering::SeqCst};

use aya_ebpf::{
    bindings::{sk_action, BPF_F_MMAPABLE},
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

/// Entries of `WEB_LOAD` per socket: a 64-byte cache line, so that threads counting their
/// connections do not share one. (u64 entries: an array map's entries are 8-byte aligned,
/// which is how they lie in the mapped memory.)
const LOAD_STRIDE: u32 = 8;
/// Sockets looked at per connection (HTTP threads beyond this share the turns by load only
/// among the next `MAX_SCAN`).
const MAX_SCAN: u32 = 16;

#[map]
static WEB_LOAD: Array<u64> = Array::with_max_entries(256 * LOAD_STRIDE, BPF_F_MMAPABLE);

/// Socket `index`'s open connections, and one more unless its thread is asleep.
fn load(index: u32) -> u64 {
    let (Some(&open), Some(&asleep)) = (WEB_LOAD.get(index * LOAD_STRIDE), WEB_LOAD.get(index * LOAD_STRIDE + 1)) else { return u64::MAX };
    open.saturating_add(u64::from(asleep == 0))
}

#[sk_reuseport]
pub fn web_pick(ctx: SkReuseportContext) -> u32 {
    let (Some(&n), Some(next)) = (WEB_RR.get(0), WEB_RR.get_ptr_mut(1)) else { return sk_action::SK_PASS };
    if n == 0 {
        return sk_action::SK_PASS;
    }
    // SAFETY: a map value, changed by this atomic add only.
    let turn = unsafe { atomic_xadd::<u32, u32, { SeqCst }>(next, 1) };
    let start = turn % n;
    let (mut best, mut best_load) = (start, load(start));
    let mut i = 1;
    while i < n && i < MAX_SCAN {
        let index = if start + i >= n { start + i - n } else { start + i };
        let l = load(index);
        if l < best_load {
            (best, best_load) = (index, l);
        }
        i += 1;
    }
    // An empty slot (a thread's socket closed): the kernel falls back to its hash.
    let _ = WEB_LISTENERS.select_reuseport(&ctx, best);
    sk_action::SK_PASS
}
