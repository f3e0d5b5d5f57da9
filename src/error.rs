//! The errors a user of burn-offload can run into, each with what to change.

use thiserror::Error;

/// Everything that can go wrong when configuring or applying an offload policy.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum OffloadError {
    /// The offload budget in GiB is NaN, infinite or negative.
    #[error(
        "invalid offload budget {value} GiB: give a finite number of GiB >= 0 (e.g. `--offload-gb 12`)"
    )]
    InvalidBudget {
        /// The value as given.
        value: f64,
    },
    /// The offload budget in GiB is larger than the most bytes a budget can hold
    /// ([`OffloadPolicy::MAX_GIB`](crate::OffloadPolicy::MAX_GIB), `u64::MAX` bytes rounded
    /// down to whole GiB).
    #[error(
        "offload budget {value} GiB is too large: the largest accepted budget is {max} GiB; give \
         at most that (any budget at least the model's size offloads every eligible parameter)"
    )]
    BudgetTooLarge {
        /// The value as given.
        value: f64,
        /// The largest accepted value in GiB.
        max: f64,
    },
    /// A device-memory budget in GiB (for [`FitPlanner`](crate::fit::FitPlanner)) that is NaN,
    /// infinite or negative.
    #[error(
        "invalid device budget {value} GiB: give a finite number of GiB > 0 (e.g. \
         `--gpu-budget-gb 20`), or none to use the memory the device reports free"
    )]
    InvalidDeviceBudget {
        /// The value as given.
        value: f64,
    },
    /// A device-memory budget that no placement of the model fits ([`FitPlanner`](crate::fit::FitPlanner)
    /// tried offloading every eligible weight, and leaving the largest ones resident).
    #[error(
        "the model does not fit a device budget of {}: the placement that needs the least \
         device memory still needs {} ({breakdown}); give a budget of at least {} \
         (`--gpu-budget-gb {:.2}`), or lower the batch or the context length",
        crate::policy::human_bytes(*.budget_bytes),
        crate::policy::human_bytes(*.minimum_bytes),
        crate::policy::human_bytes(*.minimum_bytes),
        (*.minimum_bytes as f64 / (1u64 << 30) as f64 * 100.0).ceil() / 100.0
    )]
    DoesNotFit {
        /// The budget.
        budget_bytes: u64,
        /// The least budget that would do.
        minimum_bytes: u64,
        /// What the minimum is made of.
        breakdown: String,
    },
    /// A `prefetch` mode with a lookahead of 0 bytes, which could never prefetch anything.
    #[error(
        "invalid offload mode `prefetch:0`: a lookahead of 0 bytes never prefetches anything; give \
         a positive lookahead (`prefetch:<bytes>`, or `prefetch` for the default of 256 MiB) or \
         use `copy`"
    )]
    ZeroPrefetchLookahead,
    /// A parameter-name filter is empty or has an empty dotted segment.
    #[error(
        "invalid parameter filter {filter:?}: {reason}; use dotted name segments such as `mlp` or `experts.w2_weight`"
    )]
    InvalidParamFilter {
        /// The filter as given.
        filter: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `params` filter or a `paths` entry of a policy matches no parameter of the model it
    /// is applied to (a typo, or a filter written for another model's names).
    #[error(
        "the offload policy's {unmatched} match no parameter of this model; a filter matches \
         whole dotted segments of a parameter path (`feed_forward` matches \
         `layers.0.feed_forward.w1.weight`); fix the filter (`placements(&model)` lists every \
         path), or accept it with `OffloadPolicy::allow_unmatched(true)` (`allow_unmatched = \
         true` in a policy file) for a filter list shared across models"
    )]
    UnmatchedFilters {
        /// Each filter or path that matched nothing, with the closest that exist.
        unmatched: String,
    },
    /// An offload mode name that burn-offload does not know.
    #[error(
        "unknown offload mode {given:?}: use one of `uva`, `copy`, `auto`, `prefetch` or `prefetch:<lookahead bytes>`"
    )]
    UnknownMode {
        /// The mode as given.
        given: String,
    },
    /// A policy file could not be parsed.
    #[error("could not parse the offload policy ({format}): {message}")]
    PolicyParse {
        /// `json` or `toml`.
        format: &'static str,
        /// The parser's message.
        message: String,
    },
    /// Host memory could not be allocated.
    #[error(
        "could not allocate {bytes} bytes of host memory: {reason}; offload less (a smaller budget) or free host RAM"
    )]
    HostAlloc {
        /// Requested size.
        bytes: usize,
        /// Why it failed.
        reason: String,
    },
    /// The data handed to the host tensor does not match its shape and dtype.
    #[error(
        "tensor data of {got} bytes does not match shape {shape:?} of {dtype:?} ({expected} bytes)"
    )]
    DataSize {
        /// Shape of the tensor.
        shape: Vec<usize>,
        /// Element type.
        dtype: burn_backend::DType,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// A [`HostTensor`](crate::HostTensor) view was asked for with arguments that do not fit
    /// the tensor (a range past a dim, a zero step, axes that are not a permutation, a dim that
    /// does not exist, shapes that do not match), or that would reach outside its buffer. No
    /// view was made and nothing was read.
    #[error("invalid host tensor view: {reason}")]
    InvalidView {
        /// What is wrong and what to change.
        reason: String,
    },
    /// Measuring the device for `OffloadMode::Auto` failed (`apply` then logs it and keeps the
    /// target's static threshold; only a direct call of the measurement returns it).
    #[error(
        "measuring the device for `auto` mode failed: {reason}; choose `uva`, `copy` or `prefetch` explicitly"
    )]
    Calibration {
        /// What failed.
        reason: String,
    },
    /// A value given to the library that it cannot use (e.g. an unknown quantization name).
    #[error("{0}")]
    Config(String),
    /// A quantization scheme that a target cannot hold or read (e.g. 4-bit values in
    /// burn-ndarray's memory, fp8 on the CPU reference target).
    #[error("{target} cannot hold or read quantization scheme `{scheme}`: {reason}; {instead}")]
    UnsupportedQuantization {
        /// The scheme, by its short name (`q4s/b32/f16`).
        scheme: String,
        /// The target or the part of it that refuses.
        target: String,
        /// What in the scheme it cannot do.
        reason: String,
        /// What to use instead.
        instead: String,
    },
    /// A quantization that would quantize a tensor that has to stay float (a norm, a bias, any
    /// rank-1 tensor), or whose shape does not fit the scheme's blocks or packing.
    #[error("cannot quantize `{path}` (shape {shape:?}): {reason}; {instead}")]
    CannotQuantize {
        /// The parameter's path.
        path: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Why not.
        reason: String,
        /// What to change.
        instead: String,
    },
    /// A [`CollectiveSetup`](crate::collective::CollectiveSetup) or collective call argument
    /// that cannot work (feature `collective`).
    #[cfg(feature = "collective")]
    #[error("invalid collective setup: {reason}")]
    CollectiveSetup {
        /// What is wrong and what to give instead.
        reason: String,
    },
    /// A collective call failed (feature `collective`): burn-collective returned an error or
    /// panicked, or the orchestrator could not be started. This process's collective state is
    /// unusable after it: end the process.
    #[cfg(feature = "collective")]
    #[error(
        "collective {op}{} failed: {reason}",
        rank.map_or(String::new(), |r| format!(" on rank {r}"))
    )]
    Collective {
        /// The call (`registration`, `broadcast`, `gradient all-reduce`, ...).
        op: String,
        /// The rank that reports it, if registered.
        rank: Option<u32>,
        /// What happened and what to check.
        reason: String,
    },
    /// A collective call did not complete within the setup's timeout (feature `collective`):
    /// a peer died, hangs, runs much slower, or makes another call. burn-collective cannot
    /// cancel the call: this process's collective state is unusable after it.
    #[cfg(feature = "collective")]
    #[error(
        "collective {op} on rank {rank} did not complete within {timeout_s} s: a peer process \
         died, hangs or is still far behind, or calls something else (every rank must make the \
         same collective calls in the same order), or the orchestrator is unreachable; check \
         the other ranks' output, and raise `CollectiveSetup::timeout` if a step legitimately \
         takes longer; end this process (its collective state is unusable)"
    )]
    CollectiveTimeout {
        /// The call.
        op: String,
        /// The rank that gave up.
        rank: u32,
        /// The timeout in seconds.
        timeout_s: f64,
    },
    /// The ranks disagree on a collective call (feature `collective`): a different operation,
    /// root, number of values or parameter shapes. Every rank that takes part gets this error,
    /// with what each rank sent; no data was exchanged.
    #[cfg(feature = "collective")]
    #[error(
        "the ranks disagree on collective {op} (seen from rank {rank}): {details}; every rank \
         must make the same collective calls in the same order, on models with the same \
         parameter shapes in the same order (the same model code and config on every rank)"
    )]
    CollectiveMismatch {
        /// The call, on this rank.
        op: String,
        /// The rank that reports it.
        rank: u32,
        /// What each rank sent.
        details: String,
    },
    /// An error of the CUDA layer (feature `cuda`).
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
}
