//! [`OffloadReport`]: what a policy placed where.

use serde::{Deserialize, Serialize};

use crate::context::OffloadContext;
use crate::stats::PrefetchStats;

/// Where a parameter ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Device memory.
    Device,
    /// Host memory read by the device.
    Host,
}

/// One parameter in an [`OffloadReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamReport {
    /// Full dotted path, e.g. `layers.3.mlp.up.weight`.
    pub path: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type, e.g. `f32`.
    pub dtype: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Placement after the policy.
    pub placement: Placement,
    /// Whether applying the policy moved (or retargeted) it.
    pub moved: bool,
}

/// What [`OffloadPolicy::apply`](crate::OffloadPolicy::apply) did: one row per float
/// parameter in module order, and totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffloadReport {
    /// Every float parameter, in module order.
    pub params: Vec<ParamReport>,
    /// The budget that was applied.
    pub max_bytes: u64,
    /// The effective mode (after environment overrides).
    pub mode: crate::OffloadMode,
    /// Warnings raised while applying (also logged).
    pub warnings: Vec<String>,
    /// What `Auto` mode decides from on the (first) device with offloaded parameters, when the
    /// mode is `Auto` and the measurement succeeded.
    pub calibration: Option<crate::Calibration>,
    /// Free and total memory of the (first) device with offloaded parameters, where the device
    /// reports it (not on the CPU).
    pub device_memory: Option<crate::inner::DeviceMemory>,
    /// The most bytes of prefetched copies kept alive on the (first) device with offloaded
    /// parameters, where copies are prefetched: `Prefetch`'s lookahead, or `Auto`'s (the
    /// default or twice the largest offloaded tensor, whichever is larger) where the
    /// calibration found that copies overlap compute. Device memory to plan for.
    pub prefetch_lookahead_bytes: Option<u64>,
    /// The model's context (not serialised; a report read back has none).
    #[serde(skip)]
    pub(crate) context: ReportContext,
}

/// The context a report holds: compared as equal whatever it is (two reports that say the same
/// thing are equal), not serialised.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReportContext(pub(crate) Option<OffloadContext>);

impl PartialEq for ReportContext {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

const GIB: f64 = (1u64 << 30) as f64;

impl OffloadReport {
    /// Parameters in host memory.
    pub fn offloaded(&self) -> impl Iterator<Item = &ParamReport> {
        self.params
            .iter()
            .filter(|p| p.placement == Placement::Host)
    }

    /// Number of parameters in host memory.
    pub fn offloaded_tensors(&self) -> usize {
        self.offloaded().count()
    }

    /// Bytes of parameters in host memory.
    pub fn offloaded_bytes(&self) -> u64 {
        self.offloaded().map(|p| p.bytes).sum()
    }

    /// Bytes of all float parameters.
    pub fn total_bytes(&self) -> u64 {
        self.params.iter().map(|p| p.bytes).sum()
    }

    /// Offloaded GiB.
    pub fn offloaded_gib(&self) -> f64 {
        self.offloaded_bytes() as f64 / GIB
    }

    /// Total GiB of float parameters.
    pub fn total_gib(&self) -> f64 {
        self.total_bytes() as f64 / GIB
    }

    /// The [`OffloadContext`] of the model this report placed (mode, calibration, prefetchers);
    /// `None` for a report read back from JSON.
    pub fn context(&self) -> Option<&OffloadContext> {
        self.context.0.as_ref()
    }

    /// The model's own prefetch statistics (zero for a report read back from JSON).
    pub fn prefetch_stats(&self) -> PrefetchStats {
        self.context()
            .map(OffloadContext::prefetch_stats)
            .unwrap_or_default()
    }

    /// Whether the parameter at `path` is in host memory.
    pub fn is_offloaded(&self, path: &str) -> bool {
        self.offloaded().any(|p| p.path == path)
    }

    /// The one-line summary that is also logged.
    pub fn summary(&self) -> String {
        format!(
            "Total CPU offloaded parameters: {:.3} GiB in {} of {} tensors ({:.3} GiB in all, budget {:.3} GiB, mode {})",
            self.offloaded_gib(),
            self.offloaded_tensors(),
            self.params.len(),
            self.total_gib(),
            self.max_bytes as f64 / GIB,
            self.mode,
        )
    }
}

impl std::fmt::Display for OffloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self
            .params
            .iter()
            .map(|p| p.path.len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            f,
            "{:<width$}  {:<18}  {:<5}  {:>12}  placement",
            "path", "shape", "dtype", "bytes"
        )?;
        for p in &self.params {
            writeln!(
                f,
                "{:<width$}  {:<18}  {:<5}  {:>12}  {}",
                p.path,
                format!("{:?}", p.shape),
                p.dtype,
                p.bytes,
                match p.placement {
                    Placement::Host => "host",
                    Placement::Device => "device",
                }
            )?;
        }
        if let Some(c) = &self.calibration {
            writeln!(f, "auto mode: {c}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        write!(f, "{}", self.summary())
    }
}
