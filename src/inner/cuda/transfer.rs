//! Uploads from host memory into CubeCL device buffers, ordered on CubeCL's stream of the
//! calling thread, and turned into Burn tensors ([`upload_tensor`]).
//!
//! Two paths:
//! - [`UploadPath::Dma`] ([`upload_dma`]): a copy-engine DMA (`cuMemcpyHtoDAsync`) straight from
//!   the host buffer. `ComputeClient::create` cannot do this without a bounce copy: cubecl
//!   0.10's `do_create` copies every `Bytes` into a fresh pageable `Vec` (`data.to_vec()`)
//!   before handing it to the server, pinned or not. So this goes one level down, to the
//!   server, and does what `do_create` does minus the copy: one task on CubeCL's device queue
//!   that reserves the device memory (`ComputeServer::initialize_memory`) and writes into it
//!   (`ComputeServer::write`). cubecl-cuda's `write_to_gpu` uses `Bytes` whose
//!   `AllocationProperty` is not `File` as they are and calls `memcpy_htod_async` on the
//!   stream's `CUstream`; from pinned memory that is a true async DMA. The `Bytes` given to
//!   CubeCL holds an `Arc` of the host buffer and sits in the stream's drop queue until the
//!   copy's fence has passed, so the host memory outlives the copy whatever the caller does.
//! - [`UploadPath::SmCopy`] ([`upload_sm_copy`]): the `stream_read` kernel reads the pinned,
//!   mapped memory over the bus and writes the device buffer (no copy engine involved).
//!
//! Both return as soon as the work is queued; errors surface on the next synchronising call of
//! the stream ([`sync`], or reading a tensor).

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Arc;

use burn_cubecl::tensor::CubeTensor;
use cubecl::bytes::{AllocationController, AllocationProperty, Bytes};
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::server::Handle;
use cubecl::stream_id::StreamId;

use super::{CudaError, bridge, driver, kernel, pinned};
use crate::host::{HostBuffer, HostMemoryKind, HostTensor};

/// How an upload moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum UploadPath {
    /// The copy engine (`cuMemcpyHtoDAsync`) from the host buffer; pinned memory gives a true
    /// async DMA, pageable memory a driver-staged copy.
    Dma,
    /// The `stream_read` kernel reading pinned, mapped memory over the bus.
    SmCopy,
}

/// A `Bytes` view of a range of a [`HostBuffer`], holding a reference to the buffer so that it
/// lives as long as CubeCL holds the `Bytes`. Read-only: CubeCL's write path only reads it.
struct HostRangeController {
    buffer: Arc<HostBuffer>,
    start: usize,
    len: usize,
}

impl HostRangeController {
    fn ptr(&self) -> *const u8 {
        // SAFETY: `start + len <= buffer.len()` (checked in `host_bytes`), so the offset stays
        // inside the allocation (or is 0 on an empty one).
        unsafe { self.buffer.as_ptr().add(self.start) }
    }
}

impl AllocationController for HostRangeController {
    fn alloc_align(&self) -> usize {
        // The largest power of two (up to a page) that divides the address.
        1usize << (self.ptr() as usize).trailing_zeros().min(12)
    }

    fn property(&self) -> AllocationProperty {
        match self.buffer.kind() {
            HostMemoryKind::Pinned { .. } => AllocationProperty::Pinned,
            HostMemoryKind::Pageable => AllocationProperty::Other,
        }
    }

    unsafe fn memory_mut(&mut self) -> &mut [MaybeUninit<u8>] {
        // The buffer is shared (other views may read it at any time), so handing out `&mut`
        // would be unsound. cubecl-cuda 0.10's write path (`ComputeServer::write` →
        // `Command::write_to_gpu`) only reads the `Bytes`, and these `Bytes` never leave this
        // module otherwise.
        panic!("burn-offload host bytes are read-only");
    }

    fn memory(&self) -> &[MaybeUninit<u8>] {
        // SAFETY: `ptr() .. ptr() + len` lies inside the buffer, which `self.buffer` keeps
        // alive; `MaybeUninit<u8>` has the layout of `u8`; the buffer is only written through
        // `&mut HostBuffer`, impossible while this `Arc` exists.
        unsafe { std::slice::from_raw_parts(self.ptr().cast::<MaybeUninit<u8>>(), self.len) }
    }
}

/// Checks, before any copy is queued, that an upload of the bytes `range` stays inside `buffer`
/// (`start <= end <= len`: the furthest byte a copy of it touches is `end - 1`).
fn check_range(buffer: &HostBuffer, range: &Range<usize>) -> Result<(), CudaError> {
    if range.start > range.end || range.end > buffer.len() {
        return Err(CudaError::InvalidArgument {
            reason: format!(
                "range {range:?} is outside the host buffer of {} bytes",
                buffer.len()
            ),
        });
    }
    Ok(())
}

/// `Bytes` over `buffer[range]` without copying.
fn host_bytes(buffer: Arc<HostBuffer>, range: Range<usize>) -> Result<Bytes, CudaError> {
    check_range(&buffer, &range)?;
    let len = range.len();
    let controller = HostRangeController {
        buffer,
        start: range.start,
        len,
    };
    // SAFETY: the controller's memory is exactly `len` initialised bytes.
    Ok(unsafe { Bytes::from_controller(Box::new(controller), len) })
}

thread_local! {
    /// Bytes this thread pushed into its CubeCL stream's drop queue since it last flushed it.
    static UNFLUSHED_UPLOAD_BYTES: Cell<u64> = const { Cell::new(0) };
}

/// Flush the stream after this many uploaded bytes. cubecl-runtime 0.10's drop queue counts
/// staged bytes in a `u32` (`FlushingPolicyState::bytes_size`, an overflow panic in debug
/// builds) and only checks its own 64 MiB threshold after a kernel launch: uploads alone would
/// overflow it after 4 GiB. A flush blocks the caller until the stream has finished the work
/// queued before the *previous* flush (CubeCL's double-buffered drop queue).
const FLUSH_AFTER_BYTES: u64 = 256 * 1024 * 1024;

/// Copies `host[range]` into a new device buffer on `device` with the copy engine, without a
/// bounce copy (see the [module docs](self)). Works for pageable buffers too (the driver stages
/// those). Returns the buffer's handle, valid for CubeCL's stream of the calling thread.
pub fn upload_dma(
    device: &CudaDevice,
    host: &Arc<HostBuffer>,
    range: Range<usize>,
) -> Result<Handle, CudaError> {
    upload_dma_after(device, host, range, &[])
}

/// [`upload_dma`] ordered after all the work already queued on the CubeCL streams `after`
/// (the [`StreamId`] values of other threads): the new buffer is allocated, and the DMA queued,
/// only behind that work on the device.
///
/// Why: the buffer comes from the memory pool of the calling thread's stream. When another
/// thread's stream read an earlier buffer of that pool (a prefetched copy handed to an op on
/// another thread) and dropped it, the pool may hand the same memory out again while those
/// reads are still queued; CubeCL orders reuse within one stream only. The wait is CubeCL's
/// own cross-stream alignment (`MultiStream::align_streams`): a one-byte token is allocated
/// on each stream of `after`, then resolved on this stream, which records an event on that
/// stream and makes this one wait for it. The token is fresh, so its cursor is newer than any
/// earlier alignment and the wait always happens. Everything runs in one server task with the
/// allocation and the DMA: a buffer the allocation finds free had its last read queued by an
/// earlier task (queued launches hold their bindings until the server has processed them), so
/// the event recorded here covers that read.
pub fn upload_dma_after(
    device: &CudaDevice,
    host: &Arc<HostBuffer>,
    range: Range<usize>,
    after: &[u64],
) -> Result<Handle, CudaError> {
    check_range(host, &range)?;
    let client = driver::cubecl_client(device)?;
    let len = range.len();
    if len == 0 {
        return Ok(client.empty(0));
    }
    // Freeing the buffer waits for this device too (see `pinned`); CubeCL also holds the
    // source until the copy's fence has passed.
    host.note_reader(device.index);
    let bytes = host_bytes(host.clone(), range)?;
    // A large upload goes into an empty queue, so that it cannot push the count past `u32`.
    if len as u64 >= FLUSH_AFTER_BYTES && UNFLUSHED_UPLOAD_BYTES.with(Cell::get) > 0 {
        UNFLUSHED_UPLOAD_BYTES.with(|c| c.set(0));
        client.flush().map_err(CudaError::server)?;
    }
    let stream_id = StreamId::current();
    let handle = bridge::new_handle(stream_id, len as u64);
    let after: Vec<StreamId> = after
        .iter()
        .map(|&value| StreamId { value })
        .filter(|&other| other != stream_id)
        .collect();
    bridge::write_after(device, stream_id, handle.clone(), bytes, after);
    let unflushed = UNFLUSHED_UPLOAD_BYTES.with(|c| {
        c.set(c.get() + len as u64);
        c.get()
    });
    if unflushed >= FLUSH_AFTER_BYTES {
        UNFLUSHED_UPLOAD_BYTES.with(|c| c.set(0));
        client.flush().map_err(CudaError::server)?;
    }
    Ok(handle)
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

/// The calling thread's CubeCL stream (its [`StreamId`] value), for [`upload_tensor_after`].
pub fn current_stream() -> u64 {
    bridge::current_stream()
}

/// [`upload_tensor`] by DMA, ordered after all the work already queued on the CubeCL streams
/// `after` (see [`upload_dma_after`]), for copies made on one thread and read on others.
/// Non-contiguous views are gathered into pageable memory first.
pub fn upload_tensor_after(
    device: &CudaDevice,
    host: &HostTensor,
    after: &[u64],
) -> Result<CubeTensor<CudaRuntime>, CudaError> {
    let gathered;
    let host = if host.is_contiguous() {
        host
    } else {
        gathered = HostTensor::from_data(&host.to_data(), HostBuffer::pageable).map_err(|e| {
            CudaError::InvalidArgument {
                reason: format!("gathering a host view: {e}"),
            }
        })?;
        &gathered
    };
    let handle = upload_dma_after(device, host.buffer(), byte_range(host), after)?;
    into_tensor(device, host, handle)
}

/// The bytes of a contiguous view in its buffer.
fn byte_range(host: &HostTensor) -> Range<usize> {
    let start = host.offset() * host.dtype().size();
    start..start + host.size_bytes()
}

/// A contiguous Burn tensor with `host`'s shape and dtype over the uploaded `handle`.
fn into_tensor(
    device: &CudaDevice,
    host: &HostTensor,
    handle: Handle,
) -> Result<CubeTensor<CudaRuntime>, CudaError> {
    Ok(CubeTensor::new_contiguous(
        driver::cubecl_client(device)?,
        device.clone(),
        host.shape(),
        handle,
        host.dtype(),
    ))
}

/// Uploads a contiguous host view into a new, contiguous Burn tensor of burn-cubecl on
/// `device` (same shape and dtype). Non-contiguous views give [`CudaError::InvalidArgument`]
/// (gather them first, e.g. with `HostTensor::to_data`).
pub fn upload_tensor(
    device: &CudaDevice,
    host: &HostTensor,
    path: UploadPath,
) -> Result<CubeTensor<CudaRuntime>, CudaError> {
    if !host.is_contiguous() {
        return Err(CudaError::InvalidArgument {
            reason: format!(
                "the host view (shape {:?}, strides {:?}) is not contiguous",
                host.dims(),
                host.strides()
            ),
        });
    }
    let handle = upload(device, host.buffer(), byte_range(host), path)?;
    into_tensor(device, host, handle)
}

/// Waits until all work queued on CubeCL's stream of the calling thread for `device` has
/// completed, and returns the errors it produced.
pub fn sync(device: &CudaDevice) -> Result<(), CudaError> {
    let client = driver::cubecl_client(device)?;
    cubecl::future::block_on(client.sync()).map_err(CudaError::server)
}

/// Flushes CubeCL's stream of the calling thread twice, which lets its drop queue release every
/// upload source it still holds (CubeCL frees a staged batch on the flush after the one that
/// fenced it). After it, host buffers uploaded from and no longer referenced elsewhere have been
/// dropped.
pub fn release_upload_sources(device: &CudaDevice) -> Result<(), CudaError> {
    let client = driver::cubecl_client(device)?;
    client.flush().map_err(CudaError::server)?;
    client.flush().map_err(CudaError::server)?;
    UNFLUSHED_UPLOAD_BYTES.with(|c| c.set(0));
    Ok(())
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
