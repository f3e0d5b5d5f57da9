//! The place where the CUDA layer relies on CubeCL 0.10's internals (the generic ones, for
//! every runtime, are in `inner/cubecl/bridge.rs`): the `KernelMetadata` and `CubeTask` impls
//! of [`RawKernel`], a compiled kernel whose `source` is the hand-written one and whose `repr`
//! is that of an empty kernel with the same cube dim (cubecl-cuda reads only its shared-memory
//! size). Each has a test that fails if CubeCL changes it.

use cubecl::cuda::{CudaCompiler, CudaDevice, CudaRuntime};
use cubecl::prelude::{
    AddressType, CompiledKernel, ExecutionMode, KernelBuilder, KernelId, KernelMetadata,
    KernelSettings, StorageType,
};
use cubecl::{CompilationError, Compiler, CubeTask};

use super::kernel::RawKernel;

/// Blocks until every task submitted to CubeCL's queue of CUDA device `ordinal` before this
/// call has run; `false` if the queue could not be reached (see the generic `drain_queue`).
pub(crate) fn drain_queue(ordinal: usize) -> bool {
    crate::inner::cubecl::drain_queue::<CudaRuntime>(&CudaDevice::new(ordinal))
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
    use cubecl::prelude::CubeDim;

    use super::*;
    use crate::inner::cuda::kernel::{STREAM_READ, STREAM_READ_BLOCK, STREAM_READ_SOURCE};

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
}
