//! Launchers for the kernels that read QUANTIZED weights in place and dequantize them as they
//! read, `kernels/qmatmul_host.cu` (the few-row matmul) and `kernels/qgather_host.cu` (the
//! embedding gather); their file headers and `kernels/README.md` hold the contracts. Only the
//! packed values (and the scales) cross the bus, instead of a float copy of the weight.
//!
//! A quantized [`HostTensor`] holds exactly Burn's `q_into_data` bytes (packed values, then the
//! scales, last: [`QuantLayout`]). [`quant_read`] says whether the kernels can read a tensor's
//! scheme and shape, and how; every launcher checks, before anything is queued, that the
//! furthest value word and scale a launch can read lie inside the buffer
//! ([`CudaError::InvalidArgument`] otherwise).

use burn_backend::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_std::quantization::{QuantLevel, QuantParam, QuantScheme, QuantStore, QuantValue};
use cubecl::CubeCount;
use cubecl::cuda::CudaRuntime;

use super::error::CudaError;
use super::ops::{MAX_ROWS, check_host_read, dtype_suffix, host_address, invalid, launch};
use super::pinned;
use crate::host::{HostTensor, StridedRead};
use crate::inner::HostMatmulShape;
use crate::quant::{QuantLayout, codec_unsupported, scheme_name};

/// `qmatmul_host.cu`.
pub const QMATMUL_HOST_SOURCE: &str = include_str!("kernels/qmatmul_host.cu");
/// `qgather_host.cu`.
pub const QGATHER_HOST_SOURCE: &str = include_str!("kernels/qgather_host.cu");
/// Block size of every kernel here.
const BLOCK: usize = 256;
/// Rows one pass of the 2-bit matmul takes (it has no 16-row variant: 256 accumulators).
const MAX_ROWS_Q2: usize = 8;

/// The scale type of a quantized tensor, as the kernels name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleKind {
    /// `f32` scales.
    F32,
    /// `f16` scales.
    F16,
    /// `bf16` scales.
    BF16,
}

impl ScaleKind {
    /// Bytes per scale.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// The kernels' name (`qscales_f32_from_<name>`).
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    /// `QGatherHostParams::scale_kind`.
    fn code(self) -> u64 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 2,
        }
    }
}

/// How the kernels read a quantized host tensor, seen as `rows` rows of its last dim
/// (`cols`): row `r`'s values are the u32 words `r * row_words ..` from the buffer's start,
/// value `c` of the row is scaled by scale `r * scales_per_row + c / scale_cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantRead {
    /// Bits per value: 8, 4 or 2.
    pub bits: u32,
    /// Rows: the product of all dims but the last.
    pub rows: usize,
    /// The last dim.
    pub cols: usize,
    /// u32 words per row (`cols * bits / 32`).
    pub row_words: usize,
    /// Scales per row; 0 for one scale for the whole tensor.
    pub scales_per_row: usize,
    /// Values per scale along the row (the block size; `cols` for one scale per tensor).
    pub scale_cols: usize,
    /// The scales' type.
    pub scale_kind: ScaleKind,
    /// Where the values and the scales are in the buffer.
    pub layout: QuantLayout,
}

impl QuantRead {
    /// Values per u32 word.
    pub fn values_per_word(&self) -> usize {
        32 / self.bits as usize
    }

    /// The value words a launch reads (`rows` rows of `row_words` words from byte 0).
    pub(crate) fn values_read(&self) -> StridedRead {
        StridedRead {
            offset: 0,
            rows: self.rows as u64,
            cols: self.row_words as u64,
            row_stride: self.row_words as u64,
            elem_size: 4,
        }
    }

    /// Checks that every value word and every scale a launch over all rows can read lies in
    /// the buffer of `len` bytes: the values before the scales, the largest scale index the
    /// kernels compute below the number of scales, the scales inside the buffer.
    pub(crate) fn check(&self, len: usize) -> Result<(), String> {
        self.values_read().check(len)?;
        let values_end = (self.rows as u128) * (self.row_words as u128) * 4;
        if values_end > self.layout.scales_offset as u128 {
            return Err(format!(
                "the values ({values_end} bytes) run into the scales (from byte {})",
                self.layout.scales_offset
            ));
        }
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows as u128 - 1) * self.scales_per_row as u128
                + (self.cols as u128 - 1) / self.scale_cols.max(1) as u128;
            if last >= self.layout.num_scales as u128 {
                return Err(format!(
                    "scale index {last} is past the tensor's {} scales",
                    self.layout.num_scales
                ));
            }
        }
        let scales_end = self.layout.scales_offset as u128
            + self.layout.num_scales as u128 * self.scale_kind.bytes() as u128;
        if scales_end > len as u128 {
            return Err(format!(
                "the scales end at byte {scales_end}, past the buffer's {len} bytes"
            ));
        }
        Ok(())
    }
}

/// How [`qmatmul_host`] and [`qgather_host`] read `host`, or why they cannot (then the weight
/// is copied and dequantized by Burn on the device):
///
/// - values `q8`, `q4` or `q2` (symmetric or full range), packed into u32 words along the last
///   dim (`PackedU32(0)`), or `q8` in the native store with a last dim that is a multiple of
///   4 (the same bytes);
/// - `f32`, `f16` or `bf16` scales, one per tensor or per block of the last dim (blocks that
///   tile it, a multiple of the values per word);
/// - a last dim that is a multiple of the values per word, below 2^32; a nonempty tensor;
/// - the buffer holding the layout of [`QuantLayout::of_bytes`].
pub fn quant_read(host: &HostTensor) -> Result<QuantRead, String> {
    let scheme: &QuantScheme = host
        .quant_scheme()
        .ok_or_else(|| format!("{:?} is not a quantized dtype", host.dtype()))?;
    let dims = host.dims();
    let name = scheme_name(scheme);
    if let Some(reason) = codec_unsupported(dims, scheme) {
        return Err(format!("{name}: {reason}"));
    }
    let bits: u32 = match scheme.value {
        QuantValue::Q8F | QuantValue::Q8S => 8,
        QuantValue::Q4F | QuantValue::Q4S => 4,
        QuantValue::Q2F | QuantValue::Q2S => 2,
        other => return Err(format!("{name}: {other:?} values")),
    };
    let scale_kind = match scheme.param {
        QuantParam::F32 => ScaleKind::F32,
        QuantParam::F16 => ScaleKind::F16,
        QuantParam::BF16 => ScaleKind::BF16,
        other => return Err(format!("{name}: {other:?} scales")),
    };
    let per_word = 32 / bits as usize;
    match scheme.store {
        QuantStore::PackedU32(0) => {}
        QuantStore::Native if bits == 8 => {}
        other => return Err(format!("{name}: the {other:?} store")),
    }
    let Some(&cols) = dims.last() else {
        return Err(format!("{name}: a rank-0 tensor"));
    };
    let numel: usize = dims.iter().product();
    if numel == 0 {
        return Err(format!("{name}: an empty tensor {dims:?}"));
    }
    if !cols.is_multiple_of(per_word) || u32::try_from(cols).is_err() {
        return Err(format!(
            "{name}: a last dim of {cols}, not a multiple of the {per_word} values in a word \
             below 2^32"
        ));
    }
    let (scales_per_row, scale_cols) = match scheme.level {
        QuantLevel::Tensor => (0, cols),
        QuantLevel::Block(b) => {
            let dims_b = b.to_dim_vec(dims.len());
            let inner = *dims_b.last().unwrap_or(&1) as usize;
            if inner == 0
                || b.num_elements() != inner
                || !cols.is_multiple_of(inner)
                || !inner.is_multiple_of(per_word)
            {
                return Err(format!(
                    "{name}: blocks of {:?} (they must tile the last dim, {cols}, in multiples \
                     of the {per_word} values in a word)",
                    b.as_slice()
                ));
            }
            (cols / inner, inner)
        }
    };
    let layout = QuantLayout::of_bytes(dims, scheme, host.buffer().len())
        .map_err(|e| format!("{name}: {e}"))?;
    if layout.scale_bytes != scale_kind.bytes() || host.offset() != 0 {
        return Err(format!("{name}: an unexpected layout {layout:?}"));
    }
    let read = QuantRead {
        bits,
        rows: numel / cols,
        cols,
        row_words: cols / per_word,
        scales_per_row,
        scale_cols,
        scale_kind,
        layout,
    };
    read.check(host.buffer().len())?;
    Ok(read)
}

/// Whether the in-place kernels read `host` at all: quantized, in pinned memory, read as
/// `f32`, `f16` or `bf16` ([`HostTensor::read_dtype`]), of a scheme [`quant_read`] takes.
pub fn can_read_quantized(host: &HostTensor) -> bool {
    host.is_quantized()
        && dtype_suffix(host.read_dtype()).is_some()
        && pinned::device_ptr(host.buffer()).is_some()
        && quant_read(host).is_ok()
}

/// How [`qmatmul_host`] computes `lhs @ dequant(rhs)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QMatmulHostPlan {
    /// The shapes of the product.
    pub shape: HostMatmulShape,
    /// How the weight is read.
    pub read: QuantRead,
}

/// Whether [`qmatmul_host`] can compute `lhs [.., M, K] @ rhs` reading the quantized `rhs`
/// (`[.., K, N]`, leading dims 1) in place: [`can_read_quantized`], `lhs_dtype` equal to
/// `rhs`'s read dtype, at most [`MAX_ROWS`] rows (8 for 2-bit values), `16 * K < 2^32`.
/// `None` means: copy the weight instead.
pub fn qmatmul_plan(
    lhs_dims: &[usize],
    lhs_dtype: DType,
    rhs: &HostTensor,
) -> Option<QMatmulHostPlan> {
    if !can_read_quantized(rhs) || lhs_dtype != rhs.read_dtype() {
        return None;
    }
    let shape = HostMatmulShape::new(lhs_dims, rhs)?;
    let read = quant_read(rhs).ok()?;
    let max_rows = if read.bits == 2 {
        MAX_ROWS_Q2
    } else {
        MAX_ROWS
    };
    if shape.m > max_rows
        || read.rows != shape.k
        || read.cols != shape.n
        || (shape.k as u64) * (MAX_ROWS as u64) >= 1 << 32
    {
        return None;
    }
    Some(QMatmulHostPlan { shape, read })
}

/// Whether [`qgather_host`] can gather from `weights` with ids of `indices_dtype`: a 2-D
/// table that [`can_read_quantized`], i32 or i64 ids.
pub fn qgather_supported(weights: &HostTensor, indices_dtype: DType) -> bool {
    weights.dims().len() == 2
        && can_read_quantized(weights)
        && matches!(indices_dtype, DType::I32 | DType::I64)
}

/// A grid for `qscales_f32_from_*`: enough blocks for 8 scales per thread, at most 4 per SM.
fn scales_grid(ordinal: usize, count: usize) -> Result<CubeCount, CudaError> {
    let sms = super::kernel::device_facts(ordinal)?.multiprocessors as usize;
    let blocks = count.div_ceil(BLOCK * 8).clamp(1, 4 * sms.max(1));
    Ok(CubeCount::Static(blocks as u32, 1, 1))
}

/// `lhs @ dequant(rhs)` with the quantized `rhs` read from pinned host memory by
/// `qmatmul_host.cu`, queued on CubeCL's stream of the calling thread, as `plan` (from
/// [`qmatmul_plan`] for these operands) says; the output has `lhs`'s dtype. `lhs` is made
/// contiguous first. The scales cross once, into an f32 device buffer (`qscales_f32_from_*`),
/// then the matmul streams the packed values.
///
/// Before launching, it checks that `plan` is what [`qmatmul_plan`] gives for these operands and
/// that every value word and scale the kernels can read lies inside `rhs`'s buffer
/// ([`QuantRead::check`]): [`CudaError::InvalidArgument`] otherwise, with nothing queued.
pub fn qmatmul_host(
    lhs: CubeTensor<CudaRuntime>,
    rhs: &HostTensor,
    plan: QMatmulHostPlan,
) -> Result<CubeTensor<CudaRuntime>, CudaError> {
    let lhs_dims = lhs.meta.shape().to_vec();
    if qmatmul_plan(&lhs_dims, lhs.dtype, rhs).as_ref() != Some(&plan) {
        return Err(invalid(format!(
            "the plan {plan:?} does not fit lhs {lhs_dims:?} ({:?}) and the quantized host \
             tensor (shape {:?}, {:?} read as {:?}); get the plan from `qmatmul_plan` for these \
             operands",
            lhs.dtype,
            rhs.dims(),
            rhs.dtype(),
            rhs.read_dtype()
        )));
    }
    let QMatmulHostPlan { shape, read } = plan;
    let len = rhs.buffer().len();
    check_host_read(rhs, &read.values_read())?;
    read.check(len)
        .map_err(|reason| invalid(format!("{reason}; the kernel is not launched")))?;
    let HostMatmulShape { m, k, n, .. } = shape;
    let dtype = lhs.dtype;
    let suffix = dtype_suffix(dtype).expect("checked by qmatmul_plan");
    let esize = dtype.size();
    let address = host_address(rhs)?;
    let device = lhs.device.clone();
    let client = lhs.client.clone();
    // Freeing the weight's memory waits for this device too (see `pinned`).
    rhs.buffer().note_reader(device.index);
    let x = burn_cubecl::kernel::into_contiguous(lhs);
    let out = client.empty(m * n * esize);
    if m > 0 {
        let num_scales = read.layout.num_scales;
        let scales = client.empty(num_scales * 4);
        let grid = scales_grid(device.index, num_scales)?;
        // SAFETY: the kernel writes `num_scales` f32 into `scales` (allocated for them) and
        // reads `num_scales` scales from `scales_offset` of the pinned buffer, inside it
        // (checked above); the buffer's release waits for this device (recorded above).
        unsafe {
            launch(
                &device,
                QMATMUL_HOST_SOURCE,
                format!("qscales_f32_from_{}", read.scale_kind.name()),
                grid,
                &[&scales],
                &[
                    address + read.layout.scales_offset as u64,
                    num_scales as u64,
                ],
            )?
        }
        let mut params = [
            address,
            read.row_words as u64,
            m as u64,
            k as u64,
            n as u64,
            0,
            0,
            read.scales_per_row as u64,
            read.scale_cols as u64,
        ];
        let tiles = read.row_words.div_ceil(32);
        // Cached per device: this runs for every in-place matmul.
        let sms = super::kernel::device_facts(device.index)?.multiprocessors as usize;
        let want = (2 * sms).div_ceil(tiles);
        let mut splits = 1;
        if want > 1 && k > 64 {
            let k_chunk = k.div_ceil(want).div_ceil(64) * 64;
            splits = k.div_ceil(k_chunk);
            if splits > 1 {
                params[5] = k_chunk as u64;
            }
        }
        let partial = if splits > 1 {
            client.empty(splits * m * n * 4)
        } else {
            out.clone()
        };
        let m16 = if m > 8 { "_m16" } else { "" };
        let grid = CubeCount::Static(tiles as u32, splits as u32, 1);
        // SAFETY: buffers in the kernel's order (out: M*N elements, x: M*K contiguous, bias =
        // out unused, partial: splits*M*N f32 when split, scales: `num_scales` f32 written by
        // the launch above, earlier on this stream); the kernel reads rows 0..K of `row_words`
        // words from the pinned buffer's start and scale indices below `num_scales` (both
        // checked above); the buffer's release waits for this device (recorded above).
        unsafe {
            launch(
                &device,
                QMATMUL_HOST_SOURCE,
                format!("qmatmul_host_q{}_{suffix}{m16}", read.bits),
                grid,
                &[&out, &x.handle, &out, &partial, &scales],
                &params,
            )?
        }
        if splits > 1 {
            let grid = CubeCount::Static((m * n).div_ceil(BLOCK).min(65535) as u32, 1, 1);
            // SAFETY: the split-K epilogue reads `partial` (splits*M*N f32, written by the
            // launch above, earlier on the same stream) and writes `out` (M*N).
            unsafe {
                launch(
                    &device,
                    QMATMUL_HOST_SOURCE,
                    format!("qmatmul_host_reduce_{suffix}"),
                    grid,
                    &[&out, &partial, &out],
                    &params,
                )?
            }
        }
    }
    Ok(CubeTensor::new_contiguous(
        client,
        device,
        Shape::from(shape.out_dims),
        out,
        dtype,
    ))
}

/// `embedding(weights, ids)` for a quantized table in pinned host memory: `qgather_host.cu`
/// reads and dequantizes only the requested rows, into `weights.read_dtype()`.
///
/// Before launching, it checks that every value word and scale of rows `0..rows` lies inside
/// the buffer ([`QuantRead::check`]): [`CudaError::InvalidArgument`] otherwise, with nothing
/// queued. Out-of-range ids are a device-side assertion, as for
/// [`gather_host`](super::ops::gather_host) (see there).
pub fn qgather_host(
    weights: &HostTensor,
    ids: CubeTensor<CudaRuntime>,
) -> Result<CubeTensor<CudaRuntime>, CudaError> {
    if !qgather_supported(weights, ids.dtype) {
        return Err(invalid(format!(
            "the quantized gather does not read a {:?} table of shape {:?} (read as {:?}, {}) \
             with {:?} ids: {}",
            weights.dtype(),
            weights.dims(),
            weights.read_dtype(),
            if pinned::device_ptr(weights.buffer()).is_some() {
                "pinned"
            } else {
                "pageable"
            },
            ids.dtype,
            quant_read(weights)
                .err()
                .unwrap_or_else(|| "see qgather_supported".into())
        )));
    }
    let read = quant_read(weights).map_err(invalid)?;
    let dtype = weights.read_dtype();
    let suffix = dtype_suffix(dtype).expect("checked by qgather_supported");
    let id_suffix = if ids.dtype == DType::I32 {
        "i32"
    } else {
        "i64"
    };
    let len = weights.buffer().len();
    check_host_read(weights, &read.values_read())?;
    read.check(len)
        .map_err(|reason| invalid(format!("{reason}; the kernel is not launched")))?;
    let address = host_address(weights)?;
    let ids = burn_cubecl::kernel::into_contiguous(ids);
    let (device, client) = (ids.device.clone(), ids.client.clone());
    // Freeing the table's memory waits for this device too (see `pinned`).
    weights.buffer().note_reader(device.index);
    let num_ids = ids.meta.shape().num_elements();
    let cols = read.cols;
    let out = client.empty(num_ids * cols * dtype.size());
    if num_ids > 0 {
        let params = [
            address,
            address + read.layout.scales_offset as u64,
            read.rows as u64,
            cols as u64,
            read.row_words as u64,
            read.scales_per_row as u64,
            read.scale_cols as u64,
            read.bits as u64,
            read.scale_kind.code(),
            num_ids as u64,
        ];
        let grid = CubeCount::Static(
            num_ids.min((1 << 31) - 1) as u32,
            read.row_words.div_ceil(BLOCK * 4).clamp(1, 65535) as u32,
            1,
        );
        // SAFETY: buffers in the kernel's order (out: num_ids*cols elements of the read dtype,
        // ids: num_ids contiguous); every value word and scale of rows 0..rows lies in the
        // pinned buffer (checked above), whose release waits for this device (recorded above);
        // the kernel reads only rows 0..rows and asserts on any other id before reading.
        unsafe {
            launch(
                &device,
                QGATHER_HOST_SOURCE,
                format!("qgather_host_{suffix}_{id_suffix}"),
                grid,
                &[&out, &ids.handle],
                &params,
            )?
        }
    }
    let mut out_dims = ids.meta.shape().to_vec();
    out_dims.push(cols);
    Ok(CubeTensor::new_contiguous(
        client,
        device,
        Shape::from(out_dims),
        out,
        dtype,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostBuffer;
    use crate::quant::QuantPreset;

    fn host(dims: &[usize], scheme: QuantScheme, extra: isize) -> HostTensor {
        let layout = QuantLayout::estimate(dims, &scheme);
        let len = (layout.total_bytes as isize + extra) as usize;
        let buffer = HostBuffer::pageable(len).unwrap();
        HostTensor::new(buffer, dims.to_vec(), DType::QFloat(scheme)).unwrap()
    }

    /// Pure arithmetic (no driver): what the kernels read of the presets, and what they refuse.
    #[test]
    fn quantized_reads_cover_values_and_scales() {
        let q4 = host(&[64, 96], QuantPreset::Q4.scheme(), 0);
        let read = quant_read(&q4).unwrap();
        assert_eq!((read.bits, read.rows, read.cols), (4, 64, 96));
        assert_eq!(
            (read.row_words, read.scales_per_row, read.scale_cols),
            (12, 3, 32)
        );
        assert_eq!(read.values_read().byte_span(), Ok(Some(0..3072)));
        assert_eq!(read.layout.scales_offset, 3072);
        assert!(read.check(q4.buffer().len()).is_ok());
        // A shorter buffer than the scales need is refused.
        assert!(read.check(q4.buffer().len() - 1).is_err());
        // Padding between values and scales (burn-ndarray's) keeps the scales last.
        let padded = host(&[64, 96], QuantPreset::Q8.scheme(), 4);
        let read = quant_read(&padded).unwrap();
        assert_eq!(read.layout.scales_offset, 64 * 96 + 4);
        // Tensor level: one scale, index 0 for every value.
        let tensor = QuantPreset::Q8.scheme().with_level(QuantLevel::Tensor);
        let read = quant_read(&host(&[3, 8], tensor, 0)).unwrap();
        assert_eq!((read.scales_per_row, read.scale_cols), (0, 8));
        // Native q8 with a last dim that is a multiple of 4: the same bytes as packed.
        let native = QuantPreset::Q8.scheme().with_store(QuantStore::Native);
        assert!(quant_read(&host(&[2, 64], native, 0)).is_ok());
        assert!(quant_read(&host(&[2, 30], native.with_level(QuantLevel::Tensor), 0)).is_err());
        // Not a multiple of the values per word, floating-point values: refused (copy path).
        assert!(quant_read(&host(&[2, 36], QuantPreset::Q4.scheme(), 0)).is_err());
        let fp8 = QuantScheme::default().with_value(QuantValue::E4M3);
        assert!(quant_read(&host(&[2, 32], fp8, 0)).is_err());
        // Pageable memory is never read in place.
        assert!(!can_read_quantized(&q4.read_as(Some(DType::F32)).unwrap()));
    }
}
