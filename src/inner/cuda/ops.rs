//! Launchers for the zero-copy kernels of `kernels/matmul_host.cu` and `kernels/gather_host.cu`
//! (their file headers and `kernels/README.md` hold the contracts): they check a host view and
//! the device tensors, choose an entry point and a grid, and queue the kernel on CubeCL's stream.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use burn_backend::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use cubecl::CubeCount;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::CubeDim;
use cubecl::server::Handle;

use super::error::CudaError;
use super::kernel::{RawKernel, launch_raw};
use super::pinned;
use crate::host::{HostTensor, StridedRead};
use crate::inner::HostMatmulShape;

/// `matmul_host.cu`.
pub const MATMUL_HOST_SOURCE: &str = include_str!("kernels/matmul_host.cu");
/// `gather_host.cu`.
pub const GATHER_HOST_SOURCE: &str = include_str!("kernels/gather_host.cu");
/// Block size of every kernel here (the kernels trap on another one).
const BLOCK: u32 = 256;
/// Rows one pass of the `_m16` matmul variants handles: the most the zero-copy path takes.
pub const MAX_ROWS: usize = 16;

/// A kernel of `source` compiled for `entry` alone: NVRTC compiles a whole source per kernel,
/// and the select defines cut `matmul_host.cu`'s ~10 s to the one entry point.
fn entry_kernel(source: &'static str, entry: &'static str) -> RawKernel {
    static SOURCES: OnceLock<Mutex<HashMap<&'static str, &'static str>>> = OnceLock::new();
    let mut sources = SOURCES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // One leaked string per entry point for the life of the process (a few KiB each).
    let selected = *sources.entry(entry).or_insert_with(|| {
        let text = format!(
            "#define BURN_OFFLOAD_SELECT_ENTRY\n#define BURN_OFFLOAD_ONLY_{entry}\n#line 1\n{source}"
        );
        Box::leak(text.into_boxed_str())
    });
    RawKernel::new(selected, entry, CubeDim::new_1d(BLOCK))
}

/// The kernels' name for a dtype, if they have one.
pub(super) fn dtype_suffix(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// The device address of a pinned host view's buffer, or why there is none.
pub(super) fn host_address(host: &HostTensor) -> Result<u64, CudaError> {
    pinned::device_ptr(host.buffer()).ok_or_else(|| CudaError::InvalidArgument {
        reason: "the host tensor is not in pinned, device-mapped memory".into(),
    })
}

pub(super) fn invalid(reason: String) -> CudaError {
    CudaError::InvalidArgument { reason }
}

/// Checks that every byte a kernel can read of `host`'s buffer lies inside it (see
/// [`StridedRead`]), before anything is launched.
pub(super) fn check_host_read(host: &HostTensor, read: &StridedRead) -> Result<(), CudaError> {
    read.check(host.buffer().len())
        .map_err(|reason| invalid(format!("{reason}; the kernel is not launched")))
}

/// How `matmul_host.cu` reads W: row-major `[K, N]` or transposed (stored `[N, K]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `W[k, n]` at `offset + k * ldw + n`.
    RowMajor {
        /// Row stride in elements.
        ldw: usize,
    },
    /// `W[k, n]` at `offset + n * ldw + k` (e.g. a tied LM head, `embedding.weight^T`).
    Transposed {
        /// Row stride of the stored `[N, K]` matrix, in elements.
        ldw: usize,
    },
}

/// How the zero-copy matmul will read its weight: the shapes and the weight's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatmulHostPlan {
    /// The shapes of the product.
    pub shape: HostMatmulShape,
    /// How the weight is laid out in host memory.
    pub layout: WeightLayout,
}

/// Whether the zero-copy matmul can compute `lhs [.., M, K] @ rhs` reading `rhs` in place:
/// pinned memory, a supported dtype equal to `lhs_dtype`, a broadcast-free batch, one
/// unit-stride dim, and at most [`MAX_ROWS`] rows. `None` means: copy the weight instead.
pub fn matmul_plan(
    lhs_dims: &[usize],
    lhs_dtype: DType,
    rhs: &HostTensor,
) -> Option<MatmulHostPlan> {
    dtype_suffix(rhs.dtype())?;
    pinned::device_ptr(rhs.buffer())?;
    let shape = HostMatmulShape::new(lhs_dims, rhs)?;
    if shape.m > MAX_ROWS || lhs_dtype != rhs.dtype() {
        return None;
    }
    let (sk, sn) = HostMatmulShape::rhs_strides(rhs);
    let layout = if sn == 1 && (shape.k <= 1 || sk >= shape.n as isize) {
        WeightLayout::RowMajor {
            ldw: sk.max(shape.n as isize) as usize,
        }
    } else if sk == 1 && (shape.n <= 1 || sn >= shape.k as isize) {
        WeightLayout::Transposed {
            ldw: sn.max(shape.k as isize) as usize,
        }
    } else {
        return None;
    };
    Some(MatmulHostPlan { shape, layout })
}

impl MatmulHostPlan {
    /// What the kernel reads of a weight whose element `[0, 0]` is `offset` elements into its
    /// buffer, of `elem_size` bytes per element: rm reads K rows of N elements `ldw` apart,
    /// tr N rows of K elements `ldw` apart (W^T stored `[N, K]`).
    pub(crate) fn weight_read(&self, offset: usize, elem_size: usize) -> StridedRead {
        let HostMatmulShape { k, n, .. } = self.shape;
        let (rows, cols, ldw) = match self.layout {
            WeightLayout::RowMajor { ldw } => (k, n, ldw),
            WeightLayout::Transposed { ldw } => (n, k, ldw),
        };
        StridedRead {
            offset: offset as u64,
            rows: rows as u64,
            cols: cols as u64,
            row_stride: ldw as u64,
            elem_size: elem_size as u64,
        }
    }
}

/// `lhs @ rhs` with `rhs` read from pinned host memory by `matmul_host.cu`, queued on CubeCL's
/// stream of the calling thread, as `plan` (from [`matmul_plan`] for these operands) says.
/// `lhs` is made contiguous first.
///
/// Before launching, it checks that `plan` is what [`matmul_plan`] gives for these operands and
/// that the furthest weight element the kernel can read (from the view's offset, `ldw`, K and
/// N) lies inside `rhs`'s buffer: [`CudaError::InvalidArgument`] otherwise, with nothing
/// queued.
pub fn matmul_host(
    lhs: CubeTensor<CudaRuntime>,
    rhs: &HostTensor,
    plan: MatmulHostPlan,
) -> Result<CubeTensor<CudaRuntime>, CudaError> {
    let lhs_dims = lhs.meta.shape().to_vec();
    if matmul_plan(&lhs_dims, lhs.dtype, rhs).as_ref() != Some(&plan) {
        return Err(invalid(format!(
            "the plan {plan:?} does not fit lhs {lhs_dims:?} ({:?}) and the host view (shape \
             {:?}, strides {:?}, {:?}); get the plan from `matmul_plan` for these operands",
            lhs.dtype,
            rhs.dims(),
            rhs.strides(),
            rhs.dtype()
        )));
    }
    let esize = rhs.dtype().size();
    check_host_read(rhs, &plan.weight_read(rhs.offset(), esize))?;
    let MatmulHostPlan { shape, layout } = plan;
    let HostMatmulShape { m, k, n, .. } = shape;
    let suffix = dtype_suffix(rhs.dtype()).expect("checked by matmul_plan");
    let device = lhs.device.clone();
    let client = lhs.client.clone();
    // Freeing the weight's memory waits for this device too (see `pinned`).
    rhs.buffer().note_reader(device.index);
    let x = burn_cubecl::kernel::into_contiguous(lhs);
    let out = client.empty(m * n * esize);
    let ldw = match layout {
        WeightLayout::RowMajor { ldw } | WeightLayout::Transposed { ldw } => ldw,
    };
    let mut params = [
        host_address(rhs)?,
        rhs.offset() as u64,
        ldw as u64,
        m as u64,
        k as u64,
        n as u64,
        0,
        0,
    ];
    if m * n > 0 {
        match layout {
            WeightLayout::Transposed { .. } => {
                let grid = CubeCount::Static(n.div_ceil(8) as u32, 1, 1);
                // SAFETY: buffers in the kernel's order (out, x, bias = out unused); `out` holds
                // M*N elements and `x` M*K (contiguous, plan checked against lhs); the weight
                // reads lie in the pinned buffer (checked above), whose release waits for this
                // device (recorded as a reader above; see `pinned`).
                unsafe {
                    launch(
                        &device,
                        MATMUL_HOST_SOURCE,
                        format!("matmul_host_tr_{suffix}"),
                        grid,
                        &[&out, &x.handle, &out],
                        &params,
                    )?
                }
            }
            WeightLayout::RowMajor { .. } => {
                let m16 = if m > 8 { "_m16" } else { "" };
                let tn = if m16.is_empty() && suffix != "f32" {
                    256
                } else {
                    128
                };
                let tiles = n.div_ceil(tn);
                // Cached per device: this runs for every zero-copy matmul.
                let sms = super::kernel::device_facts(device.index)?.multiprocessors as usize;
                let want = (2 * sms).div_ceil(tiles);
                let mut splits = 1;
                if want > 1 && k > 64 {
                    let k_chunk = k.div_ceil(want).div_ceil(64) * 64;
                    splits = k.div_ceil(k_chunk);
                    if splits > 1 {
                        params[6] = k_chunk as u64;
                    }
                }
                let partial = if splits > 1 {
                    client.empty(splits * m * n * 4)
                } else {
                    out.clone()
                };
                let grid = CubeCount::Static(tiles as u32, splits as u32, 1);
                // SAFETY: buffers in the kernel's order (out, x, bias = out unused, partial);
                // `partial` holds splits*M*N f32 when split (else unused); extents as above.
                unsafe {
                    launch(
                        &device,
                        MATMUL_HOST_SOURCE,
                        format!("matmul_host_rm_{suffix}{m16}"),
                        grid,
                        &[&out, &x.handle, &out, &partial],
                        &params,
                    )?
                }
                if splits > 1 {
                    let grid =
                        CubeCount::Static((m * n).div_ceil(BLOCK as usize).min(65535) as u32, 1, 1);
                    // SAFETY: the split-K epilogue reads `partial` (splits*M*N f32, written by
                    // the launch above, earlier on the same stream) and writes `out` (M*N).
                    unsafe {
                        launch(
                            &device,
                            MATMUL_HOST_SOURCE,
                            format!("matmul_host_reduce_{suffix}"),
                            grid,
                            &[&out, &partial, &out],
                            &params,
                        )?
                    }
                }
            }
        }
    }
    Ok(CubeTensor::new_contiguous(
        client,
        device,
        Shape::from(shape.out_dims),
        out,
        rhs.dtype(),
    ))
}

/// `embedding(weights, ids)` gathering only the requested rows from pinned host memory with
/// `gather_host.cu`.
///
/// Before launching, it checks that every row of the table the kernel can read (from the
/// view's offset, row stride, rows, cols and element size) lies inside the buffer:
/// [`CudaError::InvalidArgument`] otherwise, with nothing queued.
///
/// # Out-of-range ids
/// The ids stay on the device (checking them here would need a host synchronisation), so an
/// id `< 0` or `>= rows` is caught by the kernel: it stops with a device-side assertion, like
/// PyTorch's `embedding` ("device-side assert triggered"), and reads nothing for that id. The
/// error surfaces at the next synchronisation of the stream (reading a tensor,
/// [`sync`](crate::cuda::sync)), as a [`CudaError::Server`] or a panic of the op that reads,
/// and, as with PyTorch, the CUDA context is unusable afterwards: every later CUDA call of the
/// process on that device fails. Check ids on the host first where they can be out of range
/// (the CPU target panics with the id and the table size).
pub fn gather_host(
    weights: &HostTensor,
    ids: CubeTensor<CudaRuntime>,
) -> Result<CubeTensor<CudaRuntime>, CudaError> {
    let dims = weights.dims();
    if dims.len() != 2 || weights.strides()[1] != 1 || weights.strides()[0] < dims[1] as isize {
        return Err(invalid(format!(
            "gather reads a 2-D table with contiguous rows, got shape {dims:?} strides {:?}",
            weights.strides()
        )));
    }
    let entry = match ids.dtype {
        DType::I32 => "gather_host_i32",
        DType::I64 => "gather_host_i64",
        other => return Err(invalid(format!("embedding ids of dtype {other:?}"))),
    };
    let table = host_address(weights)?;
    let (rows, cols) = (dims[0], dims[1]);
    let esize = weights.dtype().size();
    check_host_read(
        weights,
        &StridedRead {
            offset: weights.offset() as u64,
            rows: rows as u64,
            cols: cols as u64,
            row_stride: weights.strides()[0] as u64,
            elem_size: esize as u64,
        },
    )?;
    let ids = burn_cubecl::kernel::into_contiguous(ids);
    let (device, client) = (ids.device.clone(), ids.client.clone());
    // Freeing the table's memory waits for this device too (see `pinned`).
    weights.buffer().note_reader(device.index);
    let num_ids = ids.meta.shape().num_elements();
    let out = client.empty(num_ids * cols * esize);
    if num_ids > 0 && cols > 0 {
        let params = [
            table,
            weights.offset() as u64,
            rows as u64,
            cols as u64,
            weights.strides()[0] as u64,
            esize as u64,
            num_ids as u64,
        ];
        let grid = CubeCount::Static(
            num_ids.min((1 << 31) - 1) as u32,
            (cols * esize).div_ceil(16384).clamp(1, 65535) as u32,
            1,
        );
        // SAFETY: buffers in the kernel's order (out: num_ids*cols elements, ids: num_ids
        // contiguous); every table row lies in the pinned buffer (checked above), whose release
        // waits for this device (recorded as a reader above); the kernel reads only rows
        // 0..rows and traps on any other id before reading.
        unsafe {
            launch(
                &device,
                GATHER_HOST_SOURCE,
                entry.to_string(),
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
        weights.dtype(),
    ))
}

/// Queues entry point `entry` of `source` (compiled alone, see [`entry_kernel`]) on CubeCL's
/// stream of the calling thread, with `buffers` as its leading pointer parameters.
///
/// # Safety
/// As [`launch_raw`]: the kernel must stay within `buffers` and only read host memory that
/// outlives it, and `params` must match its parameter struct.
pub(super) unsafe fn launch(
    device: &cubecl::cuda::CudaDevice,
    source: &'static str,
    entry: String,
    grid: CubeCount,
    buffers: &[&Handle],
    params: &[u64],
) -> Result<(), CudaError> {
    let kernel = entry_kernel(source, leak_entry(entry));
    let buffers = buffers.iter().map(|h| (*h).clone().binding()).collect();
    // SAFETY: forwarded from the caller's contract.
    unsafe { launch_raw(device, kernel, grid, buffers, params) }
}

/// A `&'static str` for an entry-point name (interned: each name is leaked once).
fn leak_entry(name: String) -> &'static str {
    static NAMES: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    names
        .entry(name)
        .or_insert_with_key(|n| Box::leak(n.clone().into_boxed_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(k: usize, n: usize, layout: WeightLayout) -> MatmulHostPlan {
        MatmulHostPlan {
            shape: HostMatmulShape {
                out_dims: vec![1, n],
                m: 1,
                k,
                n,
            },
            layout,
        }
    }

    /// Pure arithmetic (no driver): the extent the launcher checks before launching.
    #[test]
    fn weight_reads_cover_the_furthest_element() {
        // Row-major [K=3, N=4] with ldw 6 at offset 2, f16: last element 2 + 2*6 + 3 = 17.
        let rm = plan(3, 4, WeightLayout::RowMajor { ldw: 6 }).weight_read(2, 2);
        assert_eq!(rm.byte_span(), Ok(Some(4..36)));
        assert!(rm.check(36).is_ok() && rm.check(35).is_err());
        // Transposed: N=4 rows of K=3 elements, ldw 5: last element 3*5 + 2 = 17.
        let tr = plan(3, 4, WeightLayout::Transposed { ldw: 5 }).weight_read(0, 4);
        assert_eq!(tr.byte_span(), Ok(Some(0..72)));
        assert!(tr.check(71).is_err());
        // An empty product reads nothing.
        let empty = plan(0, 4, WeightLayout::RowMajor { ldw: 4 }).weight_read(usize::MAX, 4);
        assert_eq!(empty.check(0), Ok(()));
        // A plan whose extent overflows is refused, not wrapped.
        let huge = plan(3, 4, WeightLayout::RowMajor { ldw: usize::MAX }).weight_read(0, 4);
        assert!(huge.check(usize::MAX).is_err());
    }
}
