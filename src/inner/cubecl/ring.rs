//! The copy engine's side of the CubeCL targets ([`crate::copy`]): a ring whose regions ops read
//! as ordinary CubeCL handles, shown to the unfused and the fused backend alike
//! ([`RingFor`]), and [`CubeclCopyStreams`], the [`CopyStreams`] of any CubeCL runtime, which
//! CI runs on wgpu (lavapipe): copies are CubeCL writes into ring regions, and the flags live
//! on the host.
//!
//! # `CubeclCopyStreams`: the protocol on one device queue
//! CubeCL runs every stream's work through one task queue per device (its device thread), in
//! submission order, and wgpu has one hardware queue. So:
//! - a copy is one task that first **submits the work the readers' streams have recorded**
//!   (`ComputeServer::flush`), then writes the group (`ComputeServer::write`) and submits it.
//!   wgpu's `Queue::write_buffer` lands at the next submission, *ahead of* work recorded in a
//!   stream's encoder but not submitted yet (cubecl-wgpu's `write_to_buffer` says so), so
//!   without the first step a reader queued before the release could read the new bytes;
//! - `copy_done` is set by a task queued behind the copy's: once it is set, the write has
//!   been submitted, and ops queued after it read the new bytes;
//! - `reader_done` is set by the op thread when it releases, which the engine's users do only
//!   once the readers have been queued on the thread's stream (a fused backend drains its
//!   lazy ops first, see [`crate::prefetch`]);
//! - the copy side's wait and the op side's wait are host waits on a condition variable (the
//!   filler and the op thread, never CubeCL's device thread), bounded by [`FLAG_TIMEOUT`].
//!
//! On CUDA the engine uses `CudaCopyStreams` instead (`crate::cuda`): DMAs on a stream of its
//! own and flags in device memory, which never wait on the host.

use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn_backend::tensor::FloatTensor;
use burn_backend::{Backend, DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use cubecl::bytes::Bytes;
use cubecl::prelude::ComputeClient;
use cubecl::server::Handle;
use cubecl::stream_id::StreamId;

use super::{OffloadRuntime, bridge};
use crate::copy::{
    CopyError, CopyJob, CopyStreams, Region, RingShape, Wait, delegate_copy_streams, fault, reached,
};
use crate::inner::RingStreams;

/// Regions start at multiples of this (wgpu's `minStorageBufferOffsetAlignment` is at most
/// 256, and so is CubeCL's own buffer alignment).
pub const RING_ALIGN: u64 = 256;

/// The longest a host wait for a flag lasts before it is reported as an error (a flag that is
/// never set is a bug, not a slow device).
pub const FLAG_TIMEOUT: Duration = Duration::from_secs(60);

/// A CubeCL runtime's copy-engine streams: [`CopyStreams`] whose ring regions are CubeCL
/// handles of the runtime.
pub trait CubeRing<R: OffloadRuntime>: CopyStreams {
    /// A contiguous tensor of `shape` and `dtype` over `region` (which must hold exactly its
    /// bytes).
    fn region_tensor(
        &self,
        region: &Region,
        shape: Shape,
        dtype: DType,
    ) -> Result<CubeTensor<R>, CopyError>;
}

/// `len` bytes at `offset` of `ring` as a handle (a view of the ring's buffer), checked to lie
/// inside it.
pub(crate) fn region_handle(
    ring: &Handle,
    shape: &RingShape,
    offset: u64,
    len: u64,
) -> Result<Handle, CopyError> {
    shape.check_span(offset, len)?;
    let tail = ring.size() - offset - len;
    Ok(ring.clone().offset_start(offset).offset_end(tail))
}

/// A contiguous tensor over `region` of `ring`, when `shape` and `dtype` hold exactly its bytes.
pub(crate) fn region_tensor<R: OffloadRuntime>(
    client: ComputeClient<R>,
    device: R::Device,
    ring: &Handle,
    ring_shape: &RingShape,
    region: &Region,
    shape: Shape,
    dtype: DType,
) -> Result<CubeTensor<R>, CopyError> {
    let bytes = shape.num_elements() as u64 * dtype.size() as u64;
    if bytes != region.len {
        return Err(CopyError::Device {
            reason: format!(
                "a tensor of {bytes} bytes over a region of {} bytes",
                region.len
            ),
        });
    }
    let handle = region_handle(ring, ring_shape, region.offset, region.len)?;
    Ok(CubeTensor::new_contiguous(
        client, device, shape, handle, dtype,
    ))
}

/// The runtime's copy-engine streams on `device` ([`OffloadRuntime::copy_streams`]) shown to
/// the backend `B` through `wrap`: what the unfused and the fused targets' `ring_streams` are.
pub(crate) fn ring_for<R: OffloadRuntime, B: Backend>(
    device: &R::Device,
    shape: RingShape,
    wrap: fn(CubeTensor<R>) -> FloatTensor<B>,
) -> Option<Result<Arc<dyn RingStreams<B>>, CopyError>> {
    R::copy_streams(device, shape).map(|made| {
        made.map(|inner| Arc::new(RingFor::<R, B>::new(inner, wrap)) as Arc<dyn RingStreams<B>>)
    })
}

/// A [`CubeRing`] shown to the backend `B` (the unfused `CubeBackend`, or the fused backend,
/// which registers the region's tensor in the calling thread's fusion stream).
pub(crate) struct RingFor<R: OffloadRuntime, B: Backend> {
    inner: Arc<dyn CubeRing<R>>,
    wrap: fn(CubeTensor<R>) -> FloatTensor<B>,
    _backend: PhantomData<fn() -> B>,
}

impl<R: OffloadRuntime, B: Backend> RingFor<R, B> {
    pub(crate) fn new(
        inner: Arc<dyn CubeRing<R>>,
        wrap: fn(CubeTensor<R>) -> FloatTensor<B>,
    ) -> Self {
        Self {
            inner,
            wrap,
            _backend: PhantomData,
        }
    }
}

impl<R: OffloadRuntime, B: Backend> CopyStreams for RingFor<R, B> {
    delegate_copy_streams!(self => self.inner);
}

impl<R: OffloadRuntime, B: Backend> RingStreams<B> for RingFor<R, B> {
    fn tensor(
        &self,
        region: &Region,
        shape: Shape,
        dtype: DType,
    ) -> Result<FloatTensor<B>, CopyError> {
        self.inner
            .region_tensor(region, shape, dtype)
            .map(self.wrap)
    }
}

/// The flags, on the host.
struct Flags {
    copy_done: Vec<u32>,
    reader_done: Vec<u32>,
    /// The stream of each consumer that has released a region (what a copy submits first).
    readers: Vec<Option<StreamId>>,
}

struct Shared {
    flags: Mutex<Flags>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `pick(flags)` has reached `value`, at most [`FLAG_TIMEOUT`].
    fn wait(&self, what: &str, value: u32, pick: impl Fn(&Flags) -> u32) -> Result<(), CopyError> {
        let deadline = Instant::now() + FLAG_TIMEOUT;
        let mut flags = self.lock();
        while !reached(pick(&flags), value) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CopyError::Device {
                    reason: format!(
                        "{what} did not reach {value} within {FLAG_TIMEOUT:?} (a release or a \
                         copy that was never queued)"
                    ),
                });
            }
            flags = self
                .changed
                .wait_timeout(flags, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

/// [`CopyStreams`] for any CubeCL runtime (see the [module docs](self)); CI runs it on wgpu.
pub struct CubeclCopyStreams<R: OffloadRuntime> {
    device: R::Device,
    client: ComputeClient<R>,
    shape: RingShape,
    /// The ring: one CubeCL buffer, held for the engine's life (so no op can write into a
    /// region in place: the buffer is never uniquely owned by a tensor).
    ring: Handle,
    shared: Arc<Shared>,
}

impl<R: OffloadRuntime> CubeclCopyStreams<R> {
    /// A ring of `capacity` bytes (rounded down to [`RING_ALIGN`], and to the largest buffer
    /// the device allocates: lavapipe's is 128 MiB, below the default lookahead) on `device`,
    /// allocated on the calling thread's stream, with `slots` sets of flags and room for
    /// `consumers` op threads (1 to 64).
    pub fn new(
        device: &R::Device,
        capacity: u64,
        slots: usize,
        consumers: usize,
    ) -> Result<Self, CopyError> {
        let client = R::offload_client(device).map_err(|e| CopyError::Device {
            reason: e.to_string(),
        })?;
        let largest = client.properties().memory.max_page_size;
        if capacity > largest {
            log::info!(
                "copy engine: a ring of {capacity} bytes is above the largest buffer {} allocates \
                 ({largest} bytes): using that",
                R::NAME
            );
        }
        let capacity = capacity.min(largest) / RING_ALIGN * RING_ALIGN;
        if capacity == 0 || slots == 0 || consumers == 0 || consumers > 64 {
            return Err(CopyError::Device {
                reason: format!(
                    "a copy engine needs a ring of at least {RING_ALIGN} bytes, at least one \
                     slot and 1 to 64 consumers (got {capacity} bytes, {slots} slots, \
                     {consumers} consumers)"
                ),
            });
        }
        let shape = RingShape {
            capacity,
            slots,
            consumers,
            align: RING_ALIGN,
        };
        let ring = client.empty(capacity as usize);
        Ok(Self {
            device: device.clone(),
            client,
            shape,
            ring,
            shared: Arc::new(Shared {
                flags: Mutex::new(Flags {
                    copy_done: vec![0; slots],
                    reader_done: vec![0; slots * consumers],
                    readers: vec![None; consumers],
                }),
                changed: Condvar::new(),
            }),
        })
    }

    fn reader_index(&self, slot: usize, consumer: usize) -> Result<usize, CopyError> {
        Ok(self.shape.reader_flag(slot, consumer)? - self.shape.slots)
    }
}

impl<R: OffloadRuntime> CopyStreams for CubeclCopyStreams<R> {
    fn shape(&self) -> RingShape {
        self.shape
    }

    fn current_queue(&self) -> u64 {
        bridge::current_stream()
    }

    fn copy_wait(&self, wait: Wait) -> Result<(), CopyError> {
        let index = self.reader_index(wait.slot, wait.consumer)?;
        self.shared
            .wait("reader_done", wait.value, |f| f.reader_done[index])
    }

    fn copy(&self, jobs: Vec<CopyJob>) -> Result<(), CopyError> {
        let mut writes = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let handle = region_handle(&self.ring, &self.shape, job.offset, job.source.len())?;
            // wgpu's memory is not pinned: the bytes are copied here, so the sources need not
            // outlive the call.
            writes.push((handle, Bytes::from_bytes_vec(job.source.bytes().to_vec())));
        }
        let readers = if fault(|f| f.skip_flush_before_write) {
            Vec::new()
        } else {
            self.shared
                .lock()
                .readers
                .iter()
                .flatten()
                .copied()
                .collect()
        };
        bridge::write_regions_after::<R>(&self.device, StreamId::current(), writes, readers);
        Ok(())
    }

    fn copy_signal(&self, slot: usize, value: u32) -> Result<(), CopyError> {
        self.shape.copy_flag(slot)?;
        let shared = self.shared.clone();
        // Behind the copy's task on the device queue: set once the write has been submitted.
        bridge::on_device_queue::<R>(&self.device, move || {
            shared.lock().copy_done[slot] = value;
            shared.changed.notify_all();
        });
        Ok(())
    }

    fn op_wait(&self, slot: usize, value: u32) -> Result<(), CopyError> {
        self.shape.copy_flag(slot)?;
        self.shared.wait("copy_done", value, |f| f.copy_done[slot])
    }

    fn op_signal(&self, slot: usize, consumer: usize, value: u32) -> Result<(), CopyError> {
        let index = self.reader_index(slot, consumer)?;
        let mut flags = self.shared.lock();
        flags.readers[consumer] = Some(StreamId::current());
        flags.reader_done[index] = value;
        drop(flags);
        self.shared.changed.notify_all();
        Ok(())
    }
}

impl<R: OffloadRuntime> CubeRing<R> for CubeclCopyStreams<R> {
    fn region_tensor(
        &self,
        region: &Region,
        shape: Shape,
        dtype: DType,
    ) -> Result<CubeTensor<R>, CopyError> {
        region_tensor(
            self.client.clone(),
            self.device.clone(),
            &self.ring,
            &self.shape,
            region,
            shape,
            dtype,
        )
    }
}
