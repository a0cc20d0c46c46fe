//! Small host facts and settings the daemon needs: interface indexes and addresses, sysctls,
//! the network namespace identity, neighbour MACs. Read from /proc and /sys, or libc.

use std::{
    ffi::CString,
    net::{Ipv4Addr, UdpSocket},
    os::unix::fs::MetadataExt,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).context("interface name")?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("interface {name} not found in this network namespace (ip link show)");
    }
    Ok(i)
}

/// IPv4 addresses of an interface, in the kernel's order.
pub fn ipv4_addresses(name: &str) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        bail!("getifaddrs: {}", std::io::Error::last_os_error());
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur points into the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a valid C string for every entry.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if ifname == name && !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null; family tells the real type.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: AF_INET means a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// The inode of this process's network namespace: unique among live namespaces.
pub fn netns_id() -> Result<u64> {
    Ok(std::fs::metadata("/proc/self/ns/net").context("/proc/self/ns/net")?.ino())
}

fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

pub fn sysctl_get(key: &str) -> Result<String> {
    Ok(std::fs::read_to_string(sysctl_path(key)).with_context(|| format!("read sysctl {key}"))?.trim().to_string())
}

pub fn sysctl_set(key: &str, value: &str) -> Result<()> {
    std::fs::write(sysctl_path(key), value).with_context(|| format!("set sysctl {key}={value}"))
}

fn arp_lookup(addr: Ipv4Addr) -> Option<[u8; 6]> {
    let table = std::fs::read_to_string("/proc/net/arp").ok()?;
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // IP address, HW type, Flags, HW address, Mask, Device; flags 0x2 = complete.
        if cols.len() >= 4 && cols[0] == addr.to_string() && cols[2] != "0x0" {
            return crate::config::parse_mac(cols[3]).ok().filter(|m| *m != [0; 6]);
        }
    }
    None
}

/// The MAC of a neighbour on a directly attached segment: from the neighbour table, after
/// prompting resolution with a datagram to the discard port if needed (up to 2 s).
pub fn resolve_mac(addr: Ipv4Addr) -> Result<[u8; 6]> {
    if let Some(mac) = arp_lookup(addr) {
        return Ok(mac);
    }
    let sock = UdpSocket::bind("0.0.0.0:0").context("udp socket")?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let _ = sock.send_to(b"lbd", (addr, 9));
        std::thread::sleep(Duration::from_millis(100));
        if let Some(mac) = arp_lookup(addr) {
            return Ok(mac);
        }
    }
    bail!("cannot resolve the MAC of {addr} (not on a directly attached segment?): set mac = \"..\" for it in the config")
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Runs iproute2's `ip` with `args`: its standard output, or an error with its standard error.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
