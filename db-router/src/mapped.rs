//! A BPF array map (created `BPF_F_MMAPABLE`) mapped into the router's memory, so that
//! sessions read and write their entries without a system call (the in-kernel relay's
//! connection states, the fast path's session words).

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::{Map, MapData};

pub struct MappedArray<T> {
    ptr: NonNull<T>,
    len: usize,
    /// The map's fd, kept open as long as the mapping.
    _map: MapData,
}

// SAFETY: the mapping is shared memory that lives as long as this value; what each entry
// means, and who may use it when, is the owner's concern (each session uses its own).
unsafe impl<T> Send for MappedArray<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for MappedArray<T> {}

impl<T> MappedArray<T> {
    /// Maps `map` (named `name` in errors), an array of `len` entries of `T`.
    pub fn new(map: Map, name: &str, len: usize) -> anyhow::Result<MappedArray<T>> {
        let Map::Array(map) = map else { anyhow::bail!("{name} is not an array") };
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: maps the array (created BPF_F_MMAPABLE, `len` entries of `T`) shared and
        // writable; unmapped in Drop.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, map.fd().as_fd().as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            anyhow::bail!("mmap of {name}: {}", std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<T>()).ok_or_else(|| anyhow::anyhow!("mmap of {name} returned null"))?;
        Ok(MappedArray { ptr, len, _map: map })
    }

    /// Entry `index` (in bounds, else a panic).
    pub fn get(&self, index: u32) -> *mut T {
        assert!((index as usize) < self.len);
        // SAFETY: in bounds of the mapping.
        unsafe { self.ptr.as_ptr().add(index as usize) }
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used (its owner is being dropped).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * std::mem::size_of::<T>()) };
    }
}
