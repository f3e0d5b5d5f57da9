//! `Auto` mode: `apply` measures the device once, ops choose zero-copy or a copy from that
//! measurement (rows and weight size), copies are prefetched where the calibration says
//! copies overlap compute, and results never change.
//!
//! The calibration cache is process-wide per device (the hardware's): the tests that clear or
//! set it run in a process of their own (`own_process!`).

use crate::common;

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::module::linear;
use std::sync::Arc;

use burn_offload::auto::{Calibration, RowRate, calibration, clear_calibration, set_calibration};
use burn_offload::{
    OffloadContext, OffloadDevice, OffloadMode, OffloadPolicy, op_stats, reset_op_stats,
};
use common::{B, CPU, device};

/// Why the tests that start with `own_process!` need a process of their own.
const OWN_PROCESS: &str =
    "the calibration cache is the process's: these tests clear and set the CPU's";

fn host() -> OffloadDevice<burn::backend::ndarray::NdArrayDevice> {
    OffloadDevice::host(CPU)
}

/// A context in `mode` that decides from `calibration` on the CPU (as a policy's would).
fn context(mode: OffloadMode, calibration: Option<Calibration>) -> OffloadContext {
    let context = OffloadContext::with_mode(mode);
    if let Some(c) = calibration {
        context.set_calibration(&CPU, Arc::new(c));
    }
    context
}

/// Upload 10 GB/s + 1 ms each; in place 20 GB/s at 1 row, halving with each doubling of the
/// rows (measured up to 16); device matmul 100 GB/s. For a 4 MiB weight the copy costs about
/// 1.46 ms and reading in place 0.21 ms × rows, so 1..=4 rows read in place and 8 copy; for a
/// 4 KiB weight the 1 ms fixed cost wins at every measured row count.
fn synthetic(copies_overlap_compute: bool) -> Calibration {
    Calibration {
        upload_latency_s: 1e-3,
        upload_bytes_per_s: 10e9,
        rows: (0..5)
            .map(|i| RowRate {
                rows: 1 << i,
                zero_copy_bytes_per_s: 20e9 / f64::from(1 << i),
                device_matmul_bytes_per_s: 100e9,
            })
            .collect(),
        copies_overlap_compute,
        weight_bytes: 16 << 20,
        seconds: 0.0,
    }
}

fn values(shape: [usize; 2], seed: usize) -> TensorData {
    let n = shape[0] * shape[1];
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 31 + seed * 7) % 19) as f32 - 9.0) / 16.0)
        .collect();
    TensorData::new(v, shape)
}

/// `x [rows, k] @ w [k, n]` with `w` offloaded: (whether it read in place, max |diff| to the
/// resident result).
fn run(rows: usize, k: usize, n: usize) -> (bool, f32) {
    let w_data = values([k, n], 1);
    let x_data = values([rows, k], 2);
    let w = Tensor::<B, 2>::from_data(w_data.clone(), &host());
    let x = Tensor::<B, 2>::from_data(x_data.clone(), &device());
    let resident = Tensor::<B, 2>::from_data(w_data, &device());
    reset_op_stats();
    let out = linear(x.clone(), w, None);
    let in_place = op_stats().zero_copy_ops == 1;
    let expected = linear(x, resident, None);
    let diff = (out - expected).abs().max().into_scalar();
    (in_place, diff)
}

#[test]
fn apply_measures_the_device_once_in_auto_mode() {
    common::own_process!(OWN_PROCESS);
    clear_calibration(&CPU);
    let model: Linear<B> = LinearConfig::new(64, 64).init(&device());
    let (model, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Uva)
        .apply(model)
        .unwrap();
    assert_eq!(report.calibration, None, "only auto mode measures");
    assert!(calibration(&CPU).is_none());

    let (model, report) = OffloadPolicy::from_bytes(u64::MAX).apply(model).unwrap();
    assert_eq!(report.mode, OffloadMode::Auto);
    let measured = report.calibration.clone().expect("auto mode measures");
    assert!(measured.upload_bytes_per_s > 0.0 && measured.upload_latency_s > 0.0);
    // The CPU target reads f32 in place: rows 1, 2, 4, ... within its kernel's limit.
    assert_eq!(measured.rows[0].rows, 1);
    assert!(measured.rows.windows(2).all(|w| w[1].rows == 2 * w[0].rows));
    assert!(measured.rows.iter().all(|r| r.zero_copy_bytes_per_s > 0.0
        && r.device_matmul_bytes_per_s > 0.0
        && r.rows <= burn_offload::inner::ndarray::CPU_ZERO_COPY_MAX_ROWS));
    assert!(!measured.copies_overlap_compute, "CPU copies are memcpys");
    assert!(report.to_string().contains("auto mode: upload"), "{report}");
    assert_eq!(calibration(&CPU).as_deref(), Some(&measured));

    // Applied again: the stored calibration is reused, not measured anew.
    let (_, again) = OffloadPolicy::from_bytes(u64::MAX).apply(model).unwrap();
    assert_eq!(again.calibration, Some(measured));
    // Nothing offloaded: nothing to measure or report.
    let plain: Linear<B> = LinearConfig::new(4, 4).init(&device());
    let (_, none) = OffloadPolicy::from_bytes(0).apply(plain).unwrap();
    assert_eq!(none.calibration, None);
    clear_calibration(&CPU);
}

#[test]
fn auto_reads_in_place_where_the_calibration_predicts_it_faster() {
    let auto = context(OffloadMode::Auto, Some(synthetic(false)));
    let (k, n) = (1024, 1024); // 4 MiB
    for (rows, expect_in_place) in [(1, true), (3, true), (4, true), (8, false), (16, false)] {
        let (in_place, diff) = auto.run(|| run(rows, k, n));
        assert_eq!(in_place, expect_in_place, "{rows} rows, 4 MiB weight");
        assert!(diff < 1e-3, "{rows} rows: off by {diff}");
    }
    // A small weight: the upload's fixed cost dominates, so in place up to the kernel's limit.
    let (in_place, _) = auto.run(|| run(16, 32, 32));
    assert!(in_place, "16 rows, 4 KiB weight");
    // Past the kernel's limit, a copy whatever the calibration says.
    let (in_place, _) = auto.run(|| run(17, 32, 32));
    assert!(!in_place);
    // `Uva` ignores the calibration: the target's static threshold.
    let uva = context(OffloadMode::Uva, Some(synthetic(false)));
    assert!(uva.run(|| run(8, k, n)).0);
    // Without a calibration, `Auto` falls back to the static threshold too.
    assert!(context(OffloadMode::Auto, None).run(|| run(8, k, n)).0);
}

#[test]
fn auto_prefetches_copies_where_copies_overlap_compute() {
    common::own_process!(OWN_PROCESS);
    let model: Linear<B> = LinearConfig::new(32, 48).init(&device());
    let (model, _) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Copy)
        .apply(model)
        .unwrap();
    let x = Tensor::<B, 2>::from_data(values([64, 32], 3), &device());
    let reference = model.forward(x.clone()).into_data();

    for overlap in [false, true] {
        // 64 rows: beyond the kernel, so every matmul copies. Applied again in `Auto`, the
        // model takes the device's (cached) calibration into its new context.
        set_calibration(&CPU, synthetic(overlap));
        let (model, report) = OffloadPolicy::from_bytes(u64::MAX)
            .apply(model.clone())
            .unwrap();
        assert_eq!(report.calibration, Some(synthetic(overlap)));
        for _ in 0..6 {
            let out = model.forward(x.clone()).into_data();
            out.assert_approx_eq::<f32>(&reference, Default::default());
        }
        let stats = report.prefetch_stats();
        if overlap {
            // Predicted from the learned cycle: prefetched, or late where the background
            // thread had not got to it yet (a loaded 2-core CI machine).
            assert!(
                stats.hits + stats.late >= 6 && stats.relearns >= 1,
                "a repeating order of copies goes through the prefetcher: {stats:?}"
            );
        } else {
            assert_eq!(stats.hits + stats.misses, 0, "plain copies: {stats:?}");
        }
    }
    clear_calibration(&CPU);
}
