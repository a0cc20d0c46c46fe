//! db-router: a MySQL-protocol router in front of a MariaDB primary and replica.
//!
//! - [`topology`]: where writes and reads go right now; the monitor publishes, sessions read.
//! - [`tier`]: starts and wires real `mariadbd` instances (tests, `cargo xtask run`, benches).

pub mod tier;
pub mod topology;
