//! Training with offloaded parameters: `Autodiff<OffloadBackend<NdArray>>` follows
//! `Autodiff<NdArray>` step for step, and the offloaded parameters stay offloaded.

use crate::common;

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_offload::{
    OffloadBackend, OffloadMode, OffloadOptimizer, OffloadPolicy, OffloadReport, keep_offloaded,
    op_stats, reset_op_stats,
};
use burn_store::ModuleSnapshot;
use common::{CPU, D_MODEL, D_OUT, Net, SmallMlp, device, placements, require_grads, values};

type Ref = Autodiff<NdArray>;
type Off = Autodiff<OffloadBackend<NdArray>>;

const STEPS: usize = 5;
const BATCH: usize = 4;

/// A model the tests can train.
trait Model<B: Backend>: Module<B> {
    fn fresh(device: &B::Device) -> Self;
    fn run<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
}

impl<B: Backend> Model<B> for Net<B> {
    fn fresh(device: &B::Device) -> Self {
        Net::new(device)
    }
    fn run<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward(x)
    }
}

impl<B: Backend> Model<B> for SmallMlp<B> {
    fn fresh(device: &B::Device) -> Self {
        SmallMlp::new(device)
    }
    fn run<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward(x)
    }
}

/// Fixed inputs and targets: `[BATCH, _]`, or `[2, BATCH / 2, _]` with three dims.
fn inputs_of<const D: usize>() -> (TensorData, TensorData) {
    let x: Vec<f32> = (0..BATCH * D_MODEL)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let y: Vec<f32> = (0..BATCH * D_OUT)
        .map(|i| (i as f32 * 0.91).cos())
        .collect();
    let lead: Vec<usize> = match D {
        2 => vec![BATCH],
        3 => vec![2, BATCH / 2],
        _ => unreachable!("rank 2 or 3"),
    };
    let shape = |last: usize| [lead.clone(), vec![last]].concat();
    (
        TensorData::new(x, shape(D_MODEL)),
        TensorData::new(y, shape(D_OUT)),
    )
}

fn inputs() -> (TensorData, TensorData) {
    inputs_of::<2>()
}

/// Collects each float parameter's gradient, by path.
struct GradVisitor<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    path: Vec<String>,
    out: Vec<(String, Option<Vec<f32>>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradVisitor<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let grad = param
            .val()
            .grad(self.grads)
            .map(|g| g.into_data().to_vec::<f32>().unwrap());
        self.out.push((self.path.join("."), grad));
    }
}

struct Step {
    loss: f32,
    grads: Vec<(String, Option<Vec<f32>>)>,
}

/// Trains `model` for `STEPS` steps on fixed data of rank `D`, calling `after_step` after
/// each step.
fn train<const D: usize, B, M, O>(
    mut model: M,
    mut optim: O,
    lr: f64,
    device: &B::Device,
    mut after_step: impl FnMut(&M, usize),
) -> (M, Vec<Step>)
where
    B: AutodiffBackend,
    M: Model<B> + AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let (x, y) = inputs_of::<D>();
    let x = Tensor::<B, D>::from_data(x, device);
    let y = Tensor::<B, D>::from_data(y, device);
    let mut steps = Vec::new();
    for step in 0..STEPS {
        let loss = (model.run(x.clone()) - y.clone()).powi_scalar(2).mean();
        let value = loss.clone().into_scalar().elem::<f32>();
        let grads = loss.backward();
        let mut visitor = GradVisitor::<B> {
            grads: &grads,
            path: Vec::new(),
            out: Vec::new(),
        };
        model.visit(&mut visitor);
        steps.push(Step {
            loss: value,
            grads: visitor.out,
        });
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(lr, model, grads);
        after_step(&model, step);
    }
    (model, steps)
}

/// A reference model on `Autodiff<NdArray>` and an offloaded copy with the same weights: the
/// policy is applied to the lazy model first, then the weights are loaded (burn-store), so the
/// offloaded ones are created directly in host memory.
fn models<M>(policy: &OffloadPolicy) -> (M::Ref, M, OffloadReport)
where
    M: Model<Off> + Paired,
{
    let reference = M::Ref::fresh(&CPU);
    let (mut model, report) = policy.apply(M::fresh(&device())).unwrap();
    assert_eq!(report.mode, policy.mode);
    let result = model.apply(reference.collect(None, None, false), None, None, false);
    assert!(
        result.errors.is_empty() && result.missing.is_empty(),
        "{result:?}"
    );
    assert_eq!(values(&model).len(), values(&reference).len());
    common::assert_same_values(&values(&model), &values(&reference));
    assert_placed(&model, &report, "after loading");
    // Offloaded parameters are trainable leaves like the others.
    assert!(require_grads(&model).iter().all(|(_, r)| *r));
    (reference, model, report)
}

/// The same model type on the reference backend.
trait Paired {
    type Ref: Model<Ref> + AutodiffModule<Ref>;
}
impl Paired for Net<Off> {
    type Ref = Net<Ref>;
}
impl Paired for SmallMlp<Off> {
    type Ref = SmallMlp<Ref>;
}

/// Every parameter is where the report put it.
fn assert_placed<M: Module<Off>>(model: &M, report: &OffloadReport, when: &str) {
    let placed = placements(model);
    assert_eq!(placed.len(), report.params.len());
    for (path, host) in placed {
        assert_eq!(
            host,
            report.is_offloaded(&path),
            "{path} {when}: in host memory = {host}"
        );
    }
}

/// `|a - b| <= rel * max|expected|` element-wise (relative to the tensor's scale, so that
/// entries near zero do not need an absurd precision).
fn assert_close(actual: &[f32], expected: &[f32], rel: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= rel * scale,
            "{what}[{i}]: {a} vs {e} (scale {scale}, rel {rel})"
        );
    }
}

/// Losses, gradients (offloaded parameters' included) and final weights match.
fn compare(off: &[Step], reference: &[Step], report: &OffloadReport, rel: f32) {
    assert_eq!(off.len(), STEPS);
    for (step, (o, r)) in off.iter().zip(reference).enumerate() {
        assert!(r.loss.is_finite() && r.loss > 0.0);
        assert!(
            (o.loss - r.loss).abs() <= rel * r.loss.abs(),
            "step {step}: loss {} vs {}",
            o.loss,
            r.loss
        );
        assert_eq!(o.grads.len(), r.grads.len());
        for ((path, og), (rpath, rg)) in o.grads.iter().zip(&r.grads) {
            assert_eq!(path, rpath);
            let rg = rg
                .as_ref()
                .unwrap_or_else(|| panic!("{path}: no reference grad"));
            let og = og.as_ref().unwrap_or_else(|| {
                panic!("{path} (offloaded: {}): no grad", report.is_offloaded(path))
            });
            assert_close(og, rg, rel, &format!("step {step} grad {path}"));
        }
    }
    // The loss goes down: the steps did something.
    assert!(reference[STEPS - 1].loss < reference[0].loss);
}

fn compare_weights<M: Module<Off>, R: Module<Ref>>(model: &M, reference: &R, rel: f32) {
    for ((path, o), (_, r)) in values(model).iter().zip(&values(reference)) {
        assert_close(
            &o.to_vec::<f32>().unwrap(),
            &r.to_vec::<f32>().unwrap(),
            rel,
            &format!("final {path}"),
        );
    }
}

enum Opt {
    Sgd,
    Adam,
}

/// Trains both models with the same optimizer on inputs of rank 2; checks placements after
/// every step.
fn run_both<M>(policy: OffloadPolicy, opt: Opt, rel: f32) -> OffloadReport
where
    M: Model<Off> + Paired + AutodiffModule<Off>,
{
    run_both_rank::<2, M>(policy, opt, rel)
}

/// [`run_both`] on inputs of rank `D`.
fn run_both_rank<const D: usize, M>(policy: OffloadPolicy, opt: Opt, rel: f32) -> OffloadReport
where
    M: Model<Off> + Paired + AutodiffModule<Off>,
{
    let (reference, model, report) = models::<M>(&policy);
    assert!(report.offloaded_tensors() > 0);
    let check = |m: &M, step: usize| assert_placed(m, &report, &format!("after step {step}"));
    reset_op_stats();
    let ((model, off), (reference, refs)) = match opt {
        Opt::Sgd => {
            let config = SgdConfig::new().with_momentum(Some(MomentumConfig::new()));
            let lr = 0.1;
            (
                train::<D, _, _, _>(
                    model,
                    OffloadOptimizer::new(config.init::<Off, M>(), &report),
                    lr,
                    &device(),
                    check,
                ),
                train::<D, _, _, _>(reference, config.init::<Ref, M::Ref>(), lr, &CPU, |_, _| {}),
            )
        }
        Opt::Adam => {
            let config = AdamConfig::new();
            let lr = 1e-2;
            (
                train::<D, _, _, _>(
                    model,
                    OffloadOptimizer::new(config.init::<Off, M>(), &report),
                    lr,
                    &device(),
                    check,
                ),
                train::<D, _, _, _>(reference, config.init::<Ref, M::Ref>(), lr, &CPU, |_, _| {}),
            )
        }
    };
    let stats = op_stats();
    match policy.mode {
        OffloadMode::Copy => {
            assert_eq!(stats.zero_copy_ops, 0, "{stats:?}");
            assert!(stats.transient_uploads > 0, "{stats:?}");
        }
        _ => assert!(stats.zero_copy_ops >= STEPS as u64, "{stats:?}"),
    }
    compare(&off, &refs, &report, rel);
    compare_weights(&model, &reference, rel);
    report
}

/// Offloads 9 of `Net`'s 14 parameters: layer 0, layer 1's norm and up.weight.
fn net_policy(mode: OffloadMode) -> OffloadPolicy {
    OffloadPolicy::from_bytes(1300).mode(mode)
}

fn all_policy(mode: OffloadMode) -> OffloadPolicy {
    OffloadPolicy::from_bytes(u64::MAX).mode(mode)
}

const COPY_REL: f32 = 1e-6;
const UVA_REL: f32 = 1e-4;

#[test]
fn net_sgd_copy_matches_reference() {
    let report = run_both::<Net<Off>>(net_policy(OffloadMode::Copy), Opt::Sgd, COPY_REL);
    assert_eq!(report.offloaded_tensors(), 9);
}

#[test]
fn net_adam_copy_matches_reference() {
    run_both::<Net<Off>>(net_policy(OffloadMode::Copy), Opt::Adam, COPY_REL);
}

#[test]
fn net_sgd_uva_matches_reference() {
    run_both::<Net<Off>>(net_policy(OffloadMode::Uva), Opt::Sgd, UVA_REL);
}

#[test]
fn net_adam_uva_matches_reference() {
    run_both::<Net<Off>>(net_policy(OffloadMode::Uva), Opt::Adam, UVA_REL);
}

#[test]
fn mlp_fully_offloaded_matches_reference() {
    for (mode, rel) in [(OffloadMode::Copy, COPY_REL), (OffloadMode::Uva, UVA_REL)] {
        for opt in [Opt::Sgd, Opt::Adam] {
            let report = run_both::<SmallMlp<Off>>(all_policy(mode), opt, rel);
            assert_eq!(report.offloaded_tensors(), 4);
        }
    }
}

/// `[batch, seq, d_model]` inputs, as a transformer block sees them: the weights are
/// broadcast over two leading dims.
#[test]
fn rank_3_inputs_match_reference() {
    for (mode, rel) in [(OffloadMode::Copy, COPY_REL), (OffloadMode::Uva, UVA_REL)] {
        run_both_rank::<3, Net<Off>>(net_policy(mode), Opt::Adam, rel);
        run_both_rank::<3, SmallMlp<Off>>(all_policy(mode), Opt::Sgd, rel);
    }
}

#[test]
fn mlp_filtered_offload_matches_reference() {
    let policy = OffloadPolicy::from_bytes(u64::MAX)
        .params(["fc2", "fc1.weight"])
        .mode(OffloadMode::Copy);
    let report = run_both::<SmallMlp<Off>>(policy, Opt::Adam, COPY_REL);
    assert_eq!(
        common::offloaded_paths(&report),
        ["fc1.weight", "fc2.weight", "fc2.bias"]
    );
}

/// Without `OffloadOptimizer`, a step brings the updated parameters back to device memory;
/// one `keep_offloaded` call puts them back, values untouched.
#[test]
fn keep_offloaded_restores_placement_after_a_plain_step() {
    let (reference, model, report) = models::<Net<Off>>(&net_policy(OffloadMode::Copy));
    let mut optim = AdamConfig::new().init::<Off, Net<Off>>();
    let mut ref_optim = AdamConfig::new().init::<Ref, Net<Ref>>();
    let (x, y) = inputs();
    let step = |model: Net<Off>, optim: &mut dyn FnMut(Net<Off>, GradientsParams) -> Net<Off>| {
        let x = Tensor::<Off, 2>::from_data(x.clone(), &device());
        let y = Tensor::<Off, 2>::from_data(y.clone(), &device());
        let loss = (model.forward(x) - y).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        optim(model, grads)
    };
    let model = step(model, &mut |m, g| optim.step(1e-2, m, g));
    let reference = {
        let x = Tensor::<Ref, 2>::from_data(x.clone(), &CPU);
        let y = Tensor::<Ref, 2>::from_data(y.clone(), &CPU);
        let loss = (reference.forward(x) - y).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &reference);
        ref_optim.step(1e-2, reference, grads)
    };

    let placed = placements(&model);
    assert!(
        placed.iter().all(|(_, host)| !host),
        "a plain optimizer step returns resident parameters: {placed:?}"
    );
    let before = values(&model);
    let model = keep_offloaded(model, &report);
    assert_placed(&model, &report, "after keep_offloaded");
    common::assert_same_values(&values(&model), &before);
    compare_weights(&model, &reference, COPY_REL);
    // Still trainable, and a second call changes nothing.
    assert!(require_grads(&model).iter().all(|(_, r)| *r));
    let model = keep_offloaded(model, &report);
    assert_placed(&model, &report, "after a second keep_offloaded");
    let model = step(model, &mut |m, g| optim.step(1e-2, m, g));
    let model = keep_offloaded(model, &report);
    assert_placed(&model, &report, "after a second step");
}

/// Gradients reach offloaded parameters in both modes, equal to the reference's, and the
/// backward pass leaves the parameters in host memory.
#[test]
fn offloaded_weights_get_reference_gradients() {
    for (mode, rel) in [(OffloadMode::Copy, COPY_REL), (OffloadMode::Uva, UVA_REL)] {
        let (reference, model, report) = models::<SmallMlp<Off>>(&all_policy(mode));
        let (x, y) = inputs();
        let grads_of = |loss: Tensor<Off, 1>, model: &SmallMlp<Off>| {
            let grads = loss.backward();
            let w1 = model.fc1.weight.val().grad(&grads).unwrap();
            let w2 = model.fc2.weight.val().grad(&grads).unwrap();
            let b2 = model.fc2.bias.as_ref().unwrap().val().grad(&grads).unwrap();
            [w1.into_data(), w2.into_data(), b2.into_data()]
        };
        let x_off = Tensor::<Off, 2>::from_data(x.clone(), &device());
        let y_off = Tensor::<Off, 2>::from_data(y.clone(), &device());
        let loss = (model.forward(x_off) - y_off).powi_scalar(2).mean();
        let off = grads_of(loss, &model);

        let x_ref = Tensor::<Ref, 2>::from_data(x, &CPU);
        let y_ref = Tensor::<Ref, 2>::from_data(y, &CPU);
        let loss = (reference.forward(x_ref) - y_ref).powi_scalar(2).mean();
        let grads = loss.backward();
        let expected = [
            reference.fc1.weight.val().grad(&grads).unwrap().into_data(),
            reference.fc2.weight.val().grad(&grads).unwrap().into_data(),
            reference
                .fc2
                .bias
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads)
                .unwrap()
                .into_data(),
        ];
        for (i, (o, e)) in off.iter().zip(&expected).enumerate() {
            assert_eq!(o.shape, e.shape);
            let e = e.to_vec::<f32>().unwrap();
            assert!(e.iter().any(|v| *v != 0.0));
            assert_close(
                &o.to_vec::<f32>().unwrap(),
                &e,
                rel,
                &format!("{mode} grad {i}"),
            );
        }
        assert_placed(&model, &report, "after backward");
    }
}

/// Frozen parameters stay frozen when a policy moves them, lazy or initialised.
#[test]
fn frozen_params_stay_frozen() {
    let policy = all_policy(OffloadMode::Copy);

    // `Param::set_require_grad` keeps a lazy parameter lazy (`Module::no_grad` would
    // initialise it).
    let mut lazy = SmallMlp::<Off>::new(&device());
    lazy.fc1.weight = lazy.fc1.weight.set_require_grad(false);
    assert!(!lazy.fc1.weight.is_initialized());
    let (lazy, report) = policy.apply(lazy).unwrap();
    assert!(report.is_offloaded("fc1.weight"));
    assert!(!lazy.fc1.weight.is_initialized());
    assert_eq!(
        require_grads(&lazy),
        [
            ("fc1.weight".to_string(), false),
            ("fc1.bias".to_string(), true),
            ("fc2.weight".to_string(), true),
            ("fc2.bias".to_string(), true),
        ]
    );

    let initialised = Net::<Off>::new(&device()).no_grad();
    let (initialised, report) = policy.apply(initialised).unwrap();
    assert!(report.params.iter().all(|p| p.moved));
    let grads = require_grads(&initialised);
    assert!(grads.iter().all(|(_, r)| !r), "initialised: {grads:?}");

    // And trainable ones stay trainable.
    let (trainable, _) = policy.apply(Net::<Off>::new(&device())).unwrap();
    assert!(require_grads(&trainable).iter().all(|(_, r)| *r));
}
