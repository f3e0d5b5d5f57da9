//! Decorator overhead and offload modes on the CPU target (burn-ndarray).
//!
//! `cargo bench --bench overhead` prints:
//! 1. a `small` LLaMA-shaped model's prefill and decode step through `OffloadBackend<NdArray>`
//!    with nothing offloaded, relative to plain `NdArray` (goal: within 3 %), and with
//!    everything offloaded in `copy` and `uva` mode;
//! 2. `matmul` with an offloaded 1024×4096 f32 weight, in-place kernel vs copy + GEMM, per row
//!    count: where the in-place kernel stops paying is the CPU target's row threshold.
//!
//! Each variant is timed in interleaved rounds (order rotated every round) after a warm-up,
//! and the median is reported. `-- --quick` runs fewer rounds.

#[path = "../examples/llama/model.rs"]
mod model;

use std::hint::black_box;
use std::time::Instant;

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayDevice;
use burn::prelude::*;
use burn::tensor::{Distribution, TensorPrimitive};
use burn_backend::ops::FloatTensorOps;
use burn_offload::inner::OffloadTarget;
use burn_offload::inner::ndarray::CPU_ZERO_COPY_MAX_ROWS;
use burn_offload::{
    HostBuffer, HostTensor, OffloadBackend, OffloadContext, OffloadDevice, OffloadMode,
    OffloadPolicy,
};
use model::{Cache, Llama, LlamaConfig};

type Plain = NdArray;
type Off = OffloadBackend<NdArray>;

/// Median seconds per call of each closure, measured in `rounds` interleaved rounds.
fn interleaved(rounds: usize, fns: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    for f in fns.iter_mut() {
        f();
    }
    let n = fns.len();
    let mut samples = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for k in 0..n {
            let i = (round + k) % n;
            let start = Instant::now();
            (fns[i])();
            samples[i].push(start.elapsed().as_secs_f64());
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect()
}

/// A prefill of `prompt` tokens and one decode step after it, as closures over `model`.
fn workloads<'a, B: Backend>(
    model: &'a Llama<B>,
    device: &B::Device,
    prompt: usize,
) -> (impl FnMut() + 'a, impl FnMut() + 'a) {
    let tokens = Tensor::<B, 2, Int>::from_data(
        TensorData::new((0..prompt as i64).collect::<Vec<_>>(), [1, prompt]),
        device,
    );
    let next = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64], [1, 1]), device);
    let mut primed = Cache::for_model(model);
    let _ = model.forward_last(tokens.clone(), &mut primed);
    let prefill = move || {
        let mut cache = Cache::for_model(model);
        black_box(model.forward_last(tokens.clone(), &mut cache).into_data());
    };
    let decode = move || {
        let mut cache = primed.clone();
        black_box(model.forward_last(next.clone(), &mut cache).into_data());
    };
    (prefill, decode)
}

fn decorator_overhead(rounds: usize) {
    let config = LlamaConfig::preset("small").expect("preset exists");
    let cpu = NdArrayDevice::Cpu;
    let device = OffloadDevice::device(cpu);
    let prompt = 32;
    let plain: Llama<Plain> = config.init(&cpu);
    let control: Llama<Plain> = config.init(&cpu);
    let wrapped: Llama<Off> = config.init(&device);
    let (offloaded, report) = OffloadPolicy::from_bytes(u64::MAX)
        .apply(config.init::<Off>(&device))
        .expect("valid policy");
    println!(
        "model: `small` preset, {:.1} M parameters, prompt {prompt} tokens, batch 1; \
         offloaded model: {:.1} MiB in {} tensors",
        config.num_params() as f64 / 1e6,
        report.offloaded_bytes() as f64 / (1 << 20) as f64,
        report.offloaded_tensors()
    );
    let (mut p_plain, mut d_plain) = workloads(&plain, &cpu, prompt);
    let (mut p_ctrl, mut d_ctrl) = workloads(&control, &cpu, prompt);
    let (mut p_wrap, mut d_wrap) = workloads(&wrapped, &device, prompt);

    let mut rows = Vec::new();
    for (name, mode) in [("copy", OffloadMode::Copy), ("uva", OffloadMode::Uva)] {
        // The same offloaded weights, read in `mode`.
        let offloaded = OffloadContext::with_mode(mode).adopt_module(offloaded.clone());
        let (mut p_off, mut d_off) = workloads(&offloaded, &device, prompt);
        let t = interleaved(
            rounds,
            &mut [
                &mut p_plain,
                &mut p_wrap,
                &mut p_off,
                &mut p_ctrl,
                &mut d_plain,
                &mut d_wrap,
                &mut d_off,
                &mut d_ctrl,
            ],
        );
        rows.push((name, t));
    }
    println!("\n| variant (ratio to plain NdArray) | prefill | decode |");
    println!("|---|---|---|");
    // Variants that do not depend on the mode are reported for both rounds; the second plain
    // NdArray model (A/A control) shows the noise floor.
    for (name, t) in &rows {
        println!(
            "| plain NdArray, second model: noise floor ({name} round) | {:.3} | {:.3} |",
            t[3] / t[0],
            t[7] / t[4]
        );
        println!(
            "| OffloadBackend, nothing offloaded ({name} round) | {:.3} | {:.3} |",
            t[1] / t[0],
            t[5] / t[4]
        );
    }
    for (name, t) in &rows {
        println!(
            "| OffloadBackend, everything offloaded, `{name}` | {:.3} | {:.3} |",
            t[2] / t[0],
            t[6] / t[4]
        );
    }
    let t = &rows[0].1;
    println!(
        "\nplain NdArray: prefill {:.2} ms ({:.0} tok/s), decode step {:.2} ms",
        t[0] * 1e3,
        prompt as f64 / t[0],
        t[4] * 1e3
    );
}

fn row_threshold(rounds: usize) {
    let cpu = NdArrayDevice::Cpu;
    let (k, n) = (1024, 4096);
    let weight = TensorData::random::<f32, _, _>(
        [k, n],
        Distribution::Default,
        &mut burn_std::rand::get_seeded_rng(),
    );
    let host = HostTensor::from_data(&weight, HostBuffer::pageable).expect("host memory");
    println!(
        "\nmatmul [M, {k}] @ offloaded [{k}, {n}] f32: in-place kernel vs copy + ndarray GEMM"
    );
    println!("| rows M | in place (ms) | copy + GEMM (ms) | in place / copy |");
    println!("|---|---|---|---|");
    let mut last_win = 0;
    for m in [1, 2, 4, 8, 16, 32, 64] {
        let lhs = Tensor::<Plain, 2>::random([m, k], Distribution::Default, &cpu);
        let lhs = match lhs.into_primitive() {
            TensorPrimitive::Float(t) => t,
            TensorPrimitive::QFloat(_) => unreachable!("float tensor"),
        };
        let mut in_place = || {
            let out = <Plain as OffloadTarget>::host_matmul(lhs.clone(), &host)
                .unwrap_or_else(|_| panic!("the CPU kernel takes f32"));
            black_box(out);
        };
        let mut copy = || {
            let w = <Plain as OffloadTarget>::upload(&host, &cpu);
            black_box(<Plain as FloatTensorOps<Plain>>::float_matmul(
                lhs.clone(),
                w,
            ));
        };
        let t = interleaved(rounds, &mut [&mut in_place, &mut copy]);
        if t[0] < t[1] {
            last_win = m;
        }
        println!(
            "| {m} | {:.3} | {:.3} | {:.2} |",
            t[0] * 1e3,
            t[1] * 1e3,
            t[0] / t[1]
        );
    }
    println!(
        "\nin place wins up to M = {last_win}; the CPU target's threshold (CPU_ZERO_COPY_MAX_ROWS) is {CPU_ZERO_COPY_MAX_ROWS}"
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 5 } else { 31 };
    println!(
        "burn-offload overhead bench (CPU target, burn-ndarray, f32), {rounds} rounds per variant"
    );
    decorator_overhead(rounds);
    row_threshold(rounds);
}
