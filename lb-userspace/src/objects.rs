//! The eBPF objects, built by `build.rs` (aya-build) and embedded in the binary.

/// The balancer program `lb_xdp` and its maps.
pub fn balancer() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"))
}

/// The decapsulation program `lb_decap` for backend hosts.
pub fn decap() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap"))
}

/// The trivial `xdp_pass` program.
pub fn pass() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pass"))
}
