//! One offload context per model: two models on one device, placed by different policies, each
//! read by its own mode and prefetcher; Burn's own `to_device` and per-device settings keep
//! placement; the explicit ways to list and undo it.

use crate::common;

use std::time::{Duration, Instant};

use burn::module::Module;
use burn::prelude::*;
use burn_offload::{
    OffloadDevice, OffloadMode, OffloadPolicy, OffloadReport, Placement, PrefetchStats, op_stats,
    placements, reset_op_stats, to_device_memory,
};
use common::{B, CPU, Net, device};

/// Forwards of alternating sequence lengths (the same weights in the same order each time).
fn inputs(n: usize) -> Vec<TensorData> {
    (0..n)
        .map(|i| {
            let seq = if i % 2 == 0 { 3 } else { 1 };
            let len = 2 * seq * common::D_MODEL;
            let values: Vec<f32> = (0..len)
                .map(|j| (((j * 7 + i * 13) % 23) as f32 - 11.0) / 7.0)
                .collect();
            TensorData::new(values, [2, seq, common::D_MODEL])
        })
        .collect()
}

fn run(net: &Net<B>, xs: &[TensorData]) -> Vec<TensorData> {
    xs.iter()
        .map(|x| {
            let x = Tensor::<B, 3>::from_data(x.clone(), &device());
            net.forward(x).into_data()
        })
        .collect()
}

/// Equal within the in-place matmul's rounding (it sums in another order than the GEMM).
fn assert_close(got: &[TensorData], want: &[TensorData]) {
    for (g, w) in got.iter().zip(want) {
        g.assert_approx_eq::<f32>(w, burn::tensor::Tolerance::rel_abs(1e-5, 1e-6));
    }
    assert_eq!(got.len(), want.len());
}

/// An initialised resident `Net` with its own random weights.
fn base(seed: u64) -> Net<B> {
    <B as Backend>::seed(&device(), seed);
    let net = Net::<B>::new(&device());
    let _ = common::values(&net);
    net
}

fn offload(net: &Net<B>, mode: OffloadMode) -> (Net<B>, OffloadReport) {
    OffloadPolicy::from_bytes(u64::MAX)
        .mode(mode)
        .apply(net.clone())
        .unwrap()
}

/// Waits (up to 5 s) until `f` holds of `report`'s prefetch counters.
fn eventually(report: &OffloadReport, what: &str, f: impl Fn(&PrefetchStats) -> bool) {
    let start = Instant::now();
    while !f(&report.prefetch_stats()) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what}: {:?}",
            report.prefetch_stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

const PREFETCH: OffloadMode = OffloadMode::prefetch(1 << 20);

#[test]
fn two_models_on_one_device_keep_their_own_modes_and_prefetchers() {
    let xs = inputs(12);
    let (a_base, b_base) = (base(1), base(2));
    // Each model alone, first: the references.
    let (a, a_report) = offload(&a_base, OffloadMode::Uva);
    let a_alone = run(&a, &xs);
    drop(a);
    let (b, b_report) = offload(&b_base, PREFETCH);
    let b_alone = run(&b, &xs);
    drop(b);
    assert_ne!(a_alone[0], b_alone[0], "two different models");
    drop((a_report, b_report));

    // Both placed on the one CPU device, B after A: A keeps its mode.
    let (a, a_report) = offload(&a_base, OffloadMode::Uva);
    let (b, b_report) = offload(&b_base, PREFETCH);
    assert_eq!(a_report.context().unwrap().mode(), OffloadMode::Uva);
    assert_eq!(b_report.context().unwrap().mode(), PREFETCH);
    reset_op_stats();
    let _ = run(&a, &xs[..1]);
    assert!(op_stats().zero_copy_ops > 0, "A still reads in place");
    reset_op_stats();
    let _ = run(&b, &xs[..1]);
    assert_eq!(op_stats().zero_copy_ops, 0, "B copies (prefetch mode)");

    // Interleaved forwards from two threads: each model's results are its own, bit for bit.
    std::thread::scope(|scope| {
        for (net, alone) in [(&a, &a_alone), (&b, &b_alone)] {
            let xs = &xs;
            scope.spawn(move || {
                for round in 0..3 {
                    assert_eq!(&run(net, xs), alone, "round {round}");
                }
            });
        }
    });
    // Each model's prefetch counters are its own: A never prefetches, B learned its cycle.
    assert_eq!(a_report.prefetch_stats(), PrefetchStats::default());
    let b_stats = b_report.prefetch_stats();
    assert!(b_stats.relearns >= 1, "{b_stats:?}");
    eventually(&b_report, "B prefetches", |s| s.prefetched > 0);

    // Dropping A leaves B's prefetching untouched: no mismatch, no relearning, more hits.
    let before = b_report.prefetch_stats();
    drop(a);
    drop(a_report);
    for _ in 0..3 {
        assert_eq!(run(&b, &xs), b_alone);
    }
    let after = b_report.prefetch_stats();
    assert_eq!(after.mismatches, before.mismatches, "{after:?}");
    assert_eq!(after.relearns, before.relearns, "{after:?}");
    assert!(
        after.hits + after.late > before.hits + before.late,
        "{before:?} -> {after:?}"
    );
}

#[test]
fn applying_again_switches_the_mode_without_copying() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let net = base(3);
    let (net, uva) = offload(&net, OffloadMode::Uva);
    let allocations = burn_offload::host_memory_stats().total_allocations;
    let (net, copy) = offload(&net, OffloadMode::Copy);
    assert_eq!(copy.offloaded_tensors(), uva.offloaded_tensors());
    assert!(
        !copy.params.iter().any(|p| p.moved),
        "already in host memory"
    );
    assert_eq!(
        burn_offload::host_memory_stats().total_allocations,
        allocations,
        "re-tagged, not copied"
    );
    reset_op_stats();
    let _ = run(&net, &inputs(1));
    assert_eq!(op_stats().zero_copy_ops, 0, "read by the new policy's mode");
}

#[test]
fn burns_own_moves_keep_placement() {
    let net = base(4);
    let xs = inputs(2);
    let expected = run(&net, &xs);
    let (net, report) = OffloadPolicy::from_bytes(u64::MAX)
        .params(["mlp"])
        .mode(OffloadMode::Uva)
        .apply(net)
        .unwrap();
    let placed = placements(&net);
    let offloaded: Vec<_> = placed
        .iter()
        .filter(|(_, p)| *p == Placement::Host)
        .map(|(path, _)| path.clone())
        .collect();
    assert_eq!(offloaded, common::offloaded_paths(&report));
    assert!(placed.iter().any(|(_, p)| *p == Placement::Device));

    // What Burn programs call after loading: a same-device move changes nothing.
    let net = net.to_device(&device());
    assert_eq!(placements(&net), placed);
    let net = net.fork(&device());
    assert_eq!(placements(&net), placed);
    let net = net.to_device(&OffloadDevice::Host(CPU));
    assert_eq!(placements(&net), placed);
    assert_close(&run(&net, &xs), &expected);
    // One compute device, whichever placement Burn happens to name.
    assert_eq!(net.devices().len(), 1);

    // The explicit way back into device memory.
    let net = to_device_memory(net);
    assert!(
        placements(&net)
            .iter()
            .all(|(_, p)| *p == Placement::Device)
    );
    assert_eq!(run(&net, &xs), expected);
}

#[test]
fn lazy_parameters_are_listed_without_being_initialised() {
    let net = Net::<B>::new(&device());
    let (net, report) = OffloadPolicy::from_bytes(u64::MAX).apply(net).unwrap();
    let placed = placements(&net);
    assert_eq!(placed.len(), report.params.len());
    assert!(placed.iter().all(|(_, p)| *p == Placement::Host));
    assert!(
        common::init_states(&net).iter().all(|(_, init)| !init),
        "placements initialised a parameter"
    );
}

/// The context of every offloaded parameter of `net`, in module order.
fn contexts(net: &Net<B>) -> Vec<Option<burn_offload::OffloadContext>> {
    struct Visitor(Vec<Option<burn_offload::OffloadContext>>);
    impl burn::module::ModuleVisitor<B> for Visitor {
        fn visit_float<const N: usize>(&mut self, param: &burn::module::Param<Tensor<B, N>>) {
            let primitive = param.val().into_primitive().tensor();
            self.0
                .push(primitive.offloaded().map(|o| o.context().clone()));
        }
    }
    let mut visitor = Visitor(Vec::new());
    net.visit(&mut visitor);
    visitor.0
}

#[test]
fn loading_keeps_the_policys_context_and_the_placement() {
    use burn_store::ModuleSnapshot;
    let source = base(5);
    let load = |net: &mut Net<B>| {
        let result = net.apply(source.collect(None, None, false), None, None, false);
        assert!(
            result.errors.is_empty() && result.missing.is_empty(),
            "{result:?}"
        );
    };
    // Applied to the lazy model, then loaded: each tensor created in host memory, in the
    // policy's context (read in its mode).
    let (mut net, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Copy)
        .apply(Net::<B>::new(&device()))
        .unwrap();
    load(&mut net);
    let context = report.context().expect("apply made one");
    assert!(
        contexts(&net)
            .iter()
            .all(|c| c.as_ref().is_some_and(|c| c.same(context))),
        "every parameter is offloaded in the policy's context"
    );
    reset_op_stats();
    assert_eq!(run(&net, &inputs(1)), run(&source, &inputs(1)));
    assert_eq!(op_stats().zero_copy_ops, 0, "copy mode");

    // Brought back into device memory, a later load keeps it there.
    let mut net = to_device_memory(net);
    load(&mut net);
    assert!(
        placements(&net)
            .iter()
            .all(|(_, p)| *p == Placement::Device)
    );
    assert!(contexts(&net).iter().all(Option::is_none));

    // Applied again in another mode: the parameters take the new context.
    drop(report);
    let (net, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Uva)
        .apply(net)
        .unwrap();
    let context = report.context().unwrap();
    assert_eq!(context.mode(), OffloadMode::Uva);
    assert!(
        contexts(&net)
            .iter()
            .all(|c| c.as_ref().is_some_and(|c| c.same(context)))
    );
}
