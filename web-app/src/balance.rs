//! New connections in turn over the HTTP threads (`lb-ebpf/src/bin/webreuse.rs`).
//!
//! Each HTTP thread has its own `SO_REUSEPORT` socket per listening address, and the kernel
//! picks among a group's sockets by a hash of the connection's 4-tuple: with few
//! connections the split is uneven (32 keep-alive connections over 2 threads: 20/12 is
//! common), and the connections of the busier thread wait longer. An `sk_reuseport` program
//! on the group hands each new connection to the next socket in turn instead (as HAProxy's
//! round robin does; nginx gets a similar spread from its idle workers accepting first).
//!
//! Loading needs CAP_BPF (or root): without it the kernel's hash stays, and web-app says so
//! once. Written with the program rather than by accepting on one thread and handing
//! connections over: that would cost a cross-thread wakeup per connection.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use aya::maps::{Array, MapData, ReusePortSockArray};
use aya::programs::SkReuseport;
use aya::Ebpf;

/// One listening address's group.
pub struct Balancer {
    ebpf: Mutex<Ebpf>,
    maps: Mutex<(ReusePortSockArray<MapData>, Array<MapData, u32>)>,
    next: AtomicU32,
}

impl Balancer {
    pub fn load() -> anyhow::Result<Balancer> {
        let mut ebpf = Ebpf::load(object())?;
        let take = |e: &mut Ebpf, name: &str| e.take_map(name).ok_or_else(|| anyhow::anyhow!("map {name} missing from the object"));
        let socks = ReusePortSockArray::try_from(take(&mut ebpf, "WEB_LISTENERS")?)?;
        let rr = Array::try_from(take(&mut ebpf, "WEB_RR")?)?;
        let prog: &mut SkReuseport = ebpf.program_mut("web_pick").ok_or_else(|| anyhow::anyhow!("program web_pick missing"))?.try_into()?;
        prog.load()?;
        Ok(Balancer { ebpf: Mutex::new(ebpf), maps: Mutex::new((socks, rr)), next: AtomicU32::new(0) })
    }

    /// Adds a thread's socket of the group (listening already); the first one attaches the
    /// program to the group. New connections go to the sockets added so far, in turn.
    pub fn register(&self, socket: &(impl AsFd + AsRawFd)) -> anyhow::Result<()> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.0.set(index, socket, 0)?;
        maps.1.set(0, index + 1, 0)?;
        if index == 0 {
            let ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            let prog: &SkReuseport = ebpf.program("web_pick").ok_or_else(|| anyhow::anyhow!("program web_pick missing"))?.try_into()?;
            prog.attach(socket.as_fd())?;
        }
        Ok(())
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

    /// 32 connections to a group of two sockets: 16 each (the kernel's hash rarely splits
    /// them evenly), and 3 sockets take 11/11/10 of 32.
    #[test]
    fn new_connections_go_to_the_sockets_in_turn() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        for sockets in [2usize, 3] {
            let balancer = match Balancer::load() {
                Ok(b) => b,
                Err(e) => {
                    assert!(std::env::var_os("CI").is_none(), "the sk_reuseport program did not load: {e:#}");
                    eprintln!("skipping: the sk_reuseport program did not load (needs CAP_BPF): {e:#}");
                    return;
                }
            };
            let first = reuseport_listener("127.0.0.1:0".parse().unwrap());
            let addr = first.local_addr().unwrap();
            let mut group = vec![first];
            for _ in 1..sockets {
                group.push(reuseport_listener(addr));
            }
            for l in &group {
                balancer.register(l).unwrap();
            }
            let clients: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(addr).unwrap()).collect();
            let mut accepted = vec![0usize; sockets];
            for (i, l) in group.iter().enumerate() {
                while l.accept().is_ok() {
                    accepted[i] += 1;
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
}
