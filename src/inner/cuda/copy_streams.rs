//! CUDA's [`CopyStreams`] for the copy engine ([`crate::copy`]): the ring is one CubeCL buffer
//! (so Burn ops read its regions as ordinary handles), the copies run on a non-blocking CUDA
//! stream of the engine's own, and the flags are 32-bit words in device memory:
//!
//! - copy side: `cuStreamWaitValue32(GEQ)` on `reader_done`, then the group's copies, batched
//!   with `cuMemcpyBatchAsync` where the driver has it (CUDA 12.8+: the `_v2` symbol of CUDA
//!   13, else the first one), a loop of `cuMemcpyHtoDAsync` otherwise, then
//!   `cuStreamWriteValue32` of `copy_done`;
//! - op side: the one-thread kernels of `kernels/flags.cu`, launched through CubeCL on the op
//!   thread's stream (whose `CUstream` CubeCL keeps private): `burn_offload_wait_flag` before a
//!   region's first reader, `burn_offload_set_flag` behind its last.
//!
//! Sources stay alive until their copies have run: each batch is followed by a write of its
//! number into a pinned, host-mapped word that the host reads before dropping them.
//!
//! Nothing here takes CubeCL's device thread, its cleanup channel or its drop queue on the
//! copy path: the DMAs and stream memory operations go straight to the driver.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

use burn_backend::DType;
use burn_cubecl::tensor::CubeTensor;
use burn_std::Shape;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::prelude::CubeDim;
use cubecl::server::{CubeCount, Handle};
use cudarc::driver::sys;

use super::kernel::{RawKernel, launch_raw};
use super::{CudaError, driver, pinned};
use crate::copy::{CopyError, CopyJob, CopyStreams, Region, RingShape, Wait, reached};
use crate::host::HostBuffer;
use crate::inner::cubecl::ring::{CubeRing, region_handle, region_tensor};

/// The source of `src/inner/cuda/kernels/flags.cu`.
pub const FLAGS_SOURCE: &str = include_str!("kernels/flags.cu");

/// `burn_offload_wait_flag`: the op stream waits for a flag.
pub const WAIT_FLAG: RawKernel =
    RawKernel::new(FLAGS_SOURCE, "burn_offload_wait_flag", CubeDim::new_1d(1));

/// `burn_offload_set_flag`: the op stream sets a flag behind its earlier work.
pub const SET_FLAG: RawKernel =
    RawKernel::new(FLAGS_SOURCE, "burn_offload_set_flag", CubeDim::new_1d(1));

/// Regions start at multiples of this many bytes (as CubeCL's own buffers do).
pub const RING_ALIGN: u64 = 256;

/// `CUmemcpyAttributes` (CUDA 12.8+): the same 24 bytes in every header version since.
#[repr(C)]
struct MemcpyAttributes {
    src_access_order: u32,
    src_location_type: u32,
    src_location_id: i32,
    dst_location_type: u32,
    dst_location_id: i32,
    flags: u32,
}

const _: () = assert!(std::mem::size_of::<MemcpyAttributes>() == 24);

/// `CU_MEMCPY_SRC_ACCESS_ORDER_STREAM`: the source is read in stream order (it stays valid
/// until then: the sources are kept until the batch's progress word has passed).
const SRC_ACCESS_ORDER_STREAM: u32 = 1;
const LOCATION_DEVICE: u32 = 1;
const LOCATION_HOST: u32 = 2;
/// `CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE`.
const PREFER_OVERLAP: u32 = 1;

/// `cuMemcpyBatchAsync_v2` (CUDA 13).
type BatchV2 = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    sys::CUstream,
) -> sys::CUresult;

/// `cuMemcpyBatchAsync` (CUDA 12.8 and 12.9: with a `failIdx` out-parameter).
type BatchV1 = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    sys::CUstream,
) -> sys::CUresult;

/// How a group's copies are queued.
#[derive(Debug, Clone, Copy)]
enum Batch {
    V2(BatchV2),
    V1(BatchV1),
    /// One `cuMemcpyHtoDAsync` per copy.
    Loop,
}

/// How the copy engine queues a group of copies on this driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BatchPath {
    /// One `cuMemcpyBatchAsync` call per group.
    Batched,
    /// One `cuMemcpyHtoDAsync` per copy (drivers older than CUDA 12.8, or forced).
    Loop,
}

fn find_batch() -> Batch {
    // SAFETY: looks symbols up in the driver library cudarc has loaded (or loads now); each
    // is cast to the signature its CUDA header declares for that name.
    unsafe {
        let lib = sys::culib();
        if let Ok(f) = lib.get::<BatchV2>(b"cuMemcpyBatchAsync_v2\0") {
            return Batch::V2(*f);
        }
        if let Ok(f) = lib.get::<BatchV1>(b"cuMemcpyBatchAsync\0") {
            return Batch::V1(*f);
        }
    }
    Batch::Loop
}

/// A `CUstream` of the engine's own, destroyed on drop (null: leaked, see
/// [`CudaCopyStreams`]'s `Drop`).
struct OwnStream(sys::CUstream);

// SAFETY: a CUstream is a driver handle usable from any thread of the process; the engine
// serialises the calls that queue work on it.
unsafe impl Send for OwnStream {}
// SAFETY: see `Send`.
unsafe impl Sync for OwnStream {}

impl Drop for OwnStream {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the stream was created by `cuStreamCreate` in the primary context and is
            // not used after this; its queued work still completes (`cuStreamDestroy`
            // returns at once and releases the stream once the work is done).
            unsafe {
                let _ = sys::cuStreamDestroy_v2(self.0);
            }
        }
    }
}

/// Device memory of the flags (`cuMemAlloc`), freed on drop (0: leaked). The owner frees it
/// only once no device work can touch it any more: [`CudaCopyStreams`]'s `Drop` synchronises
/// the device first, and `new` drops it before any work that uses it was queued.
struct DeviceWords {
    ptr: sys::CUdeviceptr,
}

impl Drop for DeviceWords {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by `cuMemAlloc` in the primary context; no device work uses
            // it any more (see the type's docs).
            unsafe {
                let _ = sys::cuMemFree_v2(self.ptr);
            }
        }
    }
}

fn device_error(e: CudaError) -> CopyError {
    CopyError::Device {
        reason: e.to_string(),
    }
}

fn check(call: &'static str, result: sys::CUresult) -> Result<(), CopyError> {
    result
        .result()
        .map_err(|e| device_error(CudaError::driver(call, e)))
}

/// Batches queued, with their sources, until their progress word has passed.
struct InFlight {
    next: u32,
    sources: VecDeque<(u32, Vec<Arc<HostBuffer>>)>,
}

/// The CUDA streams, ring and flags of a copy engine (see the [module docs](self)).
pub struct CudaCopyStreams {
    device: CudaDevice,
    shape: RingShape,
    stream: OwnStream,
    /// The ring: one CubeCL buffer, held for the engine's life.
    ring: Handle,
    ring_ptr: u64,
    flags: DeviceWords,
    /// One pinned, host-mapped word: the number of the last batch whose copies have run.
    progress: HostBuffer,
    progress_dev: u64,
    batch: Batch,
    in_flight: Mutex<InFlight>,
}

impl CudaCopyStreams {
    /// A ring of `capacity` bytes (at most the largest buffer CubeCL allocates there, rounded
    /// down to [`RING_ALIGN`]) on `device` (allocated through CubeCL on the calling thread's
    /// stream), `slots` sets of flags, room for `consumers` op threads (at most 64),
    /// copies batched where the driver can (unless `batched` is false).
    pub fn new(
        device: &CudaDevice,
        capacity: u64,
        slots: usize,
        consumers: usize,
        batched: bool,
    ) -> Result<Self, CudaError> {
        if capacity == 0 || slots == 0 || consumers == 0 || consumers > 64 {
            return Err(CudaError::InvalidArgument {
                reason: format!(
                    "a copy engine needs a ring of at least one byte, at least one slot and \
                     1 to 64 consumers (got {capacity} bytes, {slots} slots, {consumers} \
                     consumers)"
                ),
            });
        }
        let client = driver::cubecl_client(device)?;
        // No larger than the largest buffer CubeCL allocates on the device.
        let largest = client.properties().memory.max_page_size;
        let capacity = if capacity > largest {
            largest / RING_ALIGN * RING_ALIGN
        } else {
            capacity
        };
        let shape = RingShape {
            capacity,
            slots,
            consumers,
            align: RING_ALIGN,
        };
        let ctx = driver::primary_context(device.index)?;
        let words = shape.flag_words();
        let mut flags_ptr: sys::CUdeviceptr = 0;
        // SAFETY: the primary context is current (bound above); `flags_ptr` is a valid
        // out-pointer.
        unsafe { sys::cuMemAlloc_v2(&mut flags_ptr, words * 4) }
            .result()
            .map_err(|e| CudaError::driver("cuMemAlloc", e))?;
        let flags = DeviceWords { ptr: flags_ptr };
        // SAFETY: `flags_ptr` holds `words` 32-bit words, just allocated.
        unsafe { sys::cuMemsetD32_v2(flags_ptr, 0, words) }
            .result()
            .map_err(|e| CudaError::driver("cuMemsetD32", e))?;
        let mut raw: sys::CUstream = std::ptr::null_mut();
        // SAFETY: the context is current; `raw` is a valid out-pointer.
        unsafe {
            sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        }
        .result()
        .map_err(|e| CudaError::driver("cuStreamCreate", e))?;
        let stream = OwnStream(raw);
        let progress = pinned::alloc_pinned(device.index, 4)?;
        let progress_dev = pinned::device_ptr(&progress).ok_or(CudaError::InvalidArgument {
            reason: "pinned memory without a device address".into(),
        })?;
        let ring = client.empty(capacity as usize);
        let ring_ptr = client
            .get_resource(ring.clone())
            .map_err(CudaError::server)?
            .resource()
            .ptr;
        drop(ctx);
        Ok(Self {
            device: device.clone(),
            shape,
            stream,
            ring,
            ring_ptr,
            flags,
            progress,
            progress_dev,
            batch: if batched { find_batch() } else { Batch::Loop },
            in_flight: Mutex::new(InFlight {
                next: 1,
                sources: VecDeque::new(),
            }),
        })
    }

    /// How groups of copies are queued.
    pub fn batch_path(&self) -> BatchPath {
        match self.batch {
            Batch::Loop => BatchPath::Loop,
            Batch::V1(_) | Batch::V2(_) => BatchPath::Batched,
        }
    }

    /// Waits until every copy queued on the copy stream has run (for benches and tests: the
    /// engine itself never waits for the device).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        driver::primary_context(self.device.index)?;
        // SAFETY: the stream is ours and alive.
        unsafe { sys::cuStreamSynchronize(self.stream.0) }
            .result()
            .map_err(|e| CudaError::driver("cuStreamSynchronize", e))
    }

    /// The ring's bytes of `region` as a CubeCL handle (a view of the ring's buffer).
    pub fn handle(&self, region: &Region) -> Result<Handle, CopyError> {
        region_handle(&self.ring, &self.shape, region.offset, region.len)
    }

    /// A contiguous burn-cubecl tensor of `shape` and `dtype` over `region` (which must hold
    /// exactly its bytes).
    pub fn tensor(
        &self,
        region: &Region,
        shape: Shape,
        dtype: DType,
    ) -> Result<CubeTensor<CudaRuntime>, CopyError> {
        let client = driver::cubecl_client(&self.device).map_err(device_error)?;
        region_tensor(
            client,
            self.device.clone(),
            &self.ring,
            &self.shape,
            region,
            shape,
            dtype,
        )
    }

    fn bind(&self) -> Result<(), CopyError> {
        driver::primary_context(self.device.index)
            .map(drop)
            .map_err(device_error)
    }

    /// The device address of `copy_done[slot]` (checked to be a flag word).
    fn copy_done(&self, slot: usize) -> Result<u64, CopyError> {
        Ok(self.flags.ptr + 4 * self.shape.copy_flag(slot)? as u64)
    }

    /// The device address of `reader_done[slot][consumer]` (checked to be a flag word).
    fn reader_done(&self, slot: usize, consumer: usize) -> Result<u64, CopyError> {
        Ok(self.flags.ptr + 4 * self.shape.reader_flag(slot, consumer)? as u64)
    }

    fn in_flight(&self) -> MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of the last batch the copy stream has finished.
    fn progress(&self) -> u32 {
        // SAFETY: the buffer holds 4 bytes, aligned (pinned allocations are page-aligned);
        // the device writes it, so the read is volatile.
        unsafe { std::ptr::read_volatile(self.progress.as_ptr().cast::<u32>()) }
    }

    fn launch_flag(&self, kernel: RawKernel, flag: u64, value: u32) -> Result<(), CopyError> {
        // SAFETY: `flag` is a word of `self.flags` (from `copy_done`/`reader_done`, which
        // check the index against the flag words), freed only after the context has been
        // synchronised (in `Drop`); the params match `FlagParams` (two u64 words); the kernel
        // touches nothing else.
        unsafe {
            launch_raw(
                &self.device,
                kernel,
                CubeCount::Static(1, 1, 1),
                Vec::new(),
                &[flag, value as u64],
            )
        }
        .map_err(device_error)
    }
}

impl CopyStreams for CudaCopyStreams {
    fn shape(&self) -> RingShape {
        self.shape
    }

    fn current_queue(&self) -> u64 {
        crate::inner::cubecl::transfer::current_stream()
    }

    fn copy_wait(&self, wait: Wait) -> Result<(), CopyError> {
        let flag = self.reader_done(wait.slot, wait.consumer)?;
        self.bind()?;
        // SAFETY: the stream is ours and alive; `flag` is a word of `self.flags`, alive until
        // the stream has been synchronised in `Drop`.
        let result = unsafe {
            sys::cuStreamWaitValue32_v2(
                self.stream.0,
                flag,
                wait.value,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        };
        check("cuStreamWaitValue32", result)
    }

    fn copy(&self, jobs: Vec<CopyJob>) -> Result<(), CopyError> {
        for job in &jobs {
            self.shape.check_span(job.offset, job.source.len())?;
        }
        if jobs.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let mut in_flight = self.in_flight();
        // Drop the sources of the batches that have run.
        let done = self.progress();
        while in_flight
            .sources
            .front()
            .is_some_and(|(n, _)| reached(done, *n))
        {
            in_flight.sources.pop_front();
        }
        let mut dsts: Vec<sys::CUdeviceptr> =
            jobs.iter().map(|j| self.ring_ptr + j.offset).collect();
        let mut srcs: Vec<sys::CUdeviceptr> = jobs
            .iter()
            .map(|j| j.source.bytes().as_ptr() as sys::CUdeviceptr)
            .collect();
        let mut sizes: Vec<usize> = jobs.iter().map(|j| j.source.len() as usize).collect();
        for job in &jobs {
            job.source.buffer().note_reader(self.device.index);
        }
        let mut attrs = MemcpyAttributes {
            src_access_order: SRC_ACCESS_ORDER_STREAM,
            src_location_type: LOCATION_HOST,
            src_location_id: 0,
            dst_location_type: LOCATION_DEVICE,
            dst_location_id: self.device.index as i32,
            flags: PREFER_OVERLAP,
        };
        let mut attr_index = [0usize];
        let n = jobs.len();
        // SAFETY: every destination lies inside the ring (checked above), which this struct
        // keeps allocated; every source is a live host range (`CopySource` checked it against
        // its buffer) kept alive in `in_flight` until the progress word says the batch has
        // run; the arrays hold `n` entries and outlive the call; the stream is ours.
        let (call, result) = unsafe {
            match self.batch {
                Batch::V2(f) => (
                    "cuMemcpyBatchAsync_v2",
                    f(
                        dsts.as_mut_ptr(),
                        srcs.as_mut_ptr(),
                        sizes.as_mut_ptr(),
                        n,
                        &mut attrs,
                        attr_index.as_mut_ptr(),
                        1,
                        self.stream.0,
                    ),
                ),
                Batch::V1(f) => {
                    let mut fail = 0usize;
                    (
                        "cuMemcpyBatchAsync",
                        f(
                            dsts.as_mut_ptr(),
                            srcs.as_mut_ptr(),
                            sizes.as_mut_ptr(),
                            n,
                            &mut attrs,
                            attr_index.as_mut_ptr(),
                            1,
                            &mut fail,
                            self.stream.0,
                        ),
                    )
                }
                Batch::Loop => {
                    let mut result = sys::CUresult::CUDA_SUCCESS;
                    for i in 0..n {
                        result = sys::cuMemcpyHtoDAsync_v2(
                            dsts[i],
                            srcs[i] as *const c_void,
                            sizes[i],
                            self.stream.0,
                        );
                        if result != sys::CUresult::CUDA_SUCCESS {
                            break;
                        }
                    }
                    ("cuMemcpyHtoDAsync", result)
                }
            }
        };
        check(call, result)?;
        let number = in_flight.next;
        in_flight.next = number.wrapping_add(1).max(1);
        // SAFETY: the progress word is 4 bytes of pinned, mapped memory this struct owns,
        // freed only after the device has finished (its release drains the device).
        let result = unsafe {
            sys::cuStreamWriteValue32_v2(
                self.stream.0,
                self.progress_dev,
                number,
                sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
            )
        };
        in_flight.sources.push_back((
            number,
            jobs.into_iter()
                .map(|j| j.source.buffer().clone())
                .collect(),
        ));
        check("cuStreamWriteValue32", result)
    }

    fn copy_signal(&self, slot: usize, value: u32) -> Result<(), CopyError> {
        let flag = self.copy_done(slot)?;
        self.bind()?;
        // SAFETY: the stream is ours; the flag is a word of `self.flags`, alive until the
        // stream has been synchronised in `Drop`. The default flags order the write after the
        // copies before it and make them visible first.
        let result = unsafe {
            sys::cuStreamWriteValue32_v2(
                self.stream.0,
                flag,
                value,
                sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
            )
        };
        check("cuStreamWriteValue32", result)
    }

    fn op_wait(&self, slot: usize, value: u32) -> Result<(), CopyError> {
        self.launch_flag(WAIT_FLAG, self.copy_done(slot)?, value)
    }

    fn op_signal(&self, slot: usize, consumer: usize, value: u32) -> Result<(), CopyError> {
        self.launch_flag(SET_FLAG, self.reader_done(slot, consumer)?, value)?;
        // The copy stream waits for this flag: the launch must reach the driver now, not at
        // the op thread's next blocking call (CubeCL's device thread takes queued tasks in
        // full or flushed batches).
        crate::inner::cubecl::flush_queue::<CudaRuntime>(&self.device);
        Ok(())
    }
}

impl CubeRing<CudaRuntime> for CudaCopyStreams {
    fn region_tensor(
        &self,
        region: &Region,
        shape: Shape,
        dtype: DType,
    ) -> Result<CubeTensor<CudaRuntime>, CopyError> {
        self.tensor(region, shape, dtype)
    }
}

impl Drop for CudaCopyStreams {
    fn drop(&mut self) {
        // The copy stream, and every op stream's flag kernels (they read and write the flags),
        // must be done before the flags go.
        let synced = driver::primary_context(self.device.index).and_then(|ctx| {
            // SAFETY: the stream is ours and not used after this.
            unsafe { sys::cuStreamSynchronize(self.stream.0) }
                .result()
                .map_err(|e| CudaError::driver("cuStreamSynchronize", e))?;
            // CubeCL's queue first: flag kernels it has not handed to the driver yet.
            super::bridge::drain_queue(self.device.index);
            driver::synchronize_context(&ctx)
        });
        if let Err(e) = synced {
            // Leaking is the only safe choice when the device state is unknown.
            log::warn!("copy engine: could not synchronise the device ({e}); leaking its flags");
            self.flags.ptr = 0;
            self.stream.0 = std::ptr::null_mut();
            return;
        }
        // The stream and the flags go with the fields (nothing can use them any more).
        self.in_flight().sources.clear();
    }
}

#[cfg(test)]
mod tests {
    use cubecl::prelude::KernelMetadata;

    use super::*;

    #[test]
    fn the_flag_kernels_are_self_contained_extern_c_entry_points() {
        assert_ne!(WAIT_FLAG.id(), SET_FLAG.id());
        assert!(
            !FLAGS_SOURCE
                .lines()
                .any(|line| line.trim_start().starts_with("#include"))
        );
        for entry in [WAIT_FLAG.entrypoint(), SET_FLAG.entrypoint()] {
            assert!(FLAGS_SOURCE.contains(&format!("extern \"C\" __global__ void {entry}(")));
        }
        // One thread: the launcher launches one block.
        assert_eq!(WAIT_FLAG.cube_dim(), CubeDim::new_1d(1));
    }

    #[test]
    fn making_streams_without_a_driver_is_an_error() {
        if super::driver::driver_available() {
            return;
        }
        let err = CudaCopyStreams::new(&CudaDevice::new(0), 1 << 20, 4, 1, true)
            .err()
            .expect("no driver here");
        assert!(err.is_no_driver(), "{err}");
    }

    #[test]
    fn bad_sizes_are_refused_before_touching_the_device() {
        for (capacity, slots, consumers) in [(0, 4, 1), (1024, 0, 1), (1024, 4, 0), (1024, 4, 65)] {
            let err = CudaCopyStreams::new(&CudaDevice::new(0), capacity, slots, consumers, true)
                .err()
                .expect("refused");
            assert!(matches!(err, CudaError::InvalidArgument { .. }), "{err}");
        }
    }
}
