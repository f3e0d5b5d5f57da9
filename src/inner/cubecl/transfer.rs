//! Uploads from host memory into CubeCL device buffers, for any CubeCL runtime `R`, ordered
//! on CubeCL's stream of the calling thread, and turned into burn-cubecl tensors
//! ([`upload_tensor`]).
//!
//! `ComputeClient::create` cannot upload without a bounce copy: cubecl 0.10's `do_create` copies
//! every `Bytes` into a fresh pageable `Vec` (`data.to_vec()`) before handing it to the server.
//! So [`upload`] goes one level down, to the server, and does what `do_create` does minus the
//! copy: one task on CubeCL's device queue that reserves the device memory
//! (`ComputeServer::initialize_memory`) and writes into it (`ComputeServer::write`). The
//! `Bytes` given to CubeCL hold an `Arc` of the host buffer, so the host memory outlives the
//! copy whatever the caller does. What the write does is the runtime's:
//! - cubecl-cuda (`write_to_gpu`) calls `cuMemcpyHtoDAsync` on the stream's `CUstream`: from
//!   pinned memory a true async DMA on the copy engine, from pageable memory a driver-staged
//!   copy; the `Bytes` sit in the stream's drop queue until the copy's fence has passed;
//! - cubecl-wgpu flushes the stream's encoder and calls `Queue::write_buffer` (wgpu stages the
//!   bytes itself), in order with the stream's kernels;
//! - cubecl-hip does what cubecl-cuda does with `hipMemcpyHtoDAsync`.
//!
//! Uploads return as soon as the work is queued; errors surface on the next synchronising call
//! of the stream ([`sync`], or reading a tensor).

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Arc;

use burn_cubecl::tensor::CubeTensor;
use cubecl::bytes::{AllocationController, AllocationProperty, Bytes};
use cubecl::server::Handle;
use cubecl::stream_id::StreamId;

use super::{OffloadRuntime, bridge};
use crate::host::{HostBuffer, HostMemoryKind, HostTensor};

/// What can go wrong queueing an upload (errors of the copy itself surface on the next
/// synchronising call of the stream).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TransferError {
    /// The device cannot be used (e.g. no CUDA driver).
    #[error("the device is not usable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// An argument does not fit the operation (a range outside a buffer, a strided view).
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// CubeCL's compute server reported an error.
    #[error("CubeCL server error: {reason}")]
    Server {
        /// The server's message.
        reason: String,
    },
}

impl TransferError {
    /// Wraps an error of CubeCL's compute server.
    pub fn server(error: impl std::fmt::Debug) -> Self {
        Self::Server {
            reason: format!("{error:?}"),
        }
    }
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
        // would be unsound. The write paths of cubecl-cuda, -hip and -wgpu 0.10
        // (`ComputeServer::write`) only read the `Bytes`, and these `Bytes` never leave this
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
pub(crate) fn check_range(buffer: &HostBuffer, range: &Range<usize>) -> Result<(), TransferError> {
    if range.start > range.end || range.end > buffer.len() {
        return Err(TransferError::InvalidArgument {
            reason: format!(
                "range {range:?} is outside the host buffer of {} bytes",
                buffer.len()
            ),
        });
    }
    Ok(())
}

/// `Bytes` over `buffer[range]` without copying.
fn host_bytes(buffer: Arc<HostBuffer>, range: Range<usize>) -> Result<Bytes, TransferError> {
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

/// Copies `host[range]` into a new device buffer on `device`, without a bounce copy (see the
/// [module docs](self)). Returns the buffer's handle, valid for CubeCL's stream of the calling
/// thread.
pub fn upload<R: OffloadRuntime>(
    device: &R::Device,
    host: &Arc<HostBuffer>,
    range: Range<usize>,
) -> Result<Handle, TransferError> {
    upload_after::<R>(device, host, range, &[])
}

/// [`upload`] ordered after all the work already queued on the CubeCL streams `after` (the
/// [`StreamId`] values of other threads): the new buffer is allocated, and the write queued,
/// only behind that work on the device.
///
/// Why: the buffer comes from the memory pool of the calling thread's stream. When another
/// thread's stream read an earlier buffer of that pool (a prefetched copy handed to an op on
/// another thread) and dropped it, the pool may hand the same memory out again while those
/// reads are still queued; CubeCL orders reuse within one stream only. The wait is CubeCL's
/// own cross-stream alignment (`MultiStream::align_streams`): a one-byte token is allocated
/// on each stream of `after`, then resolved on this stream, which makes this one wait for the
/// work queued on that stream (an event on CUDA and HIP; wgpu has one queue for every
/// stream). The token is fresh, so its cursor is newer than any earlier alignment and the
/// wait always happens. Everything runs in one server task with the allocation and the write:
/// a buffer the allocation finds free had its last read queued by an earlier task (queued
/// launches hold their bindings until the server has processed them), so the wait covers
/// that read.
pub fn upload_after<R: OffloadRuntime>(
    device: &R::Device,
    host: &Arc<HostBuffer>,
    range: Range<usize>,
    after: &[u64],
) -> Result<Handle, TransferError> {
    check_range(host, &range)?;
    let client = R::offload_client(device)?;
    let len = range.len();
    if len == 0 {
        return Ok(client.empty(0));
    }
    // Freeing the buffer waits for this device too (CUDA's pinned memory); CubeCL also holds
    // the source until the copy has been made.
    R::note_host_reader(host, device);
    let bytes = host_bytes(host.clone(), range)?;
    // A large upload goes into an empty queue, so that it cannot push the count past `u32`.
    if len as u64 >= FLUSH_AFTER_BYTES && UNFLUSHED_UPLOAD_BYTES.with(Cell::get) > 0 {
        UNFLUSHED_UPLOAD_BYTES.with(|c| c.set(0));
        client.flush().map_err(TransferError::server)?;
    }
    let stream_id = StreamId::current();
    let handle = bridge::new_handle(stream_id, len as u64);
    let after: Vec<StreamId> = after
        .iter()
        .map(|&value| StreamId { value })
        .filter(|&other| other != stream_id)
        .collect();
    bridge::write_after::<R>(device, stream_id, handle.clone(), bytes, after);
    let unflushed = UNFLUSHED_UPLOAD_BYTES.with(|c| {
        c.set(c.get() + len as u64);
        c.get()
    });
    if unflushed >= FLUSH_AFTER_BYTES {
        UNFLUSHED_UPLOAD_BYTES.with(|c| c.set(0));
        client.flush().map_err(TransferError::server)?;
    }
    Ok(handle)
}

/// The calling thread's CubeCL stream (its [`StreamId`] value), for [`upload_tensor_after`].
pub fn current_stream() -> u64 {
    bridge::current_stream()
}

/// [`upload_tensor`] ordered after all the work already queued on the CubeCL streams `after`
/// (see [`upload_after`]), for copies made on one thread and read on others. Non-contiguous
/// views are gathered into pageable memory first.
pub fn upload_tensor_after<R: OffloadRuntime>(
    device: &R::Device,
    host: &HostTensor,
    after: &[u64],
) -> Result<CubeTensor<R>, TransferError> {
    let gathered;
    let host = if host.is_contiguous() {
        host
    } else {
        gathered = HostTensor::from_data(&host.to_data(), HostBuffer::pageable).map_err(|e| {
            TransferError::InvalidArgument {
                reason: format!("gathering a host view: {e}"),
            }
        })?;
        &gathered
    };
    let handle = upload_after::<R>(device, host.buffer(), byte_range(host), after)?;
    into_tensor(device, host, handle)
}

/// The bytes of a contiguous view in its buffer.
fn byte_range(host: &HostTensor) -> Range<usize> {
    let start = host.offset() * host.dtype().size();
    start..start + host.size_bytes()
}

/// The bytes of `host` in its buffer, which one copy can read: only a contiguous view has
/// them ([`TransferError::InvalidArgument`] otherwise: gather it first, e.g. with
/// `HostTensor::to_data`).
pub(crate) fn contiguous_range(host: &HostTensor) -> Result<Range<usize>, TransferError> {
    if !host.is_contiguous() {
        return Err(TransferError::InvalidArgument {
            reason: format!(
                "the host view (shape {:?}, strides {:?}) is not contiguous",
                host.dims(),
                host.strides()
            ),
        });
    }
    Ok(byte_range(host))
}

/// A contiguous Burn tensor with `host`'s shape and dtype over the uploaded `handle`.
pub(crate) fn into_tensor<R: OffloadRuntime>(
    device: &R::Device,
    host: &HostTensor,
    handle: Handle,
) -> Result<CubeTensor<R>, TransferError> {
    Ok(CubeTensor::new_contiguous(
        R::offload_client(device)?,
        device.clone(),
        host.shape(),
        handle,
        host.dtype(),
    ))
}

/// Uploads a contiguous host view into a new, contiguous Burn tensor of burn-cubecl on
/// `device` (same shape and dtype). Non-contiguous views give
/// [`TransferError::InvalidArgument`] (gather them first, e.g. with `HostTensor::to_data`).
pub fn upload_tensor<R: OffloadRuntime>(
    device: &R::Device,
    host: &HostTensor,
) -> Result<CubeTensor<R>, TransferError> {
    let handle = upload::<R>(device, host.buffer(), contiguous_range(host)?)?;
    into_tensor(device, host, handle)
}

/// Waits until all work queued on CubeCL's stream of the calling thread for `device` has
/// completed, and returns the errors it produced.
pub fn sync<R: OffloadRuntime>(device: &R::Device) -> Result<(), TransferError> {
    let client = R::offload_client(device)?;
    cubecl::future::block_on(client.sync()).map_err(TransferError::server)
}

/// Flushes CubeCL's stream of the calling thread twice, which lets its drop queue release every
/// upload source it still holds (CubeCL frees a staged batch on the flush after the one that
/// fenced it). After it, host buffers uploaded from and no longer referenced elsewhere have been
/// dropped.
pub fn release_upload_sources<R: OffloadRuntime>(device: &R::Device) -> Result<(), TransferError> {
    let client = R::offload_client(device)?;
    client.flush().map_err(TransferError::server)?;
    client.flush().map_err(TransferError::server)?;
    UNFLUSHED_UPLOAD_BYTES.with(|c| c.set(0));
    Ok(())
}
