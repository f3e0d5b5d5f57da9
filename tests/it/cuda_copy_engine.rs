//! The copy engine's protocol on CUDA (`CudaCopyStreams`): copies on the engine's own stream
//! into the ring, flag kernels on the op thread's CubeCL stream, batched and looped copies,
//! and a Burn op reading a ring region as an ordinary tensor.
//!
//! Every GPU test skips with a printed reason when there is no CUDA driver or device, unless
//! `BURN_OFFLOAD_REQUIRE_GPU=1` (see `common::gpu`).

use crate::common;

use std::sync::Arc;
use std::sync::mpsc::channel;

use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_backend::DType;
use burn_offload::copy::{CopyEngine, CopySource, Region};
use burn_offload::cuda::copy_streams::{BatchPath, CudaCopyStreams};
use burn_offload::cuda::{self, kernel};
use burn_offload::{CudaBackend, HostBuffer};
use common::gpu::{gpu, pattern, pinned_with};
use cubecl::Runtime;
use cubecl::cuda::{CudaDevice, CudaRuntime};

const MIB: usize = 1 << 20;

/// Fills 12 weights (1..6 MiB and odd sizes) 3 times through a 16 MiB ring in groups of 2 on
/// a filler thread; this thread acquires each region, copies it out with a kernel on its
/// CubeCL stream and releases it, queueing everything without waiting. Every copy must hold
/// its weight's bytes.
fn cycles(device: &CudaDevice, batched: bool) {
    let sizes: Vec<usize> = (0..12).map(|i| (1 + i % 6) * MIB + i * 4099).collect();
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(n, i as u8))
        .collect();
    let weights: Vec<Arc<HostBuffer>> = data.iter().map(|d| pinned_with(device, d)).collect();
    let streams = CudaCopyStreams::new(device, 16 * MIB as u64, 64, 4, batched).expect("streams");
    if batched {
        println!("batch path: {:?}", streams.batch_path());
    } else {
        assert_eq!(streams.batch_path(), BatchPath::Loop);
    }
    let engine = Arc::new(CopyEngine::new(streams));
    let (tx, rx) = channel::<(usize, Region)>();
    let filler = {
        let engine = engine.clone();
        let weights = weights.clone();
        std::thread::spawn(move || {
            for _ in 0..3 {
                for pair in (0..weights.len()).collect::<Vec<_>>().chunks(2) {
                    let sources = pair
                        .iter()
                        .map(|&w| CopySource::whole(weights[w].clone()))
                        .collect();
                    let regions = engine.fill(sources).expect("fill");
                    for (&w, r) in pair.iter().zip(regions) {
                        tx.send((w, r)).unwrap();
                    }
                }
            }
        })
    };
    let client = CudaRuntime::client(device);
    let mut copies = Vec::new();
    for (w, region) in rx {
        engine.acquire(&region).expect("acquire");
        let out = client.empty(region.len as usize);
        let ring = engine
            .streams()
            .handle(&region)
            .expect("a region inside the ring");
        kernel::launch_device_copy(
            device,
            ring.binding(),
            out.clone().binding(),
            region.len as usize,
        )
        .expect("launch");
        engine.release(&region).expect("release");
        copies.push((w, out));
    }
    filler.join().unwrap();
    cuda::sync(device).expect("no device error");
    assert_eq!(copies.len(), 36);
    for (i, (w, out)) in copies.into_iter().enumerate() {
        let back = client.read_one(out).expect("read back").to_vec();
        assert!(
            back == data[w],
            "copy {i} (weight {w}) differs from its source"
        );
    }
}

#[test]
fn batched_copies_reach_their_readers_in_order() {
    let Some((device, _guard)) = gpu(
        module_path!(),
        "batched_copies_reach_their_readers_in_order",
    ) else {
        return;
    };
    cycles(&device, true);
}

#[test]
fn looped_copies_reach_their_readers_in_order() {
    let Some((device, _guard)) = gpu(module_path!(), "looped_copies_reach_their_readers_in_order")
    else {
        return;
    };
    cycles(&device, false);
}

#[test]
fn a_burn_op_reads_a_region_as_a_tensor() {
    let Some((device, _guard)) = gpu(module_path!(), "a_burn_op_reads_a_region_as_a_tensor") else {
        return;
    };
    type B = CudaBackend<f32>;
    let (k, n) = (64, 48);
    let w: Vec<f32> = (0..k * n).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let host = pinned_with(&device, &bytes);
    let engine = CopyEngine::new(
        CudaCopyStreams::new(&device, 4 * MIB as u64, 8, 2, true).expect("streams"),
    );
    // A small region first, so the weight's region does not start at the ring's offset 0.
    let small = pinned_with(&device, &[1, 2, 3]);
    let first = engine.fill(vec![CopySource::whole(small)]).unwrap()[0];
    engine.discard(&first);
    let region = engine.fill(vec![CopySource::whole(host)]).unwrap()[0];
    assert_eq!(region.offset % 256, 0);
    assert!(region.offset > 0);
    engine.acquire(&region).unwrap();
    let primitive = engine
        .streams()
        .tensor(&region, [k, n].into(), DType::F32)
        .expect("a tensor over the region");
    let weight: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(primitive));
    let x: Tensor<B, 2> = Tensor::from_data(
        TensorData::new(
            (0..3 * k).map(|i| (i % 5) as f32).collect::<Vec<_>>(),
            [3, k],
        ),
        &device,
    );
    let reference: Tensor<B, 2> = Tensor::from_data(TensorData::new(w, [k, n]), &device);
    let got = x.clone().matmul(weight);
    engine.release(&region).unwrap();
    let want = x.matmul(reference);
    got.into_data()
        .assert_approx_eq::<f32>(&want.into_data(), Default::default());
}
