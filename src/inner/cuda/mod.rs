//! The CUDA layer (feature `cuda`): pinned, device-mapped host memory, uploads from it into
//! CubeCL device buffers, and hand-written CUDA C++ kernels launched on CubeCL's own stream.
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
//! - `bridge.rs`: the few places that rely on CubeCL's internals (a buffer written by one
//!   server task, draining CubeCL's queue, the stream of a thread, `RawKernel`'s compiled
//!   representation), each with a test that fails if CubeCL changes them;
//! - `offload.rs`: the [`OffloadTarget`](crate::inner::OffloadTarget) implementation for
//!   [`CudaBackend`](crate::CudaBackend) built from the above.
//!
//! Everything here works on the device's primary context, the one CubeCL uses, and queues
//! device work on CubeCL's stream of the calling thread (CubeCL gives each OS thread its own
//! stream), so it is ordered with Burn's own kernels without host synchronisation.
//!
//! [`probe`] tells whether a CUDA driver and device are present; tests and benches use it to
//! skip cleanly on machines without a GPU.

mod bridge;
pub mod driver;
pub mod error;
pub mod kernel;
mod offload;
pub mod ops;
pub mod pinned;
pub mod transfer;

pub use driver::{DriverInfo, driver_available, memory_info, probe};
pub use error::CudaError;
pub use kernel::{RawKernel, launch_raw};
pub use pinned::{alloc_pinned, note_device_reads, wait_pinned_releases};
pub use transfer::{
    UploadPath, current_stream, free_upload_sources, release_upload_sources, sync, upload,
    upload_dma, upload_dma_after, upload_sm_copy, upload_tensor, upload_tensor_after,
};
