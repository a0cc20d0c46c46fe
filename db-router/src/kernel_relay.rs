//! In-kernel relay of read responses (BPF sockmap): the replica's answer to a plain read goes
//! from the router's backend socket straight out of the client's socket, redirected by an
//! `sk_skb` stream-verdict program (`lb-ebpf/src/bin/dbrelay.rs`), so the router is neither
//! woken nor copies anything for it.
//!
//! The router decides per statement: before it forwards a statement whose answer it does not
//! need (see `Session::kernel_eligible`), it sets the connection's redirect flag; for anything
//! else (writes, whose OK carries status and GTID; session commands whose replies it
//! swallows; prepares whose ids it rewrites; transactions) it clears it. The program follows
//! the MySQL framing of what it redirects and counts the responses that ended; before the
//! router does anything else with a session (its next command, a switch back, an answer of
//! its own), it waits until every redirected response has ended (with a client that pipelines
//! commands it may not have), and while a response is in flight it watches the backend
//! socket for the end of the connection. The per-connection state is an array map the router
//! maps into its memory: switching and checking cost no system call.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
};

use aya::{
    maps::{HashMap, MapData, SockMap},
    programs::SkSkb,
    Ebpf,
};

use crate::mapped::MappedArray;

/// `Conn::flags` bits, as in the BPF program.
const REDIRECT: u32 = 1;
const DEPRECATE_EOF: u32 = 2;
const LOST: u32 = 4;
/// Sessions using the kernel relay at once (`DBR_CLIENTS`); backends: twice that.
pub const SLOTS: u32 = 65536;

/// `DBR_CONN` entries: the layout of `Conn` in lb-ebpf/src/bin/dbrelay.rs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Conn {
    slot: u32,
    flags: u32,
    done: u32,
    skip: u32,
    hdr: u32,
    have: u32,
    eofs: u32,
    cont: u32,
}

struct Maps {
    clients: SockMap<MapData>,
    backends: SockMap<MapData>,
    index: HashMap<MapData, u64, u32>,
    free: Vec<u32>,
}

/// The loaded program and its maps; shared by all sessions.
pub struct KernelRelay {
    maps: Mutex<Maps>,
    /// `DBR_CONN`: `2 * SLOTS` entries; each used by the one session owning that slot (and
    /// the BPF program).
    conns: MappedArray<Conn>,
    /// Keeps the program loaded and attached (detached when dropped) and the array's fd.
    _ebpf: Mutex<Ebpf>,
}

impl KernelRelay {
    /// Loads the embedded program; when the kernel refuses it (no privilege, no sockmap
    /// support), logs why and returns `None`: sessions then relay everything in user space.
    pub fn load_or_log() -> Option<Arc<KernelRelay>> {
        match Self::load(object()) {
            Ok(k) => {
                tracing::debug!("in-kernel read relay loaded");
                Some(k)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "in-kernel read relay unavailable; relaying reads in user space");
                None
            }
        }
    }

    /// Loads the program from `object` (ELF bytes) and attaches it to the backend map.
    pub fn load(object: &[u8]) -> anyhow::Result<Arc<KernelRelay>> {
        let mut ebpf = Ebpf::load(object)?;
        let take = |e: &mut Ebpf, name: &str| e.take_map(name).ok_or_else(|| anyhow::anyhow!("map {name} missing from the object"));
        let clients = SockMap::try_from(take(&mut ebpf, "DBR_CLIENTS")?)?;
        let backends = SockMap::try_from(take(&mut ebpf, "DBR_BACKENDS")?)?;
        let index = HashMap::try_from(take(&mut ebpf, "DBR_INDEX")?)?;
        let conns = MappedArray::new(take(&mut ebpf, "DBR_CONN")?, "DBR_CONN", 2 * SLOTS as usize)?;
        let prog: &mut SkSkb = ebpf.program_mut("dbr_verdict").ok_or_else(|| anyhow::anyhow!("program dbr_verdict missing"))?.try_into()?;
        prog.load()?;
        prog.attach(backends.fd())?;
        let free = (0..SLOTS).rev().collect();
        Ok(Arc::new(KernelRelay { maps: Mutex::new(Maps { clients, backends, index, free }), conns, _ebpf: Mutex::new(ebpf) }))
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conn(&self, index: u32) -> *mut Conn {
        self.conns.get(index)
    }

    /// Registers a client socket; `None` when the slots are used up or the kernel refuses the
    /// socket (the session then relays in user space).
    pub fn client(self: &Arc<Self>, fd: &impl AsRawFd) -> Option<ClientSlot> {
        let mut m = self.maps();
        let slot = m.free.pop()?;
        match m.clients.set(slot, fd, 0) {
            Ok(()) => Some(ClientSlot { relay: Arc::clone(self), slot }),
            Err(e) => {
                m.free.push(slot);
                tracing::debug!(error = %e, "client socket not accepted by the sockmap; relaying in user space");
                None
            }
        }
    }
}

/// A client's place in `DBR_CLIENTS`; freed on drop.
pub struct ClientSlot {
    relay: Arc<KernelRelay>,
    slot: u32,
}

impl ClientSlot {
    /// Registers backend connection `which` (0 primary, 1 replica) of this client.
    pub fn backend(&self, which: u32, fd: &impl AsRawFd, deprecate_eof: bool) -> Option<BackendSlot> {
        let cookie = socket_cookie(fd.as_raw_fd())?;
        let index = self.slot * 2 + which;
        let b = BackendSlot { relay: Arc::clone(&self.relay), slot: self.slot, index, cookie, deprecate_eof, redirect: false, sent: 0 };
        b.write(Conn { slot: self.slot, ..Conn::default() });
        let mut m = self.relay.maps();
        if let Err(e) = m.index.insert(cookie, index, 0) {
            tracing::debug!(error = %e, "backend not registered with the in-kernel relay; relaying in user space");
            return None;
        }
        if let Err(e) = m.backends.set(index, fd, 0) {
            let _ = m.index.remove(&cookie);
            tracing::debug!(error = %e, "backend socket not accepted by the sockmap; relaying in user space");
            return None;
        }
        Some(b)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.relay.maps();
        let _ = m.clients.clear_index(&self.slot);
        m.free.push(self.slot);
    }
}

/// Where the responses redirected on a connection stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Every redirected response has ended (or none was sent).
    Settled,
    /// A response is on its way; `started`: the client may have part of it.
    InFlight { started: bool },
    /// The program could not follow the stream: the connection must be dropped.
    Lost,
}

/// A backend connection in `DBR_BACKENDS`; removed on drop (must drop before its
/// [`ClientSlot`], which `Session` guarantees by field order).
pub struct BackendSlot {
    relay: Arc<KernelRelay>,
    slot: u32,
    index: u32,
    cookie: u64,
    deprecate_eof: bool,
    redirect: bool,
    /// Commands sent with redirect on since it was switched on.
    sent: u32,
}

impl BackendSlot {
    fn read(&self) -> Conn {
        // SAFETY: this connection's entry of the mapping; the BPF program may update it
        // concurrently (plain u32 fields: a volatile read sees each whole).
        unsafe { std::ptr::read_volatile(self.relay.conn(self.index)) }
    }

    fn write(&self, c: Conn) {
        // SAFETY: as in `read`; written only while nothing is in flight on the connection.
        unsafe { std::ptr::write_volatile(self.relay.conn(self.index), c) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    pub fn redirecting(&self) -> bool {
        self.redirect
    }

    /// Switches redirection on or off; only when [`BackendSlot::progress`] is `Settled`.
    pub fn set_redirect(&mut self, on: bool) {
        if self.redirect == on {
            return;
        }
        let flags = if on { REDIRECT | if self.deprecate_eof { DEPRECATE_EOF } else { 0 } } else { 0 };
        self.write(Conn { slot: self.slot, flags, ..Conn::default() });
        self.redirect = on;
        self.sent = 0;
    }

    /// A command went out with redirection on.
    pub fn note_sent(&mut self) {
        self.sent = self.sent.wrapping_add(1);
    }

    pub fn progress(&self) -> Progress {
        if !self.redirect || self.sent == 0 {
            return Progress::Settled;
        }
        let c = self.read();
        if c.flags & LOST != 0 {
            Progress::Lost
        } else if c.done == self.sent {
            Progress::Settled
        } else {
            let started = c.eofs != 0 || c.have != 0 || c.skip != 0 || c.cont != 0 || c.done != self.sent.wrapping_sub(1);
            Progress::InFlight { started }
        }
    }
}

impl Drop for BackendSlot {
    fn drop(&mut self) {
        let mut m = self.relay.maps();
        let _ = m.index.remove(&self.cookie);
        let _ = m.backends.clear_index(&self.index);
    }
}

/// The `dbrelay` program and maps, built by build.rs.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dbrelay"))
}

fn socket_cookie(fd: RawFd) -> Option<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    (r == 0).then_some(cookie)
}
