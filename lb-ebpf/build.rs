use which::which;

fn main() {
    // Rebuild when bpf-linker changes (it is what links and generates the eBPF objects).
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found: install it with `cargo install bpf-linker@0.10.0 --locked`",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
    // Packet headers sit at 2-byte offsets (after the 14-byte Ethernet header). Without this
    // feature LLVM splits every u16/u32 access to them into byte loads and stores; x86-64 and
    // arm64 (the kernels' HAVE_EFFICIENT_UNALIGNED_ACCESS) and the verifier accept misaligned
    // packet access, and bpf-linker, which generates the code, takes the feature here.
    // alu32 (BPF ISA v3, kernel 5.1+; rustc already passes `--cpu generic`): 32-bit ALU
    // instructions, so 32-bit arithmetic needs no shift pairs to zero-extend registers.
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access,+alu32");
}
