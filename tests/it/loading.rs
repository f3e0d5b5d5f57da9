//! Loading models bigger than device memory: a lazily initialised model gets a policy first,
//! then its weights are loaded, and offloaded parameters never touch device memory.
//!
//! `host_memory_stats` is process-wide, so every test here runs in a process of its own
//! (`own_process!`).

use crate::common;

use std::path::Path;

use burn::backend::NdArray;
use burn::module::Module;
use burn::prelude::*;
use burn::record::{
    BinFileRecorder, FileRecorder, FullPrecisionSettings, NamedMpkFileRecorder, Recorder,
};
use burn_offload::{
    HostMemoryStats, OffloadDevice, OffloadMode, OffloadPolicy, OffloadReport, OpStats,
    host_memory_stats, op_stats, reset_op_stats,
};
use burn_store::{BurnpackStore, ModuleSnapshot, SafetensorsStore};
use common::{
    B, CPU, NET_BYTES, NET_PARAMS, Net, assert_same_values, device, init_states, placements, values,
};

/// Offloads `layers.0.mlp.*` (1120 bytes) and, as the total is still below the budget,
/// `layers.1.mlp.up.weight` (512): 5 tensors, 1632 bytes; 880 bytes stay on the device.
fn policy() -> OffloadPolicy {
    OffloadPolicy::from_bytes(1300)
        .params(["mlp", "head"])
        .mode(OffloadMode::Copy)
}

const OFFLOADED: &[&str] = &[
    "layers.0.mlp.up.weight",
    "layers.0.mlp.up.bias",
    "layers.0.mlp.down.weight",
    "layers.0.mlp.down.bias",
    "layers.1.mlp.up.weight",
];
const OFFLOADED_BYTES: u64 = 1632;

/// A reference model on the plain backend, initialised, and its values.
fn reference() -> (Net<NdArray>, Vec<(String, TensorData)>) {
    let model = Net::<NdArray>::new(&CPU);
    let vals = values(&model);
    (model, vals)
}

/// A lazy `Net` with `policy()` applied, checking that applying allocated nothing.
fn lazy_offloaded_model() -> (Net<B>, OffloadReport) {
    let before = host_memory_stats();
    reset_op_stats();
    let model = Net::<B>::new(&device());
    let (model, report) = policy().apply(model).unwrap();

    assert_eq!(
        report
            .offloaded()
            .map(|p| p.path.as_str())
            .collect::<Vec<_>>(),
        OFFLOADED
    );
    assert_eq!(report.offloaded_bytes(), OFFLOADED_BYTES);
    // Every parameter was lazy on `Device`: exactly the offloaded ones were retargeted...
    for p in &report.params {
        assert_eq!(p.moved, report.is_offloaded(&p.path), "{}", p.path);
    }
    // ...without being initialised, so no memory was allocated anywhere.
    assert!(
        init_states(&model).iter().all(|(_, init)| !init),
        "{:?}",
        init_states(&model)
    );
    assert_eq!(op_stats(), OpStats::default());
    assert_eq!(host_memory_stats(), before);
    (model, report)
}

/// Checks a loaded model: placements as reported, values as the reference, and the
/// allocations that loading made (`stats` and the host memory delta since `before`).
fn check_loaded(
    model: &Net<B>,
    report: &OffloadReport,
    reference: &[(String, TensorData)],
    stats: OpStats,
    before: HostMemoryStats,
) {
    let resident_bytes = NET_BYTES - OFFLOADED_BYTES;
    assert_eq!(
        stats.device_created_bytes, resident_bytes,
        "only the resident parameters are created in device memory: {stats:?}"
    );
    assert_eq!(
        stats.host_created_bytes, OFFLOADED_BYTES,
        "offloaded parameters are created directly in host memory: {stats:?}"
    );
    assert_eq!(stats.transient_uploads, 0, "{stats:?}");
    let after = host_memory_stats();
    assert_eq!(
        after.live_bytes - before.live_bytes,
        OFFLOADED_BYTES as usize
    );
    assert_eq!(
        after.live_allocations - before.live_allocations,
        OFFLOADED.len()
    );

    let placed = placements(model);
    assert_eq!(placed.len(), NET_PARAMS.len());
    for (path, host) in &placed {
        assert_eq!(*host, report.is_offloaded(path), "{path}");
    }
    assert_same_values(&values(model), reference);
}

/// The loaded model computes what the reference computes (on `[batch, seq, d_model]`).
fn check_forward(model: &Net<B>, reference: &Net<NdArray>) {
    let x: Vec<f32> = (0..2 * 3 * common::D_MODEL)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let data = TensorData::new(x, [2, 3, common::D_MODEL]);
    let expected = reference
        .forward(Tensor::<NdArray, 3>::from_data(data.clone(), &CPU))
        .into_data();
    let actual = model
        .forward(Tensor::<B, 3>::from_data(data, &device()))
        .into_data();
    actual.assert_approx_eq::<f32>(&expected, burn::tensor::Tolerance::absolute(1e-6));
}

#[test]
fn apply_to_a_lazy_model_allocates_nothing() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let (model, _report) = lazy_offloaded_model();
    // Initialising it later creates each parameter on its side directly.
    let before = host_memory_stats();
    reset_op_stats();
    let placed = placements(&model);
    let stats = op_stats();
    assert_eq!(stats.device_created_bytes, NET_BYTES - OFFLOADED_BYTES);
    assert_eq!(stats.host_created_bytes, OFFLOADED_BYTES);
    assert_eq!(stats.transient_uploads, 0);
    assert_eq!(
        host_memory_stats().live_bytes - before.live_bytes,
        OFFLOADED_BYTES as usize
    );
    let host: Vec<&str> = placed
        .iter()
        .filter(|(_, host)| *host)
        .map(|(p, _)| p.as_str())
        .collect();
    assert_eq!(host, OFFLOADED);
}

#[test]
fn safetensors_loads_offloaded_params_into_host_memory() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let (reference, ref_values) = reference();
    reference
        .save_into(&mut SafetensorsStore::from_file(&path))
        .unwrap();

    let (mut model, report) = lazy_offloaded_model();
    let before = host_memory_stats();
    reset_op_stats();
    let result = model
        .load_from(&mut SafetensorsStore::from_file(&path))
        .unwrap();
    let stats = op_stats();
    assert_eq!(result.applied.len(), NET_PARAMS.len(), "{result:?}");
    assert!(
        result.errors.is_empty() && result.missing.is_empty(),
        "{result:?}"
    );

    check_loaded(&model, &report, &ref_values, stats, before);
    check_forward(&model, &reference);
}

#[test]
fn safetensors_from_bytes_loads_offloaded_params_into_host_memory() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let (reference, ref_values) = reference();
    let mut store = SafetensorsStore::from_bytes(None);
    reference.save_into(&mut store).unwrap();
    let bytes = store.get_bytes().unwrap();

    let (mut model, report) = lazy_offloaded_model();
    let before = host_memory_stats();
    reset_op_stats();
    model
        .load_from(&mut SafetensorsStore::from_bytes(Some(bytes)))
        .unwrap();
    let stats = op_stats();
    check_loaded(&model, &report, &ref_values, stats, before);
}

#[test]
fn burnpack_loads_offloaded_params_into_host_memory() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.bpk");
    let (reference, ref_values) = reference();
    reference
        .save_into(&mut BurnpackStore::from_file(&path))
        .unwrap();
    assert!(path.exists());

    for zero_copy in [false, true] {
        let (mut model, report) = lazy_offloaded_model();
        let before = host_memory_stats();
        reset_op_stats();
        let result = model
            .load_from(&mut BurnpackStore::from_file(&path).zero_copy(zero_copy))
            .unwrap();
        let stats = op_stats();
        assert_eq!(result.applied.len(), NET_PARAMS.len(), "{result:?}");
        check_loaded(&model, &report, &ref_values, stats, before);
        check_forward(&model, &reference);
    }
}

/// Bytes of `Net`'s optional parameters (Linear biases, LayerNorm betas).
///
/// Burn's `Option<M>::load_record` calls `num_params()`, which reads `param.val()` and so
/// initialises a lazy optional parameter on its lazy device just to count it; the value is
/// then replaced by the record's. These are the only device allocations a record load makes
/// besides the record itself.
const OPTIONAL_BYTES: u64 = 2 * (64 + 32 + 32) + 16;

/// Loads a record on `Host(d)` (every tensor created in host memory), then `apply` moves the
/// parameters it does not select back to the device.
fn load_record_then_apply<R>(recorder: &R, path: &Path)
where
    R: FileRecorder<NdArray> + FileRecorder<B>,
{
    let (reference, ref_values) = reference();
    reference.clone().save_file(path, recorder).unwrap();

    // Lazy, on the device; the record replaces every parameter.
    let model = Net::<B>::new(&device());
    let before = host_memory_stats();
    reset_op_stats();
    let record =
        Recorder::<B>::load(recorder, path.to_path_buf(), &OffloadDevice::Host(CPU)).unwrap();
    let stats = op_stats();
    assert_eq!(stats.device_created_bytes, 0, "{stats:?}");
    assert_eq!(stats.host_created_bytes, NET_BYTES, "{stats:?}");
    assert_eq!(stats.transient_uploads, 0, "{stats:?}");
    let loaded = host_memory_stats();
    assert_eq!(loaded.live_bytes - before.live_bytes, NET_BYTES as usize);

    reset_op_stats();
    let model = model.load_record(record);
    let stats = op_stats();
    assert_eq!(
        stats.device_created_bytes, OPTIONAL_BYTES,
        "Burn initialises the lazy optional params to count them: {stats:?}"
    );
    assert_eq!(stats.host_created_bytes, 0, "{stats:?}");
    assert_eq!(host_memory_stats().live_bytes, loaded.live_bytes);
    assert!(
        placements(&model).iter().all(|(_, host)| *host),
        "the record's placement wins: {:?}",
        placements(&model)
    );

    // `apply` restores the placement: the unselected parameters go to the device.
    reset_op_stats();
    let (model, report) = policy().apply(model).unwrap();
    let stats = op_stats();
    assert_eq!(
        report
            .offloaded()
            .map(|p| p.path.as_str())
            .collect::<Vec<_>>(),
        OFFLOADED
    );
    for p in &report.params {
        assert_eq!(p.moved, !report.is_offloaded(&p.path), "{}", p.path);
    }
    assert_eq!(
        stats.device_created_bytes,
        NET_BYTES - OFFLOADED_BYTES,
        "only the moves of the resident parameters allocate device memory: {stats:?}"
    );
    assert_eq!(stats.host_created_bytes, 0, "{stats:?}");
    assert_eq!(stats.transient_uploads, 0, "{stats:?}");
    // The host copies of the resident parameters were freed.
    let after = host_memory_stats();
    assert_eq!(
        after.live_bytes - before.live_bytes,
        OFFLOADED_BYTES as usize
    );
    assert_eq!(
        after.live_allocations - before.live_allocations,
        OFFLOADED.len()
    );
    for (path, host) in placements(&model) {
        assert_eq!(host, report.is_offloaded(&path), "{path}");
    }
    assert_same_values(&values(&model), &ref_values);
    check_forward(&model, &reference);

    // Applying again changes nothing.
    let (model, again) = policy().apply(model).unwrap();
    assert!(again.params.iter().all(|p| !p.moved), "{again}");
    drop(model);
    assert_eq!(host_memory_stats().live_bytes, before.live_bytes);
}

#[test]
fn named_mpk_record_loaded_on_host_then_apply() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let dir = tempfile::tempdir().unwrap();
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    load_record_then_apply(&recorder, &dir.path().join("model"));
}

#[test]
fn bin_record_loaded_on_host_then_apply() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let dir = tempfile::tempdir().unwrap();
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    load_record_then_apply(&recorder, &dir.path().join("model"));
}

/// The contrast: a record loaded on `Device(d)` creates every tensor in device memory first.
#[test]
fn record_loaded_on_device_allocates_everything_on_device_first() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model");
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let (reference, ref_values) = reference();
    reference.save_file(&path, &recorder).unwrap();

    let before = host_memory_stats();
    reset_op_stats();
    let model = Net::<B>::new(&device())
        .load_file(&path, &recorder, &device())
        .unwrap();
    assert_eq!(op_stats().device_created_bytes, NET_BYTES + OPTIONAL_BYTES);
    assert_eq!(op_stats().host_created_bytes, 0);
    assert!(placements(&model).iter().all(|(_, host)| !host));
    let (model, report) = policy().apply(model).unwrap();
    assert_eq!(report.offloaded_bytes(), OFFLOADED_BYTES);
    assert_eq!(
        host_memory_stats().live_bytes - before.live_bytes,
        OFFLOADED_BYTES as usize
    );
    for (path, host) in placements(&model) {
        assert_eq!(host, report.is_offloaded(&path), "{path}");
    }
    assert_same_values(&values(&model), &ref_values);
}

/// `LinearLayout::Col` stores the weight transposed and relies on Burn's param mappers
/// (transpose on load and save). A lazily retargeted parameter is a new `Param`; it must keep
/// the original's mappers, on load and on save.
#[test]
fn col_layout_linear_loads_through_a_retargeted_param() {
    use burn::nn::{Linear, LinearConfig, LinearLayout};
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let config = LinearConfig::new(3, 5).with_layout(LinearLayout::Col);
    let reference: Linear<NdArray> = config.init(&CPU);
    let mut store = SafetensorsStore::from_bytes(None);
    reference.save_into(&mut store).unwrap();
    let bytes = store.get_bytes().unwrap();

    let (mut model, report) = OffloadPolicy::from_bytes(u64::MAX)
        .apply(config.init::<B>(&device()))
        .unwrap();
    assert!(report.is_offloaded("weight"));
    model
        .load_from(&mut SafetensorsStore::from_bytes(Some(bytes)))
        .unwrap();
    assert_same_values(&values(&model), &values(&reference));

    // Saving applies the save mapper too: the file loads back into a plain Col model.
    let mut saved = SafetensorsStore::from_bytes(None);
    model.save_into(&mut saved).unwrap();
    let mut reloaded: Linear<NdArray> = config.init(&CPU);
    reloaded
        .load_from(&mut SafetensorsStore::from_bytes(Some(
            saved.get_bytes().unwrap(),
        )))
        .unwrap();
    assert_same_values(&values(&reloaded), &values(&reference));
}
