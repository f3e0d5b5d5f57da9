//! The CPU reference target: [`OffloadTarget`] for burn-ndarray.
//!
//! Host memory is ordinary memory here, so "reading in place" means the kernels below read the
//! [`HostBuffer`](crate::host::HostBuffer) directly instead of copying it into an ndarray
//! tensor first. They are the reference for what a GPU target's zero-copy kernels compute.

use std::ops::{AddAssign, Mul};

use burn_backend::{
    DType, TensorData, TensorMetadata, ops::FloatTensorOps, ops::IntTensorOps, read_sync,
    tensor::FloatTensor, tensor::IntTensor,
};
use burn_ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayDevice, NdArrayTensor, QuantElement,
    SharedArray,
};

use super::{HostMatmulShape, OffloadTarget, TargetDevice};
use crate::auto::{Calibration, measure};
use crate::error::OffloadError;
use crate::host::HostTensor;

/// Rows up to which the in-place matmul beats copy + ndarray's GEMM on the CPU target
/// (`cargo bench --bench overhead`, the `rows` table; see README).
pub const CPU_ZERO_COPY_MAX_ROWS: usize = 16;

impl TargetDevice for NdArrayDevice {
    fn reads_host_in_place(&self) -> bool {
        true
    }

    /// Measured with `NdArray<f32>`. Copies are memcpys on the op thread's own cores: they do
    /// not overlap compute, so `Auto` does not prefetch here.
    fn calibrate(&self, pin: bool) -> Result<Calibration, OffloadError> {
        measure::<NdArray<f32>>(self, pin, false)
    }

    /// The CPU's model (from `/proc/cpuinfo` where there is one, else the architecture) and
    /// the threads this process may use (NdArray's matmul can use them all).
    fn fingerprint(&self) -> String {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!("{}, {threads} threads", crate::auto::cache::cpu_model())
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> OffloadTarget
    for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    type Staged = FloatTensor<Self>;

    /// A plain upload: the CPU target runs each op to completion, so any thread's copy is
    /// ready for any other's.
    fn prefetch_upload(
        host: &HostTensor,
        device: &NdArrayDevice,
        _consumers: &[u64],
    ) -> Option<FloatTensor<Self>> {
        Some(Self::upload(host, device))
    }

    fn take_staged(staged: FloatTensor<Self>) -> FloatTensor<Self> {
        staged
    }

    fn can_read_in_place(host: &HostTensor, _device: &NdArrayDevice) -> bool {
        matches!(host.dtype(), DType::F32 | DType::F64)
    }

    fn zero_copy_max_rows(_device: &NdArrayDevice) -> usize {
        CPU_ZERO_COPY_MAX_ROWS
    }

    fn host_matmul(
        lhs: FloatTensor<Self>,
        rhs: &HostTensor,
    ) -> Result<FloatTensor<Self>, FloatTensor<Self>> {
        let Some(plan) = MatmulPlan::new(&lhs.shape().to_vec(), rhs) else {
            return Err(lhs);
        };
        if lhs.dtype() != rhs.dtype() {
            return Err(lhs);
        }
        let device = Self::float_device(&lhs);
        let data = read_sync(Self::float_into_data(lhs)).expect("ndarray reads cannot fail");
        let out = match rhs.dtype() {
            DType::F32 => plan.run::<f32>(&data, rhs),
            DType::F64 => plan.run::<f64>(&data, rhs),
            _ => unreachable!("can_read_in_place admits f32 and f64 only"),
        };
        Ok(Self::float_from_data(out, &device))
    }

    fn host_embedding(
        weights: &HostTensor,
        indices: IntTensor<Self>,
    ) -> Result<FloatTensor<Self>, IntTensor<Self>> {
        if weights.dims().len() != 2 {
            return Err(indices);
        }
        let device = Self::int_device(&indices);
        let ids = read_sync(Self::int_into_data(indices))
            .expect("ndarray reads cannot fail")
            .convert::<i64>();
        let mut out_shape = ids.shape.to_vec();
        let ids = ids.to_vec::<i64>().expect("converted to i64 above");
        let out = gather_rows(weights, &ids);
        out_shape.push(weights.dims()[1]);
        Ok(Self::float_from_data(
            TensorData::from_bytes_vec(out, out_shape, weights.dtype()),
            &device,
        ))
    }
}

/// Copies rows `ids` of a 2-D host view, byte for byte (any dtype, any strides).
pub(crate) fn gather_rows(weights: &HostTensor, ids: &[i64]) -> Vec<u8> {
    let [rows, cols] = [weights.dims()[0], weights.dims()[1]];
    let [rs, cs] = [weights.strides()[0], weights.strides()[1]];
    let esize = weights.dtype().size();
    let src = weights.buffer().as_slice();
    let mut out = Vec::with_capacity(ids.len() * cols * esize);
    for &id in ids {
        assert!(
            id >= 0 && (id as usize) < rows,
            "embedding index {id} is out of range for a table of {rows} rows (valid ids: \
             0..{rows}); check the token ids against the embedding's size (e.g. the tokenizer's \
             vocabulary vs `num_embeddings`), or clamp or mask the ids before the lookup"
        );
        let row = weights.offset() as isize + id as isize * rs;
        if cs == 1 {
            let start = row as usize * esize;
            out.extend_from_slice(&src[start..start + cols * esize]);
        } else {
            for c in 0..cols as isize {
                let start = (row + c * cs) as usize * esize;
                out.extend_from_slice(&src[start..start + esize]);
            }
        }
    }
    out
}

/// `lhs [.., M, K] @ rhs [1.., K, N]` with the rhs read from host memory: each rhs element
/// is read once for all M rows.
struct MatmulPlan(HostMatmulShape);

impl MatmulPlan {
    fn new(lhs: &[usize], rhs: &HostTensor) -> Option<Self> {
        HostMatmulShape::new(lhs, rhs).map(Self)
    }

    fn run<T>(&self, lhs: &TensorData, rhs: &HostTensor) -> TensorData
    where
        T: bytemuck::Pod + Default + Mul<Output = T> + AddAssign + burn_backend::Element,
    {
        let a = lhs.as_slice::<T>().expect("dtype checked by the caller");
        let HostMatmulShape { m, k, n, .. } = self.0;
        let (sk, sn) = HostMatmulShape::rhs_strides(rhs);
        let b: &[T] = bytemuck::cast_slice(rhs.buffer().as_slice());
        let base = rhs.offset() as isize;
        let mut out = vec![T::default(); m * n];
        if sn == 1 {
            // Row-major weight: stream each weight row once, accumulate into every output row.
            for kk in 0..k {
                let start = (base + kk as isize * sk) as usize;
                let row = &b[start..start + n];
                for mm in 0..m {
                    let av = a[mm * k + kk];
                    for (o, &w) in out[mm * n..(mm + 1) * n].iter_mut().zip(row) {
                        *o += av * w;
                    }
                }
            }
        } else if sk == 1 {
            // Transposed weight (e.g. a tied LM head): each column is contiguous.
            for nn in 0..n {
                let start = (base + nn as isize * sn) as usize;
                let col = &b[start..start + k];
                for mm in 0..m {
                    let mut acc = T::default();
                    for (&x, &w) in a[mm * k..(mm + 1) * k].iter().zip(col) {
                        acc += x * w;
                    }
                    out[mm * n + nn] = acc;
                }
            }
        } else {
            for kk in 0..k {
                for nn in 0..n {
                    let w = b[(base + kk as isize * sk + nn as isize * sn) as usize];
                    for mm in 0..m {
                        out[mm * n + nn] += a[mm * k + kk] * w;
                    }
                }
            }
        }
        TensorData::new(out, self.0.out_dims.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostBuffer;

    fn table() -> HostTensor {
        let data = TensorData::new((0..15).map(|v| v as f32).collect::<Vec<_>>(), [5, 3]);
        HostTensor::from_data(&data, HostBuffer::pageable).unwrap()
    }

    #[test]
    fn gather_rows_copies_the_requested_rows() {
        let out = gather_rows(&table(), &[4, 0, 4]);
        let values: &[f32] = bytemuck::cast_slice(&out);
        assert_eq!(values, [12.0, 13.0, 14.0, 0.0, 1.0, 2.0, 12.0, 13.0, 14.0]);
    }

    #[test]
    #[should_panic(
        expected = "embedding index 5 is out of range for a table of 5 rows (valid ids: 0..5); check the token ids"
    )]
    fn an_id_past_the_table_panics_with_the_id_and_the_table_size() {
        gather_rows(&table(), &[1, 5]);
    }

    #[test]
    #[should_panic(expected = "embedding index -1 is out of range for a table of 5 rows")]
    fn a_negative_id_panics() {
        gather_rows(&table(), &[-1]);
    }
}
