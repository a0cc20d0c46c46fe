use which::which;

/// Rebuild when bpf-linker changes (it is what links the eBPF objects).
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found: install it with `cargo install bpf-linker@0.10.0 --locked`",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
