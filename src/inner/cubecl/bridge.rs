//! The few places that rely on CubeCL 0.10's internals rather than its public client API, for
//! any runtime, in one file, each with a test that fails if the behaviour relied on changes:
//!
//! - [`new_handle`] and [`write_after`]: a device buffer reserved and written by one task on
//!   CubeCL's device queue (`Handle::new`, `ComputeServer::initialize_memory` and `write`), as
//!   `ComputeClient::create` does minus its bounce copy of the bytes (cubecl-runtime's
//!   `do_create` copies every `Bytes` into a new `Vec`), after CubeCL's cross-stream alignment
//!   with other streams (`get_resource` of a one-byte token made on each of them);
//! - [`write_regions_after`]: writes into views of an existing buffer (the copy engine's ring)
//!   after submitting other streams' recorded work, [`on_device_queue`], a task behind them, and
//!   [`flush_queue`]: CubeCL's device thread takes queued tasks only in full or flushed batches;
//! - [`drain_queue`]: a blocking no-op task, which returns once every task submitted to the
//!   device's queue before it has run (one FIFO queue per device);
//! - [`current_stream`]: `StreamId::current()`, CubeCL's stream of the calling thread.
//!
//! The CUDA layer adds its own (`RawKernel`'s compiled representation) in `cuda/bridge.rs`.

use cubecl::Runtime;
use cubecl::bytes::Bytes;
use cubecl::device::Device;
use cubecl::device_handle::DeviceHandle;
use cubecl::server::{ComputeServer, CopyDescriptor, Handle};
use cubecl::stream_id::StreamId;

/// The id of CubeCL's stream of the calling thread (CubeCL gives each OS thread its own).
pub(crate) fn current_stream() -> u64 {
    StreamId::current().value
}

/// A handle to `len` bytes of device memory on `stream`, not reserved yet: [`write_after`]
/// reserves and fills it.
pub(crate) fn new_handle(stream: StreamId, len: u64) -> Handle {
    Handle::new(stream, len)
}

/// Queues one task on `device`'s CubeCL queue (the queue `ComputeClient` submits to, so it runs
/// in order with the calling thread's other CubeCL work) that makes `stream` wait for the work
/// queued so far on each stream of `after`, reserves `handle`'s memory on `stream` and writes
/// `bytes` into it. Wait, reserve and write are one task, as `do_create` reserves and writes: a
/// buffer the reservation finds free had its last reader queued by an earlier task.
pub(crate) fn write_after<R: Runtime>(
    device: &R::Device,
    stream: StreamId,
    handle: Handle,
    bytes: Bytes,
    after: Vec<StreamId>,
) {
    let len = handle.size();
    let memory = handle.memory.clone();
    let descriptor = CopyDescriptor::new(handle.binding(), [len as usize].into(), [1].into(), 1);
    DeviceHandle::<R::Server>::new(device.to_id()).submit(move |server| {
        for other in after {
            let token = Handle::new(other, 1);
            server.initialize_memory(token.memory.clone(), 1, other);
            if let Err(e) = server.get_resource(token.binding(), stream) {
                // The alignment has happened by then; only the token's lookup failed.
                log::warn!("ordering an upload after stream {}: {e:?}", other.value);
            }
        }
        server.initialize_memory(memory, len, stream);
        server.write(vec![(descriptor, bytes)], stream);
    });
}

/// Queues one task on `device`'s CubeCL queue that submits the work recorded so far on each
/// stream of `first` (`ComputeServer::flush`), then writes each `(handle, bytes)` (a view of an
/// existing buffer, e.g. a ring region: nothing is reserved) on `stream`, and submits that. On
/// wgpu a write lands at the next submission, ahead of work recorded but not yet submitted:
/// `first` must name the streams that may still read the bytes being overwritten.
pub(crate) fn write_regions_after<R: Runtime>(
    device: &R::Device,
    stream: StreamId,
    writes: Vec<(Handle, Bytes)>,
    first: Vec<StreamId>,
) {
    let descriptors: Vec<_> = writes
        .into_iter()
        .map(|(handle, bytes)| {
            let len = bytes.len();
            (
                CopyDescriptor::new(handle.binding(), [len].into(), [1].into(), 1),
                bytes,
            )
        })
        .collect();
    DeviceHandle::<R::Server>::new(device.to_id()).submit(move |server| {
        for other in first {
            if let Err(e) = server.flush(other) {
                log::warn!(
                    "submitting stream {}'s work before a write: {e:?}",
                    other.value
                );
            }
        }
        server.write(descriptors, stream);
        if let Err(e) = server.flush(stream) {
            log::warn!("submitting a ring write: {e:?}");
        }
    });
    flush_queue::<R>(device);
}

/// Queues `f` on `device`'s CubeCL queue, flushed: it runs soon, once every task submitted
/// before it has run (CubeCL's device thread takes queued tasks only in flushed batches, so
/// without the flush a host waiting for `f` could wait for good).
pub(crate) fn on_device_queue<R: Runtime>(device: &R::Device, f: impl FnOnce() + Send + 'static) {
    DeviceHandle::<R::Server>::new(device.to_id()).submit(move |_server| f());
    flush_queue::<R>(device);
}

/// Makes CubeCL's device thread take the tasks queued on `device` so far without waiting for
/// them (it takes queued tasks only in full or flushed batches): a kernel that another
/// stream waits for (the copy engine's release flag) must not sit in the queue until the op
/// thread's next blocking call.
pub(crate) fn flush_queue<R: Runtime>(device: &R::Device) {
    DeviceHandle::<R::Server>::new(device.to_id()).flush_queue();
}

/// Blocks until every task submitted to CubeCL's queue of `device` before this call has run
/// (handed its work to the driver); `false` if the queue could not be reached. Do not call it
/// from CubeCL's server thread.
#[cfg(any(feature = "cuda", test))]
pub(crate) fn drain_queue<R: Runtime>(device: &R::Device) -> bool {
    DeviceHandle::<R::Server>::new(device.to_id())
        .submit_blocking(|_server| ())
        .is_ok()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    /// Copies made on the prefetch thread are ordered against the op threads' streams by id:
    /// each thread must have its own, stable one.
    #[test]
    fn each_thread_has_its_own_stable_stream() {
        let here = current_stream();
        assert_eq!(current_stream(), here);
        let (tx, rx) = channel();
        std::thread::spawn(move || tx.send((current_stream(), current_stream())).unwrap());
        let (a, b) = rx.recv().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, here);
    }

    /// A handle made for a stream and a size names them: `write_after` reserves exactly that.
    #[test]
    fn a_new_handle_is_of_its_stream_and_size() {
        let stream = StreamId::current();
        let handle = new_handle(stream, 4096);
        assert_eq!(handle.size(), 4096);
        assert_eq!(handle.stream, stream);
    }

    /// The write lands, and a drain returns after the task that made it, on wgpu (lavapipe in
    /// CI; skipped where there is no Vulkan adapter).
    #[cfg(feature = "wgpu")]
    #[test]
    fn write_after_then_drain_reads_back_the_bytes() {
        use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
        if let Err(reason) = crate::inner::cubecl::wgpu::probe() {
            eprintln!("skipped: {reason}");
            return;
        }
        let device = WgpuDevice::default();
        let client = WgpuRuntime::client(&device);
        let data: Vec<u8> = (0..=255u8).cycle().take(1 << 16).collect();
        let stream = StreamId::current();
        let handle = new_handle(stream, data.len() as u64);
        // An earlier stream's work to wait for, as a prefetched copy would.
        let other = std::thread::spawn(StreamId::current).join().unwrap();
        write_after::<WgpuRuntime>(
            &device,
            stream,
            handle.clone(),
            Bytes::from_bytes_vec(data.clone()),
            vec![other],
        );
        assert!(drain_queue::<WgpuRuntime>(&device));
        let back = client.read_one(handle).expect("reads back");
        assert_eq!(back.to_vec(), data);
    }
}
