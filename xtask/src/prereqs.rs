//! Prerequisites: found, installed (when we are root and it can be), or named with the
//! command that installs it.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// bpf-linker 0.10.0 links against the nightly toolchain's own LLVM (22); newer releases
/// need a system LLVM that Debian 12 does not have.
const BPF_LINKER: &str = "bpf-linker@0.10.0";

/// Debian packages the tests, benchmarks and demo use.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("ethtool", "ethtool"),
    ("nc", "netcat-openbsd"),
    ("bpftool", "bpftool"),
    ("curl", "curl"),
    ("haproxy", "haproxy"),
    ("wrk", "wrk"),
    ("mariadbd", "mariadb-server"),
    ("mariadb", "mariadb-client"),
    ("sysbench", "sysbench"),
    ("nginx", "nginx"),
    ("openssl", "openssl"),
    // BGP with BFD between the router and the balancers of the two-balancer stack
    ("bird", "bird2"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Toolchain for the eBPF build.
    Build,
    /// Build, plus the tools tests and benchmarks call.
    All,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn quiet(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn loud(cmd: &str, args: &[&str]) -> Result<()> {
    eprintln!("xtask: running {cmd} {}", args.join(" "));
    let status = Command::new(cmd).args(args).status().with_context(|| format!("cannot start {cmd}"))?;
    if !status.success() {
        bail!("{cmd} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs cargo with the given arguments in the workspace.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    loud(&cargo, args)
}

pub fn which(cmd: &str) -> bool {
    quiet("sh", &["-c", &format!("command -v {cmd}")]).is_some()
}

/// Makes sure what `need` lists is there, installing what it can.
pub fn ensure(need: Need) -> Result<()> {
    let mut missing = Vec::new();
    if !which("rustup") {
        bail!("rustup not found: install it from https://rustup.rs (the eBPF build needs a nightly toolchain)");
    }
    let toolchains = quiet("rustup", &["toolchain", "list"]).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        loud("rustup", &["toolchain", "install", "nightly", "--profile", "minimal"])?;
    }
    let components = quiet("rustup", &["component", "list", "--toolchain", "nightly", "--installed"]).unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        loud("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"])?;
    }
    if !which("bpf-linker") {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        loud(&cargo, &["install", BPF_LINKER, "--locked"])
            .with_context(|| format!("installing bpf-linker; by hand: cargo install {BPF_LINKER} --locked"))?;
    }
    if need == Need::All {
        let absent: Vec<&str> = PACKAGES.iter().filter(|(cmd, _)| !which(cmd)).map(|&(_, pkg)| pkg).collect();
        if !absent.is_empty() {
            if is_root() && which("apt-get") {
                loud("apt-get", &["update", "-qq"])?;
                let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
                args.extend(&absent);
                loud("apt-get", &args)?;
            } else {
                missing.push(format!("Debian packages {} (sudo apt-get install {})", absent.join(", "), absent.join(" ")));
            }
        }
    }
    if !missing.is_empty() {
        bail!("missing prerequisites:\n  {}", missing.join("\n  "));
    }
    Ok(())
}
