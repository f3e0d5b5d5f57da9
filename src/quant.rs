//! Quantized weights in host memory: the byte layout of Burn's quantized [`TensorData`], the
//! schemes the library offers by name, and a host codec for the CPU reference target.
//!
//! An offloaded quantized tensor holds exactly the bytes Burn's `q_into_data` gives and
//! `q_from_data` takes (the same on every backend of the same scheme): the packed values, then
//! the scales (one per block, or one for the tensor) in the scheme's parameter type, last. A
//! copy moves these bytes and the device dequantizes with Burn's own kernels; a host-reading
//! kernel dequantizes them as it reads ([`QuantLayout`] says where everything is).
//!
//! burn-ndarray 0.21 holds only 8-bit values with `f32` scales in its native store, so the CPU
//! reference target reads and writes every other integer scheme with [`encode`] / [`decode`]
//! here (the same arithmetic as Burn's: `scale = 2·max|x| / (b - a)`, `q = round(x / scale)`
//! clamped to `[a, b]`, `x' = q · scale`).
//!
//! [`TensorData`]: burn_backend::TensorData

use burn_backend::DType;
use burn_std::quantization::{
    QuantLevel, QuantMode, QuantParam, QuantScheme, QuantStore, QuantValue,
};
use burn_std::{bf16, f16};

use crate::error::OffloadError;

/// The schemes offered by name (`--quantize q8|q4` in the example): symmetric integers in
/// blocks of 32 along the last dim, with `f16` scales, packed into `u32` words (the store
/// Burn's CubeCL kernels read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantPreset {
    /// `q8s/b32/f16`: 8-bit values, 1.0625 bytes per weight.
    Q8,
    /// `q4s/b32/f16`: 4-bit values, 0.5625 bytes per weight.
    Q4,
}

impl QuantPreset {
    /// The preset's scheme.
    pub fn scheme(self) -> QuantScheme {
        let value = match self {
            Self::Q8 => QuantValue::Q8S,
            Self::Q4 => QuantValue::Q4S,
        };
        QuantScheme::default()
            .with_value(value)
            .with_level(QuantLevel::block([32]))
            .with_param(QuantParam::F16)
            .with_store(QuantStore::PackedU32(0))
            .with_mode(QuantMode::Symmetric)
    }
}

impl std::str::FromStr for QuantPreset {
    type Err = OffloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q8" => Ok(Self::Q8),
            "q4" => Ok(Self::Q4),
            other => Err(OffloadError::Config(format!(
                "unknown quantization `{other}`: use `q8` (8-bit, blocks of 32) or `q4` (4-bit, \
                 blocks of 32)"
            ))),
        }
    }
}

impl std::fmt::Display for QuantPreset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        })
    }
}

/// A short name of `scheme`, as the report's dtype column shows it: value / level / scale
/// type, e.g. `q8s/b32/f16`, `q4f/t/f32`; `/native` is added for a store that is not packed
/// into words.
pub fn scheme_name(scheme: &QuantScheme) -> String {
    let value = format!("{:?}", scheme.value).to_lowercase();
    let level = match scheme.level {
        QuantLevel::Tensor => "t".to_string(),
        QuantLevel::Block(b) => {
            let dims: Vec<String> = b.as_slice().iter().map(|d| d.to_string()).collect();
            format!("b{}", dims.join("x"))
        }
    };
    let param = format!("{:?}", scheme.param).to_lowercase();
    let store = match scheme.store {
        QuantStore::PackedU32(0) => String::new(),
        QuantStore::PackedU32(d) => format!("/u32@{d}"),
        QuantStore::Native => "/native".into(),
        QuantStore::PackedNative(d) => format!("/x2@{d}"),
    };
    format!("{value}/{level}/{param}{store}")
}

/// The dtype as the report names it: a scheme's [`scheme_name`], else Burn's name.
pub fn dtype_name(dtype: DType) -> String {
    match dtype {
        DType::QFloat(scheme) => scheme_name(&scheme),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Bytes of a tensor of `shape` and `dtype` in memory: elements × size, or a quantized
/// tensor's packed values and scales ([`QuantLayout::estimate`]).
pub fn tensor_bytes(shape: &[usize], dtype: DType) -> u64 {
    match dtype {
        DType::QFloat(scheme) => QuantLayout::estimate(shape, &scheme).total_bytes as u64,
        other => (shape.iter().product::<usize>() * other.size()) as u64,
    }
}

/// Bits per stored value.
fn value_bits(value: QuantValue) -> usize {
    match value {
        QuantValue::Q8F | QuantValue::Q8S | QuantValue::E4M3 | QuantValue::E5M2 => 8,
        QuantValue::Q4F | QuantValue::Q4S | QuantValue::E2M1 => 4,
        QuantValue::Q2F | QuantValue::Q2S => 2,
    }
}

/// Bytes per scale.
fn param_bytes(param: QuantParam) -> usize {
    match param {
        QuantParam::F32 => 4,
        QuantParam::F16 | QuantParam::BF16 => 2,
        QuantParam::UE8M0 | QuantParam::UE4M3 => 1,
    }
}

/// Where the parts of a quantized tensor's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantLayout {
    /// Number of (logical) values.
    pub num_values: usize,
    /// Bytes of the packed values, from offset 0.
    pub values_bytes: usize,
    /// Values per block (the whole tensor at tensor level).
    pub block: usize,
    /// Number of scales (blocks).
    pub num_scales: usize,
    /// Bytes per scale.
    pub scale_bytes: usize,
    /// Offset of the first scale: the scales are the last `num_scales · scale_bytes` bytes.
    pub scales_offset: usize,
    /// All the bytes.
    pub total_bytes: usize,
}

impl QuantLayout {
    /// The layout Burn's backends give `shape` in `scheme`, without alignment padding between
    /// values and scales (what the CubeCL backends write; burn-ndarray pads the values of a
    /// tensor whose count is not a multiple of 4 up to 4 bytes): for budgets and estimates.
    pub fn estimate(shape: &[usize], scheme: &QuantScheme) -> Self {
        let n: usize = shape.iter().product();
        let bits = value_bits(scheme.value);
        let values_bytes = match scheme.store {
            QuantStore::PackedU32(_) => {
                let per_word = 32 / bits;
                n.div_ceil(per_word) * 4
            }
            QuantStore::Native => n * bits.div_ceil(8),
            QuantStore::PackedNative(_) => (n * bits).div_ceil(8),
        };
        let (block, num_scales) = match scheme.level {
            QuantLevel::Tensor => (n.max(1), 1),
            QuantLevel::Block(b) => {
                let dims = b.to_dim_vec(shape.len().max(1));
                let scales: usize = if shape.is_empty() {
                    1
                } else {
                    shape
                        .iter()
                        .zip(&dims)
                        .map(|(&d, &b)| d.div_ceil((b as usize).max(1)))
                        .product()
                };
                (b.num_elements().max(1), scales)
            }
        };
        let scale_bytes = param_bytes(scheme.param);
        Self {
            num_values: n,
            values_bytes,
            block,
            num_scales,
            scale_bytes,
            scales_offset: values_bytes,
            total_bytes: values_bytes + num_scales * scale_bytes,
        }
    }

    /// The layout of `len` bytes holding `shape` in `scheme`: the scales are the last bytes
    /// (after any padding). Errors when `len` is too small for the values and scales.
    pub fn of_bytes(
        shape: &[usize],
        scheme: &QuantScheme,
        len: usize,
    ) -> Result<Self, OffloadError> {
        let mut layout = Self::estimate(shape, scheme);
        let scales = layout.num_scales * layout.scale_bytes;
        if len < layout.values_bytes + scales {
            return Err(OffloadError::DataSize {
                shape: shape.to_vec(),
                dtype: DType::QFloat(*scheme),
                expected: layout.total_bytes,
                got: len,
            });
        }
        layout.scales_offset = len - scales;
        layout.total_bytes = len;
        Ok(layout)
    }
}

/// Why the host codec cannot read or write `scheme` for `shape`, if it cannot: it handles the
/// integer values (`q8`, `q4`, `q2`, symmetric or full range) with `f32`, `f16` or `bf16`
/// scales, stored natively (8-bit only) or packed into `u32` words along the last dim, per
/// tensor or in blocks that tile the last dim.
pub fn codec_unsupported(shape: &[usize], scheme: &QuantScheme) -> Option<String> {
    let bits = value_bits(scheme.value);
    if matches!(
        scheme.value,
        QuantValue::E4M3 | QuantValue::E5M2 | QuantValue::E2M1
    ) {
        return Some("floating-point values (e4m3, e5m2, e2m1)".into());
    }
    if !matches!(
        scheme.param,
        QuantParam::F32 | QuantParam::F16 | QuantParam::BF16
    ) {
        return Some(format!("{:?} scales", scheme.param));
    }
    match scheme.store {
        QuantStore::Native if bits != 8 => {
            return Some(format!("{bits}-bit values in the native (unpacked) store"));
        }
        QuantStore::PackedU32(d) if d != 0 => {
            return Some(format!("values packed along dim {d} from the last"));
        }
        QuantStore::PackedNative(_) => return Some("the packed-native store".into()),
        _ => {}
    }
    tiling_unsupported(shape, scheme)
}

/// Why `scheme` cannot lay out a tensor of `shape`, if it cannot: a last dim that its words of
/// packed values or its blocks do not tile (whatever the values or the store otherwise are).
pub fn tiling_unsupported(shape: &[usize], scheme: &QuantScheme) -> Option<String> {
    let bits = value_bits(scheme.value);
    let last = shape.last().copied().unwrap_or(1);
    if let QuantStore::PackedU32(_) = scheme.store
        && last % (32 / bits) != 0
    {
        return Some(format!(
            "a last dim of {last}, not a multiple of the {} values in a word",
            32 / bits
        ));
    }
    if let QuantLevel::Block(b) = scheme.level {
        let dims = b.to_dim_vec(shape.len().max(1));
        let (lead, inner) = dims.split_at(dims.len() - 1);
        if lead.iter().any(|&d| d > 1) || last % (inner[0] as usize).max(1) != 0 {
            return Some(format!(
                "blocks of {:?} that do not tile the last dim ({last})",
                b.as_slice()
            ));
        }
    }
    None
}

fn read_scale(bytes: &[u8], param: QuantParam) -> f32 {
    match param {
        QuantParam::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        QuantParam::F16 => f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
        QuantParam::BF16 => bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
        _ => unreachable!("checked by codec_unsupported"),
    }
}

fn write_scale(out: &mut Vec<u8>, scale: f32, param: QuantParam) -> f32 {
    match param {
        QuantParam::F32 => {
            out.extend_from_slice(&scale.to_le_bytes());
            scale
        }
        QuantParam::F16 => {
            let s = f16::from_f32(scale);
            out.extend_from_slice(&s.to_le_bytes());
            s.to_f32()
        }
        QuantParam::BF16 => {
            let s = bf16::from_f32(scale);
            out.extend_from_slice(&s.to_le_bytes());
            s.to_f32()
        }
        _ => unreachable!("checked by codec_unsupported"),
    }
}

/// A reader of the packed values of one quantized tensor.
struct Values<'a> {
    bytes: &'a [u8],
    bits: usize,
    native: bool,
}

impl Values<'_> {
    #[inline]
    fn get(&self, i: usize) -> i8 {
        if self.native {
            return self.bytes[i] as i8;
        }
        let per_word = 32 / self.bits;
        let (w, lane) = (i / per_word, i % per_word);
        let at = w * 4;
        let word = u32::from_le_bytes([
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        ]);
        let raw = ((word >> (lane * self.bits)) & ((1u32 << self.bits) - 1)) as u8;
        let shift = 8 - self.bits;
        ((raw << shift) as i8) >> shift
    }
}

fn check(shape: &[usize], scheme: &QuantScheme) -> Result<(), OffloadError> {
    match codec_unsupported(shape, scheme) {
        Some(reason) => Err(OffloadError::UnsupportedQuantization {
            scheme: scheme_name(scheme),
            target: "the host codec of the CPU reference target".into(),
            reason,
            instead: "use `q8`/`q4`/`q2` values with f32, f16 or bf16 scales, packed into u32 \
                      words, per tensor or in blocks along the last dim"
                .into(),
        }),
        None => Ok(()),
    }
}

/// The values of rows `rows` of a quantized tensor whose last dim is `cols` (`bytes` as
/// `q_into_data` gives them), as `f32`: `q · scale`, the arithmetic of Burn's dequantization.
pub fn decode_rows(
    bytes: &[u8],
    shape: &[usize],
    scheme: &QuantScheme,
    rows: impl IntoIterator<Item = usize>,
) -> Result<Vec<f32>, OffloadError> {
    check(shape, scheme)?;
    let layout = QuantLayout::of_bytes(shape, scheme, bytes.len())?;
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let total_rows = layout.num_values / cols;
    let values = Values {
        bytes: &bytes[..layout.values_bytes],
        bits: value_bits(scheme.value),
        native: scheme.store == QuantStore::Native,
    };
    let scales = &bytes[layout.scales_offset..];
    let scale = |i: usize| {
        let b = (i / layout.block) * layout.scale_bytes;
        read_scale(&scales[b..b + layout.scale_bytes], scheme.param)
    };
    let mut out = Vec::new();
    for r in rows {
        if r >= total_rows {
            return Err(OffloadError::InvalidView {
                reason: format!("row {r} of a quantized tensor with {total_rows} rows"),
            });
        }
        out.extend((r * cols..(r + 1) * cols).map(|i| values.get(i) as f32 * scale(i)));
    }
    Ok(out)
}

/// All the values of a quantized tensor as `f32` ([`decode_rows`] of every row).
pub fn decode(
    bytes: &[u8],
    shape: &[usize],
    scheme: &QuantScheme,
) -> Result<Vec<f32>, OffloadError> {
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = shape.iter().product::<usize>() / cols;
    decode_rows(bytes, shape, scheme, 0..rows)
}

/// Quantizes `values` (row-major, of `shape`) into the bytes Burn's `q_into_data` gives for
/// `scheme`: values packed, then the scales. `scales` (one per block, as Burn's
/// `QuantizationParameters`) are used as given; `None` computes them from the values as Burn's
/// `quantize_dynamic` does.
pub fn encode(
    values: &[f32],
    shape: &[usize],
    scheme: &QuantScheme,
    scales: Option<&[f32]>,
) -> Result<Vec<u8>, OffloadError> {
    check(shape, scheme)?;
    let layout = QuantLayout::estimate(shape, scheme);
    if values.len() != layout.num_values {
        return Err(OffloadError::DataSize {
            shape: shape.to_vec(),
            dtype: DType::F32,
            expected: layout.num_values * 4,
            got: values.len() * 4,
        });
    }
    if let Some(given) = scales
        && given.len() != layout.num_scales
    {
        return Err(OffloadError::Config(format!(
            "{} scales given for a tensor of shape {shape:?} in {}, which has {} blocks; give one \
             scale per block",
            given.len(),
            scheme_name(scheme),
            layout.num_scales
        )));
    }
    let (a, b) = scheme.value.range();
    let bits = value_bits(scheme.value);
    let given = scales;
    let mut scales = Vec::with_capacity(layout.num_scales * layout.scale_bytes);
    let mut q = Vec::with_capacity(values.len());
    for (i, block) in values.chunks(layout.block).enumerate() {
        let scale = match given {
            Some(given) => given[i],
            None => 2.0 * block.iter().fold(0f32, |m, v| m.max(v.abs())) / (b - a),
        };
        let scale = write_scale(&mut scales, scale, scheme.param);
        q.extend(block.iter().map(|&v| {
            if scale == 0.0 {
                0i8
            } else {
                (v / scale).round().clamp(a, b) as i8
            }
        }));
    }
    let mut out = Vec::with_capacity(layout.total_bytes);
    if scheme.store == QuantStore::Native {
        out.extend(q.iter().map(|&v| v as u8));
    } else {
        let per_word = 32 / bits;
        let mask = (1u32 << bits) - 1;
        for chunk in q.chunks(per_word) {
            let word = chunk.iter().enumerate().fold(0u32, |w, (lane, &v)| {
                w | (((v as u32) & mask) << (lane * bits))
            });
            out.extend_from_slice(&word.to_le_bytes());
        }
    }
    out.extend_from_slice(&scales);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short() {
        assert_eq!(scheme_name(&QuantPreset::Q8.scheme()), "q8s/b32/f16");
        assert_eq!(scheme_name(&QuantPreset::Q4.scheme()), "q4s/b32/f16");
        let native = QuantScheme::default()
            .with_value(QuantValue::Q8S)
            .with_store(QuantStore::Native);
        assert_eq!(scheme_name(&native), "q8s/t/f32/native");
    }

    #[test]
    fn layouts_count_packed_bytes_and_scales() {
        let q8 = QuantLayout::estimate(&[64, 96], &QuantPreset::Q8.scheme());
        assert_eq!(
            (q8.values_bytes, q8.num_scales, q8.total_bytes),
            (6144, 192, 6144 + 384)
        );
        let q4 = QuantLayout::estimate(&[64, 96], &QuantPreset::Q4.scheme());
        assert_eq!((q4.values_bytes, q4.total_bytes), (3072, 3072 + 384));
    }

    #[test]
    fn codec_round_trips_within_half_a_step() {
        for preset in [QuantPreset::Q8, QuantPreset::Q4] {
            let scheme = preset.scheme();
            let shape = [4, 64];
            let values: Vec<f32> = (0..256)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let bytes = encode(&values, &shape, &scheme, None).unwrap();
            assert_eq!(
                bytes.len(),
                QuantLayout::estimate(&shape, &scheme).total_bytes
            );
            let back = decode(&bytes, &shape, &scheme).unwrap();
            let (_, b) = scheme.value.range();
            for (block, back) in values.chunks(32).zip(back.chunks(32)) {
                let step = block.iter().fold(0f32, |m, v| m.max(v.abs())) / b;
                for (v, w) in block.iter().zip(back) {
                    assert!(
                        (v - w).abs() <= step * 0.5 + 1e-2 * step,
                        "{preset}: {v} vs {w}"
                    );
                }
            }
            let row = decode_rows(&bytes, &shape, &scheme, [2]).unwrap();
            assert_eq!(row, back[128..192]);
        }
    }

    #[test]
    fn unsupported_schemes_say_why() {
        let fp8 = QuantScheme::default().with_value(QuantValue::E4M3);
        assert!(
            codec_unsupported(&[4, 32], &fp8)
                .unwrap()
                .contains("floating-point")
        );
        let q4_native = QuantPreset::Q4.scheme().with_store(QuantStore::Native);
        assert!(
            codec_unsupported(&[4, 32], &q4_native)
                .unwrap()
                .contains("native")
        );
        assert!(codec_unsupported(&[4, 30], &QuantPreset::Q8.scheme()).is_some());
    }
}
