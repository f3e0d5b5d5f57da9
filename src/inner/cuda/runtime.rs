//! What CUDA adds to the generic CubeCL target ([`OffloadRuntime`] for `CudaRuntime`), so that
//! `OffloadBackend<burn::backend::Cuda>` (fused) and `OffloadBackend<CudaBackend>` (unfused)
//! get it alike:
//!
//! - host memory: exact-size pinned, device-mapped allocations ([`alloc_pinned`]); when pinning
//!   is disabled or fails, pageable memory with a logged warning (UVA ops then take the copy
//!   path: nothing fails);
//! - zero-copy: `matmul_host.cu` (rows ≤ [`ops::MAX_ROWS`]) and `gather_host.cu` read pinned
//!   memory in place, queued on CubeCL's stream like Burn's own kernels (no host sync); for
//!   quantized weights read as float, `qmatmul_host.cu` and `qgather_host.cu` read the packed
//!   values and dequantize them as they read ([`quant_ops`]); a scheme they do not take is
//!   copied and dequantized by Burn;
//! - pinned memory is freed, and rewritten by an optimizer step, only once every device that
//!   may read it has finished its work ([`pinned`]).
//!
//! [`alloc_pinned`]: super::alloc_pinned

use std::sync::Arc;

use burn_backend::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::prelude::ComputeClient;

use super::ops::{self, matmul_plan};
use super::quant_ops::{self, can_read_quantized, qgather_supported, qmatmul_plan};
use super::{alloc_pinned, pinned};
use crate::auto::Calibration;
use crate::copy::{CopyError, RingShape};
use crate::error::OffloadError;
use crate::host::{HostBuffer, HostTensor};
use crate::inner::cubecl::ring::CubeRing;
use crate::inner::cubecl::{OffloadRuntime, TransferError, calibrate};
use crate::inner::{DeviceMemory, TargetDevice};

impl TargetDevice for CudaDevice {
    /// From pinned, device-mapped memory (`pin_memory`, the default).
    fn reads_host_in_place(&self) -> bool {
        true
    }

    fn memory(&self) -> Option<DeviceMemory> {
        super::memory_info(self.index)
            .map(|(free, total)| DeviceMemory { free, total })
            .map_err(|e| log::warn!("cuda:{}: cuMemGetInfo failed ({e})", self.index))
            .ok()
    }

    /// Measured with [`CudaBackend<f32>`](crate::CudaBackend) (rates are per byte, so they
    /// carry over to half-precision weights and to the fused backend, which runs the same
    /// kernels). Uploads are DMAs on the copy engine, which run beside the kernels of another
    /// stream, so `Auto` prefetches its copies.
    fn calibrate(&self, pin: bool) -> Result<Calibration, OffloadError> {
        super::driver::probe()?;
        // `calibrate` lets go of the upload sources in this thread's queue and waits for the
        // stream; the pinned buffers then go to the releaser thread: wait for their frees now,
        // as `measure` promises, rather than in the middle of later work.
        let calibration = calibrate::<CudaRuntime, u8>(self, pin)?;
        super::wait_pinned_releases();
        Ok(calibration)
    }

    /// The GPU's name, compute capability and PCI address, the driver's CUDA version and,
    /// where Linux shows it, the kernel driver's version line (`/proc/driver/nvidia/version`):
    /// another card at this index, or a driver update, measures again.
    fn fingerprint(&self) -> String {
        use super::driver::{attribute, compute_capability, device_name, probe};
        use cudarc::driver::sys::CUdevice_attribute as A;
        let describe = || -> Result<String, super::CudaError> {
            let driver = probe()?.driver_version;
            let name = device_name(self.index)?;
            let (major, minor) = compute_capability(self.index)?;
            let pci = [
                A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID,
                A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID,
                A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID,
            ]
            .map(|a| attribute(self.index, a));
            let pci = match pci {
                [Ok(domain), Ok(bus), Ok(dev)] => format!("{domain:04x}:{bus:02x}:{dev:02x}"),
                _ => "unknown".into(),
            };
            let kernel_driver = std::fs::read_to_string("/proc/driver/nvidia/version")
                .ok()
                .and_then(|v| v.lines().next().map(|l| format!(", {}", l.trim())))
                .unwrap_or_default();
            Ok(format!(
                "{name}, sm_{major}{minor}, PCI {pci}, CUDA driver {driver}{kernel_driver}"
            ))
        };
        describe().unwrap_or_else(|e| format!("cuda:{} unavailable ({e})", self.index))
    }
}

/// Whether `gather_host` (or, for a quantized table, `qgather_host`) can read this table:
/// contiguous rows that do not overlap (a flipped or broadcast table is copied instead), i32 or
/// i64 ids; a quantized table of a scheme the kernels take ([`quant_ops::quant_read`]).
fn gather_supported(weights: &HostTensor, indices_dtype: DType) -> bool {
    if weights.is_quantized() {
        return qgather_supported(weights, indices_dtype);
    }
    weights.dims().len() == 2
        && weights.strides()[1] == 1
        && weights.strides()[0] >= weights.dims()[1] as isize
        && matches!(indices_dtype, DType::I32 | DType::I64)
}

impl OffloadRuntime for CudaRuntime {
    const NAME: &'static str = "cuda";
    const COPIES_OVERLAP_COMPUTE: bool = true;

    /// [`CudaCopyStreams`](super::copy_streams::CudaCopyStreams): DMAs on a stream of the engine's own
    /// (batched where the driver can), flags in device memory.
    fn copy_streams(
        device: &CudaDevice,
        shape: RingShape,
    ) -> Option<Result<Arc<dyn CubeRing<Self>>, CopyError>> {
        Some(
            super::copy_streams::CudaCopyStreams::new(
                device,
                shape.capacity,
                shape.slots,
                shape.consumers,
                true,
            )
            .map(|s| Arc::new(s) as Arc<dyn CubeRing<Self>>)
            .map_err(|e| CopyError::Device {
                reason: e.to_string(),
            }),
        )
    }

    fn offload_client(device: &CudaDevice) -> Result<ComputeClient<CudaRuntime>, TransferError> {
        super::driver::cubecl_client(device).map_err(|e| TransferError::Unavailable {
            reason: e.to_string(),
        })
    }

    fn alloc_host(
        device: &CudaDevice,
        bytes: usize,
        pin: bool,
    ) -> Result<HostBuffer, OffloadError> {
        if pin {
            match alloc_pinned(device.index, bytes) {
                Ok(buffer) => return Ok(buffer),
                Err(e) => log::warn!(
                    "could not pin {bytes} bytes of host memory for cuda:{} ({e}); using pageable \
                     memory: ops on it take the copy path",
                    device.index
                ),
            }
        }
        HostBuffer::pageable(bytes)
    }

    fn note_host_reader(buffer: &HostBuffer, device: &CudaDevice) {
        buffer.note_reader(device.index);
    }

    /// The waits a free would make (CubeCL's queue drained and the context synchronised, for
    /// this device and every recorded reader), for the pinned buffers of `pool`.
    fn settle_reads(device: &CudaDevice, pool: &[HostTensor]) {
        let pinned: Vec<&HostBuffer> = pool
            .iter()
            .map(|h| h.buffer().as_ref())
            .filter(|b| pinned::device_ptr(b).is_some())
            .collect();
        if !pinned.is_empty() && !pinned::settle_reads(device.index, &pinned) {
            log::error!(
                "cuda:{}: a device that read offloaded parameters could not be synchronised; \
                 the optimizer step writes them anyway",
                device.index
            );
        }
    }

    /// Pinned memory of a float dtype the kernels take, or of a quantized scheme they take,
    /// read as such a float dtype.
    fn can_read_in_place(host: &HostTensor, _device: &CudaDevice) -> bool {
        if host.is_quantized() {
            return can_read_quantized(host);
        }
        matches!(host.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && pinned::device_ptr(host.buffer()).is_some()
    }

    fn zero_copy_max_rows(_device: &CudaDevice) -> usize {
        ops::MAX_ROWS
    }

    fn host_matmul_supported(lhs_shape: &[usize], lhs_dtype: DType, rhs: &HostTensor) -> bool {
        if rhs.is_quantized() {
            return qmatmul_plan(lhs_shape, lhs_dtype, rhs).is_some();
        }
        matmul_plan(lhs_shape, lhs_dtype, rhs).is_some()
    }

    fn host_matmul(
        lhs: CubeTensor<CudaRuntime>,
        rhs: &HostTensor,
    ) -> Result<CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>> {
        if rhs.is_quantized() {
            let Some(plan) = qmatmul_plan(&lhs.meta.shape().to_vec(), lhs.dtype, rhs) else {
                return Err(lhs);
            };
            return Ok(quant_ops::qmatmul_host(lhs, rhs, plan)
                .unwrap_or_else(|e| panic!("in-place quantized matmul: {e}")));
        }
        let Some(plan) = matmul_plan(&lhs.meta.shape().to_vec(), lhs.dtype, rhs) else {
            return Err(lhs);
        };
        // With a plan only a failure of the driver itself is left (the kernel's own errors
        // surface when the stream next synchronises, like any failed launch).
        Ok(ops::matmul_host(lhs, rhs, plan).unwrap_or_else(|e| panic!("zero-copy matmul: {e}")))
    }

    fn host_embedding_supported(weights: &HostTensor, indices_dtype: DType) -> bool {
        gather_supported(weights, indices_dtype)
    }

    fn host_embedding(
        weights: &HostTensor,
        indices: CubeTensor<CudaRuntime>,
    ) -> Result<CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>> {
        if !gather_supported(weights, indices.dtype) {
            return Err(indices);
        }
        if weights.is_quantized() {
            return Ok(quant_ops::qgather_host(weights, indices)
                .unwrap_or_else(|e| panic!("in-place quantized embedding: {e}")));
        }
        Ok(ops::gather_host(weights, indices)
            .unwrap_or_else(|e| panic!("zero-copy embedding: {e}")))
    }
}
