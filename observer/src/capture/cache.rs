//! Reader of the kernel's per-CPU drop cache and flush logs.
//!
//! The kernel program counts a drop in its CPU's cache line for the key, and when another key
//! takes the line it copies the old entry, with its final counts, into the CPU's flush log
//! (docs/perf-notes.md, "Design C"). Counts are cumulative per *incarnation* of a line, named
//! by `(cpu, tag)`. This reader keeps what it has emitted of each incarnation that may still
//! change, and emits differences:
//!
//! 1. **Log**: records `tail .. head` of each CPU; each one ends its incarnation (its final
//!    counts minus what was emitted). Then `tail = head`, which lets the kernel reuse the slots.
//!    The kernel never writes a record the reader has not released, so none is torn or lost.
//! 2. **Snapshot** of live lines, under the CPU's sequence count, which the kernel keeps odd
//!    while it replaces a line (flush record, `head`, new key). The log is read first, so a
//!    snapshot never sees an incarnation whose flush record was already consumed.
//!
//! The reader never writes the cache or the log; the only store is `tail`. It relies on the
//! CPU's store order (x86-64), which is why the loader enables the cache only there.
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use aya::maps::{MapData, RingBuf};

use observer_ebpf::{
    CACHE_ONE_SHOT_TAG, CACHE_TAG_LINE_BITS, CacheEntry, Counter, CpuState, FlowKey,
};

use super::tally::Tally;
use crate::flow::FastMap;

/// Samples each CPU's cache installs may send per second (see [`CpuState::sample_limit`]):
/// about as many as the default sample ring holds between two drains. The reader grants them
/// in proportion to the time since its last grant, at most a second's worth at once.
pub(super) const SAMPLES_PER_SEC: u64 = 3_200;

/// Flush records copied and added at a time: 64 KiB.
const BATCH_RECORDS: usize = 1024;

/// Consistent copies of a line attempted per snapshot before leaving it for the next one.
const SNAPSHOT_TRIES: u32 = 8;

/// A shared memory mapping of a BPF array created with `BPF_F_MMAPABLE`.
#[derive(Debug)]
pub(super) struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access through it goes through raw
// pointers with volatile or atomic operations, which are sound from any thread.
unsafe impl Send for Mmap {}
// SAFETY: as above.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// Maps the first `len` bytes of the map behind `fd` (rounded up to whole pages).
    pub(super) fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address), of a descriptor we
        // borrow for the duration of the call; the kernel keeps the map alive while mapped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        Ok(Self { ptr, len })
    }
}

impl Mmap {
    /// Start of the mapping (page aligned).
    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing uses any more (the
        // regions that point into it are owned by the same reader).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Where the three arrays are: pointers into mappings (or, in tests, into owned buffers).
#[derive(Debug)]
pub(super) struct Regions {
    /// `nr_cpus * lines` cache lines.
    pub cache: *const CacheEntry,
    /// `nr_cpus * log_records` flush records.
    pub log: *const CacheEntry,
    /// `nr_cpus` CPU states.
    pub cpus: *mut CpuState,
    pub nr_cpus: u32,
    /// Cache lines per CPU: a power of two, at most `CACHE_LINES_MAX`.
    pub lines: u32,
    /// Records per CPU log: a power of two.
    pub log_records: u32,
    /// Keeps the memory behind the pointers alive.
    pub _owner: Box<dyn Send + Sync + std::fmt::Debug>,
}

// SAFETY: the pointers are only dereferenced with volatile/atomic accesses, and `_owner` keeps
// the memory alive as long as the regions.
unsafe impl Send for Regions {}

/// What the reader has emitted of an incarnation that may still change.
#[derive(Copy, Clone, Debug)]
struct Emitted {
    tag: u32,
    packets: u64,
    bytes: u64,
}

/// Reader statistics, cumulative.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ReaderStats {
    /// Flush records consumed.
    pub records: u64,
    /// Of those, records of one drop counted past a thrashing cache ([`CACHE_ONE_SHOT_TAG`]).
    pub one_shot: u64,
    /// Lines left for a later snapshot because the kernel kept changing them.
    pub busy_lines: u64,
    /// Incarnations tracked now (live lines seen, plus ones whose flush is unread).
    pub tracked: usize,
    /// Records not counted per flow because the tally held its maximum of keys (cumulative).
    pub refused: u64,
    /// Cache installs that sent no sample because their CPU's budget was spent (cumulative,
    /// [`CpuState::sample_skips`] over all CPUs).
    pub sample_skips: u64,
}

/// Consumes the flush logs and snapshots live lines into per-key deltas.
#[derive(Debug)]
pub(super) struct CacheReader {
    regions: Regions,
    /// What was emitted of the incarnation last snapshotted in each `(cpu, line)`, indexed by
    /// `cpu * lines + line`: a flush record finds it without hashing.
    emitted: Vec<Option<Emitted>>,
    /// Per CPU, its [`CpuState::counted`] before the last snapshot that read every line of
    /// it, or `None` if none has yet: while it stands still, no line of that CPU changed.
    snapshot_at: Vec<Option<u64>>,
    /// Older incarnations still pending: snapshotted, then replaced in their line by one the
    /// next snapshot saw before the reader consumed their flush record. Rare.
    displaced: FastMap<(u32, u32), (u64, u64)>,
    /// Deltas not yet handed out, per key.
    tally: Tally,
    stats: ReaderStats,
    /// Consumed flush records being reduced and added (reused buffer).
    batch: Vec<CacheEntry>,
    /// When samples were last granted.
    granted_at: Instant,
}

impl CacheReader {
    /// A reader of `regions`, handing out at most `max_keys` keys per take (see [`Tally::new`]).
    pub(super) fn new(regions: Regions, max_keys: usize) -> Self {
        let lines = regions.nr_cpus as usize * regions.lines as usize;
        let reader = Self {
            snapshot_at: vec![None; regions.nr_cpus as usize],
            regions,
            emitted: vec![None; lines],
            displaced: FastMap::default(),
            tally: Tally::new(max_keys),
            stats: ReaderStats::default(),
            batch: Vec::new(),
            granted_at: Instant::now(),
        };
        for cpu in 0..reader.regions.nr_cpus {
            reader.grant_samples(cpu, SAMPLES_PER_SEC);
        }
        reader
    }

    /// Adds `grant` samples to what `cpu` may still send, up to a second's worth: a token
    /// bucket. Unused samples carry over up to that cap, so a call soon after another (the
    /// drain right after the reader thread, or a scrape right after start) does not take back
    /// what was granted before; it only adds what the time since then earned.
    fn grant_samples(&self, cpu: u32, grant: u64) {
        let st = self.cpu_state(cpu);
        // SAFETY: field pointers of a live CpuState.
        let (sent_p, limit_p) = unsafe { (&raw mut (*st).samples, &raw mut (*st).sample_limit) };
        let sent = load(sent_p, Ordering::Relaxed);
        let unused = load(limit_p, Ordering::Relaxed).saturating_sub(sent);
        let want = sent.saturating_add(unused.saturating_add(grant).min(SAMPLES_PER_SEC));
        // Only store on a change: an idle CPU's line stays clean.
        if load(limit_p, Ordering::Relaxed) != want {
            store(limit_p, want, Ordering::Relaxed);
        }
    }

    /// Index of the line named by `tag` among all CPUs' lines; `None` if `tag` names no line.
    fn line_index(&self, cpu: u32, tag: u32) -> Option<usize> {
        let line = tag & ((1 << CACHE_TAG_LINE_BITS) - 1);
        let lines = self.regions.lines;
        (line < lines).then(|| cpu as usize * lines as usize + line as usize)
    }

    fn cpu_state(&self, cpu: u32) -> *mut CpuState {
        // SAFETY: `cpu < nr_cpus`, the length of the array (checked by callers' loops).
        unsafe { self.regions.cpus.add(cpu as usize) }
    }

    /// Consumes every CPU's flush log; returns the records read.
    pub(super) fn consume_logs(&mut self) -> u64 {
        self.consume_logs_at(Instant::now())
    }

    /// [`CacheReader::consume_logs`] at `now`, which sets the samples granted.
    fn consume_logs_at(&mut self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.granted_at);
        let grant = (since.as_secs_f64() * SAMPLES_PER_SEC as f64).min(SAMPLES_PER_SEC as f64);
        // Whole samples only; the remainder waits for the next call.
        let grant = grant as u64;
        if grant > 0 {
            self.granted_at = now;
        }
        let mut total = 0;
        for cpu in 0..self.regions.nr_cpus {
            if grant > 0 {
                self.grant_samples(cpu, grant);
            }
            let st = self.cpu_state(cpu);
            // SAFETY: field pointers of a live CpuState.
            let (head_p, tail_p) = unsafe { (&raw mut (*st).head, &raw mut (*st).tail) };
            // Acquire: the records the kernel wrote before advancing `head` are visible.
            let head = load(head_p, Ordering::Acquire);
            let tail = load(tail_p, Ordering::Relaxed);
            let n = head.wrapping_sub(tail);
            if n == 0 {
                continue;
            }
            let records = u64::from(self.regions.log_records);
            // The kernel never runs more than a log ahead; anything else is a corrupt state,
            // which the reader resolves by skipping to `head` rather than reading garbage.
            if n > records {
                tracing::warn!(
                    cpu,
                    head,
                    tail,
                    "drop-cache log positions inconsistent; skipping"
                );
                store(tail_p, head, Ordering::Release);
                continue;
            }
            // Copy first, aggregate second: the records were just written by another CPU, so
            // each line is a cross-core miss, and a plain bulk copy keeps many of them in
            // flight where per-record work between the loads would wait for each in turn.
            // In chunks of a fixed buffer: one sized to the whole run would be mapped afresh
            // (and its pages faulted in) at each call.
            let base = cpu as usize * records as usize;
            let mut batch = std::mem::take(&mut self.batch);
            let mut pos = tail;
            while pos != head {
                let start = (pos % records) as usize;
                let len = (head.wrapping_sub(pos) as usize)
                    .min(records as usize - start)
                    .min(BATCH_RECORDS);
                batch.clear();
                batch.reserve_exact(len);
                // SAFETY: `start + len <= records`: the run lies inside this CPU's log; the
                // kernel does not write these slots until `tail` passes them, so nothing
                // changes under the copy; `batch` is empty with room for `len` entries, and
                // CacheEntry is plain data.
                unsafe {
                    let log = self.regions.log.add(base + start);
                    std::ptr::copy_nonoverlapping(log, batch.as_mut_ptr(), len);
                    batch.set_len(len);
                }
                pos = pos.wrapping_add(len as u64);
                // Release: the record loads above complete before the kernel may reuse the
                // slots.
                store(tail_p, pos, Ordering::Release);
                for rec in &mut batch {
                    self.flushed(cpu, rec);
                }
                self.tally.add_records(&batch);
            }
            self.batch = batch;
            total += n;
        }
        self.stats.records += total;
        total
    }

    /// Ends a flush record's incarnation: reduces the record to what was not emitted of it.
    fn flushed(&mut self, cpu: u32, rec: &mut CacheEntry) {
        if rec.tag == CACHE_ONE_SHOT_TAG {
            // One drop counted past the cache: no incarnation, nothing emitted of it before.
            self.stats.one_shot += 1;
            return;
        }
        let slot = self
            .line_index(cpu, rec.tag)
            .and_then(|i| self.emitted.get_mut(i));
        let done = match slot {
            Some(e) if e.is_some_and(|e| e.tag == rec.tag) => {
                e.take().map(|e| (e.packets, e.bytes))
            }
            _ if self.displaced.is_empty() => None,
            _ => self.displaced.remove(&(cpu, rec.tag)),
        };
        if let Some((packets, bytes)) = done {
            rec.packets = rec.packets.saturating_sub(packets);
            rec.bytes = rec.bytes.saturating_sub(bytes);
        }
    }

    /// Snapshots every CPU's live lines. Call after [`CacheReader::consume_logs`].
    ///
    /// A CPU whose [`CpuState::counted`] has not moved since the last whole snapshot of its
    /// lines is skipped: the kernel stores that count after every change to a line, so an
    /// idle CPU costs one load however large its cache.
    pub(super) fn snapshot(&mut self) {
        let lines = self.regions.lines as usize;
        for cpu in 0..self.regions.nr_cpus {
            let st = self.cpu_state(cpu);
            // SAFETY: field pointers of a live CpuState.
            let (seq, counted_p) = unsafe { (&raw mut (*st).seq, &raw mut (*st).counted) };
            // Acquire, before any line: a line change the count includes is then visible.
            let counted = load(counted_p, Ordering::Acquire);
            let at = &mut self.snapshot_at[cpu as usize];
            if *at == Some(counted) {
                continue;
            }
            *at = Some(counted);
            let busy = self.stats.busy_lines;
            for line in 0..lines {
                let idx = cpu as usize * lines + line;
                let mut copy = None;
                for _ in 0..SNAPSHOT_TRIES {
                    let s1 = load(seq, Ordering::Acquire);
                    if s1 % 2 == 1 {
                        std::hint::spin_loop();
                        continue;
                    }
                    // SAFETY: `idx < nr_cpus * lines`; a racing kernel store is caught by the
                    // sequence check (key and tag change only under an odd `seq`).
                    let e = unsafe { std::ptr::read_volatile(self.regions.cache.add(idx)) };
                    fence(Ordering::Acquire);
                    if load(seq, Ordering::Relaxed) == s1 {
                        copy = Some(e);
                        break;
                    }
                }
                match copy {
                    Some(e) if e.packets != 0 => self.live(cpu, &e),
                    Some(_) => {}
                    None => self.stats.busy_lines += 1,
                }
            }
            if self.stats.busy_lines != busy {
                // Lines left for later: the next snapshot reads this CPU again.
                self.snapshot_at[cpu as usize] = None;
            }
        }
    }

    /// Accounts a snapshot of a live line.
    fn live(&mut self, cpu: u32, e: &CacheEntry) {
        let Some(slot) = self
            .line_index(cpu, e.tag)
            .and_then(|i| self.emitted.get_mut(i))
        else {
            // Not a line of this CPU: the kernel never writes such a tag. Count it whole
            // rather than lose it.
            self.tally.add(&e.key, e.packets, e.bytes);
            return;
        };
        let (packets, bytes) = match slot {
            Some(prev) if prev.tag == e.tag => {
                // Both only grow within an incarnation; a snapshot that caught a hit half done
                // (packets stored, bytes not yet) is behind on bytes only, never ahead.
                let d = (
                    e.packets.saturating_sub(prev.packets),
                    e.bytes.saturating_sub(prev.bytes),
                );
                prev.packets = prev.packets.max(e.packets);
                prev.bytes = prev.bytes.max(e.bytes);
                if d == (0, 0) {
                    // An idle line: nothing to add, and no hashing of its key.
                    return;
                }
                d
            }
            _ => {
                let fresh = Emitted {
                    tag: e.tag,
                    packets: e.packets,
                    bytes: e.bytes,
                };
                if let Some(old) = slot.replace(fresh) {
                    // Its flush record is still unread in the log.
                    self.displaced
                        .insert((cpu, old.tag), (old.packets, old.bytes));
                }
                (e.packets, e.bytes)
            }
        };
        self.tally.add(&e.key, packets, bytes);
    }

    /// Hands out the deltas accumulated since the previous call.
    pub(super) fn take(&mut self, out: &mut Vec<(FlowKey, Counter)>) {
        self.tally.take(out);
    }

    /// Statistics (cumulative counts, current size).
    pub(super) fn stats(&self) -> ReaderStats {
        let sample_skips = (0..self.regions.nr_cpus)
            .map(|cpu| {
                // SAFETY: field pointer of a live CpuState.
                load(
                    unsafe { &raw mut (*self.cpu_state(cpu)).sample_skips },
                    Ordering::Relaxed,
                )
            })
            .fold(0u64, u64::wrapping_add);
        ReaderStats {
            tracked: self.emitted.iter().flatten().count() + self.displaced.len(),
            refused: self.tally.refused(),
            sample_skips,
            ..self.stats
        }
    }
}

/// The reader thread's longest sleep without a wake-up from the kernel. The drains consume the
/// logs too; this only bounds how long a lost wake-up (the wake ring full) can leave a log
/// filling.
const SLEEP_MAX_MS: i32 = 1000;

/// The reader shared between the log-reading thread and [`super::Capture::drain`].
#[derive(Debug)]
pub(super) struct CacheHandle {
    reader: Arc<Mutex<CacheReader>>,
    stop: Arc<AtomicBool>,
    /// Written to stop the thread without waiting for its sleep to end.
    stop_fd: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CacheHandle {
    /// Starts the thread that keeps the flush logs consumed between drains: at a million
    /// evictions a second a log fills in milliseconds, not in the drain's second. The thread
    /// sleeps until the kernel says on `wake` that a log is a quarter full.
    pub(super) fn start(reader: CacheReader, mut wake: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let stop_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let reader = Arc::new(Mutex::new(reader));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let reader = Arc::clone(&reader);
            let stop = Arc::clone(&stop);
            let stop_fd = Arc::clone(&stop_fd);
            std::thread::Builder::new()
                .name("drop-log".to_owned())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        sleep_until_woken(wake.as_raw_fd(), stop_fd.as_raw_fd());
                        // The items only say "a log needs reading": every log is read.
                        while wake.next().is_some() {}
                        lock(&reader).consume_logs();
                    }
                })?
        };
        Ok(Self {
            reader,
            stop,
            stop_fd,
            thread: Some(thread),
        })
    }

    /// Consumes the logs, snapshots the live lines and hands out every delta since the
    /// previous call.
    pub(super) fn collect(&self, out: &mut Vec<(FlowKey, Counter)>) -> ReaderStats {
        let mut r = lock(&self.reader);
        r.consume_logs();
        r.snapshot();
        r.take(out);
        r.stats()
    }
}

impl Drop for CacheHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our own eventfd. A failure leaves the
        // thread to notice `stop` after its longest sleep.
        unsafe { libc::write(self.stop_fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("drop-log reader thread panicked");
        }
    }
}

/// Sleeps until `wake` or `stop` is readable, or [`SLEEP_MAX_MS`] has passed.
fn sleep_until_woken(wake: RawFd, stop: RawFd) {
    let mut fds = [
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a live array of two pollfd; an error (EINTR) just ends the sleep early.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, SLEEP_MAX_MS) };
}

/// The reader, even if a holder panicked: its state is consistent between method calls, which
/// never panic half-way through an update.
fn lock(m: &Mutex<CacheReader>) -> MutexGuard<'_, CacheReader> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Atomic load of a `u64` of a [`CpuState`] in the regions.
fn load(p: *mut u64, order: Ordering) -> u64 {
    // SAFETY: callers pass a field of a CpuState inside the regions, 8-byte aligned and alive
    // as long as the reader; AtomicU64 has u64's layout, and every other access to it is
    // atomic or the kernel's.
    unsafe { AtomicU64::from_ptr(p) }.load(order)
}

/// Atomic store to a `u64` of a [`CpuState`] in the regions.
fn store(p: *mut u64, v: u64, order: Ordering) {
    // SAFETY: as in `load`.
    unsafe { AtomicU64::from_ptr(p) }.store(v, order);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::drain::tests::key;

    /// The buffers behind a test reader's regions.
    #[derive(Debug)]
    struct Buffers {
        _cache: Vec<CacheEntry>,
        _log: Vec<CacheEntry>,
        _cpus: Vec<CpuState>,
    }

    /// A fake kernel writing the cache and log as the program does, through the same raw
    /// pointers the reader reads (single-threaded: it never runs during a read).
    struct Kernel {
        cache: *mut CacheEntry,
        log: *mut CacheEntry,
        cpus: *mut CpuState,
        lines: u32,
        log_records: u32,
    }

    impl Kernel {
        fn cpu(&mut self, cpu: u32) -> &mut CpuState {
            // SAFETY: `cpu` is below the test's CPU count; the buffers outlive the test body.
            unsafe { &mut *self.cpus.add(cpu as usize) }
        }

        /// Counts one drop of `key` in `line` of `cpu`; false when the log is full.
        fn drop(&mut self, cpu: u32, line: u32, key: FlowKey, len: u64) -> bool {
            let records = self.log_records;
            // SAFETY: indexes inside the buffers sized by `setup`.
            let e = unsafe { &mut *self.cache.add((cpu * self.lines + line) as usize) };
            if e.packets != 0 && e.key == key {
                e.packets += 1;
                e.bytes += len;
                self.cpu(cpu).counted += 1;
                return true;
            }
            let log = self.log;
            let st = self.cpu(cpu);
            if e.packets != 0 {
                if st.head - st.tail >= u64::from(records) {
                    return false;
                }
                let r = (cpu * records) as usize + (st.head % u64::from(records)) as usize;
                // SAFETY: inside the log buffer.
                unsafe { *log.add(r) = *e };
                st.head += 1;
            }
            // As the program: the install count skips 0, so no line is a one-drop tag.
            let installs = ((e.tag >> CACHE_TAG_LINE_BITS).wrapping_add(1))
                .wrapping_shl(CACHE_TAG_LINE_BITS)
                .max(1 << CACHE_TAG_LINE_BITS);
            *e = CacheEntry {
                key,
                tag: installs | line,
                packets: 1,
                bytes: len,
            };
            st.counted += 1;
            true
        }
    }

    impl Kernel {
        /// Counts one drop of `key` past the cache of `cpu`, as a thrashing CPU does; false
        /// when the log is full.
        fn one_shot(&mut self, cpu: u32, key: FlowKey, len: u64) -> bool {
            let records = self.log_records;
            let log = self.log;
            let st = self.cpu(cpu);
            if st.head - st.tail >= u64::from(records) {
                return false;
            }
            let r = (cpu * records) as usize + (st.head % u64::from(records)) as usize;
            // SAFETY: inside the log buffer.
            unsafe {
                *log.add(r) = CacheEntry {
                    key,
                    tag: CACHE_ONE_SHOT_TAG,
                    packets: 1,
                    bytes: len,
                };
            }
            st.head += 1;
            true
        }
    }

    /// Cache lines per CPU in the tests.
    const LINES: u32 = 64;

    fn setup(nr_cpus: u32, log_records: u32) -> (CacheReader, Kernel) {
        let mut cache = vec![CacheEntry::default(); (nr_cpus * LINES) as usize];
        let mut log = vec![CacheEntry::default(); (nr_cpus * log_records) as usize];
        let mut cpus = vec![CpuState::default(); nr_cpus as usize];
        let k = Kernel {
            cache: cache.as_mut_ptr(),
            log: log.as_mut_ptr(),
            cpus: cpus.as_mut_ptr(),
            lines: LINES,
            log_records,
        };
        let regions = Regions {
            cache: k.cache,
            log: k.log,
            cpus: k.cpus,
            nr_cpus,
            lines: LINES,
            log_records,
            _owner: Box::new(Buffers {
                _cache: cache,
                _log: log,
                _cpus: cpus,
            }),
        };
        (CacheReader::new(regions, 1 << 20), k)
    }

    fn collect(r: &mut CacheReader) -> FastMap<FlowKey, Counter> {
        r.consume_logs();
        r.snapshot();
        let mut v = Vec::new();
        r.take(&mut v);
        let mut m = FastMap::default();
        for (k, c) in v {
            let e: &mut Counter = m.entry(k).or_default();
            e.packets += c.packets;
            e.bytes += c.bytes;
        }
        m
    }

    #[test]
    fn snapshots_and_flushes_of_one_incarnation_add_up_exactly() {
        let (mut r, mut k) = setup(2, 8);
        for _ in 0..3 {
            assert!(k.drop(1, 5, key(80), 100));
        }
        let first = collect(&mut r);
        assert_eq!(first[&key(80)].packets, 3);
        // Two more, then another key takes the line: the flush carries 5 in all, of which
        // 3 were already emitted.
        assert!(k.drop(1, 5, key(80), 100));
        assert!(k.drop(1, 5, key(80), 100));
        assert!(k.drop(1, 5, key(81), 10));
        let second = collect(&mut r);
        assert_eq!(second[&key(80)].packets, 2);
        assert_eq!(second[&key(80)].bytes, 200);
        assert_eq!(second[&key(81)].packets, 1);
        // Nothing new: nothing emitted, and only the live incarnation is tracked.
        assert!(collect(&mut r).is_empty());
        assert_eq!(r.stats().tracked, 1);
    }

    #[test]
    fn a_line_replaced_between_the_log_and_the_snapshot_is_still_exact() {
        let (mut r, mut k) = setup(1, 8);
        assert!(k.drop(0, 2, key(80), 100));
        assert!(k.drop(0, 2, key(80), 100));
        assert_eq!(collect(&mut r)[&key(80)].packets, 2);
        assert!(k.drop(0, 2, key(80), 100));
        // The reader has consumed the log when the kernel replaces the line: the snapshot
        // sees the new incarnation while the old one's flush record is still unread.
        r.consume_logs();
        assert!(k.drop(0, 2, key(81), 10));
        r.snapshot();
        let mut v = Vec::new();
        r.take(&mut v);
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].0, v[0].1.packets), (key(81), 1));
        assert_eq!(r.stats().tracked, 2);
        let m = collect(&mut r);
        assert_eq!(m[&key(80)].packets, 1);
        assert_eq!(m[&key(80)].bytes, 100);
        assert!(!m.contains_key(&key(81)));
        assert_eq!(r.stats().tracked, 1);
    }

    #[test]
    fn a_one_drop_record_is_counted_whole_and_ends_no_incarnation() {
        let (mut r, mut k) = setup(1, 16);
        // Line 0 (whose index is the one-drop tag's line bits) holds key 80, read with 2.
        assert!(k.drop(0, 0, key(80), 100));
        assert!(k.drop(0, 0, key(80), 100));
        assert_eq!(collect(&mut r)[&key(80)].packets, 2);
        // Drops past the cache, of that key and of another, while the line lives on.
        assert!(k.one_shot(0, key(80), 100));
        assert!(k.one_shot(0, key(82), 7));
        assert!(k.drop(0, 0, key(80), 100));
        let m = collect(&mut r);
        assert_eq!((m[&key(80)].packets, m[&key(80)].bytes), (2, 200));
        assert_eq!((m[&key(82)].packets, m[&key(82)].bytes), (1, 7));
        // The line's flush record carries 3, all emitted already: nothing more.
        assert!(k.drop(0, 0, key(81), 1));
        let m = collect(&mut r);
        assert!(!m.contains_key(&key(80)), "{m:?}");
        assert_eq!(m[&key(81)].packets, 1);
        assert_eq!(r.stats().one_shot, 2);
        assert_eq!(r.stats().records, 3);
    }

    #[test]
    fn a_key_returning_to_its_line_is_a_new_incarnation() {
        let (mut r, mut k) = setup(1, 16);
        let mut sent = 0u64;
        let mut got = 0u64;
        for round in 0..10u16 {
            // Alternate two keys in one line, with reads in between at odd moments.
            for i in 0..=round {
                assert!(k.drop(0, 3, key(1 + (i % 2)), 1));
                sent += 1;
            }
            got += collect(&mut r).values().map(|c| c.packets).sum::<u64>();
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn a_full_log_refuses_the_eviction_and_the_reader_frees_it() {
        let (mut r, mut k) = setup(1, 2);
        assert!(k.drop(0, 0, key(1), 1));
        assert!(k.drop(0, 0, key(2), 1));
        assert!(k.drop(0, 0, key(3), 1));
        // Two unread records: the next eviction is refused (the kernel counts it in FLOWS).
        assert!(!k.drop(0, 0, key(4), 1));
        let m = collect(&mut r);
        assert_eq!(m.values().map(|c| c.packets).sum::<u64>(), 3);
        assert!(k.drop(0, 0, key(4), 1));
        assert_eq!(collect(&mut r)[&key(4)].packets, 1);
    }

    #[test]
    fn samples_are_granted_by_the_time_since_the_last_grant() {
        let (mut r, mut k) = setup(2, 4);
        let t0 = r.granted_at;
        assert_eq!(k.cpu(1).sample_limit, SAMPLES_PER_SEC);
        // CPU 1 spent its grant; 10 ms later it may send 32 more. CPU 0 sent nothing: it
        // keeps its second's worth, no more.
        k.cpu(1).samples = SAMPLES_PER_SEC;
        r.consume_logs_at(t0 + std::time::Duration::from_millis(10));
        assert_eq!(k.cpu(1).sample_limit, SAMPLES_PER_SEC + 32);
        assert_eq!(k.cpu(0).sample_limit, SAMPLES_PER_SEC);
        // Too soon for a whole sample: nothing changes, and the time is not lost.
        r.consume_logs_at(t0 + std::time::Duration::from_micros(10_100));
        assert_eq!(k.cpu(1).sample_limit, SAMPLES_PER_SEC + 32);
        // A call soon after adds what the time earned; it does not take back the 32.
        r.consume_logs_at(t0 + std::time::Duration::from_micros(10_400));
        assert_eq!(k.cpu(1).sample_limit, SAMPLES_PER_SEC + 33);
        // CPU 1 sends 10 of them; after a long sleep it may send a second's worth, no more.
        k.cpu(1).samples += 10;
        r.consume_logs_at(t0 + std::time::Duration::from_secs(60));
        assert_eq!(k.cpu(1).sample_limit, 2 * SAMPLES_PER_SEC + 10);
        assert_eq!(k.cpu(0).sample_limit, SAMPLES_PER_SEC);
    }

    #[test]
    fn sample_skips_are_summed_over_cpus() {
        let (r, mut k) = setup(3, 4);
        assert_eq!(r.stats().sample_skips, 0);
        k.cpu(0).sample_skips = 5;
        k.cpu(2).sample_skips = 7;
        assert_eq!(r.stats().sample_skips, 12);
    }

    #[test]
    fn a_cpu_whose_count_stands_still_is_not_read_again() {
        let (mut r, mut k) = setup(2, 4);
        assert!(k.drop(0, 3, key(9), 1));
        assert!(k.drop(1, 4, key(10), 1));
        assert_eq!(collect(&mut r).len(), 2);
        // A change the kernel never makes (a line moving without `counted`) shows that CPU 0's
        // lines are not read while its count stands still...
        // SAFETY: inside the cache buffer, which outlives the test body.
        unsafe { (*k.cache.add(3)).packets += 5 };
        assert!(k.drop(1, 4, key(10), 1));
        let m = collect(&mut r);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m[&key(10)].packets, 1);
        // ...and are, with everything since the last read, once it moves.
        k.cpu(0).counted += 1;
        assert_eq!(collect(&mut r)[&key(9)].packets, 5);
    }

    #[test]
    fn a_line_changing_under_the_reader_is_left_for_later_not_misread() {
        let (mut r, mut k) = setup(1, 4);
        assert!(k.drop(0, 7, key(9), 1));
        // The kernel is inside an install on this CPU: every line is left alone.
        k.cpu(0).seq = 1;
        assert!(collect(&mut r).is_empty());
        assert_eq!(r.stats().busy_lines, u64::from(LINES));
        // Its `counted` has not moved, but lines were left: the CPU is read again.
        k.cpu(0).seq = 2;
        assert_eq!(collect(&mut r)[&key(9)].packets, 1);
    }
}
