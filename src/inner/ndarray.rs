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

use burn_backend::ops::QTensorOps;
use burn_std::quantization::{QuantParam, QuantScheme, QuantStore, QuantValue};

use super::{HostMatmulShape, OffloadTarget, TargetDevice, quantize_with};
use crate::auto::{Calibration, measure};
use crate::error::OffloadError;
use crate::host::HostTensor;
use crate::quant::{codec_unsupported, decode, decode_rows, encode};

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

    fn cannot_hold_quantized(&self, scheme: &QuantScheme) -> Option<String> {
        ndarray_cannot_hold(scheme)
    }

    fn cannot_read_quantized(&self, scheme: &QuantScheme, shape: &[usize]) -> Option<String> {
        ndarray_cannot_hold(scheme)?;
        codec_unsupported(shape, scheme)
    }
}

/// burn-ndarray 0.21 holds 8-bit values with f32 scales in its native store only.
fn ndarray_cannot_hold(scheme: &QuantScheme) -> Option<String> {
    let holds = matches!(scheme.value, QuantValue::Q8S | QuantValue::Q8F)
        && scheme.param == QuantParam::F32
        && scheme.store == QuantStore::Native;
    (!holds).then(|| {
        "burn-ndarray 0.21 holds only 8-bit values with f32 scales, stored natively \
         (q8s/…/f32/native)"
            .to_string()
    })
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
        match host.quant_scheme() {
            // Dequantized as it is read (the host codec), into f32.
            Some(scheme) => {
                host.read_dtype() == DType::F32 && codec_unsupported(host.dims(), scheme).is_none()
            }
            None => matches!(host.dtype(), DType::F32 | DType::F64),
        }
    }

    fn cannot_hold_quantized(scheme: &QuantScheme) -> Option<String> {
        ndarray_cannot_hold(scheme)
    }

    /// Everything the host codec reads, and what burn-ndarray holds.
    fn cannot_read_quantized(scheme: &QuantScheme, shape: &[usize]) -> Option<String> {
        NdArrayDevice::Cpu.cannot_read_quantized(scheme, shape)
    }

    /// Burn's dequantization where burn-ndarray holds the scheme; else the host codec (the
    /// same arithmetic).
    fn upload_dequantized(host: &HostTensor, device: &NdArrayDevice) -> FloatTensor<Self> {
        let scheme = *host.quant_scheme().expect("quantized memory");
        if Self::cannot_hold_quantized(&scheme).is_none() {
            let dtype = host.read_dtype();
            return Self::dequantize(Self::q_from_data(host.to_data(), device), dtype.into());
        }
        let bytes = host
            .contiguous_bytes()
            .expect("quantized memory is contiguous");
        let values = decode(bytes, host.dims(), &scheme).unwrap_or_else(|e| panic!("{e}"));
        let data = TensorData::new(values, host.dims().to_vec()).convert_dtype(host.read_dtype());
        Self::float_from_data(data, device)
    }

    /// Burn's quantization where burn-ndarray holds the scheme; else the host codec.
    fn quantize_to_host(
        tensor: FloatTensor<Self>,
        scheme: &QuantScheme,
        scales: Option<FloatTensor<Self>>,
        pin: bool,
    ) -> Result<HostTensor, OffloadError> {
        if Self::cannot_hold_quantized(scheme).is_none() {
            return Self::download_quantized(quantize_with::<Self>(tensor, scheme, scales), pin);
        }
        let device = Self::float_device(&tensor);
        let shape = tensor.shape().to_vec();
        let read = |t| {
            read_sync(Self::float_into_data(t))
                .expect("ndarray reads cannot fail")
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("converted to f32")
        };
        let scales = scales.map(read);
        let bytes = encode(&read(tensor), &shape, scheme, scales.as_deref())?;
        let mut buffer = Self::alloc_host(&device, bytes.len(), pin)?;
        buffer.as_mut_slice().copy_from_slice(&bytes);
        HostTensor::new(buffer, shape, DType::QFloat(*scheme))
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
        if lhs.dtype() != rhs.read_dtype() {
            return Err(lhs);
        }
        if let Some(scheme) = rhs.quant_scheme() {
            // Dequantized as it is read: the packed bytes into f32, then the same loops.
            if lhs.dtype() != DType::F32 || codec_unsupported(rhs.dims(), scheme).is_some() {
                return Err(lhs);
            }
            let bytes = rhs
                .contiguous_bytes()
                .expect("quantized memory is contiguous");
            let Ok(values) = decode(bytes, rhs.dims(), scheme) else {
                return Err(lhs);
            };
            let device = Self::float_device(&lhs);
            let data = read_sync(Self::float_into_data(lhs)).expect("ndarray reads cannot fail");
            let n = plan.0.n as isize;
            let out = plan.run_slice::<f32>(&data, &values, 0, n, 1);
            return Ok(Self::float_from_data(out, &device));
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
        if let Some(scheme) = weights.quant_scheme()
            && codec_unsupported(weights.dims(), scheme).is_some()
        {
            return Err(indices);
        }
        let device = Self::int_device(&indices);
        let ids = read_sync(Self::int_into_data(indices))
            .expect("ndarray reads cannot fail")
            .convert::<i64>();
        let mut out_shape = ids.shape.to_vec();
        let ids = ids.to_vec::<i64>().expect("converted to i64 above");
        if let Some(scheme) = weights.quant_scheme() {
            // Only the requested rows are dequantized (rows are whole blocks).
            let rows = weights.dims()[0];
            let rows: Vec<usize> = ids.iter().map(|&id| checked_row(id, rows)).collect();
            let bytes = weights
                .contiguous_bytes()
                .expect("quantized memory is contiguous");
            let values =
                decode_rows(bytes, weights.dims(), scheme, rows).unwrap_or_else(|e| panic!("{e}"));
            out_shape.push(weights.dims()[1]);
            let data = TensorData::new(values, out_shape).convert_dtype(weights.read_dtype());
            return Ok(Self::float_from_data(data, &device));
        }
        let out = gather_rows(weights, &ids);
        out_shape.push(weights.dims()[1]);
        Ok(Self::float_from_data(
            TensorData::from_bytes_vec(out, out_shape, weights.dtype()),
            &device,
        ))
    }
}

/// `id` as a row of a table of `rows` rows.
///
/// # Panics
/// When it is out of range, naming the id and the table size (as Burn's backends panic on an
/// out-of-range index).
fn checked_row(id: i64, rows: usize) -> usize {
    assert!(
        id >= 0 && (id as usize) < rows,
        "embedding index {id} is out of range for a table of {rows} rows (valid ids: \
         0..{rows}); check the token ids against the embedding's size (e.g. the tokenizer's \
         vocabulary vs `num_embeddings`), or clamp or mask the ids before the lookup"
    );
    id as usize
}

/// Copies rows `ids` of a 2-D host view, byte for byte (any dtype, any strides).
pub(crate) fn gather_rows(weights: &HostTensor, ids: &[i64]) -> Vec<u8> {
    let [rows, cols] = [weights.dims()[0], weights.dims()[1]];
    let [rs, cs] = [weights.strides()[0], weights.strides()[1]];
    let esize = weights.dtype().size();
    let src = weights.buffer().as_slice();
    let mut out = Vec::with_capacity(ids.len() * cols * esize);
    for &id in ids {
        checked_row(id, rows);
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
        let (sk, sn) = HostMatmulShape::rhs_strides(rhs);
        let b: &[T] = bytemuck::cast_slice(rhs.buffer().as_slice());
        self.run_slice(lhs, b, rhs.offset() as isize, sk, sn)
    }

    /// [`run`](Self::run) with the rhs elements in `b`, element `[k, n]` at
    /// `base + k·sk + n·sn` (a checked view's layout, or a dequantized contiguous copy).
    fn run_slice<T>(
        &self,
        lhs: &TensorData,
        b: &[T],
        base: isize,
        sk: isize,
        sn: isize,
    ) -> TensorData
    where
        T: bytemuck::Pod + Default + Mul<Output = T> + AddAssign + burn_backend::Element,
    {
        let a = lhs.as_slice::<T>().expect("dtype checked by the caller");
        let HostMatmulShape { m, k, n, .. } = self.0;
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
