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
    /// Its compute device (`Debug` form), the device that reads it where it is offloaded.
    #[serde(default)]
    pub device: String,
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
    /// The policy's optimizer state (where it lives, how much), if it said.
    #[serde(default)]
    pub optimizer_state: Option<crate::train::OptimizerState>,
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

/// `bytes` for people: whole bytes below 1 KiB (`12 B`), else KiB, MiB, GiB, TiB, PiB or EiB
/// with three significant digits (`1.50 GiB`, `42.5 KiB`, `425 KiB`; up to `1023` of a unit).
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Values that would print as 1024 go up a unit.
    while value >= 1023.5 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    // Decimals for three significant digits after rounding (9.996 prints as 10.0, not 10.00).
    let decimals = if value < 9.995 {
        2
    } else if value < 99.95 {
        1
    } else {
        0
    };
    format!("{value:.decimals$} {}", UNITS[unit])
}

impl OffloadReport {
    /// Parameters in host memory.
    pub fn offloaded(&self) -> impl Iterator<Item = &ParamReport> {
        self.params
            .iter()
            .filter(|p| p.placement == Placement::Host)
    }

    /// The policy's optimizer state, if it said ([`OffloadPolicy::optimizer_state`](crate::OffloadPolicy::optimizer_state)).
    pub fn optimizer_state(&self) -> Option<crate::train::OptimizerState> {
        self.optimizer_state
    }

    /// Where a training run keeps weights, gradients and optimizer state (`state`, or the
    /// policy's), per device, estimated from this report (see [`TrainingMemory`](crate::train::TrainingMemory)).
    pub fn training_memory(
        &self,
        state: Option<crate::train::OptimizerState>,
    ) -> crate::train::TrainingMemory {
        crate::train::TrainingMemory::of(self, state.or(self.optimizer_state))
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

    /// The one-line summary that is also logged, sizes in human units (see the field docs for
    /// exact bytes), e.g. `Total CPU offloaded parameters: 425 KiB in 20 of 20 tensors (425 KiB
    /// in all, budget 512 KiB per device, mode uva)`.
    pub fn summary(&self) -> String {
        format!(
            "Total CPU offloaded parameters: {} in {} of {} tensors ({} in all, budget {} per \
             device, mode {})",
            human_bytes(self.offloaded_bytes()),
            self.offloaded_tensors(),
            self.params.len(),
            human_bytes(self.total_bytes()),
            human_bytes(self.max_bytes),
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
        if self.optimizer_state.is_some() {
            write!(f, "{}", self.training_memory(None))?;
        }
        write!(f, "{}", self.summary())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_table() {
        const K: u64 = 1 << 10;
        const M: u64 = 1 << 20;
        const G: u64 = 1 << 30;
        let table: &[(u64, &str)] = &[
            (0, "0 B"),
            (12, "12 B"),
            (1023, "1023 B"),
            (1024, "1.00 KiB"),
            (1536, "1.50 KiB"),
            (10 * K - 6, "9.99 KiB"),
            (10 * K - 1, "10.0 KiB"),
            (42 * K + K / 2, "42.5 KiB"),
            (100 * K - 1, "100 KiB"),
            (425 * K + 256, "425 KiB"),
            (1023 * K, "1023 KiB"),
            (M - 1, "1.00 MiB"),
            (M, "1.00 MiB"),
            (256 * M, "256 MiB"),
            (3 * G / 2, "1.50 GiB"),
            (14 * G, "14.0 GiB"),
            (70 * G, "70.0 GiB"),
            (1 << 40, "1.00 TiB"),
            (1 << 50, "1.00 PiB"),
            (u64::MAX, "16.0 EiB"),
        ];
        for &(bytes, expected) in table {
            assert_eq!(human_bytes(bytes), expected, "{bytes} bytes");
        }
    }

    #[test]
    fn summary_uses_human_sizes() {
        let row = |bytes, placement| ParamReport {
            path: "w".into(),
            shape: vec![bytes as usize / 4],
            dtype: "f32".into(),
            bytes,
            placement,
            moved: false,
            device: String::new(),
        };
        let report = OffloadReport {
            params: vec![row(12, Placement::Host), row(3 << 29, Placement::Device)],
            max_bytes: 20,
            mode: crate::OffloadMode::Uva,
            warnings: Vec::new(),
            calibration: None,
            device_memory: None,
            prefetch_lookahead_bytes: None,
            optimizer_state: None,
            context: ReportContext::default(),
        };
        assert_eq!(
            report.summary(),
            "Total CPU offloaded parameters: 12 B in 1 of 2 tensors (1.50 GiB in all, budget 20 B \
             per device, mode uva)"
        );
    }
}
