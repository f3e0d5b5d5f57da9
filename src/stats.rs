//! What burn-offload counts, in one place: [`OpStats`] (per thread: what ops did with
//! offloaded tensors), [`PrefetchStats`] (per model, through its
//! [`OffloadContext`](crate::OffloadContext), and summed over the process) and
//! [`HostMemoryStats`] (per process: host memory is the process's).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts of what the current thread's ops did with offloaded and resident float tensors.
///
/// Thread-local, so concurrent tests do not see each other's work; read it with
/// [`op_stats`] and reset it with [`reset_op_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpStats {
    /// Bytes of float tensors created in device memory by creation ops (from data, zeros,
    /// random, …) and by moves to the device — *not* counting transient copies.
    pub device_created_bytes: u64,
    /// Bytes of float tensors created directly in host memory.
    pub host_created_bytes: u64,
    /// Transient device copies of offloaded tensors that ops consumed (copy mode, fallbacks,
    /// and in prefetch mode every copy, prefetched or not).
    pub transient_uploads: u64,
    /// Bytes moved by those transient copies.
    pub transient_upload_bytes: u64,
    /// Ops that read an offloaded tensor in place (zero-copy).
    pub zero_copy_ops: u64,
    /// Host bytes those ops read in place: a matmul's whole weight view, an embedding's
    /// gathered rows (one per index).
    pub zero_copy_bytes: u64,
    /// Results of view ops (reshape, slice, `unfold`, …) of a prefetched copy in a copy-engine
    /// ring that were copied out of the ring (the region is overwritten once released).
    pub ring_copy_outs: u64,
}

thread_local! {
    static OP_STATS: Cell<OpStats> = const { Cell::new(OpStats {
        device_created_bytes: 0,
        host_created_bytes: 0,
        transient_uploads: 0,
        transient_upload_bytes: 0,
        zero_copy_ops: 0,
        zero_copy_bytes: 0,
        ring_copy_outs: 0,
    }) };
}

/// The current thread's [`OpStats`].
pub fn op_stats() -> OpStats {
    OP_STATS.with(Cell::get)
}

/// Resets the current thread's [`OpStats`] to zero.
pub fn reset_op_stats() {
    OP_STATS.with(|s| s.set(OpStats::default()))
}

/// Updates the current thread's [`OpStats`].
pub(crate) fn record(f: impl FnOnce(&mut OpStats)) {
    OP_STATS.with(|s| {
        let mut v = s.get();
        f(&mut v);
        s.set(v)
    })
}

/// Prefetch counters: per model from
/// [`OffloadContext::prefetch_stats`](crate::OffloadContext::prefetch_stats) (or
/// [`OffloadReport::prefetch_stats`](crate::OffloadReport::prefetch_stats)), summed over every
/// model of the process from [`prefetch_stats`].
///
/// Not thread-local like [`OpStats`]: the copies are made on another thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchStats {
    /// Requests served by a prefetched copy (ready, or waited for while in flight).
    pub hits: u64,
    /// Requests uploaded on demand because no cycle predicted them (learning, a mismatch, or a
    /// tensor larger than the lookahead).
    pub misses: u64,
    /// Requests the cycle predicted, uploaded on demand because the background thread had not
    /// started their copy yet.
    pub late: u64,
    /// Requests that differed from the predicted one (the prefetched copies were dropped).
    pub mismatches: u64,
    /// Cycles learned (the first one included).
    pub relearns: u64,
    /// Copies made by background threads.
    pub prefetched: u64,
    /// Of those, copies dropped without being used (mismatch, model dropped).
    pub wasted: u64,
    /// Bytes of prefetched copies alive now (uploaded or in flight, not yet handed to an op).
    pub alive_bytes: u64,
    /// The most `alive_bytes` seen since the last reset.
    pub peak_alive_bytes: u64,
    /// Times a prefetch thread let go of the host sources its uploads still held
    /// ([`OffloadTarget::release_uploads`](crate::inner::OffloadTarget::release_uploads); on
    /// CUDA two flushes of its stream, the second of which holds up CubeCL's device thread
    /// until every copy queued on that stream is done). It happens only when the thread has
    /// nothing left to prefetch or learn (the model was dropped), so it should not grow while
    /// a model runs.
    pub releases: u64,
    /// The most device memory a prefetch thread's own allocations held right after one of its
    /// copies, as the target measures it
    /// ([`OffloadTarget::device_bytes_in_use`](crate::inner::OffloadTarget::device_bytes_in_use);
    /// on CUDA the `bytes_in_use` of the pool of the thread's CubeCL stream: its copies not
    /// handed out yet and those ops still hold, plus the output of any op that worked in place
    /// on a copy). Measured only while
    /// [`set_prefetch_memory_probe`](crate::prefetch::set_prefetch_memory_probe) is on; 0 where
    /// the target cannot tell (the CPU target). The largest single reading.
    pub peak_device_bytes: u64,
    /// Nanoseconds the prefetch threads spent in the target's `prefetch_upload`, i.e. queueing
    /// their copies. On CUDA that is CubeCL's device queue, which makes a caller spin while it
    /// is full (CubeCL's device thread, which also launches every op thread's kernels, is busy
    /// or blocked), and, every 256 MiB of copies, a flush of the thread's stream that waits on
    /// the GPU for the copies queued before the previous one: a large share of the run's time
    /// here says the host side or those flushes set the pace.
    pub upload_ns: u64,
    /// Nanoseconds requests spent waiting for a predicted copy that was being queued (a copy
    /// that had not been started is uploaded on demand instead, see `late`).
    pub wait_ns: u64,
    /// Groups of reads copied into a copy engine's ring in one fill each
    /// ([`PrefetchCopies::Engine`](crate::PrefetchCopies::Engine)); 0 on CubeCL's path.
    pub ring_fills: u64,
}

/// One counter of [`PrefetchStats`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Hits,
    Misses,
    Late,
    Mismatches,
    Relearns,
    Prefetched,
    Wasted,
    Releases,
    UploadNs,
    WaitNs,
    RingFills,
}

const COUNTERS: usize = 11;

/// The atomics behind [`PrefetchStats`]: one set per context, one for the process.
#[derive(Default)]
pub(crate) struct PrefetchCounters {
    counts: [AtomicU64; COUNTERS],
    alive: AtomicU64,
    peak_alive: AtomicU64,
    peak_device: AtomicU64,
}

/// Every context's counters added up: what [`prefetch_stats`] reads. Process-wide because it
/// is the sum over the process's models.
static PROCESS: PrefetchCounters = PrefetchCounters {
    counts: [const { AtomicU64::new(0) }; COUNTERS],
    alive: AtomicU64::new(0),
    peak_alive: AtomicU64::new(0),
    peak_device: AtomicU64::new(0),
};

impl PrefetchCounters {
    fn each(&self, f: impl Fn(&PrefetchCounters)) {
        f(self);
        f(&PROCESS);
    }

    /// Adds `n` to `counter`.
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.each(|c| {
            c.counts[counter as usize].fetch_add(n, Ordering::AcqRel);
        });
    }

    /// Adds one to `counter`.
    pub(crate) fn bump(&self, counter: Counter) {
        self.add(counter, 1)
    }

    /// Adds the time since `start` to `counter`, in nanoseconds.
    pub(crate) fn add_elapsed(&self, counter: Counter, start: Instant) {
        self.add(
            counter,
            u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
        )
    }

    /// `bytes` more prefetched bytes alive.
    pub(crate) fn add_alive(&self, bytes: u64) {
        self.each(|c| {
            let now = c.alive.fetch_add(bytes, Ordering::AcqRel) + bytes;
            c.peak_alive.fetch_max(now, Ordering::AcqRel);
        });
    }

    /// `bytes` fewer prefetched bytes alive.
    pub(crate) fn sub_alive(&self, bytes: u64) {
        self.each(|c| {
            c.alive.fetch_sub(bytes, Ordering::AcqRel);
        });
    }

    /// A reading of the device memory the prefetch thread holds.
    pub(crate) fn device_reading(&self, bytes: u64) {
        self.each(|c| {
            c.peak_device.fetch_max(bytes, Ordering::AcqRel);
        });
    }

    pub(crate) fn snapshot(&self) -> PrefetchStats {
        let count = |c: Counter| self.counts[c as usize].load(Ordering::Acquire);
        PrefetchStats {
            hits: count(Counter::Hits),
            misses: count(Counter::Misses),
            late: count(Counter::Late),
            mismatches: count(Counter::Mismatches),
            relearns: count(Counter::Relearns),
            prefetched: count(Counter::Prefetched),
            wasted: count(Counter::Wasted),
            alive_bytes: self.alive.load(Ordering::Acquire),
            peak_alive_bytes: self.peak_alive.load(Ordering::Acquire),
            releases: count(Counter::Releases),
            peak_device_bytes: self.peak_device.load(Ordering::Acquire),
            upload_ns: count(Counter::UploadNs),
            wait_ns: count(Counter::WaitNs),
            ring_fills: count(Counter::RingFills),
        }
    }

    /// Zeroes the counters (`alive_bytes` is a level: it stays, and the peak restarts from it).
    pub(crate) fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Release);
        }
        self.peak_device.store(0, Ordering::Release);
        self.peak_alive
            .store(self.alive.load(Ordering::Acquire), Ordering::Release);
    }
}

/// The [`PrefetchStats`] of every model of the process, added up.
pub fn prefetch_stats() -> PrefetchStats {
    PROCESS.snapshot()
}

/// Resets the process-wide sum of [`PrefetchStats`] (each model's own counters are reset with
/// [`OffloadContext::reset_prefetch_stats`](crate::OffloadContext::reset_prefetch_stats)).
pub fn reset_prefetch_stats() {
    PROCESS.reset()
}

/// A snapshot of the process-wide host memory counters (host memory is the process's: every
/// model's buffers count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct HostMemoryStats {
    /// Bytes of host memory currently allocated by burn-offload.
    pub live_bytes: usize,
    /// Number of host allocations currently alive.
    pub live_allocations: usize,
    /// Of `live_bytes`, the bytes that are pinned (page-locked, device-mapped).
    pub live_pinned_bytes: usize,
    /// Host allocations made since the process started.
    pub total_allocations: u64,
    /// The most bytes alive at once since the process started or since the last
    /// [`reset_host_memory_peak`] (e.g. while a checkpoint is loaded and quantized).
    pub peak_bytes: usize,
}

/// Reads the process-wide host memory counters.
pub fn host_memory_stats() -> HostMemoryStats {
    crate::host::host_memory_counters()
}

/// Starts [`HostMemoryStats::peak_bytes`] again from the bytes alive now.
pub fn reset_host_memory_peak() {
    crate::host::reset_peak()
}
