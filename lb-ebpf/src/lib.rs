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
        let mut i = 0;
        while i < N {
            // SAFETY: start..start+4N lies inside the packet, checked just above.
            unsafe { core::ptr::write_unaligned((start as *mut u32).add(i), words[i]) };
            i += 1;
        }
        true
    }
}

/// What follows the MACs in an Ethernet header, up to the IPv4 header: the ethertype (bytes
/// 12..14), or a VLAN tag's TPID there and its TCI and the ethertype after it (14..18).
#[derive(Clone, Copy)]
pub struct EthTail {
    /// Bytes 12..14 as read natively.
    pub head: u16,
    /// Bytes 14..18 as read natively (part of the IPv4 header in an untagged frame).
    pub vlan: u32,
}

impl XdpFrame {
    /// The MACs as three words (`lb_common::backend::eth_macs` order), read one by one: kept
    /// for later, an array read would be copied through the stack byte by byte.
    #[inline(always)]
    pub fn macs(&self) -> Option<[u32; 3]> {
        let start = self.data;
        if start + 12 > self.end {
            return None;
        }
        let w = start as *const u32;
        // SAFETY: start..start+12 lies inside the packet, checked just above.
        Some(unsafe { [core::ptr::read_unaligned(w), core::ptr::read_unaligned(w.add(1)), core::ptr::read_unaligned(w.add(2))] })
    }

    /// The bytes after the MACs, as [`write_eth`] puts them back (two loads, where a byte
    /// array would be six); `None` if the frame is shorter than 18 bytes.
    #[inline(always)]
    pub fn eth_tail(&self) -> Option<EthTail> {
        let start = self.data + 12;
        if start + 6 > self.end {
            return None;
        }
        // SAFETY: start..start+6 lies inside the packet, checked just above.
        let (head, vlan) = unsafe {
            (core::ptr::read_unaligned(start as *const u16), core::ptr::read_unaligned((start + 2) as *const u32))
        };
        Some(EthTail { head, vlan })
    }
}

/// Writes an Ethernet header at the start of `frame`: the MACs (`lb_common::backend::eth_macs`
/// words) and, up to `l3_off` (14, or 18 with a VLAN tag), the bytes that followed the MACs
/// in the received frame.
#[inline(always)]
pub fn write_eth(frame: &XdpFrame, l3_off: usize, macs: &[u32; 3], tail: &EthTail) -> bool {
    let start = frame.data;
    if start + 18 > frame.end {
        return false;
    }
    // SAFETY: start..start+18 lies inside the packet, checked just above.
    unsafe {
        let words = start as *mut u32;
        core::ptr::write_unaligned(words, macs[0]);
        core::ptr::write_unaligned(words.add(1), macs[1]);
        core::ptr::write_unaligned(words.add(2), macs[2]);
        core::ptr::write_unaligned((start + 12) as *mut u16, tail.head);
        if l3_off == 18 {
            core::ptr::write_unaligned((start + 14) as *mut u32, tail.vlan);
        }
    }
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
