//! Route announcement for balancers behind routers (ECMP). While lbd serves, each VIP
//! address is a route in a kernel routing table of its own (`[announce] table`); the routing
//! daemon operators already run announces that table to the routers by BGP (BIRD's `kernel`
//! protocol with `learn`, FRR's `redistribute table`), and BFD there tells the routers when a
//! balancer is gone. The routers spread flows over every balancer announcing a VIP. On
//! shutdown lbd withdraws the routes first and keeps forwarding for `withdraw_wait_ms`, so
//! the routers move the flows away (and the flow sync hands them over) before its program
//! goes. lbd speaks no BGP itself: Katran and IPVS leave that to the routing daemon too.
//!
//! The routes are `blackhole` routes in a table nothing routes by (no `ip rule` points at
//! it: it is only read), tagged with protocol number [`ROUTE_PROTO`] so that lbd changes
//! only its own. Written with iproute2's `ip`, as `backend-setup` does.

use std::{collections::BTreeSet, net::Ipv4Addr, process::Command};

use anyhow::{bail, Context, Result};

/// The routes' protocol number (`ip route ... proto 186`): lbd's, in no registry.
pub const ROUTE_PROTO: u8 = 186;

fn ip(args: &[String]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The addresses lbd has routes for in `table`.
pub fn routes(table: u32) -> Result<BTreeSet<Ipv4Addr>> {
    let args: Vec<String> = ["-4", "route", "show", "table", &table.to_string(), "proto", &ROUTE_PROTO.to_string()].iter().map(|s| s.to_string()).collect();
    let out = match ip(&args) {
        Ok(out) => out,
        // A table with no route yet does not exist.
        Err(e) if format!("{e}").contains("table does not exist") => String::new(),
        Err(e) => return Err(e),
    };
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let first = w.next()?;
            let dst = if first == "blackhole" { w.next()? } else { first };
            dst.trim_end_matches("/32").parse().ok()
        })
        .collect())
}

/// Makes lbd's routes in `table` exactly `want`: adds the missing, removes the others.
/// Returns what was added and what removed.
pub fn set_routes(table: u32, want: &BTreeSet<Ipv4Addr>) -> Result<(Vec<Ipv4Addr>, Vec<Ipv4Addr>)> {
    let have = routes(table)?;
    let route = |verb: &str, a: &Ipv4Addr| -> Vec<String> {
        ["route", verb, "blackhole", &format!("{a}/32"), "table", &table.to_string(), "proto", &ROUTE_PROTO.to_string()].iter().map(|s| s.to_string()).collect()
    };
    let added: Vec<Ipv4Addr> = want.difference(&have).copied().collect();
    let removed: Vec<Ipv4Addr> = have.difference(want).copied().collect();
    for a in &added {
        ip(&route("replace", a))?;
    }
    for a in &removed {
        ip(&route("del", a))?;
    }
    Ok((added, removed))
}
