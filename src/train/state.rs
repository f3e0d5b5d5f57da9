//! Optimizer state in host memory (DeepSpeed's ZeRO-Offload, for Burn's optimizers).
//!
//! [`StateOffload`] runs a Burn [`SimpleOptimizer`] (Adam, AdamW, SGD, RmsProp, AdaGrad, …: what
//! `AdamConfig::init` and friends wrap in an [`OptimizerAdaptor`]) as the adaptor does, one
//! parameter at a time, with the state of the parameters its [`StatePlacement`] covers kept in
//! host memory between steps. For such a parameter a step
//! 1. uploads its state (one transient device copy of each state tensor),
//! 2. runs the optimizer's own update on the device, where the gradient is,
//! 3. writes the new state into the host buffers the old state had (the old state's buffers are
//!    given back and reused: no new allocation, no re-pinning after the first step) and drops
//!    the device copies before the next parameter's turn.
//!
//! So the update runs on the device and the state streams through it: per step it moves the
//! state's bytes twice (up and down; for Adam in f32, 16 bytes per parameter value), and at any
//! time the device holds the state of one parameter at most. The alternative, ZeRO-Offload's
//! update on the host (gradients down, updated parameters up: 4 + 4 bytes per f32 value, or 4
//! when the parameter is offloaded too), moves fewer bytes but runs the optimizer on the CPU
//! cores; Burn's optimizers are tensor programs, so that would mean a second backend for the
//! update and no longer Burn's own arithmetic on the device. See README's "Training".
//!
//! The record is the adaptor's (`HashMap<ParamId, AdaptorRecord<S, B>>`): a checkpoint of a
//! plain `OptimizerAdaptor` loads into a [`StateOffload`] and back.

use core::marker::PhantomData;

use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::optim::adaptor::{GradAdaptor, OptimizerAdaptor};
use burn::optim::record::AdaptorRecord;
use burn::optim::{
    GradientsParams, LearningRate, MultiGradientsParams, Optimizer, SimpleOptimizer,
};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use burn_backend::DeviceOps;
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use super::census::{Bytes, census};
use crate::context::{OffloadContext, querying_placement};
use crate::device::OffloadDevice;
use crate::policy::in_moves;

/// Where an optimizer keeps its state (Adam's moments, SGD's momentum) between steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatePlacement {
    /// In device memory, where Burn's optimizers keep it (the default).
    #[default]
    Device,
    /// In host memory for the parameters that are in host memory, in device memory for the
    /// others: the budget then counts each offloaded parameter with its state.
    WithOffloaded,
    /// In host memory for every parameter (ZeRO-Offload): only the parameters the budget
    /// selects are offloaded, the state of all of them is.
    Host,
}

impl StatePlacement {
    /// Whether the state of a parameter in host memory (`offloaded`) or device memory lives in
    /// host memory.
    pub fn in_host(self, offloaded: bool) -> bool {
        match self {
            StatePlacement::Device => false,
            StatePlacement::WithOffloaded => offloaded,
            StatePlacement::Host => true,
        }
    }
}

impl std::fmt::Display for StatePlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StatePlacement::Device => "device",
            StatePlacement::WithOffloaded => "with_offloaded",
            StatePlacement::Host => "host",
        })
    }
}

impl std::str::FromStr for StatePlacement {
    type Err = crate::OffloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "device" => Ok(StatePlacement::Device),
            "with_offloaded" | "with-offloaded" => Ok(StatePlacement::WithOffloaded),
            "host" => Ok(StatePlacement::Host),
            other => Err(crate::OffloadError::PolicyParse {
                format: "optimizer state placement",
                message: format!(
                    "unknown placement `{other}`: use `device`, `with_offloaded` or `host`"
                ),
            }),
        }
    }
}

/// An optimizer's state as a policy and the fit planner count it: where it lives and how many
/// values it keeps per parameter value (Burn's optimizers keep them in the parameter's dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OptimizerState {
    /// Where the state lives.
    pub placement: StatePlacement,
    /// State values per parameter value: Adam and AdamW 2 (3 with AMSGrad), SGD with momentum
    /// 1, plain SGD 0.
    pub values_per_param: u32,
}

impl OptimizerState {
    /// State of `values_per_param` values per parameter value, placed as `placement` says.
    pub fn new(placement: StatePlacement, values_per_param: u32) -> Self {
        Self {
            placement,
            values_per_param,
        }
    }

    /// Adam's or AdamW's state (two moments).
    pub fn adam(placement: StatePlacement) -> Self {
        Self::new(placement, 2)
    }

    /// SGD with momentum's state (one momentum).
    pub fn sgd_momentum(placement: StatePlacement) -> Self {
        Self::new(placement, 1)
    }

    /// Bytes of state for a parameter of `bytes`.
    pub fn bytes_for(&self, bytes: u64) -> u64 {
        bytes.saturating_mul(self.values_per_param as u64)
    }
}

/// What a [`StateOffload`] moved between host and device memory for the state it keeps there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateTraffic {
    /// Optimizer steps counted.
    pub steps: u64,
    /// Bytes of state copied from host to device memory (each offloaded state tensor once per
    /// step).
    pub uploaded_bytes: u64,
    /// Bytes of new state written from device to host memory.
    pub downloaded_bytes: u64,
}

impl StateTraffic {
    /// Bytes moved per step (both directions), averaged over the steps counted.
    pub fn bytes_per_step(&self) -> u64 {
        (self.uploaded_bytes + self.downloaded_bytes)
            .checked_div(self.steps)
            .unwrap_or(0)
    }
}

/// A Burn [`SimpleOptimizer`] run as [`OptimizerAdaptor`] runs it, with its state placed in
/// host or device memory per parameter (see the module docs). Built by
/// [`OffloadOptimizer::with_state`](crate::OffloadOptimizer::with_state).
pub struct StateOffload<S, M, B>
where
    S: SimpleOptimizer<B::InnerBackend>,
    M: AutodiffModule<B>,
    B: AutodiffBackend,
{
    optim: S,
    records: HashMap<ParamId, AdaptorRecord<S, B>>,
    /// Bytes of each parameter's state by placement, as of its last step (or load).
    sizes: HashMap<ParamId, Bytes>,
    grad_clipping: Option<burn::grad_clipping::GradientClipping>,
    placement: StatePlacement,
    context: OffloadContext,
    traffic: StateTraffic,
    module: PhantomData<M>,
}

impl<S, M, B> Clone for StateOffload<S, M, B>
where
    S: SimpleOptimizer<B::InnerBackend>,
    M: AutodiffModule<B>,
    B: AutodiffBackend,
{
    fn clone(&self) -> Self {
        Self {
            optim: self.optim.clone(),
            records: self.records.clone(),
            sizes: self.sizes.clone(),
            grad_clipping: self.grad_clipping.clone(),
            placement: self.placement,
            context: self.context.clone(),
            traffic: self.traffic,
            module: PhantomData,
        }
    }
}

impl<S, M, B> StateOffload<S, M, B>
where
    S: SimpleOptimizer<B::InnerBackend>,
    M: AutodiffModule<B>,
    B: AutodiffBackend,
{
    /// Takes `adaptor`'s optimizer, gradient clipping and state (a fresh adaptor has none);
    /// state placed in host memory belongs to `context`.
    pub(crate) fn new(
        adaptor: OptimizerAdaptor<S, M, B>,
        placement: StatePlacement,
        context: OffloadContext,
    ) -> Self {
        Self {
            optim: adaptor.optim().clone(),
            grad_clipping: adaptor.grad_clipping().cloned(),
            records: adaptor.to_record(),
            sizes: HashMap::new(),
            placement,
            context,
            traffic: StateTraffic::default(),
            module: PhantomData,
        }
    }

    /// Where the state lives.
    pub fn placement(&self) -> StatePlacement {
        self.placement
    }

    /// Changes where the state lives; state already kept moves at each parameter's next step.
    pub fn set_placement(&mut self, placement: StatePlacement) {
        self.placement = placement;
    }

    /// Bytes of optimizer state in device and in host memory, counted tensor by tensor after
    /// each parameter's last step (state loaded by `load_record` is counted from its next step).
    pub fn memory(&self) -> Bytes {
        let mut total = Bytes::default();
        for bytes in self.sizes.values() {
            total += *bytes;
        }
        total
    }

    /// What the steps so far moved for the state kept in host memory.
    pub fn traffic(&self) -> StateTraffic {
        self.traffic
    }
}

impl<S, M, B, D> StateOffload<S, M, B>
where
    S: SimpleOptimizer<B::InnerBackend>,
    M: AutodiffModule<B>,
    B: AutodiffBackend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    fn step_common(&mut self, lr: LearningRate, module: M, mut grads: GradAdaptor) -> M {
        self.traffic.steps += 1;
        module.map(&mut StateMapper::<S, B> {
            optim: &self.optim,
            records: &mut self.records,
            sizes: &mut self.sizes,
            grads: &mut grads,
            lr,
            grad_clipping: self.grad_clipping.as_ref(),
            placement: self.placement,
            context: &self.context,
            traffic: &mut self.traffic,
        })
    }
}

impl<S, M, B, D> Optimizer<M, B> for StateOffload<S, M, B>
where
    S: SimpleOptimizer<B::InnerBackend>,
    M: AutodiffModule<B>,
    B: AutodiffBackend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    type Record = HashMap<ParamId, AdaptorRecord<S, B>>;

    fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        self.step_common(lr, module, grads.into())
    }

    fn step_multi(&mut self, lr: LearningRate, module: M, grads: MultiGradientsParams) -> M {
        self.step_common(lr, module, grads.into())
    }

    fn to_record(&self) -> Self::Record {
        self.records.clone()
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.records = record;
        self.sizes.clear();
        self
    }
}

/// [`OptimizerAdaptor`]'s mapper, with the state's placement (see the module docs).
struct StateMapper<'a, S, B>
where
    B: AutodiffBackend,
    S: SimpleOptimizer<B::InnerBackend>,
{
    optim: &'a S,
    records: &'a mut HashMap<ParamId, AdaptorRecord<S, B>>,
    sizes: &'a mut HashMap<ParamId, Bytes>,
    grads: &'a mut GradAdaptor,
    lr: LearningRate,
    grad_clipping: Option<&'a burn::grad_clipping::GradientClipping>,
    placement: StatePlacement,
    context: &'a OffloadContext,
    traffic: &'a mut StateTraffic,
}

impl<S, B, D> ModuleMapper<B> for StateMapper<'_, S, B>
where
    B: AutodiffBackend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    S: SimpleOptimizer<B::InnerBackend>,
{
    fn map_float<const N: usize>(&mut self, param: Param<Tensor<B, N>>) -> Param<Tensor<B, N>> {
        let (id, tensor, mapper) = param.consume();
        let Some((grad, device)) = self.grads.remove::<B::InnerBackend, N>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let is_require_grad = tensor.is_require_grad();
        let offloaded = querying_placement(|| tensor.device()).is_host();
        let in_host = self.placement.in_host(offloaded);
        let (key, record) = self.records.remove_entry(&id).unzip();
        let tensor = if tensor.device() != device {
            tensor.to_device(&device)
        } else {
            tensor
        };
        let grad = match self.grad_clipping {
            Some(clipping) => clipping.clip_gradient(grad),
            None => grad,
        };
        let compute = OffloadDevice::Device(device.compute().clone());
        let host = OffloadDevice::Host(device.compute().clone());

        // The old state into device memory (an upload of what was in host memory; a no-op for
        // state already there), its host buffers kept to be given back.
        let mut old = None;
        let state = record.map(|record| {
            let state = record.into_state::<N>();
            let held = census(|| drop(S::to_device(state.clone(), &compute)));
            self.traffic.uploaded_bytes += held.host;
            if held.host > 0 {
                old = Some(state.clone());
            }
            in_moves(self.context, || S::to_device(state, &compute))
        });

        let (tensor, state) = self.optim.step(self.lr, tensor.inner(), grad, state);

        if let Some(state) = state {
            let target = if in_host { &host } else { &compute };
            let state = crate::recycle::recycling(|| {
                if let Some(old) = old {
                    // The old host buffers go to the pool (O(1): no copy), where the new
                    // state's moves to host memory take them.
                    crate::recycle::donating(|| drop(S::to_device(old, &host)));
                }
                in_moves(self.context, || S::to_device(state, target))
            });
            let placed = census(|| drop(S::to_device(state.clone(), &compute)));
            self.traffic.downloaded_bytes += placed.host;
            let key = key.unwrap_or(id);
            self.sizes.insert(key, placed);
            self.records.insert(key, AdaptorRecord::from_state(state));
        }

        let mut tensor = Tensor::from_inner(tensor);
        if is_require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}
