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
}

pub type Publisher = watch::Sender<Routing>;
pub type Subscriber = watch::Receiver<Routing>;

pub fn channel(initial: Routing) -> (Publisher, Subscriber) {
    watch::channel(initial)
}
