//! Host memory accounting: exact-size allocations, and nothing left alive after models,
//! views and ops are dropped.
//!
//! `host_memory_stats` is process-wide, so every test here runs in a process of its own
//! (`own_process!`): no other test allocates or frees host memory beside it.

use crate::common;

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::{Autodiff, NdArray};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::{Distribution, s};
use burn_offload::{
    HostMemoryStats, OffloadContext, OffloadDevice, OffloadMode, OffloadOptimizer, OffloadPolicy,
    host_memory_stats, op_stats, reset_op_stats,
};
use common::{B, CPU, NET_BYTES, Net, device, placements, values};

fn host() -> OffloadDevice<NdArrayDevice> {
    OffloadDevice::Host(CPU)
}

/// Live bytes and allocations added since `start`.
fn delta(start: HostMemoryStats) -> (usize, usize) {
    let now = host_memory_stats();
    (
        now.live_bytes - start.live_bytes,
        now.live_allocations - start.live_allocations,
    )
}

fn iota(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32).collect()
}

#[test]
fn allocations_are_exact_size() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let start = host_memory_stats();

    let t = Tensor::<B, 1>::from_data(TensorData::new(iota(1000), [1000]), &host());
    assert!(common::on_host(&t));
    assert_eq!(delta(start), (4000, 1));
    assert_eq!(
        host_memory_stats().total_allocations,
        start.total_allocations + 1
    );
    // Pageable memory on the CPU target.
    assert_eq!(
        host_memory_stats().live_pinned_bytes,
        start.live_pinned_bytes
    );
    drop(t);
    assert_eq!(delta(start), (0, 0));

    // Sizes that no allocator class would pick.
    for (n, bytes) in [(1001, 4004), (3, 12), (1, 4), (4097, 16388)] {
        let t = Tensor::<B, 1>::from_data(TensorData::new(iota(n), [n]), &host());
        assert_eq!(delta(start), (bytes, 1), "{n} f32");
        drop(t);
    }
    let t = Tensor::<B, 2>::from_data(
        TensorData::new(vec![1.0f64; 15], [3, 5]),
        (&host(), burn::tensor::DType::F64),
    );
    assert_eq!(t.dtype(), burn::tensor::DType::F64);
    assert_eq!(delta(start), (120, 1));
    drop(t);

    // Every creation op on `Host`.
    let tensors = [
        Tensor::<B, 2>::zeros([7, 9], &host()),
        Tensor::<B, 2>::ones([7, 9], &host()),
        Tensor::<B, 2>::full([7, 9], 2.5, &host()),
        Tensor::<B, 2>::empty([7, 9], &host()),
        Tensor::<B, 2>::random([7, 9], Distribution::Default, &host()),
    ];
    assert_eq!(delta(start), (5 * 7 * 9 * 4, 5));
    assert!(tensors.iter().all(common::on_host));
    assert_eq!(tensors[2].to_data().to_vec::<f32>().unwrap(), vec![2.5; 63]);
    drop(tensors);

    // Moving a resident tensor to the host allocates exactly its size.
    let resident = Tensor::<B, 2>::ones([10, 10], &device());
    assert_eq!(delta(start), (0, 0));
    let moved = OffloadContext::default_context().place(resident, &host());
    assert!(common::on_host(&moved));
    assert_eq!(delta(start), (400, 1));
    drop(moved);
    assert_eq!(delta(start), (0, 0));
}

#[test]
fn offloaded_model_is_freed_when_dropped() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let start = host_memory_stats();

    // Lazy parameters: nothing until they are initialised.
    let (model, report) = OffloadPolicy::from_bytes(1000)
        .apply(Net::<B>::new(&device()))
        .unwrap();
    assert_eq!(delta(start), (0, 0));
    let _ = values(&model);
    assert_eq!(
        delta(start),
        (
            report.offloaded_bytes() as usize,
            report.offloaded_tensors()
        )
    );
    assert!(report.offloaded_tensors() > 0);
    let copy = model.clone();
    assert_eq!(delta(start).0, report.offloaded_bytes() as usize);
    drop(model);
    assert_eq!(
        delta(start).0,
        report.offloaded_bytes() as usize,
        "the clone"
    );
    drop(copy);
    assert_eq!(delta(start), (0, 0));

    // Initialised parameters moved to the host, then back.
    let model = Net::<B>::new(&device());
    let _ = values(&model);
    assert_eq!(delta(start), (0, 0));
    let (model, report) = OffloadPolicy::from_bytes(u64::MAX).apply(model).unwrap();
    assert_eq!(report.offloaded_bytes(), NET_BYTES);
    assert_eq!(delta(start), (NET_BYTES as usize, report.params.len()));
    let (model, report) = OffloadPolicy::from_bytes(0).apply(model).unwrap();
    assert_eq!(report.offloaded_tensors(), 0);
    assert!(placements(&model).iter().all(|(_, host)| !host));
    assert_eq!(delta(start), (0, 0));
    let (model, _) = OffloadPolicy::from_bytes(600).apply(model).unwrap();
    assert!(delta(start).0 > 0);
    drop(model);
    assert_eq!(delta(start), (0, 0));
}

#[test]
fn views_and_clones_share_the_buffer() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let start = host_memory_stats();
    let data = TensorData::new(iota(24), [2, 3, 4]);
    let t = Tensor::<B, 3>::from_data(data.clone(), &host());
    let reference = Tensor::<NdArray, 3>::from_data(data, &CPU);
    assert_eq!(delta(start), (96, 1));

    let views: Vec<(Tensor<B, 3>, Tensor<NdArray, 3>)> = vec![
        (t.clone(), reference.clone()),
        (t.clone().swap_dims(0, 2), reference.clone().swap_dims(0, 2)),
        (t.clone().transpose(), reference.clone().transpose()),
        (
            t.clone().permute([2, 0, 1]),
            reference.clone().permute([2, 0, 1]),
        ),
        (
            t.clone().slice(s![.., 1..3, ..]),
            reference.clone().slice(s![.., 1..3, ..]),
        ),
        (
            t.clone().slice(s![.., .., 0..4;2]),
            reference.clone().slice(s![.., .., 0..4;2]),
        ),
        (t.clone().flip([1, 2]), reference.clone().flip([1, 2])),
        (t.clone().narrow(2, 1, 2), reference.clone().narrow(2, 1, 2)),
        (
            t.clone().reshape([4, 3, 2]),
            reference.clone().reshape([4, 3, 2]),
        ),
        (
            t.clone().slice(s![0..1, .., ..]).expand([5, 3, 4]),
            reference.clone().slice(s![0..1, .., ..]).expand([5, 3, 4]),
        ),
    ];
    let chunks = t.clone().chunk(2, 1);
    for (view, expected) in &views {
        assert!(common::on_host(view), "a view stays in host memory");
        assert_eq!(view.to_data(), expected.to_data());
    }
    assert!(chunks.iter().all(common::on_host));
    let flat: Tensor<B, 1> = t.clone().flatten(0, 2);
    assert!(common::on_host(&flat));
    assert_eq!(delta(start), (96, 1), "no view allocates");

    // The buffer lives as long as its last view.
    drop(t);
    drop(flat);
    drop(chunks);
    assert_eq!(delta(start), (96, 1));
    let (last, expected) = views.last().unwrap().clone();
    drop(views);
    assert_eq!(delta(start), (96, 1));
    assert_eq!(last.to_data(), expected.to_data());
    drop(last);
    assert_eq!(delta(start), (0, 0));
}

#[test]
fn reshaping_a_non_contiguous_view_makes_a_resident_copy() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let start = host_memory_stats();
    let t = Tensor::<B, 2>::from_data(TensorData::new(iota(12), [3, 4]), &host());
    reset_op_stats();
    let r = t.clone().transpose().reshape([12]);
    assert!(!common::on_host(&r));
    assert_eq!(op_stats().transient_uploads, 1);
    assert_eq!(
        r.to_data().to_vec::<f32>().unwrap(),
        [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
    );
    assert_eq!(delta(start), (48, 1));
    drop(t);
    drop(r);
    assert_eq!(delta(start), (0, 0));
}

#[test]
fn ops_with_transient_copies_leave_nothing_behind() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    for mode in [OffloadMode::Copy, OffloadMode::Uva] {
        let start = host_memory_stats();
        let w = OffloadContext::with_mode(mode)
            .run(|| Tensor::<B, 2>::from_data(TensorData::new(iota(32), [8, 4]), &host()));
        let x = Tensor::<B, 2>::ones([2, 8], &device());
        let r = Tensor::<B, 2>::ones([8, 4], &device());
        assert_eq!(delta(start), (128, 1));

        reset_op_stats();
        let outputs = [
            w.clone() + r.clone(),
            r.clone() * w.clone(),
            w.clone().exp(),
            w.clone().mul_scalar(2.0),
            x.clone().matmul(w.clone()),
            OffloadContext::default_context().place(w.clone(), &device()),
            burn::tensor::activation::relu(w.clone()),
        ];
        let stats = op_stats();
        assert!(outputs.iter().all(|o| !common::on_host(o)));
        if mode == OffloadMode::Copy {
            assert_eq!(stats.transient_uploads, 6, "{stats:?}");
            assert_eq!(
                (stats.zero_copy_ops, stats.zero_copy_bytes),
                (0, 0),
                "{stats:?}"
            );
        } else {
            // The matmul reads `w` (8 x 4 f32) in place.
            assert_eq!(stats.transient_uploads, 5, "{stats:?}");
            assert_eq!(
                (stats.zero_copy_ops, stats.zero_copy_bytes),
                (1, 128),
                "{stats:?}"
            );
        }
        assert_eq!(stats.transient_upload_bytes, 128 * stats.transient_uploads);
        assert_eq!(delta(start), (128, 1), "results are resident");
        let sum: f32 = outputs[4].clone().sum().into_scalar();
        assert_eq!(sum, 2.0 * (0..32).sum::<i32>() as f32);
        drop(outputs);
        drop(w);
        assert_eq!(delta(start), (0, 0), "{mode}");

        // Reading a host tensor's data allocates no host memory either.
        let w = Tensor::<B, 1>::from_data(TensorData::new(iota(10), [10]), &host());
        let data = w.clone().into_data();
        assert_eq!(data.to_vec::<f32>().unwrap(), iota(10));
        assert_eq!(delta(start), (40, 1));
        drop(w);
        assert_eq!(delta(start), (0, 0));
    }
}

#[test]
fn training_steps_do_not_leak_host_memory() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    type AB = Autodiff<B>;
    let start = host_memory_stats();
    let model = Net::<AB>::new(&device());
    let (model, report) = OffloadPolicy::from_bytes(1300)
        .mode(OffloadMode::Uva)
        .apply(model)
        .unwrap();
    let _ = values(&model);
    let offloaded = (
        report.offloaded_bytes() as usize,
        report.offloaded_tensors(),
    );
    assert_eq!(delta(start), offloaded);

    let mut optim = OffloadOptimizer::new(AdamConfig::new().init(), &report);
    let x = Tensor::<AB, 2>::random([4, common::D_MODEL], Distribution::Default, &device());
    let y = Tensor::<AB, 2>::random([4, common::D_OUT], Distribution::Default, &device());
    let mut model = model;
    for step in 0..4 {
        let loss = (model.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
        assert_eq!(delta(start), offloaded, "after step {step}");
    }
    drop(optim);
    drop(model);
    assert_eq!(delta(start), (0, 0));
}

/// An optimizer step writes the updated offloaded parameters into the host buffers they had:
/// no new host allocation (on CUDA: no re-pinning and no freeing, each of which costs a
/// context synchronisation), in every mode that keeps no weak reference to them.
#[test]
fn training_steps_reuse_the_host_buffers() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    type AB = Autodiff<B>;
    for mode in [OffloadMode::Uva, OffloadMode::Copy, OffloadMode::Auto] {
        let model = Net::<AB>::new(&device());
        let (model, report) = OffloadPolicy::from_bytes(u64::MAX)
            .mode(mode)
            .apply(model)
            .unwrap();
        let _ = values(&model);
        let mut optim = OffloadOptimizer::new(AdamConfig::new().init(), &report);
        let x = Tensor::<AB, 2>::random([4, common::D_MODEL], Distribution::Default, &device());
        let y = Tensor::<AB, 2>::random([4, common::D_OUT], Distribution::Default, &device());
        let mut model = model;
        let mut before = values(&model);
        let mut first = None;
        for step in 0..10 {
            let loss = (model.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-2, model, grads);
            let allocations = host_memory_stats().total_allocations;
            let first = *first.get_or_insert(allocations);
            assert_eq!(
                allocations, first,
                "{mode}: host allocations after step {step}"
            );
            assert!(
                placements(&model).iter().all(|(_, host)| *host),
                "{mode}: still offloaded after step {step}"
            );
            // The values did change: the step was written into the buffers.
            let after = values(&model);
            assert!(
                before.iter().zip(&after).any(|((_, a), (_, b))| a != b),
                "{mode}: step {step} changed nothing"
            );
            before = after;
        }
    }
}

/// A lazy model initialised on `Host` and retargeted to the device by a zero budget: applying
/// allocates nothing, and initialising leaves nothing in host memory.
#[test]
fn lazy_host_params_retargeted_to_the_device_leave_no_host_memory() {
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let start = host_memory_stats();
    let (model, report) = OffloadPolicy::from_bytes(0)
        .apply(Net::<B>::new(&host()))
        .unwrap();
    assert!(
        report
            .params
            .iter()
            .all(|p| p.moved && !report.is_offloaded(&p.path)),
        "{report}"
    );
    assert_eq!(host_memory_stats(), start, "apply allocates nothing");
    reset_op_stats();
    let _ = values(&model);
    assert!(placements(&model).iter().all(|(_, host)| !host));
    assert_eq!(op_stats().device_created_bytes, NET_BYTES);
    assert_eq!(delta(start), (0, 0));
}

/// Random tensors created on `Host(d)` are drawn straight into one exact-size host buffer
/// (several threads for a large one): nothing on the device, reproducible under a seed, and
/// with the requested distribution.
#[test]
fn random_init_on_the_host_is_seeded_and_never_touches_the_device() {
    use burn::tensor::backend::Backend as _;
    common::own_process!(common::process::COUNTS_HOST_MEMORY);
    let shape = [1024, 1100]; // over a million elements: the parallel fill
    let draw = |seed| {
        B::seed(&host(), seed);
        Tensor::<B, 2>::random(shape, Distribution::Normal(1.0, 0.5), &host())
    };
    reset_op_stats();
    let start = host_memory_stats();
    let a = draw(3);
    assert!(common::on_host(&a));
    let stats = op_stats();
    assert_eq!(stats.device_created_bytes, 0, "{stats:?}");
    assert_eq!(stats.host_created_bytes, (1024 * 1100 * 4) as u64);
    assert_eq!(delta(start), (1024 * 1100 * 4, 1));

    let values = a.to_data().to_vec::<f32>().unwrap();
    assert_eq!(values, draw(3).to_data().to_vec::<f32>().unwrap());
    assert_ne!(values, draw(4).to_data().to_vec::<f32>().unwrap());
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    assert!((var - 0.25).abs() < 0.01, "variance {var}");

    // A second tensor of the same seed's sequence differs from the first.
    B::seed(&host(), 3);
    let first = Tensor::<B, 1>::random([64], Distribution::Default, &host());
    let second = Tensor::<B, 1>::random([64], Distribution::Default, &host());
    assert_ne!(first.to_data(), second.to_data());
    drop((a, first, second));
    assert_eq!(delta(start), (0, 0));
}
