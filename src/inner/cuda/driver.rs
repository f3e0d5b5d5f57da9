//! The driver layer: detecting a usable CUDA driver without panicking, retaining each
//! device's primary context, and checked wrappers (`Result<_, CudaError>`) around the few raw
//! driver calls the rest of [`crate::cuda`] makes.
//!
//! Layering, as in cudarc: `cudarc::driver::sys` (raw FFI) → `cudarc::driver::result` and the
//! checked functions here → the safe types of [`pinned`](super::pinned),
//! [`kernel`](super::kernel) and [`transfer`](super::transfer).
//!
//! cudarc is built with `fallback-dynamic-loading` (as cubecl-cuda builds it): `libcuda.so` is
//! opened on the first driver call, and that call *panics* when the library is missing.
//! [`probe`] therefore checks for the library first (`sys::is_culib_present`, which only
//! tries to `dlopen` it) and runs `cuInit` under `catch_unwind`; every other function here
//! calls [`probe`] before touching the driver, so none of them panics on a machine without
//! CUDA.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

use cubecl::Runtime;
use cubecl::client::ComputeClient;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, result, sys};

use super::CudaError;

/// What [`probe`] found: a loaded driver and at least one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverInfo {
    /// Number of CUDA devices.
    pub device_count: usize,
    /// The driver's CUDA version, e.g. `13000` for CUDA 13.0.
    pub driver_version: i32,
}

static PROBE: OnceLock<Result<DriverInfo, CudaError>> = OnceLock::new();

/// Checks, once per process, that a CUDA driver can be loaded and initialised and that it sees
/// at least one device. Never panics: a missing `libcuda.so`, a failing `cuInit` (e.g. no GPU
/// in a container) or zero devices give [`CudaError::NoDriver`] with the reason.
pub fn probe() -> Result<DriverInfo, CudaError> {
    PROBE.get_or_init(probe_uncached).clone()
}

/// `true` when [`probe`] succeeds.
pub fn driver_available() -> bool {
    probe().is_ok()
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn probe_uncached() -> Result<DriverInfo, CudaError> {
    // SAFETY: `is_culib_present` only tries `dlopen` on the candidate library names and drops
    // the handles; it touches no driver state. `catch_unwind` guards against a panic in the
    // name construction.
    let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err(CudaError::NoDriver {
            reason: "the CUDA driver library (libcuda.so) was not found by the dynamic loader"
                .into(),
        });
    }
    // The library is present, so loading symbols from it cannot hit cudarc's "library not
    // found" panic; a missing symbol (an ancient driver) still panics, hence `catch_unwind`.
    let no_driver = |reason: String| CudaError::NoDriver { reason };
    catch_unwind(result::init)
        .map_err(|p| no_driver(format!("cuInit panicked: {}", panic_message(p))))?
        .map_err(|e| no_driver(format!("cuInit failed: {e:?}")))?;
    let count = catch_unwind(result::device::get_count)
        .map_err(|p| no_driver(format!("cuDeviceGetCount panicked: {}", panic_message(p))))?
        .map_err(|e| no_driver(format!("cuDeviceGetCount failed: {e:?}")))?;
    if count <= 0 {
        return Err(no_driver("the driver reports no CUDA device".into()));
    }
    let mut version = 0i32;
    // SAFETY: `version` is a valid out-pointer for the duration of the call; the driver is
    // initialised (cuInit succeeded above).
    let version = match catch_unwind(AssertUnwindSafe(|| unsafe {
        sys::cuDriverGetVersion(&mut version).result()
    })) {
        Ok(Ok(())) => version,
        _ => 0,
    };
    Ok(DriverInfo {
        device_count: count as usize,
        driver_version: version,
    })
}

fn check_ordinal(ordinal: usize) -> Result<DriverInfo, CudaError> {
    let info = probe()?;
    if ordinal >= info.device_count {
        return Err(CudaError::InvalidDevice {
            ordinal,
            count: info.device_count,
        });
    }
    Ok(info)
}

static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();

/// The device's **primary** context, retained once per process and bound to the calling
/// thread.
///
/// `CudaContext::new` retains the primary context (`cuDevicePrimaryCtxRetain`), the same one
/// cubecl-cuda retains for its server, so memory allocated here and CubeCL's streams and
/// buffers live in one context. The retained context is kept for the life of the process.
pub fn primary_context(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    check_ordinal(ordinal)?;
    let contexts = CONTEXTS.get_or_init(Default::default);
    let mut contexts = contexts.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = match contexts.get(&ordinal) {
        Some(ctx) => ctx.clone(),
        None => {
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| CudaError::driver("cuDevicePrimaryCtxRetain", e))?;
            contexts.insert(ordinal, ctx.clone());
            ctx
        }
    };
    drop(contexts);
    ctx.bind_to_thread()
        .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
    Ok(ctx)
}

/// CubeCL's client for `device`, after checking that the driver and the device are usable
/// (CubeCL's CUDA server panics when it starts without them).
pub fn cubecl_client(device: &CudaDevice) -> Result<ComputeClient<CudaRuntime>, CudaError> {
    primary_context(device.index)?;
    Ok(CudaRuntime::client(device))
}

/// Reads a device attribute.
pub fn attribute(ordinal: usize, attribute: CUdevice_attribute) -> Result<i32, CudaError> {
    primary_context(ordinal)?
        .attribute(attribute)
        .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))
}

/// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
pub fn device_name(ordinal: usize) -> Result<String, CudaError> {
    primary_context(ordinal)?
        .name()
        .map_err(|e| CudaError::driver("cuDeviceGetName", e))
}

/// The device's compute capability as `(major, minor)`, e.g. `(9, 0)` on Hopper.
pub fn compute_capability(ordinal: usize) -> Result<(i32, i32), CudaError> {
    Ok((
        attribute(
            ordinal,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )?,
        attribute(
            ordinal,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        )?,
    ))
}

/// Number of streaming multiprocessors.
pub fn multiprocessor_count(ordinal: usize) -> Result<u32, CudaError> {
    attribute(
        ordinal,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )
    .map(|v| v.max(1) as u32)
}

/// Free and total device memory in bytes (`cuMemGetInfo`), as the driver sees it: memory
/// held by CubeCL's pools counts as used even where no tensor occupies it.
pub fn memory_info(ordinal: usize) -> Result<(u64, u64), CudaError> {
    let (free, total) = primary_context(ordinal)?
        .mem_get_info()
        .map_err(|e| CudaError::driver("cuMemGetInfo", e))?;
    Ok((free as u64, total as u64))
}

/// Waits until every stream of the context (CubeCL's included) has finished its work.
pub(crate) fn synchronize_context(ctx: &CudaContext) -> Result<(), CudaError> {
    ctx.synchronize()
        .map_err(|e| CudaError::driver("cuCtxSynchronize", e))
}

/// `cuMemHostAlloc(len, DEVICEMAP | PORTABLE)` on `ctx`: page-locked host memory, mapped into
/// the device address space, pinned for every context. Not write-combined (so host reads of it
/// stay fast, unlike `CudaContext::alloc_pinned`'s default).
pub(crate) fn host_alloc_mapped(ctx: &CudaContext, len: usize) -> Result<NonNull<u8>, CudaError> {
    ctx.bind_to_thread()
        .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
    let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
    // SAFETY: the context is current on this thread; the returned memory is uninitialised,
    // which the caller handles (it zeroes it before exposing it).
    let ptr = unsafe { result::malloc_host(len, flags) }
        .map_err(|e| CudaError::driver("cuMemHostAlloc", e))?;
    NonNull::new(ptr.cast::<u8>()).ok_or(CudaError::Driver {
        call: "cuMemHostAlloc",
        message: "returned a null pointer".into(),
    })
}

/// `cuMemHostGetDevicePointer_v2`: the address at which the device sees mapped host memory
/// (equal to the host address under unified addressing, but asked for rather than assumed).
pub(crate) fn host_device_pointer(ctx: &CudaContext, ptr: NonNull<u8>) -> Result<u64, CudaError> {
    ctx.bind_to_thread()
        .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
    let mut device_ptr: sys::CUdeviceptr = 0;
    // SAFETY: `ptr` was returned by `cuMemHostAlloc` with `DEVICEMAP` and is still allocated;
    // `device_ptr` is a valid out-pointer; flags must be 0.
    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr.as_ptr().cast(), 0) }
        .result()
        .map_err(|e| CudaError::driver("cuMemHostGetDevicePointer", e))?;
    Ok(device_ptr)
}

/// `cuMemFreeHost`.
///
/// # Safety
/// `ptr` must come from [`host_alloc_mapped`], not be freed yet, and no host code or device
/// work may access it any more.
pub(crate) unsafe fn host_free(ctx: &CudaContext, ptr: NonNull<u8>) -> Result<(), CudaError> {
    ctx.bind_to_thread()
        .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
    // SAFETY: guaranteed by the caller (see above).
    unsafe { result::free_host(ptr.as_ptr().cast()) }
        .map_err(|e| CudaError::driver("cuMemFreeHost", e))
}
