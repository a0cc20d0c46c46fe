//! `cargo xtask bench`: every benchmark next to its reference, measured in the same run.

use anyhow::{bail, Result};

use crate::prereqs::{self, cargo, is_root, Need};

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the benchmarks need root (BPF_PROG_TEST_RUN, network namespaces): run `sudo -E cargo xtask bench`");
    }
    prereqs::ensure(Need::All)?;
    eprintln!("xtask: data plane: ns/packet against a trivial XDP_PASS program, Katran's figures for reference");
    cargo(&["run", "--release", "--quiet", "-p", "tests", "--bin", "dataplane-bench"])?;
    eprintln!("xtask: end to end: wrk through our VIP and through HAProxy, same topology, same run");
    cargo(&["build", "--release", "-p", "lb-userspace", "-p", "web-app"])?;
    cargo(&["run", "--release", "--quiet", "-p", "tests", "--bin", "e2e-bench"])?;
    eprintln!("xtask: failover: detection time and failed requests, lbd and HAProxy, same run");
    cargo(&["run", "--release", "--quiet", "-p", "tests", "--bin", "failover-bench"])?;
    eprintln!("xtask: web node: the same files from web-app and from nginx, wrk, keep-alive and not, plain and TLS");
    cargo(&["run", "--release", "--quiet", "-p", "tests", "--bin", "web-bench"])?;
    eprintln!("xtask: database: sysbench through db-router and directly to the primary, same run");
    cargo(&["run", "--release", "--quiet", "-p", "tests", "--bin", "db-bench"])
}
