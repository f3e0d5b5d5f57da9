//! GPU test fixtures (feature `cuda`): the device to test on, or a printed reason to skip.
//!
//! A GPU test skips with a printed reason when there is no CUDA driver or device, unless
//! `BURN_OFFLOAD_REQUIRE_GPU=1`, which turns the skip into a failure (for runs on GPU machines).
//! The skip message is written straight to the process's stderr, past the test harness's output
//! capture, so it shows without `--nocapture`.

use std::io::Write;
use std::sync::{Arc, MutexGuard};

use burn_offload::{HostBuffer, HostMemoryKind, cuda};
use cubecl::cuda::CudaDevice;

/// A byte pattern that differs at every offset modulo 251 (so shifted copies are caught).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Pinned, device-mapped host memory holding `data`.
pub fn pinned_with(device: &CudaDevice, data: &[u8]) -> Arc<HostBuffer> {
    let mut buffer = cuda::alloc_pinned(device.index, data.len()).expect("pinned allocation");
    assert!(matches!(buffer.kind(), HostMemoryKind::Pinned { .. }));
    buffer.as_mut_slice().copy_from_slice(data);
    Arc::new(buffer)
}

/// Held for the length of a GPU test: the lock that serialises the GPU tests of a file (they
/// share one device, its offload mode and the process-wide pinned byte counters). When the
/// test passed, dropping it first lets CubeCL's drop queue of the test's thread release the
/// upload sources it still holds, so that no later test sees them freed under its feet.
pub struct GpuGuard {
    device: CudaDevice,
    _lock: MutexGuard<'static, ()>,
}

impl Drop for GpuGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = cuda::sync(&self.device);
            let _ = cuda::release_upload_sources(&self.device);
            let _ = cuda::sync(&self.device);
        }
    }
}

/// CUDA device 0 and the guard that serialises GPU tests; `None` (after printing why) when
/// there is no usable CUDA driver.
pub fn gpu(test: &str) -> Option<(CudaDevice, GpuGuard)> {
    match cuda::probe() {
        Ok(_) => {
            let device = CudaDevice::new(0);
            let guard = GpuGuard {
                device: device.clone(),
                _lock: super::lock(),
            };
            Some((device, guard))
        }
        Err(e) => {
            if std::env::var("BURN_OFFLOAD_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: BURN_OFFLOAD_REQUIRE_GPU=1 but the GPU is unusable: {e}");
            }
            let _ = writeln!(std::io::stderr(), "skipping {test}: {e}");
            None
        }
    }
}
