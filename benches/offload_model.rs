//! A whole LLaMA model with part of its weights offloaded, against plain burn-cuda and the
//! card's transfer limits, on one CUDA device in one run (feature `cuda`).
//!
//! `cargo bench --features cuda --bench offload_model` prints the card's name and, measured in
//! the same run, the two physical limits (256 MiB from pinned host memory, median GB/s): the
//! copy engine's DMA (`cuda::upload_dma`) and a kernel reading host-mapped memory
//! (`cuda::upload_sm_copy`, what the zero-copy kernels do). Then, for the `1b` and `7b`
//! presets of `examples/llama/model.rs` with bf16 weights:
//! - `plain`: `burn::backend::Cuda<bf16>` as Burn defines it (fused: what users run today),
//!   every weight resident; with `MODEL_BENCH_FUSION=off`, `CudaBackend<bf16>` (burn-cuda
//!   without fusion) instead, for the whole run;
//! - `offload 0%`: `OffloadBackend<` that backend `>` with nothing offloaded (the decorator);
//! - `offload F% <mode>`: `OffloadPolicy::from_bytes(F × total weight bytes)` (the offloaded
//!   bytes reported are the `OffloadReport`'s: whole tensors, so a little more than F), read in
//!   `uva`, `copy`, `prefetch` (default lookahead, CubeCL's copies) and `prefetch-engine` mode
//!   (the same lookahead through the copy engine's ring, `prefetch:engine`); after the table, a
//!   line per `prefetch`/`prefetch-engine` pair says which is faster. The modes are switched on the same
//!   offloaded weights with `OffloadContext::adopt_module`; the policy is applied once per
//!   fraction;
//!
//! - `q8 resident`, `q4 resident`, `q8 100% <mode>`, `q4 100% <mode>` (`MODEL_BENCH_QUANT`,
//!   default `q8,q4`; `none` for none): the same weights quantized (`Quantization::preset`,
//!   `q8s/b32/f16` and `q4s/b32/f16`; norms stay bf16) by Burn's kernels on the device, once
//!   resident and once with every parameter offloaded (packed values and scales in pinned
//!   memory), read in `copy`, `uva` and `prefetch` mode;
//!
//! each for three workloads: one decode step at batch 1 and at batch 8 (after a KV cache of 32
//! positions of random keys and values; every sample decodes the same position from a clone of
//! that cache), and a
//! prefill of 512 tokens at batch 1. It prints one markdown table: median ms per step (one
//! decode step, i.e. one token per sequence, or the whole prefill), the run-to-run spread of
//! the samples ((max - min) / median: what a "costs nothing" claim is within), tokens/s, the
//! ratio to `plain`, the lower bound and the efficiency `bound / measured`:
//! - `bound = max(plain, uploaded bytes / DMA GB/s + bytes read in place / kernel-read GB/s)`,
//!   with the bytes the last sample actually moved (its op stats: transient uploads and
//!   zero-copy reads), and the DMA rate measured in this run at exactly the sizes this
//!   variant offloads (one upload of each of the model's tensor sizes, timed: the bytes over
//!   the sum of the offloaded tensors' times);
//! - for `uva` at batch 1 also `uva bound = max(plain, offloaded bytes / kernel-read GB/s)`;
//! - for quantized rows the bytes are the packed ones the op stats count (bytes/step: the
//!   `moved GB` column, and `moved / bf16` against the bf16 row offloaded as far in the same
//!   mode), the DMA rate is measured at the packed sizes, and `plain` in the bounds is the
//!   same quantized weights resident (`qN resident`: the dequantization's cost included).
//!
//! Same weights, checked: the offloaded models are `policy.apply` of clones of one
//! materialised, resident `OffloadBackend` model (the policy moves the selected parameters to
//! pinned host memory). Per fraction `copy` runs first and its logits (the last sample of each
//! workload) are compared with the resident model's (= `offload 0%`): max |difference| within
//! 5 % of the largest |logit| (bf16). `prefetch` must then equal `copy` **bit for bit** (the
//! same kernels on the same bytes), and `uva` (other kernels) must match `copy` within the
//! tolerance; argmax agreement reported. Quantized: `copy` against the resident quantized
//! model's logits, `uva` and `prefetch` against `copy` as above. A failed check exits 1 after the table and the JSON
//! are written. (The `plain` model has its own random weights.)
//!
//! Timing: every sample runs from an idle stream to the end of a stream sync (`cuda::sync`);
//! `queued ms` is the median time until the step had been queued (before the sync): close to
//! `ms/step` it says the host side set the pace (the op thread, or CubeCL's device thread,
//! which also runs the prefetch copies' tasks; a caller waits for it once two batches of 32
//! tasks are queued), far below it that the device did. Prefetch rows also print the prefetch
//! counters (`PrefetchStats`, over the warm-ups and samples): the time the prefetch thread
//! spent queueing its copies (long: CubeCL's device thread was busy or blocked) and the time
//! requests waited for a copy being queued;
//! 2 warm-up runs first (prefetch mode learns its read cycle, CubeCL autotunes), then the median
//! of `MODEL_BENCH_SAMPLES` samples (default 5; at most 3 when a warm step took over 0.2 s, 1
//! over 1 s). Memory stays bounded: the plain model is dropped before the offloaded ones are
//! built, each fraction's offloaded clone is dropped (and its pinned memory freed) before the
//! next one.
//!
//! Environment: `MODEL_BENCH_JSON=path` also writes everything as JSON (rewritten after each
//! preset, so a killed run leaves the finished presets); `MODEL_BENCH_SAMPLES` (default 5);
//! `MODEL_BENCH_PRESETS` (default `1b,7b`); `MODEL_BENCH_FRACTIONS` (default `0,0.25,0.5,1`);
//! `MODEL_BENCH_FUSION` (`on`, the default, or `off`: see `plain` above);
//! `MODEL_BENCH_BUDGET_S` (default 195): no measurement starts after that many seconds since
//! start, and each preset gets an equal share of what is left when it starts (so a slow `1b`
//! cannot starve `7b`); the skipped ones are listed, so the table still comes out under a 240 s
//! limit.
//! Without a CUDA driver it prints why and exits 0.
//!
//! Run time. Per preset 11 variants × 3 workloads, each 2 + (1..=5) forwards: for `1b` on an
//! H100, 16 s of its 246 s run was everything but the first warm-ups. What dominates a cold run is
//! CubeCL's tuning of every new matmul shape, 10 to 13 s a shape there: `1b` took 246 s, 228 s
//! of it tuning (the set-up then still ran a 32-token prompt at batch 1 and 8, two more shapes,
//! which the random caches now avoid: 121.6 s of set-up; the first 512-token prefill 93 s).
//! CubeCL keeps its tuning results in `target/autotune/` for the next process. `1b` has a tied LM head: its copy
//! (copy and prefetch mode, and the 512-row prefill in uva mode) is a transposed view of the
//! embedding, uploaded as the contiguous table in one DMA and transposed on the device.

#[path = "../examples/llama/model.rs"]
mod model;

mod cuda_common;

use std::error::Error;
use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData, bf16};
use burn_offload::cuda::{self, CudaError, driver};
use burn_offload::quant::{QuantPreset, scheme_name};
use burn_offload::{
    CudaBackend, OffloadBackend, OffloadContext, OffloadDevice, OffloadMode, OffloadPolicy,
    OpStats, PrefetchCopies, PrefetchStats, Quantization, op_stats, prefetch_stats, reset_op_stats,
    reset_prefetch_stats,
};
use cubecl::cuda::CudaDevice;
use cuda_common::{MIB, WARMUP, env_usize, limits, median, median_timed, timed, timed_queued};
use model::{Cache, Llama, LlamaConfig};
use serde_json::{Value, json};

/// Burn's CUDA backend as users write it (`burn::backend::Cuda`, fused), bf16.
type Fused = burn_cuda::Cuda<bf16, i32>;
/// burn-cuda without fusion, bf16 (`MODEL_BENCH_FUSION=off`).
type Unfused = CudaBackend<bf16>;

/// Seed of the random weights (each model is initialised after seeding).
const SEED: u64 = 5;
/// Prompt tokens in the KV cache before a decode step.
const PROMPT: usize = 32;
/// Tokens of the prefill workload.
const PREFILL: usize = 512;
/// A warm step slower than this gets at most 3 samples; slower than `VERY_SLOW_STEP_S`, 1.
const SLOW_STEP_S: f64 = 0.2;
const VERY_SLOW_STEP_S: f64 = 1.0;
/// Largest |logit difference| accepted, relative to the largest |logit| (bf16 rounding).
const CHECK_TOLERANCE: f32 = 5e-2;

type BenchResult<T> = Result<T, Box<dyn Error>>;

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Reads every parameter once, which initialises the lazy ones where they are placed.
struct Materialize;

impl<Bk: Backend> ModuleVisitor<Bk> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
        black_box(param.val());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Decode1,
    Decode8,
    Prefill,
}

impl Workload {
    const ALL: [Self; 3] = [Self::Decode1, Self::Decode8, Self::Prefill];

    fn name(self) -> String {
        match self {
            Self::Decode1 => "decode b1".into(),
            Self::Decode8 => "decode b8".into(),
            Self::Prefill => format!("prefill {PREFILL}"),
        }
    }

    fn batch(self) -> usize {
        match self {
            Self::Decode1 | Self::Prefill => 1,
            Self::Decode8 => 8,
        }
    }

    /// Tokens one step produces (decode: one per sequence) or processes (prefill).
    fn tokens(self) -> usize {
        match self {
            Self::Decode1 | Self::Decode8 => self.batch(),
            Self::Prefill => PREFILL,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Deterministic token ids `[batch, len]`.
fn ids<Bk: Backend>(
    batch: usize,
    len: usize,
    vocab: usize,
    salt: u64,
    device: &Bk::Device,
) -> Tensor<Bk, 2, Int> {
    let values: Vec<i64> = (0..(batch * len) as u64)
        .map(|i| ((i * 7919 + salt * 104_729 + 17) % vocab as u64) as i64)
        .collect();
    Tensor::from_data(TensorData::new(values, [batch, len]), device)
}

/// The inputs of the workloads: token ids, and KV caches of `PROMPT` positions of random keys
/// and values. Built once per backend, so every offloaded variant decodes from the same cache.
struct Inputs<Bk: Backend> {
    /// `(next token, cache)` for batch 1 and batch 8.
    decode: [(Tensor<Bk, 2, Int>, Cache<Bk>); 2],
    prefill: Tensor<Bk, 2, Int>,
}

impl<Bk: Backend> Inputs<Bk> {
    fn new(model: &Llama<Bk>, vocab: usize, device: &Bk::Device) -> Self {
        // Random keys and values rather than a prompt's: a prompt forward would run two more
        // shapes (batch x 32 rows) through every matmul, and CubeCL tunes each new shape
        // (10 to 13 s each on an H100).
        let decode = [1, 8].map(|batch| {
            let cache = Cache::random(model, batch, PROMPT, device);
            (ids::<Bk>(batch, 1, vocab, 2, device), cache)
        });
        Self {
            decode,
            prefill: ids::<Bk>(1, PREFILL, vocab, 3, device),
        }
    }

    /// One step of `workload`: logits `[batch, vocab]` of the last position.
    fn run(&self, model: &Llama<Bk>, workload: Workload) -> Tensor<Bk, 2> {
        match workload {
            Workload::Decode1 | Workload::Decode8 => {
                let (next, cache) = &self.decode[usize::from(workload == Workload::Decode8)];
                model.forward_last(next.clone(), &mut cache.clone())
            }
            Workload::Prefill => {
                model.forward_last(self.prefill.clone(), &mut Cache::for_model(model))
            }
        }
    }
}

/// One measured workload.
struct Measured {
    median_s: f64,
    samples_s: Vec<f64>,
    /// Per sample: seconds until the step had been queued (before the sync).
    queued_s: Vec<f64>,
    queued_median_s: f64,
    warmup_s: Vec<f64>,
    /// Logits of the last sample, `[batch, vocab]` row-major.
    logits: Vec<f32>,
    /// What the last sample's ops did.
    stats: OpStats,
    /// Prefetch counters over the warm-ups and samples.
    prefetch: PrefetchStats,
}

/// `WARMUP` runs of `step`, then the median of up to `samples` (fewer for slow steps).
fn measure<Bk: Backend>(
    cuda: &CudaDevice,
    samples: usize,
    mut step: impl FnMut() -> Tensor<Bk, 2>,
) -> Result<Measured, CudaError> {
    let mut out = None;
    let mut run = || out = Some(step());
    reset_prefetch_stats();
    let warmup_s = (0..WARMUP)
        .map(|_| timed(cuda, &mut run))
        .collect::<Result<Vec<_>, _>>()?;
    let warm = warmup_s.iter().copied().fold(f64::INFINITY, f64::min);
    let n = if warm > VERY_SLOW_STEP_S {
        1
    } else if warm > SLOW_STEP_S {
        samples.min(3)
    } else {
        samples
    };
    let mut samples_s = Vec::with_capacity(n);
    let mut queued_s = Vec::with_capacity(n);
    for i in 0..n {
        if i + 1 == n {
            reset_op_stats();
        }
        let (queued, total) = timed_queued(cuda, &mut run)?;
        queued_s.push(queued);
        samples_s.push(total);
    }
    let stats = op_stats();
    let prefetch = prefetch_stats();
    let logits = out
        .expect("the step ran")
        .into_data()
        .iter::<f32>()
        .collect();
    Ok(Measured {
        median_s: median(samples_s.clone()),
        samples_s,
        queued_median_s: median(queued_s.clone()),
        queued_s,
        warmup_s,
        logits,
        stats,
        prefetch,
    })
}

/// An offloaded variant's logits against a reference run's: the resident model's (within
/// the bf16 tolerance) for `copy`, the `copy` run's for `uva` (within the tolerance: other
/// kernels) and `prefetch` (bit for bit: the same kernels on the same bytes).
#[derive(Debug, Clone, Copy)]
struct Check {
    /// `resident` or `copy`.
    against: &'static str,
    /// Bit-for-bit equality asked for.
    exact: bool,
    max_abs_diff: f32,
    max_abs_logit: f32,
    argmax_equal: usize,
    rows: usize,
    ok: bool,
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

fn check(logits: &[f32], reference: &Reference<'_>, batch: usize, workload: Workload) -> Check {
    let (against, exact, reference) = (
        reference.against,
        reference.exact,
        &reference.logits[workload.index()][..],
    );
    let vocab = reference.len() / batch.max(1);
    let max_abs_logit = reference.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let finite = logits.iter().all(|v| v.is_finite());
    let max_abs_diff = logits
        .iter()
        .zip(reference)
        .fold(0.0f32, |a, (x, r)| a.max((x - r).abs()));
    let argmax_equal = logits
        .chunks(vocab)
        .zip(reference.chunks(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let same_bits = logits.len() == reference.len()
        && logits
            .iter()
            .zip(reference)
            .all(|(a, b)| a.to_bits() == b.to_bits());
    Check {
        against,
        exact,
        max_abs_diff,
        max_abs_logit,
        argmax_equal,
        rows: batch,
        ok: finite
            && logits.len() == reference.len()
            && if exact {
                same_bits
            } else {
                max_abs_diff <= CHECK_TOLERANCE * max_abs_logit
            },
    }
}

/// What a variant's logits are checked against.
struct Reference<'a> {
    against: &'static str,
    exact: bool,
    /// Per workload, the last sample's logits.
    logits: &'a [Vec<f32>; 3],
}

/// One row of the table (and of the JSON).
struct Row {
    preset: String,
    workload: Workload,
    variant: String,
    fraction: Option<f64>,
    mode: Option<OffloadMode>,
    offloaded_bytes: u64,
    offloaded_tensors: usize,
    /// `None`: skipped (time budget).
    measured: Option<Measured>,
    check: Option<Check>,
    /// GB/s of DMA uploads at this variant's offloaded tensor sizes, measured in this run
    /// (bytes over the sum of each tensor's measured upload time).
    dma_gbps: Option<f64>,
    /// Device memory in use (driver's view) after the measurement.
    device_used_bytes: Option<u64>,
    /// The weights' quantization (`None`: the model's float type, bf16).
    quant: Option<QuantPreset>,
}

/// What the table's columns are computed from.
struct Limits {
    /// 256 MiB DMA from pinned memory.
    dma_gbps: f64,
    kernel_read_gbps: f64,
    /// Seconds of one DMA upload of each size the models offload, measured in this run.
    dma_s_by_size: Vec<(u64, f64)>,
}

impl Limits {
    /// GB/s of DMA uploads of tensors of these sizes: their bytes over the sum of their
    /// measured upload times (`None` when a size was not measured).
    fn dma_gbps_for(&self, sizes: &[u64]) -> Option<f64> {
        let mut secs = 0.0;
        for &size in sizes {
            secs += self
                .dma_s_by_size
                .iter()
                .find(|(s, _)| *s == size)
                .map(|(_, t)| *t)?;
        }
        let bytes: u64 = sizes.iter().sum();
        (secs > 0.0).then(|| bytes as f64 / secs / 1e9)
    }
}

/// The bytes a variant's last sample moved over the bus: uploaded (transient copies) and read
/// in place (zero-copy kernels), from its op stats.
fn moved_bytes(m: &Measured) -> (u64, u64) {
    (m.stats.transient_upload_bytes, m.stats.zero_copy_bytes)
}

/// Seconds of one DMA upload (`cuda::upload_dma`, the copy path of `copy` mode) of each size:
/// one pinned buffer of the largest size, a warm-up, then the median of 3.
fn dma_by_size(cuda: &CudaDevice, sizes: &[u64]) -> Result<Vec<(u64, f64)>, CudaError> {
    let largest = sizes.iter().copied().max().unwrap_or(0) as usize;
    if largest == 0 {
        return Ok(Vec::new());
    }
    let host = std::sync::Arc::new(cuda::alloc_pinned(cuda.index, largest)?);
    let mut out = Vec::new();
    for &size in sizes {
        let secs = median_timed(cuda, 1, 3, &mut || {
            cuda::upload_dma(cuda, &host, 0..size as usize).map(drop)
        })?;
        out.push((size, secs));
    }
    drop(host);
    cuda::free_upload_sources(cuda)?;
    Ok(out)
}

impl Row {
    /// The `plain` row's median (float weights, nothing offloaded, no decorator).
    fn plain_s(&self, rows: &[Row]) -> Option<f64> {
        rows.iter()
            .find(|r| {
                r.preset == self.preset
                    && r.workload == self.workload
                    && r.fraction.is_none()
                    && r.quant.is_none()
            })
            .and_then(|r| r.measured.as_ref())
            .map(|m| m.median_s)
    }

    /// What the step costs without the bus: `plain` for float rows; for quantized rows the
    /// same quantized weights resident (its `qN resident` row: dequantization included).
    fn base_s(&self, rows: &[Row]) -> Option<f64> {
        if self.quant.is_none() {
            return self.plain_s(rows);
        }
        rows.iter()
            .find(|r| {
                r.preset == self.preset
                    && r.workload == self.workload
                    && r.fraction.is_none()
                    && r.quant == self.quant
            })
            .and_then(|r| r.measured.as_ref())
            .map(|m| m.median_s)
    }

    /// Bytes the last sample moved over the bus against those of the float row offloaded as
    /// far in the same mode (quantized rows only: packed bytes against bf16 ones).
    fn moved_vs_float(&self, rows: &[Row]) -> Option<f64> {
        self.quant?;
        let float = rows.iter().find(|r| {
            r.preset == self.preset
                && r.workload == self.workload
                && r.quant.is_none()
                && r.fraction == self.fraction
                && r.mode == self.mode
        })?;
        let (up, in_place) = moved_bytes(self.measured.as_ref()?);
        let (fup, fin) = moved_bytes(float.measured.as_ref()?);
        (fup + fin > 0).then(|| (up + in_place) as f64 / (fup + fin) as f64)
    }

    /// `max(base, uploaded bytes / DMA at these sizes + bytes read in place / kernel
    /// read)`, the bytes being those the last sample moved (a quantized row's are its packed
    /// bytes, at the DMA rate measured at the packed sizes); base = [`base_s`](Self::base_s).
    fn bound_s(&self, rows: &[Row], limits: &Limits) -> Option<f64> {
        let plain = self.base_s(rows)?;
        let (uploaded, in_place) = moved_bytes(self.measured.as_ref()?);
        let dma = self.dma_gbps.unwrap_or(limits.dma_gbps);
        let bus = uploaded as f64 / (dma * 1e9) + in_place as f64 / (limits.kernel_read_gbps * 1e9);
        Some(plain.max(bus))
    }

    /// Run-to-run spread of the samples: (max - min) / median.
    fn spread(&self) -> Option<f64> {
        let m = self.measured.as_ref()?;
        let max = m.samples_s.iter().copied().fold(f64::MIN, f64::max);
        let min = m.samples_s.iter().copied().fold(f64::MAX, f64::min);
        (m.samples_s.len() > 1).then(|| (max - min) / m.median_s)
    }

    /// `max(base, offloaded bytes / kernel read)`, for uva at batch 1.
    fn uva_bound_s(&self, rows: &[Row], limits: &Limits) -> Option<f64> {
        if self.mode != Some(OffloadMode::Uva) || self.workload != Workload::Decode1 {
            return None;
        }
        let plain = self.base_s(rows)?;
        Some(plain.max(self.offloaded_bytes as f64 / (limits.kernel_read_gbps * 1e9)))
    }

    fn json(&self, rows: &[Row], limits: &Limits) -> Value {
        let m = self.measured.as_ref();
        let median = m.map(|m| m.median_s);
        let bound = self.bound_s(rows, limits);
        json!({
            "preset": self.preset,
            "workload": self.workload.name(),
            "batch": self.workload.batch(),
            "tokens_per_step": self.workload.tokens(),
            "variant": self.variant,
            "quantization": self.quant.map(|q| scheme_name(&q.scheme())),
            "fraction": self.fraction,
            "mode": self.mode.map(|m| m.to_string()),
            "offloaded_bytes": self.offloaded_bytes,
            "offloaded_tensors": self.offloaded_tensors,
            "skipped": m.is_none().then_some("time budget (MODEL_BENCH_BUDGET_S)"),
            "median_s": median,
            "samples_s": m.map(|m| &m.samples_s),
            "queued_median_s": m.map(|m| m.queued_median_s),
            "queued_s": m.map(|m| &m.queued_s),
            "warmup_s": m.map(|m| &m.warmup_s),
            "tokens_per_s": median.map(|s| self.workload.tokens() as f64 / s),
            "ratio_to_plain": median.zip(self.plain_s(rows)).map(|(s, p)| s / p),
            "bound_s": bound,
            "efficiency": median.zip(bound).map(|(s, b)| b / s),
            "spread": self.spread(),
            "moved_vs_float": self.moved_vs_float(rows),
            "uploaded_bytes_last_sample": m.map(|m| moved_bytes(m).0),
            "read_in_place_bytes_last_sample": m.map(|m| moved_bytes(m).1),
            "dma_gbps_at_these_sizes": self.dma_gbps,
            "uva_bound_s": self.uva_bound_s(rows, limits),
            "check": self.check.map(|c| json!({
                "against": c.against, "bit_for_bit": c.exact,
                "max_abs_diff": c.max_abs_diff, "max_abs_logit": c.max_abs_logit,
                "argmax_equal": c.argmax_equal, "rows": c.rows, "ok": c.ok,
            })),
            "op_stats_last_sample": m.map(|m| json!(m.stats)),
            "prefetch_stats": m
                .filter(|_| matches!(self.mode, Some(OffloadMode::Prefetch { .. })))
                .map(|m| json!(m.prefetch)),
            "device_used_bytes": self.device_used_bytes,
        })
    }
}

/// The whole run's state.
struct Bench {
    cuda: CudaDevice,
    samples: usize,
    fractions: Vec<f64>,
    /// No measurement starts after this (the whole run's budget).
    deadline: Instant,
    /// The current preset's share of it: an equal part of what is left per preset left, so
    /// a slow preset cannot starve the next one (an early finish passes its rest on).
    preset_deadline: Instant,
    limits: Limits,
    rows: Vec<Row>,
    /// Quantizations measured after the float fractions (`MODEL_BENCH_QUANT`).
    quant: Vec<QuantPreset>,
    /// Wall-clock seconds of set-up sections (init, policy application), by name.
    sections: Vec<(String, f64)>,
    presets: Vec<Value>,
}

fn pct(fraction: f64) -> String {
    format!("{}%", (fraction * 1000.0).round() / 10.0)
}

fn device_used(cuda: &CudaDevice) -> Option<u64> {
    cuda::memory_info(cuda.index)
        .ok()
        .map(|(free, total)| total.saturating_sub(free))
}

impl Bench {
    fn out_of_time(&self) -> bool {
        Instant::now() >= self.preset_deadline.min(self.deadline)
    }

    /// Measures (or, past the deadline, skips) `workload` and adds its row.
    #[allow(clippy::too_many_arguments)]
    fn add<Bk: Backend>(
        &mut self,
        preset: &str,
        variant: &str,
        (fraction, mode): (Option<f64>, Option<OffloadMode>),
        (offloaded_bytes, offloaded_tensors): (u64, usize),
        workload: Workload,
        run: impl FnMut() -> Tensor<Bk, 2>,
        (reference, dma_gbps): (Option<&Reference<'_>>, Option<f64>),
    ) -> Result<(), CudaError> {
        let measured = if self.out_of_time() {
            None
        } else {
            Some(measure(&self.cuda, self.samples, run)?)
        };
        let check = measured
            .as_ref()
            .zip(reference)
            .map(|(m, r)| check(&m.logits, r, workload.batch(), workload));
        let row = Row {
            preset: preset.to_string(),
            workload,
            variant: variant.to_string(),
            fraction,
            mode,
            offloaded_bytes,
            offloaded_tensors,
            measured,
            check,
            dma_gbps,
            device_used_bytes: device_used(&self.cuda),
            quant: None,
        };
        match &row.measured {
            Some(m) => println!(
                "  {preset} {} {variant}: {:.3} ms, queued in {:.3} ms (medians of {}; warm-up \
                 {:.3?} s){}",
                workload.name(),
                m.median_s * 1e3,
                m.queued_median_s * 1e3,
                m.samples_s.len(),
                m.warmup_s,
                match row.check {
                    Some(c) if c.ok && c.exact =>
                        format!(", logits equal the {} run's bit for bit", c.against),
                    Some(c) if c.ok => format!(
                        ", logits match the {} run (max |diff| {:.3e} of {:.3e}, argmax {}/{})",
                        c.against, c.max_abs_diff, c.max_abs_logit, c.argmax_equal, c.rows
                    ),
                    Some(c) if c.exact => format!(
                        ", CHECK FAILED: logits differ from the {} run's (max |diff| {:.3e}, \
                         argmax {}/{}; bit-for-bit equality asked)",
                        c.against, c.max_abs_diff, c.argmax_equal, c.rows
                    ),
                    Some(c) => format!(
                        ", CHECK FAILED: max |logit diff| from the {} run {:.3e} > \
                         {CHECK_TOLERANCE} x {:.3e} (or non-finite logits), argmax {}/{}",
                        c.against, c.max_abs_diff, c.max_abs_logit, c.argmax_equal, c.rows
                    ),
                    None => String::new(),
                } + &match mode {
                    Some(OffloadMode::Prefetch { .. }) => {
                        let p = &m.prefetch;
                        format!(
                            "; prefetch over warm-ups and samples: {} hits, {} late, {} misses, \
                             {} releases, {} ring fills, copies queued in {:.1} ms, requests \
                             waited {:.1} ms",
                            p.hits,
                            p.late,
                            p.misses,
                            p.releases,
                            p.ring_fills,
                            p.upload_ns as f64 * 1e-6,
                            p.wait_ns as f64 * 1e-6
                        )
                    }
                    _ => String::new(),
                }
            ),
            None => println!(
                "  {preset} {} {variant}: skipped (time budget)",
                workload.name()
            ),
        }
        let _ = std::io::stdout().flush();
        self.rows.push(row);
        Ok(())
    }

    fn lap(&mut self, name: String, start: Instant) {
        self.sections.push((name, start.elapsed().as_secs_f64()));
    }

    /// One preset on `OffloadBackend<Plain>` against `Plain`.
    fn preset<Plain>(&mut self, name: &str) -> BenchResult<()>
    where
        Plain: burn_offload::inner::OffloadTarget<Device = cubecl::cuda::CudaDevice>,
    {
        type Off<P> = OffloadBackend<P>;
        let config = LlamaConfig::preset(name)?;
        println!(
            "\n{name}: {:.2} B parameters, {:.2} GB in bf16",
            config.num_params() as f64 / 1e9,
            config.num_params() as f64 * 2.0 / 1e9
        );
        if self.out_of_time() {
            println!("  skipped (time budget)");
            for w in Workload::ALL {
                self.skip(name, "plain", (None, None), w);
            }
            return Ok(());
        }
        let cuda = self.cuda.clone();
        let vocab = config.vocab_size;

        // Plain burn-cuda, all weights resident.
        let start = Instant::now();
        <Plain as Backend>::seed(&cuda, SEED);
        let plain: Llama<Plain> = config.init(&cuda);
        plain.visit(&mut Materialize);
        let inputs = Inputs::new(&plain, vocab, &cuda);
        cuda::sync(&cuda)?;
        self.lap(format!("{name}/plain_init"), start);
        for w in Workload::ALL {
            self.add(
                name,
                "plain",
                (None, None),
                (0, 0),
                w,
                || inputs.run(&plain, w),
                (None, None),
            )?;
        }
        drop(inputs);
        drop(plain);
        <Plain as Backend>::memory_cleanup(&cuda);
        cuda::free_upload_sources(&cuda)?;

        // OffloadBackend: one resident model, materialised once; each fraction offloads a
        // clone of it (same weights), so its logits can be compared with the resident ones.
        let start = Instant::now();
        let device = OffloadDevice::device(cuda.clone());
        <Off<Plain> as Backend>::seed(&device, SEED);
        let resident: Llama<Off<Plain>> = config.init(&device);
        resident.visit(&mut Materialize);
        let inputs = Inputs::new(&resident, vocab, &device);
        let resident_logits: [Vec<f32>; 3] =
            Workload::ALL.map(|w| inputs.run(&resident, w).into_data().iter::<f32>().collect());
        let (_, report) = OffloadPolicy::from_bytes(0).apply(resident.clone())?;
        let total = report.total_bytes();
        cuda::sync(&cuda)?;
        self.lap(format!("{name}/offload_init"), start);
        // The DMA time of every tensor size this model has, for the bounds.
        let start = Instant::now();
        let mut sizes: Vec<u64> = report.params.iter().map(|p| p.bytes).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let measured = dma_by_size(&cuda, &sizes)?;
        self.limits.dma_s_by_size.extend(measured);
        self.lap(format!("{name}/dma_by_size"), start);
        self.presets.push(json!({
            "preset": name, "params": config.num_params(), "weight_bytes": total,
            "tensors": report.params.len(),
        }));

        let prefetch = "prefetch".parse::<OffloadMode>().expect("a valid mode");
        // The same lookahead through the copy engine (issue #25): the row beside `prefetch`.
        let engine = "prefetch:engine"
            .parse::<OffloadMode>()
            .expect("a valid mode");
        for fraction in self.fractions.clone() {
            // `copy` first: its logits are the reference of `uva` and `prefetch`.
            let modes: &[OffloadMode] = if fraction == 0.0 {
                &[OffloadMode::Uva]
            } else {
                &[OffloadMode::Copy, OffloadMode::Uva, prefetch, engine]
            };
            if self.out_of_time() {
                for &mode in modes {
                    let (variant, mode) = variant_name(fraction, mode, None);
                    for w in Workload::ALL {
                        self.skip(name, &variant, (Some(fraction), mode), w);
                    }
                }
                continue;
            }
            let start = Instant::now();
            let policy = OffloadPolicy::from_bytes((fraction * total as f64).round() as u64)
                .mode(OffloadMode::Uva);
            let (model, report) = policy.apply(resident.clone())?;
            cuda::sync(&cuda)?;
            self.lap(format!("{name}/apply_{}", pct(fraction)), start);
            let offloaded = (report.offloaded_bytes(), report.offloaded_tensors());
            let offloaded_sizes: Vec<u64> = report.offloaded().map(|p| p.bytes).collect();
            let dma_gbps = self.limits.dma_gbps_for(&offloaded_sizes);
            println!(
                "  {}: {:.3} GB in {} of {} tensors offloaded ({:.1} s to move them)",
                pct(fraction),
                offloaded.0 as f64 / 1e9,
                offloaded.1,
                report.params.len(),
                start.elapsed().as_secs_f64()
            );
            self.read_modes::<Plain>(
                name,
                (fraction, None),
                (&model, &inputs),
                modes,
                (offloaded, dma_gbps),
                &resident_logits,
            )?;
            // The last mode's context (its prefetcher and copies) went with its model above.
            drop(model);
            cuda::free_upload_sources(&cuda)?;
            std::thread::sleep(burn_offload::prefetch::LIVENESS_CHECK);
        }

        // Quantized weights (issue #23): the same bf16 weights quantized by Burn's kernels on
        // the device, once resident (the base of the bound) and once with every parameter
        // offloaded (packed, in pinned memory), read in each mode.
        for quant in self.quant.clone() {
            let modes = [OffloadMode::Copy, OffloadMode::Uva, prefetch];
            if self.out_of_time() {
                let resident_variant = format!("{quant} resident");
                for w in Workload::ALL {
                    self.skip(name, &resident_variant, (None, None), w);
                    self.rows.last_mut().expect("added").quant = Some(quant);
                }
                for mode in modes {
                    let (variant, mode) = variant_name(1.0, mode, Some(quant));
                    for w in Workload::ALL {
                        self.skip(name, &variant, (Some(1.0), mode), w);
                        self.rows.last_mut().expect("added").quant = Some(quant);
                    }
                }
                continue;
            }
            let start = Instant::now();
            let quantization = Quantization::preset(quant);
            let (q_resident, _) = OffloadPolicy::from_bytes(0)
                .quantize(quantization.clone())
                .apply(resident.clone())?;
            let q_logits: [Vec<f32>; 3] = Workload::ALL.map(|w| {
                inputs
                    .run(&q_resident, w)
                    .into_data()
                    .iter::<f32>()
                    .collect()
            });
            let (q_offloaded, report) = OffloadPolicy::from_bytes(u64::MAX)
                .mode(OffloadMode::Uva)
                .quantize(quantization)
                .apply(resident.clone())?;
            cuda::sync(&cuda)?;
            self.lap(format!("{name}/quantize_{quant}"), start);
            // The DMA time of the packed sizes, for the bound.
            let start = Instant::now();
            let mut sizes: Vec<u64> = report
                .params
                .iter()
                .map(|p| p.bytes)
                .filter(|b| !self.limits.dma_s_by_size.iter().any(|(s, _)| s == b))
                .collect();
            sizes.sort_unstable();
            sizes.dedup();
            let measured = dma_by_size(&cuda, &sizes)?;
            self.limits.dma_s_by_size.extend(measured);
            self.lap(format!("{name}/dma_by_size_{quant}"), start);
            let offloaded = (report.offloaded_bytes(), report.offloaded_tensors());
            let offloaded_sizes: Vec<u64> = report.offloaded().map(|p| p.bytes).collect();
            let dma_gbps = self.limits.dma_gbps_for(&offloaded_sizes);
            println!(
                "  {quant} ({}): {:.3} GB packed in {} of {} tensors, all offloaded",
                scheme_name(&quant.scheme()),
                offloaded.0 as f64 / 1e9,
                offloaded.1,
                report.params.len(),
            );
            let resident_variant = format!("{quant} resident");
            for w in Workload::ALL {
                self.add(
                    name,
                    &resident_variant,
                    (None, None),
                    (0, 0),
                    w,
                    || inputs.run(&q_resident, w),
                    (None, None),
                )?;
                self.rows.last_mut().expect("added").quant = Some(quant);
            }
            drop(q_resident);
            self.read_modes::<Plain>(
                name,
                (1.0, Some(quant)),
                (&q_offloaded, &inputs),
                &modes,
                (offloaded, dma_gbps),
                &q_logits,
            )?;
            drop(q_offloaded);
            <Off<Plain> as Backend>::memory_cleanup(&device);
            cuda::free_upload_sources(&cuda)?;
            std::thread::sleep(burn_offload::prefetch::LIVENESS_CHECK);
        }
        drop(inputs);
        drop(resident);
        <Off<Plain> as Backend>::memory_cleanup(&device);
        cuda::free_upload_sources(&cuda)?;
        Ok(())
    }

    /// Measures `model` (its offloaded weights) read in each of `modes`, every workload: `copy`
    /// first, checked against `resident_logits`; then `uva` against `copy` within the
    /// tolerance and `prefetch` against `copy` bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn read_modes<Plain>(
        &mut self,
        name: &str,
        (fraction, quant): (f64, Option<QuantPreset>),
        (model, inputs): (
            &Llama<OffloadBackend<Plain>>,
            &Inputs<OffloadBackend<Plain>>,
        ),
        modes: &[OffloadMode],
        (offloaded, dma_gbps): ((u64, usize), Option<f64>),
        resident_logits: &[Vec<f32>; 3],
    ) -> BenchResult<()>
    where
        Plain: burn_offload::inner::OffloadTarget<Device = cubecl::cuda::CudaDevice>,
    {
        let cuda = self.cuda.clone();
        // The `copy` run's logits, once it has run.
        let mut copy_logits: Option<[Vec<f32>; 3]> = None;
        for &mode in modes {
            // The same offloaded weights, read in `mode` (`auto` with the card's cached
            // calibration, where one was measured).
            let context = OffloadContext::with_mode(mode);
            if let Some(c) = burn_offload::auto::calibration(&cuda) {
                context.set_calibration(&cuda, c);
            }
            let model = context.adopt_module(model.clone());
            let is_copy = mode == OffloadMode::Copy;
            let reference = match (&copy_logits, mode) {
                (Some(logits), OffloadMode::Prefetch { .. } | OffloadMode::Uva) => Reference {
                    against: "copy",
                    exact: matches!(mode, OffloadMode::Prefetch { .. }),
                    logits,
                },
                _ => Reference {
                    against: "resident",
                    exact: false,
                    logits: resident_logits,
                },
            };
            let (variant, mode) = variant_name(fraction, mode, quant);
            let first = self.rows.len();
            for w in Workload::ALL {
                self.add(
                    name,
                    &variant,
                    (Some(fraction), mode),
                    offloaded,
                    w,
                    || inputs.run(&model, w),
                    (Some(&reference), dma_gbps),
                )?;
                self.rows.last_mut().expect("added").quant = quant;
            }
            if is_copy {
                let rows = &self.rows[first..];
                if rows.iter().all(|r| r.measured.is_some()) {
                    copy_logits = Some(
                        [0, 1, 2]
                            .map(|i| rows[i].measured.as_ref().expect("checked").logits.clone()),
                    );
                }
            }
        }
        Ok(())
    }

    fn skip(
        &mut self,
        preset: &str,
        variant: &str,
        (fraction, mode): (Option<f64>, Option<OffloadMode>),
        workload: Workload,
    ) {
        println!(
            "  {preset} {} {variant}: skipped (time budget)",
            workload.name()
        );
        self.rows.push(Row {
            preset: preset.to_string(),
            workload,
            variant: variant.to_string(),
            fraction,
            mode,
            offloaded_bytes: 0,
            offloaded_tensors: 0,
            measured: None,
            check: None,
            dma_gbps: None,
            device_used_bytes: None,
            quant: None,
        });
    }

    fn checks_ok(&self) -> bool {
        self.rows.iter().all(|r| r.check.is_none_or(|c| c.ok))
    }

    fn table(&self) -> String {
        let fmt = |v: Option<f64>, digits: usize| match v {
            Some(v) => format!("{v:.digits$}"),
            None => "–".to_string(),
        };
        let mut out = String::from(
            "| model | workload | variant | offloaded GB | moved GB | moved / bf16 | ms/step | \
             spread | queued ms | tokens/s | ratio to plain | bound ms | efficiency | uva bound \
             ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        // Grouped by model and workload; variants in the order they ran.
        let mut order: Vec<&Row> = self.rows.iter().collect();
        let preset_pos = |r: &Row| self.rows.iter().position(|o| o.preset == r.preset);
        order.sort_by_key(|r| (preset_pos(r), r.workload.index()));
        for r in order {
            let median_s = r.measured.as_ref().map(|m| m.median_s);
            let queued = r.measured.as_ref().map(|m| m.queued_median_s);
            let bound = r.bound_s(&self.rows, &self.limits);
            let uva = r.uva_bound_s(&self.rows, &self.limits);
            let moved = r.measured.as_ref().map(|m| {
                let (up, in_place) = moved_bytes(m);
                (up + in_place) as f64 / 1e9
            });
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.preset,
                r.workload.name(),
                r.variant,
                if r.measured.is_some() || r.offloaded_bytes > 0 {
                    format!("{:.2}", r.offloaded_bytes as f64 / 1e9)
                } else {
                    "–".into()
                },
                fmt(moved, 3),
                fmt(r.moved_vs_float(&self.rows), 3),
                match median_s {
                    Some(s) => format!("{:.2}", s * 1e3),
                    None => "skipped".into(),
                },
                r.spread()
                    .map(|v| format!("{:.1}%", v * 100.0))
                    .unwrap_or_else(|| "–".into()),
                fmt(queued.map(|s| s * 1e3), 2),
                fmt(median_s.map(|s| r.workload.tokens() as f64 / s), 1),
                fmt(median_s.zip(r.plain_s(&self.rows)).map(|(s, p)| s / p), 2),
                fmt(bound.map(|b| b * 1e3), 2),
                fmt(median_s.zip(bound).map(|(s, b)| b / s), 2),
                if median_s.is_some() {
                    uva.map(|b| format!("{:.2}", b * 1e3)).unwrap_or_default()
                } else {
                    String::new()
                },
            );
        }
        out
    }

    /// Per model, workload and fraction, the `prefetch` row (CubeCL's copies) against the
    /// `prefetch-engine` row (the copy engine's ring): which is faster, and each one's
    /// efficiency against its own bound. What decides `PrefetchCopies`' default.
    fn engine_vs_cubecl(&self) -> String {
        let mut out = String::from(
            "\nprefetch, CubeCL's copies vs the copy engine (same model, workload and fraction):\n",
        );
        let mut any = false;
        for engine in self
            .rows
            .iter()
            .filter(|r| r.variant.ends_with(" prefetch-engine"))
        {
            let cubecl_variant = engine.variant.replace(" prefetch-engine", " prefetch");
            let Some(cubecl) = self.rows.iter().find(|r| {
                r.preset == engine.preset
                    && r.workload == engine.workload
                    && r.variant == cubecl_variant
            }) else {
                continue;
            };
            let timed = |r: &Row| r.measured.as_ref().map(|m| m.median_s);
            let efficiency = |r: &Row| {
                timed(r)
                    .zip(r.bound_s(&self.rows, &self.limits))
                    .map(|(s, b)| format!("{:.2}", b / s))
                    .unwrap_or_else(|| "–".into())
            };
            let verdict = match (timed(cubecl), timed(engine)) {
                (Some(c), Some(e)) if e < c => {
                    format!("engine wins ({:.1}% faster)", (c / e - 1.0) * 100.0)
                }
                (Some(c), Some(e)) => format!("CubeCL wins ({:.1}% faster)", (e / c - 1.0) * 100.0),
                _ => "not both measured".into(),
            };
            any = true;
            out += &format!(
                "  {} {} {}: {verdict}; efficiency CubeCL {}, engine {}\n",
                engine.preset,
                engine.workload.name(),
                cubecl_variant,
                efficiency(cubecl),
                efficiency(engine),
            );
        }
        if any { out } else { String::new() }
    }

    fn json(&self, device: Value, elapsed: f64) -> Value {
        let sections: serde_json::Map<String, Value> = self
            .sections
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        json!({
            "device": device,
            "gb": "1e9 bytes",
            "dtype": "bf16",
            "samples": self.samples,
            "warmup": WARMUP,
            "random_cache_positions_before_decode": PROMPT,
            "prefill_tokens": PREFILL,
            "fractions": self.fractions,
            "check_tolerance_rel": CHECK_TOLERANCE,
            "quantizations": self.quant.iter().map(|q| scheme_name(&q.scheme())).collect::<Vec<_>>(),
            "limits": {
                "dma_pinned_gbps": self.limits.dma_gbps,
                "kernel_read_mapped_gbps": self.limits.kernel_read_gbps,
                "bytes": 256 * MIB,
            },
            "presets": self.presets,
            "rows": self.rows.iter().map(|r| r.json(&self.rows, &self.limits)).collect::<Vec<_>>(),
            "section_seconds": sections,
            "checks_ok": self.checks_ok(),
            "elapsed_s": elapsed,
        })
    }
}

/// The table's label and the row's mode (`None` for the 0 % variant, whose mode is moot).
/// The table's label and the row's mode (`None` for the 0 % variant, whose mode is moot):
/// `offload 50% copy`, or for quantized weights `q4 100% copy`.
fn variant_name(
    fraction: f64,
    mode: OffloadMode,
    quant: Option<QuantPreset>,
) -> (String, Option<OffloadMode>) {
    let prefix = quant.map_or("offload".to_string(), |q| q.to_string());
    if fraction == 0.0 {
        (format!("{prefix} 0%"), None)
    } else {
        let label = match mode {
            OffloadMode::Prefetch {
                copies: PrefetchCopies::CubeCl,
                ..
            } => "prefetch".to_string(),
            OffloadMode::Prefetch {
                copies: PrefetchCopies::Engine,
                ..
            } => "prefetch-engine".to_string(),
            other => other.to_string(),
        };
        (format!("{prefix} {} {label}", pct(fraction)), Some(mode))
    }
}

fn write_json(path: &str, value: &Value) {
    let text = serde_json::to_string_pretty(value).expect("serialisable");
    match std::fs::write(path, text) {
        Ok(()) => println!("wrote {path}"),
        Err(e) => eprintln!("offload_model: could not write {path}: {e}"),
    }
}

/// Returns whether every check passed.
fn run() -> BenchResult<bool> {
    let started = Instant::now();
    let samples = env_usize("MODEL_BENCH_SAMPLES", 5);
    let presets = env_list("MODEL_BENCH_PRESETS", "1b,7b");
    let fused = match std::env::var("MODEL_BENCH_FUSION").as_deref() {
        Ok("off") => false,
        Ok("on") | Err(_) => true,
        Ok(other) => return Err(format!("MODEL_BENCH_FUSION={other}: give on or off").into()),
    };
    for p in &presets {
        LlamaConfig::preset(p)?;
    }
    let fractions = env_list("MODEL_BENCH_FRACTIONS", "0,0.25,0.5,1")
        .iter()
        .map(|f| match f.parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
            _ => Err(format!(
                "MODEL_BENCH_FRACTIONS: {f:?} is not a fraction in [0, 1]"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let budget = std::env::var("MODEL_BENCH_BUDGET_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .unwrap_or(195.0);
    let json_path = std::env::var("MODEL_BENCH_JSON").ok();
    let quant = env_list("MODEL_BENCH_QUANT", "q8,q4")
        .iter()
        .filter(|q| !q.eq_ignore_ascii_case("none"))
        .map(|q| {
            q.parse::<QuantPreset>()
                .map_err(|e| format!("MODEL_BENCH_QUANT: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let info = cuda::probe()?;

    let cuda = CudaDevice::new(0);
    let name = driver::device_name(cuda.index)?;
    let (major, minor) = driver::compute_capability(cuda.index)?;
    let memory = cuda::memory_info(cuda.index)?;
    let device = json!({
        "name": name, "compute_capability": [major, minor],
        "driver_version": info.driver_version, "memory_total_bytes": memory.1,
    });
    println!(
        "offload_model bench on {name} (compute capability {major}.{minor}, driver CUDA {}.{}, \
         {:.1} GB): presets {}, fractions {fractions:?}, up to {samples} samples, budget {budget} s",
        info.driver_version / 1000,
        info.driver_version % 1000 / 10,
        memory.1 as f64 / 1e9,
        presets.join(","),
    );
    let [dma, sm] = limits(&cuda, samples)?;
    let mut bench = Bench {
        cuda,
        samples,
        fractions,
        deadline: started + Duration::from_secs_f64(budget),
        preset_deadline: started + Duration::from_secs_f64(budget),
        limits: Limits {
            dma_gbps: dma,
            kernel_read_gbps: sm,
            dma_s_by_size: Vec::new(),
        },
        rows: Vec::new(),
        quant,
        sections: Vec::new(),
        presets: Vec::new(),
    };
    bench.lap("limits".into(), started);
    for (i, preset) in presets.iter().enumerate() {
        let left = bench.deadline.saturating_duration_since(Instant::now());
        bench.preset_deadline = Instant::now() + left / (presets.len() - i) as u32;
        if fused {
            bench.preset::<Fused>(preset)?;
        } else {
            bench.preset::<Unfused>(preset)?;
        }
        if let Some(path) = &json_path {
            write_json(
                path,
                &bench.json(device.clone(), started.elapsed().as_secs_f64()),
            );
        }
    }

    println!("\ncard: {name}");
    println!(
        "plain = {}",
        if fused {
            "burn::backend::Cuda<bf16> (fused, Burn's default)"
        } else {
            "CudaBackend<bf16> (burn-cuda without fusion)"
        }
    );
    println!("DMA from pinned host memory (256 MiB): {dma:.1} GB/s");
    println!("kernel read of host-mapped memory (256 MiB): {sm:.1} GB/s");
    println!(
        "bf16 weights; GB = 1e9 bytes; ms/step: one decode step (one token per sequence) or the \
         whole prefill; spread = (max - min) / median of the samples; moved = bytes the last \
         sample uploaded or read in place (packed bytes for q8/q4 rows); moved / bf16 = a q8/q4 \
         row's moved bytes over those of the bf16 row offloaded as far in the same mode; \
         bound = max(base, uploaded / DMA GB/s at the variant's tensor sizes + read in place / \
         kernel-read GB/s), base = plain (q8/q4 rows: the same quantized weights resident); \
         efficiency = bound / measured; uva bound = max(base, offloaded bytes / kernel-read \
         GB/s)\n"
    );
    print!("{}", bench.table());
    print!("{}", bench.engine_vs_cubecl());
    let skipped = bench.rows.iter().filter(|r| r.measured.is_none()).count();
    if skipped > 0 {
        println!(
            "\n{skipped} measurements skipped: the time budget of {budget} s \
             (MODEL_BENCH_BUDGET_S) ran out"
        );
    }
    let checked = bench.rows.iter().filter(|r| r.check.is_some()).count();
    let failed = bench
        .rows
        .iter()
        .filter(|r| r.check.is_some_and(|c| !c.ok))
        .count();
    if failed == 0 {
        println!(
            "\nchecks: the logits of all {checked} measured offloaded variants match: copy the \
             resident model's (same weights) and uva copy's within {CHECK_TOLERANCE} of the \
             largest |logit|, prefetch copy's bit for bit"
        );
    } else {
        println!(
            "\nCHECK FAILED: {failed} of {checked} offloaded variants differ from their \
             reference run (see the lines above)"
        );
    }
    let seconds: Vec<String> = bench
        .sections
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect();
    println!(
        "set-up seconds: {}; total {:.1} s",
        seconds.join(", "),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &json_path {
        write_json(path, &bench.json(device, started.elapsed().as_secs_f64()));
    }
    Ok(failed == 0)
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => match e.downcast_ref::<CudaError>() {
            Some(e) if e.is_no_driver() => println!("offload_model: skipped, {e}"),
            _ => {
                eprintln!("offload_model: failed: {e}");
                std::process::exit(1);
            }
        },
    }
}
