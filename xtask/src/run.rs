//! `cargo xtask run`: builds everything and brings up the whole stack in network namespaces
//! (client, balancer, two web nodes), prints what to type, and tears it all down on Ctrl-C.

use anyhow::{bail, Result};

use crate::prereqs::{self, cargo, is_root, Need};

pub fn run(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the stack needs root (network namespaces, XDP): run `sudo -E cargo xtask run`");
    }
    prereqs::ensure(Need::All)?;
    cargo(&["build", "--release", "-p", "lb-userspace", "-p", "web-app", "-p", "db-router", "-p", "tests", "--bin", "lbd", "--bin", "web-app", "--bin", "db-router", "--bin", "stack"])?;
    // Become the stack process, so that Ctrl-C reaches it alone and it tears down in order.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("release/stack");
    let err = std::os::unix::process::CommandExt::exec(std::process::Command::new(&bin).args(args));
    bail!("cannot start {}: {err}", bin.display())
}
