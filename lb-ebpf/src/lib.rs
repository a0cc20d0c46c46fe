//! Shared pieces of the XDP programs: the bounds-checked frame view the common parser runs
//! on, and the few helpers that write to packets. The programs themselves (entry points and
//! maps) are the binaries in `src/bin/`.
#![no_std]

use aya_ebpf::programs::XdpContext;
use lb_common::packet::Frame;

/// The packet of an XDP context, for `lb_common::packet`'s parser. Every access is
/// checked against `data_end`, the form the verifier accepts.
#[derive(Clone, Copy)]
pub struct XdpFrame {
    data: usize,
    end: usize,
}

impl XdpFrame {
    /// The frame as it is now; take a new one after `bpf_xdp_adjust_head`.
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self { data: ctx.data(), end: ctx.data_end() }
    }

    /// Writes `bytes` at `off`; false (nothing written) if the frame is too short.
    #[inline(always)]
    pub fn store<const N: usize>(&self, off: usize, bytes: &[u8; N]) -> bool {
        let start = self.data + off;
        if start + N > self.end {
            return false;
        }
        // SAFETY: start..start+N lies inside the packet, checked just above.
        unsafe { core::ptr::write_unaligned(start as *mut [u8; N], *bytes) };
        true
    }
}

impl Frame for XdpFrame {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let start = self.data + off;
        if start + N > self.end {
            return None;
        }
        // SAFETY: start..start+N lies inside the packet, checked just above.
        Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
    }

    #[inline(always)]
    fn load_words<const N: usize>(&self, off: usize) -> Option<[u32; N]> {
        let start = self.data + off;
        if start + 4 * N > self.end {
            return None;
        }
        // SAFETY: start..start+4N lies inside the packet, checked just above.
        Some(unsafe { core::ptr::read_unaligned(start as *const [u32; N]) })
    }

    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.data + len <= self.end
    }
}

/// Moves the packet start by `delta` bytes (negative grows the headroom side).
#[inline(always)]
pub fn adjust_head(ctx: &XdpContext, delta: i32) -> bool {
    // SAFETY: plain helper call on our own context.
    unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, delta) == 0 }
}

impl XdpFrame {
    /// Writes `words` (4-byte words in memory order) at `off`; false (nothing written) if
    /// the frame is too short. One store per word, where a byte array would be split into
    /// byte stores.
    #[inline(always)]
    pub fn store_words<const N: usize>(&self, off: usize, words: &[u32; N]) -> bool {
        let start = self.data + off;
        if start + 4 * N > self.end {
            return false;
        }
        // SAFETY: start..start+4N lies inside the packet, checked just above.
        unsafe { core::ptr::write_unaligned(start as *mut [u32; N], *words) };
        true
    }
}

/// Writes an Ethernet header at the start of `frame`: the MACs (`lb_common::backend::eth_macs`
/// words) and, up to `l3_off` (14, or 18 with a VLAN tag), the bytes that followed the MACs
/// in the received frame (`tail`: ethertype, or VLAN tag and ethertype).
#[inline(always)]
pub fn write_eth(frame: &XdpFrame, l3_off: usize, macs: &[u32; 3], tail: &[u8; 6]) -> bool {
    if !frame.store_words(0, macs) {
        return false;
    }
    if l3_off == 18 {
        frame.store(12, tail)
    } else {
        frame.store(12, &[tail[0], tail[1]])
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
