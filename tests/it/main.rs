//! burn-offload's integration tests: one test crate, so that the library is linked and its
//! backends are monomorphised once for all of them, not once per file (a release build of 19
//! test crates took most of CI's time). A module per area, named as the files in `tests/` were;
//! shared fixtures in [`common`].
//!
//! The tests share one process and run on parallel threads. Those that depend on process-wide
//! state staying still run in a child process of their own ([`common::own_process!`], each with
//! its reason); every GPU test does where there is a GPU (`common::gpu`).

mod common;

/// The example (`examples/llama/main.rs`): its own tests (the README's command, the CLI's budget
/// and model-directory handling) run here, and its `model` and `hf` modules serve the tests
/// below.
#[path = "../../examples/llama/main.rs"]
#[allow(dead_code)]
mod llama;

mod auto;
#[cfg(feature = "collective")]
mod collective;
mod context;
mod copy_engine;
#[cfg(feature = "cuda")]
mod cuda_copy_engine;
#[cfg(feature = "cuda")]
mod cuda_target;
#[cfg(feature = "cuda")]
mod cuda_transfer;
mod device_settings;
mod env;
mod fit;
mod hf_checkpoints;
mod loading;
mod memory;
#[cfg(feature = "cuda")]
mod nvrtc;
mod ops;
mod optimizer_state;
mod policy;
mod prefetch;
mod quant;
mod training;
mod views;
#[cfg(feature = "wgpu")]
mod wgpu;
#[cfg(feature = "wgpu")]
mod wgpu_engine;
mod zoo;
