//! `Auto` mode: `apply` measures the device once, ops choose zero-copy or a copy from that
//! measurement (rows and weight size), copies are prefetched where the calibration says
//! copies overlap compute, and results never change.
//!
//! The calibration cache is process-wide per device (the hardware's): the tests that clear or
//! set it run in a process of their own (`own_process!`). So do those of the disk cache, which
//! point it at a temporary directory through the environment.

use crate::common;

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::module::linear;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn_offload::auto::cache::CacheKey;
use burn_offload::auto::{
    Calibration, ENV_CACHE_DIR, ENV_DISABLE_CALIBRATION_CACHE, RowRate, calibration,
    calibration_cache_dir, calibration_cache_file, clear_calibration, clear_calibration_cache,
    set_calibration,
};
use burn_offload::mode::{ENV_DISABLE_PIN_MEMORY, ENV_DISABLE_UVA};
use burn_offload::{
    OffloadContext, OffloadDevice, OffloadMode, OffloadPolicy, op_stats, reset_op_stats,
};
use common::{B, CPU, device};

/// Why the tests that start with `own_process!` need a process of their own.
const OWN_PROCESS: &str = "the calibration cache is the process's: these tests clear and set the \
     CPU's, and set the environment that places the disk cache";

/// Points the disk cache at a new, empty directory and unsets the switches that would change
/// what `apply` does in `Auto` mode; call it first in a test that runs in its own process.
fn fresh_cache_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // SAFETY: only called first in tests that run alone in their own process (`own_process!`),
    // before anything starts a thread that reads the environment.
    unsafe {
        std::env::set_var(ENV_CACHE_DIR, dir.path());
        std::env::remove_var(ENV_DISABLE_CALIBRATION_CACHE);
        std::env::remove_var(ENV_DISABLE_UVA);
        std::env::remove_var(ENV_DISABLE_PIN_MEMORY);
    }
    dir
}

/// Applies a policy in `Auto` mode (host memory pinned: the default) to a model with
/// something to offload, and returns the calibration its report shows.
fn apply_auto() -> Calibration {
    let model: Linear<B> = LinearConfig::new(64, 64).init(&device());
    let (_, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Auto)
        .apply(model)
        .unwrap();
    report.calibration.expect("auto mode calibrates")
}

/// The files in `dir`, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// The disk cache's entry in `path`, as JSON.
fn entry(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An entry with `key` and `calibration`, as the cache writes them.
fn write_entry(path: &Path, key: &serde_json::Value, calibration: &Calibration) {
    let json = serde_json::json!({ "key": key, "calibration": calibration });
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// A calibration no measurement produces (it "took" 1234.5 s): seen in a report, it was read
/// from the disk cache.
fn planted() -> Calibration {
    Calibration {
        seconds: 1234.5,
        ..synthetic(false)
    }
}

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
    // An empty disk cache: this process measures.
    let _dir = fresh_cache_dir();
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

#[test]
fn the_calibration_is_kept_on_disk_and_read_back_without_measuring() {
    common::own_process!(OWN_PROCESS);
    let dir = fresh_cache_dir();
    assert_eq!(calibration_cache_dir().as_deref(), Some(dir.path()));
    clear_calibration(&CPU);
    let file = calibration_cache_file(&CPU, true).expect("the disk cache is on");
    assert_eq!(file.parent(), Some(dir.path()));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    assert_eq!(
        file.file_name().unwrap().to_string_lossy(),
        format!("calibration-burn_ndarray..backend..NdArrayDevice-0.0-{profile}-pinned.json")
    );
    assert!(files(dir.path()).is_empty());

    // The first apply measures and writes the entry: the calibration and its key.
    let started = std::time::Instant::now();
    let measured = apply_auto();
    let first = started.elapsed().as_secs_f64();
    assert_eq!(
        files(dir.path()),
        std::slice::from_ref(&file),
        "one file, no temporary left"
    );
    let written = entry(&file);
    let stored: Calibration = serde_json::from_value(written["calibration"].clone()).unwrap();
    assert_eq!(stored, measured);
    let key: CacheKey = serde_json::from_value(written["key"].clone()).unwrap();
    assert_eq!(key, CacheKey::new(&CPU, true));
    assert_eq!(key.profile, profile);
    assert!(key.pinned);
    assert_eq!(key.crate_version, env!("CARGO_PKG_VERSION"));
    assert!(
        key.fingerprint.contains(std::env::consts::ARCH) && key.fingerprint.contains("threads"),
        "the CPU's model and threads: {}",
        key.fingerprint
    );

    // A new process (here: the process's cache cleared) reads it back instead of measuring:
    // the same calibration, to the last bit of the seconds it took.
    clear_calibration(&CPU);
    let started = std::time::Instant::now();
    assert_eq!(apply_auto(), measured);
    let second = started.elapsed().as_secs_f64();
    println!("first apply (measured) {first:.3} s, second (read from disk) {second:.3} s");
    // What the file says is what is used: a calibration no measurement gives.
    write_entry(&file, &written["key"], &planted());
    clear_calibration(&CPU);
    assert_eq!(apply_auto(), planted());
    assert_eq!(calibration(&CPU).as_deref(), Some(&planted()));
    // The process's cache comes first: the file is not read again while it has one.
    write_entry(&file, &written["key"], &measured);
    assert_eq!(apply_auto(), planted());

    // Cleared from the disk: the next process measures again.
    assert_eq!(clear_calibration_cache(&CPU).unwrap(), 1);
    assert!(files(dir.path()).is_empty());
    assert_eq!(clear_calibration_cache(&CPU).unwrap(), 0);
    clear_calibration(&CPU);
    let again = apply_auto();
    assert_ne!(again, planted());
    assert_eq!(files(dir.path()), [file]);
    clear_calibration(&CPU);
}

/// A fresh cache directory (see [`fresh_cache_dir`]) holding [`planted`] under the CPU's key,
/// with no calibration in the process: the directory, the entry's file and its key.
fn planted_cache() -> (tempfile::TempDir, std::path::PathBuf, serde_json::Value) {
    let dir = fresh_cache_dir();
    clear_calibration(&CPU);
    let file = calibration_cache_file(&CPU, true).unwrap();
    let key = serde_json::to_value(CacheKey::new(&CPU, true)).unwrap();
    write_entry(&file, &key, &planted());
    (dir, file, key)
}

#[test]
fn stale_or_corrupt_entries_are_measured_again_and_replaced() {
    common::own_process!(OWN_PROCESS);
    let (dir, file, key) = planted_cache();
    // The planted entry under the right key is used (the check of the damaged ones below
    // would pass vacuously otherwise).
    assert_eq!(apply_auto(), planted());

    let with = |field: &str, value: serde_json::Value| {
        let mut key = key.clone();
        key[field] = value;
        key
    };
    let damaged: Vec<(&str, String)> = vec![
        ("another fingerprint", {
            let key = with("fingerprint", "another CPU, 64 threads".into());
            serde_json::json!({ "key": key, "calibration": planted() }).to_string()
        }),
        ("another device description", {
            let key = with("device", "Cpu2".into());
            serde_json::json!({ "key": key, "calibration": planted() }).to_string()
        }),
        ("another crate version", {
            let key = with("crate_version", "0.0.0-old".into());
            serde_json::json!({ "key": key, "calibration": planted() }).to_string()
        }),
        ("another entry format", {
            let key = with("format", 0.into());
            serde_json::json!({ "key": key, "calibration": planted() }).to_string()
        }),
        ("implausible rates", {
            let c = Calibration {
                upload_bytes_per_s: -1.0,
                ..planted()
            };
            serde_json::json!({ "key": key, "calibration": c }).to_string()
        }),
        (
            "corrupt JSON",
            "{\"key\": {\"format\": 1, \"crate_ver".into(),
        ),
        ("no key", serde_json::to_string(&planted()).unwrap()),
        ("empty", String::new()),
    ];
    for (what, text) in damaged {
        std::fs::write(&file, text).unwrap();
        clear_calibration(&CPU);
        let measured = apply_auto();
        assert_ne!(measured, planted(), "{what}: the entry was used");
        assert!(measured.upload_bytes_per_s > 0.0, "{what}");
        // Replaced by the new measurement under the current key.
        let written = entry(&file);
        assert_eq!(written["key"], key, "{what}");
        let stored: Calibration = serde_json::from_value(written["calibration"].clone()).unwrap();
        assert_eq!(stored, measured, "{what}");
        assert_eq!(files(dir.path()), std::slice::from_ref(&file), "{what}");
    }

    // A directory where the file should be: not readable as an entry, not writable; apply
    // measures and goes on (only logged).
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    clear_calibration(&CPU);
    assert_ne!(apply_auto(), planted());
    assert!(file.is_dir());
    assert_eq!(
        files(dir.path()),
        std::slice::from_ref(&file),
        "no temporary left"
    );
    clear_calibration(&CPU);
}

#[test]
fn the_switch_keeps_the_calibration_off_the_disk() {
    common::own_process!(OWN_PROCESS);
    let (dir, file, _) = planted_cache();
    let planted_text = std::fs::read_to_string(&file).unwrap();

    for off in ["0", "off", "False"] {
        // SAFETY: this test runs alone in its own process (`own_process!`); no other thread
        // reads the environment.
        unsafe { std::env::set_var(ENV_DISABLE_CALIBRATION_CACHE, off) };
        assert_eq!(
            calibration_cache_dir().as_deref(),
            Some(dir.path()),
            "{off}"
        );
    }
    for on in ["1", "true", " YES ", "on"] {
        // SAFETY: as above.
        unsafe { std::env::set_var(ENV_DISABLE_CALIBRATION_CACHE, on) };
        assert_eq!(calibration_cache_dir(), None, "{on:?}");
        assert_eq!(calibration_cache_file(&CPU, true), None, "{on:?}");
        assert_eq!(clear_calibration_cache(&CPU).unwrap(), 0, "{on:?}");
        // Not read: measured; not written: the file and the directory stay as they were.
        clear_calibration(&CPU);
        let measured = apply_auto();
        assert_ne!(measured, planted(), "{on:?}");
        assert_eq!(files(dir.path()), std::slice::from_ref(&file), "{on:?}");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            planted_text,
            "{on:?}"
        );
    }

    // Switched on again, the same file is read.
    // SAFETY: as above.
    unsafe { std::env::remove_var(ENV_DISABLE_CALIBRATION_CACHE) };
    clear_calibration(&CPU);
    assert_eq!(apply_auto(), planted());
    clear_calibration(&CPU);
}
