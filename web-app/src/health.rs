//! Readiness of the node, as `/healthz` reports it: 200 `ok`, or 503 with the first reason
//! found, in this order:
//! - `draining`: an operator asked the node to drain (SIGUSR1; SIGUSR2 undrains, or
//!   [`crate::NodeHandle::set_draining`]). While draining, HTTP/1.1 responses carry
//!   `Connection: close` and HTTP/2 connections get a GOAWAY, so clients move elsewhere
//!   without a failed request; requests are still answered.
//! - `starting: ...`: the storage schema is not migrated yet (only with `--db-url`).
//! - `storage unreachable: ...`: the last storage ping (every second, bounded by a timeout)
//!   failed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::watch;

/// Shared readiness state. Cheap to read on every request.
#[derive(Debug)]
pub struct Health {
    draining: AtomicBool,
    drain_tx: watch::Sender<bool>,
    starting: Mutex<Option<String>>,
    storage: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            draining: AtomicBool::new(false),
            drain_tx: watch::channel(false).0,
            starting: Mutex::new(None),
            storage: Mutex::new(None),
        }
    }
}

impl Health {
    /// `Ok` when ready, else the reason.
    pub fn check(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".to_owned());
        }
        if let Some(reason) = self.starting.lock().unwrap().as_ref() {
            return Err(format!("starting: {reason}"));
        }
        if let Some(error) = self.storage.lock().unwrap().as_ref() {
            return Err(format!("storage unreachable: {error}"));
        }
        Ok(())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts or stops draining; connections are told through [`Health::drain_watch`].
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
        self.drain_tx.send_replace(draining);
    }

    /// Changes whenever draining starts or stops.
    pub fn drain_watch(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    /// `Some(reason)` while starting, `None` once started.
    pub fn set_starting(&self, reason: Option<String>) {
        *self.starting.lock().unwrap() = reason;
    }

    /// The result of the last storage ping.
    pub fn set_storage(&self, result: Result<(), String>) {
        *self.storage.lock().unwrap() = result.err();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_in_order() {
        let health = Health::default();
        assert_eq!(health.check(), Ok(()));
        health.set_storage(Err("timed out".into()));
        assert_eq!(health.check(), Err("storage unreachable: timed out".into()));
        health.set_starting(Some("migrating the schema".into()));
        assert_eq!(health.check(), Err("starting: migrating the schema".into()));
        health.set_draining(true);
        assert_eq!(health.check(), Err("draining".into()));
        health.set_draining(false);
        health.set_starting(None);
        health.set_storage(Ok(()));
        assert_eq!(health.check(), Ok(()));
    }
}
