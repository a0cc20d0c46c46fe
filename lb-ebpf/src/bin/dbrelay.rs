//! db-router's in-kernel response relay: an `sk_skb` stream-verdict program on the router's
//! backend connections. A response the router does not need to see (a plain read on the
//! replica) goes from the backend socket straight out of the client's socket
//! (`bpf_sk_redirect_map`, egress), without waking the router; everything else passes to the
//! router as usual.
//!
//! While it redirects, the program follows the MySQL framing of the stream (frame headers and
//! the first byte of each packet) to count the responses that ended, so that the router knows
//! when a redirected answer is complete before it switches the connection back, answers the
//! client itself, or finds the backend gone. Only responses to single statements are
//! redirected (no multi-results); a response ends with an OK or ERR as its first packet, or,
//! after a column count, with the result set's terminator (0xFE shorter than a full frame:
//! EOF, or OK with `CLIENT_DEPRECATE_EOF`; the column definitions' EOF comes first without
//! it) or an ERR. A text row can begin with 0xFE only as the 8-byte length prefix of a value
//! of 16 MiB or more, so its first frame is a full 0xFFFFFF-byte frame: never a terminator.
//!
//! Maps (filled by db-router, `db-router/src/kernel_relay.rs` has the same layout):
//! - `DBR_BACKENDS`: the backend sockets (the map this program is attached to), at index
//!   `2 * client slot + (0 primary, 1 replica)`;
//! - `DBR_INDEX`: backend socket cookie -> that index;
//! - `DBR_CONN`: index -> [`Conn`], an array the router maps into its memory (it reads and
//!   switches a connection's state without a system call);
//! - `DBR_CLIENTS`: client slot -> the client's socket.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{__sk_buff, sk_action},
    cty::c_void,
    helpers::{bpf_get_socket_cookie, bpf_loop, bpf_skb_load_bytes},
    macros::{map, stream_verdict},
    bindings::BPF_F_MMAPABLE,
    maps::{Array, HashMap, SockMap},
    programs::SkBuffContext,
    EbpfContext,
};
#[allow(unused_imports)]
use lb_ebpf as _;

/// `Conn::flags`: redirect this connection's bytes to the client.
const REDIRECT: u32 = 1;
/// `Conn::flags`: the connection negotiated `CLIENT_DEPRECATE_EOF`.
const DEPRECATE_EOF: u32 = 2;
/// `Conn::flags`: the stream could not be followed (more frames in one skb than the loop
/// bound, or a packet no answer to a single read contains); the router drops the connection.
const LOST: u32 = 4;

const MAX_FRAME: u32 = 0xFF_FFFF;

/// Per backend connection; written by the router when it switches the connection, updated
/// here while redirecting (one skb at a time per socket).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Conn {
    /// Index of the client's socket in `DBR_CLIENTS`.
    pub slot: u32,
    pub flags: u32,
    /// Responses seen to end since the router last wrote this entry (wrapping).
    pub done: u32,
    /// Payload bytes of the current frame still to come.
    pub skip: u32,
    /// Frame header bytes collected across an skb boundary, little-endian, `have` of them.
    pub hdr: u32,
    pub have: u32,
    /// 0: at the first packet of a response; n > 0: inside a result set, n 0xFE packets to go.
    pub eofs: u32,
    /// The previous frame was `MAX_FRAME` long: the next frame continues its packet.
    pub cont: u32,
}

#[map]
static DBR_CLIENTS: SockMap = SockMap::with_max_entries(65536, 0);

#[map]
static DBR_BACKENDS: SockMap = SockMap::with_max_entries(131072, 0);

#[map]
static DBR_INDEX: HashMap<u64, u32> = HashMap::with_max_entries(131072, 0);

#[map]
static DBR_CONN: Array<Conn> = Array::with_max_entries(131072, BPF_F_MMAPABLE);

#[stream_verdict]
pub fn dbr_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper reads the socket of the program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a plain lookup; the value is copied out.
    let Some(&index) = (unsafe { DBR_INDEX.get(&cookie) }) else { return sk_action::SK_PASS };
    let Some(conn) = DBR_CONN.get_ptr_mut(index) else { return sk_action::SK_PASS };
    // SAFETY: a map value; the kernel runs this program for one skb of a socket at a time,
    // and the router writes the entry only while the server sends nothing on it.
    let c = unsafe { &mut *conn };
    if c.flags & REDIRECT == 0 {
        return sk_action::SK_PASS;
    }
    let len = ctx.len();
    if len == 0 {
        // No data (the end of the stream): the router's socket sees it and acts on it.
        return sk_action::SK_PASS;
    }
    let mut walk = Walk { skb: ctx.as_ptr() as *mut __sk_buff, conn, off: 0, len };
    // Each step consumes at least one frame header byte or the rest of the skb.
    let steps = len + 1;
    // SAFETY: bpf_loop calls `step` with `walk`, which lives on this stack frame.
    let ran = unsafe { bpf_loop(steps, step as *mut c_void, (&mut walk as *mut Walk).cast(), 0) };
    if ran < 0 || walk.off < len {
        c.flags |= LOST;
    }
    // SK_PASS when the client's socket is in the map, SK_DROP when the client is gone.
    // SAFETY: redirect of the program's own skb to a socket of the map.
    unsafe { DBR_CLIENTS.redirect_skb(&ctx, c.slot, 0) as u32 }
}

#[repr(C)]
struct Walk {
    skb: *mut __sk_buff,
    conn: *mut Conn,
    off: u32,
    len: u32,
}

/// One step over the stream: the rest of a frame's payload, or one frame header. Returns 1
/// (stop) at the end of the skb.
extern "C" fn step(_i: u64, w: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the `Walk` given to it.
    let w = unsafe { &mut *(w as *mut Walk) };
    // SAFETY: the map value the verdict looked up.
    let c = unsafe { &mut *w.conn };
    if w.off >= w.len {
        return 1;
    }
    let avail = w.len - w.off;
    if c.skip > 0 {
        let take = if c.skip < avail { c.skip } else { avail };
        c.skip -= take;
        w.off += take;
        return 0;
    }
    if c.have == 0 && avail >= 5 {
        // Fast path: header and first payload byte in this skb.
        let mut b = [0u8; 8];
        // SAFETY: 5 bytes into an 8-byte stack buffer.
        if unsafe { bpf_skb_load_bytes(w.skb as *const c_void, w.off, b.as_mut_ptr().cast(), 5) } != 0 {
            c.flags |= LOST;
            w.off = w.len;
            return 1;
        }
        let plen = b[0] as u32 | (b[1] as u32) << 8 | (b[2] as u32) << 16;
        if plen == 0 {
            w.off += 4;
            frame(c, 0, 0);
        } else {
            w.off += 5;
            c.skip = plen - 1;
            frame(c, plen, b[4]);
        }
        return 0;
    }
    // Slow path: one byte of a header that crosses an skb boundary.
    let mut b = [0u8; 1];
    // SAFETY: 1 byte into a 1-byte stack buffer.
    if unsafe { bpf_skb_load_bytes(w.skb as *const c_void, w.off, b.as_mut_ptr().cast(), 1) } != 0 {
        c.flags |= LOST;
        w.off = w.len;
        return 1;
    }
    w.off += 1;
    if c.have < 4 {
        c.hdr |= (b[0] as u32) << (8 * (c.have & 3));
        c.have += 1;
        if c.have == 4 && c.hdr & MAX_FRAME == 0 {
            c.have = 0;
            c.hdr = 0;
            frame(c, 0, 0);
        }
        return 0;
    }
    let plen = c.hdr & MAX_FRAME;
    c.have = 0;
    c.hdr = 0;
    c.skip = plen - 1;
    frame(c, plen, b[0]);
    0
}

/// A frame starts: `plen` payload bytes, the first of them `first`.
#[inline(always)]
fn frame(c: &mut Conn, plen: u32, first: u8) {
    let cont = c.cont;
    c.cont = (plen == MAX_FRAME) as u32;
    if cont != 0 {
        return;
    }
    if c.eofs == 0 {
        match first {
            0x00 | 0xFF if plen > 0 => c.done = c.done.wrapping_add(1),
            // An empty packet or LOCAL INFILE: no answer to a plain read.
            _ if plen == 0 || first == 0xFB => c.flags |= LOST,
            // Column count: definitions, then rows up to the terminator.
            _ => c.eofs = if c.flags & DEPRECATE_EOF != 0 { 1 } else { 2 },
        }
        return;
    }
    if first == 0xFF || (first == 0xFE && plen < MAX_FRAME && plen > 0) {
        c.eofs -= 1;
        if first == 0xFF {
            c.eofs = 0;
        }
        if c.eofs == 0 {
            c.done = c.done.wrapping_add(1);
        }
    }
}
