//! In-kernel fast path for prepared reads (`lb-ebpf/src/bin/dbfast.rs`): when a client and
//! the replica both run on this host, a prepared read goes from the client's socket straight
//! into the replica's, and its answer straight back, without passing through the router or
//! through TCP (BPF sockmap, `sk_msg` redirects to ingress). The router stays in charge: it
//! registers which statements the kernel may route (reads prepared on the session's replica
//! connection), turns a session's fast path on only while the session is in a state where
//! any such read would go to that replica anyway (autocommit, no transaction, no pin, the
//! session's writes already on the replica, the routing view unchanged), and everything the
//! kernel does not route (including every write) comes to the router as before and turns the
//! fast path off until the router has dealt with it.
//!
//! How the router and the program agree without locks is in the program's docs (the session
//! word). On this side: [`FastClient::resume`] turns the path on by compare-and-swap, only
//! when every byte the kernel passed to the router has been read; [`FastClient::pause`] turns
//! it off and returns how many commands the kernel routed, and [`FastClient::progress`] says
//! when that many answers have ended.
//!
//! Why a sockmap and not a TCP splice: a loopback TCP send runs both ends' TCP path in the
//! sender's system call, and a relay adds two of them per statement (about 19 µs on the
//! 2-vCPU machine); a message redirected into a socket's ingress queue costs a copy and a
//! wakeup, so a routed read costs less than a direct TCP connection to the server.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::{links::CgroupAttachMode, SkMsg, SockOps},
    Ebpf, Pod,
};

use crate::mapped::MappedArray;

/// Sessions using the fast path at once; the replica entries follow the client entries.
pub const SLOTS: u32 = 65536;
/// Replica entry flags, as in the program.
const REDIRECT: u32 = 1;
const DEPRECATE_EOF: u32 = 2;

/// A socket as its owner sees it (`Key` in the program).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Key {
    local_ip: u32,
    remote_ip: u32,
    local_port: u32,
    remote_port: u32,
}
// SAFETY: plain integers, no padding.
unsafe impl Pod for Key {}

impl Key {
    /// The socket at `local` connected to `remote`; IPv4 only.
    fn of(local: SocketAddr, remote: SocketAddr) -> Option<Key> {
        match (local, remote) {
            (SocketAddr::V4(l), SocketAddr::V4(r)) => Some(Key {
                local_ip: u32::from_ne_bytes(l.ip().octets()),
                remote_ip: u32::from_ne_bytes(r.ip().octets()),
                local_port: l.port().into(),
                remote_port: r.port().into(),
            }),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    word: u64,
    peer: Key,
    flags: u32,
    done: u32,
    hold: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct StmtKey {
    slot: u32,
    id: u32,
}
// SAFETY: plain integers, no padding.
unsafe impl Pod for StmtKey {}

/// Parameter types the program compares (as in the program).
const MAX_TYPED: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Stmt {
    id: u32,
    params: u32,
    types: [u8; 2 * MAX_TYPED],
}
// SAFETY: plain integers, no padding.
unsafe impl Pod for Stmt {}

struct Maps {
    socks: SockHash<MapData, Key>,
    listen: HashMap<MapData, [u32; 2], u32>,
    ports: HashMap<MapData, u32, u32>,
    live: HashMap<MapData, Key, u32>,
    role: HashMap<MapData, Key, u32>,
    stmt: HashMap<MapData, StmtKey, Stmt>,
    free: Vec<u32>,
}

/// The loaded programs and their maps; shared by all sessions.
pub struct FastPath {
    maps: Mutex<Maps>,
    /// `DBF_STATE`: `2 * SLOTS` entries; each used by the one session owning that slot (and
    /// the BPF programs).
    entries: MappedArray<Entry>,
    /// Keeps the programs loaded and attached (detached when dropped), and the maps' fds.
    _ebpf: Mutex<Ebpf>,
}

impl FastPath {
    /// Loads and attaches the programs; when the kernel refuses (no privilege, no cgroup v2,
    /// no sockmap support), logs why and returns `None`: the router then relays everything.
    pub fn load_or_log() -> Option<Arc<FastPath>> {
        match Self::load(object()) {
            Ok(f) => {
                tracing::info!("in-kernel fast path for prepared reads loaded");
                Some(f)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "in-kernel fast path unavailable; relaying every statement in user space");
                None
            }
        }
    }

    pub fn load(object: &[u8]) -> anyhow::Result<Arc<FastPath>> {
        let cgroup = cgroup2_root()?;
        let mut ebpf = Ebpf::load(object)?;
        let take = |e: &mut Ebpf, name: &str| e.take_map(name).ok_or_else(|| anyhow::anyhow!("map {name} missing from the object"));
        let socks = SockHash::<MapData, Key>::try_from(take(&mut ebpf, "DBF_SOCKS")?)?;
        let listen = HashMap::try_from(take(&mut ebpf, "DBF_LISTEN")?)?;
        let ports = HashMap::try_from(take(&mut ebpf, "DBF_PORTS")?)?;
        let live = HashMap::try_from(take(&mut ebpf, "DBF_LIVE")?)?;
        let role = HashMap::try_from(take(&mut ebpf, "DBF_ROLE")?)?;
        let stmt = HashMap::try_from(take(&mut ebpf, "DBF_STMT")?)?;
        let entries = MappedArray::new(take(&mut ebpf, "DBF_STATE")?, "DBF_STATE", 2 * SLOTS as usize)?;
        let msg: &mut SkMsg = ebpf.program_mut("dbf_msg").ok_or_else(|| anyhow::anyhow!("program dbf_msg missing"))?.try_into()?;
        msg.load()?;
        msg.attach(socks.fd())?;
        let fp = FastPath { maps: Mutex::new(Maps { socks, listen, ports, live, role, stmt, free: (0..SLOTS).rev().collect() }), entries, _ebpf: Mutex::new(ebpf) };
        {
            let mut ebpf = fp._ebpf.lock().unwrap_or_else(|e| e.into_inner());
            let ops: &mut SockOps = ebpf.program_mut("dbf_sockops").ok_or_else(|| anyhow::anyhow!("program dbf_sockops missing"))?.try_into()?;
            ops.load()?;
            // A link (kernel 5.7+) runs beside other programs of the cgroup whatever the mode;
            // the kernel refuses any mode flag on a link.
            ops.attach(&cgroup, CgroupAttachMode::Single)?;
        }
        Ok(Arc::new(fp))
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, index: u32) -> *mut Entry {
        self.entries.get(index)
    }

    /// Clients on this host connecting to `addr` (any address of the host when it is a
    /// wildcard) get their sockets into the sockmap. IPv4 only.
    pub fn listen(&self, addr: SocketAddr) {
        let SocketAddr::V4(a) = addr else { return };
        let ip = if a.ip().is_unspecified() { 0 } else { u32::from_ne_bytes(a.ip().octets()) };
        if let Err(e) = self.maps().listen.insert([ip, u32::from(a.port())], 1, 0) {
            tracing::warn!(error = %e, %addr, "listening address not registered with the in-kernel fast path");
        }
    }

    /// A backend connection from local `port` is being opened: its server end goes into the
    /// sockmap if the server runs on this host. Undone by [`FastPath::release_port`].
    pub fn reserve_port(&self, port: u16) {
        let _ = self.maps().ports.insert(u32::from(port), 1, 0);
    }

    pub fn release_port(&self, port: u16) {
        let _ = self.maps().ports.remove(&u32::from(port));
    }

    /// Registers the client of the router's socket `socket` (at `local`, connected from
    /// `peer`), before any byte is read from or written to it; `None` when the client is not
    /// on this host (its socket is not in the sockmap) or the kernel refuses.
    pub fn client(self: &Arc<Self>, socket: &impl AsRawFd, local: SocketAddr, peer: SocketAddr) -> Option<FastClient> {
        let key = Key::of(peer, local)?;
        let own = Key::of(local, peer)?;
        let mut m = self.maps();
        m.live.get(&key, 0).ok()?;
        let slot = m.free.pop()?;
        // SAFETY: this slot's entries; no session owns them and the program does not find
        // them before the roles below exist.
        unsafe {
            std::ptr::write_volatile(self.entry(slot), Entry::default());
            std::ptr::write_volatile(self.entry(SLOTS + slot), Entry { peer: key, ..Entry::default() });
        }
        let registered = m.role.insert(own, 2 * SLOTS + slot, 0).and_then(|()| m.socks.insert(own, socket.as_raw_fd(), 0)).and_then(|()| m.role.insert(key, slot, 0));
        if let Err(e) = registered {
            let _ = m.role.remove(&own);
            let _ = m.socks.remove(&own);
            m.free.push(slot);
            tracing::debug!(error = %e, "client not registered with the in-kernel fast path");
            return None;
        }
        Some(FastClient { fp: Arc::clone(self), slot, key, own, on: false, backend: None, stmts: Vec::new() })
    }
}

/// Where the answers to the commands the kernel routed stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Every one went to the client.
    Settled,
    /// The program handed this many (the last ones) over to the router: they come on the
    /// replica connection, in order, for the router to relay.
    HandedOver(u32),
    /// One is still on its way (the server has not answered yet).
    InFlight,
}

/// A session's place in the fast path; removed on drop.
pub struct FastClient {
    fp: Arc<FastPath>,
    slot: u32,
    /// The client's socket.
    key: Key,
    /// The router's socket to the client.
    own: Key,
    /// The fast path may be on (the router set it and has not paused it since).
    on: bool,
    /// The replica connection's server end and the connection's serial.
    backend: Option<(Key, u64)>,
    /// Client statement ids registered for the current replica connection.
    stmts: Vec<u32>,
}

impl FastClient {
    fn word(&self) -> &AtomicU64 {
        // SAFETY: this slot's entry, in the shared mapping; the word is only changed with
        // atomics, here and in the program.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.fp.entry(self.slot)).word)) }
    }

    fn answer(&self) -> *mut Entry {
        self.fp.entry(SLOTS + self.slot)
    }

    /// The serial of the replica connection registered, if any.
    pub fn backend_serial(&self) -> Option<u64> {
        self.backend.map(|b| b.1)
    }

    /// Registers the replica connection from the router's `local` address to the server's
    /// `peer`; false when its server end is not in the sockmap (a server on another host).
    /// Only while paused.
    pub fn attach_backend(&mut self, local: SocketAddr, peer: SocketAddr, serial: u64, deprecate_eof: bool) -> bool {
        debug_assert!(!self.on);
        self.detach_backend();
        let Some(key) = Key::of(peer, local) else { return false };
        let mut m = self.fp.maps();
        if m.live.get(&key, 0).is_err() {
            return false;
        }
        let flags = if deprecate_eof { DEPRECATE_EOF } else { 0 };
        // SAFETY: this session's replica entry; nothing is redirected on it (no role yet).
        unsafe { std::ptr::write_volatile(self.answer(), Entry { peer: self.key, flags, ..Entry::default() }) };
        // SAFETY: this session's entry; only `peer` changes (the word is left alone).
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*self.fp.entry(self.slot)).peer), key) };
        if m.role.insert(key, SLOTS + self.slot, 0).is_err() {
            return false;
        }
        self.backend = Some((key, serial));
        true
    }

    /// Forgets the replica connection and its statements. Only while paused.
    pub fn detach_backend(&mut self) {
        let Some((key, _)) = self.backend.take() else { return };
        let mut m = self.fp.maps();
        let _ = m.role.remove(&key);
        let _ = m.live.remove(&key);
        for id in self.stmts.drain(..) {
            let _ = m.stmt.remove(&StmtKey { slot: self.slot, id });
        }
    }

    /// The kernel may route executions of client statement `id` (replica id `backend_id`),
    /// whose parameter types on the replica connection are `types` (`None`: no parameters or
    /// too many to compare: only executions that send no types go through the kernel).
    pub fn register_stmt(&mut self, id: u32, backend_id: u32, params: u16, types: Option<&[u8]>) {
        if self.backend.is_none() || self.stmts.contains(&id) {
            return;
        }
        let mut buf = [0u8; 2 * MAX_TYPED];
        if let Some(types) = types.filter(|ty| ty.len() <= buf.len()) {
            buf[..types.len()].copy_from_slice(types);
        }
        if self.fp.maps().stmt.insert(StmtKey { slot: self.slot, id }, Stmt { id: backend_id, params: params.into(), types: buf }, 0).is_ok() {
            self.stmts.push(id);
        }
    }

    pub fn unregister_stmt(&mut self, id: u32) {
        if let Some(i) = self.stmts.iter().position(|&s| s == id) {
            self.stmts.swap_remove(i);
            let _ = self.fp.maps().stmt.remove(&StmtKey { slot: self.slot, id });
        }
    }

    pub fn unregister_all(&mut self) {
        let mut m = self.fp.maps();
        for id in self.stmts.drain(..) {
            let _ = m.stmt.remove(&StmtKey { slot: self.slot, id });
        }
    }

    pub fn has_statements(&self) -> bool {
        !self.stmts.is_empty()
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Turns the fast path on if every byte the kernel passed to the router has been read
    /// (`read`: bytes read from the client since registration); false otherwise (bytes are
    /// on their way: the router reads them first).
    /// With `hold`, the router still has bytes to send to the client: until
    /// [`FastClient::release_hold`], the program hands answers over to the router instead of
    /// redirecting them (they would overtake those bytes).
    pub fn resume(&mut self, read: u64, hold: bool) -> bool {
        if self.on {
            return true;
        }
        if self.backend.is_none() {
            return false;
        }
        let w = self.word().load(Ordering::Acquire);
        if w & 1 != 0 || (w >> 32) as u32 != read as u32 {
            tracing::trace!(word = w, read, "fast path not resumed: bytes on their way to the router");
            return false;
        }
        // SAFETY: this session's replica entry; nothing is redirected while the path is off
        // and settled, and the program reads the entry only after the word below is set.
        unsafe {
            let a = self.answer();
            let flags = (*a).flags & DEPRECATE_EOF;
            std::ptr::write_volatile(a, Entry { peer: self.key, flags: flags | REDIRECT, hold: hold.into(), ..Entry::default() });
        }
        let new = (w & !0xFFFF_FFFF) | 1;
        if self.word().compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire).is_err() {
            self.stop_redirect();
            return false;
        }
        self.on = true;
        true
    }

    /// Turns the fast path off; returns how many commands the kernel routed since it was
    /// turned on (wait for [`FastClient::progress`] to settle before using the replica
    /// connection or writing to the client, then [`FastClient::stop_redirect`]).
    pub fn pause(&mut self) -> u32 {
        if !self.on {
            return 0;
        }
        self.on = false;
        let old = self.word().fetch_and(!1, Ordering::AcqRel);
        ((old >> 1) & 0x7FFF_FFFF) as u32
    }

    pub fn progress(&self, routed: u32) -> Progress {
        if routed == 0 {
            return Progress::Settled;
        }
        // SAFETY: this session's replica entry; the program updates it concurrently (u32
        // fields: a volatile read sees each whole). Flags first: once the program has turned
        // redirection off, `done` no longer moves.
        let a = self.answer();
        let flags = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*a).flags)) };
        std::sync::atomic::fence(Ordering::Acquire);
        // SAFETY: as above.
        let done = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*a).done)) };
        let left = routed.wrapping_sub(done);
        if left == 0 || left as i32 <= 0 {
            Progress::Settled
        } else if flags & REDIRECT == 0 {
            Progress::HandedOver(left)
        } else {
            Progress::InFlight
        }
    }

    /// The bytes [`FastClient::resume`] was told of are sent.
    pub fn release_hold(&mut self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        // SAFETY: this session's replica entry; only the router writes `hold`.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*self.answer()).hold), 0) };
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Answers the kernel redirected to the client since the path was last turned on.
    pub fn done(&self) -> u32 {
        // SAFETY: this session's replica entry (a u32 field, read whole).
        unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.answer()).done)) }
    }

    /// Answers on the replica connection come to the router again. Only when settled.
    pub fn stop_redirect(&mut self) {
        // SAFETY: this session's replica entry; settled, so the program is not using it.
        unsafe {
            let a = self.answer();
            let flags = (*a).flags & DEPRECATE_EOF;
            std::ptr::write_volatile(a, Entry { peer: self.key, flags, ..Entry::default() });
        }
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

impl Drop for FastClient {
    fn drop(&mut self) {
        self.word().fetch_and(!1, Ordering::AcqRel);
        self.detach_backend();
        let mut m = self.fp.maps();
        let _ = m.role.remove(&self.key);
        let _ = m.live.remove(&self.key);
        let _ = m.role.remove(&self.own);
        let _ = m.socks.remove(&self.own);
        m.free.push(self.slot);
    }
}

/// The `dbfast` programs and maps, built by build.rs.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dbfast"))
}

/// The root of the cgroup v2 hierarchy (the programs see every socket below it).
fn cgroup2_root() -> anyhow::Result<std::fs::File> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let path = mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| path.to_string())
        })
        .ok_or_else(|| anyhow::anyhow!("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)"))?;
    std::fs::File::open(&path).map_err(|e| anyhow::anyhow!("cannot open the cgroup v2 root {path}: {e}"))
}
