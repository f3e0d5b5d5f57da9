//! The CubeCL target (feature `cubecl`, turned on by `cuda`, `wgpu` and `rocm`), generic over
//! the CubeCL runtime `R`: what uploading, copying and prefetching need, whatever the device.
//!
//! - [`transfer`]: uploads of host views into new CubeCL buffers, written by one task on
//!   CubeCL's device queue without the bounce copy that `ComputeClient::create` makes, and
//!   ordered after other streams' work for prefetched copies;
//! - `bridge.rs`: the few places that rely on CubeCL's internals (a buffer reserved and written
//!   by one server task, draining the device queue, the stream of a thread), each with a test;
//! - `backend.rs`: [`OffloadTarget`](crate::inner::OffloadTarget) for the unfused
//!   `CubeBackend<R, F, I, BT>`;
//! - `fusion.rs`: [`OffloadTarget`](crate::inner::OffloadTarget) for Burn's fused backends,
//!   `Fusion<CubeBackend<R, F, I, BT>>` (`burn::backend::Cuda`, `Wgpu`, `Rocm` as Burn
//!   defines them): copies enter the fused graph as Burn's own `from_data` does, in-place
//!   reads run as lazy custom ops;
//! - [`OffloadRuntime`]: what a runtime adds (CUDA: pinned, device-mapped memory and the
//!   kernels that read it in place). Rust has no specialisation, so the per-runtime parts sit
//!   behind this small trait, whose defaults are "copies only"; `wgpu.rs` and `rocm.rs` use
//!   them, `crate::cuda` overrides them.

mod backend;
mod bridge;
mod fusion;
pub mod ring;
#[cfg(feature = "rocm")]
mod rocm;
pub mod transfer;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use burn_backend::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::ComputeClient;

use std::sync::Arc;

use crate::copy::{CopyError, RingShape};
use crate::error::OffloadError;
use crate::host::{HostBuffer, HostTensor};
use ring::CubeRing;

pub(crate) use backend::calibrate;
#[cfg(feature = "cuda")]
pub(crate) use bridge::{drain_queue, flush_queue};
pub use transfer::TransferError;

// The `Err` of the in-place ops gives the operand back unchanged (a `CubeTensor` is large but
// moved, not copied), as `OffloadTarget`'s do.
#[allow(clippy::result_large_err)]
/// What a CubeCL runtime adds to the generic CubeCL target. The defaults are right for a
/// runtime whose device cannot read host memory (wgpu, HIP here): pageable host memory,
/// uploads by copy, no in-place kernels.
pub trait OffloadRuntime: CubeRuntime {
    /// A short name for messages and reports (`"cuda"`, `"wgpu"`, `"rocm"`).
    const NAME: &'static str;

    /// Whether uploads on one stream run beside the kernels of another (a copy engine of its
    /// own): what makes prefetching on a second thread overlap compute. wgpu has one queue
    /// for every stream.
    const COPIES_OVERLAP_COMPUTE: bool = false;

    /// CubeCL's client for `device`, or why there is none (CUDA checks the driver first:
    /// CubeCL's server panics when it starts without one).
    fn offload_client(device: &Self::Device) -> Result<ComputeClient<Self>, TransferError> {
        Ok(<Self as cubecl::Runtime>::client(device))
    }

    /// Exactly `bytes` of host memory the device can read; with `pin`, pinned and
    /// device-mapped where the runtime can. The default is pageable memory (`pin` cannot be
    /// honoured: no warning, since nothing would change it).
    fn alloc_host(
        device: &Self::Device,
        bytes: usize,
        pin: bool,
    ) -> Result<HostBuffer, OffloadError> {
        let _ = (device, pin);
        HostBuffer::pageable(bytes)
    }

    /// Records that `device` may read `buffer` from now on (freeing it then waits for that
    /// device's work). The default records nothing: pageable memory is copied from on the host
    /// side before the write returns.
    fn note_host_reader(buffer: &HostBuffer, device: &Self::Device) {
        let _ = (buffer, device);
    }

    /// After the calling thread's queues let go of upload sources: wait until no device work
    /// can still read `pool`'s buffers (see
    /// [`OffloadTarget::settle_host_reads`](crate::inner::OffloadTarget::settle_host_reads)).
    /// The default waits for the calling thread's stream.
    fn settle_reads(device: &Self::Device, pool: &[HostTensor]) {
        let _ = pool;
        if let Err(e) = transfer::sync::<Self>(device) {
            log::warn!(
                "{}: synchronising before an optimizer step: {e}",
                Self::NAME
            );
        }
    }

    /// The copy engine's streams on `device` for prefetching through the engine
    /// ([`OffloadTarget::ring_streams`](crate::inner::OffloadTarget::ring_streams)), made on the
    /// calling thread; `None` (the default) where the runtime has none.
    fn copy_streams(
        device: &Self::Device,
        shape: RingShape,
    ) -> Option<Result<Arc<dyn CubeRing<Self>>, CopyError>> {
        let _ = (device, shape);
        None
    }

    /// Whether the in-place kernels can read `host` on `device`.
    fn can_read_in_place(host: &HostTensor, device: &Self::Device) -> bool {
        let _ = (host, device);
        false
    }

    /// The most rows for which [`host_matmul`](Self::host_matmul) beats copy + GEMM.
    fn zero_copy_max_rows(device: &Self::Device) -> usize {
        let _ = device;
        0
    }

    /// Whether [`host_matmul`](Self::host_matmul) has a kernel for `lhs [shape] @ rhs`
    /// (asked before a fused backend registers the lazy op that will run it).
    fn host_matmul_supported(lhs_shape: &[usize], lhs_dtype: DType, rhs: &HostTensor) -> bool {
        let _ = (lhs_shape, lhs_dtype, rhs);
        false
    }

    /// `lhs @ rhs` reading `rhs` in place; `Err(lhs)` when there is no kernel for it.
    fn host_matmul(
        lhs: CubeTensor<Self>,
        rhs: &HostTensor,
    ) -> Result<CubeTensor<Self>, CubeTensor<Self>> {
        let _ = rhs;
        Err(lhs)
    }

    /// Whether [`host_embedding`](Self::host_embedding) has a kernel for this table and
    /// these index dtypes.
    fn host_embedding_supported(weights: &HostTensor, indices_dtype: DType) -> bool {
        let _ = (weights, indices_dtype);
        false
    }

    /// `embedding(weights, indices)` gathering only the used rows from host memory;
    /// `Err(indices)` when there is no kernel for it.
    fn host_embedding(
        weights: &HostTensor,
        indices: CubeTensor<Self>,
    ) -> Result<CubeTensor<Self>, CubeTensor<Self>> {
        let _ = weights;
        Err(indices)
    }
}
