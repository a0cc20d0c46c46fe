//! The routing view shared between the monitor (which publishes it) and client sessions
//! (which read it per statement). A `tokio::sync::watch` channel: readers see the latest
//! value without blocking the monitor, and can wait for a change (failover).

use std::net::SocketAddr;

use tokio::sync::watch;

/// Where statements go right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    /// The writable primary; `None` while there is none (failover in progress).
    pub primary: Option<SocketAddr>,
    /// A replica fit for reads (reachable, replicating, lag within bounds); `None` sends
    /// reads to the primary.
    pub replica: Option<SocketAddr>,
    /// Bumped on every change of `primary`, so sessions know to reconnect their writers.
    pub generation: u64,
    /// Backends that failed the monitor's last `fail_after` checks in a row (dead, or hung:
    /// the checks time out). A session stops waiting for an answer from one of them.
    pub down: Vec<SocketAddr>,
}

/// Which role a session's backend connection plays, for [`Routing::takes_out`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRole {
    Primary,
    Replica,
}

impl Routing {
    /// Whether this view takes `addr` out of `role`: a primary the view no longer names (the
    /// monitor declared it down, or a failover replaced it), or a replica the monitor finds
    /// down. A replica that only left the view for reads (lag, replication stopped) is not
    /// taken out: a read that runs there may finish.
    pub fn takes_out(&self, addr: SocketAddr, role: ConnRole) -> bool {
        match role {
            ConnRole::Primary => self.primary != Some(addr),
            ConnRole::Replica => self.down.contains(&addr),
        }
    }
}

pub type Publisher = watch::Sender<Routing>;
pub type Subscriber = watch::Receiver<Routing>;

pub fn channel(initial: Routing) -> (Publisher, Subscriber) {
    watch::channel(initial)
}
