//! The CUDA target end to end: `OffloadBackend<CudaBackend>` against plain `CudaBackend`.
//!
//! - `linear` / `matmul` with an offloaded rhs and `embedding` with an offloaded table, in f32,
//!   f16 and bf16, odd and large shapes, transposed (tied head) and offset views: the zero-copy
//!   kernels in `uva` mode for at most `MAX_ROWS` rows, copy + CubeCL's GEMM otherwise and in
//!   `copy` mode (checked with `op_stats`), against an exact f64 product and the plain backend;
//! - offloading an initialised model frees its device memory and pins exactly its bytes, which
//!   are released again once the model is dropped;
//! - prefetch mode: the device memory the prefetch stream holds (measured in CubeCL's pool)
//!   stays within the lookahead plus the copy in use, and nothing is left once the model drops;
//! - threads (each with its own CubeCL stream) reading the same offloaded weights;
//! - pageable host memory (`pin_memory(false)`): correct results through the copy path;
//! - the LLaMA example model generates the same tokens with and without offload;
//! - quantized weights read in place (`qmatmul_host.cu`, `qgather_host.cu`): the kernels
//!   against an exact product and the codec's rows, their rate against the kernel-read bound,
//!   and a quantized model in `uva` and `copy` mode against Burn's own results, fused and not.
//!
//! Every test skips with a printed reason when there is no CUDA driver or device, unless
//! `BURN_OFFLOAD_REQUIRE_GPU=1` (see `common::gpu`). The offload mode is global per device, so
//! the tests run one at a time (the guard of `common::gpu` holds a lock).

use crate::llama::model;

use crate::common;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::module::{embedding, linear};
use burn::tensor::quantization::{QuantLevel, QuantParam, QuantScheme, QuantStore, QuantValue};
use burn::tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};
use burn_offload::auto::clear_calibration;
use burn_offload::cuda::{self, driver, ops::MAX_ROWS, quant_ops};
use burn_offload::inner::{OffloadTarget, TargetDevice};
use burn_offload::mode::{
    ENV_DISABLE_PIN_MEMORY, ENV_DISABLE_UVA, effective_mode, effective_pin_memory,
};
use burn_offload::quant::{self, QuantPreset};
use burn_offload::{
    CudaBackend, HostMemoryKind, HostTensor, OffloadBackend, OffloadContext, OffloadDevice,
    OffloadMode, OffloadPolicy, OffloadReport, OpStats, Quantization, host_memory_stats, op_stats,
    prefetch_stats, reset_op_stats, reset_prefetch_stats, set_prefetch_memory_probe,
};
use cubecl::cuda::CudaDevice;

use model::{Cache, Llama, LlamaConfig};

/// The plain backend: the reference.
type R = CudaBackend;
/// The backend under test.
type B = OffloadBackend<CudaBackend>;

const MODES: [OffloadMode; 2] = [OffloadMode::Uva, OffloadMode::Copy];

/// The GPU and its guard (see `common::gpu`), configured for `uva` with pinned memory. Refuses
/// the environment switches that override the mode or pinning these tests choose.
fn gpu(test: &str) -> Option<(CudaDevice, common::gpu::GpuGuard)> {
    let found = common::gpu::gpu(module_path!(), test)?;
    assert!(
        effective_mode(OffloadMode::Uva) == OffloadMode::Uva && effective_pin_memory(true),
        "{test}: unset {ENV_DISABLE_UVA} and {ENV_DISABLE_PIN_MEMORY} to run these tests"
    );
    Some(found)
}

/// A context in `mode` with pinned memory: what tensors adopted by it are read with.
fn in_mode(mode: OffloadMode) -> OffloadContext {
    OffloadContext::with_mode(mode)
}

fn resident(cuda: &CudaDevice) -> OffloadDevice<CudaDevice> {
    OffloadDevice::device(cuda.clone())
}

/// Deterministic values in [-1, 1) (24-bit fractions, exact in f32).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// `values` as `dtype` data, and the values it actually holds (rounded to `dtype`).
fn rounded<const N: usize>(
    values: Vec<f32>,
    shape: [usize; N],
    dtype: DType,
) -> (TensorData, Vec<f32>) {
    let data = TensorData::new(values, shape).convert_dtype(dtype);
    let held = data.iter::<f32>().collect();
    (data, held)
}

/// Reads a result, checking its dtype.
fn read<Bk: Backend, const D: usize>(tensor: Tensor<Bk, D>, dtype: DType) -> Vec<f32> {
    let data = tensor.into_data();
    assert_eq!(data.dtype, dtype, "result dtype");
    data.iter::<f32>().collect()
}

/// Which ops read an offloaded tensor in place and which copied it, for one op.
fn assert_path(ctx: &str, stats: OpStats, zero_copy: bool) {
    let expected = if zero_copy { (1, 0) } else { (0, 1) };
    assert_eq!(
        (stats.zero_copy_ops, stats.transient_uploads),
        expected,
        "{ctx}: (zero-copy ops, transient uploads) should be {expected:?}: {stats:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Ops: linear, matmul, embedding
// ---------------------------------------------------------------------------------------------

/// How the `[k, n]` operand is made from the matrix stored in host memory.
#[derive(Debug, Clone, Copy)]
enum View {
    /// Stored as is.
    Whole,
    /// Stored `[n, k]` and transposed (a tied LM head: `embed.weight^T`).
    Transposed,
    /// Rows `s..s + k` of a taller matrix: a view at a row offset.
    Rows(usize),
    /// Columns `s..s + n` of a wider matrix: row stride larger than `n`, column offset.
    Cols(usize),
}

impl View {
    /// Dims of the stored matrix.
    fn storage(self, k: usize, n: usize) -> [usize; 2] {
        match self {
            View::Whole => [k, n],
            View::Transposed => [n, k],
            View::Rows(s) => [k + s + 3, n],
            View::Cols(s) => [k, n + 2 * s],
        }
    }

    /// The view's values (row-major `[k, n]`), from the stored matrix's values.
    fn values(self, stored: &[f32], k: usize, n: usize) -> Vec<f32> {
        let at = |i: usize, j: usize| match self {
            View::Whole => stored[i * n + j],
            View::Transposed => stored[j * k + i],
            View::Rows(s) => stored[(s + i) * n + j],
            View::Cols(s) => stored[i * (n + 2 * s) + s + j],
        };
        (0..k * n).map(|e| at(e / n, e % n)).collect()
    }

    /// The view, made with Burn's ops (offloaded tensors get host views, no copy).
    fn apply<Bk: Backend>(self, stored: Tensor<Bk, 2>, k: usize, n: usize) -> Tensor<Bk, 2> {
        match self {
            View::Whole => stored,
            View::Transposed => stored.transpose(),
            View::Rows(s) => stored.slice([s..s + k, 0..n]),
            View::Cols(s) => stored.slice([0..k, s..s + n]),
        }
    }
}

/// A `[k, n]` operand of `dtype`: resident on the plain backend, offloaded on `B`, and its
/// values (row-major, as held in `dtype`).
fn operand(
    cuda: &CudaDevice,
    view: View,
    [k, n]: [usize; 2],
    dtype: DType,
    seed: u64,
) -> (Tensor<R, 2>, Tensor<B, 2>, Vec<f32>) {
    let [rows, cols] = view.storage(k, n);
    let (data, stored) = rounded(values(rows * cols, seed), [rows, cols], dtype);
    let held = view.values(&stored, k, n);
    let plain = view.apply(Tensor::<R, 2>::from_data(data.clone(), (cuda, dtype)), k, n);
    let host = OffloadDevice::host(cuda.clone());
    let offloaded = view.apply(Tensor::<B, 2>::from_data(data, (&host, dtype)), k, n);
    assert!(
        common::on_host(&offloaded),
        "the {view:?} view stays offloaded"
    );
    (plain, offloaded, held)
}

/// Exact (f64) values of `x @ w (+ bias)` and their error scale `Σ|x·w| (+ |bias|)`, on the
/// first and last 512 columns (all columns when `n <= 1024`).
struct Exact {
    n: usize,
    cols: Vec<usize>,
    value: Vec<f64>,
    scale: Vec<f64>,
}

impl Exact {
    fn new(x: &[f32], w: &[f32], [m, k, n]: [usize; 3]) -> Self {
        let head = n.min(512);
        let blocks = [0..head, n.saturating_sub(512).max(head)..n];
        let cols: Vec<usize> = blocks.iter().cloned().flatten().collect();
        let width = cols.len();
        let mut value = vec![0.0; m * width];
        let mut scale = vec![0.0; m * width];
        for r in 0..m {
            let (value, scale) = (
                &mut value[r * width..(r + 1) * width],
                &mut scale[r * width..(r + 1) * width],
            );
            for (kk, &xv) in x[r * k..(r + 1) * k].iter().enumerate() {
                let row = &w[kk * n..(kk + 1) * n];
                let sampled = blocks.iter().flat_map(|b| &row[b.clone()]);
                for ((v, s), &wv) in value.iter_mut().zip(scale.iter_mut()).zip(sampled) {
                    let p = xv as f64 * wv as f64;
                    *v += p;
                    *s += p.abs();
                }
            }
        }
        Self {
            n,
            cols,
            value,
            scale,
        }
    }

    fn plus_bias(&self, bias: &[f32]) -> Self {
        let width = self.cols.len();
        let b = |i: usize| bias[self.cols[i % width]] as f64;
        Self {
            n: self.n,
            cols: self.cols.clone(),
            value: self
                .value
                .iter()
                .enumerate()
                .map(|(i, v)| v + b(i))
                .collect(),
            scale: self
                .scale
                .iter()
                .enumerate()
                .map(|(i, s)| s + b(i).abs())
                .collect(),
        }
    }

    /// The largest `|got - exact| / scale` over the sampled columns of the first `rows` rows.
    fn error(&self, got: &[f32], rows: usize) -> f64 {
        let width = self.cols.len();
        (0..rows * width)
            .map(|i| {
                let g = got[i / width * self.n + self.cols[i % width]] as f64;
                (g - self.value[i]).abs() / self.scale[i].max(f64::MIN_POSITIVE)
            })
            .fold(0.0, f64::max)
    }

    /// Asserts that `got` is within `tol` of the exact values and the plain backend's
    /// `reference` within `ref_tol` (as fractions of the error scale), and that `got` is within
    /// `tol + ref_tol` of `reference` in every column (un-sampled ones against the largest
    /// scale of their row, with a 25 % margin).
    fn check(
        &self,
        ctx: &str,
        got: &[f32],
        reference: &[f32],
        rows: usize,
        [tol, ref_tol]: [f64; 2],
    ) {
        let e_ref = self.error(reference, rows);
        assert!(
            e_ref <= ref_tol,
            "{ctx}: the plain CUDA result is off by {e_ref:.2e} of Σ|x·w| (> {ref_tol:.1e})"
        );
        let e = self.error(got, rows);
        assert!(
            e <= tol,
            "{ctx}: off by {e:.2e} of Σ|x·w| from the exact product (> {tol:.1e})"
        );
        let width = self.cols.len();
        for r in 0..rows {
            let scale = self.scale[r * width..(r + 1) * width]
                .iter()
                .fold(0.0, |a: f64, &s| a.max(s));
            let bound = (tol + ref_tol) * scale * 1.25;
            for c in 0..self.n {
                let (g, e) = (got[r * self.n + c] as f64, reference[r * self.n + c] as f64);
                assert!(
                    (g - e).abs() <= bound,
                    "{ctx}: [{r}, {c}] = {g} but the plain CUDA result is {e}"
                );
            }
        }
    }
}

/// Worst error allowed as a fraction of `Σ|x·w|`: up to four roundings to `dtype` (the
/// product, the bias add, margin) plus the accumulation: f32 sums in the zero-copy kernel;
/// CubeCL's GEMM may multiply f32 inputs as TF32 on tensor cores (10-bit mantissas), hence 4e-3.
fn tol(dtype: DType, gemm: bool) -> f64 {
    let unit = match dtype {
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        _ => 2f64.powi(-24),
    };
    let accumulation = match (gemm, dtype) {
        (true, DType::F32) => 4e-3,
        (true, _) => 1e-3,
        (false, _) => 1e-4,
    };
    4.0 * unit + accumulation
}

/// The harness itself, on the CPU (no GPU needed): the views hold what `View::values` says,
/// and `Exact` agrees with burn-ndarray's `matmul` and `linear` and catches a wrong column.
#[test]
fn harness_matches_burn_ndarray() {
    type Cpu = burn::backend::NdArray;
    let cpu = Default::default();
    let (m, k, n) = (3, 5, 1100); // n > 1024: columns are sampled
    let (x, b) = (values(m * k, 1), values(n, 2));
    let x_cpu = Tensor::<Cpu, 2>::from_data(TensorData::new(x.clone(), [m, k]), &cpu);
    let b_cpu = Tensor::<Cpu, 1>::from_data(TensorData::new(b.clone(), [n]), &cpu);
    for view in [View::Whole, View::Transposed, View::Rows(2), View::Cols(3)] {
        let [rows, cols] = view.storage(k, n);
        let stored = values(rows * cols, 3);
        let w = view.values(&stored, k, n);
        let stored = TensorData::new(stored, [rows, cols]);
        let w_cpu = view.apply(Tensor::<Cpu, 2>::from_data(stored, &cpu), k, n);
        assert_eq!(w_cpu.to_data().to_vec::<f32>().unwrap(), w, "{view:?}");
        let tols = [tol(DType::F32, false); 2];
        let product = Exact::new(&x, &w, [m, k, n]);
        let mut got = read(x_cpu.clone().matmul(w_cpu.clone()), DType::F32);
        product.check(&format!("{view:?} matmul"), &got, &got, m, tols);
        let affine = product.plus_bias(&b);
        let lin = read(
            linear(x_cpu.clone(), w_cpu, Some(b_cpu.clone())),
            DType::F32,
        );
        affine.check(&format!("{view:?} linear"), &lin, &lin, m, tols);
        got[2 * n - 1] += 0.5;
        assert!(
            product.error(&got, m) > 0.1,
            "{view:?}: a wrong last column passes"
        );
    }
}

/// Rows of `x`: one decode token, a few, the most the zero-copy kernels take, and past it.
const ROWS: [usize; 4] = [1, 7, MAX_ROWS, 33];

/// `(K, N, view)`: odd sizes (scalar loads, split-K), 64 MiB of f32 (vector loads), the tied
/// head layout with vector and scalar loads, offset views with vector loads.
const MATMUL_CASES: [(usize, usize, View); 6] = [
    (1000, 1003, View::Whole),
    (4096, 4096, View::Whole),
    (1000, 1003, View::Transposed),
    (777, 515, View::Transposed),
    (1024, 1024, View::Rows(3)),
    (1000, 1024, View::Cols(64)),
];

fn linear_and_matmul(test: &str, dtype: DType) {
    let Some((cuda, _gpu)) = gpu(test) else {
        return;
    };
    let device = resident(&cuda);
    let m_max = ROWS[ROWS.len() - 1];
    for (case, &(k, n, view)) in MATMUL_CASES.iter().enumerate() {
        let seed = 3 * case as u64;
        let (w_plain, w_off, w) = operand(&cuda, view, [k, n], dtype, seed);
        let (_, x) = rounded(values(m_max * k, seed + 1), [m_max, k], dtype);
        let (bias, b) = rounded(values(n, seed + 2), [n], dtype);
        let b_plain = Tensor::<R, 1>::from_data(bias.clone(), (&cuda, dtype));
        let b_off = Tensor::<B, 1>::from_data(bias, (&device, dtype));
        let product = Exact::new(&x, &w, [m_max, k, n]);
        let affine = product.plus_bias(&b);
        for m in ROWS {
            // Progress with times (shown with --nocapture): the first product of each shape
            // compiles kernels and autotunes Burn's matmul, which takes seconds on a GPU.
            let started = std::time::Instant::now();
            let x = TensorData::new(x[..m * k].to_vec(), [1, m, k]).convert_dtype(dtype);
            let x_plain = Tensor::<R, 3>::from_data(x.clone(), (&cuda, dtype));
            let mm_plain = read(
                x_plain.clone().reshape([m, k]).matmul(w_plain.clone()),
                dtype,
            );
            let lin_plain = read(
                linear(x_plain, w_plain.clone(), Some(b_plain.clone())),
                dtype,
            );
            for mode in MODES {
                let context = in_mode(mode);
                let (w_off, b_off) = (context.adopt(w_off.clone()), context.adopt(b_off.clone()));
                let zero_copy = mode == OffloadMode::Uva && m <= MAX_ROWS;
                let tols = [tol(dtype, !zero_copy), tol(dtype, true)];
                let ctx = format!("{dtype:?} {view:?} [{m}, {k}] x [{k}, {n}] in {mode} mode");
                let x_off = Tensor::<B, 3>::from_data(x.clone(), (&device, dtype));

                reset_op_stats();
                let got = read(x_off.clone().reshape([m, k]).matmul(w_off.clone()), dtype);
                assert_path(&format!("matmul {ctx}"), op_stats(), zero_copy);
                product.check(&format!("matmul {ctx}"), &got, &mm_plain, m, tols);

                reset_op_stats();
                let got = read(linear(x_off, w_off.clone(), Some(b_off.clone())), dtype);
                assert_path(&format!("linear {ctx}"), op_stats(), zero_copy);
                affine.check(&format!("linear {ctx}"), &got, &lin_plain, m, tols);
            }
            eprintln!(
                "{test}: {view:?} [{m}, {k}] x [{k}, {n}] checked in {:.2?}",
                started.elapsed()
            );
        }
    }
}

/// Table views for `embedding`: the transposed one has no contiguous rows, so even `uva` and
/// `prefetch` mode copy it.
const EMBEDDING_VIEWS: [View; 4] = [View::Whole, View::Rows(5), View::Cols(8), View::Transposed];

fn embedding_rows(test: &str, dtype: DType) {
    let Some((cuda, _gpu)) = gpu(test) else {
        return;
    };
    let device = resident(&cuda);
    let (rows, cols) = (1003, 520);
    // First and last rows, repeats.
    let ids: Vec<i64> = vec![0, 1002, 5, 5, 999, 17, 400, 0, 1, 1002, 123, 64];
    let ids = TensorData::new(ids, [2, 6]);
    for (case, view) in EMBEDDING_VIEWS.into_iter().enumerate() {
        let (w_plain, w_off, w) = operand(&cuda, view, [rows, cols], dtype, 100 + case as u64);
        let expected: Vec<f32> = ids
            .iter::<i64>()
            .flat_map(|id| w[id as usize * cols..(id as usize + 1) * cols].to_vec())
            .collect();
        let plain = read(
            embedding(w_plain, Tensor::from_data(ids.clone(), &cuda)),
            dtype,
        );
        assert!(
            plain == expected,
            "{dtype:?} {view:?}: the plain CUDA embedding is wrong"
        );
        // Prefetch mode gathers rows in place too (a copy would move the whole table).
        let prefetch = OffloadMode::prefetch(1 << 20);
        for mode in MODES.into_iter().chain([prefetch]) {
            let w_off = in_mode(mode).adopt(w_off.clone());
            let ctx = format!("embedding {dtype:?} {view:?} in {mode} mode");
            let ids = Tensor::<B, 2, Int>::from_data(ids.clone(), &device);
            reset_op_stats();
            let got = read(embedding(w_off.clone(), ids), dtype);
            let zero_copy = mode != OffloadMode::Copy && !matches!(view, View::Transposed);
            assert_path(&ctx, op_stats(), zero_copy);
            assert!(got == expected, "{ctx}: rows differ from the table");
        }
    }
}

macro_rules! per_dtype {
    ($suite:ident: $($name:ident = $dtype:ident),+ $(,)?) => {$(
        #[test]
        fn $name() {
            $suite(stringify!($name), DType::$dtype)
        }
    )+};
}

per_dtype!(linear_and_matmul:
    linear_matmul_f32 = F32,
    linear_matmul_f16 = F16,
    linear_matmul_bf16 = BF16,
);
per_dtype!(embedding_rows: embedding_f32 = F32, embedding_f16 = F16, embedding_bf16 = BF16);

// ---------------------------------------------------------------------------------------------
// Models: device memory, pinned bytes, threads, pageable memory
// ---------------------------------------------------------------------------------------------

const WIDTH: usize = 2048;
const DEPTH: usize = 4;
/// Bytes of the stack's weights (f32): 64 MiB. Its biases (8 KiB each) stay on the device.
const WEIGHT_BYTES: u64 = (DEPTH * WIDTH * WIDTH * 4) as u64;

/// `DEPTH` linear layers of `WIDTH` with ReLUs.
#[derive(Module, Debug)]
struct Stack<B: Backend> {
    layers: Vec<Linear<B>>,
}

impl<B: Backend> Stack<B> {
    fn new(device: &B::Device) -> Self {
        Self::with_depth(device, DEPTH)
    }

    fn with_depth(device: &B::Device, depth: usize) -> Self {
        let layers = (0..depth)
            .map(|_| LinearConfig::new(WIDTH, WIDTH).init(device))
            .collect();
        Self { layers }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.layers
            .iter()
            .fold(x, |x, layer| relu(layer.forward(x)))
    }
}

/// The stack's output for `rows` rows of a fixed input (initialises a lazy stack).
fn run_stack(model: &Stack<B>, cuda: &CudaDevice, rows: usize) -> Vec<f32> {
    let x = TensorData::new(values(rows * WIDTH, 99), [rows, WIDTH]);
    read(
        model.forward(Tensor::from_data(x, &resident(cuda))),
        DType::F32,
    )
}

/// Offloads every weight of `model` (not the biases), in `mode`, pinned or not.
fn offload_weights(model: Stack<B>, mode: OffloadMode, pin: bool) -> (Stack<B>, OffloadReport) {
    let policy = OffloadPolicy::from_bytes(u64::MAX)
        .min_tensor_bytes(1 << 20)
        .mode(mode)
        .pin_memory(pin);
    let (model, report) = policy.apply(model).expect("valid policy");
    assert_eq!(report.offloaded_tensors(), DEPTH);
    assert_eq!(report.offloaded_bytes(), WEIGHT_BYTES);
    (model, report)
}

/// `max |got - expected| <= tol * max |expected|`; returns the difference.
fn assert_near(ctx: &str, got: &[f32], expected: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), expected.len(), "{ctx}: lengths");
    let scale = expected.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let diff = got
        .iter()
        .zip(expected)
        .fold(0.0f32, |a, (g, e)| a.max((g - e).abs()));
    assert!(
        diff <= tol * scale,
        "{ctx}: max difference {diff:.3e}, {:.1e} of the largest value {scale:.3e}",
        diff / scale
    );
    diff
}

/// CubeCL's `(bytes in use, bytes reserved)` on this thread's stream, once its work is done and
/// free pages are released.
fn device_bytes(cuda: &CudaDevice) -> (u64, u64) {
    cuda::sync(cuda).unwrap();
    cuda::release_upload_sources(cuda).unwrap();
    cuda::sync(cuda).unwrap();
    B::memory_cleanup(&resident(cuda));
    let usage = driver::cubecl_client(cuda)
        .unwrap()
        .memory_usage()
        .expect("memory usage");
    (usage.bytes_in_use, usage.bytes_reserved)
}

#[test]
fn offloading_frees_device_memory() {
    let Some((cuda, _gpu)) = gpu("offloading_frees_device_memory") else {
        return;
    };
    let model = Stack::<B>::new(&resident(&cuda));
    let expected = run_stack(&model, &cuda, 4);
    let (used, reserved) = device_bytes(&cuda);
    let (model, _) = offload_weights(model, OffloadMode::Uva, true);
    let (used_after, reserved_after) = device_bytes(&cuda);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "device memory in use {:.1} -> {:.1} MiB, reserved {:.1} -> {:.1} MiB, {:.1} MiB offloaded",
        mib(used),
        mib(used_after),
        mib(reserved),
        mib(reserved_after),
        mib(WEIGHT_BYTES)
    );
    let freed = used.saturating_sub(used_after);
    assert!(
        freed >= WEIGHT_BYTES / 16 * 15,
        "offloading {WEIGHT_BYTES} bytes freed only {freed} bytes of device memory"
    );

    // Reading the weights in place brings nothing back to the device.
    reset_op_stats();
    let got = run_stack(&model, &cuda, 4);
    let stats = op_stats();
    assert_eq!(
        (stats.zero_copy_ops, stats.transient_uploads),
        (DEPTH as u64, 0),
        "{stats:?}"
    );
    assert_near("offloaded stack", &got, &expected, 1e-2);
    let (used_later, _) = device_bytes(&cuda);
    assert!(
        used_later <= used_after + WEIGHT_BYTES / 16,
        "a forward left {} bytes on the device",
        used_later - used_after
    );
}

/// Live pinned bytes once the count holds still: an earlier test's prefetch thread, ended by
/// `gpu()`'s reconfiguration, may still be letting go of pinned memory.
fn settled_pinned_bytes() -> usize {
    let pinned = || host_memory_stats().live_pinned_bytes;
    let mut start = pinned();
    loop {
        std::thread::sleep(3 * burn_offload::prefetch::LIVENESS_CHECK);
        let now = pinned();
        if now == start {
            return now;
        }
        start = now;
    }
}

#[test]
fn pinned_bytes_follow_the_offloaded_model() {
    let Some((cuda, _gpu)) = gpu("pinned_bytes_follow_the_offloaded_model") else {
        return;
    };
    let pinned = || host_memory_stats().live_pinned_bytes;
    let start = settled_pinned_bytes();
    let model = Stack::<B>::new(&resident(&cuda));
    run_stack(&model, &cuda, 4);
    assert_eq!(pinned(), start, "a resident model pins nothing");
    let (model, _) = offload_weights(model, OffloadMode::Uva, true);
    assert_eq!(
        pinned(),
        start + WEIGHT_BYTES as usize,
        "pinned bytes after offloading"
    );

    // Zero-copy reads, and DMA copies whose sources CubeCL's drop queue holds for a while.
    for (mode, rows) in [
        (OffloadMode::Uva, 4),
        (OffloadMode::Copy, 4),
        (OffloadMode::Uva, 33),
    ] {
        let model = in_mode(mode).adopt_module(model.clone());
        run_stack(&model, &cuda, rows);
    }
    drop(model);
    cuda::sync(&cuda).unwrap();
    cuda::release_upload_sources(&cuda).unwrap();
    cuda::sync(&cuda).unwrap();
    assert_eq!(pinned(), start, "pinned bytes after dropping the model");
    cuda::wait_pinned_releases();
    assert_eq!(pinned(), start);
}

/// Turns the prefetch memory probe on for its lifetime (off again even if the test fails).
struct MemoryProbe;

impl MemoryProbe {
    fn on() -> Self {
        set_prefetch_memory_probe(true);
        Self
    }
}

impl Drop for MemoryProbe {
    fn drop(&mut self) {
        set_prefetch_memory_probe(false);
    }
}

#[test]
fn prefetch_device_memory_stays_within_the_lookahead() {
    let Some((cuda, _gpu)) = gpu("prefetch_device_memory_stays_within_the_lookahead") else {
        return;
    };
    // 12 weights of 16 MiB (192 MiB), a lookahead of three of them.
    const LAYERS: usize = 12;
    let layer_bytes = (WIDTH * WIDTH * 4) as u64;
    let lookahead = 3 * layer_bytes;
    let pinned = || host_memory_stats().live_pinned_bytes;
    let start = settled_pinned_bytes();
    let model = Stack::<B>::with_depth(&resident(&cuda), LAYERS);
    let expected = run_stack(&model, &cuda, 4);
    let (model, report) = OffloadPolicy::from_bytes(u64::MAX)
        .min_tensor_bytes(1 << 20)
        .mode(OffloadMode::prefetch(lookahead))
        .apply(model)
        .expect("valid policy");
    assert_eq!(report.offloaded_bytes(), LAYERS as u64 * layer_bytes);
    {
        let _probe = MemoryProbe::on();
        reset_prefetch_stats();
        for round in 0..6 {
            let got = run_stack(&model, &cuda, 4);
            assert!(
                got == run_stack(&model, &cuda, 4),
                "round {round}: prefetch mode is not deterministic"
            );
            assert_near(&format!("round {round}"), &got, &expected, 1e-2);
        }
        let stats = prefetch_stats();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "prefetch stream: at most {:.1} MiB of device memory in use (lookahead {:.1} MiB, \
             {:.1} MiB per weight); {stats:?}",
            mib(stats.peak_device_bytes),
            mib(lookahead),
            mib(layer_bytes)
        );
        assert!(stats.hits > 0, "{stats:?}");
        assert!(stats.peak_alive_bytes <= lookahead, "{stats:?}");
        // Measured in CubeCL's pool of the prefetch stream (in-use slices, not pages): the
        // copies not handed out yet (at most the lookahead), plus the one the op that took it
        // still holds (CubeCL's cross-stream bookkeeping keeps ids, not memory). 1 MiB of
        // slack for what is not a weight; prefetching the whole model would take 192 MiB.
        assert!(
            stats.peak_device_bytes >= layer_bytes,
            "the probe saw no copy: {stats:?}"
        );
        assert!(
            stats.peak_device_bytes <= lookahead + layer_bytes + (1 << 20),
            "the prefetch stream held {} bytes, more than the {lookahead}-byte lookahead and \
             one weight in use",
            stats.peak_device_bytes
        );
    }

    // No leak once the model is gone: the thread frees its copies, and its release lets
    // CubeCL drop the pinned sources its queue held (this thread's on-demand copies of the
    // first forward hold theirs in this thread's queue).
    drop(model);
    cuda::sync(&cuda).unwrap();
    cuda::release_upload_sources(&cuda).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (pinned() != start || prefetch_stats().alive_bytes != 0)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    cuda::wait_pinned_releases();
    assert_eq!(
        (pinned(), prefetch_stats().alive_bytes),
        (start, 0),
        "pinned bytes and prefetched copies after dropping the model: {:?}",
        prefetch_stats()
    );
}

#[test]
fn threads_share_offloaded_weights() {
    let Some((cuda, _gpu)) = gpu("threads_share_offloaded_weights") else {
        return;
    };
    const THREADS: usize = 4;
    const ITERATIONS: usize = 3;
    const ROW_COUNTS: [usize; 2] = [4, 33]; // zero-copy, and copy + GEMM
    let model = Stack::<B>::new(&resident(&cuda));
    run_stack(&model, &cuda, 4);
    let (model, _) = offload_weights(model, OffloadMode::Uva, true);
    // Single-threaded results; this also tunes CubeCL's kernels for these shapes.
    let single = ROW_COUNTS.map(|rows| run_stack(&model, &cuda, rows));
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    reset_op_stats();
                    let outputs: Vec<_> = (0..ITERATIONS)
                        .map(|_| ROW_COUNTS.map(|rows| run_stack(&model, &cuda, rows)))
                        .collect();
                    // Let this thread's stream drop the upload sources it holds.
                    cuda::release_upload_sources(&cuda).unwrap();
                    (outputs, op_stats())
                })
            })
            .collect();
        for (t, thread) in threads.into_iter().enumerate() {
            let (outputs, stats) = thread.join().expect("thread panicked");
            assert_eq!(
                stats.zero_copy_ops,
                (ITERATIONS * DEPTH) as u64,
                "thread {t}: {stats:?}"
            );
            for [few, many] in outputs {
                // The zero-copy kernel is deterministic: bitwise equal.
                assert!(
                    few.iter()
                        .map(|v| v.to_bits())
                        .eq(single[0].iter().map(|v| v.to_bits())),
                    "thread {t}: zero-copy results differ"
                );
                assert_near(
                    &format!("thread {t}, {} rows", ROW_COUNTS[1]),
                    &many,
                    &single[1],
                    1e-5,
                );
            }
        }
    });
}

#[test]
fn pageable_host_memory_takes_the_copy_path() {
    let Some((cuda, _gpu)) = gpu("pageable_host_memory_takes_the_copy_path") else {
        return;
    };
    let model = Stack::<B>::new(&resident(&cuda));
    let expected = [4, 33].map(|rows| run_stack(&model, &cuda, rows));
    let start = host_memory_stats();
    let (model, report) = offload_weights(model, OffloadMode::Uva, false);
    assert_eq!(report.mode, OffloadMode::Uva);
    let now = host_memory_stats();
    assert_eq!(
        now.live_pinned_bytes, start.live_pinned_bytes,
        "nothing pinned"
    );
    assert_eq!(now.live_bytes, start.live_bytes + WEIGHT_BYTES as usize);
    for layer in &model.layers {
        let weight = layer.weight.val().into_primitive().tensor();
        let kind = weight.host().map(|h| h.buffer().kind());
        assert_eq!(kind, Some(HostMemoryKind::Pageable));
    }
    for (rows, expected) in [4, 33].into_iter().zip(&expected) {
        reset_op_stats();
        let got = run_stack(&model, &cuda, rows);
        let stats = op_stats();
        assert_eq!(
            (stats.zero_copy_ops, stats.transient_uploads),
            (0, DEPTH as u64),
            "{rows} rows: {stats:?}"
        );
        assert_near(&format!("pageable, {rows} rows"), &got, expected, 1e-2);
    }
}

// ---------------------------------------------------------------------------------------------
// The LLaMA example model
// ---------------------------------------------------------------------------------------------

/// Logits of a prefill of `prompt` and of `steps` decode steps after it; each step feeds
/// `forced[i]` if given, else the greedy (argmax) token. Returns the tokens fed and the logits.
fn decode<T: OffloadTarget<Device = CudaDevice>>(
    model: &Llama<OffloadBackend<T>>,
    cuda: &CudaDevice,
    prompt: &[i64],
    forced: Option<&[i64]>,
    steps: usize,
) -> (Vec<i64>, Vec<Vec<f32>>) {
    let device = resident(cuda);
    let mut cache = Cache::for_model(model);
    let mut input = TensorData::new(prompt.to_vec(), [1, prompt.len()]);
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    for step in 0..=steps {
        let out = model.forward_last(Tensor::from_data(input, &device), &mut cache);
        let out: Vec<f32> = out.into_data().iter::<f32>().collect();
        let next = forced.map_or_else(|| argmax(&out), |f| f[step]);
        tokens.push(next);
        logits.push(out);
        input = TensorData::new(vec![next], [1, 1]);
    }
    (tokens, logits)
}

fn argmax(values: &[f32]) -> i64 {
    let best = values
        .iter()
        .enumerate()
        .fold(0, |b, (i, v)| if *v > values[b] { i } else { b });
    best as i64
}

#[test]
fn llama_generates_the_same_tokens_offloaded() {
    llama_tokens::<CudaBackend>("llama_generates_the_same_tokens_offloaded");
}

/// The same on Burn's fused `burn::backend::Cuda`: copies enter the fused graph, the
/// zero-copy kernels run as lazy custom ops, prefetched copies are registered on the op thread.
#[test]
fn llama_generates_the_same_tokens_offloaded_fused() {
    llama_tokens::<burn_cuda::Cuda>("llama_generates_the_same_tokens_offloaded_fused");
}

fn llama_tokens<T: OffloadTarget<Device = CudaDevice>>(test: &str) {
    let Some((cuda, _gpu)) = gpu(test) else {
        return;
    };
    let config = LlamaConfig::preset("tiny").unwrap();
    let device = resident(&cuda);
    OffloadBackend::<T>::seed(&device, 7);
    let model: Llama<OffloadBackend<T>> = config.init(&device);
    // 20 prompt tokens: the prefill takes the copy path (more than MAX_ROWS rows) even in
    // `uva` mode, the decode steps the zero-copy kernels.
    let prompt: Vec<i64> = (0..20)
        .map(|i| (i * 37 + 11) % config.vocab_size as i64)
        .collect();
    let steps = 6;
    let (tokens, reference) = decode::<T>(&model, &cuda, &prompt, None, steps);
    let (offloaded, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Uva)
        .apply(model.clone())
        .unwrap();
    assert_eq!(report.offloaded_bytes(), report.total_bytes());
    // Prefetch through CubeCL's copies and through the copy engine's ring (issue #25).
    let prefetch = OffloadMode::prefetch(1 << 20);
    let engine = OffloadMode::prefetch_engine(1 << 20);
    let mut copy_logits = None;
    for mode in [
        OffloadMode::Uva,
        OffloadMode::Copy,
        prefetch,
        engine,
        OffloadMode::Auto,
    ] {
        let context = in_mode(mode);
        if mode == OffloadMode::Auto {
            // What `apply` would measure: this card's rates decide per op.
            let calibration = cuda.calibrate(true).expect("calibration");
            context.set_calibration(&cuda, std::sync::Arc::new(calibration));
        }
        let offloaded = context.adopt_module(offloaded.clone());
        reset_op_stats();
        reset_prefetch_stats();
        // Fed the resident run's tokens: where every argmax matches, free generation would
        // give exactly these tokens.
        let (_, logits) = decode::<T>(&offloaded, &cuda, &prompt, Some(&tokens), steps);
        let stats = op_stats();
        match mode {
            OffloadMode::Uva => assert!(stats.zero_copy_ops > 0, "{mode}: {stats:?}"),
            OffloadMode::Auto => {}
            // Prefetch copies every weight but the embedding table, whose rows each forward
            // (the prefill and `steps` decode steps) gathers in place.
            OffloadMode::Prefetch { .. } => {
                assert_eq!(stats.zero_copy_ops, steps as u64 + 1, "{mode}: {stats:?}")
            }
            _ => assert_eq!(stats.zero_copy_ops, 0, "{mode}: {stats:?}"),
        }
        if mode == prefetch || mode == engine {
            // Prefill and decode read the weights in one order: copies come from the
            // background stream after the first forward.
            let prefetched = prefetch_stats();
            assert!(prefetched.hits > 0, "{mode}: {prefetched:?}");
            assert_eq!(
                prefetched.ring_fills > 0,
                mode == engine,
                "{mode}: copies from the engine's ring exactly with :engine: {prefetched:?}"
            );
            // The bound on prefetched copies alive, as the prefetcher counts them (device
            // memory itself is pooled by CubeCL, in pages larger than these tensors).
            assert!(prefetched.peak_alive_bytes <= 1 << 20, "{prefetched:?}");
            // The same bytes through the same kernels as copy mode: any difference is a copy
            // overwritten while it was still read (memory reused across streams too early).
            let copied: &Vec<Vec<f32>> = copy_logits.as_ref().expect("copy mode ran first");
            for (step, (got, want)) in logits.iter().zip(copied).enumerate() {
                assert!(
                    got == want,
                    "{mode} mode, step {step}: logits differ from copy mode's"
                );
            }
        }
        if mode == OffloadMode::Copy {
            copy_logits = Some(logits.clone());
        }
        for (step, (got, want)) in logits.iter().zip(&reference).enumerate() {
            let ctx = format!("{mode} mode, step {step}");
            let diff = assert_near(&ctx, got, want, 2e-2);
            let token = argmax(got);
            if token != tokens[step] {
                // Only a near tie, within the observed logit difference, may flip the argmax.
                let gap = want[tokens[step] as usize] - want[token as usize];
                assert!(
                    gap <= 2.0 * diff,
                    "{ctx}: token {token} instead of {} (logit gap {gap:.3e})",
                    tokens[step]
                );
                eprintln!(
                    "{ctx}: near tie, token {token} vs {} (gap {gap:.3e})",
                    tokens[step]
                );
            }
        }
    }
    clear_calibration(&cuda);
}

#[test]
fn auto_mode_measures_the_card_and_warns_when_the_model_fits() {
    let Some((cuda, _gpu)) = gpu("auto_mode_measures_the_card_and_warns_when_the_model_fits")
    else {
        return;
    };
    clear_calibration(&cuda);
    let model: Linear<B> = LinearConfig::new(1024, 1024).init(&resident(&cuda));
    let (model, report) = OffloadPolicy::from_bytes(u64::MAX).apply(model).unwrap();
    eprintln!("{report}");
    let c = report
        .calibration
        .clone()
        .expect("auto mode measures the card");
    assert!(
        c.copies_overlap_compute,
        "CUDA copies run on the copy engine"
    );
    assert_eq!(
        c.rows.first().map(|r| r.rows),
        Some(1),
        "pinned memory reads in place"
    );
    assert!(c.rows.iter().all(|r| r.rows <= MAX_ROWS));
    // Over PCIe or NVLink-C2C: between 1 and 1000 GB/s, whatever the card.
    assert!((1e9..1e12).contains(&c.upload_bytes_per_s), "{c:?}");
    // One row of a 1 MiB weight: the upload's fixed cost makes reading in place pay on any
    // card whose kernel reads host memory at half the DMA rate or better.
    assert!(
        c.rows[0].zero_copy_bytes_per_s > 0.5 * c.upload_bytes_per_s,
        "{c}"
    );
    assert!(c.prefers_zero_copy(1, 1 << 20), "{c}");
    let memory = report.device_memory.expect("the card reports its memory");
    assert!(memory.free <= memory.total && memory.total > 1 << 30);
    // 4 MiB fit in any card's free memory: offloading them is pointless, and `apply` says so.
    assert!(
        report.warnings.iter().any(|w| w.contains("fit in the")),
        "{:?}",
        report.warnings
    );
    let x = Tensor::<B, 2>::from_data(
        TensorData::new(values(1024, 5), [1, 1024]),
        &resident(&cuda),
    );
    reset_op_stats();
    let _ = model.forward(x).into_data();
    // The op follows the calibration's decision for this weight (4 MiB) and row count.
    assert_eq!(
        op_stats().zero_copy_ops,
        u64::from(c.prefers_zero_copy(1, 4 << 20)),
        "{c}"
    );
    clear_calibration(&cuda);
}

/// Same seed, same weights on CUDA, fused and unfused: a lazily initialised model whose
/// parameters a policy offloads has bit for bit the weights of the wrapped backend alone.
#[test]
fn same_seed_same_weights() {
    let Some((cuda, _gpu)) = gpu("same_seed_same_weights") else {
        return;
    };
    fn check<Bk: OffloadTarget<Device = CudaDevice>>(cuda: &CudaDevice, name: &str) {
        const SEED: u64 = 11;
        Bk::seed(cuda, SEED);
        let plain = common::values(&common::Net::<Bk>::new(cuda));
        let device = OffloadDevice::Device(cuda.clone());
        for mode in common::MODES {
            <OffloadBackend<Bk> as Backend>::seed(&device, SEED);
            let (net, report) = OffloadPolicy::from_bytes(common::NET_BYTES / 2)
                .mode(mode)
                .apply(common::Net::<OffloadBackend<Bk>>::new(&device))
                .unwrap();
            assert!(report.offloaded_tensors() > 0, "{name} {mode}");
            assert_eq!(common::values(&net), plain, "{name} {mode}");
        }
    }
    check::<R>(&cuda, "CudaBackend");
    check::<burn_cuda::Cuda>(&cuda, "burn::backend::Cuda");
}

// ---------------------------------------------------------------------------------------------
// Quantized weights read in place: `qmatmul_host.cu` and `qgather_host.cu`
// ---------------------------------------------------------------------------------------------

/// Every scheme the in-place kernels take, by value, level, scales and store: the presets,
/// burn-ndarray's native q8, tensor-level scales, 2-bit values (blocks of 32 and of 16).
fn quantized_schemes() -> Vec<QuantScheme> {
    let packed = |value, level, param| {
        QuantScheme::default()
            .with_value(value)
            .with_level(level)
            .with_param(param)
            .with_store(QuantStore::PackedU32(0))
    };
    vec![
        QuantPreset::Q8.scheme(),
        QuantPreset::Q4.scheme(),
        QuantScheme::default()
            .with_value(QuantValue::Q8S)
            .with_level(QuantLevel::block([32]))
            .with_param(QuantParam::F32)
            .with_store(QuantStore::Native),
        packed(QuantValue::Q8F, QuantLevel::Tensor, QuantParam::F32),
        packed(QuantValue::Q4F, QuantLevel::Tensor, QuantParam::F32),
        packed(QuantValue::Q4S, QuantLevel::block([64]), QuantParam::BF16),
        packed(QuantValue::Q2S, QuantLevel::block([32]), QuantParam::BF16),
        packed(QuantValue::Q2F, QuantLevel::block([16]), QuantParam::F16),
    ]
}

/// A quantized `dims` weight in pinned host memory (Burn's packed bytes, encoded on the CPU
/// with the library's codec), read as `dtype`, and its dequantized values (row-major, f32).
fn quantized_host(
    cuda: &CudaDevice,
    dims: [usize; 2],
    scheme: QuantScheme,
    dtype: DType,
    seed: u64,
) -> (HostTensor, Vec<f32>) {
    let weights = values(dims[0] * dims[1], seed);
    let bytes = quant::encode(&weights, &dims, &scheme, None).expect("encodable scheme");
    let mut buffer = cuda::alloc_pinned(cuda.index, bytes.len()).expect("pinned allocation");
    buffer.as_mut_slice().copy_from_slice(&bytes);
    let host = HostTensor::new(buffer, dims.to_vec(), DType::QFloat(scheme))
        .and_then(|h| h.read_as(Some(dtype)))
        .expect("a quantized host tensor");
    let dequantized = quant::decode(&bytes, &dims, &scheme).expect("decodable");
    (host, dequantized)
}

/// Rows of `x`: one decode token, below and at the 8-row pass, past it, the most there is.
const QUANTIZED_ROWS: [usize; 5] = [1, 7, 8, 9, MAX_ROWS];

/// `[K, N]`: odd K with tiles that do not fill N (split-K), a square 4096 one (16M values),
/// a tiny one (one tile, no split). N is a multiple of every block size above.
const QUANTIZED_SHAPES: [[usize; 2]; 3] = [[1000, 1088], [4096, 4096], [64, 128]];

/// The kernels alone, through their launchers, against an exact (f64) product of `x` and the
/// dequantized weight: every scheme, `f32`/`f16`/`bf16` activations, 1 to 16 rows (2-bit
/// values: up to 8, more are refused: the copy path), split-K and not; then a plan that does
/// not fit its operands is refused before anything is launched.
#[test]
fn quantized_matmul_matches_the_exact_product() {
    let Some((cuda, _gpu)) = gpu("quantized_matmul_matches_the_exact_product") else {
        return;
    };
    for (s, scheme) in quantized_schemes().into_iter().enumerate() {
        let name = quant::scheme_name(&scheme);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (c, [k, n]) in QUANTIZED_SHAPES.into_iter().enumerate() {
                let started = std::time::Instant::now();
                let seed = 1000 + 10 * s as u64 + c as u64;
                let (host, w) = quantized_host(&cuda, [k, n], scheme, dtype, seed);
                let bits = quant_ops::quant_read(&host).expect("supported scheme").bits;
                let (_, x) = rounded(values(MAX_ROWS * k, seed + 1), [MAX_ROWS, k], dtype);
                let exact = Exact::new(&x, &w, [MAX_ROWS, k, n]);
                for m in QUANTIZED_ROWS {
                    let ctx = format!("{name} {dtype:?} [{m}, {k}] x [{k}, {n}]");
                    let lhs = TensorData::new(x[..m * k].to_vec(), [m, k]).convert_dtype(dtype);
                    let lhs = Tensor::<R, 2>::from_data(lhs, (&cuda, dtype))
                        .into_primitive()
                        .tensor();
                    let Some(plan) = quant_ops::qmatmul_plan(&[m, k], dtype, &host) else {
                        assert!(bits == 2 && m > 8, "{ctx}: no in-place plan");
                        continue;
                    };
                    let out = quant_ops::qmatmul_host(lhs, &host, plan).expect(&ctx);
                    let got = read(
                        Tensor::<R, 2>::from_primitive(TensorPrimitive::Float(out)),
                        dtype,
                    );
                    let e = exact.error(&got, m);
                    assert!(
                        e <= tol(dtype, false),
                        "{ctx}: off by {e:.2e} of Σ|x·w| from the exact product (> {:.1e})",
                        tol(dtype, false)
                    );
                }
                // Another dtype or more rows than the plan was made for: refused, not launched.
                let plan = quant_ops::qmatmul_plan(&[1, k], dtype, &host).expect("one row");
                let lhs = Tensor::<R, 2>::from_data(
                    TensorData::new(x[..2 * k].to_vec(), [2, k]).convert_dtype(dtype),
                    (&cuda, dtype),
                );
                let refused = quant_ops::qmatmul_host(lhs.into_primitive().tensor(), &host, plan);
                assert!(
                    matches!(refused, Err(cuda::CudaError::InvalidArgument { .. })),
                    "{name}: a plan for another shape must be refused: {refused:?}"
                );
                eprintln!(
                    "{name} {dtype:?} [{k}, {n}] checked in {:.2?}",
                    started.elapsed()
                );
            }
        }
    }
}

/// The gather alone, through its launcher: only the requested rows, dequantized exactly as the
/// library's codec does (`q · scale` in f32, rounded once to the read dtype), for every scheme,
/// read dtype and id dtype (the plain backend's i32, and i64).
#[test]
fn quantized_gather_matches_the_dequantized_rows() {
    let Some((cuda, _gpu)) = gpu("quantized_gather_matches_the_dequantized_rows") else {
        return;
    };
    let dims = [1003, 1088];
    // First and last rows, repeats.
    let ids: Vec<i64> = vec![0, 1002, 5, 5, 999, 17, 400, 0, 1, 1002, 123, 64];
    for (s, scheme) in quantized_schemes().into_iter().enumerate() {
        let name = quant::scheme_name(&scheme);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (host, _) = quantized_host(&cuda, dims, scheme, dtype, 2000 + s as u64);
            let bytes = host
                .contiguous_bytes()
                .expect("quantized memory is contiguous");
            let rows = ids.iter().map(|&id| id as usize);
            let expected = quant::decode_rows(bytes, &dims, &scheme, rows).expect("decodable");
            let expected: Vec<f32> = TensorData::new(expected, [ids.len(), dims[1]])
                .convert_dtype(dtype)
                .iter::<f32>()
                .collect();
            for id_dtype in [DType::I32, DType::I64] {
                let ctx = format!("{name} read as {dtype:?}, {id_dtype:?} ids");
                let data = TensorData::new(ids.clone(), [ids.len()]).convert_dtype(id_dtype);
                let ids = Tensor::<R, 1, Int>::from_data(data, &cuda).into_primitive();
                if ids.dtype != id_dtype {
                    continue; // the plain backend keeps its own int dtype
                }
                assert!(quant_ops::qgather_supported(&host, ids.dtype), "{ctx}");
                let out = quant_ops::qgather_host(&host, ids).expect(&ctx);
                let got = read(
                    Tensor::<R, 2>::from_primitive(TensorPrimitive::Float(out)),
                    dtype,
                );
                assert!(
                    got == expected,
                    "{ctx}: rows differ from the dequantized table"
                );
            }
        }
    }
}

/// Median seconds of `runs` timed calls of `f` (after one untimed one), each synchronised.
fn median_seconds(cuda: &CudaDevice, runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    cuda::sync(cuda).unwrap();
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let started = std::time::Instant::now();
            f();
            cuda::sync(cuda).unwrap();
            started.elapsed().as_secs_f64()
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[runs / 2]
}

/// The in-place quantized matmul (1 and 16 rows, f32 and bf16 activations) against the
/// kernel-read bound: the packed bytes over the rate at which the SM copy kernel
/// (`cuda::upload_sm_copy`, what every in-place kernel's reads are measured against) reads the
/// same pinned buffer. Prints the fraction (the goal is >= 0.91) and fails only below 0.5.
#[test]
fn quantized_matmul_rate_against_the_kernel_read_bound() {
    let Some((cuda, _gpu)) = gpu("quantized_matmul_rate_against_the_kernel_read_bound") else {
        return;
    };
    let [k, n] = [8192, 4096];
    for preset in [QuantPreset::Q4, QuantPreset::Q8] {
        for dtype in [DType::F32, DType::BF16] {
            let (host, _) = quantized_host(&cuda, [k, n], preset.scheme(), dtype, 77);
            let bytes = host.size_bytes();
            let read_s = median_seconds(&cuda, 5, || {
                drop(cuda::upload_sm_copy(&cuda, host.buffer(), 0..bytes).unwrap())
            });
            for m in [1, MAX_ROWS] {
                let x = TensorData::new(values(m * k, 5), [m, k]).convert_dtype(dtype);
                let x = Tensor::<R, 2>::from_data(x, (&cuda, dtype));
                let plan = quant_ops::qmatmul_plan(&[m, k], dtype, &host).expect("a plan");
                let matmul_s = median_seconds(&cuda, 5, || {
                    let lhs = x.clone().into_primitive().tensor();
                    drop(quant_ops::qmatmul_host(lhs, &host, plan.clone()).unwrap())
                });
                let fraction = read_s / matmul_s;
                eprintln!(
                    "{preset} {dtype:?} [{m}, {k}] x [{k}, {n}]: {bytes} packed bytes, kernel \
                     read {:.1} GB/s, in-place matmul {:.1} GB/s: {fraction:.3} of the \
                     kernel-read bound (goal >= 0.91)",
                    bytes as f64 / read_s / 1e9,
                    bytes as f64 / matmul_s / 1e9
                );
                assert!(
                    fraction >= 0.5,
                    "{preset} {dtype:?} {m} rows: {fraction:.3} of the kernel-read bound"
                );
            }
        }
    }
}

/// An embedding and two linear layers whose weights blocks of 32 tile.
#[derive(Module, Debug)]
struct QStack<B: Backend> {
    embed: Embedding<B>,
    up: Linear<B>,
    down: Linear<B>,
}

impl<B: Backend> QStack<B> {
    fn seeded(device: &B::Device, seed: u64) -> Self {
        B::seed(device, seed);
        Self {
            embed: EmbeddingConfig::new(1000, 512).init(device),
            up: LinearConfig::new(512, 1024).init(device),
            down: LinearConfig::new(1024, 512).init(device),
        }
    }

    fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = self.embed.forward(ids);
        self.down.forward(relu(self.up.forward(x)))
    }
}

/// A float model holding the dequantized weights of the resident quantized `model` (Burn's
/// `dequantize`).
fn dequantized<Bk: Backend>(model: QStack<Bk>) -> QStack<Bk> {
    struct Dequantize;
    impl<Bk: Backend> burn::module::ModuleMapper<Bk> for Dequantize {
        fn map_float<const N: usize>(
            &mut self,
            param: Param<Tensor<Bk, N>>,
        ) -> Param<Tensor<Bk, N>> {
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, tensor.dequantize(), mapper)
        }
    }
    // Nothing of `model` is offloaded (a budget of 0): the dequantized weights are resident.
    model.map(&mut Dequantize)
}

/// A quantized model on Burn's CUDA backends (`T`: fused `burn::backend::Cuda` or the unfused
/// `CudaBackend`): offloaded in `uva`, its embedding and both linears read the packed weights
/// in place and agree with Burn's own resident quantized model and with the dequantized float
/// model within 1e-2 of the largest output (Burn's GEMM may run f32 as TF32); in `copy` the
/// packed bytes are uploaded and dequantized by Burn: bit for bit the dequantized model's result
/// on the unfused backend (the same kernels), within 1e-5 on the fused one (fusion may fuse the
/// dequantization into the matmul).
fn quantized_model<T: OffloadTarget<Device = CudaDevice>>(test: &str, fused: bool) {
    let Some((cuda, _gpu)) = gpu(test) else {
        return;
    };
    let device = resident(&cuda);
    let ids = TensorData::new(vec![3i64, 999, 42, 0, 512], [1, 5]);
    let run = |model: &QStack<OffloadBackend<T>>| -> Vec<f32> {
        read(
            model.forward(Tensor::from_data(ids.clone(), &device)),
            DType::F32,
        )
    };
    let native_q8 = QuantScheme::default()
        .with_value(QuantValue::Q8S)
        .with_level(QuantLevel::block([32]))
        .with_param(QuantParam::F32)
        .with_store(QuantStore::Native);
    for scheme in [
        QuantPreset::Q8.scheme(),
        QuantPreset::Q4.scheme(),
        native_q8,
    ] {
        let name = quant::scheme_name(&scheme);
        let seeded = || QStack::<OffloadBackend<T>>::seeded(&device, 11);
        let (burn_quantized, _) = OffloadPolicy::from_bytes(0)
            .quantize(Quantization::new(scheme))
            .apply(seeded())
            .expect("valid policy");
        let burn_out = run(&burn_quantized);
        let reference = run(&dequantized(burn_quantized));
        for mode in MODES {
            let ctx = format!("{name} in {mode} mode (fused: {fused})");
            let (model, report) = OffloadPolicy::from_bytes(u64::MAX)
                .min_tensor_bytes(16 << 10)
                .mode(mode)
                .quantize(Quantization::new(scheme))
                .apply(seeded())
                .expect("valid policy");
            assert_eq!(report.offloaded_tensors(), 3, "{ctx}: the three weights");
            reset_op_stats();
            let got = run(&model);
            let stats = op_stats();
            match mode {
                OffloadMode::Uva => {
                    assert_eq!(
                        (stats.zero_copy_ops, stats.transient_uploads),
                        (3, 0),
                        "{ctx}: every weight read in place: {stats:?}"
                    );
                    assert_near(&format!("{ctx} vs dequantized"), &got, &reference, 1e-2);
                    assert_near(&format!("{ctx} vs Burn's quantized"), &got, &burn_out, 2e-2);
                }
                _ => {
                    assert_eq!(stats.zero_copy_ops, 0, "{ctx}: {stats:?}");
                    if fused {
                        assert_near(&ctx, &got, &reference, 1e-5);
                    } else {
                        assert!(
                            got == reference,
                            "{ctx}: not bit for bit the dequantized model"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn quantized_model_matches_burn() {
    quantized_model::<CudaBackend>("quantized_model_matches_burn", false);
}

#[test]
fn quantized_model_matches_burn_fused() {
    quantized_model::<burn_cuda::Cuda>("quantized_model_matches_burn_fused", true);
}
