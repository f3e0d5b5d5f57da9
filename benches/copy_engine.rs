//! The copy engine's design, by the numbers, on one CUDA device in one run (feature `cuda`):
//! the same layers of weights (the `1b` and `7b` presets' matrix sizes, bf16, pinned) moved
//! to the device and read there, three ways:
//!
//! - `dma`: the copies alone on the engine's stream, nothing reading them (the bus bound for
//!   exactly these sizes: GB/s from the same run and the same copy sizes);
//! - `ring`: the copy engine (`CopyEngine<CudaCopyStreams>`): a filler thread fills one layer
//!   per group (batched with `cuMemcpyBatchAsync` where the driver has it, then looped), the op
//!   thread acquires each region, reads it with a kernel (a device copy into a scratch buffer,
//!   standing in for the matmul) and releases it;
//! - `cubecl`: what prefetch mode does today: a second thread uploads each tensor through
//!   CubeCL (`cuda::upload_tensor_after`, one server task each, cross-stream alignment with
//!   the op thread's stream), at most two layers ahead, and the op thread reads each the same
//!   way and drops it.
//!
//! Each prints ms per pass over the layers, GB/s, and the efficiency `bound / measured` with
//! `bound = max(reads alone, bytes / dma GB/s)`. Medians of `COPY_BENCH_SAMPLES` (default 5)
//! after 2 warm-up passes. `COPY_BENCH_LAYERS` (default 6) layers per preset,
//! `COPY_BENCH_PRESETS` (default `1b,7b`). Without a CUDA driver it prints why and exits 0.

mod cuda_common;

use std::sync::Arc;
use std::sync::mpsc::{channel, sync_channel};
use std::time::Instant;

use burn_backend::DType;
use burn_offload::HostTensor;
use burn_offload::copy::{CopyEngine, CopySource, Region};
use burn_offload::cuda::copy_streams::CudaCopyStreams;
use burn_offload::cuda::{self, CudaError, driver, kernel};
use cubecl::Runtime;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cuda_common::{MIB, WARMUP, env_usize, gbps, median};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The matrices of one decoder layer, in bytes (bf16): q, k, v, o, gate, up, down.
fn layer(preset: &str) -> BenchResult<Vec<usize>> {
    let (dim, kv, ffn) = match preset {
        "1b" => (2048, 512, 8192),
        "7b" => (4096, 4096, 11_008),
        "50b" => (8192, 1024, 22_016),
        other => return Err(format!("unknown preset {other:?}: use 1b, 7b or 50b").into()),
    };
    Ok(vec![
        dim * dim * 2,
        dim * kv * 2,
        dim * kv * 2,
        dim * dim * 2,
        dim * ffn * 2,
        dim * ffn * 2,
        ffn * dim * 2,
    ])
}

fn sources(group: &[HostTensor]) -> Vec<CopySource> {
    group
        .iter()
        .map(|t| CopySource::whole(t.buffer().clone()))
        .collect()
}

/// Seconds of `pass`, a median over the samples after the warm-ups.
fn measure(samples: usize, mut pass: impl FnMut() -> BenchResult<()>) -> BenchResult<f64> {
    for _ in 0..WARMUP {
        pass()?;
    }
    let mut times = Vec::new();
    for _ in 0..samples {
        let start = Instant::now();
        pass()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Reads `len` bytes of `src` with a kernel on the calling thread's stream.
fn read(
    device: &CudaDevice,
    src: cubecl::server::Handle,
    scratch: &cubecl::server::Handle,
    len: usize,
) -> BenchResult<()> {
    kernel::launch_device_copy(device, src.binding(), scratch.clone().binding(), len)?;
    Ok(())
}

struct Layers {
    tensors: Vec<HostTensor>,
    per_layer: usize,
    bytes: usize,
}

fn run_preset(device: &CudaDevice, preset: &str, layers: usize, samples: usize) -> BenchResult<()> {
    let sizes = layer(preset)?;
    let per_layer = sizes.len();
    let mut tensors = Vec::new();
    for l in 0..layers {
        for (i, &n) in sizes.iter().enumerate() {
            let mut b = cuda::alloc_pinned(device.index, n)?;
            b.as_mut_slice().fill((l * 7 + i) as u8);
            tensors.push(HostTensor::new(b, vec![n], DType::U8)?);
        }
    }
    let bytes: usize = tensors.iter().map(HostTensor::size_bytes).sum();
    let model = Layers {
        tensors,
        per_layer,
        bytes,
    };
    let largest = *sizes.iter().max().unwrap_or(&0);
    let layer_bytes: usize = sizes.iter().sum();
    println!(
        "\n{preset}: {layers} layers of {} matrices, {:.1} MiB a layer, {:.2} GB a pass",
        per_layer,
        layer_bytes as f64 / MIB as f64,
        bytes as f64 / 1e9
    );
    let client = CudaRuntime::client(device);
    let scratch = client.empty(largest);
    // Ring: three layers (one being read, one being filled, one of slack).
    let ring_bytes = (3 * layer_bytes) as u64;

    // The reads alone, from resident copies: the compute side of the bound.
    let resident: Vec<_> = model
        .tensors
        .iter()
        .map(|t| cuda::upload_dma(device, t.buffer(), 0..t.size_bytes()))
        .collect::<Result<_, _>>()?;
    let reads = measure(samples, || {
        for (h, t) in resident.iter().zip(&model.tensors) {
            read(device, h.clone(), &scratch, t.size_bytes())?;
        }
        cuda::sync(device)?;
        Ok(())
    })?;
    drop(resident);

    for batched in [true, false] {
        let streams = CudaCopyStreams::new(device, ring_bytes, 64, 4, batched)?;
        let path = streams.batch_path();
        let engine = Arc::new(CopyEngine::new(streams));
        // The copies alone.
        let dma = measure(samples, || {
            for group in model.tensors.chunks(model.per_layer) {
                let regions = engine.fill(sources(group))?;
                for r in &regions {
                    engine.discard(r);
                }
            }
            engine.streams().synchronize()?;
            Ok(())
        })?;
        let bound = reads.max(dma);
        // Copies and reads, through the ring.
        let ring = measure(samples, || {
            let (tx, rx) = channel::<Region>();
            let filler = {
                let engine = engine.clone();
                let groups: Vec<Vec<CopySource>> =
                    model.tensors.chunks(model.per_layer).map(sources).collect();
                std::thread::spawn(move || -> Result<(), String> {
                    for g in groups {
                        let regions = engine.fill(g).map_err(|e| e.to_string())?;
                        for r in regions {
                            let _ = tx.send(r);
                        }
                    }
                    Ok(())
                })
            };
            for region in rx {
                engine.acquire(&region)?;
                read(
                    device,
                    engine.streams().handle(&region)?,
                    &scratch,
                    region.len as usize,
                )?;
                engine.release(&region)?;
            }
            filler.join().map_err(|_| "the filler panicked")??;
            cuda::sync(device)?;
            Ok(())
        })?;
        println!(
            "  {preset} {:?}: dma {:.2} ms ({:.1} GB/s); reads alone {:.2} ms; ring {:.2} ms \
             ({:.1} GB/s), efficiency {:.3}",
            path,
            dma * 1e3,
            gbps(model.bytes, dma),
            reads * 1e3,
            ring * 1e3,
            gbps(model.bytes, ring),
            bound / ring
        );
        if batched {
            // CubeCL's path, against the same bound (the batched engine's DMA time).
            let op_stream = cuda::current_stream();
            let cubecl = measure(samples, || {
                let (tx, rx) = sync_channel(2 * model.per_layer);
                let tensors = model.tensors.clone();
                let dev = device.clone();
                let uploader = std::thread::spawn(move || -> Result<(), String> {
                    for t in tensors {
                        let up = cuda::upload_tensor_after(&dev, &t, &[op_stream])
                            .map_err(|e| e.to_string())?;
                        if tx.send((up.handle, t.size_bytes())).is_err() {
                            break;
                        }
                    }
                    let _ = cuda::release_upload_sources(&dev);
                    Ok(())
                });
                for (handle, len) in rx {
                    read(device, handle, &scratch, len)?;
                }
                uploader.join().map_err(|_| "the uploader panicked")??;
                cuda::sync(device)?;
                Ok(())
            })?;
            println!(
                "  {preset} cubecl uploads: {:.2} ms ({:.1} GB/s), efficiency {:.3} (same bound)",
                cubecl * 1e3,
                gbps(model.bytes, cubecl),
                bound / cubecl
            );
        }
        drop(engine);
    }
    cuda::free_upload_sources(device)?;
    Ok(())
}

fn run() -> BenchResult<()> {
    let info = cuda::probe()?;
    let device = CudaDevice::new(0);
    let name = driver::device_name(device.index)?;
    println!(
        "copy_engine bench on {name} (driver CUDA {}.{})",
        info.driver_version / 1000,
        info.driver_version % 1000 / 10
    );
    let samples = env_usize("COPY_BENCH_SAMPLES", 5);
    let layers = env_usize("COPY_BENCH_LAYERS", 6);
    let presets = std::env::var("COPY_BENCH_PRESETS").unwrap_or_else(|_| "1b,7b".into());
    for preset in presets.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        run_preset(&device, preset, layers, samples)?;
    }
    println!("\ncard: {name}; efficiency = max(reads alone, dma) / measured; GB = 1e9 bytes");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        match e.downcast_ref::<CudaError>() {
            Some(e) if e.is_no_driver() => println!("copy_engine: skipped, {e}"),
            _ => {
                eprintln!("copy_engine: failed: {e}");
                std::process::exit(1);
            }
        }
    }
}
