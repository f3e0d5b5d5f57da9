//! CUDA layer correctness: pinned memory, the host-reading `stream_read` kernel, DMA uploads,
//! ordering with Burn ops on CubeCL's stream, and pinned byte counters.
//!
//! Every GPU test skips with a printed reason when there is no CUDA driver or device, unless
//! `BURN_OFFLOAD_REQUIRE_GPU=1` (see `common::gpu`).

use crate::common;

use std::sync::Arc;

use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_offload::cuda::{self, CudaError, UploadPath};
use burn_offload::{CudaBackend, HostBuffer, HostTensor, host_memory_stats};
use common::gpu::{gpu, pattern, pinned_with};
use cubecl::Runtime;
use cubecl::cuda::{CudaDevice, CudaRuntime};

fn pageable_with(data: &[u8]) -> Arc<HostBuffer> {
    let mut buffer = HostBuffer::pageable(data.len()).unwrap();
    buffer.as_mut_slice().copy_from_slice(data);
    Arc::new(buffer)
}

fn read(device: &CudaDevice, handle: cubecl::server::Handle) -> Vec<u8> {
    CudaRuntime::client(device)
        .read_one(handle)
        .expect("reading the device buffer")
        .to_vec()
}

/// (start, len) ranges: 16-byte aligned, odd, 4- and 8-aligned starts, tiny and empty.
const RANGES: [(usize, usize); 7] = [
    (0, (1 << 20) + 13),
    (3, 100_003),
    (4, 65_540),
    (8, 4096 + 5),
    (16, 3 << 20),
    (5, 7),
    (0, 0),
];
const BUFFER_LEN: usize = (3 << 20) + 64;

#[test]
fn probe_reports_a_reason_and_never_panics() {
    let first = cuda::probe();
    assert_eq!(first, cuda::probe());
    match first {
        Ok(info) => assert!(info.device_count > 0),
        Err(e) => {
            assert!(e.is_no_driver(), "{e}");
            assert!(!e.to_string().is_empty());
            // Every entry point fails the same way instead of panicking.
            let err = cuda::alloc_pinned(0, 16).unwrap_err();
            assert!(err.is_no_driver(), "{err}");
            assert!(matches!(
                cuda::upload_dma(&CudaDevice::new(0), &pageable_with(&[1, 2, 3]), 0..3),
                Err(CudaError::NoDriver { .. })
            ));
        }
    }
}

#[test]
fn stream_read_kernel_copies_pinned_memory() {
    let Some((device, _gpu)) = gpu(module_path!(), "stream_read_kernel_copies_pinned_memory")
    else {
        return;
    };
    let data = pattern(BUFFER_LEN, 11);
    let host = pinned_with(&device, &data);
    for (start, len) in RANGES {
        let handle = cuda::upload_sm_copy(&device, &host, start..start + len).unwrap();
        assert_eq!(handle.size_in_used(), len as u64);
        if len == 0 {
            continue; // Nothing to read back (and reading 0 bytes is CubeCL's business).
        }
        let got = read(&device, handle);
        assert_eq!(got.len(), len, "range {start}+{len}");
        assert!(got == data[start..start + len], "range {start}+{len}");
    }
    cuda::sync(&device).unwrap();
}

#[test]
fn dma_upload_copies_pinned_and_pageable_memory() {
    let Some((device, _gpu)) = gpu(
        module_path!(),
        "dma_upload_copies_pinned_and_pageable_memory",
    ) else {
        return;
    };
    let data = pattern(BUFFER_LEN, 29);
    for host in [pinned_with(&device, &data), pageable_with(&data)] {
        for (start, len) in RANGES {
            let handle = cuda::upload_dma(&device, &host, start..start + len).unwrap();
            assert_eq!(handle.size_in_used(), len as u64);
            if len == 0 {
                continue;
            }
            let got = read(&device, handle);
            assert_eq!(got.len(), len, "range {start}+{len}");
            assert!(got == data[start..start + len], "range {start}+{len}");
        }
    }
    cuda::sync(&device).unwrap();
}

#[test]
fn device_copy_kernel_copies_device_buffers() {
    let Some((device, _gpu)) = gpu(module_path!(), "device_copy_kernel_copies_device_buffers")
    else {
        return;
    };
    let data = pattern(1 << 20, 3);
    let client = CudaRuntime::client(&device);
    let src = client.create_from_slice(&data);
    let dst = client.empty(data.len());
    cuda::kernel::launch_device_copy(
        &device,
        src.clone().binding(),
        dst.clone().binding(),
        data.len(),
    )
    .unwrap();
    assert!(read(&device, dst) == data);
}

#[test]
fn uploads_then_burn_ops_without_host_sync() {
    let Some((device, _gpu)) = gpu(module_path!(), "uploads_then_burn_ops_without_host_sync")
    else {
        return;
    };
    let values: Vec<f32> = (0..4 * 1000).map(|i| i as f32 * 0.25 - 100.0).collect();
    let data = TensorData::new(values.clone(), [4, 1000]);
    let host = HostTensor::from_data(&data, |len| {
        cuda::alloc_pinned(device.index, len).map_err(Into::into)
    })
    .unwrap();
    // A view at a non-zero offset too (rows 1..3), contiguous.
    let rows = host.slice(&[(1..3, 1), (0..1000, 1)]).unwrap();
    for path in [UploadPath::SmCopy, UploadPath::Dma] {
        // The upload is queued on this thread's CubeCL stream and the Burn ops follow it on the
        // same stream: no host sync in between.
        let x = Tensor::<CudaBackend, 2>::from_primitive(TensorPrimitive::Float(
            cuda::upload_tensor(&device, &host, path).unwrap(),
        ));
        let y = (x.clone() * 2.0 + 1.0).sum_dim(1);
        let expected: Vec<f32> = values
            .chunks(1000)
            .map(|row| row.iter().map(|v| v * 2.0 + 1.0).sum())
            .collect();
        let got = y.into_data().to_vec::<f32>().unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!(
                (g - e).abs() <= 1e-3 * e.abs().max(1.0),
                "{path:?}: {got:?} vs {expected:?}"
            );
        }
        assert_eq!(x.into_data().to_vec::<f32>().unwrap(), values, "{path:?}");

        let r = Tensor::<CudaBackend, 2>::from_primitive(TensorPrimitive::Float(
            cuda::upload_tensor(&device, &rows, path).unwrap(),
        ));
        let got = (r + 1.0).into_data().to_vec::<f32>().unwrap();
        let expected: Vec<f32> = values[1000..3000].iter().map(|v| v + 1.0).collect();
        assert_eq!(got, expected, "{path:?} (offset view)");
    }
    // Non-contiguous views are refused, not copied wrongly.
    assert!(matches!(
        cuda::upload_tensor(&device, &host.swap_dims(0, 1).unwrap(), UploadPath::Dma),
        Err(CudaError::InvalidArgument { .. })
    ));
}

#[test]
fn pinned_counters_return_to_zero_after_drop() {
    let Some((device, _gpu)) = gpu(module_path!(), "pinned_counters_return_to_zero_after_drop")
    else {
        return;
    };
    // Earlier tests may have left upload sources in CubeCL's drop queue of *their* threads;
    // only this test's own allocations are compared.
    let before = host_memory_stats().live_pinned_bytes;
    let len = (3 << 20) + 1;
    let host = pinned_with(&device, &pattern(len, 5));
    assert_eq!(host_memory_stats().live_pinned_bytes, before + len);

    let a = cuda::upload_dma(&device, &host, 0..len).unwrap();
    let b = cuda::upload_sm_copy(&device, &host, 1..len).unwrap();
    drop(host); // The DMA's drop queue entry and the kernel may still use it.
    assert_eq!(read(&device, a).len(), len);
    assert_eq!(read(&device, b).len(), len - 1);
    cuda::release_upload_sources(&device).unwrap();
    cuda::sync(&device).unwrap();
    assert_eq!(host_memory_stats().live_pinned_bytes, before);
    // And the memory itself is freed (after the device was synchronised).
    cuda::wait_pinned_releases();

    let empty = cuda::alloc_pinned(device.index, 0).unwrap();
    assert_eq!(empty.len(), 0);
    drop(empty);
    assert_eq!(host_memory_stats().live_pinned_bytes, before);
}
