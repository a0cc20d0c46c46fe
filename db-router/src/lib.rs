//! db-router: a MySQL-protocol router in front of a MariaDB primary and replica.
//!
//! - [`topology`]: where writes and reads go right now; the monitor publishes, sessions read.
//! - [`classify`]: which backend a statement may run on (tokenizer plus rules).
//! - [`protocol`], [`backend`], [`session`], [`router`]: the MySQL-protocol relay: client
//!   login, per-session backend connections, response relay, routing and session state;
//!   [`stream`]: TCP or Unix-socket connections on either side; [`tls`]: TLS for clients.
//! - [`kernel_relay`], [`fast_path`]: the in-kernel answer relay and the in-kernel fast path
//!   for prepared reads (BPF sockmap programs in lb-ebpf); [`mapped`]: their mmapped state.
//! - [`config`]: the `db-router` TOML configuration.
//! - [`monitor`]: polls the backends, publishes the routing view, fails over, fences, rejoins.
//! - [`admin`]: HTTP `/metrics`, `/status`, `POST /rejoin`.
//! - [`tier`]: starts and wires real `mariadbd` instances (tests, `cargo xtask run`, benches).

pub mod admin;
pub mod backend;
pub mod classify;
pub mod config;
pub mod fast_path;
pub mod kernel_relay;
pub mod mapped;
pub mod monitor;
pub mod protocol;
pub mod router;
pub mod session;
pub mod stream;
pub mod tier;
pub mod tls;
pub mod topology;
