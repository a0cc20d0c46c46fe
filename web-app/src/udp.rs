//! UDP echo: every datagram is answered, to its sender, with `<node> ` followed by the
//! received payload, so a client behind the load balancer can tell which node answered.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::UdpSocket;
use tracing::{debug, info};

/// Largest UDP payload over IPv4; longer replies are truncated to it.
const MAX_DATAGRAM: usize = 65_507;

/// A bound, not yet running UDP echo service.
pub struct UdpEcho {
    socket: UdpSocket,
    local_addr: SocketAddr,
    prefix: Vec<u8>,
}

impl UdpEcho {
    /// Binds `addr`; replies will start with `node` and a space.
    pub async fn bind(addr: SocketAddr, node: &str) -> anyhow::Result<UdpEcho> {
        let socket = UdpSocket::bind(addr).await.with_context(|| format!("binding UDP echo on {addr}"))?;
        let local_addr = socket.local_addr().context("UDP echo address")?;
        Ok(UdpEcho { socket, local_addr, prefix: format!("{node} ").into_bytes() })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Answers datagrams until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let UdpEcho { socket, local_addr, prefix } = self;
        // The reply is built in place: the prefix once, each payload received right after it.
        let mut buf = vec![0u8; prefix.len() + 65_536];
        buf[..prefix.len()].copy_from_slice(&prefix);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                received = socket.recv_from(&mut buf[prefix.len()..]) => {
                    let (len, peer) = match received {
                        Ok(received) => received,
                        Err(e) => {
                            debug!(error = %e, "UDP receive failed");
                            continue;
                        }
                    };
                    let reply = &buf[..(prefix.len() + len).min(MAX_DATAGRAM)];
                    if let Err(e) = socket.send_to(reply, peer).await {
                        debug!(%peer, error = %e, "UDP echo reply failed");
                    }
                }
            }
        }
        info!(%local_addr, "UDP echo stopped");
        Ok(())
    }
}
