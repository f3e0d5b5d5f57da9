//! The environment switches. Environment variables (and the logger that records their
//! warnings) are process-wide, so the test runs in a process of its own.

use crate::common;

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayDevice;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn_offload::mode::{ENV_DISABLE_PIN_MEMORY, ENV_DISABLE_UVA};
use burn_offload::{
    ContextConfig, OffloadBackend, OffloadDevice, OffloadMode, OffloadPolicy, op_stats,
    reset_op_stats,
};

type B = OffloadBackend<NdArray>;

/// The warnings logged about the environment switches (messages naming one of them).
static SWITCH_WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Records the warnings that name an environment switch.
struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        let message = record.args().to_string();
        if record.level() == log::Level::Warn && message.contains("BURN_OFFLOAD_DISABLE_") {
            SWITCH_WARNINGS.lock().unwrap().push(message);
        }
    }

    fn flush(&self) {}
}

fn switch_warnings() -> Vec<String> {
    SWITCH_WARNINGS.lock().unwrap().clone()
}

/// Applies a Uva policy to a linear layer, runs it on one row, and returns the report's mode
/// and the (zero-copy ops, transient uploads) of that forward pass.
fn run_uva() -> (OffloadMode, u64, u64) {
    let device = OffloadDevice::Device(NdArrayDevice::Cpu);
    let linear: Linear<B> = LinearConfig::new(8, 4).init(&device);
    let (linear, report) = OffloadPolicy::from_gib(1.0)
        .unwrap()
        .mode(OffloadMode::Uva)
        .apply(linear)
        .unwrap();
    assert_eq!(report.offloaded_tensors(), 2);
    let x = Tensor::<B, 2>::ones([1, 8], &device);
    reset_op_stats();
    let _ = linear.forward(x).into_data();
    let stats = op_stats();
    (report.mode, stats.zero_copy_ops, stats.transient_uploads)
}

/// The configuration of the context a `Uva` policy (pinning) creates now.
fn uva_context() -> ContextConfig {
    let device = OffloadDevice::Device(NdArrayDevice::Cpu);
    let linear: Linear<B> = LinearConfig::new(8, 4).init(&device);
    let (_, report) = OffloadPolicy::from_gib(1.0)
        .unwrap()
        .mode(OffloadMode::Uva)
        .apply(linear)
        .unwrap();
    report.context().expect("apply made a context").config()
}

/// Applies a Prefetch policy to an embedding, looks up two tokens, and returns the report's
/// mode and the (zero-copy ops, transient uploads) of that lookup.
fn run_prefetch_embedding() -> (OffloadMode, u64, u64) {
    let device = OffloadDevice::Device(NdArrayDevice::Cpu);
    let embedding: Embedding<B> = EmbeddingConfig::new(16, 4).init(&device);
    let (embedding, report) = OffloadPolicy::from_gib(1.0)
        .unwrap()
        .mode(OffloadMode::prefetch(1 << 20))
        .apply(embedding)
        .unwrap();
    assert_eq!(report.offloaded_tensors(), 1);
    let ids = Tensor::<B, 2, Int>::from_data([[3, 7]], &device);
    reset_op_stats();
    let _ = embedding.forward(ids).into_data();
    let stats = op_stats();
    (report.mode, stats.zero_copy_ops, stats.transient_uploads)
}

#[test]
fn environment_switches_override_the_policy() {
    common::own_process!("sets environment variables and installs the process's logger");
    let cpu = NdArrayDevice::Cpu;
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    // SAFETY: this test runs alone in its own process, so no other thread reads the environment.
    unsafe {
        std::env::remove_var(ENV_DISABLE_UVA);
        std::env::remove_var(ENV_DISABLE_PIN_MEMORY);
    }
    assert_eq!(ENV_DISABLE_UVA, "BURN_OFFLOAD_DISABLE_UVA");
    assert_eq!(ENV_DISABLE_PIN_MEMORY, "BURN_OFFLOAD_DISABLE_PIN_MEMORY");

    // Without the switches: the weight is read in place, the bias is copied for the add.
    let (mode, zero_copy, uploads) = run_uva();
    assert_eq!(mode, OffloadMode::Uva);
    assert_eq!(uva_context().mode, OffloadMode::Uva);
    assert!(uva_context().pin_memory);
    assert_eq!((zero_copy, uploads), (1, 1));
    // Prefetch mode gathers embedding rows in place rather than copying the table.
    let (mode, zero_copy, uploads) = run_prefetch_embedding();
    assert!(matches!(mode, OffloadMode::Prefetch { .. }));
    assert_eq!((zero_copy, uploads), (1, 0));

    // SAFETY: as above.
    unsafe {
        std::env::set_var(ENV_DISABLE_UVA, "1");
        std::env::set_var(ENV_DISABLE_PIN_MEMORY, "1");
    }
    let (mode, zero_copy, uploads) = run_uva();
    assert_eq!(mode, OffloadMode::Copy, "BURN_OFFLOAD_DISABLE_UVA=1");
    assert_eq!(uva_context().mode, OffloadMode::Copy);
    assert!(
        !uva_context().pin_memory,
        "BURN_OFFLOAD_DISABLE_PIN_MEMORY=1"
    );
    assert_eq!((zero_copy, uploads), (0, 2), "weight and bias copied");
    // Prefetch stays a prefetch, and copies the table for a lookup too.
    let (mode, zero_copy, uploads) = run_prefetch_embedding();
    assert!(matches!(mode, OffloadMode::Prefetch { .. }), "{mode}");
    assert_eq!((zero_copy, uploads), (0, 1), "BURN_OFFLOAD_DISABLE_UVA=1");
    // The report says so too.
    let device = OffloadDevice::Device(cpu);
    let linear: Linear<B> = LinearConfig::new(8, 4).init(&device);
    let (_, report) = OffloadPolicy::from_bytes(1)
        .mode(OffloadMode::Uva)
        .apply(linear)
        .unwrap();
    assert!(report.summary().contains("mode copy"), "{report}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["mode"], "copy");

    // Other values than the true ones leave the policy alone.
    // SAFETY: as above.
    unsafe {
        std::env::set_var(ENV_DISABLE_UVA, "0");
        std::env::remove_var(ENV_DISABLE_PIN_MEMORY);
    }
    let (mode, zero_copy, _) = run_uva();
    assert_eq!(mode, OffloadMode::Uva);
    assert_eq!(zero_copy, 1);
    assert!(uva_context().pin_memory);

    // SAFETY: as above.
    unsafe {
        std::env::remove_var(ENV_DISABLE_UVA);
    }
    let (mode, zero_copy, _) = run_uva();
    assert_eq!(mode, OffloadMode::Uva);
    assert_eq!(zero_copy, 1);
    assert!(switch_warnings().is_empty(), "{:?}", switch_warnings());

    // Other spellings, in any case and with spaces around them.
    for (value, on) in [
        (" TRUE ", true),
        ("Yes", true),
        ("on", true),
        ("OFF", false),
        ("no", false),
        ("False", false),
    ] {
        // SAFETY: as above.
        unsafe {
            std::env::set_var(ENV_DISABLE_UVA, value);
            std::env::set_var(ENV_DISABLE_PIN_MEMORY, value);
        }
        let (mode, _, _) = run_uva();
        let expected = if on {
            OffloadMode::Copy
        } else {
            OffloadMode::Uva
        };
        assert_eq!(mode, expected, "{ENV_DISABLE_UVA}={value:?}");
        assert_eq!(uva_context().pin_memory, !on, "{value:?}");
    }
    assert!(switch_warnings().is_empty(), "{:?}", switch_warnings());

    // An unrecognised value counts as unset and warns once per variable, with what works.
    // SAFETY: as above.
    unsafe {
        std::env::set_var(ENV_DISABLE_UVA, "maybe");
        std::env::set_var(ENV_DISABLE_PIN_MEMORY, "2");
    }
    for _ in 0..3 {
        let (mode, zero_copy, _) = run_uva();
        assert_eq!(mode, OffloadMode::Uva);
        assert_eq!(zero_copy, 1);
        assert!(uva_context().pin_memory);
    }
    let warnings = switch_warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    let uva = warnings
        .iter()
        .find(|w| w.starts_with("BURN_OFFLOAD_DISABLE_UVA=\"maybe\" is not recognised"))
        .unwrap_or_else(|| panic!("{warnings:?}"));
    assert!(
        uva.contains("1, true, yes or on") && uva.contains("0, false, no or off"),
        "{uva}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("BURN_OFFLOAD_DISABLE_PIN_MEMORY=\"2\" is not recognised")),
        "{warnings:?}"
    );
    // Once per variable and process, whatever the next bad value.
    // SAFETY: as above.
    unsafe {
        std::env::set_var(ENV_DISABLE_UVA, "enable");
    }
    let _ = run_uva();
    assert_eq!(switch_warnings().len(), 2, "{:?}", switch_warnings());
    // An empty value is unset, without a warning.
    // SAFETY: as above.
    unsafe {
        std::env::set_var(ENV_DISABLE_UVA, "");
        std::env::remove_var(ENV_DISABLE_PIN_MEMORY);
    }
    let (mode, _, _) = run_uva();
    assert_eq!(mode, OffloadMode::Uva);
}
