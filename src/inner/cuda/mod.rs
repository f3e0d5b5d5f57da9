//! The CUDA layer (feature `cuda`): what CUDA adds to the generic CubeCL target
//! ([`crate::inner::cubecl`]): pinned, device-mapped host memory, DMA and SM-copy uploads from
//! it, and hand-written CUDA C++ kernels that read it in place, launched on CubeCL's own stream.
//!
//! Layered like cudarc: raw driver calls (`cudarc::driver::sys`) → checked results
//! ([`driver`], `Result<_, CudaError>`, never a panic when there is no driver) → safe types
//! and functions:
//! - [`pinned`]: [`alloc_pinned`] returns an exact-size [`HostBuffer`](crate::HostBuffer) of
//!   kind `Pinned { device_ptr }`, freed only once the device cannot read it any more;
//! - [`kernel`]: [`RawKernel`], a `CubeTask` for hand-written sources in `src/inner/cuda/kernels/`,
//!   and [`launch_raw`]; the `stream_read` kernel (SM copy from host-mapped memory);
//! - [`transfer`]: [`upload_dma`] (copy engine, no bounce copy), [`upload_sm_copy`] and
//!   [`upload_tensor`], which gives a burn-cubecl tensor;
//! - [`ops`]: launchers of the zero-copy `matmul_host` and `gather_host` kernels;
//! - [`quant_ops`]: launchers of `qmatmul_host` and `qgather_host`, which read quantized
//!   weights in place and dequantize them as they read;
//! - [`copy_streams`]: [`CudaCopyStreams`](copy_streams::CudaCopyStreams), the copy engine's
//!   ([`crate::copy`]) own stream, ring and flags, with the flag kernels of
//!   `kernels/flags.cu`;
//! - `bridge.rs`: where this layer relies on CubeCL's internals (`RawKernel`'s compiled
//!   representation), with a test that fails if CubeCL changes it;
//! - `runtime.rs`: [`OffloadRuntime`](crate::inner::cubecl::OffloadRuntime) for `CudaRuntime`,
//!   built from the above, which the generic target uses for both the fused
//!   `burn::backend::Cuda` and the unfused [`CudaBackend`](crate::CudaBackend).
//!
//! Everything here works on the device's primary context, the one CubeCL uses, and queues
//! device work on CubeCL's stream of the calling thread (CubeCL gives each OS thread its own
//! stream), so it is ordered with Burn's own kernels without host synchronisation.
//!
//! [`probe`] tells whether a CUDA driver and device are present; tests and benches use it to
//! skip cleanly on machines without a GPU.

mod bridge;
pub mod copy_streams;
pub mod driver;
pub mod error;
pub mod kernel;
pub mod ops;
pub mod pinned;
pub mod quant_ops;
mod runtime;
pub mod transfer;

pub use driver::{DriverInfo, driver_available, memory_info, probe};
pub use error::CudaError;
pub use kernel::{RawKernel, launch_raw};
pub use pinned::{alloc_pinned, note_device_reads, wait_pinned_releases};
pub use transfer::{
    UploadPath, current_stream, free_upload_sources, release_upload_sources, sync, upload,
    upload_dma, upload_dma_after, upload_sm_copy, upload_tensor, upload_tensor_after,
};
