//! The fit planner on the example's LLaMA model: plans for stated device memories (which
//! tensors, totals, the failure message), the plan's policy applied, and the predicted decode
//! step against the measured one on the CPU target.

use crate::llama::model;

use std::time::{Duration, Instant};

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayDevice;
use burn::tensor::{Int, Tensor, TensorData};
use burn_offload::auto::{Calibration, RowRate};
use burn_offload::fit::{DeviceBudget, FitParam, FitPlan, FitPlanner, ParamUse, fit_params};
use burn_offload::inner::TargetDevice;
use burn_offload::{OffloadBackend, OffloadDevice, OffloadError, OffloadMode};

use model::{Cache, Llama, LlamaConfig};

type B = OffloadBackend<NdArray>;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn device() -> OffloadDevice<NdArrayDevice> {
    OffloadDevice::device(NdArrayDevice::Cpu)
}

/// A lazy 7B (LLaMA-2 shapes, f32 on this target: 25.1 GiB): nothing is allocated.
fn llama_7b() -> (LlamaConfig, Llama<B>) {
    let mut config = LlamaConfig::preset("7b").unwrap();
    config.max_seq_len = 64;
    let model = config.init(&device());
    (config, model)
}

/// Batch 1, 32 prompt tokens, 32 more generated.
fn budget_7b(config: &LlamaConfig, gib: f64) -> DeviceBudget {
    DeviceBudget::from_gib(gib)
        .unwrap()
        .kv_cache(config.kv_cache_bytes(1, 64, 4))
        .activations(config.activation_bytes(1, 32, 64, 4))
}

fn offloaded(plan: &FitPlan) -> Vec<&str> {
    plan.offloaded().map(|p| p.path.as_str()).collect()
}

/// The plan fits, and is minimal: keeping its last-chosen tensor resident would not fit.
fn assert_fits_tightly(plan: &FitPlan, last: &FitParam) {
    let b = &plan.budget;
    assert!(plan.device_bytes() <= b.device_bytes, "{plan}");
    assert!(plan.device_bytes() + last.bytes > b.device_bytes, "{plan}");
    assert_eq!(
        plan.device_bytes(),
        plan.resident_bytes()
            + plan.staging_bytes
            + b.kv_cache_bytes
            + b.activation_bytes
            + b.reserve_bytes
    );
}

#[test]
fn plans_for_a_7b_model_on_stated_devices() {
    let (config, model) = llama_7b();
    let params = fit_params(&model, &["embed"]);
    let total: u64 = params.iter().map(|p| p.bytes).sum();
    assert_eq!(total, config.num_params() as u64 * 4);
    assert_eq!(params[0].usage, ParamUse::Gathered);
    assert!(
        params
            .iter()
            .filter(|p| p.shape.len() == 1)
            .all(|p| p.usage == ParamUse::Small)
    );

    // A 40 GiB card: everything stays.
    let plan = FitPlanner::new(budget_7b(&config, 40.0))
        .plan(&params)
        .unwrap();
    assert_eq!(plan.offloaded_bytes(), 0);

    // A 24 GiB card in uva: the embedding table first (a step gathers one row of it), then
    // the largest matrix (the head), then the MLP matrices in module order.
    let plan = FitPlanner::new(budget_7b(&config, 24.0))
        .mode(OffloadMode::Uva)
        .plan(&params)
        .unwrap();
    let chosen = offloaded(&plan);
    assert_eq!(chosen[0], "embed.weight");
    assert_eq!(*chosen.last().unwrap(), "lm_head.weight");
    let mlp: Vec<&str> = chosen[1..chosen.len() - 1].to_vec();
    let expected: Vec<String> = (0..32)
        .flat_map(|l| ["gate", "up", "down"].map(|m| format!("layers.{l}.mlp.{m}.weight")))
        .take(mlp.len())
        .collect();
    assert_eq!(mlp, expected);
    assert_eq!(plan.staging_bytes, 0);
    let last = params
        .iter()
        .find(|p| p.path == *mlp.last().unwrap())
        .unwrap();
    assert_fits_tightly(&plan, last);
    // 2.0 GiB reserve (1/16 + 0.5 GiB), 64 MiB of KV cache (2 x 32 layers x 64 positions x
    // 4096 x 4 bytes).
    assert_eq!(plan.budget.reserve_bytes, 24 * GIB / 16 + 512 * MIB);
    assert_eq!(plan.budget.kv_cache_bytes, 64 * MIB);
    let text = plan.to_string();
    assert!(text.starts_with("fit plan for a device budget of 24.0 GiB (mode uva):"));
    assert!(
        text.contains("gathered tables offloaded: embed.weight (read in place"),
        "{text}"
    );

    // In copy mode the copies need room.
    let copy = FitPlanner::new(budget_7b(&config, 24.0))
        .mode(OffloadMode::Copy)
        .plan(&params)
        .unwrap();
    // Two copies of the head (1000 MiB) would cost more room than they save: it stays, and
    // the 64 MiB attention matrices go, two of them in flight.
    assert!(!offloaded(&copy).contains(&"lm_head.weight"), "{copy}");
    assert!(!offloaded(&copy).contains(&"embed.weight"), "{copy}");
    let largest = copy.offloaded().map(|p| p.bytes).max().unwrap();
    assert_eq!(largest, 4096 * 4096 * 4);
    assert_eq!(copy.staging_bytes, 2 * largest);
    assert!(copy.device_bytes() <= copy.budget.device_bytes);

    // The plan's policy places exactly those tensors, without warnings.
    let (_, report) = plan.policy().apply(model).unwrap();
    let placed: Vec<&str> = report.offloaded().map(|p| p.path.as_str()).collect();
    let mut sorted = chosen.clone();
    sorted.sort();
    let mut placed_sorted = placed.clone();
    placed_sorted.sort();
    assert_eq!(placed_sorted, sorted);
    assert_eq!(report.offloaded_bytes(), plan.offloaded_bytes());
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
}

#[test]
fn a_device_too_small_for_the_7b_fails_before_loading_with_the_minimum() {
    let (config, model) = llama_7b();
    let params = fit_params(&model, &["embed"]);
    let err = FitPlanner::new(budget_7b(&config, 1.0))
        .mode(OffloadMode::Copy)
        .plan(&params)
        .unwrap_err();
    let OffloadError::DoesNotFit {
        budget_bytes,
        minimum_bytes,
        ..
    } = err.clone()
    else {
        panic!("{err}")
    };
    assert_eq!(budget_bytes, GIB);
    let message = err.to_string();
    assert!(
        message.starts_with(
            "the model does not fit a device budget of 1.00 GiB: the placement that needs the \
             least device memory still needs"
        ) && message.contains("copies in flight (1000 MiB)")
            && message.contains("give a budget of at least"),
        "{message}"
    );
    // The minimum it names is enough, given as the budget (with the default reserve, which
    // grows with it), and a little less is not.
    let at = |bytes: u64| {
        let b = DeviceBudget::new(bytes)
            .kv_cache(config.kv_cache_bytes(1, 64, 4))
            .activations(config.activation_bytes(1, 32, 64, 4));
        FitPlanner::new(b).mode(OffloadMode::Copy).plan(&params)
    };
    let plan = at(minimum_bytes).unwrap();
    assert!(plan.device_bytes() <= minimum_bytes);
    assert!(at(minimum_bytes - MIB).is_err());
}

/// Median time of `steps` decode steps after a 4-token prompt.
fn decode_step(model: &Llama<B>, steps: usize) -> Duration {
    let dev = device();
    let mut cache = Cache::for_model(model);
    let prompt = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4], [1, 4]), &dev);
    let mut next = model.forward_last(prompt, &mut cache).argmax(1);
    let _ = next.to_data();
    let mut times = Vec::new();
    for _ in 0..steps {
        let start = Instant::now();
        next = model.forward_last(next, &mut cache).argmax(1);
        let _ = next.to_data();
        times.push(start.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// The fastest of two calibrations, rate by rate: what the device does when nothing else runs.
fn fastest(a: Calibration, b: Calibration) -> Calibration {
    assert_eq!(
        a.rows.iter().map(|r| r.rows).collect::<Vec<_>>(),
        b.rows.iter().map(|r| r.rows).collect::<Vec<_>>()
    );
    Calibration {
        upload_latency_s: a.upload_latency_s.min(b.upload_latency_s),
        upload_bytes_per_s: a.upload_bytes_per_s.max(b.upload_bytes_per_s),
        rows: a
            .rows
            .iter()
            .zip(&b.rows)
            .map(|(a, b)| RowRate {
                rows: a.rows,
                zero_copy_bytes_per_s: a.zero_copy_bytes_per_s.max(b.zero_copy_bytes_per_s),
                device_matmul_bytes_per_s: a
                    .device_matmul_bytes_per_s
                    .max(b.device_matmul_bytes_per_s),
            })
            .collect(),
        seconds: a.seconds.min(b.seconds),
        ..a
    }
}

/// The prediction is made of weight reads at the calibrated rates; on a model whose weights
/// dominate a decode step (the `small` preset's shapes, 81 MiB in f32), the measured step is
/// near it, in uva (read in place) and in copy (copied per use). Seen here: 0.65-0.73x in a
/// release build (its matrices sit in the CPU's caches more than the 16 MiB calibration
/// weight), 1.1-1.2x in a debug build; the test allows 0.4-2.5x.
///
/// Other tests run beside this one (one process, parallel threads): the calibration and the
/// steps are measured in turns, three rounds (up to six while a ratio is out of range), and
/// each side keeps its fastest round, so that a busy moment slows neither side alone.
#[test]
fn the_predicted_decode_step_is_near_the_measured_one_on_the_cpu() {
    let mut config = LlamaConfig::preset("small").unwrap();
    config.max_seq_len = 32;
    let runs: Vec<_> = [OffloadMode::Uva, OffloadMode::Copy]
        .into_iter()
        .map(|mode| {
            let model: Llama<B> = config.init(&device());
            let budget = DeviceBudget::new(48 * MIB)
                .reserve(0)
                .kv_cache(config.kv_cache_bytes(1, 32, 4))
                .activations(config.activation_bytes(1, 4, 32, 4));
            let plan = FitPlanner::new(budget)
                .mode(mode)
                .plan(&fit_params(&model, &["embed"]))
                .unwrap();
            assert!(plan.offloaded_bytes() > 30 * MIB, "{plan}");
            let (model, _) = plan.policy().apply(model).unwrap();
            let _warm = decode_step(&model, 2);
            (mode, plan, model)
        })
        .collect();
    let mut calibration: Option<Calibration> = None;
    let mut measured = vec![f64::INFINITY; runs.len()];
    let ratio_of = |calibration: &Calibration, plan: &FitPlan, measured: f64| {
        let predicted = plan.estimate(calibration, 1);
        (measured / predicted.seconds, predicted)
    };
    // Three rounds at least; up to six while a ratio is out of range (a busy machine during
    // every calibration so far: seen in CI with the wgpu tests beside it, 0.35x).
    for round in 0..6 {
        let measuring = NdArrayDevice::Cpu.calibrate(true).unwrap();
        calibration = Some(match calibration {
            Some(best) => fastest(best, measuring),
            None => measuring,
        });
        // The best of the medians: the bound is about the model, not about a busy machine.
        for ((_, _, model), best) in runs.iter().zip(&mut measured) {
            *best = best.min(decode_step(model, 5).as_secs_f64());
        }
        let current = calibration.as_ref().expect("just set");
        let in_range = runs
            .iter()
            .zip(&measured)
            .all(|((_, plan, _), &m)| (0.4..=2.5).contains(&ratio_of(current, plan, m).0));
        if round >= 2 && in_range {
            break;
        }
    }
    let calibration = calibration.expect("three rounds");
    for ((mode, plan, _), measured) in runs.iter().zip(measured) {
        let (ratio, predicted) = ratio_of(&calibration, plan, measured);
        println!(
            "{mode}: predicted {predicted}, measured {:.3} ms (ratio {ratio:.2})",
            measured * 1e3
        );
        assert!(
            (0.4..=2.5).contains(&ratio),
            "{mode}: measured {:.3} ms against predicted {predicted} (calibration: {calibration})",
            measured * 1e3
        );
    }
}

/// Training mode: gradients and Adam's state count against the budget where they live.
#[test]
fn training_plans_count_gradients_and_optimizer_state() {
    use burn_offload::{OptimizerState, StatePlacement};
    let (config, model) = llama_7b();
    let params = fit_params(&model, &["embed"]);
    let weights: u64 = params.iter().map(|p| p.bytes).sum();
    let plan_for = |gib: f64, placement| {
        FitPlanner::new(budget_7b(&config, gib))
            .training(OptimizerState::adam(placement))
            .plan(&params)
    };

    // State on the device: gradients and state (3 × 25.1 GiB) stay whatever is offloaded, so
    // an 80 GiB card cannot train it; the error names the least budget, and that budget plans.
    let Err(OffloadError::DoesNotFit {
        minimum_bytes,
        breakdown,
        ..
    }) = plan_for(80.0, StatePlacement::Device)
    else {
        panic!("a 7B model with Adam's state on the device fits 80 GiB");
    };
    assert!(minimum_bytes > 3 * weights, "{minimum_bytes} {breakdown}");
    assert!(
        breakdown.contains("gradients") && breakdown.contains("optimizer state"),
        "{breakdown}"
    );
    let least = plan_for(minimum_bytes as f64 / GIB as f64, StatePlacement::Device).unwrap();
    assert!(least.device_bytes() <= least.budget.device_bytes, "{least}");

    // State with the offloaded weights: offloading a matrix frees its weight and state.
    let with = plan_for(80.0, StatePlacement::WithOffloaded).unwrap();
    // All state in host memory: only weights and gradients on the device.
    let host = plan_for(80.0, StatePlacement::Host).unwrap();
    for plan in [&with, &host] {
        let parts = plan.training_bytes();
        assert_eq!(parts.gradients, weights, "{plan}");
        assert_eq!(parts.weights, plan.resident_bytes());
        assert_eq!(
            plan.device_bytes(),
            parts.weights
                + parts.gradients
                + parts.state
                + plan.staging_bytes
                + plan.state_staging_bytes
                + plan.budget.kv_cache_bytes
                + plan.budget.activation_bytes
                + plan.budget.reserve_bytes,
            "{plan}"
        );
        assert!(plan.device_bytes() <= plan.budget.device_bytes, "{plan}");
        assert!(plan.to_string().contains("optimizer state"), "{plan}");
    }
    assert_eq!(host.training_bytes().state, 0);
    assert_eq!(with.training_bytes().state, 2 * with.resident_bytes());
    assert!(host.state_staging_bytes > 0 && with.state_staging_bytes > 0);
    // Host state leaves more of the card to weights: fewer offloaded.
    assert!(
        host.offloaded_bytes() < with.offloaded_bytes(),
        "{host}\n{with}"
    );
    // The plan's policy says the same state, and its budget covers the weights with their
    // state (so the policy offloads exactly the plan's tensors).
    let policy = with.policy();
    assert_eq!(policy.optimizer_state, with.training);
    assert_eq!(policy.max_bytes, 3 * with.offloaded_bytes());
    let (_, report) = policy.apply(model).unwrap();
    assert_eq!(report.offloaded_bytes(), with.offloaded_bytes());
    let memory = report.training_memory(None);
    assert_eq!(memory.device_total().state, with.training_bytes().state);
    assert_eq!(memory.host_total().state, 2 * with.offloaded_bytes());
}
