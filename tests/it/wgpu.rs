//! The CubeCL target on wgpu (lavapipe, Vulkan on the CPU, in CI): every op family through
//! `OffloadBackend<Wgpu>` (Burn's fused default) and `OffloadBackend<CubeBackend<WgpuRuntime,
//! …>>` (unfused) equals NdArray within tolerance in copy, auto and prefetch modes; uva falls
//! back to copies and the report says so; prefetched runs, from one thread or two, are
//! bit-identical to copy runs on the same backend; an upload leaves a matmul and its epilogue
//! fused; loading a safetensors file creates offloaded parameters in host memory only;
//! training follows NdArray and reuses the host buffers; nothing leaks after a model drops.
//! Skips, saying why, where there is no Vulkan driver.

use crate::common;

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayDevice;
use burn::tensor::activation::{gelu, log_softmax, relu, sigmoid, silu, softmax};
use burn::tensor::module::{conv1d, conv2d, embedding, linear};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor, TensorData, Tolerance, s};
use burn_cubecl::CubeBackend;
use burn_offload::inner::OffloadTarget;
use burn_offload::{
    OffloadBackend, OffloadContext, OffloadDevice, OffloadMode, OffloadPolicy, OpStats,
    host_memory_stats, op_stats, reset_op_stats,
};
use common::{Dev, data};
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

/// `burn::backend::Wgpu` as Burn defines it with its default `fusion` feature.
pub(crate) type Fused = burn_wgpu::Wgpu<f32, i32>;
/// The same without fusion.
pub(crate) type Unfused = CubeBackend<WgpuRuntime, f32, i32, u32>;
pub(crate) type Ref = NdArray<f32>;

const MODES: [OffloadMode; 3] = [
    OffloadMode::Copy,
    OffloadMode::Auto,
    OffloadMode::prefetch(1 << 20),
];

/// Runs this module's tests one at a time (lavapipe runs one queue anyway).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `None` where there is no Vulkan driver (the test then returns, printing why); else the lock
/// that runs this module's tests one at a time.
pub(crate) fn start() -> Option<std::sync::MutexGuard<'static, ()>> {
    match burn_offload::wgpu::probe() {
        Ok(()) => Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner())),
        Err(reason) => {
            eprintln!("skipped: {reason}");
            None
        }
    }
}

pub(crate) fn wgpu() -> WgpuDevice {
    WgpuDevice::default()
}

/// Values from {-1, -0.5, 0, 0.5, 1}, shifted off the rounding ties.
fn coarse(shape: &[usize], seed: u64) -> TensorData {
    let values = data(shape, seed).to_vec::<f32>().unwrap();
    let values: Vec<f32> = values
        .iter()
        .map(|v| (v * 1.25).round() / 2.0 + 0.1)
        .collect();
    TensorData::new(values, shape.to_vec())
}

/// `data` as a float tensor of `OffloadBackend<Inner>`, offloaded or resident.
fn place<Inner: OffloadTarget<Device = WgpuDevice>, const N: usize>(
    data: &TensorData,
    offloaded: bool,
) -> Tensor<OffloadBackend<Inner>, N> {
    let device = if offloaded {
        OffloadDevice::host(wgpu())
    } else {
        OffloadDevice::device(wgpu())
    };
    let tensor = Tensor::<OffloadBackend<Inner>, N>::from_data(data.clone(), &device);
    assert_eq!(common::on_host(&tensor), offloaded);
    tensor
}

/// How a run's result must come out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Computed on the device: offloaded inputs copied, nothing read in place.
    Device,
    /// A metadata op on the first input: an offloaded view, nothing copied.
    View,
}

struct Case<'a> {
    backend: &'a str,
    op: &'a str,
    mode: OffloadMode,
    rule: Rule,
    placement: &'a [bool],
}

fn check(case: &Case, on_host: bool, stats: OpStats, got: &TensorData, expected: &TensorData) {
    let p = case.placement;
    let ctx = format!(
        "{}: `{}` in {} mode, offloaded inputs {p:?}",
        case.backend, case.op, case.mode
    );
    assert_eq!(stats.zero_copy_ops, 0, "{ctx}: wgpu reads nothing in place");
    let host_out = case.rule == Rule::View && p[0];
    assert_eq!(on_host, host_out, "{ctx}: is the result offloaded?");
    let uploads = !host_out && p.iter().any(|&o| o);
    assert_eq!(
        stats.transient_uploads > 0,
        uploads,
        "{ctx}: transient copies? {stats:?}"
    );
    assert_eq!(got.shape, expected.shape, "{ctx}: shape");
    match expected.dtype {
        DType::F32 => {
            got.assert_approx_eq::<f32>(expected, Tolerance::rel_abs(1e-4, 1e-5));
        }
        DType::Bool(_) => assert_eq!(
            got.iter::<u8>().collect::<Vec<_>>(),
            expected.iter::<u8>().collect::<Vec<_>>(),
            "{ctx}"
        ),
        _ => assert_eq!(
            got.clone().convert::<i64>().to_vec::<i64>().unwrap(),
            expected.clone().convert::<i64>().to_vec::<i64>().unwrap(),
            "{ctx}"
        ),
    }
}

/// `equiv!(RULE, [x: RANK = data, ...], |dev| { body, ... })` runs each body on NdArray and
/// on both wgpu backends, decorated, in every mode of [`MODES`] and with every
/// resident/offloaded combination of the float inputs, and [`check`]s each run.
macro_rules! equiv {
    (@backend $name:literal, $inner:ty, $rule:expr, $expected:expr, [$($x:ident : $n:literal),+], |$dev:ident| $body:expr) => {{
        let count = [$(stringify!($x)),+].len();
        for mode in MODES {
            OffloadContext::with_mode(mode).run(|| {
                for mask in 0..1usize << count {
                    let placement: Vec<bool> = (0..count).map(|i| (mask >> i) & 1 == 1).collect();
                    let mut next = placement.iter().copied();
                    let $dev = &Dev::<OffloadBackend<$inner>>(OffloadDevice::device(wgpu()));
                    let _ = $dev;
                    $(let $x = place::<$inner, $n>(&$x, next.next().unwrap());)+
                    reset_op_stats();
                    let out = $body;
                    let stats = op_stats();
                    let case = Case {
                        backend: $name,
                        op: stringify!($body),
                        mode,
                        rule: $rule,
                        placement: &placement,
                    };
                    check(&case, common::on_host(&out), stats, &out.into_data(), &$expected);
                }
            });
        }
    }};
    (@one $rule:expr, [$($x:ident : $n:literal = $data:expr),+ $(,)?], |$dev:ident| $body:expr) => {{
        $(let $x: TensorData = $data;)+
        #[allow(unused_variables)]
        let expected = {
            let $dev = &Dev::<Ref>(NdArrayDevice::Cpu);
            let _ = $dev;
            $(let $x = Tensor::<Ref, $n>::from_data($x.clone(), &NdArrayDevice::Cpu);)+
            $body.into_data()
        };
        equiv!(@backend "OffloadBackend<Wgpu>", Fused, $rule, expected, [$($x : $n),+], |$dev| $body);
        equiv!(@backend "OffloadBackend<CubeBackend<WgpuRuntime>>", Unfused, $rule, expected, [$($x : $n),+], |$dev| $body);
    }};
    ($rule:expr, $inputs:tt, |$dev:ident| { $($body:expr),+ $(,)? }) => {
        $(equiv!(@one $rule, $inputs, |$dev| $body);)+
    };
}

#[test]
fn elementwise_and_activations() {
    let Some(_serial) = start() else {
        return;
    };
    equiv!(Rule::Device, [x: 2 = data(&[3, 5], 1)], |dev| {
        x.exp(),
        (x.abs() + 0.1).log(),
        x.abs().sqrt(),
        x.abs().powf_scalar(1.7),
        x.clamp(-0.5, 0.75),
        x.recip(),
        x.tanh(),
        x.sin(),
        x * 2.0 + 1.0,
        relu(x),
        gelu(x),
        silu(x),
        sigmoid(x),
        softmax(x, 1),
        log_softmax(x, 0),
    });
    equiv!(Rule::Device, [x: 2 = coarse(&[4, 5], 2)], |dev| {
        x.round(),
        x.floor(),
        x.sign(),
    });
    equiv!(Rule::Device, [a: 2 = data(&[3, 5], 3), b: 2 = data(&[1, 5], 4)], |dev| {
        a + b,
        a * b,
        a / (b.abs() + 0.5),
        a.max_pair(b),
        (a.clone() * b).sub(a),
    });
}

#[test]
fn reductions_comparisons_and_casts() {
    let Some(_serial) = start() else {
        return;
    };
    equiv!(Rule::Device, [x: 2 = data(&[4, 6], 7)], |dev| {
        x.sum(),
        x.mean_dim(1),
        x.max_dim(1),
        x.argmax(1),
        x.cumsum(1),
        x.var(1),
        x.transpose().sum_dim(1),
        x.greater_elem(0.25),
        x.int(),
        x.sort(1),
        x.argsort(0),
        x.topk(2, 1),
        x.cumprod(0),
        x.powi_scalar(3),
    });
    // No empty tensors here: plain `burn::backend::Wgpu` itself panics on `exp` of a [0, 4]
    // tensor in a debug build (burn-cubecl 0.21 `tensor/base.rs:362`, "attempt to subtract
    // with overflow"); the CPU suite covers them.
    equiv!(Rule::Device, [a: 2 = data(&[3, 4], 8), b: 2 = data(&[3, 4], 9)], |dev| {
        a.greater(b),
        a.lower_equal(b),
        a.mask_where(dev.bool([[true, false, true, false]; 3]), b),
    });
}

#[test]
fn matmul_linear_embedding_and_conv() {
    let Some(_serial) = start() else {
        return;
    };
    for m in [1, 7, 33] {
        equiv!(Rule::Device, [x: 2 = data(&[m, 24], 10), w: 2 = data(&[24, 10], 11)], |dev| {
            x.matmul(w),
        });
    }
    equiv!(Rule::Device, [x: 2 = data(&[3, 16], 12), w: 2 = data(&[12, 16], 13)], |dev| {
        x.matmul(w.transpose()),
        x.matmul(w.slice(s![..;2, ..]).transpose()),
    });
    equiv!(Rule::Device, [x: 3 = data(&[2, 3, 8], 14), w: 2 = data(&[8, 5], 15), b: 1 = data(&[5], 16)], |dev| {
        linear(x, w, Some(b)),
    });
    equiv!(Rule::Device, [w: 2 = data(&[10, 4], 17)], |dev| {
        embedding(w, dev.int([[1, 3, 9], [0, 0, 5]])),
        embedding(w.transpose(), dev.int([[2, 1], [3, 0]])),
    });
    equiv!(Rule::Device, [x: 3 = data(&[2, 3, 9], 18), w: 3 = data(&[4, 3, 3], 19), b: 1 = data(&[4], 20)], |dev| {
        conv1d(x, w, Some(b), ConvOptions::new([2], [1], [1], 1)),
    });
    equiv!(Rule::Device, [x: 4 = data(&[1, 2, 5, 6], 21), w: 4 = data(&[3, 2, 3, 3], 22)], |dev| {
        conv2d(x, w, None, ConvOptions::new([1, 2], [1, 1], [1, 1], 1)),
    });
}

#[test]
fn cat_indexing_and_views() {
    let Some(_serial) = start() else {
        return;
    };
    equiv!(Rule::Device, [a: 2 = data(&[2, 3], 23), b: 2 = data(&[2, 3], 27)], |dev| {
        Tensor::stack::<3>(vec![a, b], 1),
    });
    equiv!(Rule::Device, [a: 2 = data(&[2, 3], 23), b: 2 = data(&[4, 3], 24)], |dev| {
        Tensor::cat(vec![a, b], 0),
        b.slice_assign([1..3, 0..3], a),
    });
    equiv!(Rule::Device, [b: 2 = data(&[4, 3], 24)], |dev| {
        b.select(0, dev.int([1, 0, 1])),
        b.gather(1, dev.int([[0, 2], [1, 1], [2, 0], [0, 0]])),
    });
    equiv!(Rule::View, [x: 3 = data(&[2, 3, 4], 25)], |dev| {
        x.reshape([6, 4]),
        x.swap_dims(0, 2),
        x.permute([2, 0, 1]),
        x.slice(s![.., ..;2, 1..]),
        x.flip([0, 2]),
        x.narrow(2, 1, 2),
        x.unsqueeze::<4>(),
    });
    equiv!(Rule::View, [x: 3 = data(&[2, 1, 4], 26)], |dev| {
        x.expand([3, 2, 5, 4]),
    });
}

/// Two tests that run `check::<Bk>(name)`, one on each wgpu backend; with `own_process`, each
/// in a process of its own (the parent holds the module's lock while it runs).
macro_rules! on_both {
    ($fused:ident, $unfused:ident, $check:ident $(, $own:ident)?) => {
        #[test]
        fn $fused() {
            let Some(_serial) = start() else {
                return;
            };
            $(common::$own!(common::process::COUNTS_HOST_MEMORY);)?
            $check::<Fused>("OffloadBackend<Wgpu>");
        }

        #[test]
        fn $unfused() {
            let Some(_serial) = start() else {
                return;
            };
            $(common::$own!(common::process::COUNTS_HOST_MEMORY);)?
            $check::<Unfused>("OffloadBackend<CubeBackend<WgpuRuntime>>");
        }
    };
}

/// The test model of the CPU tests, on a wgpu backend.
pub(crate) type Net<Bk> = common::Net<OffloadBackend<Bk>>;

/// The CPU reference's weights and outputs for [`inputs`].
pub(crate) fn reference() -> (Vec<(String, TensorData)>, Vec<TensorData>) {
    let net = common::Net::<Ref>::new(&NdArrayDevice::Cpu);
    let weights = common::values(&net);
    let outputs = inputs()
        .into_iter()
        .map(|x| {
            net.forward(Tensor::<Ref, 3>::from_data(x, &NdArrayDevice::Cpu))
                .into_data()
        })
        .collect();
    (weights, outputs)
}

/// Prefill-like and decode-like inputs `[2, seq, D_MODEL]`.
pub(crate) fn inputs() -> Vec<TensorData> {
    [3, 1, 3, 1, 1]
        .iter()
        .enumerate()
        .map(|(i, &seq)| data(&[2, seq, common::D_MODEL], 100 + i as u64))
        .collect()
}

/// A `Net` on `OffloadBackend<Bk>` with `weights` loaded, every parameter offloaded in `mode`.
pub(crate) fn offloaded_net<Bk: OffloadTarget<Device = WgpuDevice>>(
    weights: &[(String, TensorData)],
    mode: OffloadMode,
) -> (Net<Bk>, burn_offload::OffloadReport) {
    let device = OffloadDevice::device(wgpu());
    let net = common::load_values(Net::<Bk>::new(&device), weights, &device);
    OffloadPolicy::from_bytes(u64::MAX)
        .mode(mode)
        .apply(net)
        .unwrap()
}

pub(crate) fn forwards<Bk: OffloadTarget<Device = WgpuDevice>>(net: &Net<Bk>) -> Vec<TensorData> {
    let device = OffloadDevice::device(wgpu());
    inputs()
        .into_iter()
        .map(|x| {
            net.forward(Tensor::<_, 3>::from_data(x, &device))
                .into_data()
        })
        .collect()
}

/// Every mode on one backend: equal to NdArray; prefetch bit-identical to copy, with its
/// copies used; uva copies and says so.
fn model_in_every_mode<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    let (weights, expected) = reference();
    let mut copy_outputs = None;
    for mode in [
        OffloadMode::Copy,
        OffloadMode::Uva,
        OffloadMode::Auto,
        OffloadMode::prefetch(1 << 20),
    ] {
        let (net, report) = offloaded_net::<Bk>(&weights, mode);
        assert_eq!(report.offloaded_tensors(), 14, "{name} {mode}");
        let uva_warning = report
            .warnings
            .iter()
            .any(|w| w.contains("cannot read host memory in place"));
        assert_eq!(
            uva_warning,
            mode == OffloadMode::Uva,
            "{name} {mode}: the report says when uva falls back to copies: {:?}",
            report.warnings
        );
        reset_op_stats();
        let got = forwards(&net);
        assert_eq!(op_stats().zero_copy_ops, 0, "{name} {mode}");
        for (g, e) in got.iter().zip(&expected) {
            g.assert_approx_eq::<f32>(e, Tolerance::rel_abs(1e-4, 1e-5));
        }
        match mode {
            OffloadMode::Copy => copy_outputs = Some(got),
            OffloadMode::Prefetch { .. } => {
                let stats = report.prefetch_stats();
                assert!(stats.hits > 0, "{name}: prefetched copies used: {stats:?}");
                for (p, c) in got.iter().zip(copy_outputs.as_ref().unwrap()) {
                    assert_eq!(
                        p.as_bytes(),
                        c.as_bytes(),
                        "{name}: prefetch = copy, bitwise"
                    );
                }
            }
            _ => {}
        }
    }
}

on_both!(
    model_in_every_mode_fused,
    model_in_every_mode_unfused,
    model_in_every_mode
);

/// After a model in prefetch mode (with its prefetch thread, or its copy engine's filler and
/// ring) drops, its host memory is freed and the device memory of its copies given back.
fn no_leaks<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    let (weights, _) = reference();
    // Warm up (kernels compiled, pools grown), then measure around a second model.
    let (net, _) = offloaded_net::<Bk>(&weights, OffloadMode::Copy);
    drop(forwards(&net));
    drop(net);
    Bk::sync(&wgpu()).unwrap();
    let host_before = host_memory_stats().live_bytes;
    let device_before = Bk::device_bytes_in_use(&wgpu()).unwrap();
    // The engine's ring of 2 KiB wraps every forward: the model drops while its filler
    // copies the next forward's groups.
    for mode in [
        OffloadMode::Copy,
        OffloadMode::prefetch(1 << 20),
        OffloadMode::prefetch_engine(2048),
    ] {
        let (net, report) = offloaded_net::<Bk>(&weights, mode);
        assert!(host_memory_stats().live_bytes >= host_before + report.offloaded_bytes() as usize);
        drop(forwards(&net));
        drop(net);
        drop(report);
        Bk::sync(&wgpu()).unwrap();
        // The prefetch thread lets go of its copies (and their sources) once it sees the
        // model gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while host_memory_stats().live_bytes > host_before && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            host_memory_stats().live_bytes,
            host_before,
            "{name} {mode}: host memory freed"
        );
        // The engine's ring goes with its filler thread, which ends once it sees the model gone.
        while Bk::device_bytes_in_use(&wgpu()).unwrap() > device_before
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            Bk::device_bytes_in_use(&wgpu()).unwrap() <= device_before,
            "{name} {mode}: device memory of this thread's pool given back"
        );
    }
}

on_both!(
    no_leaks_after_a_model_drops_fused,
    no_leaks_after_a_model_drops_unfused,
    no_leaks,
    own_process
);

/// The fused blocks that ran (fuser name, operations) and whether one has a matmul.
#[cfg(feature = "fusion-inspect")]
fn fused_blocks(
    reports: &[burn_fusion::inspect::FusionReport],
) -> Vec<(&'static str, Vec<burn_ir::OperationIr>)> {
    use burn_fusion::inspect::BlockKind;
    reports
        .iter()
        .flat_map(|r| r.blocks.iter())
        .filter_map(|b| match b.kind {
            BlockKind::Fused { name, .. } => Some((name, b.operations.clone())),
            BlockKind::Unfused => None,
        })
        .collect()
}

/// An offloaded weight uploaded right before a matmul (what `linear` does) leaves the matmul
/// and its elementwise epilogue fused in one kernel, as with a resident weight.
#[cfg(feature = "fusion-inspect")]
#[test]
fn an_upload_before_a_matmul_keeps_the_matmul_and_its_epilogue_fused() {
    use burn_fusion::inspect::FusionInspector;
    use burn_fusion::stream::StreamId;
    use burn_ir::{FloatOperationIr, OperationIr};
    let Some(_serial) = start() else {
        return;
    };
    let is_matmul =
        |op: &OperationIr| matches!(op, OperationIr::Float(_, FloatOperationIr::Matmul(_)));
    let run = |offloaded: bool| {
        let inspector = FusionInspector::install(StreamId::current());
        let out = OffloadContext::with_mode(OffloadMode::Copy).run(|| {
            let x = place::<Fused, 2>(&data(&[4, 16], 1), false);
            let w = place::<Fused, 2>(&data(&[16, 8], 2), offloaded);
            let b = place::<Fused, 2>(&data(&[1, 8], 3), false);
            reset_op_stats();
            let out = relu(x.matmul(w) + b) * 2.0;
            assert_eq!(op_stats().transient_uploads > 0, offloaded);
            out.into_data()
        });
        let blocks = fused_blocks(&inspector.drain());
        let with_matmul: Vec<_> = blocks
            .iter()
            .filter(|(_, ops)| ops.iter().any(is_matmul))
            .map(|(name, ops)| (*name, ops.len()))
            .collect();
        (out, with_matmul, blocks)
    };
    let (resident, resident_blocks, all_resident) = run(false);
    let (offloaded, offloaded_blocks, all_offloaded) = run(true);
    eprintln!("matmul blocks: {offloaded_blocks:?}");
    assert_eq!(resident.as_bytes(), offloaded.as_bytes());
    assert_eq!(
        resident_blocks.len(),
        1,
        "one fused block holds the matmul: {all_resident:?}"
    );
    assert!(
        resident_blocks[0].1 >= 4,
        "the epilogue (add, relu, mul) is fused into the matmul's block: {all_resident:?}"
    );
    assert_eq!(
        offloaded_blocks, resident_blocks,
        "the same fused matmul block with the weight uploaded: {all_offloaded:?}"
    );
}

/// Adam steps on `Autodiff<OffloadBackend<Bk>>` with every parameter offloaded: the losses and
/// weights follow `Autodiff<NdArray>` step for step, the parameters stay offloaded, and after
/// the first step `OffloadOptimizer` writes each update into the host buffer it had (no new
/// host allocation).
fn training<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    use burn::backend::Autodiff;
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};
    use burn_offload::OffloadOptimizer;
    type AdRef = Autodiff<Ref>;
    let (weights, _) = reference();
    let (x, y) = (
        data(&[4, common::D_MODEL], 200),
        data(&[4, common::D_OUT], 201),
    );
    let steps = 4;

    let mut reference_model = common::load_values(
        common::Net::<AdRef>::new(&NdArrayDevice::Cpu),
        &weights,
        &NdArrayDevice::Cpu,
    );
    let mut optim = AdamConfig::new().init();
    let mut reference_losses = Vec::new();
    for _ in 0..steps {
        let xr = Tensor::<AdRef, 2>::from_data(x.clone(), &NdArrayDevice::Cpu);
        let yr = Tensor::<AdRef, 2>::from_data(y.clone(), &NdArrayDevice::Cpu);
        let loss = (reference_model.forward(xr) - yr).powi_scalar(2).mean();
        reference_losses.push(loss.clone().into_data().iter::<f32>().next().unwrap());
        let grads = GradientsParams::from_grads(loss.backward(), &reference_model);
        reference_model = optim.step(1e-2, reference_model, grads);
    }

    type Ad<Bk> = Autodiff<OffloadBackend<Bk>>;
    let device = OffloadDevice::device(wgpu());
    let model = common::load_values(common::Net::<Ad<Bk>>::new(&device), &weights, &device);
    let (mut model, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Copy)
        .apply(model)
        .unwrap();
    assert_eq!(report.offloaded_tensors(), 14);
    let mut optim = OffloadOptimizer::new(AdamConfig::new().init(), &report);
    let mut allocations = None;
    for (step, expected) in reference_losses.iter().enumerate() {
        let xs = Tensor::<Ad<Bk>, 2>::from_data(x.clone(), &device);
        let ys = Tensor::<Ad<Bk>, 2>::from_data(y.clone(), &device);
        let loss = (model.forward(xs) - ys).powi_scalar(2).mean();
        let got = loss.clone().into_data().iter::<f32>().next().unwrap();
        assert!(
            (got - expected).abs() <= 1e-4 * expected.abs().max(1.0),
            "{name}: loss {got} at step {step}, NdArray {expected}"
        );
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
        assert!(
            common::placements(&model).iter().all(|(_, host)| *host),
            "{name}: still offloaded after step {step}"
        );
        let now = host_memory_stats().total_allocations;
        assert_eq!(
            *allocations.get_or_insert(now),
            now,
            "{name}: host allocations after step {step}"
        );
    }
    for ((_, got), (_, want)) in common::values(&model)
        .iter()
        .zip(&common::values(&reference_model))
    {
        got.assert_approx_eq::<f32>(want, Tolerance::rel_abs(1e-3, 1e-5));
    }
}

on_both!(
    training_follows_ndarray_and_reuses_host_buffers_fused,
    training_follows_ndarray_and_reuses_host_buffers_unfused,
    training,
    own_process
);

/// Two op threads read one prefetch-mode model at once (each its own CubeCL stream and, fused,
/// its own fusion stream; one prefetch thread copying for both): every output is bit-identical
/// to the copy-mode run's.
fn prefetch_from_two_threads<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    let (weights, _) = reference();
    let (copy_net, _) = offloaded_net::<Bk>(&weights, OffloadMode::Copy);
    let expected = forwards(&copy_net);
    drop(copy_net);
    let (net, report) = offloaded_net::<Bk>(&weights, OffloadMode::prefetch(1 << 20));
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let net = net.clone();
                scope.spawn(move || (0..3).map(|_| forwards(&net)).collect::<Vec<_>>())
            })
            .collect();
        for thread in threads {
            for run in thread.join().unwrap() {
                for (got, want) in run.iter().zip(&expected) {
                    assert_eq!(
                        got.as_bytes(),
                        want.as_bytes(),
                        "{name}: prefetch from two threads"
                    );
                }
            }
        }
    });
    let stats = report.prefetch_stats();
    assert!(stats.hits > 0, "{name}: {stats:?}");
}

on_both!(
    prefetch_from_two_threads_is_bit_identical_to_copy_fused,
    prefetch_from_two_threads_is_bit_identical_to_copy_unfused,
    prefetch_from_two_threads
);

/// burn-store loads a safetensors file into a lazy model with a policy applied: the offloaded
/// parameters are created once, directly in host memory, the others on the device, nothing
/// is copied, and the model computes what NdArray does.
fn safetensors_loading<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    use burn_store::{ModuleSnapshot, SafetensorsStore};
    let reference_model = common::Net::<Ref>::new(&NdArrayDevice::Cpu);
    let weights = common::values(&reference_model);
    let mut store = SafetensorsStore::from_bytes(None);
    reference_model.save_into(&mut store).unwrap();
    let bytes = store.get_bytes().unwrap();

    let device = OffloadDevice::device(wgpu());
    let (mut model, report) = OffloadPolicy::from_bytes(u64::MAX)
        .params(["mlp"])
        .apply(Net::<Bk>::new(&device))
        .unwrap();
    assert!(
        common::init_states(&model).iter().all(|(_, init)| !init),
        "{name}: applying initialised nothing"
    );
    let before = host_memory_stats();
    reset_op_stats();
    model
        .load_from(&mut SafetensorsStore::from_bytes(Some(bytes)))
        .unwrap();
    let stats = op_stats();
    assert_eq!(
        stats.host_created_bytes,
        report.offloaded_bytes(),
        "{name}: {stats:?}"
    );
    assert_eq!(
        stats.device_created_bytes,
        report.total_bytes() - report.offloaded_bytes(),
        "{name}: {stats:?}"
    );
    assert_eq!(stats.transient_uploads, 0, "{name}: {stats:?}");
    assert_eq!(
        host_memory_stats().live_bytes - before.live_bytes,
        report.offloaded_bytes() as usize,
        "{name}"
    );
    for (path, host) in common::placements(&model) {
        assert_eq!(host, report.is_offloaded(&path), "{name}: {path}");
    }
    common::assert_same_values(&common::values(&model), &weights);
    let x = data(&[2, 3, common::D_MODEL], 300);
    let expected = reference_model
        .forward(Tensor::<Ref, 3>::from_data(x.clone(), &NdArrayDevice::Cpu))
        .into_data();
    model
        .forward(Tensor::<OffloadBackend<Bk>, 3>::from_data(x, &device))
        .into_data()
        .assert_approx_eq::<f32>(&expected, Tolerance::rel_abs(1e-4, 1e-5));
}

on_both!(
    safetensors_loads_offloaded_params_into_host_memory_fused,
    safetensors_loads_offloaded_params_into_host_memory_unfused,
    safetensors_loading,
    own_process
);

/// Why the seeded tests run in a process of their own.
const SEEDED: &str = "CubeCL's random generator is the process's: a seeded draw must not \
                      interleave with other tests' draws";

/// Same seed, same weights: a lazily initialised model whose parameters a policy offloads has
/// bit for bit the weights of the wrapped backend alone (its generator draws them on the
/// device, then they are copied out), in every mode.
fn same_seed_same_weights<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    const SEED: u64 = 7;
    Bk::seed(&wgpu(), SEED);
    let plain = common::values(&common::Net::<Bk>::new(&wgpu()));
    let device = OffloadDevice::Device(wgpu());
    for mode in common::MODES {
        <OffloadBackend<Bk> as burn::tensor::backend::Backend>::seed(&device, SEED);
        let (net, report) = OffloadPolicy::from_bytes(common::NET_BYTES / 2)
            .mode(mode)
            .apply(Net::<Bk>::new(&device))
            .unwrap();
        assert!(report.offloaded_tensors() > 0, "{name} {mode}");
        assert_eq!(common::values(&net), plain, "{name} {mode}");
    }
}

#[test]
fn same_seed_same_weights_fused() {
    let Some(_serial) = start() else {
        return;
    };
    common::own_process!(SEEDED);
    same_seed_same_weights::<Fused>("OffloadBackend<Wgpu>");
}

#[test]
fn same_seed_same_weights_unfused() {
    let Some(_serial) = start() else {
        return;
    };
    common::own_process!(SEEDED);
    same_seed_same_weights::<Unfused>("OffloadBackend<CubeBackend<WgpuRuntime>>");
}

/// Quantized weights on wgpu, Burn's own quantization kernels: a model quantized by a policy
/// into q8 and q4 (blocks of 32, f16 scales) gives bit for bit the resident quantized model's
/// logits whatever the mode (wgpu reads nothing in place, so every mode copies the packed
/// bytes, which the device dequantizes); the report's dtype and placement columns are the
/// truth; only packed bytes cross.
fn quantized_in_every_mode<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    use burn_offload::Quantization;
    use burn_offload::quant::QuantPreset;
    let device = OffloadDevice::Device(wgpu());
    let ids = || {
        Tensor::<OffloadBackend<Bk>, 2, burn::tensor::Int>::from_data(
            TensorData::new(vec![3i64, 17, 42, 63, 0, 8], [2, 3]),
            &device,
        )
    };
    let seeded = || crate::quant::fixed::<OffloadBackend<Bk>>(&device);
    for preset in [QuantPreset::Q8, QuantPreset::Q4] {
        let quantize = Quantization::preset(preset);
        let (resident, report) = OffloadPolicy::from_bytes(0)
            .quantize(quantize.clone())
            .apply(seeded())
            .unwrap();
        assert_eq!(report.offloaded_tensors(), 0);
        let expected = resident.forward(ids()).into_data();
        for mode in common::MODES {
            let (net, report) = OffloadPolicy::from_bytes(u64::MAX)
                .mode(mode)
                .quantize(quantize.clone())
                .apply(seeded())
                .unwrap();
            let placed = burn_offload::placements(&net);
            for (row, (path, placement)) in report.params.iter().zip(&placed) {
                assert_eq!(&row.path, path);
                assert_eq!(row.placement, *placement, "{name} {preset} {mode}: {path}");
                if row.shape.len() == 2 {
                    let name = burn_offload::quant::scheme_name(&preset.scheme());
                    assert_eq!(row.dtype, name, "{path}");
                } else {
                    assert_eq!(row.dtype, "f32", "{path}");
                }
            }
            reset_op_stats();
            let got = net.forward(ids()).into_data();
            let stats = op_stats();
            let packed: u64 = report.offloaded().map(|p| p.bytes).sum();
            assert_eq!(got, expected, "{name} {preset} {mode}: bit for bit");
            assert_eq!(
                stats.zero_copy_ops, 0,
                "{name}: wgpu reads nothing in place"
            );
            assert_eq!(
                stats.transient_upload_bytes, packed,
                "{name} {preset} {mode}: each weight crosses once, packed"
            );
        }
    }
}

on_both!(
    quantized_in_every_mode_fused,
    quantized_in_every_mode_unfused,
    quantized_in_every_mode
);
