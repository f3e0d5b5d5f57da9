//! Training with offloaded parameters.
//!
//! An optimizer step computes each new parameter from its resident gradient, so the updated
//! parameters come back in device memory. [`keep_offloaded`] moves the parameters a report
//! placed in host memory back there; [`OffloadOptimizer`] does it after every step, writing
//! the new values into the host buffers the parameters had before the step (no new allocation,
//! no re-pinning, no freeing) wherever nothing else still refers to them.
//!
//! Optimizer state (Adam's moments, momentum) stays where the wrapped optimizer keeps it, in
//! device memory, unless the optimizer is built with
//! [`OffloadOptimizer::with_state`]: then [`StatePlacement`] says which parameters' state lives
//! in host memory between steps ([`state`]). [`TrainingMemory`] says where weights, gradients
//! and state are, per device.

pub(crate) mod census;
pub mod memory;
pub mod state;

pub use census::Bytes;
pub use memory::TrainingMemory;
pub use state::{OptimizerState, StateOffload, StatePlacement, StateTraffic};

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    GradientsParams, LearningRate, MultiGradientsParams, Optimizer, SimpleOptimizer,
};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn_backend::DeviceOps;

use crate::context::OffloadContext;
use crate::device::OffloadDevice;
use crate::policy::{OffloadReport, ParamAction, walk_params};

/// Moves every parameter that `report` lists in host memory back to host memory (matched by
/// path, so it also works after a record load replaced the parameter ids), in the report's
/// context (the default context for a report read back from JSON).
pub fn keep_offloaded<B, D, M>(module: M, report: &OffloadReport) -> M
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    M: burn::module::Module<B>,
{
    let context = report
        .context()
        .cloned()
        .unwrap_or_else(OffloadContext::default_context);
    walk_params(module, &context, |info| {
        if report.is_offloaded(&info.path) {
            ParamAction::Host
        } else {
            ParamAction::Keep
        }
    })
    .0
}

/// An optimizer that keeps the parameters of an [`OffloadReport`] in host memory after each
/// step.
#[derive(Clone)]
pub struct OffloadOptimizer<O> {
    inner: O,
    report: OffloadReport,
}

impl<O> OffloadOptimizer<O> {
    /// Wraps `inner`; `report` is what [`OffloadPolicy::apply`](crate::OffloadPolicy::apply)
    /// returned for the model. The optimizer's state stays where `inner` keeps it (device
    /// memory for Burn's optimizers); [`with_state`](OffloadOptimizer::with_state) places it.
    pub fn new(inner: O, report: &OffloadReport) -> Self {
        if let Some(state) = report.optimizer_state()
            && state.placement != StatePlacement::Device
        {
            log::warn!(
                target: crate::policy::WARNINGS_LOG_TARGET,
                "the policy places optimizer state in host memory ({}), but \
                 `OffloadOptimizer::new` leaves it where the wrapped optimizer keeps it: build \
                 the optimizer with `OffloadOptimizer::with_state(config.init(), &report)`",
                state.placement
            );
        }
        Self {
            inner,
            report: report.clone(),
        }
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }
}

impl<S, M, B, D> OffloadOptimizer<StateOffload<S, M, B>>
where
    S: SimpleOptimizer<B::InnerBackend>,
    M: AutodiffModule<B>,
    B: AutodiffBackend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    /// Wraps one of Burn's optimizers (`AdamConfig::new().init()`, `SgdConfig`, `AdamWConfig`,
    /// … : an [`OptimizerAdaptor`]) and keeps its state where the policy of `report` said
    /// ([`OffloadPolicy::optimizer_state`](crate::OffloadPolicy::optimizer_state); in host
    /// memory for every parameter, [`StatePlacement::Host`], if the policy did not say), in
    /// host memory of the model's context. The gradient clipping and any state `inner` already
    /// holds are kept. See [`state`] for what a step moves.
    pub fn with_state(inner: OptimizerAdaptor<S, M, B>, report: &OffloadReport) -> Self {
        let placement = report
            .optimizer_state()
            .map_or(StatePlacement::Host, |s| s.placement);
        let context = report
            .context()
            .cloned()
            .unwrap_or_else(OffloadContext::default_context);
        Self {
            inner: StateOffload::new(inner, placement, context),
            report: report.clone(),
        }
    }

    /// Places the state as `placement` says instead (state already kept moves at each
    /// parameter's next step).
    pub fn state_placement(mut self, placement: StatePlacement) -> Self {
        self.inner.set_placement(placement);
        self
    }

    /// Bytes of optimizer state in device and in host memory, as of the last step.
    pub fn state_memory(&self) -> Bytes {
        self.inner.memory()
    }

    /// What the steps so far moved between host and device memory for the state.
    pub fn state_traffic(&self) -> StateTraffic {
        self.inner.traffic()
    }
}

impl<O, M, B, D> Optimizer<M, B> for OffloadOptimizer<O>
where
    O: Optimizer<M, B>,
    M: AutodiffModule<B>,
    B: AutodiffBackend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    type Record = O::Record;

    fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        let inner = &mut self.inner;
        recycled_step(module, &self.report, |module| inner.step(lr, module, grads))
    }

    fn step_multi(&mut self, lr: LearningRate, module: M, grads: MultiGradientsParams) -> M {
        let inner = &mut self.inner;
        recycled_step(module, &self.report, |module| {
            inner.step_multi(lr, module, grads)
        })
    }

    fn to_record(&self) -> Self::Record {
        self.inner.to_record()
    }

    fn load_record(self, record: Self::Record) -> Self {
        Self {
            inner: self.inner.load_record(record),
            report: self.report,
        }
    }
}

/// Runs an optimizer `step` and puts the parameters `report` offloaded back in host memory,
/// into the buffers they had before the step where possible ([`crate::recycle`]).
fn recycled_step<B, D, M>(module: M, report: &OffloadReport, step: impl FnOnce(M) -> M) -> M
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    M: burn::module::Module<B>,
{
    let old = OldValues::of(&module);
    crate::recycle::recycling(|| {
        let module = step(module);
        // The target settles the pool (waits for device reads of the old values) before the
        // first buffer is rewritten.
        crate::recycle::donating(|| old.donate());
        keep_offloaded(module, report)
    })
}

/// The values of a module's offloaded parameters before a step (O(1) clones of their views).
struct OldValues(Vec<Box<dyn FnOnce()>>);

impl OldValues {
    fn of<B, D, M>(module: &M) -> Self
    where
        B: Backend<Device = OffloadDevice<D>>,
        D: DeviceOps,
        M: burn::module::Module<B>,
    {
        struct Visitor(Vec<Box<dyn FnOnce()>>);
        impl<B, D> ModuleVisitor<B> for Visitor
        where
            B: Backend<Device = OffloadDevice<D>>,
            D: DeviceOps,
        {
            fn visit_float<const N: usize>(&mut self, param: &Param<Tensor<B, N>>) {
                if !param.is_initialized() {
                    return;
                }
                let value = param.val();
                let device = crate::context::querying_placement(|| value.device());
                if device.is_host() {
                    // Inside `donating`, this move hands the view to the pool.
                    self.0
                        .push(Box::new(move || drop(value.to_device(&device))));
                }
            }
        }
        let mut visitor = Visitor(Vec::new());
        module.visit(&mut visitor);
        Self(visitor.0)
    }

    /// Gives the old views to the thread's pool and drops these references to them.
    fn donate(self) {
        for donate in self.0 {
            donate();
        }
    }
}
