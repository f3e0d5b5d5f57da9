//! The fit planner: which parameters to offload so that a model fits a device-memory budget,
//! and how fast one step will then be — llama.cpp's `--fit`, ExecuTorch's weight-offload
//! budget — where [`OffloadPolicy::from_gib`] needs the user to work out the bytes.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
//! use burn_offload::fit::{DeviceBudget, FitPlanner, fit_params};
//! use burn_offload::{OffloadBackend, OffloadDevice};
//!
//! #[derive(burn::module::Module, Debug)]
//! struct Net<B: burn::tensor::backend::Backend> {
//!     embed: Embedding<B>,
//!     proj: Linear<B>,
//! }
//! type B = OffloadBackend<NdArray>;
//! let device = OffloadDevice::device(Default::default());
//! let net = Net::<B> {
//!     embed: EmbeddingConfig::new(1000, 256).init(&device), // 1000 KiB
//!     proj: LinearConfig::new(256, 256).init(&device),      // 257 KiB
//! };
//! // 1.5 MiB of device memory, 512 KiB of it for the KV cache, activations and a reserve.
//! let budget = DeviceBudget::new(3 << 19).reserve(512 << 10);
//! let params = fit_params(&net, &["embed"]);
//! let plan = FitPlanner::new(budget).plan(&params)?;
//! // The embedding table costs least to offload (a step gathers a few rows of it).
//! assert_eq!(plan.offloaded().map(|p| p.path.as_str()).collect::<Vec<_>>(), ["embed.weight"]);
//! let (net, report) = plan.policy().apply(net)?;
//! assert_eq!(report.offloaded_bytes(), plan.offloaded_bytes());
//! # Ok::<(), burn_offload::OffloadError>(())
//! ```
//!
//! The order: tensors that cost least per step go first. An embedding table read by gathering
//! rows in place moves only the rows a step uses (but in `copy` mode, the whole table); small
//! tensors (norms, biases: rank 1) always stay resident; then the largest matrices, each of
//! which moves whole every step. Device memory also holds the copies in flight of the mode,
//! which grow with the largest copied tensor, so the planner also tries each smaller size as a
//! cap on what is copied, and keeps the placement that fits and moves the fewest bytes per
//! step. When none fits, [`FitPlanner::plan`] fails with the least budget that would
//! ([`OffloadError::DoesNotFit`]), before anything is loaded.
//!
//! [`FitPlan::estimate`] predicts a step's time from a [`Calibration`]: the bytes read from
//! host memory per step over the measured rates, against the resident matmuls at the measured
//! device rate. It counts weights only (attention over the KV cache, norms and launch costs are
//! left out), so it is a floor that a weight-bound decode step approaches; and it costs every
//! matmul at the step's rows (a prefill that runs the LM head on the last position only costs
//! less than predicted).

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, backend::Backend};
use burn_backend::get_device_settings;

use crate::auto::Calibration;
use crate::error::OffloadError;
use crate::mode::{DEFAULT_PREFETCH_LOOKAHEAD_BYTES, OffloadMode};
use crate::policy::{OffloadPolicy, filter_matches, human_bytes};
use crate::train::{OptimizerState, StatePlacement};

const GIB: f64 = (1u64 << 30) as f64;

/// Device bytes of a parameter's gradient and state in training (`None`: inference).
#[derive(Clone, Copy, Default)]
struct TrainingCost {
    gradient: u64,
    state: u64,
}

impl TrainingCost {
    fn device(self) -> u64 {
        self.gradient.saturating_add(self.state)
    }
}

fn training_cost(training: Option<OptimizerState>, p: &FitParam, offloaded: bool) -> TrainingCost {
    match training {
        Some(s) => TrainingCost {
            gradient: p.bytes,
            state: if s.placement.in_host(offloaded) {
                0
            } else {
                s.bytes_for(p.bytes)
            },
        },
        None => TrainingCost::default(),
    }
}

/// Device bytes of resident weights, gradients and optimizer state for a placement.
fn training_parts(
    training: Option<OptimizerState>,
    params: &[FitParam],
    offload: &[bool],
) -> crate::train::memory::TrainingBytes {
    let mut parts = crate::train::memory::TrainingBytes::default();
    for (p, &off) in params.iter().zip(offload) {
        if !off {
            parts.weights += p.bytes;
        }
        let c = training_cost(training, p, off);
        parts.gradients += c.gradient;
        parts.state += c.state;
    }
    parts
}

/// How a forward pass reads a parameter, which decides what offloading it costs per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamUse {
    /// Read whole by matmuls (linear weights, a tied LM head): offloaded, every step moves all
    /// of it over the bus.
    Matmul,
    /// An embedding table read by gathering rows: read in place, a step moves only the rows it
    /// uses; copied, the whole table.
    Gathered,
    /// A norm's scale, a bias (rank 1): too small to be worth offloading; kept resident.
    Small,
}

/// One parameter as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct FitParam {
    /// Full dotted path, as [`OffloadPolicy`] matches it.
    pub path: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes in memory: in the module's float type, or packed for a quantized parameter
    /// ([`quantize_fit_params`]).
    pub bytes: u64,
    /// How it is read.
    pub usage: ParamUse,
}

impl FitParam {
    /// Bytes of one row (the last dimension): what a gather reads per index.
    fn row_bytes(&self) -> u64 {
        let rows = self.shape.iter().rev().skip(1).product::<usize>().max(1);
        self.bytes / rows as u64
    }
}

/// `params` sized as a policy with `quantization` places them: each parameter it quantizes at
/// its packed size (values and scales), so that the plan, its policy and its estimate count
/// the bytes that will be in memory and cross the bus. Errors as
/// [`Quantization::scheme_for`](crate::Quantization::scheme_for) does.
pub fn quantize_fit_params(
    params: &mut [FitParam],
    quantization: &crate::Quantization,
) -> Result<(), OffloadError> {
    for p in params.iter_mut() {
        if let Some(scheme) = quantization.scheme_for(&p.path, &p.shape)? {
            p.bytes = crate::quant::tensor_bytes(&p.shape, burn_backend::DType::QFloat(scheme));
        }
    }
    Ok(())
}

/// The float parameters of `module` in module order, sized as [`OffloadPolicy::apply`] sizes
/// them (a lazy parameter in its device's float type), without initialising any. Parameters
/// matching one of the `gathered` filters (dotted segments, as
/// [`OffloadPolicy::params`]) are [`ParamUse::Gathered`] — name an embedding table there only if
/// nothing else reads it whole (not a head tied to it); rank-1 ones are [`ParamUse::Small`];
/// the others [`ParamUse::Matmul`].
pub fn fit_params<B: Backend, M: Module<B>>(module: &M, gathered: &[&str]) -> Vec<FitParam> {
    struct Visitor<'a> {
        path: Vec<String>,
        gathered: &'a [&'a str],
        out: Vec<FitParam>,
    }
    impl<B: Backend> ModuleVisitor<B> for Visitor<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }

        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let (shape, dtype) = if param.is_initialized() {
                let value = param.val();
                (value.shape().to_vec(), value.dtype())
            } else {
                let device = param.lazy_device();
                let dtype = get_device_settings::<B>(&device).float_dtype.into();
                (param.lazy_shape().to_vec(), dtype)
            };
            let path = self.path.join(".");
            let usage = if self.gathered.iter().any(|g| filter_matches(g, &path)) {
                ParamUse::Gathered
            } else if shape.len() <= 1 {
                ParamUse::Small
            } else {
                ParamUse::Matmul
            };
            self.out.push(FitParam {
                bytes: crate::quant::tensor_bytes(&shape, dtype),
                path,
                shape,
                usage,
            });
        }
    }
    let mut visitor = Visitor {
        path: Vec::new(),
        gathered,
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// The device memory a model may use, and what besides its parameters needs some of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceBudget {
    /// Device memory for this model in all.
    pub device_bytes: u64,
    /// Held back for the runtime, the backend's memory pools and fragmentation.
    pub reserve_bytes: u64,
    /// The KV cache for the run's batch and context.
    pub kv_cache_bytes: u64,
    /// Activations of the largest step (usually the prefill).
    pub activation_bytes: u64,
}

impl DeviceBudget {
    /// `device_bytes` of device memory, with the [default reserve](Self::default_reserve) of a
    /// device of that size, no KV cache and no activations (set them with the builders).
    pub fn new(device_bytes: u64) -> Self {
        Self {
            device_bytes,
            reserve_bytes: Self::default_reserve(device_bytes),
            kv_cache_bytes: 0,
            activation_bytes: 0,
        }
    }

    /// A budget of `gib` GiB (`--gpu-budget-gb`); errors on NaN, infinite, zero or negative
    /// values.
    pub fn from_gib(gib: f64) -> Result<Self, OffloadError> {
        if !gib.is_finite() || gib <= 0.0 || gib > OffloadPolicy::MAX_GIB {
            return Err(OffloadError::InvalidDeviceBudget { value: gib });
        }
        Ok(Self::new((gib * GIB).round() as u64))
    }

    /// The reserve for `device_bytes`: 1/16 of it (a CubeCL memory page can be that large,
    /// and one more may be opened at any time) plus 512 MiB (kernels, the runtime's own
    /// buffers).
    pub fn default_reserve(device_bytes: u64) -> u64 {
        device_bytes / 16 + (512 << 20)
    }

    /// Sets the reserve.
    pub fn reserve(mut self, bytes: u64) -> Self {
        self.reserve_bytes = bytes;
        self
    }

    /// Sets the KV cache's bytes.
    pub fn kv_cache(mut self, bytes: u64) -> Self {
        self.kv_cache_bytes = bytes;
        self
    }

    /// Sets the activations' bytes.
    pub fn activations(mut self, bytes: u64) -> Self {
        self.activation_bytes = bytes;
        self
    }

    /// The least budget that leaves `needs` bytes (reserve included) available: `needs`
    /// itself, or, where this budget's reserve is the default one (which grows with the
    /// budget), the budget whose default reserve leaves the rest.
    fn minimum_for(&self, needs: u64) -> u64 {
        if self.reserve_bytes != Self::default_reserve(self.device_bytes) {
            return needs;
        }
        // m - (m / 16 + 512 MiB) >= rest  <=  m >= (rest + 512 MiB) * 16 / 15.
        let rest = needs.saturating_sub(self.reserve_bytes) as u128 + (512 << 20);
        u64::try_from((rest * 16).div_ceil(15)).unwrap_or(u64::MAX)
    }

    /// What is needed besides the parameters and the copies in flight.
    fn fixed(&self) -> u64 {
        self.reserve_bytes
            .saturating_add(self.kv_cache_bytes)
            .saturating_add(self.activation_bytes)
    }
}

/// Chooses what to offload for a [`DeviceBudget`].
#[derive(Debug, Clone, PartialEq)]
pub struct FitPlanner {
    /// The budget.
    pub budget: DeviceBudget,
    /// The mode the plan's policy will use (it decides the device memory for copies in
    /// flight, and whether a gathered table is read in place).
    pub mode: OffloadMode,
    /// Whether the device reads host memory in place
    /// ([`TargetDevice::reads_host_in_place`](crate::inner::TargetDevice::reads_host_in_place)).
    pub reads_in_place: bool,
    /// Rows of a decode step (the batch): a gathered table read in place moves this many rows
    /// a step.
    pub decode_rows: usize,
    /// Rows of the largest step (the prefill: batch × prompt length).
    pub prefill_rows: usize,
    /// The most rows an in-place read takes
    /// ([`OffloadTarget::zero_copy_max_rows`](crate::inner::OffloadTarget::zero_copy_max_rows)):
    /// a step with more rows copies each offloaded matrix, in `uva` too.
    pub in_place_max_rows: usize,
    /// Whether `auto` sends its copies through the prefetcher, as it does where copies overlap
    /// compute ([`Calibration::copies_overlap_compute`]: CUDA); its copies in flight are then
    /// counted as prefetch's, with `auto`'s lookahead (the default lookahead or twice the
    /// largest offloaded tensor, whichever is larger).
    pub auto_prefetches: bool,
    /// Training: every parameter has a gradient of its size in device memory, and optimizer
    /// state where this says; `None` plans for inference.
    pub training: Option<OptimizerState>,
}

/// One candidate placement while planning.
#[derive(Clone)]
struct Walk {
    offload: Vec<bool>,
    resident: u64,
    /// Bytes of the offloaded tensors that are copied to be read, and the largest of them.
    copied: u64,
    largest_copied: u64,
    /// The largest offloaded tensor, copied or not (it sets `auto`'s lookahead).
    largest: u64,
    /// Bytes a decode step moves over the bus.
    bus: u64,
    /// Training: device bytes of optimizer state in flight during a step.
    state_staging: u64,
}

impl FitPlanner {
    /// A planner for `budget`, mode `Auto`, a device that reads host memory in place at any
    /// row count, batch 1 and a one-row prefill (set the rows a run has with
    /// [`rows`](Self::rows)).
    pub fn new(budget: DeviceBudget) -> Self {
        Self {
            budget,
            mode: OffloadMode::Auto,
            reads_in_place: true,
            decode_rows: 1,
            prefill_rows: 1,
            in_place_max_rows: usize::MAX,
            auto_prefetches: false,
            training: None,
        }
    }

    /// Plans for training with `state` (see [`training`](Self::training)): weights, gradients
    /// and optimizer state against the budget, whose activations are the training step's
    /// (forward activations kept for the backward pass).
    pub fn training(mut self, state: OptimizerState) -> Self {
        self.training = Some(state);
        self
    }

    /// Device bytes `p` takes besides copies in flight: resident (`offloaded` false) its
    /// weight, and in training its gradient and state where they live on the device.
    fn device_cost(&self, p: &FitParam, offloaded: bool) -> u64 {
        let weight = if offloaded { 0 } else { p.bytes };
        weight.saturating_add(training_cost(self.training, p, offloaded).device())
    }

    /// Device bytes of the optimizer state in flight during a step where it lives in host
    /// memory: the old (uploaded) and new state of the largest parameter whose state is there.
    fn state_staging(&self, params: &[FitParam], offload: &[bool]) -> u64 {
        let Some(state) = self.training else {
            return 0;
        };
        params
            .iter()
            .zip(offload)
            .filter(|(_, off)| state.placement.in_host(**off))
            .map(|(p, _)| state.bytes_for(p.bytes).saturating_mul(2))
            .max()
            .unwrap_or(0)
    }

    /// Sets whether `auto` prefetches its copies (see
    /// [`auto_prefetches`](Self::auto_prefetches)); `calibration.copies_overlap_compute` says.
    pub fn auto_prefetches(mut self, prefetches: bool) -> Self {
        self.auto_prefetches = prefetches;
        self
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: OffloadMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets whether the device reads host memory in place, and up to how many rows.
    pub fn reads_in_place(mut self, reads_in_place: bool, max_rows: usize) -> Self {
        self.reads_in_place = reads_in_place;
        self.in_place_max_rows = max_rows;
        self
    }

    /// Sets the rows of a decode step (the batch) and of the prefill (batch × prompt).
    pub fn rows(mut self, decode: usize, prefill: usize) -> Self {
        self.decode_rows = decode.max(1);
        self.prefill_rows = prefill.max(decode).max(1);
        self
    }

    /// Whether a gathered table is read in place (only its rows move) in this mode: in every
    /// mode but `copy`, where the device can.
    fn gathers_in_place(&self) -> bool {
        self.reads_in_place && self.mode != OffloadMode::Copy
    }

    /// Whether `uva` reads every offloaded matrix in place at every step of the run.
    fn matmuls_in_place(&self) -> bool {
        self.reads_in_place
            && self.mode == OffloadMode::Uva
            && self.prefill_rows <= self.in_place_max_rows
    }

    /// Whether `p`, offloaded, is copied to device memory to be read (at some step).
    fn copied(&self, p: &FitParam) -> bool {
        match p.usage {
            ParamUse::Gathered => !self.gathers_in_place(),
            _ => !self.matmuls_in_place(),
        }
    }

    /// Device bytes of the copies in flight for `w`: none when nothing is copied; the copy in
    /// use and the one before it (freed once the stream is past it); with prefetch, the copy
    /// in use and the lookahead (at most every copied byte).
    fn staging(&self, w: &Walk) -> u64 {
        let lookahead = match self.mode {
            OffloadMode::Prefetch {
                lookahead_bytes, ..
            } => Some(lookahead_bytes),
            OffloadMode::Auto if self.auto_prefetches => {
                Some(DEFAULT_PREFETCH_LOOKAHEAD_BYTES.max(w.largest.saturating_mul(2)))
            }
            _ => None,
        };
        match lookahead {
            Some(l) => l.min(w.copied).saturating_add(w.largest_copied),
            None => w.largest_copied.saturating_mul(2),
        }
    }

    /// Device bytes `w` needs in all.
    fn needs(&self, w: &Walk) -> u64 {
        w.resident
            .saturating_add(self.staging(w))
            .saturating_add(w.state_staging)
            .saturating_add(self.budget.fixed())
    }

    /// Bytes one decode step moves over the bus for `p` if it is offloaded.
    fn step_cost(&self, p: &FitParam) -> u64 {
        match p.usage {
            ParamUse::Gathered if self.gathers_in_place() => {
                p.row_bytes().saturating_mul(self.decode_rows as u64)
            }
            _ => p.bytes,
        }
    }

    /// The plan for `params` (from [`fit_params`]): nothing offloaded if everything fits;
    /// else the placement that fits and moves the fewest bytes per step, found by offloading
    /// the cheapest tensors first (gathered tables read in place), then the largest matrices —
    /// among all of them, and, since copies in flight grow with the largest copied tensor,
    /// among those up to each smaller size. [`OffloadError::DoesNotFit`], with the least
    /// budget that would do, if none fits.
    pub fn plan(&self, params: &[FitParam]) -> Result<FitPlan, OffloadError> {
        let budget = self.budget;
        // Cheapest per byte first (a gathered table read in place moves a few rows), then the
        // largest, then module order.
        let mut order: Vec<usize> = (0..params.len())
            .filter(|&i| params[i].usage != ParamUse::Small)
            .collect();
        order.sort_by(|&a, &b| {
            let ratio =
                |i: usize| self.step_cost(&params[i]) as f64 / params[i].bytes.max(1) as f64;
            ratio(a)
                .total_cmp(&ratio(b))
                .then(params[b].bytes.cmp(&params[a].bytes))
                .then(a.cmp(&b))
        });
        // Caps on the size of a copied tensor: none, then each smaller size.
        let mut caps: Vec<u64> = order
            .iter()
            .filter(|&&i| self.copied(&params[i]))
            .map(|&i| params[i].bytes)
            .collect();
        caps.sort_unstable_by(|a, b| b.cmp(a));
        caps.dedup();
        if caps.is_empty() {
            caps.push(u64::MAX);
        }
        let none = vec![false; params.len()];
        let start = Walk {
            resident: params.iter().map(|p| self.device_cost(p, false)).sum(),
            state_staging: self.state_staging(params, &none),
            offload: none,
            copied: 0,
            largest_copied: 0,
            largest: 0,
            bus: 0,
        };
        let mut best: Option<Walk> = None;
        // The placement that needs the least (of every one tried), for the error.
        let mut least = start.clone();
        for cap in caps {
            let mut w = start.clone();
            for &i in &order {
                if self.needs(&w) <= budget.device_bytes {
                    break;
                }
                let p = &params[i];
                let copied = self.copied(p);
                if copied && p.bytes > cap {
                    continue;
                }
                w.offload[i] = true;
                w.resident -= self.device_cost(p, false) - self.device_cost(p, true);
                w.state_staging = self.state_staging(params, &w.offload);
                w.largest = w.largest.max(p.bytes);
                w.bus = w.bus.saturating_add(self.step_cost(p));
                if copied {
                    w.copied = w.copied.saturating_add(p.bytes);
                    w.largest_copied = w.largest_copied.max(p.bytes);
                }
                if self.needs(&w) < self.needs(&least) {
                    least = w.clone();
                }
            }
            if self.needs(&w) <= budget.device_bytes {
                let count = |w: &Walk| w.offload.iter().filter(|o| **o).count();
                if best
                    .as_ref()
                    .is_none_or(|b| (w.bus, count(&w)) < (b.bus, count(b)))
                {
                    best = Some(w);
                }
            }
        }
        if let Some(w) = best {
            return Ok(FitPlan {
                params: params.to_vec(),
                staging_bytes: self.staging(&w),
                state_staging_bytes: w.state_staging,
                offload: w.offload,
                budget,
                mode: self.mode,
                gathers_in_place: self.gathers_in_place(),
                training: self.training,
            });
        }
        let w = least;
        let staging = self.staging(&w);
        let resident = if self.training.is_some() {
            let parts = training_parts(self.training, params, &w.offload);
            format!(
                "the {} of resident weights (norms, biases, …), gradients ({}), optimizer state \
                 on the device ({}) and in flight during a step ({})",
                human_bytes(parts.weights),
                human_bytes(parts.gradients),
                human_bytes(parts.state),
                human_bytes(w.state_staging)
            )
        } else {
            format!(
                "the {} of norms, biases and other resident parameters",
                human_bytes(w.resident)
            )
        };
        Err(OffloadError::DoesNotFit {
            budget_bytes: budget.device_bytes,
            minimum_bytes: budget.minimum_for(self.needs(&w)),
            breakdown: format!(
                "{resident}, the KV cache ({}), activations ({}), copies in flight ({}{}) and \
                 the reserve ({})",
                human_bytes(budget.kv_cache_bytes),
                human_bytes(budget.activation_bytes),
                human_bytes(staging),
                if matches!(self.mode, OffloadMode::Prefetch { .. })
                    || (self.mode == OffloadMode::Auto && self.auto_prefetches)
                {
                    ", with the prefetch lookahead: a smaller one needs less"
                } else {
                    ""
                },
                human_bytes(budget.reserve_bytes)
            ),
        })
    }
}

/// What [`FitPlanner::plan`] chose.
#[derive(Debug, Clone, PartialEq)]
pub struct FitPlan {
    /// Every parameter, in module order.
    pub params: Vec<FitParam>,
    /// Whether each of `params` is offloaded.
    pub offload: Vec<bool>,
    /// The budget it was made for.
    pub budget: DeviceBudget,
    /// The mode of its policy.
    pub mode: OffloadMode,
    /// Whether gathered tables are read in place (only their used rows move).
    pub gathers_in_place: bool,
    /// Device bytes set aside for copies in flight.
    pub staging_bytes: u64,
    /// Training: device bytes of optimizer state in flight during a step (state kept in host
    /// memory, streamed through one parameter at a time).
    pub state_staging_bytes: u64,
    /// The optimizer state it planned a training run for (`None`: inference).
    pub training: Option<OptimizerState>,
}

impl FitPlan {
    /// The offloaded parameters, in module order.
    pub fn offloaded(&self) -> impl Iterator<Item = &FitParam> {
        self.params
            .iter()
            .zip(&self.offload)
            .filter(|(_, o)| **o)
            .map(|(p, _)| p)
    }

    /// The resident parameters, in module order.
    pub fn resident(&self) -> impl Iterator<Item = &FitParam> {
        self.params
            .iter()
            .zip(&self.offload)
            .filter(|(_, o)| !**o)
            .map(|(p, _)| p)
    }

    /// Bytes of the offloaded parameters.
    pub fn offloaded_bytes(&self) -> u64 {
        self.offloaded().map(|p| p.bytes).sum()
    }

    /// Bytes of the resident parameters.
    pub fn resident_bytes(&self) -> u64 {
        self.resident().map(|p| p.bytes).sum()
    }

    /// Device bytes the plan expects to use: resident parameters, copies in flight, KV cache,
    /// activations and reserve; in training also gradients, optimizer state on the device and
    /// in flight.
    pub fn device_bytes(&self) -> u64 {
        let training = training_parts(self.training, &self.params, &self.offload);
        self.resident_bytes()
            .saturating_add(training.gradients)
            .saturating_add(training.state)
            .saturating_add(self.staging_bytes)
            .saturating_add(self.state_staging_bytes)
            .saturating_add(self.budget.fixed())
    }

    /// In training, the device bytes of gradients and optimizer state (`weights`: resident
    /// weights); zero gradients and state for inference.
    pub fn training_bytes(&self) -> crate::train::memory::TrainingBytes {
        training_parts(self.training, &self.params, &self.offload)
    }

    /// The policy that offloads exactly this plan's parameters, in its mode (and, for
    /// training, with its optimizer state).
    pub fn policy(&self) -> OffloadPolicy {
        let budget: u64 = self
            .offloaded()
            .map(|p| {
                let with_state = self
                    .training
                    .filter(|s| s.placement == StatePlacement::WithOffloaded);
                p.bytes
                    .saturating_add(with_state.map_or(0, |s| s.bytes_for(p.bytes)))
            })
            .sum();
        let policy = OffloadPolicy::from_bytes(budget)
            .paths(self.offloaded().map(|p| p.path.clone()))
            .mode(self.mode);
        match self.training {
            Some(state) => policy.optimizer_state(state),
            None => policy,
        }
    }

    /// The predicted time of one forward step over `rows` token rows (a decode step: the
    /// batch; a prefill: batch × prompt length), from `calibration`: resident weights at the
    /// measured device matmul rate; offloaded ones in place at the measured in-place rate, or
    /// copied at the measured upload rate (plus the matmul), overlapped with compute where the
    /// mode prefetches. Row counts beyond the calibrated ones are taken as compute-bound (time
    /// growing with the rows).
    pub fn estimate(&self, calibration: &Calibration, rows: usize) -> StepEstimate {
        let rows = rows.max(1);
        let rates = Rates::new(calibration, rows);
        let (mut compute, mut serial, mut overlapped) = (0.0, 0.0, 0.0);
        let mut bus_bytes = 0u64;
        let copy = |bytes: u64| calibration.upload_latency_s + bytes as f64 / rates.upload;
        for (p, &offloaded) in self.params.iter().zip(&self.offload) {
            match (p.usage, offloaded) {
                (ParamUse::Matmul, false) => compute += rates.matmul_seconds(p.bytes),
                (ParamUse::Gathered | ParamUse::Small, false) => {}
                (ParamUse::Matmul, true) => {
                    bus_bytes += p.bytes;
                    let in_place = rates.in_place_seconds(p.bytes);
                    let copied = copy(p.bytes) + rates.matmul_seconds(p.bytes);
                    let prefetched = match self.mode {
                        OffloadMode::Prefetch { .. } => true,
                        OffloadMode::Auto => calibration.copies_overlap_compute,
                        _ => false,
                    };
                    match (self.mode, in_place) {
                        (OffloadMode::Uva | OffloadMode::Auto, Some(t))
                            if self.mode == OffloadMode::Uva || t <= copied =>
                        {
                            serial += t
                        }
                        _ if prefetched => {
                            overlapped += copy(p.bytes);
                            compute += rates.matmul_seconds(p.bytes);
                        }
                        _ => serial += copied,
                    }
                }
                (ParamUse::Gathered, true) if self.gathers_in_place => {
                    let bytes = p.row_bytes() * rows as u64;
                    bus_bytes += bytes.min(p.bytes);
                    serial += bytes.min(p.bytes) as f64 / rates.upload;
                }
                (_, true) => {
                    bus_bytes += p.bytes;
                    serial += copy(p.bytes);
                }
            }
        }
        StepEstimate {
            rows,
            bus_bytes,
            bus_seconds: serial + overlapped,
            compute_seconds: compute,
            compute_measured: !calibration.rows.is_empty(),
            seconds: (compute + serial).max(overlapped + serial),
        }
    }
}

/// The calibrated rates that apply to a row count.
struct Rates {
    upload: f64,
    /// Device matmul bytes/s (extrapolated as compute-bound past the measured rows).
    matmul: Option<f64>,
    /// In-place bytes/s, where measured for this many rows.
    in_place: Option<f64>,
}

impl Rates {
    fn new(c: &Calibration, rows: usize) -> Self {
        let at = c.rows.iter().find(|r| r.rows >= rows);
        let matmul = match (at, c.rows.last()) {
            (Some(r), _) => Some(r.device_matmul_bytes_per_s),
            (None, Some(last)) => {
                Some(last.device_matmul_bytes_per_s * last.rows as f64 / rows as f64)
            }
            (None, None) => None,
        };
        Self {
            upload: c.upload_bytes_per_s.max(1.0),
            matmul,
            in_place: at.map(|r| r.zero_copy_bytes_per_s),
        }
    }

    fn matmul_seconds(&self, bytes: u64) -> f64 {
        self.matmul.map_or(0.0, |rate| bytes as f64 / rate)
    }

    fn in_place_seconds(&self, bytes: u64) -> Option<f64> {
        self.in_place.map(|rate| bytes as f64 / rate)
    }
}

/// A predicted step time ([`FitPlan::estimate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEstimate {
    /// Token rows of the step.
    pub rows: usize,
    /// Bytes read from host memory (over the bus on a GPU) per step.
    pub bus_bytes: u64,
    /// Seconds of those reads at the calibrated rates.
    pub bus_seconds: f64,
    /// Seconds of the matmuls over device-resident weights (and over the copies).
    pub compute_seconds: f64,
    /// Whether the device's matmul rate was measured (not on devices that cannot read host
    /// memory in place, whose calibration has no row rates: `compute_seconds` is then 0).
    pub compute_measured: bool,
    /// The predicted step: compute plus reads, or the longer of the two where copies are
    /// prefetched during compute.
    pub seconds: f64,
}

impl std::fmt::Display for StepEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} ms ({} from host memory in {:.3} ms; resident matmuls {})",
            self.seconds * 1e3,
            human_bytes(self.bus_bytes),
            self.bus_seconds * 1e3,
            if self.compute_measured {
                format!("{:.3} ms", self.compute_seconds * 1e3)
            } else {
                "not measured on this device".to_string()
            }
        )
    }
}

impl std::fmt::Display for FitPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.budget;
        let count = |off: bool| self.offload.iter().filter(|o| **o == off).count();
        writeln!(
            f,
            "fit plan for a device budget of {} (mode {}):",
            human_bytes(b.device_bytes),
            self.mode
        )?;
        let mut rows = vec![
            (
                "parameters resident",
                self.resident_bytes(),
                format!("{} tensors", count(false)),
            ),
            (
                "parameters offloaded",
                self.offloaded_bytes(),
                format!("{} tensors, in host memory", count(true)),
            ),
        ];
        if let Some(state) = self.training {
            let parts = self.training_bytes();
            rows.push(("gradients", parts.gradients, "every parameter's".into()));
            rows.push((
                "optimizer state",
                parts.state,
                format!(
                    "on the device ({} value(s) per parameter value, placement {})",
                    state.values_per_param, state.placement
                ),
            ));
            rows.push((
                "state in flight",
                self.state_staging_bytes,
                "during a step".into(),
            ));
        }
        rows.extend([
            ("KV cache", b.kv_cache_bytes, String::new()),
            ("activations", b.activation_bytes, "estimate".into()),
            ("copies in flight", self.staging_bytes, String::new()),
            ("reserve", b.reserve_bytes, "runtime, memory pools".into()),
        ]);
        for (what, bytes, note) in rows {
            writeln!(f, "  {what:<21} {:>10}  {note}", human_bytes(bytes))?;
        }
        write!(
            f,
            "  {:<21} {:>10}  of {}",
            "device total",
            human_bytes(self.device_bytes()),
            human_bytes(b.device_bytes)
        )?;
        let gathered: Vec<&str> = self
            .offloaded()
            .filter(|p| p.usage == ParamUse::Gathered)
            .map(|p| p.path.as_str())
            .collect();
        if !gathered.is_empty() {
            write!(
                f,
                "\n  gathered tables offloaded: {}{}",
                gathered.join(", "),
                if self.gathers_in_place {
                    " (read in place: a step moves only its rows)"
                } else {
                    " (copied whole per use in this mode)"
                }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auto::RowRate;

    const MIB: u64 = 1 << 20;

    fn param(path: &str, shape: &[usize], usage: ParamUse) -> FitParam {
        FitParam {
            path: path.into(),
            shape: shape.to_vec(),
            bytes: shape.iter().product::<usize>() as u64 * 4,
            usage,
        }
    }

    /// An 8 MiB embedding table; two layers of a 4 KiB norm, a 4 MiB and a 2 MiB matrix; a
    /// 4 MiB head.
    fn model() -> Vec<FitParam> {
        let mut p = vec![param("embed.weight", &[2048, 1024], ParamUse::Gathered)];
        for l in 0..2 {
            p.push(param(
                &format!("layers.{l}.norm.gamma"),
                &[1024],
                ParamUse::Small,
            ));
            p.push(param(
                &format!("layers.{l}.up.weight"),
                &[1024, 1024],
                ParamUse::Matmul,
            ));
            p.push(param(
                &format!("layers.{l}.down.weight"),
                &[512, 1024],
                ParamUse::Matmul,
            ));
        }
        p.push(param("head.weight", &[1024, 1024], ParamUse::Matmul));
        p
    }

    fn paths(plan: &FitPlan) -> Vec<&str> {
        plan.offloaded().map(|p| p.path.as_str()).collect()
    }

    fn budget(mib: u64) -> DeviceBudget {
        DeviceBudget::new(mib * MIB).reserve(MIB)
    }

    #[test]
    fn everything_fits_nothing_is_offloaded() {
        let total: u64 = model().iter().map(|p| p.bytes).sum();
        let plan = FitPlanner::new(DeviceBudget::new(total + MIB).reserve(MIB))
            .plan(&model())
            .unwrap();
        assert_eq!(plan.offloaded_bytes(), 0);
        assert_eq!(plan.policy().max_bytes, 0);
        assert_eq!(plan.device_bytes(), total + MIB);
    }

    #[test]
    fn the_gathered_table_goes_first_then_the_largest_matrices() {
        // 8 + 2 * (4 + 2) + 4 MiB + 8 KiB of norms = 24 MiB and a bit; 1 MiB reserve.
        let planner = FitPlanner::new(budget(20)).mode(OffloadMode::Uva);
        let plan = planner.plan(&model()).unwrap();
        assert_eq!(paths(&plan), ["embed.weight"]);
        assert_eq!(plan.staging_bytes, 0);
        let plan = FitPlanner::new(budget(12))
            .mode(OffloadMode::Uva)
            .plan(&model())
            .unwrap();
        // The 4 MiB matrices in module order after the table.
        assert_eq!(
            paths(&plan),
            ["embed.weight", "layers.0.up.weight", "layers.1.up.weight"]
        );
        assert!(plan.device_bytes() <= 12 * MIB, "{plan}");
        // Norms are never offloaded.
        let plan = FitPlanner::new(budget(2))
            .mode(OffloadMode::Uva)
            .plan(&model())
            .unwrap();
        assert_eq!(plan.resident().count(), 2);
        assert!(plan.resident().all(|p| p.usage == ParamUse::Small));
    }

    #[test]
    fn in_a_copying_mode_the_table_is_a_matrix_like_any_other_and_copies_need_room() {
        // 24 MiB and 8 KiB in all, 1 MiB reserve, a 24 MiB budget. Copy: the table moves
        // whole per use, so it is a matrix like the others, and two copies of the largest
        // copied tensor are in flight. Offloading the 8 MiB table first would need the
        // 4 MiB matrices too (20 MiB a step); leaving it resident, the three 4 MiB matrices do
        // with 8 MiB of copies in flight (12 MiB a step).
        let fours = ["layers.0.up.weight", "layers.1.up.weight", "head.weight"];
        let plan = FitPlanner::new(budget(24))
            .mode(OffloadMode::Copy)
            .plan(&model())
            .unwrap();
        assert_eq!(paths(&plan), fours);
        assert_eq!(plan.staging_bytes, 8 * MIB);
        assert!(plan.device_bytes() <= 24 * MIB, "{plan}");
        // A device that cannot read host memory: uva copies too.
        let plan = FitPlanner::new(budget(24))
            .mode(OffloadMode::Uva)
            .reads_in_place(false, 0)
            .plan(&model())
            .unwrap();
        assert_eq!(paths(&plan), fours);
        // So does uva on one that can, for the matrices, when a step has more rows than its
        // in-place reads take (a prefill of 32 rows, reads up to 16); the table is still
        // gathered in place. 16 MiB budget.
        let plan = FitPlanner::new(budget(16))
            .mode(OffloadMode::Uva)
            .reads_in_place(true, 16)
            .rows(1, 32)
            .plan(&model())
            .unwrap();
        assert_eq!(
            paths(&plan),
            [
                "embed.weight",
                "layers.0.up.weight",
                "layers.1.up.weight",
                "head.weight"
            ]
        );
        assert_eq!(plan.staging_bytes, 8 * MIB);
        let plan = FitPlanner::new(budget(16))
            .mode(OffloadMode::Uva)
            .reads_in_place(true, 16)
            .rows(1, 16)
            .plan(&model())
            .unwrap();
        assert_eq!(paths(&plan), ["embed.weight", "layers.0.up.weight"]);
        assert_eq!(plan.staging_bytes, 0);
        // Prefetch gathers the table in place too: it alone is enough, nothing is copied.
        let plan = FitPlanner::new(budget(24))
            .mode(OffloadMode::prefetch(12 * MIB))
            .plan(&model())
            .unwrap();
        assert_eq!(paths(&plan), ["embed.weight"]);
        assert_eq!(plan.staging_bytes, 0);
        // A lookahead that holds every copy (auto's where copies overlap compute is at least
        // 256 MiB): the copies in flight are every copied byte and the one in use, so
        // offloading only adds to what the device needs. 24 MiB do not hold the model, and the
        // least that does is to offload nothing.
        for mode in [OffloadMode::prefetch(1 << 30), OffloadMode::Auto] {
            let err = FitPlanner::new(budget(24))
                .mode(mode)
                .reads_in_place(false, 0)
                .auto_prefetches(true)
                .plan(&model())
                .unwrap_err();
            assert!(
                err.to_string().contains(
                    "copies in flight (0 B, with the prefetch lookahead: a smaller one needs less)"
                ),
                "{err}"
            );
            let OffloadError::DoesNotFit { minimum_bytes, .. } = err else {
                panic!("{err}")
            };
            assert_eq!(minimum_bytes, 25 * MIB + 8 * 1024);
            let b = DeviceBudget {
                device_bytes: minimum_bytes,
                ..budget(24)
            };
            let plan = FitPlanner::new(b).mode(mode).reads_in_place(false, 0);
            assert_eq!(
                plan.auto_prefetches(true)
                    .plan(&model())
                    .unwrap()
                    .offloaded_bytes(),
                0
            );
        }
    }

    #[test]
    fn the_minimum_with_the_default_reserve_fits_when_given_as_the_budget() {
        // The default reserve grows with the budget (1/16 + 512 MiB): the minimum accounts
        // for it.
        let kv = DeviceBudget::new(1 << 30).kv_cache(600 * MIB);
        let err = FitPlanner::new(kv)
            .mode(OffloadMode::Uva)
            .plan(&model())
            .unwrap_err();
        let OffloadError::DoesNotFit { minimum_bytes, .. } = err else {
            panic!("{err}")
        };
        let at = |bytes: u64| {
            FitPlanner::new(DeviceBudget::new(bytes).kv_cache(600 * MIB))
                .mode(OffloadMode::Uva)
                .plan(&model())
        };
        assert!(at(minimum_bytes).is_ok());
        assert!(at(minimum_bytes - 64).is_err());
    }

    #[test]
    fn a_budget_too_small_fails_with_the_minimum_that_would_do() {
        let b = budget(2).kv_cache(MIB).activations(MIB);
        let err = FitPlanner::new(b)
            .mode(OffloadMode::Uva)
            .plan(&model())
            .unwrap_err();
        // 8 KiB of norms + 1 MiB KV + 1 MiB activations + 1 MiB reserve, nothing in flight.
        let minimum = 3 * MIB + 8 * 1024;
        assert_eq!(
            err,
            OffloadError::DoesNotFit {
                budget_bytes: 2 * MIB,
                minimum_bytes: minimum,
                breakdown: "the 8.00 KiB of norms, biases and other resident parameters, the \
                            KV cache (1.00 MiB), activations (1.00 MiB), copies in flight (0 B) \
                            and the reserve (1.00 MiB)"
                    .into()
            }
        );
        let message = err.to_string();
        assert!(
            message.starts_with("the model does not fit a device budget of 2.00 MiB")
                && message.contains("--gpu-budget-gb 0.01"),
            "{message}"
        );
        // The minimum does fit.
        let b = DeviceBudget {
            device_bytes: minimum,
            ..b
        };
        assert!(
            FitPlanner::new(b)
                .mode(OffloadMode::Uva)
                .plan(&model())
                .is_ok()
        );
        assert!(DeviceBudget::from_gib(-1.0).is_err());
        assert!(DeviceBudget::from_gib(0.0).is_err());
        assert!(DeviceBudget::from_gib(f64::NAN).is_err());
        assert_eq!(DeviceBudget::from_gib(0.5).unwrap().device_bytes, 512 * MIB);
    }

    fn calibration() -> Calibration {
        // Upload 1 GB/s + 10 us; in place 0.5 GB/s at 1 row, 0.25 at 2; matmul 4 GB/s.
        Calibration {
            upload_latency_s: 10e-6,
            upload_bytes_per_s: 1e9,
            rows: vec![
                RowRate {
                    rows: 1,
                    zero_copy_bytes_per_s: 0.5e9,
                    device_matmul_bytes_per_s: 4e9,
                },
                RowRate {
                    rows: 2,
                    zero_copy_bytes_per_s: 0.25e9,
                    device_matmul_bytes_per_s: 4e9,
                },
            ],
            copies_overlap_compute: false,
            weight_bytes: 16 * MIB,
            seconds: 0.0,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
    }

    #[test]
    fn estimates_follow_the_calibrated_rates() {
        let c = calibration();
        let all = model();
        let matrices: u64 = all
            .iter()
            .filter(|p| p.usage == ParamUse::Matmul)
            .map(|p| p.bytes)
            .sum();
        // Nothing offloaded: matrices at 4 GB/s.
        let plan = FitPlanner::new(budget(64)).plan(&all).unwrap();
        let e = plan.estimate(&c, 1);
        assert_eq!(e.bus_bytes, 0);
        assert!(close(e.seconds, matrices as f64 / 4e9), "{e}");

        // Uva, everything offloaded: the table's one row (4 KiB) at 1 GB/s, matrices in
        // place at 0.5 GB/s.
        let plan = FitPlanner::new(budget(2))
            .mode(OffloadMode::Uva)
            .plan(&all)
            .unwrap();
        assert_eq!(plan.resident().count(), 2);
        let e = plan.estimate(&c, 1);
        assert_eq!(e.bus_bytes, matrices + 4096);
        assert!(
            close(e.seconds, 4096.0 / 1e9 + matrices as f64 / 0.5e9),
            "{e}"
        );
        // Copy: every matrix and the whole table uploaded, then multiplied.
        let mut copy = plan.clone();
        copy.mode = OffloadMode::Copy;
        copy.gathers_in_place = false;
        let e = copy.estimate(&c, 1);
        let table = 8 * MIB;
        assert_eq!(e.bus_bytes, matrices + table);
        let copies = 6;
        let expect =
            copies as f64 * 10e-6 + (matrices + table) as f64 / 1e9 + matrices as f64 / 4e9;
        assert!(close(e.seconds, expect), "{e} vs {expect}");
        // Prefetch: the uploads overlap the matmuls: the longer of the two.
        copy.mode = OffloadMode::prefetch(64 * MIB);
        let e = copy.estimate(&c, 1);
        let uploads_of_matrices = 5.0 * 10e-6 + matrices as f64 / 1e9;
        let table_copy = 10e-6 + table as f64 / 1e9;
        assert!(
            close(
                e.seconds,
                (matrices as f64 / 4e9 + table_copy).max(uploads_of_matrices + table_copy)
            ),
            "{e}"
        );
        // Auto at 2 rows: in place (4 ns/B) loses to a copy (1 + 0.25 ns/B).
        let mut auto = plan.clone();
        auto.mode = OffloadMode::Auto;
        let e = auto.estimate(&c, 2);
        let expect =
            2.0 * 4096.0 / 1e9 + 5.0 * 10e-6 + matrices as f64 / 1e9 + matrices as f64 / 4e9;
        assert!(close(e.seconds, expect), "{e} vs {expect}");
        // Past the measured rows the matmuls are taken as compute-bound.
        let resident = FitPlanner::new(budget(64)).plan(&all).unwrap();
        let e = resident.estimate(&c, 8);
        assert!(close(e.seconds, matrices as f64 / 4e9 * 4.0), "{e}");
    }
}
