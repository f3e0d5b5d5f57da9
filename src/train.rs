//! Training with offloaded parameters.
//!
//! An optimizer step computes each new parameter from its resident gradient, so the updated
//! parameters come back in device memory. [`keep_offloaded`] moves the parameters a report
//! placed in host memory back there; [`OffloadOptimizer`] does it after every step.

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, LearningRate, MultiGradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn_backend::DeviceOps;

use crate::device::OffloadDevice;
use crate::policy::{OffloadReport, ParamAction, walk_params};

/// Moves every parameter that `report` lists in host memory back to host memory (matched by
/// path, so it also works after a record load replaced the parameter ids). Parameters already
/// there are not touched.
pub fn keep_offloaded<B, D, M>(module: M, report: &OffloadReport) -> M
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    M: burn::module::Module<B>,
{
    walk_params(module, |info| {
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
    /// returned for the model.
    pub fn new(inner: O, report: &OffloadReport) -> Self {
        Self {
            inner,
            report: report.clone(),
        }
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
        keep_offloaded(self.inner.step(lr, module, grads), &self.report)
    }

    fn step_multi(&mut self, lr: LearningRate, module: M, grads: MultiGradientsParams) -> M {
        keep_offloaded(self.inner.step_multi(lr, module, grads), &self.report)
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
