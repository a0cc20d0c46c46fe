//! `cargo xtask run`: the whole stack in network namespaces.

use anyhow::{bail, Result};

pub fn run() -> Result<()> {
    bail!("`cargo xtask run` (the stack in network namespaces) is not there yet: it arrives with the control daemon (issue 3)")
}
