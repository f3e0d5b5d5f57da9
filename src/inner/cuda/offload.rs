//! [`OffloadTarget`] for burn-cuda's unfused backend ([`CudaBackend`](crate::CudaBackend)).
//!
//! - host memory: exact-size pinned, device-mapped allocations ([`alloc_pinned`]); when pinning
//!   is disabled or fails, pageable memory with a logged warning (UVA ops then take the copy
//!   path: nothing fails);
//! - uploads: a DMA from pinned memory straight into a fresh device buffer ([`upload_tensor`]),
//!   with no pageable bounce copy;
//! - zero-copy: `matmul_host.cu` (rows ≤ [`ops::MAX_ROWS`]) and `gather_host.cu` read pinned
//!   memory in place, queued on CubeCL's stream like Burn's own kernels (no host sync).
//!
//! [`alloc_pinned`]: super::alloc_pinned
//! [`upload_tensor`]: super::upload_tensor

use burn_backend::{DType, tensor::FloatTensor, tensor::IntTensor};
use burn_cubecl::{CubeBackend, FloatElement, IntElement};
use cubecl::cuda::{CudaDevice, CudaRuntime};

use super::ops::{self, matmul_plan};
use super::transfer::{UploadPath, upload_tensor};
use super::{alloc_pinned, pinned};
use crate::auto::{Calibration, measure};
use crate::error::OffloadError;
use crate::host::{HostBuffer, HostTensor};
use crate::inner::{DeviceMemory, OffloadTarget, TargetDevice};

impl TargetDevice for CudaDevice {
    fn memory(&self) -> Option<DeviceMemory> {
        super::memory_info(self.index)
            .map(|(free, total)| DeviceMemory { free, total })
            .map_err(|e| log::warn!("cuda:{}: cuMemGetInfo failed ({e})", self.index))
            .ok()
    }

    /// Measured with [`CudaBackend<f32>`](crate::CudaBackend) (rates are per byte, so they
    /// carry over to half-precision weights). Uploads are DMAs on the copy engine, which run
    /// beside the kernels of another stream, so `Auto` prefetches its copies.
    fn calibrate(&self, pin: bool) -> Result<Calibration, OffloadError> {
        super::driver::probe()?;
        let calibration = measure::<CubeBackend<CudaRuntime, f32, i32, u8>>(self, pin, true)?;
        // The DMA uploads keep their pinned sources alive in this thread's queue: free them
        // now, as `measure` promises, rather than in the middle of later work.
        super::free_upload_sources(self)?;
        Ok(calibration)
    }
}

impl<F: FloatElement, I: IntElement> OffloadTarget for CubeBackend<CudaRuntime, F, I, u8> {
    fn alloc_host(
        device: &CudaDevice,
        bytes: usize,
        pin: bool,
    ) -> Result<HostBuffer, OffloadError> {
        if pin {
            match alloc_pinned(device.index, bytes) {
                Ok(buffer) => return Ok(buffer),
                Err(e) => log::warn!(
                    "could not pin {bytes} bytes of host memory for cuda:{} ({e}); using pageable \
                     memory: ops on it take the copy path",
                    device.index
                ),
            }
        }
        HostBuffer::pageable(bytes)
    }

    /// Records `device.index` as a reader of the buffer: pinned memory is freed only once every
    /// device that may read it has finished its work (see [`pinned`]).
    fn note_host_reader(host: &HostTensor, device: &CudaDevice) {
        host.buffer().note_reader(device.index);
    }

    fn upload(host: &HostTensor, device: &CudaDevice) -> FloatTensor<Self> {
        if host.is_contiguous() && pinned::device_ptr(host.buffer()).is_some() {
            match upload_tensor(device, host, UploadPath::Dma) {
                Ok(tensor) => return tensor,
                Err(e) => log::warn!("DMA upload failed ({e}); copying through TensorData"),
            }
        }
        <Self as burn_backend::ops::FloatTensorOps<Self>>::float_from_data(host.to_data(), device)
    }

    fn work_queue(_device: &CudaDevice) -> Option<u64> {
        Some(super::current_stream())
    }

    /// A DMA on the prefetch thread's stream, behind all the work already queued on the op
    /// threads' streams ([`upload_tensor_after`]): the memory pool of the prefetch stream gets
    /// back the copies the op threads dropped as soon as their last op was *queued*, so without
    /// the wait the next copy could overwrite one that a queued kernel has not read yet.
    ///
    /// [`upload_tensor_after`]: super::upload_tensor_after
    fn prefetch_upload(
        host: &HostTensor,
        device: &CudaDevice,
        consumers: &[u64],
    ) -> Option<FloatTensor<Self>> {
        super::upload_tensor_after(device, host, consumers)
            .map_err(|e| log::warn!("prefetch upload on cuda:{}: {e}", device.index))
            .ok()
    }

    fn release_uploads(device: &CudaDevice) {
        if let Err(e) = super::release_upload_sources(device) {
            log::warn!("releasing upload sources on cuda:{}: {e}", device.index);
        }
    }

    /// CubeCL's `bytes_in_use` of the calling thread's stream (its memory pool is per stream);
    /// a blocking round trip to CubeCL's device thread.
    fn device_bytes_in_use(device: &CudaDevice) -> Option<u64> {
        let client = super::driver::cubecl_client(device).ok()?;
        client
            .memory_usage()
            .map(|usage| usage.bytes_in_use)
            .map_err(|e| log::warn!("memory usage of cuda:{}: {e:?}", device.index))
            .ok()
    }

    /// Two flushes of the calling thread's stream (CubeCL's drop queue then lets go of the
    /// upload sources it holds: references to these buffers), then the waits a free would make
    /// (CubeCL's queue drained and the context synchronised, for this device and every recorded
    /// reader): once per optimizer step, not per buffer.
    fn settle_host_reads(device: &CudaDevice, pool: &[HostTensor]) {
        if let Err(e) = super::release_upload_sources(device) {
            log::warn!("releasing upload sources on cuda:{}: {e}", device.index);
        }
        let pinned: Vec<&HostBuffer> = pool
            .iter()
            .map(|h| h.buffer().as_ref())
            .filter(|b| pinned::device_ptr(b).is_some())
            .collect();
        if !pinned.is_empty() && !pinned::settle_reads(device.index, &pinned) {
            log::error!(
                "cuda:{}: a device that read offloaded parameters could not be synchronised; \
                 the optimizer step writes them anyway",
                device.index
            );
        }
    }

    fn can_read_in_place(host: &HostTensor, _device: &CudaDevice) -> bool {
        matches!(host.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && pinned::device_ptr(host.buffer()).is_some()
    }

    fn zero_copy_max_rows(_device: &CudaDevice) -> usize {
        ops::MAX_ROWS
    }

    fn host_matmul(
        lhs: FloatTensor<Self>,
        rhs: &HostTensor,
    ) -> Result<FloatTensor<Self>, FloatTensor<Self>> {
        let Some(plan) = matmul_plan(&lhs.meta.shape().to_vec(), lhs.dtype, rhs) else {
            return Err(lhs);
        };
        // With a plan only a failure of the driver itself is left (the kernel's own errors
        // surface when the stream next synchronises, like any failed launch).
        Ok(ops::matmul_host(lhs, rhs, plan).unwrap_or_else(|e| panic!("zero-copy matmul: {e}")))
    }

    fn host_embedding(
        weights: &HostTensor,
        indices: IntTensor<Self>,
    ) -> Result<FloatTensor<Self>, IntTensor<Self>> {
        // Contiguous rows that do not overlap (what `gather_host` takes; a flipped or
        // broadcast table is copied instead).
        let rows_ok = weights.dims().len() == 2
            && weights.strides()[1] == 1
            && weights.strides()[0] >= weights.dims()[1] as isize;
        if !rows_ok || !matches!(indices.dtype, DType::I32 | DType::I64) {
            return Err(indices);
        }
        Ok(ops::gather_host(weights, indices)
            .unwrap_or_else(|e| panic!("zero-copy embedding: {e}")))
    }
}
