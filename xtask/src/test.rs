//! `cargo xtask test`: host unit tests (no root), then the root-only tests. With `CI` set,
//! a missing privilege fails the run instead of skipping.

use anyhow::{bail, Result};

use crate::prereqs::{self, cargo, is_root, Need};

pub fn run(args: &[String]) -> Result<()> {
    let ci = std::env::var_os("CI").is_some();
    if ci && !is_root() {
        bail!("CI is set but we are not root: the XDP and namespace tests need root (CAP_BPF, CAP_NET_ADMIN)");
    }
    prereqs::ensure(Need::All)?;
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();

    eprintln!("xtask: host unit tests (no root needed)");
    let mut unit = vec!["test", "--release", "-p", "lb-common", "-p", "lb-userspace", "-p", "web-app", "-p", "db-router", "--"];
    unit.extend(&extra);
    cargo(&unit)?;

    if !is_root() {
        eprintln!(
            "xtask: SKIPPED the root-only tests (XDP, network namespaces): run `sudo -E cargo xtask test` \
             (with CI set they fail instead)"
        );
        return Ok(());
    }
    eprintln!("xtask: root-only tests: packet fixtures, random frames, end to end in network namespaces");
    // The end-to-end tests run the real binaries in namespaces.
    cargo(&["build", "--release", "-p", "lb-userspace", "-p", "web-app", "-p", "db-router"])?;
    let mut root = vec!["test", "--release", "-p", "tests", "--"];
    root.extend(&extra);
    cargo(&root)
}
