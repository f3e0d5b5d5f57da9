//! [`OffloadTarget`] for burn-cubecl's unfused backend, `CubeBackend<R, F, I, BT>`, for any
//! runtime `R` with an [`OffloadRuntime`]:
//!
//! - host memory: what the runtime allocates ([`OffloadRuntime::alloc_host`]: pinned and
//!   device-mapped on CUDA, pageable elsewhere);
//! - uploads: one server-side write from the host buffer into a fresh device buffer
//!   ([`upload_tensor`]), no bounce copy; prefetched copies ordered after the op threads'
//!   queued work ([`upload_tensor_after`]);
//! - in-place reads: the runtime's kernels, where it has them.

use burn_backend::ops::FloatTensorOps;
use burn_backend::tensor::{FloatTensor, IntTensor};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};

use std::sync::Arc;

use super::OffloadRuntime;
use super::ring::ring_for;
use super::transfer::{current_stream, release_upload_sources, upload_tensor, upload_tensor_after};
use crate::auto::{Calibration, measure};
use crate::copy::{CopyError, RingShape};
use crate::error::OffloadError;
use crate::host::{HostBuffer, HostTensor};
use crate::inner::{OffloadTarget, RingStreams};

/// Measures [`Calibration`] on `device` with `CubeBackend<R, f32, i32, BT>` (rates are per
/// byte, so they carry over to half-precision weights), then lets go of the upload sources the
/// measurement left in this thread's queue.
pub(crate) fn calibrate<R: OffloadRuntime, BT: BoolElement>(
    device: &R::Device,
    pin: bool,
) -> Result<Calibration, OffloadError> {
    R::offload_client(device).map_err(|e| OffloadError::Calibration {
        reason: e.to_string(),
    })?;
    let calibration =
        measure::<CubeBackend<R, f32, i32, BT>>(device, pin, R::COPIES_OVERLAP_COMPUTE)?;
    release_upload_sources::<R>(device)
        .and_then(|()| super::transfer::sync::<R>(device))
        .map_err(|e| OffloadError::Calibration {
            reason: format!("{}: releasing the measurement's uploads: {e}", R::NAME),
        })?;
    Ok(calibration)
}

impl<R: OffloadRuntime, F: FloatElement, I: IntElement, BT: BoolElement> OffloadTarget
    for CubeBackend<R, F, I, BT>
{
    type Staged = CubeTensor<R>;

    fn alloc_host(device: &R::Device, bytes: usize, pin: bool) -> Result<HostBuffer, OffloadError> {
        R::alloc_host(device, bytes, pin)
    }

    /// Records `device` as a reader of the buffer: pinned memory is freed only once every
    /// device that may read it has finished its work.
    fn note_host_reader(host: &HostTensor, device: &R::Device) {
        R::note_host_reader(host.buffer(), device);
    }

    fn upload(host: &HostTensor, device: &R::Device) -> FloatTensor<Self> {
        if host.is_quantized() {
            return Self::upload_dequantized(host, device);
        }
        if host.is_contiguous() {
            match upload_tensor::<R>(device, host) {
                Ok(tensor) => return tensor,
                Err(e) => log::warn!(
                    "{}: upload failed ({e}); copying through TensorData",
                    R::NAME
                ),
            }
        }
        Self::float_from_data(host.to_data(), device)
    }

    fn work_queue(_device: &R::Device) -> Option<u64> {
        Some(current_stream())
    }

    /// A copy on the prefetch thread's stream, behind all the work already queued on the op
    /// threads' streams ([`upload_tensor_after`]): the memory pool of the prefetch stream gets
    /// back the copies the op threads dropped as soon as their last op was *queued*, so without
    /// the wait the next copy could overwrite one that a queued kernel has not read yet.
    fn prefetch_upload(
        host: &HostTensor,
        device: &R::Device,
        consumers: &[u64],
    ) -> Option<CubeTensor<R>> {
        upload_tensor_after::<R>(device, host, consumers)
            .map_err(|e| log::warn!("prefetch upload on {}: {e}", R::NAME))
            .ok()
    }

    fn take_staged(staged: CubeTensor<R>) -> FloatTensor<Self> {
        staged
    }

    fn ring_streams(
        device: &R::Device,
        shape: RingShape,
    ) -> Option<Result<Arc<dyn RingStreams<Self>>, CopyError>> {
        ring_for::<R, Self>(device, shape, |t| t)
    }

    fn release_uploads(device: &R::Device) {
        if let Err(e) = release_upload_sources::<R>(device) {
            log::warn!("releasing upload sources on {}: {e}", R::NAME);
        }
    }

    /// CubeCL's `bytes_in_use` of the calling thread's stream (its memory pool is per stream);
    /// a blocking round trip to CubeCL's device thread.
    fn device_bytes_in_use(device: &R::Device) -> Option<u64> {
        let client = R::offload_client(device).ok()?;
        client
            .memory_usage()
            .map(|usage| usage.bytes_in_use)
            .map_err(|e| log::warn!("memory usage on {}: {e:?}", R::NAME))
            .ok()
    }

    /// Two flushes of the calling thread's stream (CubeCL's drop queue then lets go of the
    /// upload sources it holds: references to these buffers), then the runtime's wait
    /// ([`OffloadRuntime::settle_reads`]): once per optimizer step, not per buffer.
    fn settle_host_reads(device: &R::Device, pool: &[HostTensor]) {
        if let Err(e) = release_upload_sources::<R>(device) {
            log::warn!("releasing upload sources on {}: {e}", R::NAME);
        }
        R::settle_reads(device, pool);
    }

    fn can_read_in_place(host: &HostTensor, device: &R::Device) -> bool {
        R::can_read_in_place(host, device)
    }

    fn zero_copy_max_rows(device: &R::Device) -> usize {
        R::zero_copy_max_rows(device)
    }

    fn host_matmul(
        lhs: FloatTensor<Self>,
        rhs: &HostTensor,
    ) -> Result<FloatTensor<Self>, FloatTensor<Self>> {
        R::host_matmul(lhs, rhs)
    }

    fn host_embedding(
        weights: &HostTensor,
        indices: IntTensor<Self>,
    ) -> Result<FloatTensor<Self>, IntTensor<Self>> {
        R::host_embedding(weights, indices)
    }
}
