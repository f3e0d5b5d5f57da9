//! Host→device and device→device bandwidth on a CUDA device (feature `cuda`).
//!
//! `cargo bench --features cuda --bench bandwidth` prints the card's name, then for each size
//! from 16 MiB to 1 GiB (doubling) the median GB/s (10^9 bytes per second) of:
//! - `dma_pinned`: copy-engine DMA from pinned memory into a new CubeCL buffer
//!   (`cuda::upload_dma`, no bounce copy);
//! - `sm_read_mapped`: the `stream_read` kernel reading pinned, host-mapped memory over the bus
//!   into a new CubeCL buffer (`cuda::upload_sm_copy`);
//! - `client_create_pageable`: `ComputeClient::create` from a pageable `Vec` (CubeCL's own
//!   upload: an internal copy into a new `Vec`, then a DMA from pageable memory);
//! - `d2d_copy_kernel`: the `device_copy` kernel between two device buffers (bytes copied per
//!   second; the memory traffic is twice that).
//!
//! Each sample moves at least 256 MiB (several transfers of the size back to back), timed from
//! an idle stream to the end of a stream sync. The methods run interleaved, one sample each per
//! round, after warm-up rounds. The first size's results are read back and checked.
//!
//! Environment: `BANDWIDTH_JSON=path` also writes the results as JSON; `BANDWIDTH_DEVICE`
//! (default 0), `BANDWIDTH_REPS` (rounds, default 10), `BANDWIDTH_MAX_MIB` (default 1024).
//! Without a CUDA driver it prints why and exits 0.

use std::sync::Arc;
use std::time::Instant;

use burn_offload::HostBuffer;
use burn_offload::cuda::{self, CudaError, driver, kernel};
use cubecl::Runtime;
use cubecl::bytes::Bytes;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::server::Handle;

const MIB: usize = 1 << 20;
const MIN_SAMPLE_BYTES: usize = 256 * MIB;
const WARMUP_ROUNDS: usize = 2;

const METHODS: [&str; 4] = [
    "dma_pinned",
    "sm_read_mapped",
    "client_create_pageable",
    "d2d_copy_kernel",
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_mul(13).wrapping_add(1))
        .collect()
}

/// The inputs of one size, reused by every sample.
struct Inputs {
    size: usize,
    pinned: Arc<HostBuffer>,
    pageable: Vec<u8>,
    device_src: Handle,
}

/// Runs `transfers` transfers of one method and returns the seconds they took, from an idle
/// stream to the end of a stream sync, plus the last destination handle.
fn sample(
    device: &CudaDevice,
    method: &str,
    inputs: &Inputs,
    transfers: usize,
) -> Result<(f64, Handle), CudaError> {
    let client = CudaRuntime::client(device);
    let size = inputs.size;
    // Prepared outside the timed region: `create` consumes its `Bytes`.
    let mut pageable: Vec<Bytes> = if method == "client_create_pageable" {
        (0..transfers)
            .map(|_| Bytes::from_bytes_vec(inputs.pageable.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let mut d2d_dst: Vec<Handle> = if method == "d2d_copy_kernel" {
        (0..transfers).map(|_| client.empty(size)).collect()
    } else {
        Vec::new()
    };
    cuda::sync(device)?;
    let start = Instant::now();
    let mut outputs = Vec::with_capacity(transfers);
    for _ in 0..transfers {
        let handle = match method {
            "dma_pinned" => cuda::upload_dma(device, &inputs.pinned, 0..size)?,
            "sm_read_mapped" => cuda::upload_sm_copy(device, &inputs.pinned, 0..size)?,
            "client_create_pageable" => client.create(pageable.pop().expect("prepared")),
            "d2d_copy_kernel" => {
                let dst = d2d_dst.pop().expect("prepared");
                kernel::launch_device_copy(
                    device,
                    inputs.device_src.clone().binding(),
                    dst.clone().binding(),
                    size,
                )?;
                dst
            }
            _ => unreachable!("unknown method {method}"),
        };
        outputs.push(handle);
    }
    cuda::sync(device)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok((seconds, outputs.pop().expect("at least one transfer")))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

struct Row {
    method: &'static str,
    bytes: usize,
    samples_gbps: Vec<f64>,
}

fn run(ordinal: usize) -> Result<(), CudaError> {
    let info = cuda::probe()?;
    let device = CudaDevice::new(ordinal);
    let name = driver::device_name(ordinal)?;
    let (major, minor) = driver::compute_capability(ordinal)?;
    let sms = driver::multiprocessor_count(ordinal)?;
    println!(
        "device {ordinal}: {name} (compute capability {major}.{minor}, {sms} SMs, driver CUDA {}.{})",
        info.driver_version / 1000,
        info.driver_version % 1000 / 10
    );
    let reps = env_usize("BANDWIDTH_REPS", 10).max(1);
    let max_bytes = env_usize("BANDWIDTH_MAX_MIB", 1024).max(16) * MIB;
    println!(
        "median GB/s (1 GB = 10^9 bytes) over {reps} rounds after {WARMUP_ROUNDS} warm-up rounds; \
         each sample moves >= {} MiB",
        MIN_SAMPLE_BYTES / MIB
    );

    let mut rows: Vec<Row> = Vec::new();
    let mut size = 16 * MIB;
    let mut first = true;
    while size <= max_bytes {
        let data = pattern(size);
        let mut pinned = cuda::alloc_pinned(ordinal, size)?;
        pinned.as_mut_slice().copy_from_slice(&data);
        let pinned = Arc::new(pinned);
        let device_src = cuda::upload_dma(&device, &pinned, 0..size)?;
        let inputs = Inputs {
            size,
            pinned,
            pageable: data,
            device_src,
        };
        let transfers = MIN_SAMPLE_BYTES.div_ceil(size).max(1);

        if first {
            for method in METHODS {
                let (_, handle) = sample(&device, method, &inputs, 1)?;
                let got = CudaRuntime::client(&device)
                    .read_one(handle)
                    .map_err(CudaError::server)?;
                if got[..] != inputs.pageable[..] {
                    return Err(CudaError::InvalidArgument {
                        reason: format!("{method} produced wrong data"),
                    });
                }
            }
            println!(
                "check: all methods copied the {} MiB input exactly",
                size / MIB
            );
            first = false;
        }

        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); METHODS.len()];
        for round in 0..WARMUP_ROUNDS + reps {
            // Rotate the order every round so that no method always follows the same one.
            for k in 0..METHODS.len() {
                let m = (k + round) % METHODS.len();
                let (seconds, _) = sample(&device, METHODS[m], &inputs, transfers)?;
                if round >= WARMUP_ROUNDS {
                    samples[m].push((transfers * size) as f64 / seconds / 1e9);
                }
            }
        }
        for (method, samples_gbps) in METHODS.into_iter().zip(samples) {
            rows.push(Row {
                method,
                bytes: size,
                samples_gbps,
            });
        }
        drop(inputs);
        cuda::free_upload_sources(&device)?;
        size *= 2;
    }

    // The table: one line per size, one column per method.
    print!("{:>10}", "size");
    for method in METHODS {
        print!(" {method:>24}");
    }
    println!();
    let mut json_rows = Vec::new();
    for chunk in rows.chunks_mut(METHODS.len()) {
        print!("{:>6} MiB", chunk[0].bytes / MIB);
        for row in chunk.iter_mut() {
            let mut sorted = row.samples_gbps.clone();
            let med = median(&mut sorted);
            print!(" {med:>24.2}");
            json_rows.push(serde_json::json!({
                "method": row.method,
                "bytes": row.bytes,
                "median_gbps": med,
                "min_gbps": sorted.first(),
                "max_gbps": sorted.last(),
                "samples_gbps": row.samples_gbps,
            }));
        }
        println!();
    }

    if let Ok(path) = std::env::var("BANDWIDTH_JSON") {
        let json = serde_json::json!({
            "device": name,
            "ordinal": ordinal,
            "compute_capability": [major, minor],
            "multiprocessors": sms,
            "driver_version": info.driver_version,
            "rounds": reps,
            "warmup_rounds": WARMUP_ROUNDS,
            "min_sample_bytes": MIN_SAMPLE_BYTES,
            "gb": "1e9 bytes",
            "results": json_rows,
        });
        let text = serde_json::to_string_pretty(&json).expect("serialisable");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("bandwidth: could not write {path}: {e}");
            std::process::exit(1);
        }
        println!("wrote {path}");
    }
    Ok(())
}

fn main() {
    let ordinal = env_usize("BANDWIDTH_DEVICE", 0);
    match run(ordinal) {
        Ok(()) => {}
        Err(e) if e.is_no_driver() => {
            println!("bandwidth: skipped, {e}");
        }
        Err(e) => {
            eprintln!("bandwidth: failed: {e}");
            std::process::exit(1);
        }
    }
}
