//! db-router's in-kernel fast path for prepared reads: a client on this host executes a
//! prepared read and the command goes from the client's socket straight into the replica's
//! socket, and the replica's answer straight back into the client's, without either passing
//! through the router or through TCP (sockmap, `sk_msg` redirects to ingress).
//!
//! Two programs share the maps:
//! - `dbf_sockops` (`sock_ops`, attached to the cgroup v2 root) puts into `DBF_SOCKS` the
//!   client end of connections to a router listening address (`DBF_LISTEN`), and the server end
//!   of connections from a port the router bound for a backend connection (`DBF_PORTS`), and
//!   notes each in `DBF_LIVE` so that the router knows which of its peers it can reach. The
//!   router adds its own end of each such client connection.
//! - `dbf_msg` (`sk_msg`, attached to `DBF_SOCKS`) runs on every send of those sockets:
//!   - on a client's socket (a `DBF_ROLE` index below `SLOTS`): a single, whole
//!     `COM_STMT_EXECUTE` of a statement the router registered in `DBF_STMT` (a read,
//!     prepared on the session's replica connection, parameter types already there), without
//!     a cursor and without new parameter types (or with the ones the replica has), while the router has the session's fast
//!     path on, gets the replica's statement id and goes into the replica's socket. Anything
//!     else goes to the router as usual, and turns the session's fast path off: the router
//!     turns it back on once it has read everything that went to it and the session allows it.
//!   - on a replica's socket (index `SLOTS + slot`): while the router has the connection's
//!     `REDIRECT` flag on, an answer the server sends in one message goes into the client's
//!     socket (counted); a larger one goes to the router, and so does everything after it.
//!   - on the router's socket to the client (index `2 * SLOTS + slot`): what the router
//!     sends goes into the client's socket too, so that everything the client gets arrives
//!     in one queue, in order.
//!
//! The session word (`Entry::word` of a client entry) holds, so that the router and the
//! program agree without locks: bit 0, fast path on (set only by the router, by
//! compare-and-swap, with the count zeroed); bits 1-31, commands the program routed since;
//! bits 32-63, bytes that went to the router (mod 2^32). The program counts a command by
//! compare-and-swap while bit 0 is set, so the count the router sees when it clears bit 0 is
//! final; before it uses the replica connection or answers the client itself, it waits until
//! that many answers were redirected, or relays those the program handed over to it.
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64` read-modify-write methods; the intrinsics compile to BPF
// atomics (ISA v3: fetch-add, fetch-and, compare-and-swap).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{atomic_and, atomic_cxchg, atomic_xadd, AtomicOrdering::SeqCst};

use aya_ebpf::{
    bindings::{
        sk_action, sk_msg_md, BPF_F_INGRESS, BPF_F_MMAPABLE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    cty::c_void,
    helpers::{bpf_loop, bpf_msg_pull_data},
    macros::{map, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
#[allow(unused_imports)]
use lb_ebpf as _;

/// A socket as its owner sees it: addresses as stored (network order), ports in host order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Key {
    pub local_ip: u32,
    pub remote_ip: u32,
    pub local_port: u32,
    pub remote_port: u32,
}

/// One per client session (index = slot) and one per session's replica connection (index =
/// `SLOTS + slot`); the router's own socket to the client has role `2 * SLOTS + slot` and
/// uses the replica entry's `peer`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Entry {
    /// Client entries: the session word (module docs).
    pub word: u64,
    /// Client entries: the replica's socket; replica entries: the client's socket.
    pub peer: Key,
    /// Replica entries: `REDIRECT`, `DEPRECATE_EOF`.
    pub flags: u32,
    /// Replica entries: answers redirected since the router last reset the entry.
    pub done: u32,
    /// Replica entries: the router still has bytes to send to the client (they must come
    /// first): hand answers over.
    pub hold: u32,
    pub _pad: u32,
}

/// Statement of a session, as the client numbers it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StmtKey {
    pub slot: u32,
    pub id: u32,
}

/// Its id on the session's replica connection, its parameter count, and the parameter types
/// the replica has (for up to `MAX_TYPED` parameters): an execution that sends the same types
/// again (most connectors send them every time) may go through the kernel too.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stmt {
    pub id: u32,
    pub params: u32,
    pub types: [u8; 2 * MAX_TYPED],
}

pub const MAX_TYPED: usize = 16;

pub const SLOTS: u32 = 65536;
/// Replica entry flags: redirect what the server sends to the client.
const REDIRECT: u32 = 1;
const DEPRECATE_EOF: u32 = 2;
const MAX_FRAME: u32 = 0xFF_FFFF;
const COM_STMT_EXECUTE: u8 = 0x17;
const AF_INET: u32 = 2;
const TCP_ESTABLISHED: u32 = 1;

#[map]
static DBF_SOCKS: SockHash<Key> = SockHash::with_max_entries(131072, 0);

/// Router listening addresses: `[address, port]`, address 0 for a wildcard listener (then any
/// connection to that port from this host qualifies).
#[map]
static DBF_LISTEN: HashMap<[u32; 2], u32> = HashMap::with_max_entries(64, 0);

/// Local ports the router bound for backend connections it is opening.
#[map]
static DBF_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Sockets put into `DBF_SOCKS` (the router removes the entries of those it registered; LRU
/// for the others).
#[map]
static DBF_LIVE: LruHashMap<Key, u32> = LruHashMap::with_max_entries(131072, 0);

/// Socket -> entry index, written by the router.
#[map]
static DBF_ROLE: HashMap<Key, u32> = HashMap::with_max_entries(131072, 0);

#[map]
static DBF_STATE: Array<Entry> = Array::with_max_entries(2 * SLOTS, BPF_F_MMAPABLE);

#[map]
static DBF_STMT: HashMap<StmtKey, Stmt> = HashMap::with_max_entries(262144, 0);

/// Host-order port from a context's `remote_port` (network order, in the upper half of the
/// word on current kernels, the lower half on old ones).
#[inline(always)]
fn port(raw: u32) -> u32 {
    let p = u32::from_be(raw);
    if p > 0xFFFF {
        p >> 16
    } else {
        p
    }
}

#[sock_ops]
pub fn dbf_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.family() != AF_INET {
        return 1;
    }
    let op = ctx.op();
    let mut key = Key { local_ip: ctx.local_ip4(), remote_ip: ctx.remote_ip4(), local_port: ctx.local_port(), remote_port: port(ctx.remote_port()) };
    // SAFETY: plain lookups.
    let wanted = unsafe {
        match op {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => DBF_LISTEN.get(&[key.remote_ip, key.remote_port]).is_some() || DBF_LISTEN.get(&[0, key.remote_port]).is_some(),
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => DBF_PORTS.get(&key.remote_port).is_some(),
            BPF_SOCK_OPS_STATE_CB => {
                // A server's end leaves ESTABLISHED (it closes, or its process died): the
                // client's commands stop going there before the socket leaves the map.
                if ctx.arg(1) != TCP_ESTABLISHED {
                    let _ = DBF_LIVE.remove(&key);
                }
                false
            }
            _ => false,
        }
    };
    // SAFETY: the context's own socket operations structure.
    if wanted && DBF_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, 0).is_ok() {
        let _ = DBF_LIVE.insert(&key, &1, 0);
        if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    }
    1
}

#[sk_msg]
pub fn dbf_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the program's own context.
    let md = unsafe { &*ctx.msg };
    let key = Key { local_ip: md.local_ip4, remote_ip: md.remote_ip4, local_port: md.local_port, remote_port: port(md.remote_port) };
    // SAFETY: a plain lookup; the value is copied out.
    let Some(&index) = (unsafe { DBF_ROLE.get(&key) }) else { return sk_action::SK_PASS };
    let Some(e) = DBF_STATE.get_ptr_mut(index.min(2 * SLOTS - 1)) else { return sk_action::SK_PASS };
    if index < SLOTS {
        command(&ctx, index, e)
    } else if index < 2 * SLOTS {
        answer(&ctx, e)
    } else {
        match DBF_STATE.get_ptr_mut(index - SLOTS) {
            Some(e) => from_router(&ctx, e),
            None => sk_action::SK_PASS,
        }
    }
}

/// A client's send.
#[inline(always)]
fn command(ctx: &SkMsgContext, slot: u32, e: *mut Entry) -> u32 {
    let size = ctx.size();
    // SAFETY: a map value; the router and this program change the word with atomics only.
    let word = unsafe { core::ptr::addr_of_mut!((*e).word) };
    // SAFETY: as above.
    let w = unsafe { core::ptr::read_volatile(word) };
    // SAFETY: the entry's peer key, copied; a plain lookup.
    if w & 1 != 0 && unsafe { DBF_LIVE.get(&(*e).peer) }.is_some() {
        if let Some(id) = eligible(ctx, slot, size) {
            // Counted only while the router has not turned the fast path off.
            // SAFETY: as above.
            if unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(word, w, w + 2) }.1 {
                let data = ctx.data();
                if data + 9 <= ctx.data_end() {
                    // SAFETY: checked against data_end; the statement id of the command.
                    unsafe { core::ptr::write_unaligned((data + 5) as *mut u32, id.to_le()) };
                }
                // SAFETY: the entry's peer key, copied.
                let mut peer = unsafe { (*e).peer };
                return DBF_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) as u32;
            }
        }
    }
    // SAFETY: as above.
    let old = unsafe { atomic_xadd::<u64, u64, { SeqCst }>(word, (size as u64) << 32) };
    if old & 1 != 0 {
        // SAFETY: as above.
        unsafe { atomic_and::<u64, u64, { SeqCst }>(word, !1) };
    }
    sk_action::SK_PASS
}

/// The replica's statement id when the message is one whole `COM_STMT_EXECUTE` the kernel
/// may route: registered statement, no cursor, no new parameter types.
#[inline(always)]
fn eligible(ctx: &SkMsgContext, slot: u32, size: u32) -> Option<u32> {
    // Header, command, statement id, flags, iteration count: 14 bytes without parameters.
    if size < 14 {
        return None;
    }
    let want = if size < 64 { size } else { 64 };
    // SAFETY: the program's own message.
    if unsafe { bpf_msg_pull_data(ctx.msg as *mut sk_msg_md, 0, want, 0) } != 0 {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 14 > end {
        return None;
    }
    // SAFETY: 14 bytes checked against data_end.
    let b = unsafe { core::slice::from_raw_parts(data as *const u8, 14) };
    let plen = b[0] as u32 | (b[1] as u32) << 8 | (b[2] as u32) << 16;
    if plen + 4 != size || b[3] != 0 || b[4] != COM_STMT_EXECUTE || b[9] != 0 {
        return None;
    }
    let id = u32::from_le_bytes([b[5], b[6], b[7], b[8]]);
    // SAFETY: a plain lookup; the value is copied out.
    let st = *unsafe { DBF_STMT.get(&StmtKey { slot, id }) }?;
    if st.params > 0 {
        // Null bitmap, then the new-parameters-bound flag, then (when 1) the types.
        let at = 14 + (st.params.min(128) + 7) / 8;
        let p = data + at as usize;
        if p + 1 > end {
            return None;
        }
        // SAFETY: checked against data_end.
        match unsafe { *(p as *const u8) } {
            0 => {}
            1 if st.params as usize <= MAX_TYPED => {
                let n = 2 * st.params as usize;
                for i in 0..2 * MAX_TYPED {
                    if i >= n {
                        break;
                    }
                    let q = p + 1 + i;
                    if q + 1 > end {
                        return None;
                    }
                    // SAFETY: checked against data_end.
                    if unsafe { *(q as *const u8) } != st.types[i] {
                        return None;
                    }
                }
            }
            _ => return None,
        }
    }
    Some(st.id)
}

/// A replica's send: while redirecting, an answer that is whole in this one message (small
/// answers are: the server writes each answer with one send unless it outgrows its network
/// buffer) goes into the client's socket. Anything else (a larger answer, or one the program
/// cannot follow) goes to the router, with every answer after it: the program turns
/// `REDIRECT` off, and the router relays what it gets. So the kernel queues at most one
/// message per answer for a client, and answers stay in order.
#[inline(always)]
fn answer(ctx: &SkMsgContext, e: *mut Entry) -> u32 {
    // SAFETY: a map value; the kernel runs this program for one send of a socket at a time,
    // and the router writes the entry only while the server sends nothing on it.
    let c = unsafe { &mut *e };
    if c.flags & REDIRECT == 0 {
        return sk_action::SK_PASS;
    }
    let len = ctx.size();
    // SAFETY: a u32 the router writes, read whole.
    let hold = unsafe { core::ptr::read_volatile(&c.hold) };
    if len == 0 || len > MAX_ANSWER || hold != 0 {
        c.flags &= !REDIRECT;
        return sk_action::SK_PASS;
    }
    let mut walk = Walk { msg: ctx.msg, off: 0, len, eofs: 0, ended: 0, deprecate_eof: c.flags & DEPRECATE_EOF };
    // Each step consumes one whole frame (at least 4 bytes).
    // SAFETY: bpf_loop calls `step` with `walk`, which lives on this stack frame.
    let ran = unsafe { bpf_loop(len / 4 + 1, step as *mut c_void, (&mut walk as *mut Walk).cast(), 0) };
    if ran < 0 || walk.ended != 1 || walk.off != len {
        c.flags &= !REDIRECT;
        return sk_action::SK_PASS;
    }
    c.done = c.done.wrapping_add(1);
    let mut peer = c.peer;
    DBF_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) as u32
}

/// The router's send to its client (it goes into the client's socket as the kernel's
/// answers do, so that the client reads everything in the order it was sent).
#[inline(always)]
fn from_router(ctx: &SkMsgContext, e: *mut Entry) -> u32 {
    // SAFETY: the session's replica entry, whose `peer` is the client's socket from
    // registration on.
    let mut peer = unsafe { (*e).peer };
    DBF_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) as u32
}

/// Largest message redirected as one answer.
const MAX_ANSWER: u32 = 64 * 1024;

#[repr(C)]
struct Walk {
    msg: *mut sk_msg_md,
    off: u32,
    len: u32,
    /// 0: at the first packet; n > 0: inside a result set, n 0xFE packets to go.
    eofs: u32,
    /// 0: the answer goes on; 1: it ended where `off` is now; 2: not one plain answer.
    ended: u32,
    deprecate_eof: u32,
}

/// One frame: header and first payload byte. Returns 1 (stop) when the answer ended, at the
/// end of the message, or on anything but a whole frame.
extern "C" fn step(_i: u64, w: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the `Walk` given to it.
    let w = unsafe { &mut *(w as *mut Walk) };
    if w.ended != 0 || w.off >= w.len {
        return 1;
    }
    if w.len - w.off < 5 {
        w.ended = 2;
        return 1;
    }
    // SAFETY: the program's own message.
    if unsafe { bpf_msg_pull_data(w.msg, w.off, w.off + 5, 0) } != 0 {
        w.ended = 2;
        return 1;
    }
    // SAFETY: the context's packet pointers, refreshed by the pull.
    let (data, end) = unsafe { ((*w.msg).__bindgen_anon_1.data as usize, (*w.msg).__bindgen_anon_2.data_end as usize) };
    if data + 5 > end {
        w.ended = 2;
        return 1;
    }
    // SAFETY: 5 bytes checked against data_end.
    let b = unsafe { core::slice::from_raw_parts(data as *const u8, 5) };
    let plen = b[0] as u32 | (b[1] as u32) << 8 | (b[2] as u32) << 16;
    let first = b[4];
    if plen == 0 || plen >= MAX_FRAME || plen > w.len - w.off - 4 {
        // Empty, continued (16 MiB) or cut by the message's end: not for the kernel.
        w.ended = 2;
        return 1;
    }
    w.off += 4 + plen;
    if w.eofs == 0 {
        match first {
            0x00 | 0xFF => w.ended = 1,
            // LOCAL INFILE: no answer to a read.
            0xFB => w.ended = 2,
            // Column count: definitions, then rows up to the terminator.
            _ => w.eofs = if w.deprecate_eof != 0 { 1 } else { 2 },
        }
        return 0;
    }
    if first == 0xFF {
        w.ended = 1;
    } else if first == 0xFE && plen < 0xFF_FFFF {
        // A text or binary row can begin with 0xFE only as the 8-byte length prefix of a
        // value of 16 MiB or more: never in a message this small.
        w.eofs -= 1;
        if w.eofs == 0 {
            w.ended = 1;
        }
    }
    0
}
