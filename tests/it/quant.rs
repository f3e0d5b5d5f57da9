//! Quantized weights in host memory on the CPU reference target: placement, report and
//! `placements()` agree for every scheme; offloaded == resident; Burn's own `Quantizer` in
//! either order; quantize on load without the float model in memory; burnpack round trips;
//! autodiff with frozen quantized weights; errors for what a target cannot do.

use burn::module::{Module, Param, Quantizer};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::quantization::{
    Calibration, QuantLevel, QuantParam, QuantScheme, QuantStore, QuantValue,
};
use burn_offload::quant::{QuantPreset, scheme_name, tensor_bytes};
use burn_offload::{
    OffloadError, OffloadMode, OffloadPolicy, Placement, Quantization, op_stats, reset_op_stats,
};
use burn_store::{BurnpackStore, ModuleSnapshot, SafetensorsStore};

use crate::common::{self, B, MODES};

const VOCAB: usize = 64;
const D: usize = 64;
const FF: usize = 128;

/// An embedding, a two-layer MLP and a head: rank-2 weights whose last dims blocks of 32
/// tile, and rank-1 biases that stay float.
#[derive(Module, Debug)]
pub struct QNet<B: Backend> {
    pub embed: Embedding<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
    pub head: Linear<B>,
}

impl<B: Backend> QNet<B> {
    pub fn new(device: &B::Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(VOCAB, D).init(device),
            up: LinearConfig::new(D, FF).init(device),
            down: LinearConfig::new(FF, D).init(device),
            head: LinearConfig::new(D, VOCAB).init(device),
        }
    }

    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = self.embed.forward(ids);
        let x = self.down.forward(relu(self.up.forward(x.clone()))) + x;
        self.head.forward(x)
    }
}

/// `QNet` with fixed weights (no random generator: that is the process's, and other tests
/// draw from it), created in `device`'s memory: the same model whenever it is built.
pub fn fixed<Bk: Backend>(device: &Bk::Device) -> QNet<Bk> {
    let shapes: [&[usize]; 7] = [
        &[VOCAB, D],
        &[D, FF],
        &[FF],
        &[FF, D],
        &[D],
        &[D, VOCAB],
        &[VOCAB],
    ];
    let values: Vec<(String, TensorData)> = shapes
        .iter()
        .enumerate()
        .map(|(i, shape)| (String::new(), common::data(shape, 100 + i as u64)))
        .collect();
    common::load_values(QNet::new(device), &values, device)
}

/// Rank-2 parameter paths (quantized by default) and rank-1 ones (stay float).
const MATRICES: [&str; 4] = ["embed.weight", "up.weight", "down.weight", "head.weight"];

fn ids(
    device: &burn_offload::OffloadDevice<burn::backend::ndarray::NdArrayDevice>,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(vec![3i64, 17, 42, 63, 0, 8], [2, 3]),
        device,
    )
}

/// A seeded, lazily initialised model.
fn seeded(seed: u64) -> QNet<B> {
    let device = common::device();
    B::seed(&device, seed);
    QNet::new(&device)
}

/// `q8s` in blocks of 32 with f32 scales, stored natively: the scheme burn-ndarray holds.
fn q8_native() -> QuantScheme {
    QuantScheme::default()
        .with_value(QuantValue::Q8S)
        .with_level(QuantLevel::block([32]))
        .with_param(QuantParam::F32)
        .with_store(QuantStore::Native)
}

/// Every integer scheme the CPU target reads, by value, level, scales and store.
fn schemes() -> Vec<QuantScheme> {
    let packed = |value, level, param| {
        QuantScheme::default()
            .with_value(value)
            .with_level(level)
            .with_param(param)
            .with_store(QuantStore::PackedU32(0))
    };
    vec![
        q8_native(),
        QuantPreset::Q8.scheme(),
        QuantPreset::Q4.scheme(),
        packed(QuantValue::Q8F, QuantLevel::block([32]), QuantParam::BF16),
        packed(QuantValue::Q4F, QuantLevel::Tensor, QuantParam::F32),
        packed(QuantValue::Q2S, QuantLevel::block([32]), QuantParam::BF16),
        packed(QuantValue::Q2F, QuantLevel::block([16]), QuantParam::F16),
    ]
}

/// The bytes a parameter's value holds (a quantized tensor's packed values and scales).
fn value_bytes<const N: usize>(tensor: Tensor<B, N>) -> usize {
    tensor.into_data().as_bytes().len()
}

/// Path, dtype and bytes of every float parameter's value (initialises lazy ones).
fn dtypes_and_bytes(model: &QNet<B>) -> Vec<(String, String, usize)> {
    let row = |path: &str, t: Tensor<B, 2>| {
        let dtype = burn_offload::quant::dtype_name(t.dtype());
        (path.to_string(), dtype, value_bytes(t))
    };
    let bias = |path: &str, t: Tensor<B, 1>| {
        let dtype = burn_offload::quant::dtype_name(t.dtype());
        (path.to_string(), dtype, value_bytes(t))
    };
    let b = |l: &Linear<B>| l.bias.as_ref().expect("Linear has a bias").val();
    vec![
        row("embed.weight", model.embed.weight.val()),
        row("up.weight", model.up.weight.val()),
        bias("up.bias", b(&model.up)),
        row("down.weight", model.down.weight.val()),
        bias("down.bias", b(&model.down)),
        row("head.weight", model.head.weight.val()),
        bias("head.bias", b(&model.head)),
    ]
}

#[test]
fn report_dtype_bytes_and_placement_are_the_truth_for_every_scheme() {
    for scheme in schemes() {
        let name = scheme_name(&scheme);
        // burn-ndarray holds only its native q8: every other scheme is offloaded whole here.
        let budgets: &[u64] = if scheme == q8_native() {
            &[u64::MAX, 20_000, 0]
        } else {
            &[u64::MAX]
        };
        for &budget in budgets {
            let policy = OffloadPolicy::from_bytes(budget)
                .mode(OffloadMode::Copy)
                .quantize(Quantization::new(scheme));
            let (model, report) = policy.apply(seeded(1)).unwrap();
            let placed = burn_offload::placements(&model);
            let actual = dtypes_and_bytes(&model);
            assert_eq!(report.params.len(), actual.len(), "{name}");
            for (row, (path, dtype, bytes)) in report.params.iter().zip(&actual) {
                assert_eq!(&row.path, path);
                let quantized = MATRICES.contains(&path.as_str());
                let expected = if quantized {
                    name.clone()
                } else {
                    "f32".into()
                };
                assert_eq!(&row.dtype, &expected, "{name}: {path}'s dtype column");
                assert_eq!(dtype, &expected, "{name}: {path}'s value");
                assert_eq!(
                    row.bytes as usize, *bytes,
                    "{name} {budget}: {path}'s bytes"
                );
                let truth = placed.iter().find(|(p, _)| p == path).unwrap().1;
                assert_eq!(row.placement, truth, "{name} {budget}: {path}'s placement");
            }
            if budget == u64::MAX {
                assert!(report.params.iter().all(|r| r.placement == Placement::Host));
            }
            if budget == 0 {
                assert!(
                    report
                        .params
                        .iter()
                        .all(|r| r.placement == Placement::Device)
                );
            }
        }
    }
}

/// Runs `model` in `mode` and returns its logits and the bytes that crossed the "bus"
/// (uploads and in-place reads).
fn run(model: &QNet<B>) -> (Vec<f32>, u64) {
    reset_op_stats();
    let out = model.forward(ids(&common::device()));
    let out = out.into_data().to_vec::<f32>().unwrap();
    let stats = op_stats();
    (out, stats.transient_upload_bytes + stats.zero_copy_bytes)
}

/// Whether `a` equals `b` up to f32 rounding of another summation order: every difference
/// within 1e-5 of `b`'s largest magnitude.
fn close(a: &[f32], b: &[f32]) -> bool {
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale)
}

#[test]
fn offloaded_quantized_equals_resident_quantized() {
    // burn-ndarray's own q8: the resident model quantizes and dequantizes with Burn.
    let scheme = q8_native();
    let resident_policy = OffloadPolicy::from_bytes(0).quantize(Quantization::new(scheme));
    let (resident, _) = resident_policy.apply(fixed(&common::device())).unwrap();
    let (expected, bytes) = run(&resident);
    assert_eq!(bytes, 0, "nothing offloaded, nothing crosses");
    for mode in MODES {
        let policy = OffloadPolicy::from_bytes(u64::MAX)
            .mode(mode)
            .quantize(Quantization::new(scheme));
        let (model, report) = policy.apply(fixed(&common::device())).unwrap();
        let (out, _) = run(&model);
        match mode {
            OffloadMode::Copy | OffloadMode::Prefetch { .. } => {
                assert_eq!(out, expected, "{mode:?}: bit for bit")
            }
            // In place: the host codec's dequantization (the same products) and the CPU
            // target's own loops (another summation order).
            _ => assert!(close(&out, &expected), "{mode:?}"),
        }
        // The packed weights are what crossed, never a float copy.
        let packed: u64 = report.offloaded().map(|p| p.bytes).sum();
        assert!(
            packed
                < report
                    .params
                    .iter()
                    .map(|p| p.shape.iter().product::<usize>() as u64 * 4)
                    .sum::<u64>()
        );
    }
}

/// A resident float model with the dequantized weights of `model` (its reference).
fn dequantized(model: QNet<B>) -> QNet<B> {
    struct Dequantize;
    impl burn::module::ModuleMapper<B> for Dequantize {
        fn map_float<const N: usize>(&mut self, param: Param<Tensor<B, N>>) -> Param<Tensor<B, N>> {
            let (id, t, mapper) = param.consume();
            Param::from_mapped_value(id, t.dequantize(), mapper)
        }
    }
    burn_offload::to_device_memory(model.map(&mut Dequantize))
}

#[test]
fn q4_and_q8_presets_offloaded_compute_with_their_dequantized_weights() {
    for preset in [QuantPreset::Q8, QuantPreset::Q4] {
        for mode in MODES {
            let policy = OffloadPolicy::from_bytes(u64::MAX)
                .mode(mode)
                .quantize(Quantization::preset(preset));
            let (model, report) = policy.apply(seeded(3)).unwrap();
            let (out, crossed) = run(&model);
            let packed: u64 = report.offloaded().map(|p| p.bytes).sum();
            let reference = dequantized(model);
            assert!(common::placements(&reference).iter().all(|(_, host)| !host));
            let (expected, _) = run(&reference);
            match mode {
                OffloadMode::Copy => {
                    assert_eq!(out, expected, "{preset} {mode:?}: bit for bit");
                    // Every weight crossed once, packed (the biases too, as f32).
                    assert_eq!(crossed, packed, "{preset} {mode:?}: bytes");
                }
                OffloadMode::Prefetch { .. } => {
                    assert_eq!(out, expected, "{preset} {mode:?}: bit for bit");
                    // The same, but the embedding gathers its 6 rows in place (as in uva).
                    assert!(crossed < packed, "{preset} {mode:?}: {crossed} vs {packed}");
                }
                _ => {
                    assert!(close(&out, &expected), "{preset} {mode:?}");
                    // In place: the embedding reads only its 6 rows; the rest whole.
                    assert!(crossed < packed, "{preset} {mode:?}: {crossed} vs {packed}");
                }
            }
        }
    }
}

#[test]
fn burns_quantizer_after_the_policy_keeps_weights_offloaded() {
    let scheme = QuantPreset::Q4.scheme();
    let (model, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Copy)
        .apply(seeded(5))
        .unwrap();
    let mut quantizer = Quantizer {
        calibration: Calibration::MinMax,
        scheme,
    };
    let model = model.quantize_weights(&mut quantizer);
    // Every parameter is still in host memory, the matrices now packed.
    assert!(common::placements(&model).iter().all(|(_, host)| *host));
    for (path, dtype, _) in dtypes_and_bytes(&model) {
        // Burn's Quantizer quantizes every parameter, biases too.
        assert_eq!(dtype, "q4s/b32/f16", "{path}");
    }
    let (_, crossed) = run(&model);
    let packed: u64 = dtypes_and_bytes(&model)
        .iter()
        .map(|(_, _, b)| *b as u64)
        .sum();
    assert_eq!(
        crossed, packed,
        "a forward copies the packed bytes, no float copy"
    );
    // The parameters' marks went to the quantized buffers: nothing is reported lost.
    assert!(report.context().unwrap().lost_placements().is_empty());
}

#[test]
fn quantizing_before_the_policy_places_the_quantized_weights() {
    let scheme = q8_native();
    let mut quantizer = Quantizer {
        calibration: Calibration::MinMax,
        scheme,
    };
    let model = seeded(9).quantize_weights(&mut quantizer);
    assert!(common::placements(&model).iter().all(|(_, host)| !host));
    let (expected, _) = run(&model);
    let (model, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Copy)
        .apply(model)
        .unwrap();
    assert!(common::placements(&model).iter().all(|(_, host)| *host));
    let row = report
        .params
        .iter()
        .find(|r| r.path == "up.weight")
        .unwrap();
    assert_eq!(row.dtype, "q8s/b32/f32/native");
    assert_eq!(
        row.bytes,
        tensor_bytes(&[D, FF], burn::tensor::DType::QFloat(scheme))
    );
    assert_eq!(run(&model).0, expected);
    // And back into device memory, bit for bit.
    let model = burn_offload::to_device_memory(model);
    assert!(common::placements(&model).iter().all(|(_, host)| !host));
    assert_eq!(run(&model).0, expected);
}

#[test]
fn a_float_checkpoint_is_quantized_as_it_loads_without_the_float_model_in_host_memory() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("float.safetensors");
    let source = seeded(11);
    source
        .save_into(&mut SafetensorsStore::from_file(&path))
        .unwrap();
    let float_bytes: usize = dtypes_and_bytes(&source).iter().map(|(_, _, b)| b).sum();
    for preset in [QuantPreset::Q8, QuantPreset::Q4] {
        let policy = OffloadPolicy::from_bytes(u64::MAX)
            .mode(OffloadMode::Copy)
            .quantize(Quantization::preset(preset));
        let (mut model, report) = policy.apply(seeded(99)).unwrap();
        let before = burn_offload::host_memory_stats().live_bytes;
        burn_offload::reset_host_memory_peak();
        model
            .load_from(&mut SafetensorsStore::from_file(&path))
            .unwrap();
        let after = burn_offload::host_memory_stats();
        let quantized: usize = report.params.iter().map(|p| p.bytes as usize).sum();
        // Created once each, straight into host memory: the peak is the quantized model plus
        // at most one tensor's transient copy, never the float model.
        let largest = FF * VOCAB.max(D) * 4;
        assert_eq!(after.live_bytes - before, quantized, "{preset}");
        assert!(
            after.peak_bytes - before <= quantized + largest,
            "{preset}: peak {after:?}"
        );
        assert!(after.peak_bytes - before < float_bytes, "{preset}");
        // The loaded weights are the checkpoint's, quantized: the same as quantizing the
        // source model.
        let (expected_model, _) = policy
            .apply(burn_offload::to_device_memory(source.clone()))
            .unwrap();
        assert_eq!(run(&model).0, run(&expected_model).0, "{preset}");
        assert!(common::placements(&model).iter().all(|(_, host)| *host));
    }
}

#[test]
fn a_quantized_burnpack_loads_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("q4.bpk");
    let policy = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Copy)
        .quantize(Quantization::preset(QuantPreset::Q4));
    let (model, _) = policy.apply(seeded(13)).unwrap();
    let expected = run(&model).0;
    model
        .save_into(&mut BurnpackStore::from_file(&file))
        .unwrap();
    let saved = dtypes_and_bytes(&model);
    // Into a fresh, lazily placed model of the same policy: packed bytes as saved, offloaded.
    let (mut loaded, _) = policy.apply(seeded(77)).unwrap();
    loaded
        .load_from(&mut BurnpackStore::from_file(&file))
        .unwrap();
    assert_eq!(dtypes_and_bytes(&loaded), saved);
    assert!(common::placements(&loaded).iter().all(|(_, host)| *host));
    assert_eq!(run(&loaded).0, expected);
}

#[test]
fn frozen_quantized_weights_with_a_trainable_float_adapter() {
    use burn::backend::Autodiff;
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};
    type A = Autodiff<B>;

    let device = common::device();
    let policy = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Uva)
        .quantize(Quantization::preset(QuantPreset::Q4));
    // LoRA-style: the frozen base, quantized and offloaded, on the inner backend (Burn 0.21's
    // autodiff has no quantized ops); the adapter trains on Autodiff.
    let base: Linear<B> = LinearConfig::new(D, D).with_bias(false).init(&device);
    let (base, _) = policy.apply(base).unwrap();
    let mut adapter: Linear<A> = LinearConfig::new(D, D).with_bias(false).init(&device);
    let x = Tensor::<A, 2>::from_data(common::data(&[4, D], 1), &device);
    let before = adapter.weight.val().into_data();
    let mut optim = AdamConfig::new().init();
    for _ in 0..2 {
        reset_op_stats();
        let frozen = Tensor::<A, 2>::from_inner(base.forward(x.clone().inner()));
        assert_eq!(
            op_stats().zero_copy_ops,
            1,
            "the base weight is read in place, packed"
        );
        let loss = (frozen + adapter.forward(x.clone())).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &adapter);
        adapter = optim.step(1e-2, adapter, grads);
    }
    assert_ne!(
        adapter.weight.val().into_data(),
        before,
        "the adapter trained"
    );
    assert!(
        common::on_host(&base.weight.val()),
        "the base stays offloaded"
    );
    let dtype = base.weight.val().dtype();
    assert!(
        matches!(dtype, burn::tensor::DType::QFloat(_)),
        "and quantized: {dtype:?}"
    );
    // On Autodiff itself a policy refuses to quantize, saying what to do instead.
    let on_autodiff: Linear<A> = LinearConfig::new(D, D).init(&device);
    let err = policy.apply(on_autodiff).unwrap_err().to_string();
    assert!(
        err.contains("Autodiff") && err.contains("from_inner"),
        "{err}"
    );
}

#[test]
fn what_a_target_cannot_do_is_an_error_that_says_what_to_use() {
    // A quantized tensor left in burn-ndarray's memory, in a scheme it cannot hold.
    let err = OffloadPolicy::from_bytes(0)
        .quantize(Quantization::preset(QuantPreset::Q4))
        .apply(seeded(1))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, OffloadError::UnsupportedQuantization { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("q4s/b32/f16") && msg.contains("from_bytes("),
        "{msg}"
    );
    // A scheme the CPU target cannot read at all (fp8 values).
    let fp8 = QuantScheme::default()
        .with_value(QuantValue::E4M3)
        .with_store(QuantStore::Native);
    let err = OffloadPolicy::from_bytes(u64::MAX)
        .quantize(Quantization::new(fp8))
        .apply(seeded(1))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("e4m3") && msg.contains("QuantPreset::Q8"),
        "{msg}"
    );
    // Quantizing a tensor that must stay float, named explicitly.
    let err = OffloadPolicy::from_bytes(u64::MAX)
        .quantize(Quantization::preset(QuantPreset::Q8).params(["up"]))
        .apply(seeded(1))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, OffloadError::CannotQuantize { .. }), "{msg}");
    assert!(msg.contains("`up.bias`") && msg.contains("rank 1"), "{msg}");
    // A preset name that does not exist.
    let err = "q3".parse::<QuantPreset>().unwrap_err().to_string();
    assert!(err.contains("`q8`") && err.contains("`q4`"), "{err}");
}
