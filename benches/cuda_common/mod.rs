//! What the CUDA benches share: timing from an idle stream to a stream sync, medians, the
//! card's transfer limits, and freeing pinned memory between sections.
// Each bench uses a different subset.
#![allow(dead_code)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use burn_offload::cuda::{self, CudaError};
use cubecl::cuda::CudaDevice;

pub const MIB: usize = 1 << 20;
/// Untimed runs before the samples (they also let CubeCL autotune its kernels).
pub const WARMUP: usize = 2;

/// A positive integer from the environment, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
        .max(1)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// 10^9 bytes per second.
pub fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Seconds of one run of `f`, from an idle stream to the end of a stream sync.
pub fn timed(cuda: &CudaDevice, f: &mut dyn FnMut()) -> Result<f64, CudaError> {
    timed_queued(cuda, f).map(|(_, total)| total)
}

/// [`timed`], and the seconds until `f` returned, i.e. until the calling thread had handed its
/// work to CubeCL's device thread (whose queue takes tasks in batches of 32, double-buffered:
/// a caller waits only while both batches are full). `(queued, total)`: `queued` close to
/// `total` means the host side (the calling thread or CubeCL's device thread) set the pace,
/// not the device.
pub fn timed_queued(cuda: &CudaDevice, f: &mut dyn FnMut()) -> Result<(f64, f64), CudaError> {
    cuda::sync(cuda)?;
    let start = Instant::now();
    f();
    let queued = start.elapsed().as_secs_f64();
    cuda::sync(cuda)?;
    Ok((queued, start.elapsed().as_secs_f64()))
}

/// The median seconds ([`timed`]) of `samples` runs of `f` after `warmup` untimed ones; the
/// first error `f` returned, if any.
pub fn median_timed(
    cuda: &CudaDevice,
    warmup: usize,
    samples: usize,
    f: &mut dyn FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    let mut failed = None;
    let mut run = || {
        if let Err(e) = f()
            && failed.is_none()
        {
            failed = Some(e);
        }
    };
    for _ in 0..warmup {
        timed(cuda, &mut run)?;
    }
    let times = (0..samples)
        .map(|_| timed(cuda, &mut run))
        .collect::<Result<Vec<_>, _>>()?;
    match failed {
        Some(e) => Err(e),
        None => Ok(median(times)),
    }
}

/// GB/s of a pinned host→device DMA (`cuda::upload_dma`, the copy engine) and of a kernel
/// reading host-mapped memory (`cuda::upload_sm_copy`, what the zero-copy kernels do): 256 MiB,
/// medians of at least 5 samples after `WARMUP` runs.
pub fn limits(cuda: &CudaDevice, samples: usize) -> Result<[f64; 2], CudaError> {
    let len = 256 * MIB;
    let mut host = cuda::alloc_pinned(cuda.index, len)?;
    for (i, chunk) in host.as_mut_slice().chunks_mut(4096).enumerate() {
        chunk.fill(i as u8);
    }
    let host = Arc::new(host);
    let samples = samples.max(5);
    let dma = median_timed(cuda, WARMUP, samples, &mut || {
        black_box(cuda::upload_dma(cuda, &host, 0..len)?);
        Ok(())
    })?;
    let sm = median_timed(cuda, WARMUP, samples, &mut || {
        black_box(cuda::upload_sm_copy(cuda, &host, 0..len)?);
        Ok(())
    })?;
    drop(host);
    cuda::free_upload_sources(cuda)?;
    Ok([gbps(len, dma), gbps(len, sm)])
}
