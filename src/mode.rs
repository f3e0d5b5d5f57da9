//! Offload modes and the environment switches that override them.

use serde::{Deserialize, Serialize};

use crate::error::OffloadError;

/// Environment variable: when set to a true value (see [`parse_env_flag`]), offloaded tensors
/// are never read in place (vLLM's `VLLM_WEIGHT_OFFLOADING_DISABLE_UVA`): every use makes a
/// transient device copy.
pub const ENV_DISABLE_UVA: &str = "BURN_OFFLOAD_DISABLE_UVA";
/// Environment variable: when set to a true value (see [`parse_env_flag`]), host memory is
/// never pinned (vLLM's `VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY`).
pub const ENV_DISABLE_PIN_MEMORY: &str = "BURN_OFFLOAD_DISABLE_PIN_MEMORY";

/// Environment variable: when set to a true value (see [`parse_env_flag`]), prefetching
/// ([`OffloadMode::Prefetch`], and `Auto` where it prefetches) takes its copies through the
/// copy engine ([`PrefetchCopies::Engine`]) whatever the mode says: the device check's switch.
pub const ENV_PREFETCH_ENGINE: &str = "BURN_OFFLOAD_PREFETCH_ENGINE";

/// Lookahead of [`OffloadMode::Prefetch`] when `prefetch` is given without a size: 256 MiB.
pub const DEFAULT_PREFETCH_LOOKAHEAD_BYTES: u64 = 256 << 20;

/// How an op reads an offloaded tensor.
///
/// Parsed from (and displayed as) `uva`, `copy`, `auto`, `prefetch` (default lookahead,
/// [`DEFAULT_PREFETCH_LOOKAHEAD_BYTES`]), `prefetch:<bytes>` (`bytes` > 0), or either with
/// `:engine` after it (copies through the copy engine, [`PrefetchCopies::Engine`]). With serde,
/// unit modes are strings (`"uva"`) and prefetch is
/// `{"prefetch": {"lookahead_bytes": N, "copies": "engine"}}` (`copies` may be left out:
/// `cubecl`); a lookahead of 0 is refused where a policy is validated
/// ([`OffloadPolicy::validate`](crate::OffloadPolicy::validate)).
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
        /// What makes the copies (CubeCL uploads, or the copy engine's ring).
        #[serde(default, skip_serializing_if = "PrefetchCopies::is_cubecl")]
        copies: PrefetchCopies,
    },
}

/// What makes [`OffloadMode::Prefetch`]'s copies.
///
/// The default stays [`CubeCl`](Self::CubeCl) until a GPU run of the benches measures the
/// engine beside it (README, "Copy engine"): the engine has never run on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchCopies {
    /// Each copy is a CubeCL upload into a buffer of its own from the prefetch thread's
    /// stream pool, ordered by CubeCL's cross-stream events (see [`crate::prefetch`]).
    #[default]
    CubeCl,
    /// The copies go into the ring of a [`CopyEngine`](crate::copy::CopyEngine) of the
    /// model's context, one fill per group of the learned read order, ordered by the engine's
    /// flags: device memory for prefetching is exactly the ring (`lookahead_bytes`). On
    /// targets without an engine (NdArray, ROCm) this falls back to `CubeCl`'s path, logged
    /// once. See [`crate::prefetch`] ("Through the copy engine").
    Engine,
}

impl PrefetchCopies {
    /// Whether these are CubeCL's copies (the default, left out when serialised).
    pub fn is_cubecl(&self) -> bool {
        *self == Self::CubeCl
    }
}

impl OffloadMode {
    /// [`Prefetch`](Self::Prefetch) with `lookahead_bytes` and CubeCL's copies (the default).
    pub const fn prefetch(lookahead_bytes: u64) -> Self {
        Self::Prefetch {
            lookahead_bytes,
            copies: PrefetchCopies::CubeCl,
        }
    }

    /// [`Prefetch`](Self::Prefetch) with `lookahead_bytes` and the copy engine's copies.
    pub const fn prefetch_engine(lookahead_bytes: u64) -> Self {
        Self::Prefetch {
            lookahead_bytes,
            copies: PrefetchCopies::Engine,
        }
    }
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
            "prefetch" => Ok(Self::prefetch(DEFAULT_PREFETCH_LOOKAHEAD_BYTES)),
            "prefetch:engine" => Ok(Self::prefetch_engine(DEFAULT_PREFETCH_LOOKAHEAD_BYTES)),
            other => match other.strip_prefix("prefetch:") {
                Some(rest) => {
                    let (bytes, copies) = match rest.trim().strip_suffix(":engine") {
                        Some(bytes) => (bytes, PrefetchCopies::Engine),
                        None => (rest, PrefetchCopies::CubeCl),
                    };
                    match bytes.trim().parse().map_err(|_| unknown())? {
                        0 => Err(OffloadError::ZeroPrefetchLookahead),
                        lookahead_bytes => Ok(Self::Prefetch {
                            lookahead_bytes,
                            copies,
                        }),
                    }
                }
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
            Self::Prefetch {
                lookahead_bytes,
                copies: PrefetchCopies::CubeCl,
            } => write!(f, "prefetch:{lookahead_bytes}"),
            Self::Prefetch {
                lookahead_bytes,
                copies: PrefetchCopies::Engine,
            } => write!(f, "prefetch:{lookahead_bytes}:engine"),
        }
    }
}

/// The value of an environment switch: `Some(true)` for `1`, `true`, `yes`, `on`,
/// `Some(false)` for `0`, `false`, `no`, `off` (any case, surrounding whitespace ignored), `None`
/// for anything else.
pub fn parse_env_flag(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// The warning for switch `name` set to `value`, which [`parse_env_flag`] does not recognise.
fn unrecognised_flag_warning(name: &str, value: &str) -> String {
    format!(
        "{name}={value:?} is not recognised, so {name} is treated as unset; set it to 1, true, \
         yes or on to switch it on, or 0, false, no or off (any case)"
    )
}

/// Whether this is the first call for `name` in this process (each variable warns once).
fn first_warning(name: &str) -> bool {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.iter().any(|n| n == name) {
        false
    } else {
        warned.push(name.to_string());
        true
    }
}

/// Whether switch `name` is on. Unset, empty or off: `false`; an unrecognised value counts as
/// unset and is logged (once per variable and process) with the spellings that work.
fn env_flag(name: &str) -> bool {
    let Some(value) = std::env::var_os(name) else {
        return false;
    };
    let value = value.to_string_lossy();
    match parse_env_flag(&value) {
        Some(on) => on,
        None => {
            if !value.trim().is_empty() && first_warning(name) {
                log::warn!("{}", unrecognised_flag_warning(name, &value));
            }
            false
        }
    }
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
/// in the model's context (what keeps `Prefetch` from gathering embedding rows in place).
pub fn in_place_disabled() -> bool {
    env_flag(ENV_DISABLE_UVA)
}

/// The copies prefetching uses after the environment override ([`ENV_PREFETCH_ENGINE`] forces
/// [`PrefetchCopies::Engine`]).
pub fn effective_prefetch_copies(copies: PrefetchCopies) -> PrefetchCopies {
    if env_flag(ENV_PREFETCH_ENGINE) {
        PrefetchCopies::Engine
    } else {
        copies
    }
}

/// `pin_memory` after the environment overrides ([`ENV_DISABLE_PIN_MEMORY`]).
pub fn effective_pin_memory(pin_memory: bool) -> bool {
    pin_memory && !env_flag(ENV_DISABLE_PIN_MEMORY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_flag_spellings() {
        let table: &[(&str, Option<bool>)] = &[
            ("1", Some(true)),
            ("true", Some(true)),
            ("TRUE", Some(true)),
            ("True", Some(true)),
            ("yes", Some(true)),
            ("YES", Some(true)),
            ("on", Some(true)),
            ("On", Some(true)),
            (" 1\n", Some(true)),
            ("\ton ", Some(true)),
            ("0", Some(false)),
            ("false", Some(false)),
            ("FALSE", Some(false)),
            ("no", Some(false)),
            ("No", Some(false)),
            ("off", Some(false)),
            ("OFF", Some(false)),
            (" off ", Some(false)),
            ("", None),
            ("  ", None),
            ("2", None),
            ("-1", None),
            ("01", None),
            ("y", None),
            ("n", None),
            ("enable", None),
            ("disabled", None),
            ("truee", None),
            ("o n", None),
        ];
        for &(value, expected) in table {
            assert_eq!(parse_env_flag(value), expected, "{value:?}");
        }
    }

    #[test]
    fn unrecognised_flag_warning_says_what_works() {
        let w = unrecognised_flag_warning(ENV_DISABLE_UVA, "maybe");
        assert!(
            w.starts_with("BURN_OFFLOAD_DISABLE_UVA=\"maybe\" is not recognised"),
            "{w}"
        );
        assert!(w.contains("treated as unset"), "{w}");
        for spelling in ["1, true, yes or on", "0, false, no or off"] {
            assert!(w.contains(spelling), "{w}");
        }
    }

    #[test]
    fn first_warning_is_once_per_name() {
        assert!(first_warning("BURN_OFFLOAD_TEST_FLAG_A"));
        assert!(!first_warning("BURN_OFFLOAD_TEST_FLAG_A"));
        assert!(first_warning("BURN_OFFLOAD_TEST_FLAG_B"));
        assert!(!first_warning("BURN_OFFLOAD_TEST_FLAG_A"));
        assert!(!first_warning("BURN_OFFLOAD_TEST_FLAG_B"));
    }

    #[test]
    fn prefetch_zero_is_refused_with_the_fix() {
        for text in ["prefetch:0", " Prefetch: 0 ", "prefetch:00"] {
            assert_eq!(
                text.parse::<OffloadMode>(),
                Err(OffloadError::ZeroPrefetchLookahead),
                "{text}"
            );
        }
        let message = OffloadError::ZeroPrefetchLookahead.to_string();
        assert!(
            message.contains("positive lookahead") && message.contains("`copy`"),
            "{message}"
        );
        assert_eq!(
            "prefetch:1".parse::<OffloadMode>(),
            Ok(OffloadMode::prefetch(1))
        );
    }

    #[test]
    fn prefetch_through_the_engine_parses_prints_and_serialises() {
        for (text, mode, shown) in [
            (
                "prefetch:4096",
                OffloadMode::prefetch(4096),
                "prefetch:4096",
            ),
            (
                "prefetch:4096:engine",
                OffloadMode::prefetch_engine(4096),
                "prefetch:4096:engine",
            ),
            (
                " Prefetch:Engine ",
                OffloadMode::prefetch_engine(DEFAULT_PREFETCH_LOOKAHEAD_BYTES),
                "prefetch:268435456:engine",
            ),
        ] {
            assert_eq!(text.parse::<OffloadMode>(), Ok(mode), "{text}");
            assert_eq!(mode.to_string(), shown);
            assert_eq!(shown.parse::<OffloadMode>(), Ok(mode), "round trip");
        }
        assert!("prefetch:4096:dma".parse::<OffloadMode>().is_err());
        assert_eq!(
            "prefetch:0:engine".parse::<OffloadMode>(),
            Err(OffloadError::ZeroPrefetchLookahead)
        );
        let json = serde_json::to_string(&OffloadMode::prefetch_engine(8)).unwrap();
        assert_eq!(
            json,
            r#"{"prefetch":{"lookahead_bytes":8,"copies":"engine"}}"#
        );
        // Written before the switch existed: still CubeCL's copies.
        let old: OffloadMode =
            serde_json::from_str(r#"{"prefetch":{"lookahead_bytes":8}}"#).unwrap();
        assert_eq!(old, OffloadMode::prefetch(8));
    }
}
