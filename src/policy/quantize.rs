//! Which parameters a policy quantizes, and into which scheme ([`Quantization`]).

use burn_std::quantization::QuantScheme;
use serde::{Deserialize, Serialize};

use super::filter_matches;
use crate::error::OffloadError;
use crate::quant::{QuantPreset, scheme_name, tiling_unsupported};

/// Quantize a model's weights as [`OffloadPolicy::apply`](crate::OffloadPolicy::apply) places
/// them, and as a checkpoint is loaded into the placed model (one tensor at a time: the whole
/// float model is never in memory), with Burn's quantization (`QuantScheme`).
///
/// Quantized parameters are budgeted, reported and offloaded at their packed size (values and
/// scales). By default every parameter of rank 2 or more whose last dim the scheme's blocks
/// and packing tile is quantized; norms, biases and other rank-1 tensors stay float.
///
/// ```
/// use burn_offload::{OffloadPolicy, quant::QuantPreset, Quantization};
/// let policy = OffloadPolicy::from_gib(4.0)?
///     .quantize(Quantization::preset(QuantPreset::Q4).skip(["lm_head"]));
/// # Ok::<(), burn_offload::OffloadError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantization {
    /// The scheme every quantized parameter gets.
    pub scheme: QuantScheme,
    /// Dotted name segments: only parameters matching one are quantized (empty: every
    /// eligible one). A filter that names a parameter that has to stay float (rank 1) or whose
    /// shape the scheme cannot tile is an error at `apply`.
    pub params: Vec<String>,
    /// Dotted name segments of parameters that stay float (e.g. `lm_head`).
    pub skip: Vec<String>,
}

impl Quantization {
    /// Quantize into `scheme`.
    pub fn new(scheme: QuantScheme) -> Self {
        Self {
            scheme,
            params: Vec::new(),
            skip: Vec::new(),
        }
    }

    /// Quantize into a named preset's scheme (`q8s/b32/f16` or `q4s/b32/f16`).
    pub fn preset(preset: QuantPreset) -> Self {
        Self::new(preset.scheme())
    }

    /// Quantize only the parameters matching one of `filters` (dotted name segments).
    pub fn params<S: Into<String>>(mut self, filters: impl IntoIterator<Item = S>) -> Self {
        self.params = filters.into_iter().map(Into::into).collect();
        self
    }

    /// Keep the parameters matching one of `filters` float.
    pub fn skip<S: Into<String>>(mut self, filters: impl IntoIterator<Item = S>) -> Self {
        self.skip = filters.into_iter().map(Into::into).collect();
        self
    }

    /// The scheme for the parameter at `path` of `shape`, `None` when it stays float: skipped,
    /// not selected, rank 1, or a shape the scheme does not tile. An error when a `params`
    /// filter names it explicitly and it cannot be quantized.
    pub fn scheme_for(
        &self,
        path: &str,
        shape: &[usize],
    ) -> Result<Option<QuantScheme>, OffloadError> {
        if self.skip.iter().any(|f| filter_matches(f, path)) {
            return Ok(None);
        }
        let named = self.params.iter().any(|f| filter_matches(f, path));
        if !self.params.is_empty() && !named {
            return Ok(None);
        }
        let why_not = if shape.len() < 2 {
            Some("it has rank 1 (a norm, a bias or a scale stays float)".to_string())
        } else {
            tiling_problem(shape, &self.scheme)
        };
        match why_not {
            None => Ok(Some(self.scheme)),
            Some(reason) if named => Err(OffloadError::CannotQuantize {
                path: path.to_string(),
                shape: shape.to_vec(),
                reason,
                instead: "leave it out of `Quantization::params` (or add it to `skip`)".into(),
            }),
            Some(_) => Ok(None),
        }
    }
}

/// Why `scheme` cannot lay out a tensor of `shape`, if it cannot (a last dim that its blocks
/// or its packing do not divide).
fn tiling_problem(shape: &[usize], scheme: &QuantScheme) -> Option<String> {
    let reason = tiling_unsupported(shape, scheme)?;
    Some(format!(
        "{} cannot lay it out: {reason}",
        scheme_name(scheme)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_one_and_untiled_stay_float_unless_named() {
        let q = Quantization::preset(QuantPreset::Q4);
        assert!(
            q.scheme_for("layers.0.attn.w", &[64, 64])
                .unwrap()
                .is_some()
        );
        assert_eq!(q.scheme_for("norm.gamma", &[64]).unwrap(), None);
        assert_eq!(q.scheme_for("odd.weight", &[64, 30]).unwrap(), None);
        let named = Quantization::preset(QuantPreset::Q4).params(["norm"]);
        let err = named
            .scheme_for("norm.gamma", &[64])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("norm.gamma") && err.contains("rank 1"),
            "{err}"
        );
        let skip = Quantization::preset(QuantPreset::Q8).skip(["lm_head"]);
        assert_eq!(skip.scheme_for("lm_head.weight", &[64, 64]).unwrap(), None);
    }
}
