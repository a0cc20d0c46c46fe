//! Route announcement for balancers behind routers (ECMP). While lbd serves, each VIP
//! address is a route in a kernel routing table of its own (`[announce] table`); the routing
//! daemon operators already run announces that table to the routers by BGP (BIRD's `kernel`
//! protocol with `learn`, FRR's `redistribute table`), and BFD there tells the routers when a
//! balancer is gone. The routers spread flows over every balancer announcing a VIP. On
//! shutdown lbd withdraws the routes first and keeps forwarding for `withdraw_wait_ms`, so
//! the routers move the flows away (and the flow sync hands them over) before its program
//! goes. lbd speaks no BGP itself: Katran and IPVS leave that to the routing daemon too.
//!
//! The routes point at a TUN device lbd creates and holds open ([`Anchor`], `lbd-t<table>`),
//! in a table nothing routes by (no `ip rule` points at it: it is only read), tagged with
//! protocol number [`ROUTE_PROTO`] so that lbd changes only its own. A TUN device lives as
//! long as the descriptor that made it: if lbd dies, even by SIGKILL, the kernel deletes
//! the device and its routes, and the routing daemon withdraws them, as ExaBGP withdraws the
//! routes of a health check that stops. For a restart that keeps the program forwarding
//! (SIGUSR1) the device is made persistent before lbd exits, and the next lbd takes it over
//! and makes it transient again: the routes stay announced throughout. Routes are written
//! with iproute2's `ip`, as `backend-setup` does.

use std::{collections::BTreeSet, net::Ipv4Addr, os::fd::AsRawFd};

use anyhow::{Context, Result};

use crate::netutil::ip;

/// The routes' protocol number (`ip route ... proto 186`): lbd's, in no registry.
pub const ROUTE_PROTO: u8 = 186;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// The TUN device the VIP routes point at, held open by this process: it goes, with its
/// routes, when the process does.
pub struct Anchor {
    file: std::fs::File,
    pub name: String,
    pub table: u32,
}

impl Anchor {
    /// Creates (or takes over a persistent one left by a restart) `lbd-t<table>`, up, and
    /// transient: it lives as long as this process.
    pub fn open(table: u32) -> Result<Anchor> {
        let name = format!("lbd-t{table}");
        let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("opening /dev/net/tun (the VIP routes' device)")?;
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        req[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("creating the TUN device {name}"));
        }
        let anchor = Anchor { file, name, table };
        anchor.set_persist(false)?;
        ip(&["link", "set", "dev", &anchor.name, "up"])?;
        Ok(anchor)
    }

    /// Persistent: the device (and its routes) outlive this process, for the next lbd to
    /// take over (a restart that keeps the program forwarding).
    pub fn set_persist(&self, persist: bool) -> Result<()> {
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETPERSIST, libc::c_ulong::from(persist)) } < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("TUNSETPERSIST on {}", self.name));
        }
        Ok(())
    }

    /// Makes lbd's routes in the table exactly `want` (each `dev` this device): adds the
    /// missing, removes the others. Returns what was added and what removed.
    pub fn set_routes(&self, want: &BTreeSet<Ipv4Addr>) -> Result<(Vec<Ipv4Addr>, Vec<Ipv4Addr>)> {
        let have = routes(self.table)?;
        let (table, proto) = (self.table.to_string(), ROUTE_PROTO.to_string());
        let added: Vec<Ipv4Addr> = want.difference(&have).copied().collect();
        let removed: Vec<Ipv4Addr> = have.difference(want).copied().collect();
        for a in &added {
            ip(&["route", "replace", &format!("{a}/32"), "dev", &self.name, "table", &table, "proto", &proto])?;
        }
        for a in &removed {
            ip(&["route", "del", &format!("{a}/32"), "table", &table, "proto", &proto])?;
        }
        Ok((added, removed))
    }
}

/// The addresses lbd has routes for in `table`.
pub fn routes(table: u32) -> Result<BTreeSet<Ipv4Addr>> {
    let out = match ip(&["-4", "route", "show", "table", &table.to_string(), "proto", &ROUTE_PROTO.to_string()]) {
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
            let dst = if matches!(first, "blackhole" | "unreachable" | "prohibit") { w.next()? } else { first };
            dst.trim_end_matches("/32").parse().ok()
        })
        .collect())
}

/// Removes every route of lbd's in `table` (left by an older version, whose routes were
/// not bound to a device).
pub fn clear_routes(table: u32) -> Result<Vec<Ipv4Addr>> {
    let stale: Vec<Ipv4Addr> = routes(table)?.into_iter().collect();
    for a in &stale {
        ip(&["route", "del", &format!("{a}/32"), "table", &table.to_string(), "proto", &ROUTE_PROTO.to_string()])?;
    }
    Ok(stale)
}
