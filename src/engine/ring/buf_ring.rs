//! A provided-buffer ring: receives take a buffer only when data arrives,
//! so an idle connection pins none.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// One anonymous, page-aligned, zero-filled mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a private anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// `count` buffers of `size` bytes registered with a ring as group `group`.
/// Buffers are handed to the kernel with [`BufRing::give`]; a receive
/// that completes names the one it filled.
pub struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    count: u16,
    size: usize,
    tail: u16,
    group: u16,
}

impl BufRing {
    /// Registers `count` (a power of two, at most 32768) buffers of `size`
    /// bytes as buffer group `group` of `ring`, all given to the kernel.
    ///
    /// The ring must be dropped after this value's registration is no
    /// longer used: the kernel reads the entries and writes the buffers.
    /// Dropping the `IoUring` unregisters the group; callers drop the ring
    /// first (a field declared before this one).
    pub fn new(ring: &IoUring, count: u16, size: usize, group: u16) -> io::Result<BufRing> {
        assert!(count.is_power_of_two(), "buffer ring size must be a power of two");
        let entries = Mapping::new(count as usize * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(count as usize * size)?;
        // SAFETY: `entries` is page-aligned, sized for `count` entries, and
        // lives as long as this BufRing, which outlives its use by the ring
        // (see above).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries.ptr as u64, count, group, 0)?;
        }
        let mut ring = BufRing {
            entries,
            buffers,
            count,
            size,
            tail: 0,
            group,
        };
        for id in 0..count {
            ring.push(id);
        }
        ring.publish();
        Ok(ring)
    }

    /// The buffer group id receives select from.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Size of each buffer.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Pointer to buffer `id` (valid for `size()` bytes while `self` lives).
    pub fn ptr(&self, id: u16) -> *const u8 {
        debug_assert!(id < self.count);
        // SAFETY: within the buffers mapping for any id < count.
        unsafe { self.buffers.ptr.add(id as usize * self.size) }
    }

    fn push(&mut self, id: u16) {
        let mask = self.count - 1;
        // SAFETY: the index is masked into the entries mapping; the kernel
        // only reads entries between its head and the published tail, and
        // this slot is past the tail.
        let entry = unsafe { &mut *(self.entries.ptr as *mut BufRingEntry).add((self.tail & mask) as usize) };
        entry.set_addr(self.ptr(id) as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lies in entry 0 of our mapping; the kernel
        // reads it with acquire semantics, so a release store publishes the
        // entries written before it.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.ptr as *const BufRingEntry) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Gives buffer `id` back to the kernel.
    pub fn give(&mut self, id: u16) {
        self.push(id);
        self.publish();
    }
}
