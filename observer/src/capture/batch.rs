//! `BPF_MAP_LOOKUP_BATCH` for per-CPU maps (aya 0.14 has no batch API).
//!
//! Walking a map with `get_next_key` + `lookup` costs two syscalls per key, about a second for
//! 50,000 keys on a busy node. A batch lookup reads thousands of keys per syscall, and for hash
//! maps walks by bucket, so concurrent evictions cannot restart the walk.
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::Pod;

/// `enum bpf_cmd` value of `BPF_MAP_LOOKUP_BATCH` (UAPI, stable since Linux 5.6).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reusable buffers for batch lookups of one map.
#[derive(Debug)]
pub(super) struct Batch {
    keys: Vec<u8>,
    values: Vec<u8>,
    chunk: usize,
    /// Per-CPU value stride (the kernel rounds each value up to 8 bytes).
    stride: usize,
    nr_cpus: usize,
}

/// Per-CPU values of one key, as raw bytes.
pub(super) struct PerCpu<'a> {
    bytes: &'a [u8],
    stride: usize,
}

impl PerCpu<'_> {
    /// Iterates the per-CPU values.
    pub(super) fn iter<V: Pod>(&self) -> impl Iterator<Item = V> + '_ {
        self.bytes
            .chunks_exact(self.stride)
            .filter(|c| c.len() >= size_of::<V>())
            // SAFETY: V is Pod (any bit pattern is valid) and the chunk holds size_of::<V>()
            // bytes; read_unaligned copes with the buffer's alignment.
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<V>()) })
    }

    /// The sum of `u64` counters over CPUs (wrapping, as the kernel's counters do).
    pub(super) fn sum_u64(&self) -> u64 {
        self.iter::<u64>().fold(0, u64::wrapping_add)
    }
}

impl Batch {
    pub(super) fn new<V>(nr_cpus: usize, chunk: usize) -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            chunk: chunk.max(1),
            stride: size_of::<V>().div_ceil(8) * 8,
            nr_cpus,
        }
    }

    /// Calls `f` for every key of the map behind `fd`. Returns `Err` with `EINVAL`/`ENOTSUP`-like
    /// errors when the kernel lacks batch operations, so the caller can fall back.
    pub(super) fn for_each<K: Pod>(
        &mut self,
        fd: BorrowedFd<'_>,
        f: impl FnMut(K, PerCpu<'_>),
    ) -> io::Result<()> {
        self.for_first(fd, usize::MAX, f)
    }

    /// [`Batch::for_each`] for the first `limit` keys only (an array's slots `0..limit`).
    pub(super) fn for_first<K: Pod>(
        &mut self,
        fd: BorrowedFd<'_>,
        limit: usize,
        mut f: impl FnMut(K, PerCpu<'_>),
    ) -> io::Result<()> {
        let mut left = limit;
        if left == 0 {
            return Ok(());
        }
        let key_size = size_of::<K>();
        let value_size = self.stride * self.nr_cpus;
        // The batch token is opaque (a bucket index for hash maps, a key for arrays); the
        // kernel writes at most key_size bytes of it.
        let mut token_in = vec![0u8; key_size.max(8)];
        let mut token_out = vec![0u8; key_size.max(8)];
        let mut first = true;
        loop {
            self.keys.resize(self.chunk * key_size, 0);
            self.values.resize(self.chunk * value_size, 0);
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: u32::try_from(self.chunk.min(left)).unwrap_or(u32::MAX),
                map_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
                ..BatchAttr::default()
            };
            // SAFETY: attr points at a live BatchAttr whose buffers hold `count` keys and values
            // and tokens of key_size bytes; the kernel writes only within them.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &raw mut attr,
                    size_of::<BatchAttr>(),
                )
            };
            let done = if rc < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::ENOENT) => true,
                    // A hash bucket holds more keys than one chunk: retry bigger.
                    // (Never for an array, whose slots `for_first` limits.)
                    Some(libc::ENOSPC) if attr.count == 0 && self.chunk < left => {
                        self.chunk *= 2;
                        continue;
                    }
                    _ => return Err(err),
                }
            } else {
                false
            };
            let n = (attr.count as usize).min(self.chunk).min(left);
            left -= n;
            for i in 0..n {
                let (Some(k), Some(v)) = (
                    self.keys.get(i * key_size..(i + 1) * key_size),
                    self.values.get(i * value_size..(i + 1) * value_size),
                ) else {
                    break;
                };
                // SAFETY: K is Pod and k holds size_of::<K>() bytes.
                let key = unsafe { std::ptr::read_unaligned(k.as_ptr().cast::<K>()) };
                f(
                    key,
                    PerCpu {
                        bytes: v,
                        stride: self.stride,
                    },
                );
            }
            if done || left == 0 {
                return Ok(());
            }
            std::mem::swap(&mut token_in, &mut token_out);
            first = false;
        }
    }
}
