//! # burn-offload
//!
//! Run Burn models bigger than GPU memory: [`OffloadBackend<B>`] is a backend decorator (like
//! `Autodiff<B>`) that keeps the parameters an [`OffloadPolicy`] selects in host memory that the
//! device reads — pinned and device-mapped on CUDA — and leaves the rest in device memory.
//! It reproduces vLLM's `--cpu-offload-gb` / `cpu_offload_params` behaviour for Burn.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::nn::{Linear, LinearConfig};
//! use burn_offload::{OffloadBackend, OffloadDevice, OffloadMode, OffloadPolicy};
//!
//! type B = OffloadBackend<NdArray>; // was: type B = NdArray;
//! let device = OffloadDevice::device(Default::default());
//! let model: Linear<B> = LinearConfig::new(64, 64).init(&device);
//! let policy = OffloadPolicy::from_gib(1.0)?.mode(OffloadMode::Uva);
//! let (model, report) = policy.apply(model)?;
//! assert_eq!(report.offloaded_tensors(), 2); // weight and bias
//! # Ok::<(), burn_offload::OffloadError>(())
//! ```
#![warn(missing_docs)]

pub mod auto;
pub mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod host;
pub mod mode;
pub mod policy;
pub mod prefetch;
mod random;
pub mod target;
pub mod train;

pub use auto::Calibration;
pub use backend::{OffloadBackend, OffloadTensor, OpStats, op_stats, reset_op_stats};
pub use device::{OffloadDevice, with_host_placement};
pub use error::OffloadError;
pub use host::{HostBuffer, HostMemoryKind, HostMemoryStats, HostTensor, host_memory_stats};
pub use mode::OffloadMode;
pub use policy::{OffloadPolicy, OffloadReport, ParamReport, Placement};
pub use prefetch::{
    PrefetchStats, prefetch_stats, reset_prefetch_stats, set_prefetch_memory_probe,
};
pub use train::{OffloadOptimizer, keep_offloaded};

/// burn-cuda's unfused backend, the type the CUDA target wraps: `burn::backend::Cuda` without
/// the `fusion` feature (`CubeBackend<CudaRuntime, f32, i32, u8>`).
#[cfg(feature = "cuda")]
pub type CudaBackend<F = f32, I = i32> =
    burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, I, u8>;

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
