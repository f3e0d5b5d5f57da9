//! Offload modes and the environment switches that override them.

use serde::{Deserialize, Serialize};

use crate::error::OffloadError;

/// Environment variable: when `1`, offloaded tensors are never read in place (vLLM's
/// `VLLM_WEIGHT_OFFLOADING_DISABLE_UVA`): every use makes a transient device copy.
pub const ENV_DISABLE_UVA: &str = "BURN_OFFLOAD_DISABLE_UVA";
/// Environment variable: when `1`, host memory is never pinned (vLLM's
/// `VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY`).
pub const ENV_DISABLE_PIN_MEMORY: &str = "BURN_OFFLOAD_DISABLE_PIN_MEMORY";

/// How an op reads an offloaded tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadMode {
    /// Zero-copy: ops the target has a host-reading kernel for (`linear`/`matmul` with few
    /// rows, `embedding`) read host memory in place; every other op uses a transient copy.
    Uva,
    /// A transient device copy per use, dropped right after (vLLM's non-UVA path).
    Copy,
    /// The target's best choice (zero-copy where it pays and the memory allows it).
    #[default]
    Auto,
}

impl std::str::FromStr for OffloadMode {
    type Err = OffloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uva" => Ok(Self::Uva),
            "copy" => Ok(Self::Copy),
            "auto" => Ok(Self::Auto),
            _ => Err(OffloadError::UnknownMode {
                given: s.to_string(),
            }),
        }
    }
}

impl std::fmt::Display for OffloadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Uva => "uva",
            Self::Copy => "copy",
            Self::Auto => "auto",
        })
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"))
        .unwrap_or(false)
}

/// `mode` after the environment overrides ([`ENV_DISABLE_UVA`] turns it into `Copy`).
pub fn effective_mode(mode: OffloadMode) -> OffloadMode {
    if env_flag(ENV_DISABLE_UVA) {
        OffloadMode::Copy
    } else {
        mode
    }
}

/// `pin_memory` after the environment overrides ([`ENV_DISABLE_PIN_MEMORY`]).
pub fn effective_pin_memory(pin_memory: bool) -> bool {
    pin_memory && !env_flag(ENV_DISABLE_PIN_MEMORY)
}
