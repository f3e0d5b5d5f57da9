//! [`OffloadPolicy`]: which parameters go to host memory (vLLM's `cpu_offload_max_bytes` and
//! `cpu_offload_params`), and [`OffloadPolicy::apply`], which puts them there.

mod quantize;
mod report;
mod suggest;
mod walk;

use serde::{Deserialize, Deserializer, Serialize};

pub use quantize::Quantization;
pub(crate) use report::human_bytes;
pub use report::{OffloadReport, ParamReport, Placement};
#[cfg(feature = "collective")]
pub(crate) use walk::marked_host_context;
pub(crate) use walk::{ParamAction, detached, in_moves, walk_params, walk_params_quantized};

use crate::auto::Calibration;
use crate::context::{ContextConfig, OffloadContext};
use crate::error::OffloadError;
use crate::inner::{DeviceMemory, TargetDevice};
use crate::mode::OffloadMode;

const GIB: f64 = (1u64 << 30) as f64;

/// The log target of the warnings [`OffloadPolicy::apply`] logs (with `log::warn!`), which are
/// also in [`OffloadReport::warnings`]. A program that prints the report can turn this target off
/// (e.g. env_logger's `filter_module(WARNINGS_LOG_TARGET, LevelFilter::Off)`) so that each
/// warning is shown once.
pub const WARNINGS_LOG_TARGET: &str = "burn_offload::policy::warnings";

/// Which parameters to keep in host memory, and how ops read them.
///
/// Walks the parameters in module order and offloads each eligible one while the running
/// total of its compute device is below `max_bytes` (checked before each parameter, as vLLM
/// does, so the last one may cross it and a module may end up partly offloaded). The budget is
/// per device, like vLLM's per-GPU `--cpu-offload-gb`.
///
/// Deserialising (serde) reads the same fields as [`from_toml`](Self::from_toml) and
/// [`from_json`](Self::from_json) and validates them the same way; serialising writes
/// `max_bytes`, and `mode` in [`OffloadMode`]'s serde form, which reads back.
///
/// ```
/// use burn_offload::{OffloadMode, OffloadPolicy};
/// let policy = OffloadPolicy::from_gib(12.0)?
///     .params(["mlp", "experts.w2_weight"])
///     .mode(OffloadMode::Uva);
/// let same: OffloadPolicy = OffloadPolicy::from_toml(
///     "max_gib = 12.0\nparams = [\"mlp\", \"experts.w2_weight\"]\nmode = \"uva\"",
/// )?;
/// assert_eq!(policy, same);
/// # Ok::<(), burn_offload::OffloadError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PolicyFile")]
pub struct OffloadPolicy {
    /// Budget: bytes of parameters to keep in host memory (per device).
    pub max_bytes: u64,
    /// Dotted name segments; a parameter is eligible when one of them matches whole segments of
    /// its path (`experts.w2_weight` matches `mlp.experts.w2_weight`, not
    /// `mlp.experts.w2_weight_scale`). Empty: every parameter is eligible.
    pub params: Vec<String>,
    /// Full parameter paths, matched exactly (what a [`FitPlan`](crate::fit::FitPlan) chose).
    /// A parameter is eligible when its path is one of these or matches one of `params`; with
    /// both empty, every parameter is.
    pub paths: Vec<String>,
    /// Parameters smaller than this stay on the device.
    pub min_tensor_bytes: u64,
    /// How ops read offloaded parameters.
    pub mode: OffloadMode,
    /// Pin (page-lock and device-map) host memory where the target can.
    pub pin_memory: bool,
    /// Accept `params` filters and `paths` that match no parameter of the model (a filter list
    /// shared across models): [`apply`](Self::apply) then warns instead of failing with
    /// [`OffloadError::UnmatchedFilters`].
    pub allow_unmatched: bool,
    /// Quantize weights as they are placed and loaded ([`Quantization`]); `None` keeps them
    /// as they are.
    pub quantize: Option<Quantization>,
    /// The optimizer state of a training run: where it lives, and how much there is (counted
    /// with each offloaded parameter against the budget when it lives with them,
    /// [`StatePlacement::WithOffloaded`](crate::train::StatePlacement::WithOffloaded)). `None`:
    /// inference, or state in device memory not counted.
    pub optimizer_state: Option<crate::train::OptimizerState>,
}

impl Default for OffloadPolicy {
    fn default() -> Self {
        Self {
            max_bytes: 0,
            params: Vec::new(),
            paths: Vec::new(),
            min_tensor_bytes: 0,
            mode: OffloadMode::Auto,
            pin_memory: true,
            allow_unmatched: false,
            quantize: None,
            optimizer_state: None,
        }
    }
}

/// The on-disk form: `max_gib` or `max_bytes`, and a mode checked by us (so an unknown mode gets
/// [`OffloadError::UnknownMode`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    max_bytes: Option<u64>,
    max_gib: Option<f64>,
    #[serde(default)]
    params: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    min_tensor_bytes: u64,
    mode: Option<ModeSpec>,
    pin_memory: Option<bool>,
    #[serde(default)]
    allow_unmatched: bool,
    quantize: Option<QuantizeSpec>,
    optimizer_state: Option<crate::train::OptimizerState>,
}

/// A quantization in a policy file: a preset's name (`"q8"`, `"q4"`) or [`Quantization`]'s
/// serde form (what serialising an [`OffloadPolicy`] writes).
#[derive(Deserialize)]
#[serde(untagged)]
enum QuantizeSpec {
    Preset(String),
    Full(Quantization),
}

/// A mode in a policy file: a string (`"uva"`, `"prefetch:4096"`), parsed by us, or
/// [`OffloadMode`]'s serde form for prefetch (`{"prefetch": {"lookahead_bytes": 4096}}`), which
/// is what serialising an [`OffloadPolicy`] writes.
enum ModeSpec {
    Text(String),
    Mode(OffloadMode),
}

impl<'de> Deserialize<'de> for ModeSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ModeSpec;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "an offload mode: \"uva\", \"copy\", \"auto\", \"prefetch\", \
                     \"prefetch:<lookahead bytes>\" or {\"prefetch\": {\"lookahead_bytes\": N}}",
                )
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ModeSpec, E> {
                Ok(ModeSpec::Text(v.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<ModeSpec, A::Error> {
                OffloadMode::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ModeSpec::Mode)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl TryFrom<PolicyFile> for OffloadPolicy {
    type Error = OffloadError;

    fn try_from(file: PolicyFile) -> Result<Self, OffloadError> {
        Self::from_file(file)
    }
}

impl OffloadPolicy {
    /// A budget of `max_bytes` bytes, every parameter eligible, mode `Auto`.
    pub fn from_bytes(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            ..Self::default()
        }
    }

    /// The largest budget [`from_gib`](Self::from_gib) accepts: `u64::MAX` bytes rounded down
    /// to whole GiB (17179869183 GiB).
    pub const MAX_GIB: f64 = (u64::MAX >> 30) as f64;

    /// A budget in GiB (vLLM's `--cpu-offload-gb`). Errors on NaN, infinite or negative values
    /// and on values above [`MAX_GIB`](Self::MAX_GIB).
    pub fn from_gib(gib: f64) -> Result<Self, OffloadError> {
        if !gib.is_finite() || gib < 0.0 {
            return Err(OffloadError::InvalidBudget { value: gib });
        }
        if gib > Self::MAX_GIB {
            return Err(OffloadError::BudgetTooLarge {
                value: gib,
                max: Self::MAX_GIB,
            });
        }
        Ok(Self::from_bytes((gib * GIB).round() as u64))
    }

    /// Restricts offloading to parameters whose path matches one of `filters`.
    pub fn params<S: Into<String>>(mut self, filters: impl IntoIterator<Item = S>) -> Self {
        self.params = filters.into_iter().map(Into::into).collect();
        self
    }

    /// Restricts offloading to the parameters at exactly these full paths (and those the
    /// [`params`](Self::params) filters match, if any).
    pub fn paths<S: Into<String>>(mut self, paths: impl IntoIterator<Item = S>) -> Self {
        self.paths = paths.into_iter().map(Into::into).collect();
        self
    }

    /// Accepts filters and paths that match no parameter (see
    /// [`allow_unmatched`](Self#structfield.allow_unmatched)): for a filter list shared across
    /// models. Off by default, so that a typo is an error.
    pub fn allow_unmatched(mut self, allow: bool) -> Self {
        self.allow_unmatched = allow;
        self
    }

    /// Keeps parameters smaller than `bytes` on the device.
    pub fn min_tensor_bytes(mut self, bytes: u64) -> Self {
        self.min_tensor_bytes = bytes;
        self
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: OffloadMode) -> Self {
        self.mode = mode;
        self
    }

    /// Quantizes weights as they are placed and loaded (see [`Quantization`]).
    pub fn quantize(mut self, quantization: Quantization) -> Self {
        self.quantize = Some(quantization);
        self
    }

    /// Says where a training run's optimizer state lives and how much there is: the budget
    /// counts each offloaded parameter with its state under
    /// [`StatePlacement::WithOffloaded`](crate::train::StatePlacement::WithOffloaded), the
    /// report and the fit planner count it, and
    /// [`OffloadOptimizer::with_state`](crate::OffloadOptimizer::with_state) places it so.
    pub fn optimizer_state(mut self, state: crate::train::OptimizerState) -> Self {
        self.optimizer_state = Some(state);
        self
    }

    /// Pins host memory (default) or not.
    pub fn pin_memory(mut self, pin: bool) -> Self {
        self.pin_memory = pin;
        self
    }

    /// The budget in GiB.
    pub fn max_gib(&self) -> f64 {
        self.max_bytes as f64 / GIB
    }

    /// Parses a comma-separated filter list as given on a command line (`mlp,attn.wq`).
    pub fn parse_params(list: &str) -> Result<Vec<String>, OffloadError> {
        let filters: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
        for f in &filters {
            validate_filter(f)?;
        }
        Ok(filters)
    }

    /// Parses a policy from JSON (see [`from_toml`](Self::from_toml) for the fields).
    pub fn from_json(text: &str) -> Result<Self, OffloadError> {
        let file: PolicyFile =
            serde_json::from_str(text).map_err(|e| OffloadError::PolicyParse {
                format: "json",
                message: e.to_string(),
            })?;
        Self::from_file(file)
    }

    /// Parses a policy from TOML: `max_gib` (or `max_bytes`), `params`, `paths`, `min_tensor_bytes`,
    /// `mode` (`uva`, `copy`, `auto`, `prefetch` or `prefetch:<lookahead bytes>`), `pin_memory`.
    pub fn from_toml(text: &str) -> Result<Self, OffloadError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| OffloadError::PolicyParse {
            format: "toml",
            message: e.to_string(),
        })?;
        Self::from_file(file)
    }

    fn from_file(file: PolicyFile) -> Result<Self, OffloadError> {
        let mut policy = match (file.max_bytes, file.max_gib) {
            (Some(_), Some(_)) => {
                return Err(OffloadError::PolicyParse {
                    format: "policy",
                    message: "give either `max_bytes` or `max_gib`, not both".into(),
                });
            }
            (Some(bytes), None) => Self::from_bytes(bytes),
            (None, Some(gib)) => Self::from_gib(gib)?,
            (None, None) => Self::default(),
        };
        policy.params = file.params;
        policy.paths = file.paths;
        policy.min_tensor_bytes = file.min_tensor_bytes;
        policy.allow_unmatched = file.allow_unmatched;
        match file.mode {
            Some(ModeSpec::Text(text)) => policy.mode = text.parse()?,
            Some(ModeSpec::Mode(mode)) => policy.mode = mode,
            None => {}
        }
        if let Some(pin) = file.pin_memory {
            policy.pin_memory = pin;
        }
        policy.quantize = match file.quantize {
            Some(QuantizeSpec::Preset(name)) => Some(Quantization::preset(name.parse()?)),
            Some(QuantizeSpec::Full(q)) => Some(q),
            None => None,
        };
        policy.optimizer_state = file.optimizer_state;
        policy.validate()?;
        Ok(policy)
    }

    /// Checks the filters and the mode (a `Prefetch` lookahead of 0 is refused); also done by
    /// [`apply`](Self::apply) and when parsing or deserialising a policy.
    pub fn validate(&self) -> Result<(), OffloadError> {
        if matches!(
            self.mode,
            OffloadMode::Prefetch {
                lookahead_bytes: 0,
                ..
            }
        ) {
            return Err(OffloadError::ZeroPrefetchLookahead);
        }
        let quantize_filters = self
            .quantize
            .iter()
            .flat_map(|q| q.params.iter().chain(&q.skip));
        self.params
            .iter()
            .chain(&self.paths)
            .chain(quantize_filters)
            .try_for_each(|f| validate_filter(f))
    }

    /// Whether `path` (a dotted parameter path) is eligible under the filters.
    pub fn matches(&self, path: &str) -> bool {
        (self.params.is_empty() && self.paths.is_empty())
            || self.paths.iter().any(|p| p == path)
            || self.params.iter().any(|p| filter_matches(p, path))
    }
}

/// Whether `filter` matches whole consecutive dotted segments of `path`.
pub(crate) fn filter_matches(filter: &str, path: &str) -> bool {
    format!(".{path}.").contains(&format!(".{filter}."))
}

fn validate_filter(filter: &str) -> Result<(), OffloadError> {
    let err = |reason| {
        Err(OffloadError::InvalidParamFilter {
            filter: filter.to_string(),
            reason,
        })
    };
    if filter.is_empty() {
        return err("it is empty");
    }
    if filter.split('.').any(str::is_empty) {
        return err("it has an empty segment (a leading, trailing or doubled `.`)");
    }
    if filter.chars().any(|c| c.is_whitespace() || c == '*') {
        return err("segments are matched literally: no spaces or wildcards");
    }
    Ok(())
}

impl OffloadPolicy {
    /// Places `module`'s float parameters: the selected ones in host memory, the others in
    /// device memory. Returns the module and a report.
    ///
    /// - Parameters are visited in module order with full dotted paths; each eligible one is
    ///   offloaded while the running total of its compute device is below the budget (the
    ///   budget is per device).
    /// - Parameters already in host memory stay where they are and count towards the budget,
    ///   so applying the same policy twice changes nothing.
    /// - Lazy (uninitialised) parameters are retargeted without being initialised: when they
    ///   are initialised or loaded (burn-store), they are created directly in host memory.
    /// - It creates the model's [`OffloadContext`] (mode and pinning after the environment
    ///   switches, read here; `Auto`'s calibration; the model's own prefetchers), which every
    ///   offloaded parameter carries and the report holds: another model on the same device,
    ///   placed by another policy, keeps its own. Parameters already in host memory are given
    ///   the new context, so applying a policy again with another mode switches the mode.
    ///
    /// A parameter not selected but found in host memory (e.g. after loading a record on
    /// `Host(d)`) is moved to the device, so `apply` also restores a placement.
    pub fn apply<B, D, M>(&self, module: M) -> Result<(M, OffloadReport), OffloadError>
    where
        B: burn::tensor::backend::Backend<Device = crate::OffloadDevice<D>>,
        D: TargetDevice,
        M: burn::module::Module<B>,
    {
        self.validate()?;
        if !self.allow_unmatched {
            // Before anything moves: on an error the caller's model is dropped unchanged.
            let paths: Vec<String> = crate::placements(&module)
                .into_iter()
                .map(|(path, _)| path)
                .collect();
            self.check_filters_match(&paths)?;
        }
        if let Some(q) = &self.quantize {
            // Before anything moves, as for the filters.
            for (path, shape, device) in crate::placement::param_shapes(&module) {
                let Some(scheme) = q.scheme_for(&path, &shape)? else {
                    continue;
                };
                let device = device.compute();
                if B::ad_enabled(&crate::OffloadDevice::Device(device.clone())) {
                    return Err(OffloadError::UnsupportedQuantization {
                        scheme: crate::quant::scheme_name(&scheme),
                        target: "Burn's Autodiff backend".into(),
                        reason: "burn-autodiff 0.21 has no quantized ops (its quantize and \
                                 dequantize are `todo!()`)"
                            .into(),
                        instead: "keep the frozen, quantized part of the model on the inner \
                                  backend (`model.valid()`), apply the policy there, and call it \
                                  with `x.inner()` and `Tensor::from_inner` around it; train the \
                                  float part on Autodiff"
                            .into(),
                    });
                }
                if let Some(why) = device.cannot_read_quantized(&scheme, &shape) {
                    return Err(OffloadError::UnsupportedQuantization {
                        scheme: crate::quant::scheme_name(&scheme),
                        target: format!("this target (for `{path}`)"),
                        reason: why,
                        instead: "quantize with `QuantPreset::Q8` or `Q4` (q8s/b32/f16, \
                                  q4s/b32/f16), which every target reads"
                            .into(),
                    });
                }
            }
        }
        let context = OffloadContext::new(ContextConfig::new(self.mode, self.pin_memory));
        let config = context.config();
        // What an offloaded parameter of `bytes` takes of the budget: with its state when the
        // state lives with it.
        let cost = |bytes: u64| match self.optimizer_state {
            Some(s) if s.placement == crate::train::StatePlacement::WithOffloaded => {
                bytes.saturating_add(s.bytes_for(bytes))
            }
            _ => bytes,
        };
        // Per compute device: (device, offloaded bytes, all bytes, largest offloaded tensor).
        let mut devices: Vec<(D, u64, u64, u64)> = Vec::new();
        // A quantized parameter left in device memory that the device cannot hold there.
        let mut unheld: Option<(String, String)> = None;
        let (module, params) =
            walk_params_quantized(module, &context, self.quantize.as_ref(), |info| {
                let device = info.device.compute();
                let index = match devices.iter().position(|(d, ..)| d == device) {
                    Some(i) => i,
                    None => {
                        devices.push((device.clone(), 0, 0, 0));
                        devices.len() - 1
                    }
                };
                devices[index].2 += info.bytes;
                let eligible = self.matches(&info.path) && info.bytes >= self.min_tensor_bytes;
                let action = if !eligible {
                    ParamAction::Device
                } else if offload_decision(&mut devices[index].1, cost(info.bytes), self.max_bytes)
                {
                    devices[index].3 = devices[index].3.max(info.bytes);
                    ParamAction::Host
                } else {
                    ParamAction::Device
                };
                if let Some(scheme) = &info.quantize
                    && action == ParamAction::Device
                    && unheld.is_none()
                    && let Some(why) = device.cannot_hold_quantized(scheme)
                {
                    unheld = Some((info.path.clone(), why));
                }
                action
            });
        let all_bytes = devices.iter().map(|d| d.2).max().unwrap_or(0);
        if let (Some((path, why)), Some(q)) = (unheld, &self.quantize) {
            return Err(OffloadError::UnsupportedQuantization {
                scheme: crate::quant::scheme_name(&q.scheme),
                target: format!("the device memory of this target (`{path}` stays there)"),
                reason: why,
                instead: format!(
                    "offload every quantized parameter (parameters are offloaded in module order, \
                     so a budget of the whole model's {} does it: \
                     `OffloadPolicy::from_bytes({all_bytes})`), or quantize with a scheme the \
                     device holds",
                    human_bytes(all_bytes)
                ),
            });
        }
        let offloaded: Vec<u64> = devices.iter().map(|d| d.1).collect();
        let mut warnings = selection_warnings(self, &params, &offloaded);
        let mut calibration = None;
        let mut device_memory = None;
        let mut prefetch_lookahead = None;
        for (device, offloaded, all, largest) in &devices {
            if *offloaded == 0 {
                continue;
            }
            if config.mode == OffloadMode::Uva && !device.reads_host_in_place() {
                warnings.push(format!(
                    "mode uva on {device:?}: this device cannot read host memory in place (no \
                     device-mapped host memory), so ops copy each offloaded weight per use, as \
                     mode copy does; use mode prefetch to copy ahead of use"
                ));
            }
            let measured = (config.mode == OffloadMode::Auto)
                .then(|| calibrate(device, config.pin_memory))
                .flatten();
            if let Some(c) = &measured {
                context.set_calibration(device, c.clone());
                context.fit_auto_lookahead(*largest);
            }
            prefetch_lookahead = prefetch_lookahead.or(context.prefetch_lookahead(device));
            let memory = device.memory();
            if let Some(memory) = memory
                && let Some(w) = offload_not_needed(
                    &format!("{device:?}"),
                    *offloaded,
                    *all,
                    memory,
                    measured.as_deref(),
                )
            {
                warnings.push(w);
            }
            calibration = calibration.or(measured);
            device_memory = device_memory.or(memory);
        }
        if let OffloadMode::Prefetch {
            lookahead_bytes, ..
        } = config.mode
        {
            warnings.extend(beyond_lookahead(&params, lookahead_bytes));
        }
        let report = OffloadReport {
            params,
            max_bytes: self.max_bytes,
            mode: config.mode,
            warnings,
            calibration: calibration.map(|c| (*c).clone()),
            device_memory,
            prefetch_lookahead_bytes: prefetch_lookahead,
            optimizer_state: self.optimizer_state,
            context: report::ReportContext(Some(context)),
        };
        for w in &report.warnings {
            log::warn!(target: WARNINGS_LOG_TARGET, "{w}");
        }
        log::info!("{}", report.summary());
        Ok((module, report))
    }
}

/// Whether an eligible parameter of `bytes` is offloaded, given `device_offloaded`, the bytes
/// already offloaded on its compute device (updated when it is): yes while that device's total
/// is below the per-device budget `max_bytes` (checked before, so the last one may cross it).
fn offload_decision(device_offloaded: &mut u64, bytes: u64, max_bytes: u64) -> bool {
    let offload = *device_offloaded < max_bytes;
    if offload {
        *device_offloaded = device_offloaded.saturating_add(bytes);
    }
    offload
}

impl OffloadPolicy {
    /// [`OffloadError::UnmatchedFilters`] if a `params` filter or a `paths` entry matches none
    /// of `paths` (the model's parameter paths), with the closest segments or paths that do
    /// exist.
    pub fn check_filters_match(&self, paths: &[String]) -> Result<(), OffloadError> {
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let mut unmatched: Vec<String> = unmatched_filters(&self.params, &refs)
            .into_iter()
            .map(|f| describe_unmatched(f, suggest::segments(f, &refs)))
            .collect();
        unmatched.extend(
            self.paths
                .iter()
                .filter(|p| !refs.contains(&p.as_str()))
                .map(|p| describe_unmatched(p, suggest::paths(p, &refs))),
        );
        if unmatched.is_empty() {
            return Ok(());
        }
        Err(OffloadError::UnmatchedFilters {
            unmatched: unmatched.join("; "),
        })
    }
}

/// "`mlp` (closest: `feed_forward`, `ffn_norm`)", or the bare name.
fn describe_unmatched(name: &str, closest: Vec<String>) -> String {
    if closest.is_empty() {
        format!("`{name}`")
    } else {
        let closest: Vec<String> = closest.iter().map(|c| format!("`{c}`")).collect();
        format!("`{name}` (did you mean {}?)", closest.join(" or "))
    }
}

/// The filters that match none of `paths`.
fn unmatched_filters<'a>(filters: &'a [String], paths: &[&str]) -> Vec<&'a str> {
    filters
        .iter()
        .filter(|f| !paths.iter().any(|path| filter_matches(f, path)))
        .map(String::as_str)
        .collect()
}

/// The warning naming the filters that match no parameter.
fn unmatched_filters_warning(unmatched: &[&str]) -> Option<String> {
    let names = unmatched
        .iter()
        .map(|f| format!("`{f}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let (what, verb, them) = match unmatched.len() {
        0 => return None,
        1 => ("filter", "matches", "it"),
        _ => ("filters", "match", "them"),
    };
    Some(format!(
        "parameter {what} {names} {verb} no parameter; check {them} against the paths in the \
         report (a filter matches whole dotted segments: `mlp` matches `layers.0.mlp.up.weight`, \
         not `layers.0.mlp_norm.gamma`)"
    ))
}

/// The warnings about what the filters and the budget selected, from the report's rows and the
/// bytes offloaded on each compute device: filters that match no parameter; no eligible
/// parameter at all (all below `min_tensor_bytes`); or a budget above what every device has
/// eligible, so that everything eligible is offloaded (only claimed when something was).
fn selection_warnings(
    policy: &OffloadPolicy,
    params: &[ParamReport],
    device_offloaded: &[u64],
) -> Vec<String> {
    let paths: Vec<&str> = params.iter().map(|p| p.path.as_str()).collect();
    let unmatched = unmatched_filters(&policy.params, &paths);
    let most = device_offloaded.iter().copied().max().unwrap_or(0);
    let mut warnings: Vec<String> = unmatched_filters_warning(&unmatched).into_iter().collect();
    let unknown: Vec<&str> = policy
        .paths
        .iter()
        .filter(|p| !paths.contains(&p.as_str()))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        warnings.push(format!(
            "parameter paths {unknown:?} name no parameter of this module; check them against \
             the paths in the report"
        ));
    }
    if policy.max_bytes == 0 || params.is_empty() {
        return warnings;
    }
    if most == 0 {
        // With a budget, the first eligible parameter is always offloaded: none is eligible.
        let selected = policy.params.is_empty() && policy.paths.is_empty()
            || unmatched.len() < policy.params.len()
            || unknown.len() < policy.paths.len();
        if selected {
            warnings.push(format!(
                "no parameter is eligible: every parameter {}is smaller than min_tensor_bytes \
                 ({}), so nothing is offloaded; lower min_tensor_bytes to offload some",
                if policy.params.is_empty() && policy.paths.is_empty() {
                    ""
                } else {
                    "the filters select "
                },
                human_bytes(policy.min_tensor_bytes)
            ));
        }
    } else if policy.max_bytes > most {
        warnings.push(format!(
            "the budget of {} per device is larger than the {} of eligible parameters{}: all of \
             them are offloaded; a smaller budget keeps more on the device",
            human_bytes(policy.max_bytes),
            human_bytes(most),
            if device_offloaded.len() > 1 {
                " on the device with the most"
            } else {
                ""
            }
        ));
    }
    warnings
}

/// The warning for a `Prefetch` lookahead smaller than some offloaded tensors: those are never
/// prefetched (each use copies on demand, without overlap).
fn beyond_lookahead(params: &[ParamReport], lookahead: u64) -> Option<String> {
    let (count, bytes, largest) = params
        .iter()
        .filter(|p| p.placement == Placement::Host && p.bytes > lookahead)
        .fold((0usize, 0u64, 0u64), |(n, b, l), p| {
            (n + 1, b + p.bytes, l.max(p.bytes))
        });
    (count > 0).then(|| {
        format!(
            "{count} offloaded tensors ({}) are larger than the prefetch lookahead of {}: they \
             are never prefetched, every use copies them on demand without overlap; use \
             prefetch:{} (twice the largest, {}) or more",
            human_bytes(bytes),
            human_bytes(lookahead),
            largest.saturating_mul(2),
            human_bytes(largest)
        )
    })
}

/// The device's calibration for `Auto`: the process's (memory), else the disk cache's entry
/// for this device, pinning and build ([`crate::auto::cache`]), else measured now and written
/// to the disk cache. A failed measurement is logged and leaves `Auto` on the target's static
/// threshold; the disk cache's failures are only logged.
fn calibrate<D: TargetDevice>(device: &D, pin: bool) -> Option<std::sync::Arc<Calibration>> {
    if let Some(c) = crate::auto::calibration(device) {
        return Some(c);
    }
    if let Some((c, path)) = crate::auto::cache::load(device, pin) {
        log::info!("auto mode on {device:?}: {c}, cached in {}", path.display());
        crate::auto::set_calibration(device, c);
        return crate::auto::calibration(device);
    }
    match device.calibrate(pin) {
        Ok(c) => {
            log::info!("auto mode on {device:?}: {c}");
            crate::auto::cache::store(device, pin, &c);
            crate::auto::set_calibration(device, c);
            crate::auto::calibration(device)
        }
        Err(e) => {
            log::warn!("{e}");
            None
        }
    }
}

/// Share of a device's free memory a model may fill before offloading is worth it: the rest
/// is left for activations, caches and the backend's memory pools.
const FIT_FRACTION: f64 = 0.9;

/// The warning for a budget that offloads parameters although the whole model fits in the
/// device's free memory (vLLM #57771: 19x slower for nothing), with the numbers.
fn offload_not_needed(
    device: &str,
    offloaded: u64,
    all: u64,
    memory: DeviceMemory,
    calibration: Option<&Calibration>,
) -> Option<String> {
    if offloaded == 0 || all as f64 > FIT_FRACTION * memory.free as f64 {
        return None;
    }
    let cost = match calibration {
        Some(c) => format!(
            "; each forward then moves them over the bus again, about {:.1} ms at the {:.1} GB/s \
             measured",
            offloaded as f64 / c.upload_bytes_per_s * 1e3,
            c.upload_bytes_per_s / 1e9
        ),
        None => "; each forward then moves them over the bus again".to_string(),
    };
    Some(format!(
        "{} of parameters are offloaded although all {} of them fit in the {} free on {device} \
         (of {}){cost}; use a budget of 0 (`--offload-gb 0`), or offload only what does not fit",
        human_bytes(offloaded),
        human_bytes(all),
        human_bytes(memory.free),
        human_bytes(memory.total),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    /// Runs [`offload_decision`] over `(device index, bytes, eligible)` rows in order, as
    /// `apply`'s walk does with one running total per device.
    fn decisions(max_bytes: u64, rows: &[(usize, u64, bool)]) -> Vec<bool> {
        let devices = rows.iter().map(|r| r.0 + 1).max().unwrap_or(0);
        let mut offloaded = vec![0u64; devices];
        rows.iter()
            .map(|&(device, bytes, eligible)| {
                eligible && offload_decision(&mut offloaded[device], bytes, max_bytes)
            })
            .collect()
    }

    #[test]
    fn the_budget_is_per_device() {
        // Two devices, 100 bytes each: each takes 60 + 60 (the second crosses), then stops;
        // an ineligible row does not count.
        let rows = [
            (0, 60, true),
            (1, 60, true),
            (0, 60, true),
            (1, 10, false),
            (1, 60, true),
            (0, 60, true),
            (1, 60, true),
        ];
        assert_eq!(
            decisions(100, &rows),
            [true, true, true, false, true, false, false]
        );
        // One device: the same walk as before, crossing once.
        assert_eq!(
            decisions(
                100,
                &[(0, 60, true), (0, 30, true), (0, 20, true), (0, 1, true)]
            ),
            [true, true, true, false]
        );
        // Ending exactly at the budget stops before the next one; a zero budget takes nothing.
        assert_eq!(
            decisions(90, &[(0, 60, true), (0, 30, true), (0, 1, true)]),
            [true, true, false]
        );
        assert_eq!(decisions(0, &[(0, 1, true), (1, 1, true)]), [false, false]);
        // A device's total saturates instead of overflowing.
        let mut total = u64::MAX - 1;
        assert!(offload_decision(&mut total, 10, u64::MAX));
        assert_eq!(total, u64::MAX);
        assert!(!offload_decision(&mut total, 10, u64::MAX));
    }

    fn row(path: &str, bytes: u64, placement: Placement) -> ParamReport {
        ParamReport {
            path: path.into(),
            shape: vec![bytes as usize / 4],
            dtype: "f32".into(),
            bytes,
            placement,
            moved: true,
            device: String::new(),
        }
    }

    #[test]
    fn filters_that_match_nothing_are_named() {
        let filters = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let paths = [
            "layers.0.mlp.up.weight",
            "layers.0.mlp_norm.gamma",
            "head.weight",
        ];
        assert_eq!(
            unmatched_filters(&filters(&["mlp", "mlpp", "head", "ml"]), &paths),
            ["mlpp", "ml"]
        );
        assert!(unmatched_filters(&filters(&["mlp_norm", "weight"]), &paths).is_empty());
        assert!(unmatched_filters(&[], &paths).is_empty());
        assert_eq!(unmatched_filters(&filters(&["mlp"]), &[]), ["mlp"]);

        assert_eq!(unmatched_filters_warning(&[]), None);
        let w = unmatched_filters_warning(&["mlpp"]).unwrap();
        assert!(
            w.starts_with("parameter filter `mlpp` matches no parameter; check it against"),
            "{w}"
        );
        let w = unmatched_filters_warning(&["mlpp", "atn"]).unwrap();
        assert!(
            w.starts_with("parameter filters `mlpp`, `atn` match no parameter; check them"),
            "{w}"
        );
    }

    #[test]
    fn selection_warnings_say_what_happened() {
        let params = [
            row("a.mlp.w", 400, Placement::Host),
            row("a.norm.g", 40, Placement::Host),
        ];
        let policy = |max_bytes| OffloadPolicy::from_bytes(max_bytes);
        // A budget above everything eligible: said once, with human sizes.
        let w = selection_warnings(&policy(1 << 20), &params, &[440]);
        assert_eq!(
            w,
            [
                "the budget of 1.00 MiB per device is larger than the 440 B of eligible \
              parameters: all of them are offloaded; a smaller budget keeps more on the device"
            ]
        );
        // With several devices, compared with the device that has the most.
        let w = selection_warnings(&policy(500), &params, &[440, 40]);
        assert!(w[0].contains("440 B of eligible parameters on the device with the most"));
        assert!(selection_warnings(&policy(440), &params, &[440]).is_empty());
        assert!(selection_warnings(&policy(100), &params, &[440]).is_empty());
        assert!(selection_warnings(&policy(0), &params, &[0]).is_empty());

        // A filter matching nothing: named, and nothing is claimed about the budget.
        let device = |p: &ParamReport| ParamReport {
            placement: Placement::Device,
            ..p.clone()
        };
        let resident: Vec<_> = params.iter().map(device).collect();
        let w = selection_warnings(&policy(1 << 20).params(["mlpp"]), &resident, &[0]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("parameter filter `mlpp` matches no parameter"),
            "{w:?}"
        );
        // One of two filters matching nothing, the other one's parameters all offloaded: both
        // are true.
        let w = selection_warnings(&policy(1 << 20).params(["mlp", "mlpp"]), &params, &[400]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("filter `mlpp` matches"), "{w:?}");
        assert!(w[1].contains("larger than the 400 B"), "{w:?}");
        // Everything below min_tensor_bytes: not "all of them are offloaded".
        let w = selection_warnings(&policy(1 << 20).min_tensor_bytes(1024), &resident, &[0]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "no parameter is eligible: every parameter is smaller than \
                 min_tensor_bytes (1.00 KiB)"
            ),
            "{w:?}"
        );
        let w = selection_warnings(
            &policy(1 << 20).params(["mlp"]).min_tensor_bytes(1024),
            &resident,
            &[0],
        );
        assert!(
            w[0].contains("every parameter the filters select is smaller"),
            "{w:?}"
        );
        // No parameters at all: nothing to say.
        assert!(selection_warnings(&policy(1 << 20), &[], &[]).is_empty());
    }

    #[test]
    fn lookahead_warning_uses_human_sizes() {
        let params = [
            row("a", 3 << 20, Placement::Host),
            row("b", 1 << 20, Placement::Host),
            row("c", 8 << 20, Placement::Device),
        ];
        let w = beyond_lookahead(&params, 2 << 20).expect("a is larger");
        assert_eq!(
            w,
            "1 offloaded tensors (3.00 MiB) are larger than the prefetch lookahead of 2.00 MiB: \
             they are never prefetched, every use copies them on demand without overlap; use \
             prefetch:6291456 (twice the largest, 3.00 MiB) or more"
        );
        assert_eq!(beyond_lookahead(&params, 3 << 20), None);
    }

    #[test]
    fn warns_only_when_the_whole_model_fits() {
        let memory = DeviceMemory {
            free: 70 * G,
            total: 80 * G,
        };
        let w = offload_not_needed("Cuda(0)", 2 * G, 14 * G, memory, None).expect("fits");
        assert!(
            w.starts_with("2.00 GiB of parameters are offloaded although all 14.0 GiB"),
            "{w}"
        );
        assert!(
            w.contains("fit in the 70.0 GiB free on Cuda(0) (of 80.0 GiB)")
                && w.contains("--offload-gb 0"),
            "{w}"
        );
        // Too big for 90 % of the free memory, or nothing offloaded: no warning.
        assert_eq!(offload_not_needed("d", 10 * G, 64 * G, memory, None), None);
        assert_eq!(offload_not_needed("d", 0, 14 * G, memory, None), None);
        // With a calibration, the cost per forward.
        let c = Calibration {
            upload_latency_s: 1e-5,
            upload_bytes_per_s: 25e9,
            rows: Vec::new(),
            copies_overlap_compute: true,
            weight_bytes: 1 << 24,
            seconds: 0.1,
        };
        let w = offload_not_needed("d", 2 * G, 14 * G, memory, Some(&c)).expect("fits");
        assert!(w.contains("about 85.9 ms at the 25.0 GB/s measured"), "{w}");
    }
}
