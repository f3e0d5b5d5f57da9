//! [`OffloadBackend`]: the backend decorator.
//!
//! Layout follows burn-autodiff: the backend type and its primitive here, one file per op
//! trait. Methods that need to know about offloaded tensors are written by hand
//! (`float.rs`, `module.rs`, `transaction.rs`); all others are delegated to the inner backend
//! by macros generated from Burn's trait definitions (`generated.rs`).

mod convert;
mod delegated;
mod float;
mod generated;
mod module;
mod prelude;
mod quantized;
mod tensor;
mod transaction;

use std::marker::PhantomData;

use burn_backend::{
    Backend, BackendTypes, DTypeUsageSet, ExecutionError, TensorData, TensorPrimitive,
    tensor::FloatTensor,
};

pub use quantized::OffloadQTensor;
pub use tensor::{OffloadTensor, Offloaded};

use crate::device::OffloadDevice;
use crate::inner::OffloadTarget;
use crate::mode::{OffloadMode, PrefetchCopies};
use crate::plan::{Context as PlanContext, OpKind, Operand, ReadPath, plan};
use crate::stats::record;

/// A Burn backend that keeps chosen float tensors in host memory that the device reads.
///
/// Swap `type B = Inner;` for `type B = OffloadBackend<Inner>;`, initialise the model on
/// [`OffloadDevice::Device`], and let an [`OffloadPolicy`](crate::OffloadPolicy) move
/// parameters to [`OffloadDevice::Host`]. Everything else is the inner backend's.
#[derive(Clone, Copy, Debug, Default)]
pub struct OffloadBackend<B> {
    _inner: PhantomData<B>,
}

impl<B: OffloadTarget> BackendTypes for OffloadBackend<B> {
    type Device = OffloadDevice<B::Device>;

    type FloatTensorPrimitive = OffloadTensor<B>;
    type FloatElem = B::FloatElem;

    type IntTensorPrimitive = B::IntTensorPrimitive;
    type IntElem = B::IntElem;

    type BoolTensorPrimitive = B::BoolTensorPrimitive;
    type BoolElem = B::BoolElem;

    type QuantizedTensorPrimitive = OffloadQTensor<B>;
}

impl<B: OffloadTarget> Backend for OffloadBackend<B> {
    fn ad_enabled(device: &Self::Device) -> bool {
        B::ad_enabled(device.compute())
    }

    fn memory_persistent_allocations<
        Output: Send,
        Input: Send,
        Func: Fn(Input) -> Output + Send,
    >(
        device: &Self::Device,
        input: Input,
        func: Func,
    ) -> Output {
        B::memory_persistent_allocations(device.compute(), input, func)
    }

    fn memory_cleanup(device: &Self::Device) {
        B::memory_cleanup(device.compute())
    }

    fn name(device: &Self::Device) -> String {
        format!("offload<{}>", B::name(device.compute()))
    }

    fn seed(device: &Self::Device, seed: u64) {
        B::seed(device.compute(), seed)
    }

    /// Also releases the copy-engine regions the calling thread still holds (their readers
    /// are queued by then).
    fn sync(device: &Self::Device) -> Result<(), ExecutionError> {
        crate::prefetch::end_ring_leases();
        B::sync(device.compute())
    }

    fn staging<'a, Iter>(data: Iter, device: &Self::Device)
    where
        Iter: Iterator<Item = &'a mut TensorData>,
    {
        B::staging(data, device.compute())
    }

    fn supports_dtype(device: &Self::Device, dtype: burn_backend::DType) -> bool {
        B::supports_dtype(device.compute(), dtype)
    }

    fn dtype_usage(device: &Self::Device, dtype: burn_backend::DType) -> DTypeUsageSet {
        B::dtype_usage(device.compute(), dtype)
    }

    fn device_count(type_id: u16) -> usize {
        B::device_count(type_id)
    }
}

impl<B: OffloadTarget> OffloadBackend<B> {
    /// A resident result of the inner backend: the end of an op (its operands' reads are
    /// queued), which the copy engine's prefetching counts ([`crate::prefetch::op_ended`]).
    #[inline]
    pub(crate) fn resident(tensor: FloatTensor<B>) -> OffloadTensor<B> {
        crate::prefetch::op_ended();
        OffloadTensor::Resident(tensor)
    }

    /// The inner backend's tensor for an op that has no host-reading kernel: resident
    /// tensors as they are, offloaded ones as a transient device copy that the op consumes.
    #[inline]
    pub(crate) fn fetch(tensor: OffloadTensor<B>) -> FloatTensor<B> {
        match tensor {
            OffloadTensor::Resident(t) => t,
            OffloadTensor::Offloaded(o) => Self::upload(&o),
        }
    }

    /// How `op` reads `offloaded` ([`crate::plan`]).
    pub(crate) fn read_path(offloaded: &Offloaded<B>, op: OpKind) -> ReadPath {
        let (host, device, context) = (offloaded.host(), offloaded.device(), offloaded.context());
        let calibration = match context.mode() {
            OffloadMode::Auto => context.calibration(device),
            _ => None,
        };
        let operand = Operand {
            bytes: host.size_bytes() as u64,
            readable_in_place: B::can_read_in_place(host, device),
            max_rows: B::zero_copy_max_rows(device),
        };
        let config = context.config();
        plan(
            op,
            operand,
            &PlanContext {
                mode: config.mode,
                in_place_off: config.in_place_off,
                calibration: calibration.as_deref(),
                prefetches: context.prefetch_lookahead(device).is_some(),
            },
        )
    }

    /// A transient device copy of `offloaded` for one op: through the context's prefetcher
    /// where it prefetches, else an upload now.
    pub(crate) fn upload(offloaded: &Offloaded<B>) -> FloatTensor<B> {
        let host = offloaded.host();
        record(|s| {
            s.transient_uploads += 1;
            s.transient_upload_bytes += host.size_bytes() as u64;
        });
        // Packed bytes, dequantized on the device (not through the prefetcher, whose copies
        // are float tensors).
        if host.is_quantized() {
            return B::upload(host, offloaded.device());
        }
        // A permuted view (a transposed tied head): upload its contiguous block in one copy and
        // permute on the device, instead of gathering it element by element on the host.
        if !host.is_contiguous()
            && let Some((block, axes)) = host.permuted_block()
        {
            let block = offloaded.with_host(block);
            let tensor = B::float_permute(Self::upload_contiguous(&block), &axes);
            // The permute gives the view's dims of size > 1; a reshape puts the 1s back.
            return if host.dims().contains(&1) {
                B::float_reshape(tensor, host.shape())
            } else {
                tensor
            };
        }
        Self::upload_contiguous(offloaded)
    }

    /// [`upload`](Self::upload) of a view without the permuted-block shortcut: a prefetched
    /// copy where the context prefetches (the planner's `PrefetchedCopy`, which it gives for a
    /// copy exactly then), else the target's upload.
    fn upload_contiguous(offloaded: &Offloaded<B>) -> FloatTensor<B> {
        let (host, device, context) = (offloaded.host(), offloaded.device(), offloaded.context());
        match context.prefetch_copies(device) {
            Some((lookahead, PrefetchCopies::Engine)) => {
                crate::prefetch::engine::upload::<B>(host, device, context, lookahead)
            }
            Some((lookahead, PrefetchCopies::CubeCl)) => {
                crate::prefetch::upload::<B>(host, device, context, lookahead)
            }
            None => B::upload(host, device),
        }
    }

    /// `out`, or a copy of it where the op that made it took a copy-engine ring region since
    /// `takes` ([`crate::prefetch::ring_takes`]): `out` may then be a view of the region (a
    /// reshape, an `unfold`), which must not outlive the region's release. The copy is a
    /// multiplication by one, exact in every float dtype, written to a new buffer (the ring's
    /// buffer is never written in place); fused, it runs before the release's drain.
    pub(crate) fn unalias(out: FloatTensor<B>, takes: u64) -> FloatTensor<B> {
        if crate::prefetch::ring_takes() == takes || crate::copy::fault(|f| f.skip_copy_out) {
            return out;
        }
        crate::stats::record(|s| s.ring_copy_outs += 1);
        B::float_mul_scalar(out, 1.0.into())
    }

    pub(crate) fn fetch_primitive(tensor: TensorPrimitive<Self>) -> TensorPrimitive<B> {
        match tensor {
            TensorPrimitive::Float(t) => TensorPrimitive::Float(Self::fetch(t)),
            TensorPrimitive::QFloat(q) => TensorPrimitive::QFloat(Self::fetch_q(q)),
        }
    }

    pub(crate) fn wrap_primitive(tensor: TensorPrimitive<B>) -> TensorPrimitive<Self> {
        match tensor {
            TensorPrimitive::Float(t) => TensorPrimitive::Float(Self::resident(t)),
            TensorPrimitive::QFloat(q) => TensorPrimitive::QFloat(Self::resident_q(q)),
        }
    }
}
