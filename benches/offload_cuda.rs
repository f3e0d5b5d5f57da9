//! Offloaded weights on a CUDA device, against the same card's transfer limits (feature `cuda`).
//!
//! `cargo bench --features cuda --bench offload_cuda` prints the card's name, then:
//! - (a) the physical limits, measured in the same run: a pinned host→device DMA
//!   (`cuda::upload_dma`, the copy engine) and a kernel reading host-mapped memory
//!   (`cuda::upload_sm_copy`, what the zero-copy kernels do), 256 MiB, median GB/s;
//! - (b) `linear` with an offloaded weight of 16, 64 and 256 MiB (f32 and bf16) for M = 1, 8,
//!   32 and 128 rows in `uva` and `copy` mode: median ms, effective GB/s (weight bytes / time)
//!   and its ratio to the limit of the path taken (zero-copy: the kernel read; copy: the DMA).
//!   In `uva` mode more than `MAX_ROWS` rows take the copy path too (the path column says so);
//! - (c) the decorator's overhead: the LLaMA `small` preset on plain `CudaBackend` and on
//!   `OffloadBackend<CudaBackend>` with nothing offloaded (goal: within 2 %), prefill of 32
//!   tokens and one decode step, with a second plain model as an A/A control (noise floor).
//!
//! Every sample runs from an idle stream to the end of a stream sync (`cuda::sync`); medians
//! after warm-up runs (which also let CubeCL autotune its kernels). Environment:
//! `OFFLOAD_BENCH_JSON=path` also writes the results as JSON; `OFFLOAD_BENCH_SAMPLES` (default
//! 9) and `OFFLOAD_BENCH_ROUNDS` (default 41) bound the work. Without a CUDA driver it prints
//! why and exits 0.

#[path = "../examples/llama/model.rs"]
mod model;

mod cuda_common;

use std::hint::black_box;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::module::linear;
use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_offload::cuda::{self, CudaError, driver, ops::MAX_ROWS};
use burn_offload::{
    CudaBackend, OffloadBackend, OffloadContext, OffloadDevice, OffloadMode, op_stats,
    reset_op_stats,
};
use cubecl::cuda::CudaDevice;
use cuda_common::{MIB, WARMUP, env_usize, gbps, limits, median, timed};
use model::{Cache, Llama, LlamaConfig};
use serde_json::{Value, json};

type B = OffloadBackend<CudaBackend>;

/// Seconds of one run of `f` (see `cuda_common::timed`); a failed stream sync ends the bench.
fn timed_s(cuda: &CudaDevice, f: &mut dyn FnMut()) -> f64 {
    timed(cuda, f).expect("stream sync")
}

/// Median seconds of `f` over `samples` runs after `WARMUP` runs.
fn median_secs(cuda: &CudaDevice, samples: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        timed_s(cuda, &mut f);
    }
    median((0..samples).map(|_| timed_s(cuda, &mut f)).collect())
}

/// Cheap deterministic values in [-0.5, 0.5).
fn fill(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// (b) `linear` with offloaded weights; one JSON object per measurement.
fn offloaded_linear(
    cuda: &CudaDevice,
    [dma, sm]: [f64; 2],
    samples: usize,
) -> Result<Vec<Value>, CudaError> {
    let (host, device) = (
        OffloadDevice::host(cuda.clone()),
        OffloadDevice::device(cuda.clone()),
    );
    println!(
        "\n(b) linear [M, K] x offloaded [K, N]; ratio: to the kernel read (zero-copy) or \
         the DMA (copy)"
    );
    println!("| dtype | weight | K x N | M | mode | path | ms | GB/s | ratio |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        for (mib, k) in [(16, 2048), (64, 4096), (256, 8192)] {
            let bytes = mib * MIB;
            let n = bytes / dtype.size() / k;
            let data = TensorData::new(fill(k * n), [k, n]).convert_dtype(dtype);
            let w = Tensor::<B, 2>::from_data(data, (&host, dtype));
            for m in [1, 8, 32, 128] {
                let data = TensorData::new(fill(m * k), [m, k]).convert_dtype(dtype);
                let x = Tensor::<B, 2>::from_data(data, (&device, dtype));
                let mut outputs = Vec::new();
                for mode in [OffloadMode::Uva, OffloadMode::Copy] {
                    let w = OffloadContext::with_mode(mode).adopt(w.clone());
                    reset_op_stats();
                    let secs = median_secs(cuda, samples, || {
                        black_box(linear(x.clone(), w.clone(), None));
                    });
                    let zero_copy = op_stats().zero_copy_ops > 0;
                    assert_eq!(
                        zero_copy,
                        mode == OffloadMode::Uva && m <= MAX_ROWS,
                        "{mode}, M = {m}"
                    );
                    let (path, limit) = if zero_copy {
                        ("zero-copy", sm)
                    } else {
                        ("copy", dma)
                    };
                    let rate = gbps(bytes, secs);
                    println!(
                        "| {dtype:?} | {mib} MiB | {k} x {n} | {m} | {mode} | {path} | {:.3} | {rate:.1} | {:.2} |",
                        secs * 1e3,
                        rate / limit
                    );
                    rows.push(json!({
                        "dtype": format!("{dtype:?}").to_lowercase(), "weight_bytes": bytes, "k": k,
                        "n": n, "m": m, "mode": mode.to_string(), "path": path, "median_s": secs,
                        "gbps": rate, "ratio_to_limit": rate / limit,
                    }));
                    let out = linear(x.clone(), w.clone(), None).into_data();
                    outputs.push(out.iter::<f32>().collect::<Vec<_>>());
                }
                check_same(
                    &outputs[0],
                    &outputs[1],
                    &format!("{dtype:?} {mib} MiB, M = {m}"),
                );
            }
            drop(w);
            cuda::free_upload_sources(cuda)?;
        }
    }
    Ok(rows)
}

/// The two modes must agree (a sanity check of what was timed: rounding aside).
fn check_same(uva: &[f32], copy: &[f32], ctx: &str) {
    let scale = copy.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let diff = uva
        .iter()
        .zip(copy)
        .fold(0.0f32, |a, (u, c)| a.max((u - c).abs()));
    assert!(
        diff <= 5e-2 * scale,
        "{ctx}: uva and copy results differ by {diff} (largest {scale})"
    );
}

/// A prefill of `prompt` tokens and one decode step after it, on `model`.
fn llama_runs<'a, Bk: Backend>(
    model: &'a Llama<Bk>,
    device: &Bk::Device,
    prompt: usize,
) -> [Box<dyn FnMut() + 'a>; 2] {
    let ids = |ids: Vec<i64>| {
        let len = ids.len();
        Tensor::<Bk, 2, Int>::from_data(TensorData::new(ids, [1, len]), device)
    };
    let (tokens, next) = (ids((0..prompt as i64).collect()), ids(vec![1]));
    let mut primed = Cache::for_model(model);
    black_box(model.forward_last(tokens.clone(), &mut primed));
    [
        Box::new(move || {
            black_box(model.forward_last(tokens.clone(), &mut Cache::for_model(model)));
        }),
        Box::new(move || {
            black_box(model.forward_last(next.clone(), &mut primed.clone()));
        }),
    ]
}

/// (c) plain `CudaBackend` vs `OffloadBackend<CudaBackend>` with nothing offloaded.
fn decorator_overhead(cuda: &CudaDevice, rounds: usize) -> Value {
    let config = LlamaConfig::preset("small").expect("preset exists");
    let device = OffloadDevice::device(cuda.clone());
    let prompt = 32;
    let plain: Llama<CudaBackend> = config.init(cuda);
    let wrapped: Llama<B> = config.init(&device);
    let control: Llama<CudaBackend> = config.init(cuda);
    // [variant][prefill, decode]: plain, wrapped, control.
    let mut runs = [
        llama_runs(&plain, cuda, prompt),
        llama_runs(&wrapped, &device, prompt),
        llama_runs(&control, cuda, prompt),
    ];
    let mut samples = vec![Vec::new(); 6];
    for round in 0..WARMUP + rounds {
        // Rotate the order every round so that no variant always follows the same one.
        for i in 0..6 {
            let j = (i + round) % 6;
            let secs = timed_s(cuda, &mut runs[j / 2][j % 2]);
            if round >= WARMUP {
                samples[j].push(secs);
            }
        }
    }
    let t: Vec<f64> = samples.into_iter().map(median).collect();
    let ratio = |variant: usize, phase: usize| t[2 * variant + phase] / t[phase];
    println!(
        "\n(c) LLaMA `small` ({:.1} M parameters, f32), prompt {prompt} tokens, batch 1, \
         {rounds} interleaved rounds",
        config.num_params() as f64 / 1e6
    );
    println!("| variant (ratio to plain CudaBackend) | prefill | decode step |");
    println!("|---|---|---|");
    println!(
        "| OffloadBackend, nothing offloaded (goal <= 1.02) | {:.3} | {:.3} |",
        ratio(1, 0),
        ratio(1, 1)
    );
    println!(
        "| plain CudaBackend, second model (noise floor) | {:.3} | {:.3} |",
        ratio(2, 0),
        ratio(2, 1)
    );
    println!(
        "plain CudaBackend: prefill {:.3} ms, decode step {:.3} ms",
        t[0] * 1e3,
        t[1] * 1e3
    );
    json!({
        "preset": "small", "prompt_tokens": prompt, "rounds": rounds,
        "plain_prefill_s": t[0], "plain_decode_s": t[1],
        "offload_prefill_ratio": ratio(1, 0), "offload_decode_ratio": ratio(1, 1),
        "control_prefill_ratio": ratio(2, 0), "control_decode_ratio": ratio(2, 1),
    })
}

fn run() -> Result<(), CudaError> {
    let info = cuda::probe()?;
    let cuda = CudaDevice::new(0);
    let name = driver::device_name(cuda.index)?;
    let (major, minor) = driver::compute_capability(cuda.index)?;
    println!(
        "offload_cuda bench on {name} (compute capability {major}.{minor}, driver CUDA {}.{})",
        info.driver_version / 1000,
        info.driver_version % 1000 / 10
    );
    let samples = env_usize("OFFLOAD_BENCH_SAMPLES", 9);
    let rounds = env_usize("OFFLOAD_BENCH_ROUNDS", 41);
    // Wall-clock seconds per section (autotuning and kernel compilation included).
    let mut seconds = Vec::new();
    let mut section = Instant::now();
    let mut lap = |name: &str| {
        seconds.push((name.to_string(), section.elapsed().as_secs_f64()));
        section = Instant::now();
    };
    let [dma, sm] = limits(&cuda, samples)?;
    println!(
        "\n(a) limits, 256 MiB from pinned host memory: DMA {dma:.1} GB/s, kernel read of \
         host-mapped memory {sm:.1} GB/s"
    );
    lap("limits");
    let linear_rows = offloaded_linear(&cuda, [dma, sm], samples)?;
    lap("linear");
    let overhead = decorator_overhead(&cuda, rounds);
    lap("decorator_overhead");
    let seconds: serde_json::Map<String, Value> =
        seconds.into_iter().map(|(k, v)| (k, json!(v))).collect();
    println!(
        "\nwall-clock seconds per section: {}",
        Value::Object(seconds.clone())
    );
    if let Ok(path) = std::env::var("OFFLOAD_BENCH_JSON") {
        let summary = json!({
            "device": name, "compute_capability": [major, minor],
            "driver_version": info.driver_version, "gb": "1e9 bytes",
            "samples": samples, "warmup": WARMUP,
            "limits": {"dma_pinned_gbps": dma, "kernel_read_mapped_gbps": sm, "bytes": 256 * MIB},
            "linear": linear_rows, "decorator_overhead": overhead, "section_seconds": seconds,
        });
        let text = serde_json::to_string_pretty(&summary).expect("serialisable");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("offload_cuda: could not write {path}: {e}");
            std::process::exit(1);
        }
        println!("wrote {path}");
    }
    Ok(())
}

fn main() {
    match run() {
        Ok(()) => {}
        Err(e) if e.is_no_driver() => println!("offload_cuda: skipped, {e}"),
        Err(e) => {
            eprintln!("offload_cuda: failed: {e}");
            std::process::exit(1);
        }
    }
}
