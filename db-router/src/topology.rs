//! The routing view shared between the monitor (which publishes it) and client sessions
//! (which read it per statement). A `tokio::sync::watch` channel: readers see the latest
//! value without blocking the monitor, and can wait for a change (failover). The
//! [`Watchlist`] ends sessions' waits on servers the view takes out.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError, Weak,
    },
};

use tokio::sync::{watch, Notify};

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

/// The backend connections sessions wait on, so that a wait for an answer ends when the view
/// takes the connection's server out of its role ([`Routing::takes_out`]). One task follows
/// the view and flags the connections it takes out; each connection has its own flag and
/// wakeup, so a wait takes no lock shared with other sessions. (A `watch` receiver in every
/// wait would register with the channel's one waiter list on each read from a server: a lock
/// that all sessions' reads would contend on.)
pub struct Watchlist {
    routing: Subscriber,
    entries: Mutex<Vec<Weak<Watched>>>,
    started: AtomicBool,
}

/// One connection on the [`Watchlist`].
pub struct Watched {
    addr: SocketAddr,
    role: ConnRole,
    taken: AtomicBool,
    wake: Notify,
}

impl Watchlist {
    pub fn new(routing: Subscriber) -> Arc<Watchlist> {
        Arc::new(Watchlist { routing, entries: Mutex::new(Vec::new()), started: AtomicBool::new(false) })
    }

    /// Puts a connection to `addr`, in `role`, on the list (starting the task that follows the
    /// view on first use: call it on a tokio runtime). Dropping the returned handle takes the
    /// connection off.
    pub fn watch(self: &Arc<Self>, addr: SocketAddr, role: ConnRole) -> Arc<Watched> {
        if !self.started.swap(true, Ordering::AcqRel) {
            let (list, mut routing) = (Arc::downgrade(self), self.routing.clone());
            tokio::spawn(async move {
                while routing.changed().await.is_ok() {
                    let Some(list) = list.upgrade() else { return };
                    let view = routing.borrow_and_update().clone();
                    list.flag(&view);
                }
            });
        }
        let w = Arc::new(Watched { addr, role, taken: AtomicBool::new(false), wake: Notify::new() });
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if entries.len() >= 64 && entries.len().is_power_of_two() {
                entries.retain(|e| e.strong_count() > 0);
            }
            entries.push(Arc::downgrade(&w));
        }
        // After the push: a change the task handled before it saw this entry is already the
        // current view here.
        if self.routing.borrow().takes_out(addr, role) {
            w.taken.store(true, Ordering::Release);
        }
        w
    }

    fn flag(&self, view: &Routing) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|e| e.strong_count() > 0);
        for w in entries.iter().filter_map(Weak::upgrade) {
            if view.takes_out(w.addr, w.role) {
                w.taken.store(true, Ordering::Release);
                w.wake.notify_waiters();
            }
        }
    }
}

impl Watched {
    /// Resolves once the view has taken this connection's server out of its role.
    pub async fn taken_out(&self) {
        loop {
            // Created before the check: it sees a `notify_waiters` that comes after.
            let woken = self.wake.notified();
            if self.taken.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watched_connections_are_flagged_when_the_view_takes_their_server_out() {
        let (p, r) = ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let view = Routing { primary: Some(p), replica: Some(r), generation: 1, down: Vec::new() };
        let (publisher, routing) = channel(view.clone());
        let list = Watchlist::new(routing);
        let primary = list.watch(p, ConnRole::Primary);
        let replica = list.watch(r, ConnRole::Replica);
        let soon = std::time::Duration::from_millis(100);
        // The replica only leaves the read view (lag): its reads may finish.
        publisher.send_replace(Routing { replica: None, ..view.clone() });
        assert!(tokio::time::timeout(soon, replica.taken_out()).await.is_err());
        publisher.send_replace(Routing { replica: None, down: vec![r], ..view.clone() });
        tokio::time::timeout(soon * 50, replica.taken_out()).await.expect("the replica is down");
        assert!(tokio::time::timeout(soon, primary.taken_out()).await.is_err(), "the primary is still the primary");
        publisher.send_replace(Routing { primary: None, generation: 2, ..view.clone() });
        tokio::time::timeout(soon * 50, primary.taken_out()).await.expect("no primary published");
        // Registered after the change: flagged at once.
        assert!(tokio::time::timeout(soon, list.watch(p, ConnRole::Primary).taken_out()).await.is_ok());
        // Dropped handles leave the list.
        drop((primary, replica));
        publisher.send_replace(view);
        tokio::time::sleep(soon).await;
        assert!(list.entries.lock().unwrap().is_empty(), "the task's next pass dropped them");
    }
}
