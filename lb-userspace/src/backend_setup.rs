//! `lbd backend-setup`: prepares a backend host for direct server return, and `--undo`
//! takes it all back.
//!
//! - binds each VIP on loopback (the backend accepts packets for it and answers from it);
//! - `arp_ignore=1`, `arp_announce=2` (on `all` and the interface), so the host never
//!   answers ARP for a VIP (only the balancer may own it on the segment) nor uses a VIP as an
//!   ARP source; `rp_filter` relaxed from strict to loose where it is strict, since
//!   decapsulated packets carry the client's address;
//! - `ipip` mode: attaches our decapsulation program `lb_decap` to the interface (no kernel
//!   tunnel module needed) for the interface's own addresses; `l2` mode: attaches `xdp_pass`,
//!   which a veth needs to receive frames the balancer sends with XDP_TX.
//!
//! The program outlives the command: its link is pinned under `--pin-dir`. What was changed
//! is written to a state file so that `--undo` restores exactly that.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{links::FdLink, Xdp, XdpMode},
    Ebpf,
};
use lb_common::vip::ForwardMode;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{config::XdpModeSetting, decap::Decap, netutil, objects};

#[derive(Debug, Clone)]
pub struct Options {
    pub vips: Vec<Ipv4Addr>,
    pub interface: String,
    pub mode: ForwardMode,
    pub xdp_mode: XdpModeSetting,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct State {
    interface: String,
    added_vips: Vec<Ipv4Addr>,
    sysctls: Vec<(String, String)>,
    pinned_link: Option<PathBuf>,
    xdp_mode: Option<String>,
}

fn state_path(o: &Options) -> Result<PathBuf> {
    Ok(o.state_dir.join(format!("backend-{}-{}.json", netutil::netns_id()?, o.interface)))
}

fn loopback_has(addr: Ipv4Addr) -> Result<bool> {
    Ok(netutil::ipv4_addresses("lo")?.contains(&addr))
}

fn ip(args: &[&str]) -> Result<()> {
    netutil::ip(args).map(drop)
}

/// Attaches `prog` to `iface` in the configured mode and pins the link at `pin`.
fn attach_pinned(prog: &mut Xdp, iface: &str, setting: XdpModeSetting, pin: &Path) -> Result<&'static str> {
    let modes: &[(XdpMode, &'static str)] = match setting {
        XdpModeSetting::Driver => &[(XdpMode::Driver, "driver")],
        XdpModeSetting::Skb => &[(XdpMode::Skb, "skb")],
        XdpModeSetting::Auto => &[(XdpMode::Driver, "driver"), (XdpMode::Skb, "skb")],
    };
    let mut last = None;
    for &(mode, name) in modes {
        match prog.attach(iface, mode) {
            Ok(id) => {
                let link = prog.take_link(id)?;
                let fd_link: FdLink = link.try_into().context("XDP link is not a bpf_link (kernel older than 5.9?)")?;
                fd_link.pin(pin).with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
                return Ok(name);
            }
            Err(e) => {
                warn!(interface = iface, mode = name, error = %e, "XDP attach failed");
                last = Some(e);
            }
        }
    }
    bail!("cannot attach XDP to {iface}: {}", last.map(|e| e.to_string()).unwrap_or_default())
}

pub fn setup(o: &Options) -> Result<()> {
    let path = state_path(o)?;
    if path.exists() {
        info!(state = %path.display(), "already set up: undoing the previous setup first");
        undo(o)?;
    }
    netutil::ifindex(&o.interface)?;
    std::fs::create_dir_all(&o.state_dir).with_context(|| format!("creating {}", o.state_dir.display()))?;
    std::fs::create_dir_all(&o.pin_dir)
        .with_context(|| format!("creating {} (is bpffs mounted at /sys/fs/bpf?)", o.pin_dir.display()))?;
    let mut state = State { interface: o.interface.clone(), ..Default::default() };
    // Record progress as we go, so a failure half way can still be undone.
    let save = |s: &State| -> Result<()> { Ok(std::fs::write(&path, serde_json::to_vec_pretty(s)?)?) };

    for &vip in &o.vips {
        if !loopback_has(vip)? {
            ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            state.added_vips.push(vip);
            save(&state)?;
        }
    }
    let iface = &o.interface;
    for (key, value) in [
        ("net.ipv4.conf.all.arp_ignore".to_string(), "1"),
        (format!("net.ipv4.conf.{iface}.arp_ignore"), "1"),
        ("net.ipv4.conf.all.arp_announce".to_string(), "2"),
        (format!("net.ipv4.conf.{iface}.arp_announce"), "2"),
        ("net.ipv4.conf.all.rp_filter".to_string(), "2"),
        (format!("net.ipv4.conf.{iface}.rp_filter"), "2"),
    ] {
        let old = netutil::sysctl_get(&key)?;
        // rp_filter: only relax strict (1) to loose (2); leave off (0) alone.
        if old == value || (key.ends_with("rp_filter") && old != "1") {
            continue;
        }
        netutil::sysctl_set(&key, value)?;
        state.sysctls.push((key, old));
        save(&state)?;
    }

    let pin = o.pin_dir.join(format!(
        "{}-{}-{}",
        if o.mode == ForwardMode::Ipip { "decap" } else { "pass" },
        netutil::netns_id()?,
        iface
    ));
    let mode = if o.mode == ForwardMode::Ipip {
        let mut d = Decap::load().context("loading the decapsulation program (root, CAP_BPF?)")?;
        let addrs = netutil::ipv4_addresses(iface)?;
        if addrs.is_empty() {
            bail!("{iface} has no IPv4 address: IPIP packets are addressed to it");
        }
        for a in &addrs {
            d.add_local_address(*a)?;
        }
        attach_pinned(d.program_mut(), iface, o.xdp_mode, &pin)?
    } else {
        let mut e = Ebpf::load(objects::pass())?;
        let p: &mut Xdp = e.program_mut("xdp_pass").expect("in object").try_into()?;
        p.load()?;
        attach_pinned(p, iface, o.xdp_mode, &pin)?
    };
    state.pinned_link = Some(pin.clone());
    state.xdp_mode = Some(mode.to_string());
    save(&state)?;
    info!(
        interface = %iface,
        xdp_mode = mode,
        program = if o.mode == ForwardMode::Ipip { "lb_decap" } else { "xdp_pass" },
        pin = %pin.display(),
        vips = ?o.vips,
        "backend ready for direct server return"
    );
    Ok(())
}

pub fn undo(o: &Options) -> Result<()> {
    let path = state_path(o)?;
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!(interface = %o.interface, "nothing to undo (no state file {})", path.display());
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let state: State = serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    if let Some(pin) = &state.pinned_link {
        match std::fs::remove_file(pin) {
            Ok(()) => info!(pin = %pin.display(), "XDP link unpinned (detached)"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(pin = %pin.display(), error = %e, "could not unpin"),
        }
    }
    for (key, old) in state.sysctls.iter().rev() {
        if let Err(e) = netutil::sysctl_set(key, old) {
            warn!(key, error = %e, "could not restore sysctl");
        }
    }
    for vip in &state.added_vips {
        if let Err(e) = ip(&["addr", "del", &format!("{vip}/32"), "dev", "lo"]) {
            warn!(%vip, error = %e, "could not remove the VIP from lo");
        }
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    info!(interface = %o.interface, "backend setup undone");
    Ok(())
}
