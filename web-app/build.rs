use anyhow::anyhow;
use aya_build::{build_ebpf, Package, Toolchain};

/// Builds lb-ebpf's programs (nightly toolchain, bpf-linker) into OUT_DIR; web-app embeds
/// `webreuse`, the round robin over its HTTP threads' listening sockets (see src/balance.rs).
fn main() -> anyhow::Result<()> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or_else(|| anyhow!("no workspace root"))?.to_path_buf();
    // The programs link lb-ebpf's library, which uses lb-common.
    println!("cargo:rerun-if-changed={}", workspace.join("lb-common").display());
    let root = workspace.join("lb-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    build_ebpf([Package { name: "lb-ebpf", root_dir: root, ..Default::default() }], Toolchain::Nightly)
}
