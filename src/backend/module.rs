//! Module ops that read offloaded weights in place: `linear` and `embedding`. Like every
//! forward op that reads weights, they first report parameters that lost their host placement
//! ([`crate::mark`]).

use burn_backend::TensorMetadata;

use super::generated::delegate_module_ops;
use super::prelude::*;
use crate::plan::{OpKind, ReadPath};
use crate::stats::record;

impl<B: OffloadTarget> ModuleOps<Self> for OffloadBackend<B> {
    delegate_module_ops!();

    fn embedding(weights: FloatTensor<Self>, indices: IntTensor<Self>) -> FloatTensor<Self> {
        crate::mark::check_lost();
        match weights {
            OffloadTensor::Offloaded(w) => {
                let indices = match Self::read_path(&w, OpKind::Embedding) {
                    ReadPath::InPlace => {
                        let dims = w.host().dims();
                        let row_bytes = match w.host().quant_scheme() {
                            // Packed values and scales of a row: the table's bytes / rows.
                            Some(_) => {
                                w.host().size_bytes() / dims.first().copied().unwrap_or(1).max(1)
                            }
                            None => dims.get(1).copied().unwrap_or(1) * w.host().dtype().size(),
                        };
                        let bytes = (indices.shape().num_elements() * row_bytes) as u64;
                        match B::host_embedding(w.host(), indices) {
                            Ok(out) => {
                                record(|s| {
                                    s.zero_copy_ops += 1;
                                    s.zero_copy_bytes += bytes;
                                });
                                return Self::resident(out);
                            }
                            Err(indices) => indices,
                        }
                    }
                    ReadPath::Copy | ReadPath::PrefetchedCopy => indices,
                };
                Self::resident(B::embedding(Self::upload(&w), indices))
            }
            OffloadTensor::Resident(w) => Self::resident(B::embedding(w, indices)),
        }
    }

    fn linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        crate::mark::check_lost();
        match (x, weight) {
            (OffloadTensor::Resident(x), OffloadTensor::Offloaded(w)) => {
                // Same shapes as Burn's default `linear`: weight [K, N] broadcast over x's batch.
                let x_rank = x.shape().num_dims();
                // Give the weight x's rank (leading ones, as Burn's `linear` unsqueezes it): the
                // copy path's GEMM needs equal ranks.
                // (A quantized weight has no strided views: the in-place kernels take its rank
                // as it is, and the copy path reshapes the device copy.)
                let mut dims = vec![1; x_rank.saturating_sub(w.host().dims().len())];
                dims.extend_from_slice(w.host().dims());
                let host = if w.host().is_quantized() {
                    w.host().clone()
                } else {
                    w.host()
                        .expand(dims)
                        .expect("leading unit dims always broadcast")
                };
                let out = Self::matmul_host_rhs(x, &w.with_host(host));
                Self::resident(match bias.map(Self::fetch) {
                    Some(bias) => {
                        let mut dims = vec![1; x_rank.saturating_sub(1)];
                        dims.push(bias.shape().num_elements());
                        B::float_add(out, B::float_reshape(bias, Shape::from(dims)))
                    }
                    None => out,
                })
            }
            (x, weight) => Self::resident(B::linear(
                Self::fetch(x),
                Self::fetch(weight),
                bias.map(Self::fetch),
            )),
        }
    }
}
