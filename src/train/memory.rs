//! [`TrainingMemory`]: where a training run keeps weights, gradients and optimizer state.

use serde::{Deserialize, Serialize};

use super::state::OptimizerState;
use crate::policy::{OffloadReport, Placement, human_bytes};

/// Bytes of weights, gradients and optimizer state in one kind of memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingBytes {
    /// Parameters (weights).
    pub weights: u64,
    /// Gradients: one per float parameter, the parameter's size, in device memory where
    /// autodiff computes them.
    pub gradients: u64,
    /// Optimizer state.
    pub state: u64,
}

impl TrainingBytes {
    /// All three.
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.state
    }
}

/// One compute device's share of a [`TrainingMemory`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceTraining {
    /// The compute device (`Debug` form, as in [`ParamReport::device`](crate::ParamReport::device)).
    pub device: String,
    /// In that device's memory.
    pub device_memory: TrainingBytes,
    /// In host memory that device reads (or that holds its state).
    pub host_memory: TrainingBytes,
}

/// Where a training run keeps weights, gradients and optimizer state, per compute device: what
/// [`OffloadReport::training_memory`] estimates from the placement of each parameter and the
/// [`OptimizerState`] (its size and placement).
///
/// Every float parameter is counted as trained (a gradient and state of its size; a frozen
/// one makes this an upper bound); quantized parameters are not (Burn cannot train them).
/// Activations are not in it: they depend on the batch (the fit planner's training mode takes
/// them as a number). What an optimizer really holds is measured by
/// [`OffloadOptimizer::state_memory`](crate::OffloadOptimizer::state_memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingMemory {
    /// One row per compute device, in the order the parameters first name them.
    pub devices: Vec<DeviceTraining>,
    /// The optimizer state counted (`None`: no state).
    pub state: Option<OptimizerState>,
}

impl TrainingMemory {
    /// The estimate for `report`'s placement and `state`.
    pub fn of(report: &OffloadReport, state: Option<OptimizerState>) -> Self {
        let mut devices: Vec<DeviceTraining> = Vec::new();
        for p in &report.params {
            let index = match devices.iter().position(|d| d.device == p.device) {
                Some(i) => i,
                None => {
                    devices.push(DeviceTraining {
                        device: p.device.clone(),
                        device_memory: TrainingBytes::default(),
                        host_memory: TrainingBytes::default(),
                    });
                    devices.len() - 1
                }
            };
            let row = &mut devices[index];
            let offloaded = p.placement == Placement::Host;
            if offloaded {
                row.host_memory.weights += p.bytes;
            } else {
                row.device_memory.weights += p.bytes;
            }
            if p.dtype.starts_with('q') {
                continue;
            }
            row.device_memory.gradients += p.bytes;
            if let Some(s) = state {
                let bytes = s.bytes_for(p.bytes);
                if s.placement.in_host(offloaded) {
                    row.host_memory.state += bytes;
                } else {
                    row.device_memory.state += bytes;
                }
            }
        }
        Self { devices, state }
    }

    /// Bytes in device memory, all devices together.
    pub fn device_total(&self) -> TrainingBytes {
        self.sum(|d| d.device_memory)
    }

    /// Bytes in host memory, all devices together.
    pub fn host_total(&self) -> TrainingBytes {
        self.sum(|d| d.host_memory)
    }

    fn sum(&self, part: impl Fn(&DeviceTraining) -> TrainingBytes) -> TrainingBytes {
        self.devices.iter().fold(TrainingBytes::default(), |a, d| {
            let b = part(d);
            TrainingBytes {
                weights: a.weights + b.weights,
                gradients: a.gradients + b.gradients,
                state: a.state + b.state,
            }
        })
    }
}

impl std::fmt::Display for TrainingMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            Some(s) => format!(
                "optimizer state: {} value(s) per parameter value, placement {}",
                s.values_per_param, s.placement
            ),
            None => "no optimizer state counted".to_string(),
        };
        writeln!(f, "Training memory ({state}):")?;
        writeln!(
            f,
            "{:<24} {:<7} {:>11} {:>11} {:>11} {:>11}",
            "device", "memory", "weights", "gradients", "state", "total"
        )?;
        for d in &self.devices {
            for (memory, b) in [("device", d.device_memory), ("host", d.host_memory)] {
                writeln!(
                    f,
                    "{:<24} {:<7} {:>11} {:>11} {:>11} {:>11}",
                    d.device,
                    memory,
                    human_bytes(b.weights),
                    human_bytes(b.gradients),
                    human_bytes(b.state),
                    human_bytes(b.total())
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::StatePlacement;

    fn report(rows: &[(u64, Placement, &str)]) -> OffloadReport {
        let json = serde_json::json!({
            "params": rows.iter().enumerate().map(|(i, (bytes, placement, dtype))| serde_json::json!({
                "path": format!("p{i}"), "shape": [bytes / 4], "dtype": dtype, "bytes": bytes,
                "placement": placement, "moved": false, "device": "Cpu",
            })).collect::<Vec<_>>(),
            "max_bytes": 0, "mode": "copy", "warnings": [], "calibration": null,
            "device_memory": null, "prefetch_lookahead_bytes": null,
        });
        serde_json::from_value(json).expect("a report")
    }

    #[test]
    fn counts_state_where_its_placement_says() {
        let r = report(&[
            (100, Placement::Host, "f32"),
            (40, Placement::Device, "f32"),
            (8, Placement::Host, "q8s/b32/f16"),
        ]);
        let m = |placement| TrainingMemory::of(&r, Some(OptimizerState::adam(placement)));
        let device = m(StatePlacement::Device);
        assert_eq!(device.devices.len(), 1);
        assert_eq!(
            device.device_total(),
            TrainingBytes {
                weights: 40,
                gradients: 140,
                state: 280
            }
        );
        assert_eq!(
            device.host_total(),
            TrainingBytes {
                weights: 108,
                gradients: 0,
                state: 0
            }
        );
        let with = m(StatePlacement::WithOffloaded);
        assert_eq!(with.device_total().state, 80);
        assert_eq!(with.host_total().state, 200);
        let host = m(StatePlacement::Host);
        assert_eq!(host.device_total().state, 0);
        assert_eq!(host.host_total().state, 280);
        assert_eq!(TrainingMemory::of(&r, None).device_total().state, 0);
        let text = host.to_string();
        assert!(text.contains("placement host"), "{text}");
        assert!(text.lines().count() == 4, "{text}");
    }
}
