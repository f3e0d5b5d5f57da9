//! The environment switches. Environment variables are process-wide, so this file (its own
//! test binary) has a single test.

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
        .mode(OffloadMode::Prefetch {
            lookahead_bytes: 1 << 20,
        })
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
    let cpu = NdArrayDevice::Cpu;
    // SAFETY: this is the only test in this binary, so no other thread reads the environment.
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
}
