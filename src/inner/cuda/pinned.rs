//! Pinned, device-mapped host memory as a [`HostBuffer`].
//!
//! [`alloc_pinned`] makes one exact-size allocation with `cuMemHostAlloc(DEVICEMAP |
//! PORTABLE)` on the device's primary context (the one CubeCL uses): page-locked, so DMA
//! copies need no bounce buffer, and mapped, so kernels can read it in place over the bus at
//! the address in [`HostMemoryKind::Pinned`]. It is not write-combined, so host reads of it
//! (e.g. `HostTensor::to_data`) stay fast.
//!
//! # When the memory is freed
//! Two kinds of device work can read a pinned buffer:
//! - DMA uploads ([`upload_dma`](super::upload_dma)) hand CubeCL a `Bytes` that holds an
//!   `Arc` of the buffer; CubeCL drops it from its drop queue only after the copy's fence has
//!   passed, so the buffer outlives the copy by construction.
//! - Kernels that read it through its device address ([`launch_raw`](super::launch_raw) and
//!   the kernels built on it). CubeCL does not know about those reads.
//!
//! The memory is portable (`PORTABLE`) and, under unified addressing, mapped at the same address
//! for every device, so kernels of *other* devices can read it too (an offloaded tensor moved
//! to `Host(d1)` while its memory was allocated for `d0`). The buffer records which devices may
//! read it ([`HostBuffer::note_reader`]: every launch and upload in [`crate::cuda`] on device
//! `d` records `d`, and so does moving an offloaded tensor to `Host(d)`).
//!
//! So the release does not free at once: it hands the pointer and the buffer's readers to a
//! background thread ("burn-offload-pinned-free"), which, for the allocating device and then
//! every recorded reader ([`DeviceReaders::drain_order`]): (1) if device work may read pinned
//! memory on that device ([`note_device_reads`], done by every launch in [`crate::cuda`]),
//! drains CubeCL's task queue for the device with a blocking no-op task, so that every kernel
//! *submitted* before the drop has been handed to the driver (CubeCL's server runs tasks on
//! its own thread, in submission order), (2) synchronises the device's primary context
//! (`cuCtxSynchronize`), which waits for every stream in it, CubeCL's included; and only when
//! all of them are done (3) calls `cuMemFreeHost`.
//!
//! Why this choice: CubeCL 0.10 exposes no handle to its CUDA streams or events, so the release
//! cannot wait on "just the work that read this buffer"; a context sync is the narrowest wait
//! available, and doing it on a background thread keeps it off the thread that drops the last
//! reference (which can be CubeCL's own server thread, when its drop queue releases an upload
//! source: blocking or re-entering CubeCL there would stall or deadlock it). Frees are rare
//! (offloaded parameters live as long as the model), so the cost of the context sync is paid
//! rarely. The byte counters of [`crate::host_memory_stats`] drop when the last reference
//! goes; [`wait_pinned_releases`] waits until the memory itself has been freed.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, OnceLock};

use cudarc::driver::CudaContext;
use cudarc::driver::sys::CUdevice_attribute;

use super::{CudaError, driver};
use crate::host::{DeviceReaders, HostBuffer, HostMemoryKind, HostRelease};

/// Buffers at least this large are zeroed by several threads (a 100 GB model's offloaded
/// weights would otherwise spend seconds in one memset).
const PARALLEL_ZERO_MIN: usize = 64 << 20;

/// Zeroes `len` bytes at `ptr`, on several threads for a large buffer.
///
/// # Safety
/// `ptr` must point to `len` writable bytes that nothing else accesses meanwhile.
unsafe fn zero(ptr: NonNull<u8>, len: usize) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if len < PARALLEL_ZERO_MIN || threads == 1 {
        // SAFETY: guaranteed by the caller.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        return;
    }
    let chunk = len.div_ceil(threads);
    let base = ptr.as_ptr() as usize;
    std::thread::scope(|scope| {
        for start in (0..len).step_by(chunk) {
            let n = chunk.min(len - start);
            scope.spawn(move || {
                // SAFETY: the chunks `[start, start + n)` are disjoint and within the `len`
                // bytes the caller lends us until every thread has joined (end of the scope).
                unsafe { std::ptr::write_bytes((base + start) as *mut u8, 0, n) };
            });
        }
    });
}

/// Allocates exactly `len` bytes of zeroed, pinned host memory, mapped into the address space
/// of CUDA device `ordinal`, on its primary context.
///
/// The buffer's kind is [`HostMemoryKind::Pinned`] with the device address of the memory
/// (`cuMemHostGetDevicePointer`). An empty buffer allocates nothing and has device address 0.
/// Dropping the last reference frees the memory once no device work can read it any more (see
/// the [module docs](self)).
pub fn alloc_pinned(ordinal: usize, len: usize) -> Result<HostBuffer, CudaError> {
    let ctx = driver::primary_context(ordinal)?;
    if len == 0 {
        let release: HostRelease = Box::new(|_, _, _| {});
        // SAFETY: a zero-length buffer never dereferences its (dangling, aligned) pointer.
        return Ok(unsafe {
            HostBuffer::from_raw(
                NonNull::dangling(),
                0,
                HostMemoryKind::Pinned { device_ptr: 0 },
                release,
            )
        });
    }
    let can_map = driver::attribute(
        ordinal,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY,
    )?;
    if can_map == 0 {
        return Err(CudaError::Unsupported {
            ordinal,
            reason: "the device cannot map host memory (CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)"
                .into(),
        });
    }
    let ptr = driver::host_alloc_mapped(&ctx, len)?;
    let device_ptr = match driver::host_device_pointer(&ctx, ptr) {
        Ok(device_ptr) => device_ptr,
        Err(e) => {
            // SAFETY: just allocated above, never shared, no device work can use it yet.
            if let Err(free) = unsafe { driver::host_free(&ctx, ptr) } {
                log::error!("freeing pinned memory after a failed mapping: {free}");
            }
            return Err(e);
        }
    };
    // SAFETY: `ptr` points to `len` bytes we own exclusively (fresh allocation).
    unsafe { zero(ptr, len) };
    let release: HostRelease = Box::new(move |ptr, len, readers| {
        release_later(PendingFree {
            ptr: ptr.as_ptr() as usize,
            len,
            ordinal,
            readers,
            ctx,
        })
    });
    // SAFETY: `ptr` points to `len` readable and writable bytes that stay allocated until
    // `release` runs (it frees them, later, on the releaser thread), and nothing else frees
    // or writes them meanwhile.
    Ok(unsafe { HostBuffer::from_raw(ptr, len, HostMemoryKind::Pinned { device_ptr }, release) })
}

/// The device address of a pinned buffer, `None` for pageable memory.
pub fn device_ptr(buffer: &HostBuffer) -> Option<u64> {
    match buffer.kind() {
        HostMemoryKind::Pinned { device_ptr } => Some(device_ptr),
        HostMemoryKind::Pageable => None,
    }
}

/// Devices (bit = ordinal, ordinals >= 63 share bit 63) on which device work may read pinned
/// host memory through its device address.
static DEVICE_READS: AtomicU64 = AtomicU64::new(0);

fn device_bit(ordinal: usize) -> u64 {
    1u64 << ordinal.min(63)
}

/// Records that work submitted to CubeCL for device `ordinal` may read pinned host memory
/// through its device address, so that freeing pinned memory of that device first drains
/// CubeCL's queue (see the [module docs](self)). [`launch_raw`](super::launch_raw) calls it;
/// call it yourself before launching such work by any other route.
pub fn note_device_reads(ordinal: usize) {
    DEVICE_READS.fetch_or(device_bit(ordinal), Ordering::SeqCst);
}

fn device_reads(ordinal: usize) -> bool {
    DEVICE_READS.load(Ordering::SeqCst) & device_bit(ordinal) != 0
}

/// A pinned allocation whose last reference is gone.
struct PendingFree {
    /// The host address (a `usize` so that the job is `Send`).
    ptr: usize,
    len: usize,
    /// The device the memory was allocated for (its context owns the allocation).
    ordinal: usize,
    /// Every device recorded as a reader of the buffer.
    readers: DeviceReaders,
    ctx: Arc<CudaContext>,
}

enum Job {
    Free(PendingFree),
    /// Acknowledged once every job before it is done.
    Barrier(Sender<()>),
}

static RELEASER: OnceLock<Option<Sender<Job>>> = OnceLock::new();

/// The releaser thread's queue; `None` when the thread could not be started (frees then run on
/// the dropping thread).
fn releaser() -> Option<&'static Sender<Job>> {
    RELEASER
        .get_or_init(|| {
            let (sender, receiver) = channel::<Job>();
            std::thread::Builder::new()
                .name("burn-offload-pinned-free".into())
                .spawn(move || {
                    while let Ok(job) = receiver.recv() {
                        match job {
                            Job::Free(pending) => free_now(pending),
                            Job::Barrier(ack) => {
                                let _ = ack.send(());
                            }
                        }
                    }
                })
                .map_err(|e| log::warn!("cannot start the pinned-memory releaser thread: {e}"))
                .ok()
                .map(|_| sender)
        })
        .as_ref()
}

fn release_later(pending: PendingFree) {
    let pending = match releaser() {
        Some(queue) => match queue.send(Job::Free(pending)) {
            Ok(()) => return,
            Err(std::sync::mpsc::SendError(Job::Free(pending))) => pending,
            Err(_) => return,
        },
        None => pending,
    };
    free_now(pending);
}

/// Waits until no device that may read the memory can still read it (the allocating device
/// and every recorded reader), then frees it (see the module docs).
fn free_now(pending: PendingFree) {
    let PendingFree {
        ptr,
        len,
        ordinal,
        readers,
        ctx,
    } = pending;
    // A failed probe leaves the count unknown (0): `drain_order` still covers every recorded
    // ordinal, and the first of the shared ones.
    let device_count = driver::probe().map_or(0, |info| info.device_count);
    let mut drained = true;
    for device in readers.drain_order(ordinal, device_count) {
        drained &= drain_device(device, (device == ordinal).then_some(&ctx));
    }
    let Some(ptr) = NonNull::new(ptr as *mut u8) else {
        return;
    };
    if !drained {
        // A reader's work could not be waited for: freeing could let it read freed memory.
        log::error!(
            "leaking {len} bytes of pinned memory (CUDA device {ordinal}): a device that read it \
             could not be synchronised"
        );
        return;
    }
    // SAFETY: `ptr` came from `host_alloc_mapped` in `alloc_pinned`, its last host reference
    // is gone (this runs from the buffer's release), and all device work that could read it
    // has completed: CubeCL's queue drained and the context synchronised above for the
    // allocating device and for every device recorded as a reader.
    if let Err(e) = unsafe { driver::host_free(&ctx, ptr) } {
        log::error!("freeing {len} bytes of pinned memory on CUDA device {ordinal}: {e}");
    }
}

/// Waits until device `ordinal` has finished all work submitted so far: drains CubeCL's queue
/// for it (if kernels there may read pinned memory) and synchronises its primary context
/// (`ctx` where the caller has it, else looked up). `false` when the device exists but its
/// context could not be had, so its work could not be waited for.
pub(crate) fn drain_device(ordinal: usize, ctx: Option<&Arc<CudaContext>>) -> bool {
    if device_reads(ordinal) {
        // Every task submitted to CubeCL's server for this device before this one has run once
        // this blocking no-op returns (one FIFO queue per device).
        if !super::bridge::drain_queue(ordinal) {
            log::warn!("could not drain CubeCL's queue for CUDA device {ordinal}");
        }
    }
    let ctx = match ctx {
        Some(ctx) => ctx.clone(),
        None => match driver::primary_context(ordinal) {
            Ok(ctx) => ctx,
            // A shared-bit ordinal past the last device: nothing there to wait for.
            Err(CudaError::InvalidDevice { .. }) => return true,
            Err(e) => {
                log::error!("CUDA device {ordinal} may read pinned memory being freed: {e}");
                return false;
            }
        },
    };
    if let Err(e) = driver::synchronize_context(&ctx) {
        // The context is unusable (e.g. a faulted kernel): nothing runs there any more, so
        // freeing is still the right thing.
        log::error!("synchronising CUDA device {ordinal} before freeing pinned memory: {e}");
    }
    true
}

/// Waits until no device work can still read `buffers` (allocated for device `ordinal`): the
/// same waits as freeing them ([`drain_device`] for the allocating device and every recorded
/// reader, once each), for buffers that are rewritten instead of freed. `false` if a reader
/// could not be waited for.
pub(crate) fn settle_reads(ordinal: usize, buffers: &[&HostBuffer]) -> bool {
    let readers = buffers
        .iter()
        .fold(DeviceReaders::none(), |r, b| r.union(b.readers()));
    let device_count = driver::probe().map_or(0, |info| info.device_count);
    // Every reader is waited for, even after one fails.
    let mut settled = true;
    for device in readers.drain_order(ordinal, device_count) {
        settled &= drain_device(device, None);
    }
    settled
}

/// Blocks until every pinned buffer dropped so far has actually been freed. Do not call it
/// from CubeCL's server thread.
pub fn wait_pinned_releases() {
    let Some(queue) = releaser() else {
        return; // Frees run synchronously: nothing is pending.
    };
    let (ack, done) = channel();
    if queue.send(Job::Barrier(ack)).is_ok() {
        let _ = done.recv();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroing_covers_every_byte_of_large_and_small_buffers() {
        for len in [0, 1, 4097, PARALLEL_ZERO_MIN + 12_345] {
            let mut buffer = vec![0xA5u8; len + 2];
            let inner = NonNull::new(buffer[1..].as_mut_ptr()).expect("non-null");
            // SAFETY: `inner` points to `len` bytes of `buffer`, which nothing else touches.
            unsafe { zero(inner, len) };
            assert_eq!(buffer[0], 0xA5, "{len}: wrote before the buffer");
            assert_eq!(buffer[len + 1], 0xA5, "{len}: wrote past the buffer");
            assert!(buffer[1..=len].iter().all(|&b| b == 0), "{len}");
        }
    }
}
