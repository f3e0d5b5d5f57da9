//! `llama train`: fine-tunes the example's model on a text with `Autodiff<OffloadBackend<T>>`,
//! its weights offloaded by `--offload-gb` (or a training fit plan for `--gpu-budget-gb`) and
//! Adam's state placed by `--state` ([`OffloadOptimizer::with_state`]).
//!
//! ```text
//! cargo run --release --example llama -- train --preset tiny --offload-gb 1 --state host
//! cargo run --release --example llama -- train --model tests/fixtures/hf/llama3-tied \
//!     --gpu-budget-gb 0.002 --reserve-gb 0 --state with-offloaded
//! ```
//!
//! Each step draws `--batch` windows of `--seq-len` + 1 tokens from the text (the model's
//! tokenizer.json where the directory has one, else its bytes as token ids modulo the
//! vocabulary) at positions drawn from `--seed`, runs the model on the first `--seq-len` tokens
//! of each, takes the cross-entropy against the next token at every position, and makes one
//! Adam step. It prints the loss every `--log-every` steps, then the first and last step's
//! loss, the step time, where weights, gradients and state live (the report's
//! [`TrainingMemory`](burn_offload::TrainingMemory) and the optimizer's measured state), the
//! bytes a step moves between host and device memory, and burn-offload's host memory. The run
//! fails (exit code 1) if the last step's loss is not below the first's.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_offload::fit::{DeviceBudget, FitPlan, FitPlanner};
use burn_offload::inner::{OffloadTarget, TargetDevice};
use burn_offload::train::{Bytes, TrainingMemory};
use burn_offload::{
    HostMemoryStats, OffloadBackend, OffloadDevice, OffloadOptimizer, OffloadPolicy, OffloadReport,
    OptimizerState, StatePlacement, StateTraffic, host_memory_stats, op_stats,
    reset_host_memory_peak, reset_op_stats,
};
use clap::ValueEnum;
use indicatif::HumanBytes;

use super::hf::HfModel;
use super::model::{Cache, Llama, LlamaConfig};
use super::ranks::{RankPart, RankResult};
use super::{
    Args, BusBytes, GIB, MemoryInfo, MemoryPeak, MemorySampler, device_calibration, load_directory,
    load_weights, materialize, model_name, planner_params, print_model, save_weights,
    with_budget_hint,
};

/// The text the example trains on unless `--data` names another (self-written for this
/// repository, 4.5 KB of plain English).
pub(super) const TRAIN_TEXT: &str = include_str!("data/train.txt");

/// Where Adam's state lives between steps (`--state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum StateArg {
    /// In host memory for every parameter (ZeRO-Offload): each step uploads a parameter's state
    /// for its update and writes the new state back, one parameter at a time.
    Host,
    /// In host memory for the offloaded parameters, in device memory for the others.
    WithOffloaded,
    /// In device memory, where Burn's optimizers keep it.
    Device,
}

impl StateArg {
    /// The library's placement.
    pub(super) fn placement(self) -> StatePlacement {
        match self {
            Self::Host => StatePlacement::Host,
            Self::WithOffloaded => StatePlacement::WithOffloaded,
            Self::Device => StatePlacement::Device,
        }
    }
}

/// The options of `llama train` (the model, device, dtype, offload budget or fit plan and mode
/// are the shared ones: `llama train --help` lists them all).
#[derive(Debug, Clone, clap::Args)]
pub(super) struct TrainArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Adam's learning rate (0 trains nothing: the loss check then fails).
    // Negative numbers are taken as values, so that the check says what is wrong with them.
    #[arg(long, default_value_t = 3e-3, allow_negative_numbers = true)]
    pub lr: f64,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (each predicts the next token at every position).
    #[arg(long, default_value_t = 32)]
    pub seq_len: usize,
    /// Where Adam's state (two values per parameter value, in the weights' --dtype: Burn's
    /// optimizers keep their state in the parameter's dtype) lives between steps.
    #[arg(long, value_enum, default_value_t = StateArg::Host)]
    pub state: StateArg,
    /// Print the loss every this many steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// A UTF-8 text file to train on instead of the example's own (examples/llama/data/train.txt,
    /// built into the binary).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Train data-parallel in this many processes on this machine over burn-collective (feature
    /// `collective`): each takes --batch / --ranks of every step's sequences, the gradients are
    /// averaged over the ranks before each step.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Seconds a rank waits for the others at a collective call (registration, broadcast, each
    /// step's all-reduce) before it fails: more than the slowest rank's step.
    #[arg(long, default_value_t = 120.0)]
    pub collective_timeout: f64,
    /// This process's rank (given by the --ranks launcher).
    #[arg(long, hide = true)]
    pub rank: Option<u32>,
    /// The orchestrator's host:port (given by the --ranks launcher).
    #[arg(long, hide = true)]
    pub orchestrator: Option<String>,
    /// This rank's data port (given by the --ranks launcher).
    #[arg(long, hide = true)]
    pub data_port: Option<u16>,
}

/// What a training run measured.
pub(super) struct Training {
    /// Tokens of the training text.
    pub tokens: usize,
    /// Each step's loss (mean cross-entropy over the batch's positions, in nats).
    pub losses: Vec<f32>,
    /// Each step's time: batch upload, forward, backward, optimizer step, up to the device
    /// having finished it.
    pub step_times: Vec<Duration>,
    /// The optimizer's state after the last step, by placement, counted tensor by tensor.
    pub state_memory: Bytes,
    /// What the optimizer moved for the state kept in host memory.
    pub state_traffic: StateTraffic,
    /// Transient uploads and in-place reads of offloaded weights over all steps (op stats of
    /// the training thread).
    pub bus: BusBytes,
    /// The policy's report (the optimizer state it counted included).
    pub report: OffloadReport,
    /// burn-offload's host memory after the last step; its peak is the training's (from
    /// after the weights were created).
    pub host: HostMemoryStats,
    /// Host allocations made by the steps after the first one.
    pub later_allocations: u64,
    /// The device memory in use at its peak (CUDA only).
    pub device_peak: Option<MemoryPeak>,
    /// With `--rank`: this rank and the digest of its parameters after training.
    pub rank: Option<RankResult>,
}

impl Training {
    /// The first step's loss.
    pub fn first_loss(&self) -> f32 {
        self.losses.first().copied().unwrap_or(f32::NAN)
    }

    /// The last step's loss.
    pub fn last_loss(&self) -> f32 {
        self.losses.last().copied().unwrap_or(f32::NAN)
    }

    /// Whether the last step's loss is below the first's (false if either is NaN).
    pub fn loss_went_down(&self) -> bool {
        self.last_loss() < self.first_loss()
    }

    /// Success if the loss went down; otherwise says so on stderr and fails.
    pub fn exit_code(&self) -> ExitCode {
        if self.loss_went_down() {
            ExitCode::SUCCESS
        } else {
            eprintln!(
                "FAILED: the loss did not go down: {:.4} at step 1, {:.4} at step {}{}",
                self.first_loss(),
                self.last_loss(),
                self.losses.len(),
                if self.last_loss().is_nan() {
                    " (NaN: lower --lr)"
                } else {
                    " (train for more --steps, or change --lr)"
                }
            );
            ExitCode::FAILURE
        }
    }

    /// The steps after the first (which compiles kernels and, on CUDA, autotunes), sorted.
    fn later_steps(&self) -> Vec<Duration> {
        let mut times = self.step_times.get(1..).unwrap_or_default().to_vec();
        times.sort();
        times
    }
}

/// The token ids of `text`: `tokenizer` (without special tokens), else its bytes modulo
/// `vocab`.
fn tokenize(
    text: &str,
    tokenizer: Option<&tokenizers::Tokenizer>,
    vocab: usize,
) -> Result<Vec<i64>, Box<dyn Error>> {
    let Some(tokenizer) = tokenizer else {
        return Ok(text.bytes().map(|b| (b as usize % vocab) as i64).collect());
    };
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| format!("encoding the training text: {e}"))?;
    if let Some(&id) = encoding.get_ids().iter().find(|&&i| i as usize >= vocab) {
        return Err(format!(
            "the tokenizer gives token id {id}, but the model's vocab_size is {vocab}: is \
             tokenizer.json this model's?"
        )
        .into());
    }
    Ok(encoding.get_ids().iter().map(|&i| i as i64).collect())
}

/// splitmix64 of `x`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Step `step`'s batch: `batch` windows of `seq + 1` tokens of `tokens` at positions drawn
/// from `seed`, as inputs (each window's first `seq`) and targets (its last `seq`), row-major
/// `[batch, seq]`.
fn batch_windows(
    tokens: &[i64],
    batch: usize,
    seq: usize,
    seed: u64,
    step: usize,
) -> (Vec<i64>, Vec<i64>) {
    // Windows start at 0..=len - seq - 1 (the caller checked len > seq).
    let starts = (tokens.len() - seq) as u64;
    let (mut inputs, mut targets) = (Vec::with_capacity(batch * seq), Vec::new());
    for b in 0..batch {
        let draw = splitmix64(seed ^ splitmix64((step * batch + b) as u64));
        let start = (draw % starts) as usize;
        inputs.extend_from_slice(&tokens[start..start + seq]);
        targets.extend_from_slice(&tokens[start + 1..start + seq + 1]);
    }
    (inputs, targets)
}

/// The fit plan of `--gpu-budget-gb [gib]` for training: the budget given, or the device's free
/// memory less the default reserve, with the training step's activations (no KV cache), the
/// gradients and Adam's state where `--state` puts it.
#[allow(clippy::too_many_arguments)]
fn training_plan<D: TargetDevice>(
    args: &Args,
    train: &TrainArgs,
    gib: Option<f64>,
    memory: Option<MemoryInfo>,
    config: &LlamaConfig,
    params: &[burn_offload::fit::FitParam],
    compute: &D,
    in_place: (bool, usize),
) -> Result<FitPlan, Box<dyn Error>> {
    let budget = match (gib, memory) {
        (Some(gib), _) => DeviceBudget::from_gib(gib)?,
        (None, Some(memory)) => {
            let (free, total) = memory().map_err(|e| format!("reading device memory: {e}"))?;
            DeviceBudget::new(free).reserve(DeviceBudget::default_reserve(total))
        }
        (None, None) => {
            return Err(
                "--gpu-budget-gb without a value plans for the memory the device \
                        reports free, which only --device cuda reports: give the GiB to plan \
                        for (e.g. --gpu-budget-gb 8)"
                    .into(),
            );
        }
    };
    let budget = match args.reserve_gb {
        Some(gib) if gib.is_finite() && (0.0..=OffloadPolicy::MAX_GIB).contains(&gib) => {
            budget.reserve((gib * GIB) as u64)
        }
        Some(gib) => return Err(format!("--reserve-gb {gib}: give a number of GiB >= 0").into()),
        None => budget,
    };
    let rows = train.batch * train.seq_len;
    let budget = budget
        .kv_cache(0)
        .activations(config.training_activation_bytes(
            train.batch,
            train.seq_len,
            args.dtype.size(),
        ));
    // Whether auto mode prefetches its copies, which sets the copies in flight.
    let calibration = device_calibration(compute)?;
    let plan = FitPlanner::new(budget)
        .training(OptimizerState::adam(train.state.placement()))
        .mode(args.mode)
        .reads_in_place(in_place.0, in_place.1)
        .rows(rows, rows)
        .auto_prefetches(calibration.copies_overlap_compute)
        .plan(params)?;
    Ok(plan)
}

/// `llama train` on the target `T`: see the module docs.
pub(super) fn train_on<T: OffloadTarget>(
    args: &Args,
    train: &TrainArgs,
    compute: T::Device,
    memory: Option<MemoryInfo>,
) -> Result<Training, Box<dyn Error>>
where
    T::Device: TargetDevice,
{
    type B<T> = Autodiff<OffloadBackend<T>>;
    if train.steps == 0 || train.batch == 0 || train.seq_len == 0 || train.log_every == 0 {
        return Err("--steps, --batch, --seq-len and --log-every must be at least 1".into());
    }
    if !(train.lr.is_finite() && train.lr >= 0.0) {
        return Err(format!("--lr {}: give a finite learning rate >= 0", train.lr).into());
    }
    if args.layers == Some(0) {
        return Err("--layers must be at least 1".into());
    }
    super::ranks::check(train)?;
    if train.ranks > 1 && train.rank.is_none() {
        return Err("--ranks N (N > 1) starts N processes: run it from the command line".into());
    }

    // The model directory's config and headers are checked before anything is allocated.
    let hf = args.model.as_ref().map(HfModel::open).transpose()?;
    let tokenizer = match hf.as_ref().and_then(|h| h.tokenizer.as_ref()) {
        Some(path) => Some(
            tokenizers::Tokenizer::from_file(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let mut config = match &hf {
        Some(hf) => {
            if train.seq_len > hf.max_position_embeddings {
                return Err(format!(
                    "--seq-len {} exceeds the model's max_position_embeddings {}",
                    train.seq_len, hf.max_position_embeddings
                )
                .into());
            }
            hf.config.clone()
        }
        None => {
            let mut config = LlamaConfig::preset(&args.preset)?;
            if let Some(layers) = args.layers {
                config.n_layers = layers;
            }
            config
        }
    };
    // The rotary tables cover a sequence.
    config.max_seq_len = train.seq_len;

    let (text, source) = match &train.data {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            TRAIN_TEXT.to_string(),
            "examples/llama/data/train.txt".to_string(),
        ),
    };
    let tokens = tokenize(&text, tokenizer.as_ref(), config.vocab_size)?;
    if tokens.len() <= train.seq_len {
        return Err(format!(
            "{source} gives {} tokens, but a sequence of --seq-len {} needs {} (its next tokens \
             are the targets): lower --seq-len or give a longer --data",
            tokens.len(),
            train.seq_len,
            train.seq_len + 1
        )
        .into());
    }

    let device = OffloadDevice::device(compute.clone());
    B::<T>::seed(&device, args.seed);
    let name = model_name(args, hf.as_ref());
    print_model(&name, args, &config);
    println!(
        "training text: {source}, {} bytes, {} tokens ({})",
        text.len(),
        tokens.len(),
        if tokenizer.is_some() {
            "the model's tokenizer.json"
        } else {
            "bytes as token ids modulo the vocabulary"
        }
    );

    let sampler = memory.map(MemorySampler::start).transpose()?;
    let state = OptimizerState::adam(train.state.placement());
    // Lazy init; the policy places the parameters before anything is allocated.
    let model: Llama<B<T>> = config.init(&device);
    let (params, _) = planner_params(&model, &config, None)?;
    let (policy, planned) = match args.gpu_budget_gb {
        Some(gib) => {
            let in_place = (
                compute.reads_host_in_place(),
                T::zero_copy_max_rows(&compute),
            );
            let plan = training_plan(
                args, train, gib, memory, &config, &params, &compute, in_place,
            )?;
            println!("{plan}");
            (plan.policy(), true)
        }
        None => {
            let mut policy = OffloadPolicy::from_gib(args.offload_gb)?
                .mode(args.mode)
                .optimizer_state(state);
            if let Some(list) = &args.offload_params {
                policy = policy.params(OffloadPolicy::parse_params(list)?);
            }
            (policy, false)
        }
    };
    let (model, report) = policy
        .apply(model)
        .map_err(|e| with_budget_hint(e, &params, planned))?;
    // The placements, and (the policy states the optimizer state) where weights, gradients
    // and state live: `report.training_memory`.
    println!("{report}");

    // Materialise: offloaded tensors are created once, directly in host memory.
    let mut model = model;
    if let Some(hf) = hf.as_ref() {
        model = load_directory(hf, model, args.dtype.burn())?;
    }
    if let Some(path) = &args.weights {
        load_weights(&mut model, path)?;
    }
    materialize(&model, &report);
    B::<T>::sync(&device)?;
    // With --rank: register (waits for every rank), and start from rank 0's weights.
    let part = RankPart::<T>::join(train, &device)?;
    if let Some(part) = &part {
        model = part.broadcast(model)?;
        B::<T>::sync(&device)?;
        let rows = part.slice(train.batch);
        println!(
            "rank {} of {}: sequences {}..{} of each step's batch; weights from rank 0",
            part.rank, part.ranks, rows.start, rows.end
        );
    }

    let mut optim =
        OffloadOptimizer::with_state(AdamConfig::new().init::<B<T>, Llama<B<T>>>(), &report);
    let loss_fn = CrossEntropyLossConfig::new().init::<B<T>>(&device);
    let (batch, seq) = (train.batch, train.seq_len);
    // The sequences of each step's batch this process trains on.
    let rows = part.as_ref().map_or(0..batch, |p| p.slice(batch));
    println!(
        "training: {} steps of {batch} x {seq} tokens, Adam (lr {}), state placement {}",
        train.steps, train.lr, state.placement
    );
    reset_op_stats();
    reset_host_memory_peak();
    let stats_before = op_stats();
    let mut losses = Vec::with_capacity(train.steps);
    let mut step_times = Vec::with_capacity(train.steps);
    let mut allocations_after_first = 0;
    for step in 0..train.steps {
        let (inputs, targets) = batch_windows(&tokens, batch, seq, args.seed, step);
        let (inputs, targets) = (
            inputs[rows.start * seq..rows.end * seq].to_vec(),
            targets[rows.start * seq..rows.end * seq].to_vec(),
        );
        let n = rows.len();
        let start = Instant::now();
        let inputs = Tensor::<B<T>, 2, Int>::from_data(TensorData::new(inputs, [n, seq]), &device);
        let targets =
            Tensor::<B<T>, 1, Int>::from_data(TensorData::new(targets, [n * seq]), &device);
        let logits = model.forward(inputs, &mut Cache::new(config.n_layers));
        let vocab = logits.dims()[2];
        let loss = loss_fn.forward(logits.reshape([n * seq, vocab]), targets);
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let value = match &part {
            // The gradients' and the loss's means over the ranks.
            Some(part) => {
                grads = part.all_reduce(grads, &model)?;
                part.mean_loss(loss.inner())?
            }
            None => loss.into_data().iter::<f32>().next().unwrap_or(f32::NAN),
        };
        model = optim.step(train.lr, model, grads);
        B::<T>::sync(&device)?;
        step_times.push(start.elapsed());
        losses.push(value);
        if step == 0 {
            allocations_after_first = host_memory_stats().total_allocations;
        }
        let done = step + 1;
        if done % train.log_every == 0 || done == train.steps {
            let from = (done - 1) / train.log_every * train.log_every;
            let window = &losses[from..];
            println!(
                "step {done:>5}/{}: loss {value:.4} (mean of steps {}-{done}: {:.4}), {:.2?} per \
                 step",
                train.steps,
                from + 1,
                window.iter().sum::<f32>() / window.len() as f32,
                step_times[from..].iter().sum::<Duration>() / window.len() as u32,
            );
        }
    }
    let bus = BusBytes::between(&stats_before, &op_stats(), train.steps);
    let host = host_memory_stats();
    let device_peak = sampler.map(MemorySampler::finish).transpose()?;
    if let Some(path) = &args.save_weights {
        save_weights(&model, path)?;
        println!("saved the trained weights to {path}");
    }
    let rank = match part {
        Some(part) => Some(part.finish(&model, &losses)?),
        None => None,
    };
    let training = Training {
        tokens: tokens.len(),
        losses,
        step_times,
        state_memory: optim.state_memory(),
        state_traffic: optim.state_traffic(),
        bus,
        report,
        host,
        later_allocations: host.total_allocations - allocations_after_first,
        device_peak,
        rank,
    };
    print_summary(&name, args, train, &training);
    if let Some(rank) = &training.rank {
        // Last: the --ranks launcher reads it.
        println!("{}", rank.line());
    }
    Ok(training)
}

/// The end of a run: loss, step time, memory and bytes moved.
fn print_summary(name: &str, args: &Args, train: &TrainArgs, t: &Training) {
    let report = &t.report;
    let memory: TrainingMemory = report.training_memory(None);
    let (first, last) = (t.first_loss(), t.last_loss());
    println!("--- training summary ---");
    println!(
        "model             {}",
        name.strip_prefix("model ").unwrap_or(name)
    );
    println!(
        "params            {} tensors, {} ({} offloaded in {} tensors)",
        report.params.len(),
        HumanBytes(report.total_bytes()),
        HumanBytes(report.offloaded_bytes()),
        report.offloaded_tensors(),
    );
    println!(
        "dtype             {} (weights, gradients and Adam's state)",
        args.dtype
    );
    println!("mode              {}", report.mode);
    println!(
        "optimizer         Adam, lr {}, state placement {}",
        train.lr,
        train.state.placement()
    );
    println!(
        "steps             {} x {} sequences x {} tokens, drawn from the text's {} tokens",
        t.losses.len(),
        train.batch,
        train.seq_len,
        t.tokens
    );
    println!(
        "loss              first {first:.4} (step 1), last {last:.4} (step {}): {}",
        t.losses.len(),
        if t.loss_went_down() {
            format!("down {:.4}", first - last)
        } else {
            "NOT down".to_string()
        }
    );
    let later = t.later_steps();
    let first_step = t.step_times.first().copied().unwrap_or_default();
    match (later.first(), later.last()) {
        (Some(fastest), Some(slowest)) => {
            let median = later[later.len() / 2];
            println!(
                "step time         first {first_step:.2?} (on a GPU: kernel compilation, autotuning), \
                 then fastest {fastest:.2?}, median {median:.2?}, slowest {slowest:.2?} over \
                 steps 2-{}; {:.0} tokens/s at the median",
                t.step_times.len(),
                (train.batch * train.seq_len) as f64 / median.as_secs_f64()
            );
        }
        _ => println!("step time         {first_step:.2?} (one step)"),
    }
    let device = memory.device_total();
    let host = memory.host_total();
    println!(
        "training memory   device: weights {}, gradients {}, state {}; host: weights {}, state \
         {} (the report's estimate; activations not counted)",
        HumanBytes(device.weights),
        HumanBytes(device.gradients),
        HumanBytes(device.state),
        HumanBytes(host.weights),
        HumanBytes(host.state),
    );
    println!(
        "optimizer state   device {}, host {} (measured tensor by tensor after the last step)",
        HumanBytes(t.state_memory.device),
        HumanBytes(t.state_memory.host),
    );
    let steps = t.losses.len() as u64;
    let traffic = &t.state_traffic;
    let weights = t.bus.per_step().unwrap_or(0);
    println!(
        "bytes per step    {} ({} B), averaged over {steps} steps: offloaded weights uploaded {} \
         + read in place {} (op stats), optimizer state uploaded {} + written back {} (the \
         optimizer's state traffic; step 1 uploads none: there is no state yet)",
        HumanBytes(weights + traffic.bytes_per_step()),
        weights + traffic.bytes_per_step(),
        HumanBytes(t.bus.uploaded / steps),
        HumanBytes(t.bus.in_place / steps),
        HumanBytes(traffic.uploaded_bytes / steps),
        HumanBytes(traffic.downloaded_bytes / steps),
    );
    println!(
        "                  besides: the updated offloaded weights written back into their host \
         buffers after each step, {}",
        HumanBytes(report.offloaded_bytes()),
    );
    println!(
        "host memory       {} live ({} pinned) in {} buffers, peak {} during training; {} host \
         allocations after the first step",
        HumanBytes(t.host.live_bytes as u64),
        HumanBytes(t.host.live_pinned_bytes as u64),
        t.host.live_allocations,
        HumanBytes(t.host.peak_bytes as u64),
        t.later_allocations,
    );
    if let Some(peak) = &t.device_peak {
        println!(
            "device memory     peak {:.2} GiB used of {:.2} GiB ({:.2} GiB before the model was \
             created; sampled every 10 ms)",
            peak.peak_used as f64 / GIB,
            peak.total as f64 / GIB,
            peak.baseline_used as f64 / GIB
        );
    }
}
