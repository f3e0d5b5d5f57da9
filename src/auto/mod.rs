//! [`OffloadMode::Auto`](crate::OffloadMode::Auto): a per-op choice between reading in place
//! (zero-copy), a transient copy and a prefetched copy, from what was measured on the device.
//!
//! [`OffloadPolicy::apply`](crate::OffloadPolicy::apply) in `Auto` mode looks for each compute
//! device's calibration in this process's per-device cache here, then on disk ([`cache`]: one
//! file per device in the user's cache directory, kept across processes), and measures the
//! device only where neither has one ([`TargetDevice::calibrate`](crate::inner::TargetDevice),
//! which calls [`measure`]; the result goes to both caches). It hands the calibration to the
//! model's [`OffloadContext`](crate::OffloadContext). So a machine measures each device once
//! per build profile, until the device, its driver or this crate changes
//! ([`TargetDevice::fingerprint`](crate::inner::TargetDevice::fingerprint)). A [`Calibration`]
//! holds:
//! - the fixed cost of one transient upload (a tiny tensor) and the upload bandwidth (a 16 MiB
//!   weight; 1 MiB in a debug build): on CUDA the DMA from pinned memory, on the CPU a memcpy;
//! - for each row count `m` the zero-copy kernel accepts (1, 2, 4, … up to
//!   [`zero_copy_max_rows`](crate::inner::OffloadTarget::zero_copy_max_rows)): the bytes per
//!   second of `[m, K] @ W` reading `W` in place, and of the backend's own GEMM on a resident
//!   `W` (what a copy is followed by);
//! - whether the target's copies overlap the op thread's compute (a copy engine).
//!
//! For `lhs [m, K] @ W` with `W` offloaded (`bytes` bytes), `Auto` predicts
//!
//! ```text
//! zero-copy: bytes / zero_copy_rate(m)
//! copy:      upload_latency + bytes / upload_rate + bytes / gemm_rate(m)
//! ```
//!
//! where a rate at `m` is the one measured at the smallest measured row count `>= m` (more rows
//! are never faster), and reads in place when the first is not larger. Small weights tip
//! towards zero-copy (the upload's fixed cost dominates), many rows towards the copy. Ops
//! without a host-reading kernel always copy. When the target's copies overlap compute, the
//! copies of `Auto` go through the [prefetcher](crate::prefetch), so a repeating order of
//! copies (a prefill, say) is uploaded ahead while the previous op runs. Its lookahead is the
//! default ([`DEFAULT_PREFETCH_LOOKAHEAD_BYTES`](crate::mode::DEFAULT_PREFETCH_LOOKAHEAD_BYTES))
//! or twice the largest tensor `apply` offloaded, whichever is larger: the prefetcher never
//! prefetches a tensor larger than its lookahead, and a large model's biggest weights (344 MiB
//! each for the example's `50b` preset in bf16) are the ones worth overlapping.
//!
//! The decision itself is [`crate::plan`]'s. Without a calibration (tensors in host memory
//! that no policy placed, or a calibration that failed), `Auto` reads in place up to the
//! target's static row threshold, as `Uva` does, and never prefetches. [`set_calibration`]
//! installs a calibration measured earlier (it is `serde`-serialisable) for the policies applied
//! after it, [`clear_calibration`] removes one from the process's cache and
//! [`clear_calibration_cache`] a device's entries from the disk.

pub mod cache;

pub use cache::{
    ENV_CACHE_DIR, ENV_DISABLE_CALIBRATION_CACHE, calibration_cache_dir, calibration_cache_file,
    clear_calibration_cache,
};

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Instant;

use burn_backend::{DType, DeviceId, DeviceOps, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::OffloadError;
use crate::host::HostTensor;
use crate::inner::OffloadTarget;

/// Rows × columns of the `f32` weight the calibration measures with: 16 MiB (more than a
/// CPU's caches hold) in a release build. In a debug build 1 MiB: there the CPU target's
/// unoptimised kernels are bound by their own instructions, not by memory, so a larger weight
/// measures the same rates, only slower (16 MiB took 3.6 to 6.5 s on a 2-core VM, 1 MiB 0.2 s).
const WEIGHT_DIMS: [usize; 2] = if cfg!(debug_assertions) {
    [256, 1024]
} else {
    [1024, 4096]
};
/// Elements of the tiny tensor whose upload time is taken as the fixed cost of an upload.
const TINY_ELEMENTS: usize = 256;
/// Most timed runs per measurement (the median is kept), after one untimed run.
const REPS: usize = 5;
/// A measurement takes no further timed run once its runs add up to this many seconds (it
/// always takes one): long runs vary less, and need fewer. Above what a release build's
/// runs take on a CPU (up to 15 ms each with the 16 MiB weight), so they all get [`REPS`].
const SAMPLE_BUDGET_S: f64 = 0.1;
/// No further row count is measured once the calibration has taken this many seconds (the
/// row counts left out are copied, as those past the kernel's limit are). A safeguard for
/// slow or loaded machines: a release build took 0.3 to 0.4 s on a 2-core VM, a debug build
/// (with its smaller weight) 0.2 s.
const TOTAL_BUDGET_S: f64 = if cfg!(debug_assertions) { 0.5 } else { 2.0 };

/// Rates measured at one row count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RowRate {
    /// Rows of `lhs` (the product of its dims but the last).
    pub rows: usize,
    /// Weight bytes per second of the zero-copy matmul reading the weight in place.
    pub zero_copy_bytes_per_s: f64,
    /// Weight bytes per second of the backend's matmul on a resident copy of the weight.
    pub device_matmul_bytes_per_s: f64,
}

/// What [`OffloadMode::Auto`](crate::OffloadMode::Auto) decides from, measured per compute
/// device (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Seconds of one upload of a tiny tensor: the fixed cost of a transient copy.
    pub upload_latency_s: f64,
    /// Bytes per second of a large upload.
    pub upload_bytes_per_s: f64,
    /// Zero-copy and device-matmul rates by row count, ascending. Empty when the device cannot
    /// read the calibration weight in place (then `Auto` always copies).
    pub rows: Vec<RowRate>,
    /// Whether the target's copies overlap compute (so that `Auto` prefetches its copies).
    pub copies_overlap_compute: bool,
    /// Bytes of the weight the rates were measured with.
    pub weight_bytes: u64,
    /// Seconds the measurement took.
    pub seconds: f64,
}

impl Calibration {
    /// The rates that apply to `rows` rows: those of the smallest measured row count `>=
    /// rows`; `None` when `rows` is more than any measured (no zero-copy kernel for it).
    fn rate(&self, rows: usize) -> Option<&RowRate> {
        self.rows.iter().find(|r| r.rows >= rows)
    }

    /// Predicted seconds of a zero-copy matmul with a `bytes`-byte weight and `rows` rows.
    pub fn zero_copy_seconds(&self, rows: usize, bytes: u64) -> Option<f64> {
        self.rate(rows)
            .map(|r| bytes as f64 / r.zero_copy_bytes_per_s)
    }

    /// Predicted seconds of a transient copy of a `bytes`-byte weight followed by the
    /// backend's matmul with `rows` rows (`None` where the matmul rate was not measured).
    pub fn copy_seconds(&self, rows: usize, bytes: u64) -> Option<f64> {
        self.rate(rows).map(|r| {
            self.upload_latency_s
                + bytes as f64 / self.upload_bytes_per_s
                + bytes as f64 / r.device_matmul_bytes_per_s
        })
    }

    /// Whether `[rows, K] @ W` with a `bytes`-byte offloaded `W` should read `W` in place.
    pub fn prefers_zero_copy(&self, rows: usize, bytes: u64) -> bool {
        match (
            self.zero_copy_seconds(rows, bytes),
            self.copy_seconds(rows, bytes),
        ) {
            (Some(zero_copy), Some(copy)) => zero_copy <= copy,
            _ => false,
        }
    }

    /// The most rows (among those measured) for which a `bytes`-byte weight is read in place;
    /// 0 when never.
    pub fn zero_copy_max_rows(&self, bytes: u64) -> usize {
        self.rows
            .iter()
            .filter(|r| self.prefers_zero_copy(r.rows, bytes))
            .map(|r| r.rows)
            .max()
            .unwrap_or(0)
    }
}

impl std::fmt::Display for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "upload {:.2} GB/s + {:.0} us each",
            self.upload_bytes_per_s / 1e9,
            self.upload_latency_s * 1e6
        )?;
        if self.rows.is_empty() {
            write!(f, "; no in-place reads")?;
        } else {
            write!(f, "; in-place matmul GB/s by rows:")?;
            for r in &self.rows {
                write!(f, " {}: {:.2}", r.rows, r.zero_copy_bytes_per_s / 1e9)?;
            }
            write!(
                f,
                "; reads in place up to {} rows (1 MiB weight), {} rows (64 MiB weight)",
                self.zero_copy_max_rows(1 << 20),
                self.zero_copy_max_rows(64 << 20)
            )?;
        }
        if self.copies_overlap_compute {
            write!(f, "; copies are prefetched")?;
        }
        write!(f, " (measured in {:.2} s)", self.seconds)
    }
}

/// The measured calibration of each compute device. Process-wide because it describes the
/// hardware (the bus and the device), which every model on the device shares; each model's
/// context keeps the one its policy found.
static CALIBRATIONS: LazyLock<RwLock<HashMap<DeviceId, Arc<Calibration>>>> =
    LazyLock::new(Default::default);

/// The calibration of compute device `device` in this process's cache, if it was measured (or
/// installed with [`set_calibration`]).
pub fn calibration<D: DeviceOps>(device: &D) -> Option<Arc<Calibration>> {
    CALIBRATIONS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&device.to_id())
        .cloned()
}

/// Installs `calibration` in the cache for compute device `device` (replacing any): policies
/// applied from now on in `Auto` mode use it instead of measuring. Models already placed keep
/// the calibration their policy found.
pub fn set_calibration<D: DeviceOps>(device: &D, calibration: Calibration) {
    CALIBRATIONS
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(device.to_id(), Arc::new(calibration));
}

/// Removes `device`'s calibration from the process's cache: the next policy applied in `Auto`
/// mode takes it from the disk cache, or measures it again where there is none there
/// ([`clear_calibration_cache`] removes that one).
pub fn clear_calibration<D: DeviceOps>(device: &D) {
    CALIBRATIONS
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&device.to_id());
}

/// A contiguous `f32` host tensor of `dims` in memory from the target's allocator, filled with
/// small deterministic values.
fn host_f32<B: OffloadTarget>(
    device: &B::Device,
    dims: [usize; 2],
    pin: bool,
) -> Result<HostTensor, OffloadError> {
    let n = dims[0] * dims[1];
    let mut buffer = B::alloc_host(device, n * 4, pin)?;
    let values: &mut [f32] = bytemuck::cast_slice_mut(buffer.as_mut_slice());
    for (i, v) in values.iter_mut().enumerate() {
        *v = (i % 17) as f32 / 64.0 - 0.125;
    }
    HostTensor::new(buffer, dims.to_vec(), DType::F32)
}

/// Measures the [`Calibration`] of target `B` on `device` (host memory pinned if `pin`).
///
/// Uses the target's primitives directly (no [`OffloadBackend`](crate::OffloadBackend) op), so
/// op statistics are untouched; its host memory (16 MiB; 1 MiB in a debug build) is freed
/// before it returns. Takes 0.3 to 0.4 s on a 2-core CPU in a release build and 0.2 s in a
/// debug build, less on a GPU (plus the backend's first-use autotuning); past 2 s (0.5 s in a
/// debug build) it measures no further row count. Callers keep the result: see [`cache`].
/// `copies_overlap_compute` is the caller's: a property of the target, not a measurement.
pub fn measure<B: OffloadTarget>(
    device: &B::Device,
    pin: bool,
    copies_overlap_compute: bool,
) -> Result<Calibration, OffloadError> {
    let started = Instant::now();
    let sync_failed = |e: burn_backend::ExecutionError| OffloadError::Calibration {
        reason: format!("synchronising the device failed: {e}"),
    };
    // One untimed run, then timed ones until there are `REPS` or they add up to the budget;
    // the median (the lower one of an even count) is kept.
    let time = |f: &mut dyn FnMut()| -> Result<f64, OffloadError> {
        let mut samples = Vec::with_capacity(REPS);
        let mut timed = 0.0;
        for rep in 0..=REPS {
            B::sync(device).map_err(sync_failed)?;
            let start = Instant::now();
            f();
            B::sync(device).map_err(sync_failed)?;
            if rep > 0 {
                let seconds = start.elapsed().as_secs_f64();
                samples.push(seconds);
                timed += seconds;
                if timed >= SAMPLE_BUDGET_S {
                    break;
                }
            }
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[(samples.len() - 1) / 2].max(1e-9))
    };

    let weight = host_f32::<B>(device, WEIGHT_DIMS, pin)?;
    let tiny = host_f32::<B>(device, [1, TINY_ELEMENTS], pin)?;
    let bytes = weight.size_bytes() as f64;
    let latency = time(&mut || drop(B::upload(&tiny, device)))?;
    let upload = time(&mut || drop(B::upload(&weight, device)))?;
    // The fixed cost is paid once per upload; what is left is the transfer.
    let transfer = if upload > 2.0 * latency {
        upload - latency
    } else {
        upload
    };
    let upload_bytes_per_s = bytes / transfer;

    let mut rows = Vec::new();
    if B::can_read_in_place(&weight, device) {
        let resident = B::upload(&weight, device);
        let k = WEIGHT_DIMS[0];
        let max_rows = B::zero_copy_max_rows(device);
        let mut m = 1;
        while m <= max_rows {
            if !rows.is_empty() && started.elapsed().as_secs_f64() > TOTAL_BUDGET_S {
                log::debug!(
                    "calibration: {m} rows and more not measured (past {TOTAL_BUDGET_S} s); \
                     they copy"
                );
                break;
            }
            let lhs = B::float_from_data(TensorData::new(vec![0.01f32; m * k], [m, k]), device);
            let mut supported = true;
            let zero_copy = time(&mut || match B::host_matmul(lhs.clone(), &weight) {
                Ok(out) => drop(out),
                Err(_) => supported = false,
            })?;
            if !supported {
                break;
            }
            let matmul = time(&mut || drop(B::float_matmul(lhs.clone(), resident.clone())))?;
            rows.push(RowRate {
                rows: m,
                zero_copy_bytes_per_s: bytes / zero_copy,
                device_matmul_bytes_per_s: bytes / matmul,
            });
            // Far past the crossover: more rows only take longer.
            if zero_copy > 2.0 * (latency + transfer + matmul) {
                break;
            }
            m *= 2;
        }
    }
    Ok(Calibration {
        upload_latency_s: latency,
        upload_bytes_per_s,
        rows,
        copies_overlap_compute,
        weight_bytes: bytes as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upload 10 GB/s + 10 us; in place 20 GB/s at 1 row, halving per doubling of rows;
    /// device matmul 100 GB/s.
    fn sample() -> Calibration {
        Calibration {
            upload_latency_s: 10e-6,
            upload_bytes_per_s: 10e9,
            rows: (0..5)
                .map(|i| RowRate {
                    rows: 1 << i,
                    zero_copy_bytes_per_s: 20e9 / (1 << i) as f64,
                    device_matmul_bytes_per_s: 100e9,
                })
                .collect(),
            copies_overlap_compute: false,
            weight_bytes: 16 << 20,
            seconds: 0.0,
        }
    }

    #[test]
    fn decisions_follow_rows_and_weight_size() {
        let c = sample();
        let big = 64 << 20;
        // Copy of a big weight: ~0.12 ns/B; in place: 0.05 ns/B at 1 row, 0.1 at 2, 0.2 at 4.
        assert!(c.prefers_zero_copy(1, big));
        assert!(c.prefers_zero_copy(2, big));
        assert!(!c.prefers_zero_copy(4, big));
        assert_eq!(c.zero_copy_max_rows(big), 2);
        // 3 rows take the rate measured at 4.
        assert!(!c.prefers_zero_copy(3, big));
        // Small weights: the upload's 10 us weigh more, so more rows are read in place.
        assert_eq!(c.zero_copy_max_rows(64 << 10), 4);
        assert_eq!(c.zero_copy_max_rows(8 << 10), 16);
        // Beyond the measured rows there is no kernel.
        assert!(!c.prefers_zero_copy(17, 1));
        assert_eq!(c.zero_copy_seconds(17, 1), None);
    }

    #[test]
    fn calibrations_are_cached_per_device_and_can_be_replaced() {
        let a = DeviceId::new(0x3FF0, 7);
        let b = DeviceId::new(0x3FF0, 8);
        #[derive(Clone, Debug, PartialEq)]
        struct Dev(DeviceId);
        impl Default for Dev {
            fn default() -> Self {
                Dev(DeviceId::new(0x3FF0, 0))
            }
        }
        impl burn_backend::Device for Dev {
            fn from_id(id: DeviceId) -> Self {
                Dev(id)
            }
            fn to_id(&self) -> DeviceId {
                self.0
            }
        }
        impl DeviceOps for Dev {}

        let (da, db) = (Dev(a), Dev(b));
        let c = sample();
        set_calibration(&da, c.clone());
        assert_eq!(calibration(&da).as_deref(), Some(&c));
        assert!(calibration(&db).is_none());
        let mut other = sample();
        other.upload_bytes_per_s = 1.0;
        set_calibration(&da, other.clone());
        assert_eq!(calibration(&da).as_deref(), Some(&other));
        clear_calibration(&da);
        assert!(calibration(&da).is_none());
    }
}
