//! Userspace side of the load balancer: loads the XDP programs built from `lb-ebpf`, owns
//! their maps, and exposes typed operations on them (VIPs, backends, rings, counters).
//! The daemon (`lbd`), the tests and the benchmarks all go through this library.

pub mod admin;
pub mod announce;
pub mod backend_setup;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod deploy;
pub mod health;
pub mod netutil;
pub mod objects;
pub mod sync;
pub mod testrun;

pub use dataplane::{Dataplane, DataplaneError, LoadOptions};
