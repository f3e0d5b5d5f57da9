//! The few places that rely on CubeCL 0.10's internals rather than its public client API, in
//! one file, each with a test that fails if the behaviour relied on changes (the ones that need
//! a GPU skip, saying why, where there is none):
//!
//! - [`new_handle`] and [`write_after`]: a device buffer reserved and written by one task on
//!   CubeCL's device queue (`Handle::new`, `ComputeServer::initialize_memory` and `write`), as
//!   `ComputeClient::create` does minus its bounce copy of the bytes (cubecl-runtime's
//!   `do_create` copies every `Bytes` into a new `Vec`), after CubeCL's cross-stream alignment
//!   with other streams (`get_resource` of a one-byte token made on each of them);
//! - [`drain_queue`]: a blocking no-op task, which returns once every task submitted to the
//!   device's queue before it has run (one FIFO queue per device);
//! - [`current_stream`]: `StreamId::current()`, CubeCL's stream of the calling thread;
//! - the `KernelMetadata` and `CubeTask` impls of [`RawKernel`]: a compiled kernel whose
//!   `source` is the hand-written one and whose `repr` is that of an empty kernel with the same
//!   cube dim (cubecl-cuda reads only its shared-memory size).

use cubecl::Runtime;
use cubecl::bytes::Bytes;
use cubecl::cuda::{CudaCompiler, CudaDevice, CudaRuntime};
use cubecl::device::Device;
use cubecl::device_handle::DeviceHandle;
use cubecl::prelude::{
    AddressType, CompiledKernel, ExecutionMode, KernelBuilder, KernelId, KernelMetadata,
    KernelSettings, StorageType,
};
use cubecl::server::{ComputeServer, CopyDescriptor, Handle};
use cubecl::stream_id::StreamId;
use cubecl::{CompilationError, Compiler, CubeTask};

use super::kernel::RawKernel;

/// CubeCL's compute server for CUDA devices.
type CudaServer = <CudaRuntime as Runtime>::Server;

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
/// `bytes` into it (`cuMemcpyHtoDAsync` from the `Bytes`' memory, which CubeCL holds until the
/// copy's fence has passed). Wait, reserve and write are one task, as `do_create` reserves and
/// writes: a buffer the reservation finds free had its last reader queued by an earlier task.
pub(crate) fn write_after(
    device: &CudaDevice,
    stream: StreamId,
    handle: Handle,
    bytes: Bytes,
    after: Vec<StreamId>,
) {
    let len = handle.size();
    let memory = handle.memory.clone();
    let descriptor = CopyDescriptor::new(handle.binding(), [len as usize].into(), [1].into(), 1);
    DeviceHandle::<CudaServer>::new(device.to_id()).submit(move |server| {
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

/// Blocks until every task submitted to CubeCL's queue of CUDA device `ordinal` before this
/// call has run (handed its work to the driver); `false` if the queue could not be reached.
/// Do not call it from CubeCL's server thread.
pub(crate) fn drain_queue(ordinal: usize) -> bool {
    DeviceHandle::<CudaServer>::new(CudaDevice::new(ordinal).to_id())
        .submit_blocking(|_server| ())
        .is_ok()
}

impl KernelMetadata for RawKernel {
    fn name(&self) -> &'static str {
        self.entrypoint
    }

    /// Unique per (entry point, source, cube dim): CubeCL caches compiled modules (and, when
    /// configured, PTX on disk) by this id.
    fn id(&self) -> KernelId {
        KernelId::new::<Self>()
            .address_type(AddressType::U32)
            .cube_dim(self.cube_dim)
            .info((self.entrypoint, self.source_hash, self.source.len()))
    }

    fn address_type(&self) -> StorageType {
        AddressType::U32.unsigned_type()
    }
}

impl CubeTask<CudaCompiler> for RawKernel {
    fn compile(
        &self,
        compiler: &mut CudaCompiler,
        compilation_options: &<CudaCompiler as Compiler>::CompilationOptions,
        mode: ExecutionMode,
        address_type: StorageType,
    ) -> Result<CompiledKernel<CudaCompiler>, CompilationError> {
        // A legitimate representation of an empty kernel with the same cube dim and name:
        // cubecl-cuda reads only its shared-memory size (0) from it.
        let definition = KernelBuilder::default().build(
            KernelSettings::default()
                .cube_dim(self.cube_dim)
                .kernel_name(self.entrypoint),
        );
        let repr = compiler.compile(definition, compilation_options, mode, address_type)?;
        Ok(CompiledKernel {
            entrypoint_name: self.entrypoint.to_string(),
            debug_name: Some(self.entrypoint),
            source: self.source.to_string(),
            repr: Some(repr),
            cube_dim: self.cube_dim,
            debug_info: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use cubecl::prelude::CubeDim;

    use super::*;
    use crate::inner::cuda::kernel::{STREAM_READ, STREAM_READ_BLOCK, STREAM_READ_SOURCE};

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

    /// `compile` runs the real CUDA compiler on the empty definition (pure Rust, no GPU).
    #[test]
    fn compile_returns_the_hand_written_source_with_a_repr() {
        let mut compiler = CudaCompiler::default();
        let options = Default::default();
        let compiled = STREAM_READ
            .compile(
                &mut compiler,
                &options,
                ExecutionMode::Checked,
                STREAM_READ.address_type(),
            )
            .expect("compiles");
        assert_eq!(compiled.entrypoint_name, "burn_offload_stream_read");
        assert_eq!(compiled.source, STREAM_READ_SOURCE);
        assert_eq!(compiled.cube_dim, CubeDim::new_1d(STREAM_READ_BLOCK));
        let repr = compiled.repr.expect("cubecl-cuda unwraps the repr");
        assert_eq!(repr.shared_memory_size(), 0);
    }

    /// The write lands, and a drain returns after the task that made it (needs a GPU).
    #[test]
    fn write_after_then_drain_reads_back_the_bytes() {
        if let Err(e) = crate::cuda::probe() {
            eprintln!("skipped: no CUDA driver or device ({e})");
            return;
        }
        let device = CudaDevice::new(0);
        let client = CudaRuntime::client(&device);
        let data: Vec<u8> = (0..=255u8).cycle().take(1 << 16).collect();
        let stream = StreamId::current();
        let handle = new_handle(stream, data.len() as u64);
        write_after(
            &device,
            stream,
            handle.clone(),
            Bytes::from_bytes_vec(data.clone()),
            vec![],
        );
        assert!(drain_queue(0));
        let back = client.read_one(handle).expect("reads back");
        assert_eq!(back.to_vec(), data);
        let _ = CubeDim::new_1d(1);
    }
}
