//! Helpers for the root-only tests: privilege checks that fail under CI, a private network
//! namespace per test thread, and CPU pinning.

use std::process::Command;

pub mod http;
pub mod lab;
pub mod stack;

/// Whether the test may run. Without root: a skip locally, a failure when `CI` is set
/// (privileged tests must never silently pass in CI).
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (CAP_BPF, CAP_NET_ADMIN), and CI is set: run the tests as root");
    }
    eprintln!("SKIPPED {test}: needs root; run `sudo -E cargo xtask test` (CI fails instead of skipping)");
    false
}

/// Moves the calling thread into a new, unnamed network namespace. It disappears with the
/// thread (and every interface created in it with it), so nothing leaks even on panic.
/// Commands spawned from this thread run inside it.
pub fn private_netns() {
    // SAFETY: unshare affects only the calling thread's network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    sh("ip link set lo up");
}

/// Runs a shell command (inside the thread's namespace), panicking with its output on failure.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// Pins the calling thread to one CPU, so per-CPU state (round-robin position) is predictable.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: plain cpu_set_t manipulation and a syscall on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set), 0);
    }
}

/// The fields of `/proc/<pid>/stat` after the command name (which may contain spaces), as
/// numbers where they are (the state, field 3, is not); empty once the process has gone.
fn stat_fields(pid: u32) -> Vec<Option<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    after.split_whitespace().map(|v| v.parse().ok()).collect()
}

/// CPU time (user and system) of another process, all its threads, so far, from /proc; zero
/// once it has gone. Tick resolution (`_SC_CLK_TCK`, usually 10 ms).
pub fn process_cpu_time(pid: u32) -> std::time::Duration {
    // utime and stime are fields 14 and 15, the 12th and 13th after the command name.
    let ticks: u64 = stat_fields(pid).iter().skip(11).take(2).flatten().sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::time::Duration::from_secs_f64(ticks as f64 / hz)
}

/// The processes whose parent is `pid` (e.g. nginx's workers), from /proc.
pub fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        // The parent is field 4, the second after the command name.
        .filter(|&child| stat_fields(child).get(1).copied().flatten() == Some(u64::from(pid)))
        .collect()
}

/// Formats a frame as hex rows for failure messages.
pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(16)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A latency as wrk prints it (`812.00us`, `4.25ms`, `1.02s`), in milliseconds.
pub fn wrk_ms(s: &str) -> f64 {
    let s = s.trim();
    if let Some(v) = s.strip_suffix("us") {
        v.parse::<f64>().unwrap() / 1000.0
    } else if let Some(v) = s.strip_suffix("ms") {
        v.parse().unwrap()
    } else if let Some(v) = s.strip_suffix('s') {
        v.parse::<f64>().unwrap() * 1000.0
    } else {
        panic!("latency {s:?}")
    }
}
