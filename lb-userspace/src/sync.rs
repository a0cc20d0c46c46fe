//! Flow-state sync between balancers, for active-active balancers behind ECMP (the seed
//! infrastructure's "Load Balancer: Active-Active"). A router spreads flows over the
//! balancers by a hash of the 5-tuple; when one balancer fails, the router moves its flows to
//! the others. Round robin cannot be recomputed elsewhere (Katran's consistent hash can), so
//! each balancer sends the flows it pins to its peers, as IPVS's connection sync daemon does,
//! and a flow that moves finds its entry waiting: it stays on its backend.
//!
//! Every balancer's flow table has the same size and hash seed (the seed derived from the
//! shared secret, [`flow_seed`]), so a flow is the same (set, tag) everywhere, and entries
//! travel without their 5-tuples. Every `interval` the daemon reads its table (mapped into
//! its memory, no system call per entry) against the copy it kept at the last read, and sends
//! every peer the entries that are new or changed backend, and a refresh of the ones still
//! in use every [`REFRESH_UNITS`] time units, each with its backend's address (backend
//! indexes are per balancer). A peer heard with a new instance id (it started or restarted)
//! is sent the whole table, paced, the last message flagged ([`FLAG_FULL_END`]). Entries
//! merged from peers are written into the copy too, so they are never sent back.
//!
//! Messages are UDP datagrams of at most [`MAX_ENTRIES`] entries, authenticated with
//! HMAC-SHA256 of the shared secret and numbered: a datagram from an address that is not a
//! peer, with a wrong tag, a number already seen, or another table size is refused and
//! counted. Hand-written: no library speaks a flow-sync protocol (IPVS's is kernel-internal
//! and keyed by 5-tuples).
//!
//! ```text
//! 0  "LBFS"  4  version  5  flags  6  entries (u16)  8  sets (u32)
//! 12 instance (u64)  20 sequence (u64)
//! 28 entries: set (u32), entry (u64: tag | backend | time), backend address (4 bytes)
//! .. HMAC-SHA256 of everything before it (32 bytes)
//! ```
//! Integers are big-endian.
//!
//! Known limits: a flow pinned less than an interval before its balancer fails has not
//! reached the peers yet (it is placed by the hash fallback there). Evictions are not sent:
//! a peer keeps an entry until its own table replaces it. Two balancers pinning the same
//! flow differently (a flow moved before its entry arrived) settle on the last one sent.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use lb_common::flow::{entry_backend, entry_tag, entry_time, make_entry, FlowSet, FLOW_TIME_SHIFT, FLOW_WAYS};
use ring::hmac;
use serde::Serialize;

pub const MAGIC: &[u8; 4] = b"LBFS";
pub const VERSION: u8 = 1;
/// The message ends a full dump of the sender's table.
pub const FLAG_FULL_END: u8 = 1;
pub const HEADER: usize = 28;
pub const ENTRY: usize = 16;
pub const TAG: usize = 32;
/// Entries per datagram: 1,340 bytes, within any Ethernet path's MTU.
pub const MAX_ENTRIES: usize = 80;
/// An entry still in use is sent again once its time is this many units (`FLOW_TIME_SHIFT`
/// jiffies each: 16 s at HZ=250) past the time last sent, so that peers keep it too.
pub const REFRESH_UNITS: u16 = 16;
/// Datagrams of a full dump sent per interval (8,000 entries).
pub const FULL_DUMP_MESSAGES: usize = 100;
/// Retired instance ids remembered per peer: their messages are replays.
const RETIRED: usize = 16;

/// The flow table's hash seed every balancer sharing `secret` uses.
pub fn flow_seed(secret: &[u8]) -> u64 {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, b"lbd flow-table seed v1");
    let mut b = [0u8; 8];
    b.copy_from_slice(&tag.as_ref()[..8]);
    u64::from_be_bytes(b) | 1
}

/// The flow table's entries (`FLOWS`, an array of `FlowSet`s), read and written in place:
/// the map mapped into our memory, or (tests) memory of our own. Every access is a whole
/// 8-byte word, as the data plane's are.
pub struct FlowTable {
    mem: Memory,
    sets: u32,
}

enum Memory {
    Mapped { ptr: *mut libc::c_void, len: usize },
    Owned(Box<[AtomicU64]>),
}

// SAFETY: the mapping is plain shared memory, only accessed through atomics.
unsafe impl Send for FlowTable {}
// SAFETY: as above.
unsafe impl Sync for FlowTable {}

impl FlowTable {
    /// Maps the flow table map (`BPF_F_MMAPABLE`) of `sets` sets.
    pub fn map(fd: BorrowedFd<'_>, sets: u32) -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (sets as usize * core::mem::size_of::<FlowSet>()).div_ceil(page) * page;
        // SAFETY: a shared mapping of a map fd; the kernel checks the length against the map.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { mem: Memory::Mapped { ptr, len }, sets })
    }

    /// A table in our own memory (tests).
    pub fn in_memory(sets: u32) -> Self {
        Self { mem: Memory::Owned((0..sets as usize * FLOW_WAYS).map(|_| AtomicU64::new(0)).collect()), sets }
    }

    pub fn sets(&self) -> u32 {
        self.sets
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.mem {
            // SAFETY: the mapping holds at least sets * 64 bytes, page-aligned, and lives
            // as long as self; AtomicU64 has the layout of u64.
            Memory::Mapped { ptr, .. } => unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), self.sets as usize * FLOW_WAYS) },
            Memory::Owned(w) => w,
        }
    }

    pub fn load(&self, i: usize) -> u64 {
        self.words()[i].load(Ordering::Relaxed)
    }

    pub fn store(&self, i: usize, entry: u64) {
        self.words()[i].store(entry, Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.sets as usize * FLOW_WAYS
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for FlowTable {
    fn drop(&mut self) {
        if let Memory::Mapped { ptr, len } = self.mem {
            // SAFETY: our own mapping, unmapped once.
            unsafe { libc::munmap(ptr, len) };
        }
    }
}

/// One flow entry on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireEntry {
    pub set: u32,
    pub entry: u64,
    pub backend: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub flags: u8,
    pub sets: u32,
    pub instance: u64,
    pub seq: u64,
    pub entries: Vec<WireEntry>,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("not a flow-sync message")]
    Malformed,
    #[error("authentication failed (another secret?)")]
    Auth,
    #[error("from {0}, which is not a peer")]
    NotPeer(Ipv4Addr),
    #[error("the peer's flow table has {theirs} sets, ours {ours}: flow_table_size must be the same on every balancer")]
    Geometry { ours: u32, theirs: u32 },
    #[error("replayed (sequence or instance already seen)")]
    Replay,
}

impl Reject {
    pub fn label(&self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::Auth => "auth",
            Reject::NotPeer(_) => "not_peer",
            Reject::Geometry { .. } => "table_size",
            Reject::Replay => "replay",
        }
    }
}

pub fn encode(key: &hmac::Key, m: &Message) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + ENTRY * m.entries.len() + TAG);
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.push(m.flags);
    b.extend_from_slice(&(m.entries.len() as u16).to_be_bytes());
    b.extend_from_slice(&m.sets.to_be_bytes());
    b.extend_from_slice(&m.instance.to_be_bytes());
    b.extend_from_slice(&m.seq.to_be_bytes());
    for e in &m.entries {
        b.extend_from_slice(&e.set.to_be_bytes());
        b.extend_from_slice(&e.entry.to_be_bytes());
        b.extend_from_slice(&e.backend.octets());
    }
    let tag = hmac::sign(key, &b);
    b.extend_from_slice(tag.as_ref());
    b
}

pub fn decode(key: &hmac::Key, b: &[u8]) -> Result<Message, Reject> {
    if b.len() < HEADER + TAG || &b[..4] != MAGIC || b[4] != VERSION {
        return Err(Reject::Malformed);
    }
    let (body, tag) = b.split_at(b.len() - TAG);
    hmac::verify(key, body, tag).map_err(|_| Reject::Auth)?;
    let u16_at = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let count = usize::from(u16_at(6));
    if count > MAX_ENTRIES || body.len() != HEADER + count * ENTRY {
        return Err(Reject::Malformed);
    }
    let entries = (0..count)
        .map(|k| {
            let at = HEADER + k * ENTRY;
            WireEntry { set: u32_at(at), entry: u64_at(at + 4), backend: Ipv4Addr::from(u32_at(at + 12)) }
        })
        .collect();
    Ok(Message { flags: body[5], sets: u32_at(8), instance: u64_at(12), seq: u64_at(20), entries })
}

/// What the sync has done, for `/status` and `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncStats {
    pub messages_sent: u64,
    pub entries_sent: u64,
    pub messages_received: u64,
    pub entries_received: u64,
    /// Received entries of flows this table did not hold.
    pub inserted: u64,
    /// Received entries that moved a flow this table held to another backend.
    pub updated: u64,
    /// Received entries naming a backend this balancer does not have.
    pub unknown_backend: u64,
    /// Full dumps sent to peers (one per peer start).
    pub full_dumps_sent: u64,
    /// Datagrams refused, by reason ([`Reject::label`]).
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub address: SocketAddr,
    /// Heard within the last few intervals.
    pub up: bool,
    /// Its whole table has arrived since it (or we) started.
    pub synced: bool,
    pub last_heard_ms: Option<u64>,
}

struct Peer {
    addr: SocketAddr,
    instance: Option<u64>,
    retired: Vec<u64>,
    last_seq: u64,
    /// Where the full dump to this peer goes on (an entry index), while one is due.
    full_cursor: Option<usize>,
    /// Its full dump to us has ended.
    synced: bool,
    last_heard: Option<Instant>,
}

/// The sync's state: the table, the copy of it as last sent, the peers.
pub struct Syncer {
    table: FlowTable,
    key: hmac::Key,
    instance: u64,
    seq: u64,
    snapshot: Vec<u64>,
    /// The newest time unit seen in the table: the time merged entries get (userspace cannot
    /// read jiffies; it only decides which entry a full set replaces).
    now_unit: Option<u16>,
    peers: Vec<Peer>,
    pub stats: SyncStats,
}

/// Whether time unit `a` is after `b` (16-bit units that wrap).
fn after(a: u16, b: u16) -> bool {
    (a.wrapping_sub(b) as i16) > 0
}

impl Syncer {
    pub fn new(table: FlowTable, secret: &[u8], peers: &[SocketAddr], instance: u64) -> Self {
        let snapshot = (0..table.len()).map(|i| table.load(i)).collect();
        Self {
            table,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            instance,
            seq: 0,
            snapshot,
            now_unit: None,
            peers: peers
                .iter()
                .map(|&addr| Peer { addr, instance: None, retired: Vec::new(), last_seq: 0, full_cursor: None, synced: false, last_heard: None })
                .collect(),
            stats: SyncStats::default(),
        }
    }

    pub fn peer_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.peers.iter().map(|p| p.addr)
    }

    pub fn peer_status(&self, stale: Duration) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|p| PeerStatus {
                address: p.addr,
                up: p.last_heard.is_some_and(|t| t.elapsed() < stale),
                synced: p.synced,
                last_heard_ms: p.last_heard.map(|t| t.elapsed().as_millis() as u64),
            })
            .collect()
    }

    /// The entries that changed since the last scan and are due to be sent (new, another
    /// backend, or a refresh); `addr_of` gives a backend index's address.
    pub fn scan(&mut self, addr_of: impl Fn(u32) -> Option<Ipv4Addr>) -> Vec<WireEntry> {
        let mut out = Vec::new();
        for i in 0..self.table.len() {
            let e = self.table.load(i);
            let s = self.snapshot[i];
            if e == s {
                continue;
            }
            if e == 0 {
                // Emptied (the table was cleared): nothing to send.
                self.snapshot[i] = 0;
                continue;
            }
            let t = entry_time(e);
            if self.now_unit.is_none_or(|n| after(t, n)) {
                self.now_unit = Some(t);
            }
            let moved = entry_tag(e) != entry_tag(s) || entry_backend(e) != entry_backend(s);
            if !moved && t.wrapping_sub(entry_time(s)) < REFRESH_UNITS {
                // A refresh of its time, not due yet: measured from the time last sent.
                continue;
            }
            self.snapshot[i] = e;
            if let Some(backend) = addr_of(entry_backend(e)) {
                out.push(WireEntry { set: (i / FLOW_WAYS) as u32, entry: e, backend });
            }
        }
        out
    }

    /// The next part of the full dump due to peer `p`, at most `max` entries, and whether it
    /// ends the dump; `None` when none is due.
    fn full_chunk(&mut self, p: usize, max: usize, addr_of: &impl Fn(u32) -> Option<Ipv4Addr>) -> Option<(Vec<WireEntry>, bool)> {
        let mut i = self.peers[p].full_cursor?;
        let mut out = Vec::new();
        while i < self.table.len() && out.len() < max {
            let e = self.table.load(i);
            if e != 0 {
                if let Some(backend) = addr_of(entry_backend(e)) {
                    out.push(WireEntry { set: (i / FLOW_WAYS) as u32, entry: e, backend });
                }
            }
            i += 1;
        }
        let done = i >= self.table.len();
        self.peers[p].full_cursor = if done { None } else { Some(i) };
        Some((out, done))
    }

    fn message(&mut self, flags: u8, entries: &[WireEntry]) -> Vec<u8> {
        self.seq += 1;
        let m = Message { flags, sets: self.table.sets(), instance: self.instance, seq: self.seq, entries: entries.to_vec() };
        self.stats.messages_sent += 1;
        self.stats.entries_sent += entries.len() as u64;
        encode(&self.key, &m)
    }

    /// The datagrams for one interval, per peer: `changed` (from [`Syncer::scan`]), the
    /// next part of a full dump if one is due, or else a heartbeat (no entries).
    pub fn datagrams(&mut self, changed: &[WireEntry], addr_of: impl Fn(u32) -> Option<Ipv4Addr>) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        for p in 0..self.peers.len() {
            let addr = self.peers[p].addr;
            let before = out.len();
            for chunk in changed.chunks(MAX_ENTRIES) {
                let d = self.message(0, chunk);
                out.push((addr, d));
            }
            if let Some((entries, done)) = self.full_chunk(p, FULL_DUMP_MESSAGES * MAX_ENTRIES, &addr_of) {
                let chunks: Vec<&[WireEntry]> = if entries.is_empty() { vec![&[]] } else { entries.chunks(MAX_ENTRIES).collect() };
                let last = chunks.len() - 1;
                for (k, chunk) in chunks.into_iter().enumerate() {
                    let d = self.message(if done && k == last { FLAG_FULL_END } else { 0 }, chunk);
                    out.push((addr, d));
                }
                if done {
                    self.stats.full_dumps_sent += 1;
                }
            }
            if out.len() == before {
                let d = self.message(0, &[]);
                out.push((addr, d));
            }
        }
        out
    }

    fn reject(&mut self, r: Reject) -> Reject {
        *self.stats.rejected.entry(r.label()).or_default() += 1;
        r
    }

    /// Takes a datagram from `from`: checks it, and merges its entries into the table;
    /// `index_of` gives the local index of a backend address. Returns the entries merged.
    pub fn receive(&mut self, from: SocketAddr, datagram: &[u8], index_of: impl Fn(Ipv4Addr) -> Option<u32>) -> Result<usize, Reject> {
        let m = match decode(&self.key, datagram) {
            Ok(m) => m,
            Err(r) => return Err(self.reject(r)),
        };
        let Some(p) = self.peers.iter().position(|p| p.addr.ip() == from.ip()) else {
            let ip = match from.ip() {
                std::net::IpAddr::V4(a) => a,
                std::net::IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
            };
            return Err(self.reject(Reject::NotPeer(ip)));
        };
        if m.sets != self.table.sets() {
            let r = Reject::Geometry { ours: self.table.sets(), theirs: m.sets };
            return Err(self.reject(r));
        }
        let peer = &mut self.peers[p];
        if peer.instance == Some(m.instance) {
            if m.seq <= peer.last_seq {
                return Err(self.reject(Reject::Replay));
            }
        } else {
            if peer.retired.contains(&m.instance) {
                return Err(self.reject(Reject::Replay));
            }
            // The peer started (or restarted): it gets our whole table, and sends its own.
            if let Some(old) = peer.instance.replace(m.instance) {
                if peer.retired.len() == RETIRED {
                    peer.retired.remove(0);
                }
                peer.retired.push(old);
            }
            peer.full_cursor = Some(0);
            peer.synced = false;
        }
        peer.last_seq = m.seq;
        peer.last_heard = Some(Instant::now());
        if m.flags & FLAG_FULL_END != 0 {
            peer.synced = true;
        }
        self.stats.messages_received += 1;
        self.stats.entries_received += m.entries.len() as u64;
        let mut merged = 0;
        for e in &m.entries {
            let tag = entry_tag(e.entry);
            if e.set >= self.table.sets() || tag == 0 {
                continue;
            }
            let Some(backend) = index_of(e.backend) else {
                self.stats.unknown_backend += 1;
                continue;
            };
            self.merge(e.set, tag, backend);
            merged += 1;
        }
        Ok(merged)
    }

    /// Pins the flow (`set`, `tag`) to `backend` in the table: its entry if the table holds
    /// it, else an empty way or the one seen longest ago, as the data plane chooses. The
    /// entry's time becomes the newest seen here, so a flow in use on a peer stays.
    fn merge(&mut self, set: u32, tag: u64, backend: u32) {
        let base = set as usize * FLOW_WAYS;
        let unit = self.now_unit.unwrap_or(0);
        let mut ways = FlowSet::default();
        for w in 0..FLOW_WAYS {
            ways.ways[w] = self.table.load(base + w);
            let e = ways.ways[w];
            if entry_tag(e) == tag {
                let t = if after(unit, entry_time(e)) { unit } else { entry_time(e) };
                let new = make_entry(tag, backend, t);
                if entry_backend(e) != backend {
                    self.stats.updated += 1;
                }
                if new != e {
                    self.table.store(base + w, new);
                }
                self.snapshot[base + w] = new;
                return;
            }
        }
        let w = ways.victim(u64::from(unit) << FLOW_TIME_SHIFT) & (FLOW_WAYS - 1);
        let new = make_entry(tag, backend, unit);
        self.table.store(base + w, new);
        self.snapshot[base + w] = new;
        self.stats.inserted += 1;
    }
}

/// A random instance id: a daemon's start, as its peers tell them apart.
pub fn new_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// Backend addresses by index and indexes by address (rebuilt each interval from the
/// daemon's topology).
#[derive(Default)]
pub struct Backends {
    pub by_index: Vec<Option<Ipv4Addr>>,
    pub by_addr: HashMap<Ipv4Addr, u32>,
}

impl Backends {
    pub fn new(list: impl IntoIterator<Item = (u32, Ipv4Addr)>) -> Self {
        let mut b = Backends::default();
        for (i, a) in list {
            if b.by_index.len() <= i as usize {
                b.by_index.resize(i as usize + 1, None);
            }
            b.by_index[i as usize] = Some(a);
            b.by_addr.insert(a, i);
        }
        b
    }

    pub fn addr(&self, i: u32) -> Option<Ipv4Addr> {
        self.by_index.get(i as usize).copied().flatten()
    }

    pub fn index(&self, a: Ipv4Addr) -> Option<u32> {
        self.by_addr.get(&a).copied()
    }
}

/// The sync as `/status` and `/metrics` show it.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub listen: SocketAddr,
    pub interval_ms: u64,
    pub instance: String,
    pub stats: SyncStats,
    pub peers: Vec<PeerStatus>,
}

/// The sync's UDP socket, with a receive buffer for a peer's full dump (a few megabytes).
pub fn bind(listen: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(listen)?;
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on our own socket with an int option.
        let rc = unsafe {
            libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, opt, (&size as *const libc::c_int).cast(), core::mem::size_of::<libc::c_int>() as libc::socklen_t)
        };
        if rc == 0 {
            break;
        }
    }
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket)
}

/// Runs the sync: every `interval`, and at once when `now` is notified, sends what changed
/// (and heartbeats, and full dumps that are due); in between takes the peers' datagrams.
/// `backends` gives the daemon's backends (read each round), `report` receives the state
/// after each round.
pub async fn serve(
    socket: tokio::net::UdpSocket,
    mut syncer: Syncer,
    listen: SocketAddr,
    interval: Duration,
    now: std::sync::Arc<tokio::sync::Notify>,
    backends: impl Fn() -> Backends,
    report: impl Fn(SyncReport),
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stale = (interval * 3).max(Duration::from_secs(1));
    let mut known = backends();
    let mut buf = vec![0u8; 2048];
    let mut warned: HashMap<&'static str, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = async { tokio::select! { _ = tick.tick() => {}, _ = now.notified() => {} } } => {
                known = backends();
                let changed = syncer.scan(|i| known.addr(i));
                for (to, d) in syncer.datagrams(&changed, |i| known.addr(i)) {
                    if let Err(e) = socket.send_to(&d, to).await {
                        let now = Instant::now();
                        if warned.get("send").is_none_or(|t| now.duration_since(*t) > Duration::from_secs(10)) {
                            warned.insert("send", now);
                            tracing::warn!(peer = %to, error = %e, "flow sync: cannot send to a peer");
                        }
                    }
                }
                report(SyncReport {
                    listen,
                    interval_ms: interval.as_millis() as u64,
                    instance: format!("{:016x}", syncer.instance),
                    stats: syncer.stats.clone(),
                    peers: syncer.peer_status(stale),
                });
            }
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let was_synced: Vec<bool> = syncer.peers.iter().map(|p| p.synced).collect();
                match syncer.receive(from, &buf[..n], |a| known.index(a)) {
                    Ok(_) => {
                        for (p, before) in syncer.peers.iter().zip(was_synced) {
                            if p.synced && !before {
                                tracing::info!(peer = %p.addr, "flow sync: the peer's whole table has arrived");
                            }
                        }
                    }
                    Err(r) => {
                        let now = Instant::now();
                        if warned.get(r.label()).is_none_or(|t| now.duration_since(*t) > Duration::from_secs(10)) {
                            warned.insert(r.label(), now);
                            tracing::warn!(from = %from, reason = %r, "flow sync: datagram refused (counted in lb_sync_rejected_total; logged at most every 10 s)");
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::flow::{FlowKey, FlowSlot};

    const SECRET: &[u8] = b"a shared secret of the balancers";
    const SETS: u32 = 64;

    fn a(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, i)
    }

    fn peer(i: u8) -> SocketAddr {
        SocketAddr::new(a(i).into(), 7946)
    }

    /// Balancer `me` (of 1 and 2): its table, its peer the other one. Backend addresses
    /// .11 and .12 have indexes 0 and 1 on balancer 1, 1 and 0 on balancer 2.
    fn balancer(me: u8) -> (Syncer, Backends) {
        let other = 3 - me;
        let backends = if me == 1 { Backends::new([(0, a(11)), (1, a(12))]) } else { Backends::new([(1, a(11)), (0, a(12))]) };
        (Syncer::new(FlowTable::in_memory(SETS), SECRET, &[peer(other)], u64::from(me) * 1000), backends)
    }

    fn slot(n: u8) -> FlowSlot {
        let key = FlowKey { src: [192, 0, 2, n], dst: [10, 77, 100, 1], sport: [0x9c, n], dport: [0, 80], proto: 6, _pad1: 0, _pad2: 0 };
        FlowSlot::new(key.hash64(flow_seed(SECRET)), SETS)
    }

    /// Pins flow `n` to backend `idx` as the data plane would, at time unit `unit`.
    fn pin(s: &Syncer, n: u8, idx: u32, unit: u16) {
        let sl = slot(n);
        let base = sl.set as usize * FLOW_WAYS;
        let mut set = FlowSet::default();
        for w in 0..FLOW_WAYS {
            set.ways[w] = s.table.load(base + w);
        }
        let w = set.find(&sl).map(|(w, _)| w).unwrap_or_else(|| set.victim(u64::from(unit) << FLOW_TIME_SHIFT));
        s.table.store(base + w, sl.entry(idx, u64::from(unit) << FLOW_TIME_SHIFT));
    }

    /// Where the table pins flow `n`.
    fn pinned(s: &Syncer, n: u8) -> Option<u32> {
        let sl = slot(n);
        let base = sl.set as usize * FLOW_WAYS;
        let mut set = FlowSet::default();
        for w in 0..FLOW_WAYS {
            set.ways[w] = s.table.load(base + w);
        }
        set.find(&sl).map(|(_, e)| entry_backend(e))
    }

    /// One interval of `from`, delivered to `to`; returns the datagrams sent.
    fn tick(from: &mut (Syncer, Backends), to: &mut (Syncer, Backends), from_addr: u8) -> usize {
        let changed = from.0.scan(|i| from.1.addr(i));
        let out = from.0.datagrams(&changed, |i| from.1.addr(i));
        for (_, d) in &out {
            to.0.receive(peer(from_addr), d, |x| to.1.index(x)).expect("accepted");
        }
        out.len()
    }

    #[test]
    fn messages_round_trip_and_any_changed_byte_is_refused() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
        let m = Message { flags: FLAG_FULL_END, sets: 65_536, instance: 7, seq: 9, entries: vec![WireEntry { set: 3, entry: 0x1234_5678_9abc_def0, backend: a(11) }; MAX_ENTRIES] };
        let b = encode(&key, &m);
        assert_eq!(b.len(), HEADER + MAX_ENTRIES * ENTRY + TAG);
        assert!(b.len() <= 1400);
        assert_eq!(decode(&key, &b), Ok(m));
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(decode(&key, &bad).is_err(), "byte {i} changed and accepted");
        }
        assert_eq!(decode(&hmac::Key::new(hmac::HMAC_SHA256, b"another secret!!"), &b), Err(Reject::Auth));
        assert_eq!(decode(&key, &b[..20]), Err(Reject::Malformed));
        assert_eq!(decode(&key, &[]), Err(Reject::Malformed));
    }

    #[test]
    fn flows_pinned_on_one_balancer_are_pinned_alike_on_the_other() {
        let (mut one, mut two) = (balancer(1), balancer(2));
        // First contact: heartbeats both ways, then each sends its whole (empty) table.
        tick(&mut one, &mut two, 1);
        tick(&mut two, &mut one, 2);
        for n in 0..20 {
            pin(&one.0, n, u32::from(n % 2), 100);
        }
        tick(&mut one, &mut two, 1);
        for n in 0..20 {
            // Backend .11 is index 0 on one, 1 on two.
            assert_eq!(pinned(&two.0, n), Some(1 - u32::from(n % 2)), "flow {n}");
        }
        assert_eq!(two.0.stats.inserted, 20);
        // Merged entries are not sent back, and unchanged ones not again.
        assert!(two.0.scan(|i| two.1.addr(i)).is_empty());
        assert!(one.0.scan(|i| one.1.addr(i)).is_empty());
        // A flow moved to the other backend on one (its backend died) moves on two.
        pin(&one.0, 4, 1, 101);
        tick(&mut one, &mut two, 1);
        assert_eq!(pinned(&two.0, 4), Some(0));
        assert_eq!(two.0.stats.updated, 1);
        // A refresh only once the time moved REFRESH_UNITS past the time sent.
        pin(&one.0, 5, 1, 101);
        assert!(one.0.scan(|i| one.1.addr(i)).is_empty());
        pin(&one.0, 5, 1, 100 + REFRESH_UNITS);
        assert_eq!(one.0.scan(|i| one.1.addr(i)).len(), 1);
    }

    #[test]
    fn a_peer_that_starts_gets_the_whole_table() {
        let (mut one, mut two) = (balancer(1), balancer(2));
        for n in 0..200 {
            pin(&one.0, n, u32::from(n % 2), 50);
        }
        // one's flows predate the sync (as after a restart that kept the table): they
        // reach two through the full dump that two's first message asks for.
        one.0.snapshot = (0..one.0.table.len()).map(|i| one.0.table.load(i)).collect();
        tick(&mut one, &mut two, 1);
        assert_eq!(two.0.stats.inserted, 0);
        assert!(!two.0.peer_status(Duration::from_secs(1))[0].synced);
        tick(&mut two, &mut one, 2);
        tick(&mut one, &mut two, 1);
        tick(&mut two, &mut one, 2);
        let held = (0..200).filter(|&n| pinned(&two.0, n) == Some(1 - u32::from(n % 2))).count();
        // A set overflows now and then (64 sets of 8 ways, 200 flows): nearly all arrive.
        assert!(held >= 195, "{held} of 200 flows arrived");
        assert!(two.0.peer_status(Duration::from_secs(1))[0].synced);
        assert_eq!(one.0.stats.full_dumps_sent, 1);
        // two restarts: a new instance, an empty table, and one sends everything again.
        let mut two = balancer(2);
        two.0.instance = 2001;
        tick(&mut two, &mut one, 2);
        tick(&mut one, &mut two, 1);
        assert_eq!(one.0.stats.full_dumps_sent, 2);
        assert!((0..200).filter(|&n| pinned(&two.0, n).is_some()).count() >= 195);
    }

    #[test]
    fn strangers_replays_and_other_tables_are_refused() {
        let (mut one, mut two) = (balancer(1), balancer(2));
        let changed = one.0.scan(|i| one.1.addr(i));
        let out = one.0.datagrams(&changed, |i| one.1.addr(i));
        let d = &out[0].1;
        assert_eq!(two.0.receive(peer(9), d, |x| two.1.index(x)), Err(Reject::NotPeer(a(9))));
        assert_eq!(two.0.receive(peer(1), d, |x| two.1.index(x)), Ok(0));
        assert_eq!(two.0.receive(peer(1), d, |x| two.1.index(x)), Err(Reject::Replay));
        let mut big = (Syncer::new(FlowTable::in_memory(SETS * 2), SECRET, &[peer(2)], 5), Backends::default());
        let changed = big.0.scan(|_| None);
        let out = big.0.datagrams(&changed, |_| None);
        assert_eq!(two.0.receive(peer(1), &out[0].1, |x| two.1.index(x)), Err(Reject::Geometry { ours: SETS, theirs: SETS * 2 }));
        assert_eq!(two.0.stats.rejected.values().sum::<u64>(), 3);
        // An entry naming a backend we do not have is skipped and counted.
        pin(&one.0, 1, 0, 10);
        let mut one_odd = (one.0, Backends::new([(0, a(99))]));
        tick(&mut one_odd, &mut two, 1);
        assert_eq!(two.0.stats.unknown_backend, 1);
        assert_eq!(pinned(&two.0, 1), None);
    }

    #[test]
    fn the_seed_depends_on_the_secret_alone() {
        assert_eq!(flow_seed(SECRET), flow_seed(SECRET));
        assert_ne!(flow_seed(SECRET), flow_seed(b"another secret of the balancers"));
        assert_eq!(flow_seed(SECRET) & 1, 1);
    }
}
