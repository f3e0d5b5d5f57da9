//! Offload modes and the environment switches that override them.

use serde::{Deserialize, Serialize};

use crate::error::OffloadError;

/// Environment variable: when `1`, offloaded tensors are never read in place (vLLM's
/// `VLLM_WEIGHT_OFFLOADING_DISABLE_UVA`): every use makes a transient device copy.
pub const ENV_DISABLE_UVA: &str = "BURN_OFFLOAD_DISABLE_UVA";
/// Environment variable: when `1`, host memory is never pinned (vLLM's
/// `VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY`).
pub const ENV_DISABLE_PIN_MEMORY: &str = "BURN_OFFLOAD_DISABLE_PIN_MEMORY";

/// Lookahead of [`OffloadMode::Prefetch`] when `prefetch` is given without a size: 256 MiB.
pub const DEFAULT_PREFETCH_LOOKAHEAD_BYTES: u64 = 256 << 20;

/// How an op reads an offloaded tensor.
///
/// Parsed from (and displayed as) `uva`, `copy`, `auto`, `prefetch` (default lookahead,
/// [`DEFAULT_PREFETCH_LOOKAHEAD_BYTES`]) or `prefetch:<bytes>`. With serde, unit modes are
/// strings (`"uva"`) and prefetch is `{"prefetch": {"lookahead_bytes": N}}`.
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
    /// Transient device copies like `Copy`, but made ahead of time on a background thread: the
    /// order in which offloaded tensors are read is learned during the first forward, and on
    /// later forwards the next tensors in that order are uploaded while the current op runs,
    /// keeping at most `lookahead_bytes` of such copies alive. Reads in place only to gather
    /// an `embedding` lookup's rows where the target can read the table in place (a copy
    /// would move the whole table, e.g. a tied LM head's, for a few rows), and never with
    /// [`ENV_DISABLE_UVA`]. See [`crate::prefetch`].
    Prefetch {
        /// The most bytes of prefetched (uploaded, not yet used) copies alive per device.
        lookahead_bytes: u64,
    },
}

impl std::str::FromStr for OffloadMode {
    type Err = OffloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || OffloadError::UnknownMode {
            given: s.to_string(),
        };
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "uva" => Ok(Self::Uva),
            "copy" => Ok(Self::Copy),
            "auto" => Ok(Self::Auto),
            "prefetch" => Ok(Self::Prefetch {
                lookahead_bytes: DEFAULT_PREFETCH_LOOKAHEAD_BYTES,
            }),
            other => match other.strip_prefix("prefetch:") {
                Some(bytes) => Ok(Self::Prefetch {
                    lookahead_bytes: bytes.trim().parse().map_err(|_| unknown())?,
                }),
                None => Err(unknown()),
            },
        }
    }
}

impl std::fmt::Display for OffloadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uva => f.write_str("uva"),
            Self::Copy => f.write_str("copy"),
            Self::Auto => f.write_str("auto"),
            Self::Prefetch { lookahead_bytes } => write!(f, "prefetch:{lookahead_bytes}"),
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"))
        .unwrap_or(false)
}

/// `mode` after the environment overrides ([`ENV_DISABLE_UVA`] turns `Uva` and `Auto` into
/// `Copy`; `Prefetch` stays a prefetch, but gathers embedding rows through copies too, see
/// [`in_place_disabled`]).
pub fn effective_mode(mode: OffloadMode) -> OffloadMode {
    if in_place_disabled() && !matches!(mode, OffloadMode::Prefetch { .. }) {
        OffloadMode::Copy
    } else {
        mode
    }
}

/// Whether [`ENV_DISABLE_UVA`] switches reading host memory in place off. `apply` records it
/// per device (what keeps `Prefetch` from gathering embedding rows in place).
pub fn in_place_disabled() -> bool {
    env_flag(ENV_DISABLE_UVA)
}

/// `pin_memory` after the environment overrides ([`ENV_DISABLE_PIN_MEMORY`]).
pub fn effective_pin_memory(pin_memory: bool) -> bool {
    pin_memory && !env_flag(ENV_DISABLE_PIN_MEMORY)
}
