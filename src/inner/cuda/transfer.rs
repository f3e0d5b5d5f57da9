//! CUDA's uploads: the generic CubeCL uploads ([`crate::inner::cubecl::transfer`]) for
//! [`CudaDevice`] with CUDA's errors, plus the SM copy that only mapped memory allows.
//!
//! Two paths:
//! - [`UploadPath::Dma`] ([`upload_dma`]): a copy-engine DMA (`cuMemcpyHtoDAsync`) straight
//!   from the host buffer, queued by one CubeCL server task (no bounce copy); from pinned
//!   memory a true async DMA, from pageable memory a driver-staged copy;
//! - [`UploadPath::SmCopy`] ([`upload_sm_copy`]): the `stream_read` kernel reads the pinned,
//!   mapped memory over the bus and writes the device buffer (no copy engine involved).
//!
//! Both return as soon as the work is queued; errors surface on the next synchronising call of
//! the stream ([`sync`], or reading a tensor).

use std::ops::Range;
use std::sync::Arc;

use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::server::Handle;

use super::{CudaError, driver, kernel, pinned};
use crate::host::{HostBuffer, HostTensor};
use crate::inner::cubecl::transfer::{
    self as generic, TransferError, check_range, contiguous_range,
};

impl From<TransferError> for CudaError {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Unavailable { reason } => CudaError::NoDriver { reason },
            TransferError::InvalidArgument { reason } => CudaError::InvalidArgument { reason },
            TransferError::Server { reason } => CudaError::Server { reason },
        }
    }
}

/// How an upload moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum UploadPath {
    /// The copy engine (`cuMemcpyHtoDAsync`) from the host buffer; pinned memory gives a true
    /// async DMA, pageable memory a driver-staged copy.
    Dma,
    /// The `stream_read` kernel reading pinned, mapped memory over the bus.
    SmCopy,
}

/// Copies `host[range]` into a new device buffer on `device` with the copy engine, without a
/// bounce copy. Works for pageable buffers too (the driver stages those). Returns the buffer's
/// handle, valid for CubeCL's stream of the calling thread.
pub fn upload_dma(
    device: &CudaDevice,
    host: &Arc<HostBuffer>,
    range: Range<usize>,
) -> Result<Handle, CudaError> {
    upload_dma_after(device, host, range, &[])
}

/// [`upload_dma`] ordered after all the work already queued on the CubeCL streams `after`
/// (see [`crate::inner::cubecl::transfer::upload_after`]).
pub fn upload_dma_after(
    device: &CudaDevice,
    host: &Arc<HostBuffer>,
    range: Range<usize>,
    after: &[u64],
) -> Result<Handle, CudaError> {
    driver::cubecl_client(device)?;
    Ok(generic::upload_after::<CudaRuntime>(
        device, host, range, after,
    )?)
}

/// Copies `host[range]` into a new device buffer on `device` with the `stream_read` kernel,
/// which reads the pinned, mapped host memory over the bus. `host` must be pinned.
pub fn upload_sm_copy(
    device: &CudaDevice,
    host: &Arc<HostBuffer>,
    range: Range<usize>,
) -> Result<Handle, CudaError> {
    check_range(host, &range)?;
    let Some(device_ptr) = pinned::device_ptr(host) else {
        return Err(CudaError::InvalidArgument {
            reason: "the SM copy reads pinned, device-mapped memory only; use the DMA path for \
                     pageable memory"
                .into(),
        });
    };
    let client = driver::cubecl_client(device)?;
    let len = range.len();
    let handle = client.empty(len);
    host.note_reader(device.index);
    // SAFETY: `device_ptr + range` lies in the pinned buffer (range checked above), which the
    // device can read; its release waits for this device before freeing it (recorded as a
    // reader above; `launch_raw` records the device read; pinned module docs).
    unsafe {
        kernel::launch_stream_read(
            device,
            device_ptr + range.start as u64,
            handle.clone().binding(),
            len,
        )?;
    }
    Ok(handle)
}

/// [`upload_dma`] or [`upload_sm_copy`].
pub fn upload(
    device: &CudaDevice,
    host: &Arc<HostBuffer>,
    range: Range<usize>,
    path: UploadPath,
) -> Result<Handle, CudaError> {
    match path {
        UploadPath::Dma => upload_dma(device, host, range),
        UploadPath::SmCopy => upload_sm_copy(device, host, range),
    }
}

/// The calling thread's CubeCL stream (its `StreamId` value), for [`upload_tensor_after`].
pub fn current_stream() -> u64 {
    generic::current_stream()
}

/// [`upload_tensor`] by DMA, ordered after all the work already queued on the CubeCL streams
/// `after`, for copies made on one thread and read on others. Non-contiguous views are
/// gathered into pageable memory first.
pub fn upload_tensor_after(
    device: &CudaDevice,
    host: &HostTensor,
    after: &[u64],
) -> Result<CubeTensor<CudaRuntime>, CudaError> {
    driver::cubecl_client(device)?;
    Ok(generic::upload_tensor_after::<CudaRuntime>(
        device, host, after,
    )?)
}

/// Uploads a contiguous host view into a new, contiguous Burn tensor of burn-cubecl on
/// `device` (same shape and dtype). Non-contiguous views give [`CudaError::InvalidArgument`]
/// (gather them first, e.g. with `HostTensor::to_data`).
pub fn upload_tensor(
    device: &CudaDevice,
    host: &HostTensor,
    path: UploadPath,
) -> Result<CubeTensor<CudaRuntime>, CudaError> {
    match path {
        UploadPath::Dma => {
            driver::cubecl_client(device)?;
            Ok(generic::upload_tensor::<CudaRuntime>(device, host)?)
        }
        UploadPath::SmCopy => {
            let handle = upload_sm_copy(device, host.buffer(), contiguous_range(host)?)?;
            Ok(generic::into_tensor::<CudaRuntime>(device, host, handle)?)
        }
    }
}

/// Waits until all work queued on CubeCL's stream of the calling thread for `device` has
/// completed, and returns the errors it produced.
pub fn sync(device: &CudaDevice) -> Result<(), CudaError> {
    driver::cubecl_client(device)?;
    Ok(generic::sync::<CudaRuntime>(device)?)
}

/// Flushes CubeCL's stream of the calling thread twice, which lets its drop queue release every
/// upload source it still holds. After it, host buffers uploaded from and no longer referenced
/// elsewhere have been dropped.
pub fn release_upload_sources(device: &CudaDevice) -> Result<(), CudaError> {
    driver::cubecl_client(device)?;
    Ok(generic::release_upload_sources::<CudaRuntime>(device)?)
}

/// [`release_upload_sources`], then a stream sync, then waits for the pinned frees: after it,
/// pinned buffers that only the calling thread's uploads still held are freed (between
/// benchmark sections, after a calibration).
pub fn free_upload_sources(device: &CudaDevice) -> Result<(), CudaError> {
    release_upload_sources(device)?;
    sync(device)?;
    super::wait_pinned_releases();
    Ok(())
}
