//! The copy engine: host-to-device copies on a copy stream of the engine's own, into a fixed
//! ring of device memory allocated once, ordered against the op streams that read them by
//! flags in device memory, with no host synchronisation on the way.
//!
//! # The protocol
//! Each copy lands in a [`Region`] of the ring; each region has a slot of flags: `copy_done`
//! and, per op queue (a *consumer*: CUDA's stream of an op thread), `reader_done`. Flags are
//! 32-bit counters that only grow (compared cyclically, as `cuStreamWaitValue32`'s `GEQ`
//! does); a region's values are its slot's generation.
//!
//! | who | does, in order | on |
//! |---|---|---|
//! | copy side | wait `reader_done[s][c] >= g` for every consumer `c` that read a region being overwritten | copy stream |
//! | copy side | the copies of one group, batched ([`CopyStreams::copy`]) | copy stream |
//! | copy side | `copy_done[s] = g` for each region of the group | copy stream |
//! | op side, [`acquire`](CopyEngine::acquire) | wait `copy_done[s] >= g`, before the region's first reader | op stream |
//! | op side, [`release`](CopyEngine::release) | `reader_done[s][c] = g`, behind the region's last reader | op stream |
//!
//! The host never waits for the device: it only waits, on the copy side, for the op side to
//! *queue* its releases when the ring is full ([`CopyEngine::fill`] blocks then). A region is
//! overwritten only once every consumer that took it has released it, or once it was
//! discarded untaken ([`CopyEngine::discard`], e.g. the read order changed: nothing read it,
//! and the copy stream runs in order). So device memory is exactly the ring, and the copy
//! path never goes through the op streams' allocator, cleanup or flush paths.
//!
//! # Implementations of [`CopyStreams`]
//! - [`emulated::EmulatedStreams`]: the CPU reference, a thread per stream and flags behind a
//!   condition variable; CI runs the protocol on it (ordering, reuse, several op threads, an
//!   order change, an engine dropped mid-cycle), with faults that skip a wait to show the
//!   checks catch a broken protocol.
//! - `cuda::CudaCopyStreams` (feature `cuda`): a non-blocking CUDA stream, `cuStreamWaitValue32`
//!   and `cuStreamWriteValue32` on it, `cuMemcpyBatchAsync` where the driver has it (CUDA 13;
//!   a loop of `cuMemcpyHtoDAsync` otherwise), and two one-thread kernels launched on the op
//!   thread's CubeCL stream for the op side.

pub mod emulated;
mod ring;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub use ring::{Busy, Refused, Region, Ring, Wait};

use crate::host::HostBuffer;

/// What a copy engine can refuse or fail at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// A copy larger than the whole ring.
    #[error(
        "a copy of {bytes} bytes does not fit in a ring of {capacity} bytes: make the ring larger or the copy smaller"
    )]
    TooLarge {
        /// Bytes of the copy.
        bytes: u64,
        /// Bytes of the ring.
        capacity: u64,
    },
    /// A group of copies that the ring cannot hold at once (with the tail a wrap skips).
    #[error(
        "a group of copies of {bytes} bytes does not fit in a ring of {capacity} bytes (a wrap may skip up to one copy's size at the end): make groups at most half the ring"
    )]
    GroupTooLarge {
        /// Bytes of the group.
        bytes: u64,
        /// Bytes of the ring.
        capacity: u64,
    },
    /// A source range outside its host buffer.
    #[error("bytes {start}..{end} are outside a host buffer of {len} bytes")]
    OutOfBounds {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
        /// The buffer's length.
        len: usize,
    },
    /// More op queues than the engine has flags for.
    #[error("more than {max} op threads read from this copy engine: make it with more consumers")]
    TooManyConsumers {
        /// The engine's limit.
        max: usize,
    },
    /// The region is gone (overwritten, or discarded) or was not taken by this op queue.
    #[error("region {id} cannot be {what}: {why}")]
    Region {
        /// The region's id.
        id: u64,
        /// `taken` or `released`.
        what: &'static str,
        /// Why not.
        why: &'static str,
    },
    /// The engine was closed (its model was dropped) while a fill waited for room.
    #[error("the copy engine was closed")]
    Closed,
    /// The device refused an operation.
    #[error("the device refused a copy-engine operation: {reason}")]
    Device {
        /// The device's message.
        reason: String,
    },
}

/// Host bytes to copy: a range of a host buffer, checked to lie inside it when made.
#[derive(Debug, Clone)]
pub struct CopySource {
    buffer: Arc<HostBuffer>,
    range: Range<usize>,
}

impl CopySource {
    /// `buffer[range]`; [`CopyError::OutOfBounds`] unless `range` lies inside the buffer.
    pub fn new(buffer: Arc<HostBuffer>, range: Range<usize>) -> Result<Self, CopyError> {
        if range.start > range.end || range.end > buffer.len() {
            return Err(CopyError::OutOfBounds {
                start: range.start,
                end: range.end,
                len: buffer.len(),
            });
        }
        Ok(Self { buffer, range })
    }

    /// The whole buffer.
    pub fn whole(buffer: Arc<HostBuffer>) -> Self {
        let len = buffer.len();
        Self {
            buffer,
            range: 0..len,
        }
    }

    /// The buffer.
    pub fn buffer(&self) -> &Arc<HostBuffer> {
        &self.buffer
    }

    /// The bytes' range in the buffer (inside it).
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buffer.as_slice()[self.range.clone()]
    }

    /// Their number.
    pub fn len(&self) -> u64 {
        self.range.len() as u64
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// What a [`CopyStreams`] has room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingShape {
    /// Bytes of the ring.
    pub capacity: u64,
    /// Sets of flags (regions live at once).
    pub slots: usize,
    /// Op queues the flags have room for (at most 64).
    pub consumers: usize,
    /// Every region starts at a multiple of this many bytes (kernels' vector loads; at
    /// least 1).
    pub align: u64,
}

impl RingShape {
    /// Words of flags: `copy_done` per slot, then `reader_done` per slot and consumer.
    pub fn flag_words(&self) -> usize {
        self.slots * (1 + self.consumers)
    }

    /// The index of `copy_done[slot]` among the flag words.
    pub fn copy_flag(&self, slot: usize) -> Result<usize, CopyError> {
        self.reader_flag(slot, 0).map(|_| slot)
    }

    /// The index of `reader_done[slot][consumer]` among the flag words.
    pub fn reader_flag(&self, slot: usize, consumer: usize) -> Result<usize, CopyError> {
        if slot >= self.slots || consumer >= self.consumers {
            return Err(CopyError::Device {
                reason: format!(
                    "flag ({slot}, {consumer}) outside {} slots x {} consumers",
                    self.slots, self.consumers
                ),
            });
        }
        Ok(self.slots + slot * self.consumers + consumer)
    }

    /// Checks that `len` bytes at `offset` lie inside the ring.
    pub fn check_span(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.capacity)
        {
            return Err(CopyError::Device {
                reason: format!(
                    "bytes {offset}..{} are outside the ring of {} bytes",
                    offset.saturating_add(len),
                    self.capacity
                ),
            });
        }
        Ok(())
    }
}

/// One copy of a group: a source and where it goes in the ring.
#[derive(Debug, Clone)]
pub struct CopyJob {
    /// The host bytes.
    pub source: CopySource,
    /// Offset of the destination in the ring (`offset + source.len() <= capacity`).
    pub offset: u64,
}

/// The device side of the protocol (see the [module docs](self)): a copy stream, the op
/// queues of the threads that read the copies, a ring of device memory and the flags.
///
/// Flags are addressed by slot and consumer; `copy_*` calls are made by one thread at a time
/// (the engine's filler), `op_*` calls on the op thread whose queue they go to.
pub trait CopyStreams: Send + Sync {
    /// The ring's size, its flags and its alignment.
    fn shape(&self) -> RingShape;
    /// The op queue of the calling thread (CUDA: its CubeCL stream).
    fn current_queue(&self) -> u64;

    /// On the copy stream: later copy-stream work waits until `reader_done[slot][consumer]`
    /// has reached `value` (cyclically).
    fn copy_wait(&self, wait: Wait) -> Result<(), CopyError>;
    /// On the copy stream: the copies, in one batch where the device can. The implementation
    /// keeps the sources alive until the copies have completed, and checks that each lies
    /// inside the ring.
    fn copy(&self, jobs: Vec<CopyJob>) -> Result<(), CopyError>;
    /// On the copy stream, behind the copies: `copy_done[slot] = value`.
    fn copy_signal(&self, slot: usize, value: u32) -> Result<(), CopyError>;

    /// On the calling thread's op queue: later work waits until `copy_done[slot]` has reached
    /// `value`.
    fn op_wait(&self, slot: usize, value: u32) -> Result<(), CopyError>;
    /// On the calling thread's op queue, behind the work queued so far:
    /// `reader_done[slot][consumer] = value`.
    fn op_signal(&self, slot: usize, consumer: usize, value: u32) -> Result<(), CopyError>;
}

/// Inside an `impl CopyStreams`, every method forwarded to `$to` (an expression of `$self`
/// whose type implements [`CopyStreams`]).
macro_rules! delegate_copy_streams {
    ($self:ident => $to:expr) => {
        fn shape(&$self) -> RingShape {
            $to.shape()
        }
        fn current_queue(&$self) -> u64 {
            $to.current_queue()
        }
        fn copy_wait(&$self, wait: Wait) -> Result<(), CopyError> {
            $to.copy_wait(wait)
        }
        fn copy(&$self, jobs: Vec<CopyJob>) -> Result<(), CopyError> {
            $to.copy(jobs)
        }
        fn copy_signal(&$self, slot: usize, value: u32) -> Result<(), CopyError> {
            $to.copy_signal(slot, value)
        }
        fn op_wait(&$self, slot: usize, value: u32) -> Result<(), CopyError> {
            $to.op_wait(slot, value)
        }
        fn op_signal(&$self, slot: usize, consumer: usize, value: u32) -> Result<(), CopyError> {
            $to.op_signal(slot, consumer, value)
        }
    };
}
pub(crate) use delegate_copy_streams;

impl<T: CopyStreams + ?Sized> CopyStreams for Arc<T> {
    delegate_copy_streams!(self => (**self));
}

/// Guards of the engine on the model's path that a test can remove, to show that each is
/// needed (a run without it must see wrong values). Process-wide, and settable only with the
/// test-only feature `test-faults` ([`set_ring_faults`]): never for results that matter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingFaults {
    /// Release a region without first running the op thread's queued (lazy, fused) ops: a
    /// fill may overwrite it before a reader registered earlier has run.
    pub skip_drain: bool,
    /// Keep a view of a ring region that an op returns (a reshape or `unfold` of a prefetched
    /// weight) instead of copying it out: it outlives the region's release.
    pub skip_copy_out: bool,
    /// wgpu: write a ring region without first submitting the readers' recorded work
    /// (`Queue::write_buffer` lands ahead of it).
    pub skip_flush_before_write: bool,
}

#[cfg(feature = "test-faults")]
static FAULTS: Mutex<RingFaults> = Mutex::new(RingFaults {
    skip_drain: false,
    skip_copy_out: false,
    skip_flush_before_write: false,
});

/// Sets the [`RingFaults`] of the process (test-only feature `test-faults`).
#[cfg(feature = "test-faults")]
pub fn set_ring_faults(faults: RingFaults) {
    *FAULTS.lock().unwrap_or_else(|e| e.into_inner()) = faults;
}

/// Whether the guard `which` picks is removed (always `false` without `test-faults`).
#[cfg(feature = "test-faults")]
pub(crate) fn fault(which: fn(&RingFaults) -> bool) -> bool {
    which(&FAULTS.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(not(feature = "test-faults"))]
#[inline]
pub(crate) fn fault(_which: fn(&RingFaults) -> bool) -> bool {
    false
}

/// Whether a 32-bit flag value `flag` has reached `value`, cyclically (CUDA's
/// `CU_STREAM_WAIT_VALUE_GEQ`: `(int32_t)(flag - value) >= 0`).
pub fn reached(flag: u32, value: u32) -> bool {
    (flag.wrapping_sub(value) as i32) >= 0
}

struct State {
    ring: Ring,
    /// Op queue → consumer index.
    consumers: HashMap<u64, usize>,
    closed: bool,
}

/// The copy engine: the protocol of the [module docs](self) over a [`CopyStreams`].
pub struct CopyEngine<S: CopyStreams> {
    streams: S,
    state: Mutex<State>,
    /// Signals releases, discards and closing, to a fill waiting for room.
    changed: Condvar,
    /// Serialises fills: the copy stream's work goes in reservation order.
    filling: Mutex<()>,
    /// Whether a fill is waiting for room (a release or a discard).
    wants_room: AtomicBool,
}

impl<S: CopyStreams> CopyEngine<S> {
    /// An engine over `streams` (its ring, flags and streams).
    pub fn new(streams: S) -> Self {
        let shape = streams.shape();
        let ring = Ring::new(shape.capacity, shape.slots, shape.align);
        Self {
            streams,
            state: Mutex::new(State {
                ring,
                consumers: HashMap::new(),
                closed: false,
            }),
            changed: Condvar::new(),
            filling: Mutex::new(()),
            wants_room: AtomicBool::new(false),
        }
    }

    /// Whether a fill is waiting now for room that only a release or a discard gives: an op
    /// thread that holds regions must not wait for that fill's group.
    pub fn wants_room(&self) -> bool {
        self.wants_room.load(Ordering::Acquire)
    }

    /// The streams.
    pub fn streams(&self) -> &S {
        &self.streams
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies `sources` into the ring as one group: one batch of copies, after one set of
    /// waits. Blocks while the room they need is held by regions their readers have not
    /// released; [`CopyError::Closed`] if the engine is closed meanwhile.
    pub fn fill(&self, sources: Vec<CopySource>) -> Result<Vec<Region>, CopyError> {
        let _filling = self.filling.lock().unwrap_or_else(|e| e.into_inner());
        let capacity = self.streams.shape().capacity;
        if let Some(s) = sources.iter().find(|s| s.len() > capacity) {
            return Err(CopyError::TooLarge {
                bytes: s.len(),
                capacity,
            });
        }
        let mut regions: Vec<Region> = Vec::with_capacity(sources.len());
        let mut waits = Vec::new();
        let mut st = self.lock();
        for source in &sources {
            loop {
                if st.closed {
                    // Reserved regions of this group were never handed out.
                    st.ring.discard_all(&regions);
                    return Err(CopyError::Closed);
                }
                match st.ring.reserve(source.len()) {
                    Ok((region, w)) => {
                        regions.push(region);
                        waits.extend(w);
                        break;
                    }
                    Err(Busy::Held(id)) if regions.first().is_some_and(|r| id >= r.id) => {
                        // The group would overwrite itself: it does not fit in the ring
                        // (with the tail a wrap skips).
                        st.ring.discard_all(&regions);
                        return Err(CopyError::GroupTooLarge {
                            bytes: sources.iter().map(CopySource::len).sum(),
                            capacity,
                        });
                    }
                    Err(_) => {
                        self.wants_room.store(true, Ordering::Release);
                        st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                        self.wants_room.store(false, Ordering::Release);
                    }
                }
            }
        }
        drop(st);
        let queued = (|| {
            for wait in waits {
                self.streams.copy_wait(wait)?;
            }
            let jobs = sources
                .into_iter()
                .zip(&regions)
                .filter(|(s, _)| !s.is_empty())
                .map(|(source, r)| CopyJob {
                    source,
                    offset: r.offset,
                })
                .collect();
            self.streams.copy(jobs)?;
            for r in &regions {
                self.streams.copy_signal(r.slot, r.generation)?;
            }
            Ok(())
        })();
        if let Err(e) = queued {
            self.lock().ring.discard_all(&regions);
            return Err(e);
        }
        Ok(regions)
    }

    /// The consumer index of the calling thread's op queue, registering it on first use.
    fn consumer(&self, st: &mut State) -> Result<usize, CopyError> {
        let queue = self.streams.current_queue();
        let next = st.consumers.len();
        if let Some(&c) = st.consumers.get(&queue) {
            return Ok(c);
        }
        let max = self.streams.shape().consumers.min(64);
        if next >= max {
            return Err(CopyError::TooManyConsumers { max });
        }
        st.consumers.insert(queue, next);
        Ok(next)
    }

    /// On an op thread, before the region's first reader is queued: makes the thread's op
    /// queue wait for the region's copy.
    ///
    /// A region read by several op threads must be acquired by all of them before any
    /// releases it: once every thread that acquired it has released it, it may be
    /// overwritten. (A prefetched copy goes to one request, on one thread.)
    pub fn acquire(&self, region: &Region) -> Result<(), CopyError> {
        let mut st = self.lock();
        let consumer = self.consumer(&mut st)?;
        st.ring
            .take(region.id, consumer)
            .map_err(|e| refused(region.id, "taken", e))?;
        drop(st);
        self.streams.op_wait(region.slot, region.generation)
    }

    /// On the op thread that acquired the region, behind its last reader: signals that the
    /// thread's reads are done, so that the region may be overwritten behind them.
    pub fn release(&self, region: &Region) -> Result<(), CopyError> {
        let mut st = self.lock();
        let consumer = self.consumer(&mut st)?;
        // Checked before the signal is queued: releasing a region this queue never took, or
        // one overwritten already, would signal a flag another region now uses.
        st.ring
            .check_taken(region.id, consumer)
            .map_err(|e| refused(region.id, "released", e))?;
        drop(st);
        // The signal is queued before the ring learns of it: a fill that sees the release
        // waits for a signal that is already on its way.
        self.streams
            .op_signal(region.slot, consumer, region.generation)?;
        let mut st = self.lock();
        st.ring
            .release(region.id, consumer)
            .map_err(|e| refused(region.id, "released", e))?;
        drop(st);
        self.changed.notify_all();
        Ok(())
    }

    /// The region will not be handed to an op (any more).
    pub fn discard(&self, region: &Region) {
        let _ = self.lock().ring.discard(region.id);
        self.changed.notify_all();
    }

    /// Discards every region no op has taken (the read order changed).
    pub fn discard_untaken(&self) {
        self.lock().ring.discard_untaken();
        self.changed.notify_all();
    }

    /// Closes the engine: a fill waiting for room, and every later fill, returns
    /// [`CopyError::Closed`]. Copies already queued still land.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// The live regions, oldest first.
    pub fn live(&self) -> Vec<Region> {
        self.lock().ring.live().copied().collect()
    }
}

fn refused(id: u64, what: &'static str, e: Refused) -> CopyError {
    CopyError::Region {
        id,
        what,
        why: match e {
            Refused::Unknown => "it was overwritten, or never filled",
            Refused::Discarded => "it was discarded",
            Refused::NotTaken => "this op thread has not acquired it",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_compare_cyclically() {
        assert!(reached(5, 5));
        assert!(reached(6, 5));
        assert!(!reached(4, 5));
        assert!(reached(1, u32::MAX), "wrapped past the value");
        assert!(!reached(u32::MAX, 1));
    }

    #[test]
    fn a_source_outside_its_buffer_is_refused() {
        let buffer = Arc::new(HostBuffer::pageable(16).unwrap());
        assert!(CopySource::new(buffer.clone(), 0..16).is_ok());
        assert_eq!(
            CopySource::new(buffer.clone(), 8..17).unwrap_err(),
            CopyError::OutOfBounds {
                start: 8,
                end: 17,
                len: 16
            }
        );
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 9..8;
        assert!(CopySource::new(buffer, reversed).is_err());
    }
}
