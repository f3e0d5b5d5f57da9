//! GPU test fixtures (feature `cuda`): the device to test on, or a printed reason to skip.
//!
//! A GPU test skips with a printed reason when there is no CUDA driver or device, unless
//! `BURN_OFFLOAD_REQUIRE_GPU=1`, which turns the skip into a failure (for runs on GPU machines).
//! The skip message is written straight to the process's stderr, past the test harness's output
//! capture, so it shows without `--nocapture`.
//!
//! Where there is a GPU, each GPU test runs in a process of its own (`common::process`), and
//! the processes take turns on the device through a lock file.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

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

/// Why a GPU test runs in a process of its own.
const OWN_PROCESS: &str =
    "host_memory_stats and the pinned byte counters count every buffer in the process";

/// Held for the length of a GPU test: the lock that runs GPU tests one at a time, whichever
/// process they are in (they share one device: its memory, what it measures). When the test
/// passed, dropping it first lets CubeCL's drop queue of the test's thread release the upload
/// sources it still holds, so that no later test sees them freed under its feet.
pub struct GpuGuard {
    device: CudaDevice,
    _lock: File,
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

/// The lock file the GPU tests of every process take in turn (released when the file closes).
fn lock_the_gpu() -> File {
    let path = std::env::temp_dir().join("burn-offload-gpu-tests.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
    file
}

/// CUDA device 0 and the guard that serialises GPU tests, in the process of its own that the
/// test `test` of module `module` (its `module_path!()`) runs in. `None` when the test is done
/// here: after printing why, when there is no usable CUDA driver; in the parent of that
/// process, once the test has passed in it.
pub fn gpu(module: &str, test: &str) -> Option<(CudaDevice, GpuGuard)> {
    match cuda::probe() {
        Ok(_) => {
            if !super::process::runs_here(&format!("{module}::{test}"), OWN_PROCESS) {
                return None;
            }
            let device = CudaDevice::new(0);
            let guard = GpuGuard {
                device: device.clone(),
                _lock: lock_the_gpu(),
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
