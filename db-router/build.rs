include!("../lb-ebpf/build_programs.rs");

/// db-router embeds `dbrelay`, its in-kernel read relay (src/kernel_relay.rs), and `dbfast`,
/// its in-kernel fast path for prepared reads (src/fast_path.rs).
fn main() -> anyhow::Result<()> {
    build_lb_ebpf()
}
