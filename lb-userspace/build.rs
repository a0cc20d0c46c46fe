include!("../lb-ebpf/build_programs.rs");

/// The XDP programs of `lb-ebpf` (`lb`, `decap`, `pass`), embedded by `Dataplane`.
fn main() -> anyhow::Result<()> {
    build_lb_ebpf()
}
