include!("../lb-ebpf/build_programs.rs");

/// web-app embeds `webreuse`, the round robin over its HTTP threads' listening sockets
/// (src/balance.rs).
fn main() -> anyhow::Result<()> {
    build_lb_ebpf()
}
