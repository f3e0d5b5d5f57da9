//! The wrapped backends. [`OffloadTarget`] is what a wrapped backend provides so that
//! [`OffloadBackend`] can keep tensors in host memory, copy them to the device, and read them
//! in place.
//!
//! Implementations, side by side:
//! - [`ndarray`] (feature `ndarray`): the CPU reference;
//! - `cubecl` (feature `cubecl`, on with `cuda`, `wgpu` or `rocm`): one target generic over
//!   the CubeCL runtime, for the unfused `CubeBackend<R, …>` and for Burn's fused
//!   `Fusion<CubeBackend<R, …>>` (`burn::backend::Cuda`, `Wgpu`, `Rocm`);
//! - `cuda` (feature `cuda`): what CUDA adds to it (pinned, device-mapped memory and kernels
//!   that read it in place; also re-exported as `burn_offload::cuda`).
//!
//! [`OffloadBackend`]: crate::OffloadBackend

#[cfg(feature = "cubecl")]
pub mod cubecl;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "ndarray")]
pub mod ndarray;

use burn_backend::{
    Backend, DeviceOps,
    quantization::QuantScheme,
    read_sync,
    tensor::{FloatTensor, IntTensor, QuantizedTensor},
};

use std::sync::Arc;

use burn_backend::{DType, Shape};

use crate::auto::Calibration;
use crate::copy::{CopyError, CopyStreams, Region, RingShape};
use crate::error::OffloadError;
use crate::host::{HostBuffer, HostTensor};

/// The shapes of `lhs [.., M, K] @ rhs [1.., K, N]` where `rhs` is a host view whose batch
/// dims are all 1 (what `linear` produces): the zero-copy kernels only handle that case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMatmulShape {
    /// Output dims: lhs's batch dims (left-padded with 1s to the larger rank), M, N.
    pub out_dims: Vec<usize>,
    /// Rows of lhs: the product of all its dims but the last.
    pub m: usize,
    /// Inner dim.
    pub k: usize,
    /// Columns of rhs.
    pub n: usize,
}

impl HostMatmulShape {
    /// `None` when the shapes do not fit (rank < 2, an rhs batch dim > 1, mismatched K).
    pub fn new(lhs: &[usize], rhs: &HostTensor) -> Option<Self> {
        let rd = rhs.dims();
        if lhs.len() < 2 || rd.len() < 2 || rd[..rd.len() - 2].iter().any(|&d| d != 1) {
            return None;
        }
        let (k, n) = (rd[rd.len() - 2], rd[rd.len() - 1]);
        if lhs[lhs.len() - 1] != k {
            return None;
        }
        let rank = lhs.len().max(rd.len());
        let mut out_dims = vec![1; rank - lhs.len()];
        out_dims.extend_from_slice(&lhs[..lhs.len() - 1]);
        out_dims.push(n);
        let m = lhs[..lhs.len() - 1].iter().product();
        Some(Self { out_dims, m, k, n })
    }

    /// The rhs strides of the K and N dims, in elements.
    pub fn rhs_strides(rhs: &HostTensor) -> (isize, isize) {
        let s = rhs.strides();
        (s[s.len() - 2], s[s.len() - 1])
    }
}

/// Free and total memory of a compute device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceMemory {
    /// Bytes free now (as the driver sees it: a backend's pooled memory counts as used).
    pub free: u64,
    /// Bytes in all.
    pub total: u64,
}

/// The compute device of an offload target: what
/// [`OffloadPolicy::apply`](crate::OffloadPolicy::apply) asks of a device before placing
/// parameters (it knows the device type, not the wrapped backend).
pub trait TargetDevice: DeviceOps {
    /// Free and total device memory, where the device has memory of its own (`None` on the CPU,
    /// where "offloading" does not free anything).
    fn memory(&self) -> Option<DeviceMemory> {
        None
    }

    /// Whether this device's kernels can read host memory in place (the CPU; CUDA from pinned,
    /// device-mapped memory). Where they cannot (wgpu, ROCm here), `uva` copies each
    /// offloaded weight per use, as `copy` does, and the policy's report says so.
    fn reads_host_in_place(&self) -> bool {
        false
    }

    /// Measures what [`OffloadMode::Auto`](crate::OffloadMode::Auto) decides from, with host
    /// memory pinned if `pin` (see [`crate::auto`]).
    fn calibrate(&self, pin: bool) -> Result<Calibration, OffloadError>;

    /// What the rates [`calibrate`](Self::calibrate) measures depend on besides the device's
    /// type and id, the build profile and the pinning: the hardware and its driver (e.g. the
    /// CPU's model and threads, a GPU's name and driver version). A calibration cached on disk
    /// ([`crate::auto::cache`]) is used only while this stays the same, so it should change
    /// when the device or its driver does, and stay the same otherwise (no timestamps, no
    /// free memory). The default, empty, leaves the device's type and id as the only check.
    fn fingerprint(&self) -> String {
        String::new()
    }

    /// Why this device's own memory cannot hold quantized tensors of `scheme`, if it cannot
    /// (the same answer as its target's
    /// [`cannot_hold_quantized`](OffloadTarget::cannot_hold_quantized)): a policy that
    /// quantizes then refuses to leave such a tensor in device memory.
    fn cannot_hold_quantized(&self, scheme: &QuantScheme) -> Option<String> {
        let _ = scheme;
        None
    }

    /// Why this device's target cannot read a quantized tensor of `scheme` and `shape` even
    /// from host memory (the same answer as
    /// [`OffloadTarget::cannot_read_quantized`]), if it cannot: a policy refuses to quantize
    /// into it.
    fn cannot_read_quantized(&self, scheme: &QuantScheme, shape: &[usize]) -> Option<String> {
        let _ = shape;
        self.cannot_hold_quantized(scheme)
    }
}

/// `tensor` quantized by `B` into `scheme`, with `scales` (one per block) or, with `None`,
/// scales computed from its values (Burn's `quantize_dynamic`).
pub(crate) fn quantize_with<B: Backend>(
    tensor: FloatTensor<B>,
    scheme: &QuantScheme,
    scales: Option<FloatTensor<B>>,
) -> QuantizedTensor<B> {
    match scales {
        Some(scales) => B::quantize(
            tensor,
            scheme,
            burn_backend::quantization::QuantizationParametersPrimitive { scales },
        ),
        None => B::quantize_dynamic(tensor, scheme),
    }
}

/// A copy engine's [`CopyStreams`] that can also show a ring region to ops as a tensor of the
/// backend `B` (see [`OffloadTarget::ring_streams`]).
pub trait RingStreams<B: Backend>: CopyStreams {
    /// A contiguous tensor of `shape` and `dtype` over `region` of the ring, which must hold
    /// exactly its bytes (checked). Ops must not write into it: the ring's buffer is shared,
    /// so no in-place kernel takes it.
    fn tensor(
        &self,
        region: &Region,
        shape: Shape,
        dtype: DType,
    ) -> Result<FloatTensor<B>, CopyError>;
}

/// What a backend must provide to be wrapped by [`OffloadBackend`](crate::OffloadBackend).
///
/// Only [`alloc_host`](Self::alloc_host) has no default worth keeping on a GPU; the defaults
/// of the others are correct everywhere (a copy through [`TensorData`](burn_backend::TensorData))
/// and a target overrides them with faster paths: a DMA from pinned memory, or kernels that
/// read host memory in place.
pub trait OffloadTarget: Backend {
    /// A device copy made on the prefetch thread and handed to an op thread later
    /// ([`prefetch_upload`](Self::prefetch_upload), [`take_staged`](Self::take_staged)): the
    /// backend's own tensor where that can move between threads as it is; the inner
    /// backend's, not yet registered, for a fused backend (a tensor registered on the prefetch
    /// thread would belong to that thread's fusion stream).
    type Staged: Send + 'static;

    /// Allocates exactly `bytes` of host memory that `device` can read (never rounded up).
    ///
    /// With `pin`, the target should pin and device-map the memory where it can, and fall back
    /// to pageable memory with a logged warning where it cannot.
    fn alloc_host(
        device: &Self::Device,
        bytes: usize,
        pin: bool,
    ) -> Result<HostBuffer, OffloadError> {
        let _ = (device, pin);
        HostBuffer::pageable(bytes)
    }

    /// Moves a resident tensor into new host memory from [`alloc_host`](Self::alloc_host).
    fn download(tensor: FloatTensor<Self>, pin: bool) -> Result<HostTensor, OffloadError> {
        let device = Self::float_device(&tensor);
        let data =
            read_sync(Self::float_into_data(tensor)).map_err(|e| OffloadError::HostAlloc {
                bytes: 0,
                reason: format!("reading the tensor from the device failed: {e}"),
            })?;
        HostTensor::from_data(&data, |bytes| Self::alloc_host(&device, bytes, pin))
    }

    /// Writes a resident tensor's values into `dest`, an existing host buffer of exactly its
    /// size (an optimizer step's updated parameter into the buffer it had before: no new
    /// allocation, no re-pinning). The default reads the tensor's data (waiting for the work
    /// queued before it) and copies it in.
    fn download_into(tensor: FloatTensor<Self>, dest: &mut HostBuffer) -> Result<(), OffloadError> {
        let data =
            read_sync(Self::float_into_data(tensor)).map_err(|e| OffloadError::HostAlloc {
                bytes: dest.len(),
                reason: format!("reading the tensor from the device failed: {e}"),
            })?;
        let bytes = data.as_bytes();
        if bytes.len() != dest.len() {
            return Err(OffloadError::DataSize {
                shape: data.shape.to_vec(),
                dtype: data.dtype,
                expected: dest.len(),
                got: bytes.len(),
            });
        }
        dest.as_mut_slice().copy_from_slice(bytes);
        Ok(())
    }

    /// Called once before an optimizer step rewrites the host buffers `pool` that the step gave
    /// back, instead of freeing them ([`crate::recycle`]): let go of references to them that
    /// the target's queues still hold, and wait until no device work can still read them, as
    /// freeing them would. The default does nothing: right where ops finish their host reads
    /// before they return (the CPU target).
    fn settle_host_reads(device: &Self::Device, pool: &[HostTensor]) {
        let _ = (device, pool);
    }

    /// Records that `device` may read `host`'s buffer from now on (an offloaded tensor moved to
    /// `Host(device)`), so that freeing the buffer waits for `device`'s work as well as for the
    /// device it was allocated for ([`HostBuffer::note_reader`]). The default records nothing:
    /// right for targets whose host reads finish within the op (the CPU target).
    fn note_host_reader(host: &HostTensor, device: &Self::Device) {
        let _ = (host, device);
    }

    /// A transient device copy of a host view, for one op, of the view's
    /// [`read_dtype`](HostTensor::read_dtype): a quantized tensor read as float is dequantized
    /// on the device ([`upload_dequantized`](Self::upload_dequantized)). A target that
    /// overrides this must keep that case.
    fn upload(host: &HostTensor, device: &Self::Device) -> FloatTensor<Self> {
        if host.is_quantized() {
            return Self::upload_dequantized(host, device);
        }
        Self::float_from_data(host.to_data(), device)
    }

    /// Why this backend cannot hold `scheme` in its own memory (a resident quantized tensor),
    /// if it cannot. The default holds every scheme (CubeCL's backends).
    fn cannot_hold_quantized(scheme: &QuantScheme) -> Option<String> {
        let _ = scheme;
        None
    }

    /// Why this target cannot read a quantized host tensor of `scheme` and `shape` at all
    /// (neither copied and dequantized on the device, nor in place), if it cannot.
    fn cannot_read_quantized(scheme: &QuantScheme, shape: &[usize]) -> Option<String> {
        let _ = shape;
        Self::cannot_hold_quantized(scheme)
    }

    /// A quantized host tensor as this backend's quantized tensor: its packed bytes and scales
    /// copied to the device as they are (Burn's `q_from_data`). Only called for schemes the
    /// backend holds.
    fn upload_quantized(host: &HostTensor, device: &Self::Device) -> QuantizedTensor<Self> {
        Self::q_from_data(host.to_data(), device)
    }

    /// A quantized host tensor, read as its [`read_dtype`](HostTensor::read_dtype): the packed
    /// bytes and scales cross to the device, which dequantizes them with Burn's kernels (no
    /// float copy on the host).
    fn upload_dequantized(host: &HostTensor, device: &Self::Device) -> FloatTensor<Self> {
        let dtype = host.read_dtype();
        let dtype = if dtype.is_float() {
            dtype.into()
        } else {
            burn_backend::get_device_settings::<Self>(device).float_dtype
        };
        Self::dequantize(Self::upload_quantized(host, device), dtype)
    }

    /// Moves a resident quantized tensor into new host memory (its `q_into_data` bytes).
    fn download_quantized(
        tensor: QuantizedTensor<Self>,
        pin: bool,
    ) -> Result<HostTensor, OffloadError> {
        let device = Self::q_device(&tensor);
        let data = read_sync(Self::q_into_data(tensor)).map_err(|e| OffloadError::HostAlloc {
            bytes: 0,
            reason: format!("reading the quantized tensor from the device failed: {e}"),
        })?;
        HostTensor::from_data(&data, |bytes| Self::alloc_host(&device, bytes, pin))
    }

    /// Quantizes a resident float tensor into new host memory, with `scales` (one per block,
    /// as Burn's `QuantizationParameters`) or, with `None`, scales computed from its values
    /// (Burn's `quantize_dynamic`). The default quantizes on the device with Burn's kernels and
    /// downloads the packed result; a target that cannot hold `scheme` quantizes on the host.
    fn quantize_to_host(
        tensor: FloatTensor<Self>,
        scheme: &QuantScheme,
        scales: Option<FloatTensor<Self>>,
        pin: bool,
    ) -> Result<HostTensor, OffloadError> {
        Self::download_quantized(quantize_with::<Self>(tensor, scheme, scales), pin)
    }

    /// Lets go of the host memory that uploads made from the calling thread still hold (e.g.
    /// sources kept alive in a stream's queue until it is flushed). The prefetch thread calls
    /// it when it has nothing left to prefetch or learn (its model was dropped), so that a
    /// dropped model's host memory is not kept by copies it made; never while a model runs,
    /// so it may wait for the thread's queued copies.
    fn release_uploads(device: &Self::Device) {
        let _ = device;
    }

    /// Identifies the queue of device work that the calling thread's ops go to on `device`
    /// (CUDA: the thread's CubeCL stream), for [`prefetch_upload`](Self::prefetch_upload).
    /// `None` (the default) where every thread's work is ordered with every other's, e.g. the
    /// CPU target, which runs each op to completion.
    fn work_queue(device: &Self::Device) -> Option<u64> {
        let _ = device;
        None
    }

    /// The prefetch thread's [`upload`](Self::upload): a copy that ops on the queues
    /// `consumers` (from [`work_queue`](Self::work_queue)) will read. Its device memory may be
    /// memory that an earlier copy occupied and those queues still read, so a target with
    /// several queues must order the copy after all the work already queued on them. `None`:
    /// the copy could not be made (the prefetcher then forgets its learned order, and ops
    /// upload on demand).
    fn prefetch_upload(
        host: &HostTensor,
        device: &Self::Device,
        consumers: &[u64],
    ) -> Option<Self::Staged>;

    /// Turns a prefetched copy into this backend's tensor, on the op thread that takes it.
    fn take_staged(staged: Self::Staged) -> FloatTensor<Self>;

    /// The streams, ring and flags of a copy engine on `device` for prefetching through the
    /// engine ([`PrefetchCopies::Engine`](crate::PrefetchCopies::Engine)), made on the calling
    /// (op) thread; `None` (the default) where the target has none: prefetching then takes
    /// CubeCL's path (or the CPU's uploads).
    fn ring_streams(
        device: &Self::Device,
        shape: RingShape,
    ) -> Option<Result<Arc<dyn RingStreams<Self>>, CopyError>> {
        let _ = (device, shape);
        None
    }

    /// Hands the calling thread's queued lazy ops on `device` to the device queue now, so that
    /// work queued next on the thread's stream (a copy engine's release) is behind them. Returns
    /// once they are queued, without waiting for the device. The default does nothing: ops
    /// are queued as they are called (a fused backend overrides it).
    fn drain_ops(device: &Self::Device) {
        let _ = device;
    }

    /// Device memory that the calling thread's allocations on `device` hold now (CUDA: the
    /// bytes the memory pool of the thread's CubeCL stream has handed out, padding excluded),
    /// or `None` where the target cannot tell (the default). It may block until the thread's
    /// queued work has been submitted: for diagnostics and tests, e.g. the prefetch thread's
    /// [`set_prefetch_memory_probe`](crate::prefetch::set_prefetch_memory_probe).
    fn device_bytes_in_use(device: &Self::Device) -> Option<u64> {
        let _ = device;
        None
    }

    /// Whether this target's host-reading kernels can read `host` on `device` in place (e.g.
    /// on CUDA only pinned, device-mapped memory can be).
    fn can_read_in_place(host: &HostTensor, device: &Self::Device) -> bool {
        let _ = (host, device);
        false
    }

    /// The largest number of rows (the product of `lhs`'s dims but the last) for which
    /// [`host_matmul`](Self::host_matmul) beats a copy followed by the backend's GEMM.
    fn zero_copy_max_rows(device: &Self::Device) -> usize {
        let _ = device;
        0
    }

    /// `lhs @ rhs` reading `rhs` from host memory in place. Returns `lhs` back (`Err`) when the
    /// target has no kernel for these shapes or dtypes; the caller then copies `rhs`.
    fn host_matmul(
        lhs: FloatTensor<Self>,
        rhs: &HostTensor,
    ) -> Result<FloatTensor<Self>, FloatTensor<Self>> {
        let _ = rhs;
        Err(lhs)
    }

    /// `embedding(weights, indices)` gathering only the requested rows from host memory.
    /// Returns `indices` back (`Err`) when the target has no kernel for this case.
    fn host_embedding(
        weights: &HostTensor,
        indices: IntTensor<Self>,
    ) -> Result<FloatTensor<Self>, IntTensor<Self>> {
        let _ = weights;
        Err(indices)
    }
}
