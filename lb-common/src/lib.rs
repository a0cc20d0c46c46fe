//! Types and pure packet logic shared by the XDP programs (`lb-ebpf`) and userspace.
//!
//! Everything here is `no_std` and free of kernel helpers, so the very code the kernel runs
//! (the frame parser, flow keys, hashing, ring indexing, the IPIP header builder) is unit
//! tested on the host. Map keys and values are `#[repr(C)]` with explicit padding and a size
//! assertion each; network-order fields are byte arrays.
#![no_std]

#[cfg(any(test, feature = "user"))]
extern crate alloc;

pub mod backend;
pub mod csum;
pub mod encap;
pub mod firewall;
pub mod flood;
pub mod flow;
pub mod icmp;
pub mod packet;
pub mod stats;
pub mod vip;

#[cfg(any(test, feature = "user"))]
pub mod builder;
#[cfg(any(test, feature = "user"))]
pub mod ring;

/// Implements `aya::Pod` for map types in userspace builds.
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: repr(C), only integer/array fields, explicit padding (checked by size asserts).
            #[cfg(feature = "user")]
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;
