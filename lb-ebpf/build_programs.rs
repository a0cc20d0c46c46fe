// Shared by the build scripts of the crates that embed lb-ebpf's programs (lb-userspace,
// db-router, web-app), each with `include!`: a build script cannot depend on a library of
// the workspace without that library being built for the host first.

/// Builds lb-ebpf's programs (nightly toolchain, bpf-linker) into OUT_DIR, so a plain
/// `cargo build` always ships objects that match this source tree.
fn build_lb_ebpf() -> anyhow::Result<()> {
    use anyhow::anyhow;
    use aya_build::{build_ebpf, Package, Toolchain};
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or_else(|| anyhow!("no workspace root"))?.to_path_buf();
    // aya-build watches lb-ebpf; the programs also compile lb-common.
    println!("cargo:rerun-if-changed={}", workspace.join("lb-common").display());
    let root = workspace.join("lb-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    build_ebpf([Package { name: "lb-ebpf", root_dir: root, ..Default::default() }], Toolchain::Nightly)
}
