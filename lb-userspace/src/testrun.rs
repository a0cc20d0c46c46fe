//! Running an XDP program on one frame with BPF_PROG_TEST_RUN, as Katran's tester does.

use std::time::Duration;

use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};

/// XDP action codes.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn action_name(action: u32) -> &'static str {
    match action {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "XDP_?",
    }
}

/// What a program did with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
    pub duration: Duration,
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it for `ctx_in`: `data` 0, `data_end` the
/// frame length (the kernel insists), and the ingress interface.
fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    md
}

/// Runs `prog` once on a copy of `frame`. With `ingress_ifindex`, the program sees that
/// interface (of the calling thread's network namespace) as its ingress, as the FIB lookup
/// does; otherwise it sees loopback.
pub fn run(prog: &Xdp, frame: &[u8], ingress_ifindex: Option<u32>) -> Result<Outcome, ProgramError> {
    let mut out = vec![0u8; frame.len() + 256];
    let md = ingress_ifindex.map(|i| xdp_md(frame.len(), i));
    let res = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: md.as_ref().map(|m| &m[..]),
        repeat: 1,
        ..Default::default()
    })?;
    out.truncate(res.data_size_out as usize);
    Ok(Outcome { action: res.return_value, frame: out, duration: res.duration })
}
