//! Greedy generation with a LLaMA-style model whose parameters are partly kept in host memory,
//! like vLLM's `--cpu-offload-gb`.
//!
//! ```text
//! cargo run --release --example llama -- --preset tiny --offload-gb 0.0005 --mode uva
//! cargo run --release --example llama -- --preset small --offload-gb 0.05 --offload-params mlp
//! ```
//!
//! Flow: the model is created lazily on `OffloadDevice::Device`, the policy retargets the
//! selected parameters to host memory *before* anything is allocated, and the weights are then
//! loaded (`--weights`) or randomly initialised, each offloaded tensor created once, directly in
//! host memory. Generation (prefill + greedy decode with a KV cache) is timed, then repeated on a
//! fully resident copy of the same weights to check that the tokens match.

mod model;

use std::error::Error;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayDevice;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_offload::target::OffloadTarget;
use burn_offload::{
    OffloadBackend, OffloadDevice, OffloadMode, OffloadPolicy, OffloadReport, OpStats, op_stats,
    reset_op_stats,
};
use burn_store::{BurnpackStore, ModuleSnapshot, SafetensorsStore};
use clap::{Parser, ValueEnum};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use model::{Cache, Llama, LlamaConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceKind {
    Cpu,
    Cuda,
}

/// LLaMA-style greedy generation with parameters offloaded to host memory.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Model shape: tiny, small, 1b or 7b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// GiB of parameters to keep in host memory (vLLM's --cpu-offload-gb).
    #[arg(long, default_value_t = 0.0)]
    offload_gb: f64,
    /// Only offload parameters matching these dotted segments (comma list, e.g. `mlp,attn.wq`).
    #[arg(long)]
    offload_params: Option<String>,
    /// How ops read offloaded parameters: uva, copy, auto, prefetch or prefetch:<lookahead bytes>.
    #[arg(long, default_value = "auto", value_parser = parse_mode)]
    mode: OffloadMode,
    /// Sequences generated together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt tokens per sequence (prefill).
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// Decode steps (one token each per sequence) after the prefill.
    #[arg(long, default_value_t = 16)]
    gen_tokens: usize,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
    /// Load weights from a .safetensors or .bpk (burnpack) file instead of random ones.
    #[arg(long)]
    weights: Option<String>,
    /// Save the initialised weights to this .safetensors (or .bpk) file.
    #[arg(long)]
    save_weights: Option<String>,
    /// Seed of the random weights and of the prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the reference run with every parameter resident.
    #[arg(long)]
    no_check: bool,
}

fn parse_mode(s: &str) -> Result<OffloadMode, String> {
    s.parse::<OffloadMode>().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, Box<dyn Error>> {
    match args.device {
        DeviceKind::Cpu => run_on::<NdArray>(args, NdArrayDevice::Cpu),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            burn_offload::cuda::probe().map_err(|e| format!("--device cuda: {e}"))?;
            run_on::<burn_offload::CudaBackend>(args, cubecl::cuda::CudaDevice::new(0))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => {
            eprintln!(
                "error: this example was built without the `cuda` feature; rebuild it with \
                 `--features cuda` (burn-cuda, unfused) or use `--device cpu`"
            );
            Ok(ExitCode::from(2))
        }
    }
}

/// The whole run on the target `T` (`OffloadBackend<T>` on compute device `compute`).
fn run_on<T: OffloadTarget>(args: &Args, compute: T::Device) -> Result<ExitCode, Box<dyn Error>> {
    type B<T> = OffloadBackend<T>;
    if args.batch == 0 || args.prompt_len == 0 {
        return Err("--batch and --prompt-len must be at least 1".into());
    }

    let mut config = LlamaConfig::preset(&args.preset)?;
    config.max_seq_len = config.max_seq_len.max(args.prompt_len + args.gen_tokens);
    let mut policy = OffloadPolicy::from_gib(args.offload_gb)?.mode(args.mode);
    if let Some(list) = &args.offload_params {
        policy = policy.params(OffloadPolicy::parse_params(list)?);
    }

    let device = OffloadDevice::device(compute);
    B::<T>::seed(&device, args.seed);
    println!(
        "preset {}: dim {}, {} layers, {} heads ({} kv), ffn {}, vocab {}, {} head, {:.1} M params",
        args.preset,
        config.dim,
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        config.ffn_dim,
        config.vocab_size,
        if config.tie_embeddings {
            "tied"
        } else {
            "untied"
        },
        config.num_params() as f64 / 1e6,
    );

    // Lazy init, then the policy retargets the chosen parameters to host memory: nothing has
    // been allocated for them yet.
    let model: Llama<B<T>> = config.init(&device);
    let (model, report) = policy.apply(model)?;
    println!("{report}");

    // Materialise: offloaded tensors are created once, directly in host memory.
    reset_op_stats();
    let start = Instant::now();
    let mut model = model;
    if let Some(path) = &args.weights {
        load_weights(&mut model, path)?;
    }
    materialize(&model, &report);
    let init_stats = op_stats();
    println!(
        "weights {} in {:.2?}: {} created in host memory, {} in device memory",
        if args.weights.is_some() {
            "loaded"
        } else {
            "initialised"
        },
        start.elapsed(),
        HumanBytes(init_stats.host_created_bytes),
        HumanBytes(init_stats.device_created_bytes),
    );
    if let Some(path) = &args.save_weights {
        save_weights(&model, path)?;
        println!("saved the weights to {path}");
    }

    let prompt = prompt_tokens(args.seed, args.batch, args.prompt_len, config.vocab_size);

    reset_op_stats();
    let run = generate(&model, &prompt, args, &device);
    let gen_stats = op_stats();
    println!(
        "{} run: prefill {:.1} tok/s ({:.2?}), decode {:.1} tok/s ({:.2?})",
        if report.offloaded_tensors() > 0 {
            "offloaded"
        } else {
            "resident "
        },
        run.prefill_tok_s(args),
        run.prefill,
        run.decode_tok_s(args),
        run.decode,
    );
    print_tokens(&run.tokens, args.batch);

    let mut matched = None;
    if !args.no_check && report.offloaded_tensors() > 0 {
        // The same weights, all in device memory: `to_device` uploads the host tensors of a
        // clone. (Applying a second, empty policy would too, but it would also reset the mode
        // of this compute device, which the offloaded model shares: the last policy wins.)
        let reference = model.clone().to_device(&device.to_resident());
        let resident = generate(&reference, &prompt, args, &device);
        println!(
            "resident run:  prefill {:.1} tok/s ({:.2?}), decode {:.1} tok/s ({:.2?})",
            resident.prefill_tok_s(args),
            resident.prefill,
            resident.decode_tok_s(args),
            resident.decode,
        );
        let ok = resident.tokens == run.tokens;
        if ok {
            let max_diff = run
                .logits
                .iter()
                .zip(&resident.logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            println!("tokens match the resident run (max |logit difference| {max_diff:.3e})");
        } else {
            eprintln!("MISMATCH: the offloaded run generated other tokens than the resident run");
            print_tokens(&resident.tokens, args.batch);
        }
        matched = Some(ok);
    } else if !args.no_check {
        println!("nothing offloaded: reference run skipped");
    }

    print_summary(args, &config, &report, &run, &gen_stats);
    Ok(match matched {
        Some(false) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// Loads `path` (.safetensors, or burnpack otherwise) into `model`.
fn load_weights<B: Backend>(model: &mut Llama<B>, path: &str) -> Result<(), Box<dyn Error>> {
    let result = if is_safetensors(path) {
        model
            .load_from(&mut SafetensorsStore::from_file(path))
            .map_err(|e| format!("loading {path}: {e}"))?
    } else {
        model
            .load_from(&mut BurnpackStore::from_file(path).auto_extension(false))
            .map_err(|e| format!("loading {path}: {e}"))?
    };
    if !result.is_success() {
        return Err(format!("loading {path}: {result}").into());
    }
    println!("loaded {} tensors from {path}", result.applied.len());
    Ok(())
}

fn save_weights<B: Backend>(model: &Llama<B>, path: &str) -> Result<(), Box<dyn Error>> {
    if is_safetensors(path) {
        model
            .save_into(&mut SafetensorsStore::from_file(path).overwrite(true))
            .map_err(|e| format!("saving {path}: {e}"))?;
    } else {
        model
            .save_into(
                &mut BurnpackStore::from_file(path)
                    .auto_extension(false)
                    .overwrite(true),
            )
            .map_err(|e| format!("saving {path}: {e}"))?;
    }
    Ok(())
}

fn is_safetensors(path: &str) -> bool {
    Path::new(path)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// Reads every parameter once (in module order), which initialises the lazy ones, with a
/// progress bar in bytes.
struct Materializer {
    path: Vec<String>,
    bar: ProgressBar,
}

impl<Bk: Backend> ModuleVisitor<Bk> for Materializer {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
        self.bar.set_message(self.path.join("."));
        let value = param.val();
        let bytes = value.shape().num_elements() * value.dtype().size();
        self.bar.inc(bytes as u64);
    }
}

fn materialize<B: Backend>(model: &Llama<B>, report: &OffloadReport) {
    let bar = ProgressBar::new(report.total_bytes()).with_style(
        ProgressStyle::with_template(
            "materialising {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
        )
        .expect("valid template"),
    );
    let mut visitor = Materializer {
        path: Vec::new(),
        bar,
    };
    model.visit(&mut visitor);
    visitor.bar.finish_and_clear();
}

/// A deterministic prompt: `batch` rows of `len` token ids drawn from `seed` (splitmix64).
fn prompt_tokens(seed: u64, batch: usize, len: usize, vocab: usize) -> Vec<i64> {
    let mut state = seed ^ 0x5EED_1A3A_0FF1_0AD5;
    (0..batch * len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % vocab as u64) as i64
        })
        .collect()
}

struct Generation {
    /// Generated ids, `[batch, 1 + gen_tokens]` row-major (the first from the prefill).
    tokens: Vec<i64>,
    /// The logits behind each step's argmax, `[1 + gen_tokens, batch, vocab]` row-major.
    logits: Vec<f32>,
    prefill: Duration,
    decode: Duration,
}

impl Generation {
    fn prefill_tok_s(&self, args: &Args) -> f64 {
        (args.batch * args.prompt_len) as f64 / self.prefill.as_secs_f64()
    }

    fn decode_tok_s(&self, args: &Args) -> f64 {
        if args.gen_tokens == 0 {
            return 0.0;
        }
        (args.batch * args.gen_tokens) as f64 / self.decode.as_secs_f64()
    }
}

/// Prefill of the prompt, then `gen_tokens` greedy decode steps of one token per sequence
/// through the KV cache. Reading each step's argmax into host data synchronises.
fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[i64],
    args: &Args,
    device: &B::Device,
) -> Generation {
    let batch = args.batch;
    let mut cache = Cache::for_model(model);
    let mut steps: Vec<Vec<i64>> = Vec::with_capacity(args.gen_tokens + 1);
    // Kept as tensors (not read back) until the timing is done.
    let mut logits: Vec<Tensor<B, 2>> = Vec::with_capacity(args.gen_tokens + 1);

    let start = Instant::now();
    let tokens = Tensor::<B, 2, Int>::from_data(
        TensorData::new(prompt.to_vec(), [batch, args.prompt_len]),
        device,
    );
    logits.push(model.forward_last(tokens, &mut cache));
    let mut next = logits[0].clone().argmax(1);
    steps.push(read_ids(&next));
    let prefill = start.elapsed();

    let start = Instant::now();
    for _ in 0..args.gen_tokens {
        let step = model.forward_last(next, &mut cache);
        next = step.clone().argmax(1);
        logits.push(step);
        steps.push(read_ids(&next));
    }
    B::sync(device).expect("sync");
    let decode = start.elapsed();

    let tokens = (0..batch)
        .flat_map(|b| steps.iter().map(move |s| s[b]))
        .collect();
    let logits = logits
        .into_iter()
        .flat_map(|l| l.into_data().iter::<f32>().collect::<Vec<_>>())
        .collect();
    Generation {
        tokens,
        logits,
        prefill,
        decode,
    }
}

fn read_ids<B: Backend>(ids: &Tensor<B, 2, Int>) -> Vec<i64> {
    ids.to_data().iter::<i64>().collect()
}

fn print_tokens(tokens: &[i64], batch: usize) {
    let per_row = tokens.len() / batch.max(1);
    for (b, row) in tokens.chunks(per_row.max(1)).enumerate().take(4) {
        println!("  seq {b}: {row:?}");
    }
    if batch > 4 {
        println!("  ... ({} more sequences)", batch - 4);
    }
}

fn print_summary(
    args: &Args,
    config: &LlamaConfig,
    report: &OffloadReport,
    run: &Generation,
    stats: &OpStats,
) {
    println!("--- summary ---");
    println!("preset            {}", args.preset);
    println!(
        "params            {} ({:.4} GiB, {})",
        config.num_params(),
        report.total_gib(),
        HumanBytes(report.total_bytes())
    );
    println!(
        "offloaded         {:.4} GiB ({}) in {} of {} tensors",
        report.offloaded_gib(),
        HumanBytes(report.offloaded_bytes()),
        report.offloaded_tensors(),
        report.params.len()
    );
    println!("mode              {}", report.mode);
    println!(
        "batch x prompt    {} x {} (+{} decode steps)",
        args.batch, args.prompt_len, args.gen_tokens
    );
    println!("prefill           {:.1} tok/s", run.prefill_tok_s(args));
    println!("decode            {:.1} tok/s", run.decode_tok_s(args));
    println!(
        "op stats          zero-copy ops {}, transient uploads {} ({}), created: device {}, \
         host {}",
        stats.zero_copy_ops,
        stats.transient_uploads,
        HumanBytes(stats.transient_upload_bytes),
        HumanBytes(stats.device_created_bytes),
        HumanBytes(stats.host_created_bytes),
    );
}
