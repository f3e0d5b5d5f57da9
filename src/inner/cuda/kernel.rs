//! Hand-written CUDA C++ kernels, compiled by CubeCL (NVRTC) and launched through CubeCL's own
//! launch path, so they run on CubeCL's stream in order with Burn's kernels: no host sync is
//! needed before or after them.
//!
//! [`RawKernel`] is a `CubeTask<CudaCompiler>` (implemented in `bridge.rs`, with the
//! other places that rely on CubeCL's internals) whose `compile` returns the hand-written
//! source and entry point. cubecl-cuda 0.10 (`compute/context.rs`,
//! `CudaContext::compile_kernel`) sends `source` to NVRTC and then calls `repr.unwrap()` for
//! the shared-memory size, so `repr` must be present: it is the compiler's representation of
//! an *empty* kernel definition with the same cube dim and name (no shared memory), built with
//! the real CUDA compiler. The block size comes from the compiled kernel's `cube_dim` (and from
//! `KernelId::cube_dim` on a PTX-cache hit), so both are the kernel's `cube_dim`.
//!
//! Parameters (cubecl-cuda `compute/server.rs`, `launch_checked`, and `CudaContext::
//! execute_task`): one device pointer per buffer in [`KernelArguments::with_buffer`] order,
//! then, on devices with grid constants (compute capability >= 7.0), a pointer to the info
//! words, which the kernel declares as one by-value struct (`const __grid_constant__ Params
//! p`). [`launch_raw`] passes the words with `dynamic_metadata_offset == words.len()`, so no
//! extra info buffer is created and inserted before them.
//!
//! Kernel sources live in `src/inner/cuda/kernels/*.cu`: `extern "C"` entry points, no `#include`
//! (NVRTC compiles them with no include path of ours).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cubecl::cuda::CudaDevice;
use cubecl::prelude::CubeDim;
use cubecl::server::{Binding, CubeCount, KernelArguments, MetadataBindingInfo};

use super::{CudaError, driver, pinned};

/// The source of `src/inner/cuda/kernels/stream_read.cu`.
pub const STREAM_READ_SOURCE: &str = include_str!("kernels/stream_read.cu");

/// Threads per block of the stream-read kernels.
pub const STREAM_READ_BLOCK: u32 = 256;

/// Blocks per SM at most for the stream-read kernels (grid-stride loops cover the rest).
const STREAM_READ_BLOCKS_PER_SM: u32 = 4;

/// FNV-1a, 64 bits: a stable hash of a kernel's source for its [`KernelId`].
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// A hand-written CUDA C++ kernel (one `extern "C" __global__` entry point of a source) that
/// CubeCL compiles with NVRTC and launches on its own stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawKernel {
    pub(super) source: &'static str,
    pub(super) entrypoint: &'static str,
    pub(super) cube_dim: CubeDim,
    pub(super) source_hash: u64,
}

impl RawKernel {
    /// The entry point `entrypoint` of `source`, launched with blocks of `cube_dim` threads.
    pub const fn new(source: &'static str, entrypoint: &'static str, cube_dim: CubeDim) -> Self {
        Self {
            source,
            entrypoint,
            cube_dim,
            source_hash: fnv1a(source.as_bytes()),
        }
    }

    /// The CUDA C++ source.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// The entry point's name.
    pub fn entrypoint(&self) -> &'static str {
        self.entrypoint
    }

    /// Threads per block.
    pub fn cube_dim(&self) -> CubeDim {
        self.cube_dim
    }
}

/// What the launchers need to know about a device, read once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceFacts {
    /// Whether cubecl-cuda passes the info words by value (compute capability >= 7.0,
    /// `comp_opts.supports_features.grid_constants` in cubecl-cuda's `runtime.rs`).
    grid_constants: bool,
    /// Streaming multiprocessors.
    pub(crate) multiprocessors: u32,
}

static DEVICE_FACTS: OnceLock<Mutex<HashMap<usize, DeviceFacts>>> = OnceLock::new();

pub(crate) fn device_facts(ordinal: usize) -> Result<DeviceFacts, CudaError> {
    let cache = DEVICE_FACTS.get_or_init(Default::default);
    let known = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&ordinal)
        .copied();
    if let Some(facts) = known {
        return Ok(facts);
    }
    let (major, _) = driver::compute_capability(ordinal)?;
    let facts = DeviceFacts {
        grid_constants: major >= 7,
        multiprocessors: driver::multiprocessor_count(ordinal)?,
    };
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(ordinal, facts);
    Ok(facts)
}

/// Launches `kernel` on CubeCL's stream of the calling thread for `device`: `buffers` become
/// the leading pointer parameters, `params` the trailing by-value struct of u64 words.
///
/// Returns once the launch is queued; compilation, launch and execution errors surface on the
/// next synchronising call of the stream (e.g. [`crate::cuda::sync`]).
///
/// Also records (see [`pinned::note_device_reads`]) that device work on `device` may read
/// pinned host memory, so that freeing pinned memory waits for it.
///
/// # Safety
/// The kernel must only access memory that stays valid until it completes: the buffers (CubeCL
/// keeps them alive) and any address passed in `params` (e.g. pinned memory from
/// [`alloc_pinned`](crate::cuda::alloc_pinned), whose release waits for the device). `params`
/// must match the kernel's parameter struct, and the kernel must stay within its buffers.
pub unsafe fn launch_raw(
    device: &CudaDevice,
    kernel: RawKernel,
    count: CubeCount,
    buffers: Vec<Binding>,
    params: &[u64],
) -> Result<(), CudaError> {
    let client = driver::cubecl_client(device)?;
    if !params.is_empty() && !device_facts(device.index)?.grid_constants {
        return Err(CudaError::Unsupported {
            ordinal: device.index,
            reason: "hand-written kernels take their parameters by value (grid constants), \
                     which needs compute capability 7.0 or newer"
                .into(),
        });
    }
    pinned::note_device_reads(device.index);
    let arguments = KernelArguments::new()
        .with_buffers(buffers)
        .with_info(MetadataBindingInfo::new(params.to_vec(), params.len()));
    client.launch(Box::new(kernel), count, arguments);
    Ok(())
}

/// `burn_offload_stream_read` of `stream_read.cu`: copies bytes from a device address (pinned
/// host-mapped memory, read over PCIe, or device memory) into a buffer.
pub const STREAM_READ: RawKernel = RawKernel::new(
    STREAM_READ_SOURCE,
    "burn_offload_stream_read",
    CubeDim::new_1d(STREAM_READ_BLOCK),
);

/// `burn_offload_device_copy` of `stream_read.cu`: copies bytes from one buffer to another.
pub const DEVICE_COPY: RawKernel = RawKernel::new(
    STREAM_READ_SOURCE,
    "burn_offload_device_copy",
    CubeDim::new_1d(STREAM_READ_BLOCK),
);

/// A grid for the stream-read kernels: enough blocks to keep every SM busy with many loads in
/// flight, no more than the bytes need (grid-stride loops cover any length).
fn stream_read_grid(ordinal: usize, bytes: usize) -> Result<CubeCount, CudaError> {
    let sms = device_facts(ordinal)?.multiprocessors;
    // One block moves 256 threads * 8 loads * 16 B = 32 KiB per loop iteration.
    let per_block = (STREAM_READ_BLOCK as usize) * 8 * 16;
    let wanted = bytes.div_ceil(per_block).max(1);
    let blocks = wanted.min((sms * STREAM_READ_BLOCKS_PER_SM) as usize) as u32;
    Ok(CubeCount::Static(blocks, 1, 1))
}

fn check_binding(binding: &Binding, bytes: usize, what: &str) -> Result<(), CudaError> {
    let available = binding.size_in_used();
    if (bytes as u64) > available {
        return Err(CudaError::InvalidArgument {
            reason: format!("{what} holds {available} bytes, {bytes} requested"),
        });
    }
    Ok(())
}

/// Copies `bytes` bytes from the device address `src` into the buffer `dst` with
/// [`STREAM_READ`], on CubeCL's stream of the calling thread. Nothing is launched for 0 bytes.
///
/// # Safety
/// `src .. src + bytes` must be readable by `device` (pinned host-mapped memory or device
/// memory) and stay allocated until the kernel has completed. Pinned memory from
/// [`alloc_pinned`](crate::cuda::alloc_pinned) satisfies the second part by itself: its release
/// waits for the device.
pub unsafe fn launch_stream_read(
    device: &CudaDevice,
    src: u64,
    dst: Binding,
    bytes: usize,
) -> Result<(), CudaError> {
    check_binding(&dst, bytes, "the destination buffer")?;
    if bytes == 0 {
        return Ok(());
    }
    let grid = stream_read_grid(device.index, bytes)?;
    // SAFETY: the kernel writes exactly `bytes` bytes of `dst` (checked above) and reads
    // `src .. src + bytes`, valid by the caller's contract; the params match StreamReadParams.
    unsafe { launch_raw(device, STREAM_READ, grid, vec![dst], &[src, bytes as u64]) }
}

/// Copies `bytes` bytes from the buffer `src` into the buffer `dst` with [`DEVICE_COPY`] (an
/// SM copy in device memory), on CubeCL's stream of the calling thread.
pub fn launch_device_copy(
    device: &CudaDevice,
    src: Binding,
    dst: Binding,
    bytes: usize,
) -> Result<(), CudaError> {
    check_binding(&src, bytes, "the source buffer")?;
    check_binding(&dst, bytes, "the destination buffer")?;
    if bytes == 0 {
        return Ok(());
    }
    let grid = stream_read_grid(device.index, bytes)?;
    // SAFETY: both buffers hold at least `bytes` bytes (checked above) and CubeCL keeps them
    // alive until the kernel completes; the params match StreamReadParams.
    unsafe {
        launch_raw(
            device,
            DEVICE_COPY,
            grid,
            vec![dst, src],
            &[0, bytes as u64],
        )
    }
}

#[cfg(test)]
mod tests {
    use cubecl::prelude::KernelMetadata;

    use super::*;

    #[test]
    fn kernel_ids_are_unique_per_entry_point_and_source() {
        assert_ne!(STREAM_READ.id(), DEVICE_COPY.id());
        let other = RawKernel::new(
            "extern \"C\" __global__ void burn_offload_stream_read() {}",
            "burn_offload_stream_read",
            CubeDim::new_1d(STREAM_READ_BLOCK),
        );
        assert_ne!(STREAM_READ.id(), other.id());
        assert_eq!(STREAM_READ.id(), STREAM_READ.id());
        assert_eq!(STREAM_READ.id().cube_dim, STREAM_READ.cube_dim());
    }

    #[test]
    fn kernel_source_is_self_contained() {
        assert!(
            !STREAM_READ_SOURCE
                .lines()
                .any(|line| line.trim_start().starts_with("#include")),
            "NVRTC compiles the kernels with no include path of ours"
        );
        for entry in [STREAM_READ.entrypoint(), DEVICE_COPY.entrypoint()] {
            assert!(
                STREAM_READ_SOURCE.contains(&format!("extern \"C\" __global__ void {entry}(")),
                "{entry} must be an extern \"C\" entry point"
            );
        }
    }
}
