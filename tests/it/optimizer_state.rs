//! Optimizer state in host memory (`OffloadOptimizer::with_state`): Burn's Adam, AdamW and SGD
//! with momentum (weight decay, gradient clipping) give `Autodiff<NdArray>`'s results, the
//! state lives where its placement says (measured tensor by tensor), the step moves what the
//! docs say, and host memory stays flat over 20 steps.

use crate::common;

use burn::backend::{Autodiff, NdArray};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, GradientsParams, Optimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_offload::train::Bytes;
use burn_offload::{
    OffloadBackend, OffloadMode, OffloadOptimizer, OffloadPolicy, OffloadReport, OptimizerState,
    StatePlacement, host_memory_stats,
};
use burn_store::ModuleSnapshot;
use common::{CPU, D_MODEL, D_OUT, NET_BYTES, Net, device, placements, values};

type Ref = Autodiff<NdArray>;
type Off = Autodiff<OffloadBackend<NdArray>>;

const STEPS: usize = 5;
const BATCH: usize = 4;
const REL: f32 = 1e-5;

fn batch<B: Backend>(device: &B::Device, seed: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let x: Vec<f32> = (0..BATCH * D_MODEL)
        .map(|i| ((i + 7 * seed) as f32 * 0.37).sin())
        .collect();
    let y: Vec<f32> = (0..BATCH * D_OUT)
        .map(|i| ((i + 3 * seed) as f32 * 0.91).cos())
        .collect();
    (
        Tensor::from_data(TensorData::new(x, [BATCH, D_MODEL]), device),
        Tensor::from_data(TensorData::new(y, [BATCH, D_OUT]), device),
    )
}

/// `steps` steps of `optim` on `model` (a new batch each step); `after` sees each step's
/// model and optimizer.
fn train<B, O>(
    mut model: Net<B>,
    optim: &mut O,
    steps: usize,
    device: &B::Device,
    mut after: impl FnMut(&Net<B>, &O, usize),
) -> Net<B>
where
    B: AutodiffBackend,
    O: Optimizer<Net<B>, B>,
{
    for step in 0..steps {
        let (x, y) = batch::<B>(device, step);
        let loss = (model.forward(x) - y).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(2e-2, model, grads);
        after(&model, optim, step);
    }
    model
}

/// The reference model and an offloaded one with the same weights (policy applied to the lazy
/// model, then the values loaded).
fn models(policy: &OffloadPolicy) -> (Net<Ref>, Net<Off>, OffloadReport) {
    let reference = Net::<Ref>::new(&CPU);
    let (mut model, report) = policy.apply(Net::<Off>::new(&device())).unwrap();
    let result = model.apply(reference.collect(None, None, false), None, None, false);
    assert!(
        result.errors.is_empty() && result.missing.is_empty(),
        "{result:?}"
    );
    common::assert_same_values(&values(&model), &values(&reference));
    (reference, model, report)
}

fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= REL * scale,
            "{what}[{i}]: {a} vs {e} (scale {scale})"
        );
    }
}

fn compare(model: &Net<Off>, reference: &Net<Ref>, start: &Net<Ref>) {
    let mut changed = false;
    for (((path, o), (_, r)), (_, s)) in values(model)
        .iter()
        .zip(&values(reference))
        .zip(&values(start))
    {
        let (o, r) = (o.to_vec::<f32>().unwrap(), r.to_vec::<f32>().unwrap());
        assert_close(&o, &r, path);
        changed |= r != s.to_vec::<f32>().unwrap();
    }
    assert!(changed, "the steps changed no weight");
}

/// The three optimizers of the issue, each with weight decay and gradient clipping.
#[derive(Clone, Copy, Debug)]
enum Opt {
    Adam,
    AdamW,
    SgdMomentum,
}

impl Opt {
    fn state(self, placement: StatePlacement) -> OptimizerState {
        match self {
            Opt::Adam | Opt::AdamW => OptimizerState::adam(placement),
            Opt::SgdMomentum => OptimizerState::sgd_momentum(placement),
        }
    }
}

/// Trains the reference with `opt` and the offloaded model with `opt` wrapped by
/// `OffloadOptimizer::with_state`; returns the offloaded model's state memory and traffic.
fn run(
    opt: Opt,
    policy: OffloadPolicy,
    steps: usize,
) -> (OffloadReport, Bytes, burn_offload::StateTraffic) {
    let (reference, model, report) = models(&policy);
    let start = reference.clone();
    let clip = GradientClippingConfig::Norm(0.5);
    let check = |m: &Net<Off>, step: usize| {
        for (path, host) in placements(m) {
            assert_eq!(host, report.is_offloaded(&path), "{path} after step {step}");
        }
    };
    macro_rules! both {
        ($config:expr) => {{
            let config = $config;
            let mut plain = config.init::<Ref, Net<Ref>>();
            let reference = train(reference, &mut plain, steps, &CPU, |_, _, _| {});
            let mut optim = OffloadOptimizer::with_state(config.init::<Off, Net<Off>>(), &report);
            let model = train(model, &mut optim, steps, &device(), |m, _, s| check(m, s));
            compare(&model, &reference, &start);
            (optim.state_memory(), optim.state_traffic())
        }};
    }
    let (memory, traffic) = match opt {
        Opt::Adam => both!(
            AdamConfig::new()
                .with_weight_decay(Some(WeightDecayConfig::new(1e-2)))
                .with_grad_clipping(Some(clip))
        ),
        Opt::AdamW => both!(
            AdamWConfig::new()
                .with_weight_decay(5e-2)
                .with_grad_clipping(Some(clip))
        ),
        Opt::SgdMomentum => both!(
            SgdConfig::new()
                .with_momentum(Some(MomentumConfig::new().with_nesterov(true)))
                .with_weight_decay(Some(WeightDecayConfig::new(1e-2)))
                .with_gradient_clipping(Some(GradientClippingConfig::Value(0.05)))
        ),
    };
    (report, memory, traffic)
}

/// Offloads about half of `Net` (its first layer).
fn half(mode: OffloadMode, state: OptimizerState) -> OffloadPolicy {
    OffloadPolicy::from_bytes(NET_BYTES / 2)
        .mode(mode)
        .optimizer_state(state)
}

/// State measured tensor by tensor equals the report's estimate, and the traffic is the host
/// state's bytes: up from the second step, down every step.
fn check_state(
    opt: Opt,
    report: &OffloadReport,
    memory: Bytes,
    traffic: burn_offload::StateTraffic,
) {
    let state = report.optimizer_state().expect("the policy said");
    let estimate = report.training_memory(None);
    assert_eq!(
        memory.device,
        estimate.device_total().state,
        "{opt:?}: {estimate}"
    );
    assert_eq!(
        memory.host,
        estimate.host_total().state,
        "{opt:?}: {estimate}"
    );
    assert_eq!(
        memory.total(),
        NET_BYTES * state.values_per_param as u64,
        "{opt:?}"
    );
    assert_eq!(traffic.steps, STEPS as u64);
    assert_eq!(
        traffic.downloaded_bytes,
        STEPS as u64 * memory.host,
        "{opt:?}"
    );
    assert_eq!(
        traffic.uploaded_bytes,
        (STEPS as u64 - 1) * memory.host,
        "{opt:?}"
    );
}

#[test]
fn adam_adamw_sgd_with_all_state_in_host_memory_match_ndarray() {
    for opt in [Opt::Adam, Opt::AdamW, Opt::SgdMomentum] {
        let (report, memory, traffic) = run(
            opt,
            half(OffloadMode::Copy, opt.state(StatePlacement::Host)),
            STEPS,
        );
        assert!(report.offloaded_tensors() > 0 && report.offloaded_tensors() < 14);
        assert_eq!(memory.device, 0, "{opt:?}: state in device memory");
        assert!(memory.host > 0, "{opt:?}");
        check_state(opt, &report, memory, traffic);
    }
}

#[test]
fn state_with_offloaded_weights_only_in_uva_mode() {
    for opt in [Opt::Adam, Opt::SgdMomentum] {
        let (report, memory, traffic) = run(
            opt,
            half(OffloadMode::Uva, opt.state(StatePlacement::WithOffloaded)),
            STEPS,
        );
        let k = opt.state(StatePlacement::Device).values_per_param as u64;
        assert_eq!(memory.host, report.offloaded_bytes() * k, "{opt:?}");
        assert_eq!(
            memory.device,
            (report.total_bytes() - report.offloaded_bytes()) * k,
            "{opt:?}"
        );
        check_state(opt, &report, memory, traffic);
    }
}

#[test]
fn state_in_device_memory_is_counted_there() {
    // The same wrapper with the state where Burn keeps it: the census sees it on the device,
    // and nothing moves.
    let (report, memory, traffic) = run(
        Opt::Adam,
        half(
            OffloadMode::Copy,
            OptimizerState::adam(StatePlacement::Device),
        ),
        STEPS,
    );
    assert_eq!(memory.host, 0);
    assert_eq!(memory.device, 2 * NET_BYTES);
    assert_eq!(traffic.bytes_per_step(), 0);
    check_state(Opt::Adam, &report, memory, traffic);
}

#[test]
fn a_budget_with_state_counts_each_offloaded_parameter_with_its_state() {
    let budget = 1300;
    let weights = OffloadPolicy::from_bytes(budget);
    let with_state = weights
        .clone()
        .optimizer_state(OptimizerState::adam(StatePlacement::WithOffloaded));
    let (_, a) = weights.apply(Net::<Off>::new(&device())).unwrap();
    let (_, b) = with_state.apply(Net::<Off>::new(&device())).unwrap();
    // Weights alone: 1.3 KB of weights; with Adam's state, 1.3 KB of weights and state.
    assert!(a.offloaded_bytes() >= budget);
    let host = |r: &OffloadReport| r.training_memory(None).host_total();
    assert!(b.offloaded_bytes() < a.offloaded_bytes(), "{b}");
    assert!(host(&b).weights + host(&b).state >= budget, "{b}");
    assert!(host(&b).weights + host(&b).state - 3 * 512 < budget, "{b}");
    assert_eq!(host(&b).state, 2 * b.offloaded_bytes());
    // The report prints where weights, gradients and state are.
    let text = b.to_string();
    assert!(
        text.contains("Training memory") && text.contains("gradients"),
        "{text}"
    );
    assert!(!a.to_string().contains("Training memory"), "{a}");
    // A policy written as a file says the same.
    let file = OffloadPolicy::from_toml(
        "max_bytes = 1300\n[optimizer_state]\nplacement = \"with_offloaded\"\nvalues_per_param = 2\n",
    )
    .unwrap();
    assert_eq!(file, with_state);
}

#[test]
fn a_checkpoint_of_host_state_loads_into_burns_plain_adam_and_back() {
    // 3 steps with state in host memory, the record saved, then 2 more steps with Burn's own
    // Adam from that record: the same weights as 5 plain steps.
    let policy = half(
        OffloadMode::Copy,
        OptimizerState::adam(StatePlacement::Host),
    );
    let (reference, model, report) = models(&policy);
    let start = reference.clone();
    let config = AdamConfig::new().with_weight_decay(Some(WeightDecayConfig::new(1e-2)));
    let mut plain = config.init::<Ref, Net<Ref>>();
    let reference = train(reference, &mut plain, STEPS, &CPU, |_, _, _| {});

    let mut hosted = OffloadOptimizer::with_state(config.init::<Off, Net<Off>>(), &report);
    let model = train(model, &mut hosted, 3, &device(), |_, _, _| {});
    let record = hosted.to_record();
    let mut resumed =
        OffloadOptimizer::new(config.init::<Off, Net<Off>>(), &report).load_record(record);
    let model = {
        // Steps 3 and 4 (the batches the reference saw there).
        let mut model = model;
        for step in 3..STEPS {
            let (x, y) = batch::<Off>(&device(), step);
            let loss = (model.forward(x) - y).powi_scalar(2).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = resumed.step(2e-2, model, grads);
        }
        model
    };
    compare(&model, &reference, &start);
    // And back: Burn's record into the host-state optimizer, whose next step moves the state
    // to host memory.
    let mut again = OffloadOptimizer::with_state(config.init::<Off, Net<Off>>(), &report)
        .load_record(resumed.to_record());
    let _ = train(model, &mut again, 1, &device(), |_, _, _| {});
    assert_eq!(again.state_memory().device, 0);
    assert_eq!(again.state_memory().host, 2 * NET_BYTES);
}

#[test]
fn host_memory_stays_flat_over_20_steps_with_state_in_host_memory() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let policy = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Copy)
        .optimizer_state(OptimizerState::adam(StatePlacement::Host));
    let (_, model, report) = models(&policy);
    assert_eq!(report.offloaded_tensors(), 14);
    let mut optim =
        OffloadOptimizer::with_state(AdamConfig::new().init::<Off, Net<Off>>(), &report);
    let mut seen = Vec::new();
    let model = train(model, &mut optim, 20, &device(), |_, o, step| {
        assert_eq!(o.state_memory().device, 0, "step {step}");
        seen.push(host_memory_stats());
    });
    // Weights and state: 3 × NET_BYTES in host memory from the first step on.
    let first = seen[0];
    assert!(first.live_bytes as u64 >= 3 * NET_BYTES, "{first:?}");
    for (step, s) in seen.iter().enumerate() {
        assert_eq!(
            s.live_bytes, first.live_bytes,
            "step {step}: {s:?} vs {first:?}"
        );
        assert_eq!(
            s.total_allocations, first.total_allocations,
            "step {step} allocated host memory: {s:?} vs {first:?}"
        );
    }
    assert!(placements(&model).iter().all(|(_, host)| *host));
    let _ = AutodiffModule::valid(&model);
}
