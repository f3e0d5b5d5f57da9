//! Prefetching through the copy engine (`prefetch:<bytes>:engine`) on wgpu: lavapipe, Vulkan on
//! the CPU, in CI. The wiring that is not CUDA's runs here for real: the ring is a CubeCL
//! buffer, copies are CubeCL writes, acquire and release are ordered with the ops that read a
//! region *as they execute* (a fused backend's lazy ops are drained at each group boundary).
//!
//! - models on both wgpu backends, fused and unfused: bit-identical to copy mode on the same
//!   backend and equal to NdArray within tolerance, with a ring smaller than one forward's
//!   weights (the ring wraps every forward), from two threads, two models at once, with the
//!   read order changing (a model dropped while its filler runs: `wgpu::no_leaks`);
//! - each ordering guard with the guard removed (feature `test-faults`, each in a process of
//!   its own) must see wrong values: the drain before a release (fused), the flush before a
//!   ring write (wgpu's `write_buffer` lands ahead of recorded work), and the copy-out of a
//!   view of a region that outlives its release;
//! - a region's tensor can never be written in place (its buffer is the engine's).
//!
//! Skips, saying why, where there is no Vulkan driver.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::prelude::Backend;
use burn::tensor::activation::relu;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive, Tolerance};
use burn_offload::copy::{CopyEngine, CopySource, RingShape};
use burn_offload::inner::{OffloadTarget, RingStreams};
use burn_offload::prefetch::engine::release_behind_ops;
use burn_offload::{
    HostBuffer, OffloadBackend, OffloadDevice, OffloadMode, OffloadPolicy, op_stats,
    reset_op_stats, set_prefetch_memory_probe,
};
use cubecl::wgpu::WgpuDevice;

use super::wgpu::{
    Fused, Net, Ref, Unfused, forwards, inputs, offloaded_net, reference, start, wgpu,
};
use crate::common;

/// A ring of 2 KiB: groups of at most 1 KiB (the test model's tensors take 256 or 512 bytes
/// each in the ring), about five groups per forward, so the ring wraps twice per forward.
const SMALL_RING: u64 = 2048;

fn engine(lookahead_bytes: u64) -> OffloadMode {
    OffloadMode::prefetch_engine(lookahead_bytes)
}

/// Two tests, one per wgpu backend; with a reason, each in a process of its own.
macro_rules! on_both {
    ($fused:ident, $unfused:ident, $check:ident $(, $own:expr)?) => {
        #[test]
        fn $fused() {
            let Some(_serial) = start() else {
                return;
            };
            $(common::own_process!($own);)?
            $check::<Fused>("OffloadBackend<Wgpu>");
        }

        #[test]
        fn $unfused() {
            let Some(_serial) = start() else {
                return;
            };
            $(common::own_process!($own);)?
            $check::<Unfused>("OffloadBackend<CubeBackend<WgpuRuntime>>");
        }
    };
}

/// Copy mode's outputs for [`inputs`], on the same backend.
fn copy_outputs<Bk: OffloadTarget<Device = WgpuDevice>>(
    weights: &[(String, TensorData)],
) -> Vec<TensorData> {
    let (net, _) = offloaded_net::<Bk>(weights, OffloadMode::Copy);
    forwards(&net)
}

fn assert_same(name: &str, got: &[TensorData], copy: &[TensorData], ndarray: &[TensorData]) {
    for (i, ((g, c), e)) in got.iter().zip(copy).zip(ndarray).enumerate() {
        if g.as_bytes() != c.as_bytes() {
            let (gv, cv) = (g.to_vec::<f32>().unwrap(), c.to_vec::<f32>().unwrap());
            let max = gv
                .iter()
                .zip(&cv)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            panic!("{name}: output {i}: engine != copy, max |diff| {max:e}: {gv:?} vs {cv:?}");
        }
        g.assert_approx_eq::<f32>(e, Tolerance::rel_abs(1e-4, 1e-5));
    }
}

/// Engine runs with a ring that wraps and with one that holds everything: every forward equals
/// copy mode bit for bit, the copies come from ring fills, and reads hit them.
fn engine_equals_copy<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    let (weights, expected) = reference();
    let copy = copy_outputs::<Bk>(&weights);
    for lookahead in [SMALL_RING, 1 << 20] {
        let (net, report) = offloaded_net::<Bk>(&weights, engine(lookahead));
        for _ in 0..3 {
            assert_same(name, &forwards(&net), &copy, &expected);
        }
        let stats = report.prefetch_stats();
        assert!(
            stats.ring_fills > 0 && stats.hits > 0,
            "{name} {lookahead}: reads hit ring fills: {stats:?}"
        );
        assert_eq!(stats.releases, 0, "{name}: not CubeCL's path: {stats:?}");
    }
}

on_both!(
    engine_equals_copy_fused,
    engine_equals_copy_unfused,
    engine_equals_copy
);

/// Two op threads read one engine model at once (two consumers of one ring): every output is
/// copy mode's, bit for bit.
fn two_threads<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    let (weights, expected) = reference();
    let copy = copy_outputs::<Bk>(&weights);
    let (net, report) = offloaded_net::<Bk>(&weights, engine(SMALL_RING));
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let net = net.clone();
                scope.spawn(move || (0..3).map(|_| forwards(&net)).collect::<Vec<_>>())
            })
            .collect();
        for thread in threads {
            for run in thread.join().unwrap() {
                assert_same(name, &run, &copy, &expected);
            }
        }
    });
    assert!(report.prefetch_stats().ring_fills > 0, "{name}");
}

on_both!(
    engine_from_two_threads_fused,
    engine_from_two_threads_unfused,
    two_threads
);

/// Two engine models (two rings), their forwards interleaved; then one reads its layers in
/// the reverse order every other forward (the learned order breaks, filled groups are
/// discarded, the order is learned again): all bit-identical to copy mode.
fn two_models_and_order_changes<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    let (weights, expected) = reference();
    let copy = copy_outputs::<Bk>(&weights);
    let (a, report_a) = offloaded_net::<Bk>(&weights, engine(SMALL_RING));
    let (b, report_b) = offloaded_net::<Bk>(&weights, engine(SMALL_RING + 1024));
    for _ in 0..3 {
        assert_same(name, &forwards(&a), &copy, &expected);
        assert_same(name, &forwards(&b), &copy, &expected);
    }
    assert!(report_a.prefetch_stats().hits > 0 && report_b.prefetch_stats().hits > 0);

    let device = OffloadDevice::device(wgpu());
    let x = Tensor::<_, 3>::from_data(inputs()[0].clone(), &device);
    let reversed_copy = {
        let (net, _) = offloaded_net::<Bk>(&weights, OffloadMode::Copy);
        forward_reversed(&net, x.clone()).into_data()
    };
    for round in 0..4 {
        if round % 2 == 0 {
            assert_same(name, &forwards(&a), &copy, &expected);
        } else {
            let got = forward_reversed(&a, x.clone()).into_data();
            assert_eq!(got.as_bytes(), reversed_copy.as_bytes(), "{name}: reversed");
        }
    }
    assert!(
        report_a.prefetch_stats().mismatches > 0,
        "{name}: the order changed"
    );
}

/// The layers in reverse order, then the head.
fn forward_reversed<Bk: OffloadTarget<Device = WgpuDevice>>(
    net: &Net<Bk>,
    x: Tensor<OffloadBackend<Bk>, 3>,
) -> Tensor<OffloadBackend<Bk>, 3> {
    let mut x = x;
    for layer in net.layers.iter().rev() {
        let h = layer.mlp_norm.forward(x.clone());
        let h = layer.mlp.down.forward(relu(layer.mlp.up.forward(h)));
        x = x + h;
    }
    net.head.forward(x)
}

on_both!(
    two_models_and_order_changes_fused,
    two_models_and_order_changes_unfused,
    two_models_and_order_changes
);

/// Device memory for prefetching through the engine is the ring: the op thread's pool holds
/// exactly the ring's bytes more after engine forwards than before, and the filler's own
/// allocations hold nothing after each fill (the memory probe's readings).
fn memory_is_the_ring<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    let (weights, _) = reference();
    // Warm up (kernels compiled, pools grown) in copy mode.
    let (net, _) = offloaded_net::<Bk>(&weights, OffloadMode::Copy);
    drop(forwards(&net));
    drop(forwards(&net));
    drop(net);
    Bk::sync(&wgpu()).unwrap();
    let before = Bk::device_bytes_in_use(&wgpu()).unwrap();
    set_prefetch_memory_probe(true);
    let (net, report) = offloaded_net::<Bk>(&weights, engine(SMALL_RING));
    for _ in 0..3 {
        drop(forwards(&net));
    }
    Bk::sync(&wgpu()).unwrap();
    let after = Bk::device_bytes_in_use(&wgpu()).unwrap();
    let stats = report.prefetch_stats();
    assert!(stats.ring_fills > 0, "{name}: {stats:?}");
    assert_eq!(after - before, SMALL_RING, "{name}: the ring, once");
    assert_eq!(
        stats.peak_device_bytes, 0,
        "{name}: the filler allocates nothing"
    );
}

on_both!(
    device_memory_for_prefetching_is_the_ring_fused,
    device_memory_for_prefetching_is_the_ring_unfused,
    memory_is_the_ring,
    "the memory probe is process-wide"
);

/// Six offloaded `[8, 16]` weights, each read through `unfold` (which returns a view of the
/// weight's device copy: a view of the ring), the views kept until all six were read, then
/// concatenated. With a 2 KiB ring the later groups overwrite the earlier ones' regions before
/// the views are read, so the views must have been copied out. Returns how many of three
/// forwards differed from NdArray's.
fn views_outliving_their_region<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) -> usize {
    let cpu = burn::backend::ndarray::NdArrayDevice::Cpu;
    let values: Vec<TensorData> = (0..6).map(|i| common::data(&[8, 16], 300 + i)).collect();
    let expected = {
        let views: Vec<_> = values
            .iter()
            .map(|v| Tensor::<Ref, 2>::from_data(v.clone(), &cpu).unfold::<3, _>(1, 4, 4))
            .collect();
        Tensor::cat(views, 0).into_data()
    };
    let device = OffloadDevice::device(wgpu());
    let w = values
        .iter()
        .map(|v| {
            Param::from_tensor(Tensor::<OffloadBackend<Bk>, 2>::from_data(
                v.clone(),
                &device,
            ))
        })
        .collect();
    let (weights, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(engine(SMALL_RING))
        .apply(Weights { w })
        .unwrap();
    assert_eq!(report.offloaded_tensors(), 6);
    reset_op_stats();
    let mut wrong = 0;
    for _ in 0..4 {
        let views: Vec<_> = weights
            .w
            .iter()
            .map(|w| w.val().unfold::<3, _>(1, 4, 4))
            .collect();
        let got = Tensor::cat(views, 0).into_data();
        wrong += usize::from(got.as_bytes() != expected.as_bytes());
    }
    let stats = report.prefetch_stats();
    assert!(
        stats.hits > 0 && stats.ring_fills > 0,
        "{name}: read through the ring: {stats:?}"
    );
    wrong
}

/// A module of weights for a policy to place.
#[derive(Module, Debug)]
struct Weights<B: Backend> {
    w: Vec<Param<Tensor<B, 2>>>,
}

fn views_copied_out<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    assert_eq!(views_outliving_their_region::<Bk>(name), 0, "{name}");
    assert!(op_stats().ring_copy_outs > 0, "{name}: views copied out");
}

on_both!(
    views_of_a_region_are_copied_out_fused,
    views_of_a_region_are_copied_out_unfused,
    views_copied_out
);

/// A ring of exactly one 256-byte region: each fill overwrites the previous one's bytes once it
/// is released.
fn one_region_engine<Bk: OffloadTarget<Device = WgpuDevice>>()
-> CopyEngine<Arc<dyn RingStreams<Bk>>> {
    let shape = RingShape {
        capacity: 256,
        slots: 4,
        consumers: 2,
        align: 256,
    };
    let streams = Bk::ring_streams(&wgpu(), shape)
        .expect("wgpu has a copy engine")
        .expect("its streams");
    CopyEngine::new(streams)
}

fn source(values: &[f32]) -> CopySource {
    let mut buffer = HostBuffer::pageable(values.len() * 4).unwrap();
    for (chunk, v) in buffer.as_mut_slice().chunks_exact_mut(4).zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    CopySource::whole(Arc::new(buffer))
}

/// Fills `values` on a thread of its own (the filler's stream).
fn fill_from_another_thread<Bk: OffloadTarget<Device = WgpuDevice>>(
    engine: &CopyEngine<Arc<dyn RingStreams<Bk>>>,
    values: &[f32],
) -> Vec<burn_offload::copy::Region> {
    std::thread::scope(|s| s.spawn(|| engine.fill(vec![source(values)])).join())
        .unwrap()
        .unwrap()
}

/// The op side of one boundary, by hand: a reader of region A is queued (fused: lazily, not
/// run), A is released (`release_behind_ops`, what the model path calls), the next fill
/// overwrites A's bytes, and the reader's result is read only then. Returns whether it read
/// A's values.
fn reader_queued_before_a_release<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) -> bool {
    let old: Vec<f32> = (0..64).map(|i| i as f32 * 0.5 - 3.0).collect();
    let new: Vec<f32> = (0..64).map(|i| 100.0 + i as f32).collect();
    let engine = one_region_engine::<Bk>();
    let a = fill_from_another_thread(&engine, &old);
    engine.acquire(&a[0]).unwrap();
    let region = engine
        .streams()
        .tensor(&a[0], Shape::new([8, 8]), DType::F32)
        .unwrap();
    let reader = Bk::float_mul_scalar(region, 2.0.into());
    release_behind_ops::<Bk, _>(&engine, &wgpu(), &a);
    let b = fill_from_another_thread(&engine, &new);
    assert_eq!(
        (b[0].offset, b[0].len),
        (a[0].offset, a[0].len),
        "{name}: same bytes"
    );
    engine.acquire(&b[0]).unwrap(); // the new copy has been submitted
    let got = Tensor::<Bk, 2>::from_primitive(TensorPrimitive::Float(reader))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let _ = engine.release(&b[0]);
    got == old.iter().map(|v| v * 2.0).collect::<Vec<_>>()
}

fn reader_keeps_its_values<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
    assert!(
        reader_queued_before_a_release::<Bk>(name),
        "{name}: a reader queued before a release reads the bytes it was queued for"
    );
}

on_both!(
    a_release_is_ordered_after_queued_readers_fused,
    a_release_is_ordered_after_queued_readers_unfused,
    reader_keeps_its_values
);

/// No op can write into a ring region in place: its buffer is held by the engine.
#[test]
fn a_region_is_never_written_in_place() {
    let Some(_serial) = start() else {
        return;
    };
    let engine = one_region_engine::<Unfused>();
    let a = fill_from_another_thread(&engine, &[1.0; 64]);
    engine.acquire(&a[0]).unwrap();
    let region = engine
        .streams()
        .tensor(&a[0], Shape::new([64]), DType::F32)
        .unwrap();
    assert!(!region.can_mut(), "the ring's buffer is shared");
    // An in-place-capable op writes elsewhere: the region keeps its bytes.
    let plus = Unfused::float_add_scalar(region.clone(), 1.0.into());
    let back = |t| {
        Tensor::<Unfused, 1>::from_primitive(TensorPrimitive::Float(t))
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(back(plus), vec![2.0; 64]);
    assert_eq!(back(region), vec![1.0; 64]);
    // A tensor the test owns alone is written in place: the check above can fail.
    let owned = Unfused::float_from_data(TensorData::new(vec![1f32; 64], [64]), &wgpu());
    assert!(owned.can_mut());
    let _ = engine.release(&a[0]);
}

/// Each guard removed, in a process of its own: the run must see wrong values.
#[cfg(feature = "test-faults")]
mod without_guards {
    use burn_offload::copy::{RingFaults, set_ring_faults};

    use super::*;

    const OWN: &str = "the ring faults are process-wide";

    /// Fused, no drain before the release: the lazy reader runs after the overwrite.
    #[test]
    fn a_release_without_the_drain_lets_a_lazy_reader_read_the_next_copy() {
        let Some(_serial) = start() else {
            return;
        };
        common::own_process!(OWN);
        set_ring_faults(RingFaults {
            skip_drain: true,
            ..Default::default()
        });
        assert!(!reader_queued_before_a_release::<Fused>("fused, no drain"));
    }

    /// wgpu, no flush of the readers' streams before a ring write: `write_buffer` lands ahead
    /// of the reader recorded before the release.
    #[test]
    fn a_ring_write_without_the_flush_lands_ahead_of_recorded_readers() {
        let Some(_serial) = start() else {
            return;
        };
        common::own_process!(OWN);
        set_ring_faults(RingFaults {
            skip_flush_before_write: true,
            ..Default::default()
        });
        assert!(!reader_queued_before_a_release::<Unfused>(
            "unfused, no flush"
        ));
    }

    fn views_not_copied_out<Bk: OffloadTarget<Device = WgpuDevice>>(name: &str) {
        set_ring_faults(RingFaults {
            skip_copy_out: true,
            ..Default::default()
        });
        assert!(
            views_outliving_their_region::<Bk>(name) > 0,
            "{name}: without the copy-out, views read overwritten regions"
        );
        assert_eq!(op_stats().ring_copy_outs, 0);
    }

    on_both!(
        views_without_the_copy_out_read_overwritten_regions_fused,
        views_without_the_copy_out_read_overwritten_regions_unfused,
        views_not_copied_out,
        OWN
    );
}
