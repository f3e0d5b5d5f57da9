//! [`OffloadTarget`] for Burn's fused CubeCL backends, `Fusion<CubeBackend<R, F, I, BT>>`:
//! what `burn::backend::Cuda`, `Wgpu` and `Rocm` are with Burn's default features.
//!
//! Fusion queues ops lazily per thread and runs them later, fused where it can. Nothing here
//! resolves a fused tensor (that would drain the thread's whole queue) or reads one back:
//! - **Copies** are made by the unfused target (one server-side write into a fresh buffer) and
//!   enter the graph the way Burn's own `Fusion::float_from_data` does: an `Init` operation
//!   over the buffer's handle. No host round trip, no drain. Right before a matmul (what
//!   `linear` does) this costs nothing in fusion terms: the matmul fuser starts a new kernel
//!   at the matmul anyway, and its epilogue still fuses; in the middle of an elementwise chain
//!   it splits the chain, as any `from_data` does.
//! - **Prefetched copies** stay unfused `CubeTensor`s on the prefetch thread
//!   ([`OffloadTarget::Staged`]) and enter the graph on the thread that takes them: a tensor
//!   registered on the prefetch thread would belong to that thread's fusion stream, and
//!   fusion's cross-stream logic would then drain streams.
//! - **In-place reads** (CUDA's host-reading matmul and gather) are lazy custom operations
//!   ([`HostReadOp`]): registering one executes nothing; fusion runs it in order on the
//!   calling thread's CubeCL stream, with the host view it holds (so the host memory outlives
//!   the read). A custom operation is a fusion boundary: nothing fuses into or after it.

use std::fmt;
use std::marker::PhantomData;

use burn_backend::ops::{FloatTensorOps, ModuleOps};
use burn_backend::tensor::{FloatTensor, IntTensor};
use burn_backend::{DType, Shape, TensorMetadata};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionTensor, NoOp, get_client};
use burn_ir::{
    BackendIr, CustomOpIr, HandleContainer, InitOperationIr, OperationIr, OperationOutput, TensorIr,
};

use std::sync::Arc;

use super::OffloadRuntime;
use super::ring::ring_for;
use crate::copy::{CopyError, RingShape};
use crate::error::OffloadError;
use crate::host::{HostBuffer, HostTensor};
use crate::inner::{HostMatmulShape, OffloadTarget, RingStreams};

type Inner<R, F, I, BT> = CubeBackend<R, F, I, BT>;
type Fused<R, F, I, BT> = Fusion<Inner<R, F, I, BT>>;
type FusedTensor<R, F, I, BT> = FusionTensor<<Inner<R, F, I, BT> as FusionBackend>::FusionRuntime>;
/// Names the element types without owning any.
type Marker<F, I, BT> = PhantomData<fn() -> (F, I, BT)>;
type Handles<R, F, I, BT> = HandleContainer<<Inner<R, F, I, BT> as BackendIr>::Handle>;

/// Registers an inner (unfused) tensor in the calling thread's fusion stream without copying
/// or draining: Burn's own `Fusion::float_from_data` registration.
pub(crate) fn register<R, F, I, BT>(tensor: CubeTensor<R>) -> FloatTensor<Fused<R, F, I, BT>>
where
    R: OffloadRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let client = get_client::<Inner<R, F, I, BT>>(&tensor.device);
    let shape = tensor.shape();
    let dtype = tensor.dtype;
    let handle = <Inner<R, F, I, BT> as BackendIr>::float_tensor_handle(tensor);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    client
        .register(
            OperationStreams::default(),
            OperationIr::Init(desc),
            NoOp::<Inner<R, F, I, BT>>::new(),
        )
        .output()
}

/// The kind of a [`HostReadOp`] input: which handle accessor reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputKind {
    Float,
    Int,
}

/// What a [`HostReadOp`] runs when fusion executes it: the inner inputs and the host view in,
/// the inner output out.
pub(crate) type HostReadFn<R> = fn(Vec<CubeTensor<R>>, &HostTensor) -> CubeTensor<R>;

/// A lazy custom operation that reads a host view when fusion executes it. It holds the view,
/// so the host buffer stays alive (and is not rewritten by an optimizer step, which waits for
/// the sole reference) until the op has run and been dropped.
pub(crate) struct HostReadOp<R: OffloadRuntime, F, I, BT> {
    desc: CustomOpIr,
    kinds: Vec<InputKind>,
    host: HostTensor,
    run: HostReadFn<R>,
    _backend: Marker<F, I, BT>,
}

impl<R: OffloadRuntime, F, I, BT> fmt::Debug for HostReadOp<R, F, I, BT> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostReadOp")
            .field("desc", &self.desc)
            .field("host", &self.host.dims())
            .finish()
    }
}

impl<R, F, I, BT> Operation<<Inner<R, F, I, BT> as FusionBackend>::FusionRuntime>
    for HostReadOp<R, F, I, BT>
where
    R: OffloadRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn execute(&self, handles: &mut Handles<R, F, I, BT>) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .zip(&self.kinds)
            .map(|(ir, kind)| match kind {
                InputKind::Float => handles.get_float_tensor::<Inner<R, F, I, BT>>(ir),
                InputKind::Int => handles.get_int_tensor::<Inner<R, F, I, BT>>(ir),
            })
            .collect();
        let out = (self.run)(inputs, &self.host);
        handles.register_float_tensor::<Inner<R, F, I, BT>>(&self.desc.outputs[0].id, out);
    }
}

/// Registers a [`HostReadOp`] named `name` over `inputs` (consumed, as Burn's own ops consume
/// theirs) whose float output has `shape` and `dtype`. Executes nothing now.
pub(crate) fn register_host_read<R, F, I, BT>(
    name: &'static str,
    inputs: Vec<(FusedTensor<R, F, I, BT>, InputKind)>,
    shape: Shape,
    dtype: DType,
    host: &HostTensor,
    run: HostReadFn<R>,
) -> FloatTensor<Fused<R, F, I, BT>>
where
    R: OffloadRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let client = inputs[0].0.client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter().map(|(t, _)| t));
    let kinds: Vec<InputKind> = inputs.iter().map(|(_, k)| *k).collect();
    let irs: Vec<TensorIr> = inputs.into_iter().map(|(t, _)| t.into_ir()).collect();
    let out = TensorIr::uninit(client.create_empty_handle(), shape, dtype);
    let desc = CustomOpIr::new(name, &irs, &[out]);
    let op = HostReadOp::<R, F, I, BT> {
        desc: desc.clone(),
        kinds,
        host: host.clone(),
        run,
        _backend: PhantomData,
    };
    client
        .register(streams, OperationIr::Custom(desc), op)
        .output()
}

/// The in-place matmul, run by fusion: the runtime's kernel, or (should it decline after all)
/// a copy and the backend's GEMM.
fn run_host_matmul<R, F, I, BT>(mut inputs: Vec<CubeTensor<R>>, rhs: &HostTensor) -> CubeTensor<R>
where
    R: OffloadRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let lhs = inputs.remove(0);
    match R::host_matmul(lhs, rhs) {
        Ok(out) => out,
        Err(lhs) => {
            let rhs = <Inner<R, F, I, BT> as OffloadTarget>::upload(rhs, &lhs.device.clone());
            Inner::<R, F, I, BT>::float_matmul(lhs, rhs)
        }
    }
}

/// The in-place gather, run by fusion: the runtime's kernel, or a copy and the backend's
/// embedding.
fn run_host_embedding<R, F, I, BT>(
    mut inputs: Vec<CubeTensor<R>>,
    weights: &HostTensor,
) -> CubeTensor<R>
where
    R: OffloadRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let indices = inputs.remove(0);
    match R::host_embedding(weights, indices) {
        Ok(out) => out,
        Err(indices) => {
            let device = indices.device.clone();
            let weights = <Inner<R, F, I, BT> as OffloadTarget>::upload(weights, &device);
            Inner::<R, F, I, BT>::embedding(weights, indices)
        }
    }
}

impl<R, F, I, BT> OffloadTarget for Fused<R, F, I, BT>
where
    R: OffloadRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    /// Unfused: registered on the consuming thread by [`take_staged`](Self::take_staged).
    type Staged = CubeTensor<R>;

    fn alloc_host(device: &R::Device, bytes: usize, pin: bool) -> Result<HostBuffer, OffloadError> {
        R::alloc_host(device, bytes, pin)
    }

    /// Hands the calling thread's queued fused ops (some may hold these buffers) to CubeCL,
    /// then settles like the unfused target, whose wait covers them.
    fn settle_host_reads(device: &R::Device, pool: &[HostTensor]) {
        get_client::<Inner<R, F, I, BT>>(device).sync(|| ());
        <Inner<R, F, I, BT> as OffloadTarget>::settle_host_reads(device, pool);
    }

    fn note_host_reader(host: &HostTensor, device: &R::Device) {
        R::note_host_reader(host.buffer(), device);
    }

    fn upload(host: &HostTensor, device: &R::Device) -> FloatTensor<Self> {
        register::<R, F, I, BT>(<Inner<R, F, I, BT> as OffloadTarget>::upload(host, device))
    }

    fn release_uploads(device: &R::Device) {
        <Inner<R, F, I, BT> as OffloadTarget>::release_uploads(device);
    }

    /// The calling thread's CubeCL stream: fusion runs a thread's ops on that thread's stream.
    fn work_queue(device: &R::Device) -> Option<u64> {
        <Inner<R, F, I, BT> as OffloadTarget>::work_queue(device)
    }

    fn prefetch_upload(
        host: &HostTensor,
        device: &R::Device,
        consumers: &[u64],
    ) -> Option<CubeTensor<R>> {
        <Inner<R, F, I, BT> as OffloadTarget>::prefetch_upload(host, device, consumers)
    }

    fn take_staged(staged: CubeTensor<R>) -> FloatTensor<Self> {
        register::<R, F, I, BT>(staged)
    }

    /// The runtime's ring; a region enters the graph as a prefetched copy does (an `Init`).
    fn ring_streams(
        device: &R::Device,
        shape: RingShape,
    ) -> Option<Result<Arc<dyn RingStreams<Self>>, CopyError>> {
        ring_for::<R, Self>(device, shape, register::<R, F, I, BT>)
    }

    /// Runs the thread's fusion stream: its ops are queued on CubeCL (kernels launched, not
    /// waited for) when this returns.
    fn drain_ops(device: &R::Device) {
        get_client::<Inner<R, F, I, BT>>(device).sync(|| ());
    }

    fn device_bytes_in_use(device: &R::Device) -> Option<u64> {
        <Inner<R, F, I, BT> as OffloadTarget>::device_bytes_in_use(device)
    }

    fn can_read_in_place(host: &HostTensor, device: &R::Device) -> bool {
        R::can_read_in_place(host, device)
    }

    fn zero_copy_max_rows(device: &R::Device) -> usize {
        R::zero_copy_max_rows(device)
    }

    fn host_matmul(
        lhs: FloatTensor<Self>,
        rhs: &HostTensor,
    ) -> Result<FloatTensor<Self>, FloatTensor<Self>> {
        let dims = lhs.shape.to_vec();
        if !R::host_matmul_supported(&dims, lhs.dtype, rhs) {
            return Err(lhs);
        }
        let Some(shape) = HostMatmulShape::new(&dims, rhs) else {
            return Err(lhs);
        };
        let dtype = lhs.dtype;
        Ok(register_host_read::<R, F, I, BT>(
            "burn_offload_matmul_host",
            vec![(lhs, InputKind::Float)],
            Shape::from(shape.out_dims),
            dtype,
            rhs,
            run_host_matmul::<R, F, I, BT>,
        ))
    }

    fn host_embedding(
        weights: &HostTensor,
        indices: IntTensor<Self>,
    ) -> Result<FloatTensor<Self>, IntTensor<Self>> {
        if !R::host_embedding_supported(weights, indices.dtype) {
            return Err(indices);
        }
        let mut dims = indices.shape.to_vec();
        dims.push(weights.dims()[1]);
        Ok(register_host_read::<R, F, I, BT>(
            "burn_offload_gather_host",
            vec![(indices, InputKind::Int)],
            Shape::from(dims),
            weights.read_dtype(),
            weights,
            run_host_embedding::<R, F, I, BT>,
        ))
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    //! The lazy host-read plumbing on wgpu (lavapipe in CI), with a copy + GEMM as the op's
    //! body: CUDA's in-place kernels run through the same registration.

    use std::sync::Arc;

    use burn_backend::{Backend, TensorData, read_sync};
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

    use super::*;

    type R = WgpuRuntime;
    type In = Inner<R, f32, i32, u32>;
    type Fu = Fused<R, f32, i32, u32>;

    fn upload_then_matmul(mut inputs: Vec<CubeTensor<R>>, host: &HostTensor) -> CubeTensor<R> {
        let lhs = inputs.remove(0);
        let rhs = <In as OffloadTarget>::upload(host, &lhs.device.clone());
        In::float_matmul(lhs, rhs)
    }

    #[test]
    fn a_host_read_op_runs_in_order_and_holds_its_view_until_it_has_run() {
        if let Err(reason) = super::super::wgpu::probe() {
            eprintln!("skipped: {reason}");
            return;
        }
        let device = WgpuDevice::default();
        let lhs = Fu::float_from_data(
            TensorData::new(vec![1f32, 2., 3., 4., 5., 6.], [2, 3]),
            &device,
        );
        // Queued before the op: the op must read its result, not the original.
        let lhs = Fu::float_mul_scalar(lhs, 2.0.into());
        let rhs: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let host =
            HostTensor::from_data(&TensorData::new(rhs.clone(), [3, 4]), HostBuffer::pageable)
                .unwrap();
        let refs = Arc::strong_count(host.buffer());
        let out = register_host_read::<R, f32, i32, u32>(
            "burn_offload_test_host_read",
            vec![(lhs, InputKind::Float)],
            Shape::new([2, 4]),
            DType::F32,
            &host,
            upload_then_matmul,
        );
        assert!(
            Arc::strong_count(host.buffer()) > refs,
            "the op holds the view"
        );
        // An elementwise op after it, as a model's epilogue would be.
        let out = Fu::float_add_scalar(out, 1.0.into());
        let got = read_sync(Fu::float_into_data(out))
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let lhs = [2f32, 4., 6., 8., 10., 12.];
        let expected: Vec<f32> = (0..2)
            .flat_map(|i| {
                let rhs = &rhs;
                (0..4).map(move |j| {
                    (0..3).map(|k| lhs[i * 3 + k] * rhs[k * 4 + j]).sum::<f32>() + 1.0
                })
            })
            .collect();
        assert_eq!(got, expected);
        Fu::sync(&device).unwrap();
        assert_eq!(
            Arc::strong_count(host.buffer()),
            refs,
            "once run, the op has let go of the view"
        );
    }
}
