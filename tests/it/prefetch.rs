//! Prefetch mode: same results as the other modes, prefetched copies used after the first
//! forward, a changed read order falls back and relearns, the lookahead bound holds, and
//! nothing outlives the model.
//!
//! The tests that read the process-wide counters or count the process's threads run in a
//! process of their own (`own_process!`).

use crate::common;

use crate::llama::model;

use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::activation::relu;
use burn_offload::{
    OffloadError, OffloadMode, OffloadPolicy, PrefetchStats, host_memory_stats, op_stats,
    prefetch_stats, reset_op_stats, reset_prefetch_stats,
};
use common::{B, NET_BYTES, Net, device};

/// Why the tests that start with `own_process!` need a process of their own.
const OWN_PROCESS: &str = "prefetch_stats() sums every model's counters in the process, and the prefetch threads are counted in /proc/self/task";

fn prefetch(lookahead_bytes: u64) -> OffloadMode {
    OffloadMode::prefetch(lookahead_bytes)
}

/// Zeroes the process-wide counters (each model has its own prefetcher: nothing to drop).
fn fresh() {
    reset_prefetch_stats();
    reset_op_stats();
}

/// An initialised resident `Net` (every mode gets a copy of the same weights).
fn base() -> Net<B> {
    let net = Net::<B>::new(&device());
    let _ = common::values(&net); // initialise the lazy parameters
    net
}

/// `base` with every parameter offloaded, read in `mode` (sets the device's mode).
fn offloaded(base: &Net<B>, mode: OffloadMode) -> Net<B> {
    let (net, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(mode)
        .apply(base.clone())
        .unwrap();
    assert_eq!(report.offloaded_tensors(), 14);
    net
}

/// Deterministic input `[2, seq, D_MODEL]`.
fn input(seq: usize, seed: usize) -> Tensor<B, 3> {
    let n = 2 * seq * common::D_MODEL;
    let values: Vec<f32> = (0..n)
        .map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) / 7.0)
        .collect();
    Tensor::from_data(
        TensorData::new(values, [2, seq, common::D_MODEL]),
        &device(),
    )
}

/// Prefill-like and decode-like forwards in turn.
fn inputs(n: usize) -> Vec<Tensor<B, 3>> {
    (0..n)
        .map(|i| input(if i % 2 == 0 { 3 } else { 1 }, i))
        .collect()
}

fn run(net: &Net<B>, xs: &[Tensor<B, 3>]) -> Vec<Vec<f32>> {
    xs.iter()
        .map(|x| net.forward(x.clone()).into_data().to_vec::<f32>().unwrap())
        .collect()
}

/// The layers in reverse order, then the head: the same weights read in another order.
fn forward_reversed(net: &Net<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let mut x = x;
    for layer in net.layers.iter().rev() {
        let h = layer.mlp_norm.forward(x.clone());
        x = x + layer.mlp.down.forward(relu(layer.mlp.up.forward(h)));
    }
    net.head.forward(x)
}

fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], rel: f32) {
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!((x - y).abs() <= rel * (1.0 + y.abs()), "{x} vs {y}");
    }
    assert_eq!(a.iter().flatten().count(), b.iter().flatten().count());
}

/// Waits (up to 2 s) until `f` holds of the prefetch counters.
fn eventually(what: &str, f: impl Fn(&PrefetchStats) -> bool) {
    let start = Instant::now();
    while !f(&prefetch_stats()) {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{what}: {:?}",
            prefetch_stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Once a cycle is learned: waits until the background thread has a copy ready or in flight,
/// so that the next request is a hit however slowly the thread got going (the test models
/// are tiny: a whole forward can run before a new thread is first scheduled).
fn warm() {
    eventually("the thread prefetches", |s| {
        s.alive_bytes > 0 || s.prefetched > 0
    });
}

#[test]
fn prefetch_matches_copy_uva_and_resident() {
    common::own_process!(OWN_PROCESS);
    fresh();
    let base = base();
    let xs = inputs(8);
    let resident = run(&base, &xs);

    let copy = offloaded(&base, OffloadMode::Copy);
    reset_op_stats();
    let copy_out = run(&copy, &xs[..1]);
    let per_forward = op_stats().transient_uploads;
    assert!(per_forward >= 14, "{per_forward}");
    let copy_out = [copy_out, run(&copy, &xs[1..])].concat();
    drop(copy);

    let uva = run(&offloaded(&base, OffloadMode::Uva), &xs);

    let net = offloaded(&base, prefetch(1 << 20));
    reset_prefetch_stats();
    reset_op_stats();
    let mut prefetched = run(&net, &xs[..2]); // learns the cycle
    warm();
    prefetched.extend(run(&net, &xs[2..]));
    let stats = prefetch_stats();

    // A prefetched copy is the same upload as copy mode's: identical bytes.
    assert_eq!(prefetched, copy_out);
    assert_close(&prefetched, &resident, 1e-5);
    assert_close(&uva, &resident, 1e-5);

    // Every op read a copy (prefetch never reads in place).
    assert_eq!(op_stats().zero_copy_ops, 0);
    let requests = per_forward * xs.len() as u64;
    assert_eq!(op_stats().transient_uploads, requests);
    // Misses: the first forward, and the request that closed the cycle; then predictions.
    assert_eq!(stats.relearns, 1, "{stats:?}");
    assert_eq!(stats.mismatches, 0, "{stats:?}");
    assert_eq!(stats.misses, per_forward + 1, "{stats:?}");
    assert_eq!(
        stats.hits + stats.late,
        requests - stats.misses,
        "{stats:?}"
    );
    assert!(stats.hits > 0, "{stats:?}");
    assert!(stats.peak_alive_bytes <= 1 << 20);
    // The thread's copies took time to queue (here: memcpys), and it is counted.
    assert!(stats.prefetched > 0 && stats.upload_ns > 0, "{stats:?}");
    // The CPU target cannot tell its device memory (and the probe is off).
    assert_eq!(stats.peak_device_bytes, 0, "{stats:?}");
    drop(net);
    fresh();
}

#[test]
fn a_changed_order_falls_back_and_relearns() {
    common::own_process!(OWN_PROCESS);
    fresh();
    let base = base();
    let xs = inputs(4);
    let forward_a = |net: &Net<B>| run(net, &xs);
    let forward_b = |net: &Net<B>| {
        xs.iter()
            .map(|x| {
                forward_reversed(net, x.clone())
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    // Only the head: a subset of A's reads.
    let forward_c = |net: &Net<B>| {
        xs.iter()
            .map(|x| {
                net.head
                    .forward(x.clone())
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };

    let copy = offloaded(&base, OffloadMode::Copy);
    let (ref_a, ref_b, ref_c) = (forward_a(&copy), forward_b(&copy), forward_c(&copy));
    drop(copy);

    let net = offloaded(&base, prefetch(1 << 20));
    reset_prefetch_stats();
    assert_eq!(forward_a(&net), ref_a);
    assert_eq!(forward_a(&net), ref_a);
    let learned = prefetch_stats();
    assert_eq!(learned.relearns, 1, "{learned:?}");
    assert_eq!(learned.mismatches, 0, "{learned:?}");

    assert_eq!(forward_b(&net), ref_b);
    assert_eq!(forward_b(&net), ref_b);
    let after_b = prefetch_stats();
    assert!(after_b.mismatches > 0, "{after_b:?}");
    assert!(after_b.relearns > learned.relearns, "{after_b:?}");

    assert_eq!(forward_c(&net), ref_c);
    assert_eq!(forward_a(&net), ref_a);
    assert_eq!(forward_a(&net), ref_a);
    let again = prefetch_stats();
    assert!(again.mismatches > after_b.mismatches, "{again:?}");
    assert!(again.relearns > after_b.relearns, "{again:?}");
    // A is learned again: its last forward is all predicted.
    let before_last = prefetch_stats();
    assert_eq!(forward_a(&net), ref_a);
    let last = prefetch_stats();
    assert_eq!(last.misses, before_last.misses, "{last:?}");
    assert_eq!(last.mismatches, before_last.mismatches, "{last:?}");
    assert!(last.hits + last.late > before_last.hits + before_last.late);
    drop(net);
    fresh();
}

#[test]
fn the_lookahead_bound_holds() {
    common::own_process!(OWN_PROCESS);
    fresh();
    let base = base();
    let xs = inputs(12);
    let copy = run(&offloaded(&base, OffloadMode::Copy), &xs);

    // Room for two of the largest weights (512 B) but not for the model (NET_BYTES).
    // Below the largest weight: those are never prefetched, the small ones are.
    for lookahead in [1024, 256] {
        assert!(lookahead < NET_BYTES);
        let net = offloaded(&base, prefetch(lookahead));
        reset_prefetch_stats();
        assert_eq!(run(&net, &xs[..2]), copy[..2]);
        warm();
        assert_eq!(run(&net, &xs[2..]), copy[2..]);
        let stats = prefetch_stats();
        assert!(stats.prefetched > 0, "{stats:?}");
        assert!(stats.hits > 0, "{stats:?}");
        assert!(
            stats.peak_alive_bytes <= lookahead,
            "lookahead {lookahead}: {stats:?}"
        );
        drop(net);
        fresh();
    }
}

/// Threads of this process named like the prefetch thread (Linux; `None` elsewhere).
fn prefetch_threads() -> Option<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    Some(
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("burn-offload-pr"))
            .count(),
    )
}

/// Waits (up to 2 s) until no prefetch thread is left (Linux; elsewhere it returns at once).
fn no_prefetch_threads() {
    let start = Instant::now();
    while prefetch_threads().is_some_and(|n| n > 0) {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "a prefetch thread is left"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn nothing_outlives_the_model() {
    common::own_process!(OWN_PROCESS);
    fresh();
    let before = host_memory_stats();
    {
        let base = base();
        let net = offloaded(&base, prefetch(1 << 20));
        drop(base);
        let xs = inputs(6);
        let _ = run(&net, &xs);
        assert!(host_memory_stats().live_bytes >= before.live_bytes + NET_BYTES as usize);
        eventually("copies are prefetched", |s| s.alive_bytes > 0);
        drop(net);
    }
    // The learned order holds weak references: host memory is freed at once.
    assert_eq!(host_memory_stats().live_bytes, before.live_bytes);
    assert_eq!(
        host_memory_stats().live_allocations,
        before.live_allocations
    );
    // The thread notices the dropped buffers and frees its prefetched copies.
    eventually("prefetched copies are freed", |s| s.alive_bytes == 0);

    // The model (and with it its context) is gone: its prefetch thread ends.
    no_prefetch_threads();
}

#[test]
fn the_thread_releases_its_uploads_only_once_the_model_is_gone() {
    common::own_process!(OWN_PROCESS);
    fresh();
    // A thread of an earlier test may still be releasing on its way out.
    no_prefetch_threads();
    reset_prefetch_stats();
    let base = base();
    let xs = inputs(8);
    let copy = run(&offloaded(&base, OffloadMode::Copy), &xs);
    // The lookahead fills up again and again: the thread runs out of copies to make after
    // nearly every copy. A release then (on CUDA: waiting for every copy queued on its
    // stream, on the thread that also launches the ops) would serialise copies and compute.
    let net = offloaded(&base, prefetch(1024));
    assert_eq!(run(&net, &xs[..2]), copy[..2]);
    warm();
    assert_eq!(run(&net, &xs[2..]), copy[2..]);
    let running = prefetch_stats();
    assert!(running.hits > 0, "{running:?}");
    assert_eq!(
        running.releases, 0,
        "released while the model ran: {running:?}"
    );

    // Once the model is dropped the thread forgets its order and releases, once.
    drop(net);
    drop(base);
    eventually("the thread releases", |s| s.releases == 1);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(prefetch_stats().releases, 1, "{:?}", prefetch_stats());
    fresh();
}

#[test]
fn a_model_dropped_while_another_runs_is_released_once() {
    common::own_process!(OWN_PROCESS);
    fresh();
    no_prefetch_threads();
    let xs = inputs(8);
    let (base_a, base_b) = (base(), base());
    let copy_b = run(&offloaded(&base_b, OffloadMode::Copy), &xs);
    let a = offloaded(&base_a, prefetch(1024));
    // The same configuration again: the device keeps its prefetcher.
    let b = offloaded(&base_b, prefetch(1024));
    reset_prefetch_stats();
    let _ = run(&a, &xs[..2]);
    warm();
    let _ = run(&a, &xs[2..]);
    assert!(prefetch_stats().hits > 0, "{:?}", prefetch_stats());
    drop(a);
    drop(base_a);
    // The other model at once: its requests replace the dropped one's order (mostly before
    // the thread's liveness check notices the dead buffers) and keep the thread busy, so it
    // never holds nothing; the dead sources of its copies still make it release, once.
    for _ in 0..20 {
        assert_eq!(run(&b, &xs), copy_b);
    }
    eventually("the dropped model's copies are released", |s| {
        s.releases == 1
    });
    for _ in 0..5 {
        assert_eq!(run(&b, &xs), copy_b);
    }
    let stats = prefetch_stats();
    assert_eq!(stats.releases, 1, "{stats:?}");
    assert!(stats.hits > 0, "{stats:?}");
    drop(b);
    fresh();
}

#[test]
fn llama_greedy_tokens_match_in_prefetch_mode() {
    common::own_process!(OWN_PROCESS);
    fresh();
    let config = model::LlamaConfig::preset("tiny").unwrap();
    let resident: model::Llama<B> = config.init(&device());
    let generate = |m: &model::Llama<B>| {
        let mut cache = model::Cache::for_model(m);
        let prompt = TensorData::new(vec![1i64, 5, 9, 42, 7, 3], [1, 6]);
        let mut next = m
            .forward_last(
                Tensor::<B, 2, Int>::from_data(prompt, &device()),
                &mut cache,
            )
            .argmax(1);
        let mut tokens = Vec::new();
        for _ in 0..8 {
            tokens.extend(next.to_data().to_vec::<i64>().unwrap());
            next = m.forward_last(next, &mut cache).argmax(1);
        }
        tokens
    };
    let expected = generate(&resident);
    let (copy, _) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Copy)
        .apply(resident.clone())
        .unwrap();
    assert_eq!(generate(&copy), expected);
    drop(copy);
    let (net, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(prefetch(64 << 10))
        .apply(resident.clone())
        .unwrap();
    assert!(report.offloaded_tensors() > 0);
    reset_prefetch_stats();
    assert_eq!(generate(&net), expected);
    warm();
    reset_op_stats();
    assert_eq!(generate(&net), expected);
    let stats = prefetch_stats();
    assert!(stats.hits > 0, "{stats:?}");
    assert!(stats.peak_alive_bytes <= 64 << 10, "{stats:?}");
    // Every weight is copied except the embedding table, whose rows each of the 9 forwards
    // gathers in place (the tied head's read of it is a matmul: a copy).
    let ops = op_stats();
    assert_eq!(ops.zero_copy_ops, 9, "{ops:?}");
    drop(net);
    fresh();
}

#[test]
fn prefetch_mode_parses_prints_and_serialises() {
    let default = "prefetch".parse::<OffloadMode>().unwrap();
    assert_eq!(
        default,
        prefetch(burn_offload::mode::DEFAULT_PREFETCH_LOOKAHEAD_BYTES)
    );
    assert_eq!(
        " Prefetch:4096 ".parse::<OffloadMode>().unwrap(),
        prefetch(4096)
    );
    assert_eq!(prefetch(4096).to_string(), "prefetch:4096");
    assert_eq!(default.to_string().parse::<OffloadMode>().unwrap(), default);
    for bad in ["prefetch:", "prefetch:1x", "prefetch:-1", "prefetching"] {
        assert!(
            matches!(
                bad.parse::<OffloadMode>(),
                Err(OffloadError::UnknownMode { .. })
            ),
            "{bad}"
        );
    }
    let json = serde_json::to_string(&prefetch(4096)).unwrap();
    assert_eq!(json, r#"{"prefetch":{"lookahead_bytes":4096}}"#);
    assert_eq!(
        serde_json::from_str::<OffloadMode>(&json).unwrap(),
        prefetch(4096)
    );
    assert_eq!(
        serde_json::to_string(&OffloadMode::Uva).unwrap(),
        r#""uva""#
    );
    let policy = OffloadPolicy::from_toml("max_gib = 1.0\nmode = \"prefetch:1048576\"").unwrap();
    assert_eq!(policy.mode, prefetch(1 << 20));
    let policy = OffloadPolicy::from_json(r#"{"max_gib": 1.0, "mode": "prefetch"}"#).unwrap();
    assert_eq!(policy.mode, default);
    let back: OffloadPolicy =
        serde_json::from_str(&serde_json::to_string(&policy).unwrap()).unwrap();
    assert_eq!(back, policy);
}
