//! New connections to the HTTP thread with the fewest open connections, in turn among
//! equals (`lb-ebpf/src/bin/webreuse.rs`).
//!
//! Each HTTP thread has its own `SO_REUSEPORT` socket per listening address, and the kernel
//! picks among a group's sockets by a hash of the connection's 4-tuple: with few
//! connections the split is uneven (32 keep-alive connections over 2 threads: 20/12 is
//! common), and the connections of the busier thread wait longer. An `sk_reuseport` program
//! on the group picks instead, by the counts of open connections each thread keeps in a
//! shared (mmapped) map: long connections end up evenly spread, and a short one goes to a
//! thread that has nothing to do rather than behind another's work (as with nginx's one
//! accept queue, which its idle workers take from first; HAProxy's `leastconn`). A thread
//! that is not asleep (its runtime parked) counts one more, so among equals a new
//! connection goes to a thread waiting for work rather than behind a busy one.
//!
//! Loading needs CAP_BPF (or root): without it the kernel's hash stays, and web-app says so
//! once. Written with the program rather than by accepting on one thread and handing
//! connections over: that would cost a cross-thread wakeup per connection.

use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use aya::maps::{Array, Map, MapData, ReusePortSockArray};
use aya::programs::SkReuseport;
use aya::Ebpf;

/// One listening address's group.
pub struct Balancer {
    ebpf: Mutex<Ebpf>,
    maps: Mutex<(ReusePortSockArray<MapData>, Array<MapData, u32>)>,
    loads: Loads,
    next: AtomicU32,
}

/// `WEB_LOAD`'s entries (u64) per socket: a cache line, the program's `LOAD_STRIDE`.
const LOAD_STRIDE: usize = 8;
/// Sockets per group (the program's map sizes).
const MAX_SOCKETS: usize = 256;

/// `WEB_LOAD` mapped into memory: each socket's count of open connections, which its thread
/// keeps and the program reads.
struct Loads {
    counters: NonNull<AtomicU64>,
    /// The map's fd, open as long as the mapping.
    _map: MapData,
}

// SAFETY: shared memory living as long as this value, used only through atomics.
unsafe impl Send for Loads {}
// SAFETY: as above.
unsafe impl Sync for Loads {}

impl Loads {
    const BYTES: usize = MAX_SOCKETS * LOAD_STRIDE * std::mem::size_of::<u64>();

    fn map(map: Map) -> anyhow::Result<Loads> {
        let Map::Array(map) = map else { anyhow::bail!("WEB_LOAD is not an array") };
        // SAFETY: maps the whole array (created BPF_F_MMAPABLE) shared and writable;
        // unmapped in Drop.
        let at = unsafe {
            libc::mmap(std::ptr::null_mut(), Self::BYTES, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, map.fd().as_fd().as_raw_fd(), 0)
        };
        if at == libc::MAP_FAILED {
            anyhow::bail!("mmap of WEB_LOAD: {}", std::io::Error::last_os_error());
        }
        let counters = NonNull::new(at.cast()).ok_or_else(|| anyhow::anyhow!("mmap of WEB_LOAD returned null"))?;
        Ok(Loads { counters, _map: map })
    }

    /// Word `word` of socket `index`'s line: 0 its open connections, 1 whether its thread
    /// is asleep.
    fn of(&self, index: u32, word: usize) -> &AtomicU64 {
        let index = index as usize;
        assert!(index < MAX_SOCKETS && word < LOAD_STRIDE);
        // SAFETY: in bounds of the mapping, aligned (page-aligned base, u64 entries), and
        // only ever accessed atomically (the program reads them with single loads).
        unsafe { self.counters.as_ptr().add(index * LOAD_STRIDE + word).as_ref().expect("mapped") }
    }
}

impl Drop for Loads {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`; no reference to it outlives `self`.
        unsafe { libc::munmap(self.counters.as_ptr().cast(), Self::BYTES) };
    }
}

impl Balancer {
    pub fn load() -> anyhow::Result<Balancer> {
        let mut ebpf = Ebpf::load(object())?;
        let take = |e: &mut Ebpf, name: &str| e.take_map(name).ok_or_else(|| anyhow::anyhow!("map {name} missing from the object"));
        let socks = ReusePortSockArray::try_from(take(&mut ebpf, "WEB_LISTENERS")?)?;
        let rr = Array::try_from(take(&mut ebpf, "WEB_RR")?)?;
        let loads = Loads::map(take(&mut ebpf, "WEB_LOAD")?)?;
        let prog: &mut SkReuseport = ebpf.program_mut("web_pick").ok_or_else(|| anyhow::anyhow!("program web_pick missing"))?.try_into()?;
        prog.load()?;
        Ok(Balancer { ebpf: Mutex::new(ebpf), maps: Mutex::new((socks, rr)), loads, next: AtomicU32::new(0) })
    }

    /// Adds a thread's socket of the group (listening already); the first one attaches the
    /// program to the group. New connections go to the sockets added so far. Returns the
    /// socket's index, whose [`Balancer::open_connections`] its thread keeps.
    pub fn register(&self, socket: &(impl AsFd + AsRawFd)) -> anyhow::Result<u32> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        if index as usize >= MAX_SOCKETS {
            anyhow::bail!("more than {MAX_SOCKETS} sockets in one group");
        }
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.0.set(index, socket, 0)?;
        maps.1.set(0, index + 1, 0)?;
        if index == 0 {
            let ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            let prog: &SkReuseport = ebpf.program("web_pick").ok_or_else(|| anyhow::anyhow!("program web_pick missing"))?.try_into()?;
            prog.attach(socket.as_fd())?;
        }
        Ok(index)
    }

    /// The count of open connections of socket `index` (see [`Balancer::register`]), which
    /// the program reads: its thread adds one per connection accepted, takes one per
    /// connection ended.
    pub fn open_connections(&self, index: u32) -> &AtomicU64 {
        self.loads.of(index, 0)
    }

    /// Says whether the thread of socket `index` sleeps for want of work (its runtime
    /// parks): the program prefers such a thread among equally loaded ones.
    pub fn set_asleep(&self, index: u32, asleep: bool) {
        self.loads.of(index, 1).store(asleep.into(), Ordering::Relaxed);
    }
}

/// The `webreuse` program and maps, built by build.rs.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/webreuse"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener, TcpStream};

    fn reuseport_listener(addr: SocketAddr) -> TcpListener {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseport(true).unwrap();
        socket.bind(addr).unwrap();
        let l = socket.listen(1024).unwrap().into_std().unwrap();
        l.set_nonblocking(true).unwrap();
        l
    }

    /// A balancer, or `None` (a skip, a failure under CI) when it cannot load.
    fn balancer() -> Option<Balancer> {
        match Balancer::load() {
            Ok(b) => Some(b),
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "the sk_reuseport program did not load: {e:#}");
                eprintln!("skipping: the sk_reuseport program did not load (needs CAP_BPF): {e:#}");
                None
            }
        }
    }

    /// A group of `sockets` listening sockets on one new address, registered with `balancer`.
    fn group(balancer: &Balancer, sockets: usize) -> (SocketAddr, Vec<TcpListener>) {
        let first = reuseport_listener("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap();
        let mut group = vec![first];
        for _ in 1..sockets {
            group.push(reuseport_listener(addr));
        }
        for (i, l) in group.iter().enumerate() {
            assert_eq!(balancer.register(l).unwrap(), i as u32);
        }
        (addr, group)
    }

    /// Which socket of `group` accepted the one connection made.
    fn accepted_by(group: &[TcpListener]) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let found: Vec<usize> = (0..group.len()).filter(|&i| group[i].accept().is_ok()).collect();
            assert!(found.len() <= 1, "accepted by {found:?}");
            if let Some(&i) = found.first() {
                return i;
            }
            assert!(std::time::Instant::now() < deadline, "no socket accepted the connection");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// 32 connections to a group of two sockets with equal loads: 16 each (the kernel's
    /// hash rarely splits them evenly), and 3 sockets take 11/11/10 of 32.
    #[test]
    fn new_connections_go_to_the_sockets_in_turn() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        for sockets in [2usize, 3] {
            let Some(balancer) = balancer() else { return };
            let (addr, group) = group(&balancer, sockets);
            let clients: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(addr).unwrap()).collect();
            let mut accepted = vec![0usize; sockets];
            // Bounded: a handshake's last ACK may be processed just after connect() returned.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while accepted.iter().sum::<usize>() < 32 && std::time::Instant::now() < deadline {
                for (i, l) in group.iter().enumerate() {
                    while l.accept().is_ok() {
                        accepted[i] += 1;
                    }
                }
                if accepted.iter().sum::<usize>() < 32 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            let mut want = vec![32 / sockets; sockets];
            for w in want.iter_mut().take(32 % sockets) {
                *w += 1;
            }
            let mut got = accepted.clone();
            got.sort_unstable_by(|a, b| b.cmp(a));
            assert_eq!(got, want, "{sockets} sockets: accepted {accepted:?}");
            drop(clients);
        }
    }

    /// New connections go to the socket with the fewest open connections (as its thread
    /// counts them), in turn among equals; counts that change steer the next ones.
    #[test]
    fn new_connections_go_to_the_least_loaded_socket() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        let Some(balancer) = balancer() else { return };
        let (addr, group) = group(&balancer, 3);
        let load = |i: u32| balancer.open_connections(i);
        let mut clients = Vec::new();
        let mut connect = || {
            clients.push(TcpStream::connect(addr).unwrap());
            accepted_by(&group)
        };
        load(0).store(5, Ordering::Relaxed);
        load(1).store(2, Ordering::Relaxed);
        load(2).store(7, Ordering::Relaxed);
        assert!((0..6).all(|_| connect() == 1), "socket 1 has the fewest");
        load(1).store(9, Ordering::Relaxed);
        assert_eq!(connect(), 0);
        // Equal loads: in turn.
        for i in 0..3 {
            load(i).store(5, Ordering::Relaxed);
        }
        let picked: Vec<usize> = (0..6).map(|_| connect()).collect();
        assert!((0..3).all(|i| picked.iter().filter(|&&p| p == i).count() == 2), "{picked:?}");
        // As threads would count: each accepted connection adds one to its socket's load,
        // so a burst of 30 spreads evenly even from unequal starts.
        for (i, start) in [4u64, 0, 1].into_iter().enumerate() {
            load(i as u32).store(start, Ordering::Relaxed);
        }
        for _ in 0..30 {
            let i = connect();
            load(i as u32).fetch_add(1, Ordering::Relaxed);
        }
        let mut loads: Vec<u64> = (0..3).map(|i| load(i).load(Ordering::Relaxed)).collect();
        loads.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(loads, [12, 12, 11]);
        // A thread asleep counts one connection fewer than a busy one: with equal counts it
        // gets every new connection, with one more open it shares them in turn, with two
        // more it gets none.
        for i in 0..3 {
            load(i).store(5, Ordering::Relaxed);
        }
        balancer.set_asleep(2, true);
        assert!((0..6).all(|_| connect() == 2), "socket 2's thread is asleep");
        load(2).store(6, Ordering::Relaxed);
        let picked: Vec<usize> = (0..6).map(|_| connect()).collect();
        assert!((0..3).all(|i| picked.contains(&i)), "{picked:?}");
        load(2).store(7, Ordering::Relaxed);
        assert!((0..6).all(|_| connect() != 2));
        balancer.set_asleep(2, false);
    }
}
