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
#[cfg(feature = "collective")]
pub mod collective;
pub mod context;
pub mod copy;
pub mod device;
pub mod error;
pub mod fit;
pub mod host;
pub mod inner;
mod mark;
pub mod mode;
pub mod placement;
pub mod plan;
pub mod policy;
pub mod prefetch;
pub mod quant;
mod recycle;
pub mod stats;
pub mod train;

/// The wgpu target (feature `wgpu`): [`inner::cubecl::wgpu`] (its [`probe`](wgpu::probe)).
#[cfg(feature = "wgpu")]
pub use inner::cubecl::wgpu;
/// The CUDA target (feature `cuda`): [`inner::cuda`], re-exported where it has always been.
#[cfg(feature = "cuda")]
pub use inner::cuda;

pub use auto::Calibration;
pub use backend::{OffloadBackend, OffloadQTensor, OffloadTensor, Offloaded};
pub use context::{ContextConfig, OffloadContext, with_host_placement};
pub use device::OffloadDevice;
pub use error::OffloadError;
pub use host::{HostBuffer, HostMemoryKind, HostTensor};
pub use mark::LOST_PLACEMENT_LOG_TARGET;
pub use mode::{OffloadMode, PrefetchCopies};
pub use placement::{placements, tensor_placement, to_device_memory};
pub use policy::{OffloadPolicy, OffloadReport, ParamReport, Placement, Quantization};
pub use prefetch::set_prefetch_memory_probe;
pub use stats::{
    HostMemoryStats, OpStats, PrefetchStats, host_memory_stats, op_stats, prefetch_stats,
    reset_host_memory_peak, reset_op_stats, reset_prefetch_stats,
};
pub use train::{
    OffloadOptimizer, OptimizerState, StatePlacement, StateTraffic, TrainingMemory, keep_offloaded,
};

/// burn-cuda's unfused backend, the type the CUDA target wraps: `burn::backend::Cuda` without
/// the `fusion` feature (`CubeBackend<CudaRuntime, f32, i32, u8>`).
#[cfg(feature = "cuda")]
pub type CudaBackend<F = f32, I = i32> =
    burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, I, u8>;

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
