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
mod tensor;
mod transaction;

use std::cell::Cell;
use std::marker::PhantomData;

use burn_backend::{
    Backend, BackendTypes, DTypeUsageSet, ExecutionError, TensorData, TensorPrimitive,
    tensor::FloatTensor,
};

pub use tensor::OffloadTensor;

use crate::device::{OffloadDevice, device_config};
use crate::host::HostTensor;
use crate::mode::OffloadMode;
use crate::target::OffloadTarget;

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

    type QuantizedTensorPrimitive = B::QuantizedTensorPrimitive;
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
        crate::random::seed(seed);
        B::seed(device.compute(), seed)
    }

    fn sync(device: &Self::Device) -> Result<(), ExecutionError> {
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

/// Counts of what the current thread's ops did with offloaded and resident float tensors.
///
/// Thread-local, so concurrent tests do not see each other's work; read it with
/// [`op_stats`] and reset it with [`reset_op_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpStats {
    /// Bytes of float tensors created in device memory by creation ops (from data, zeros,
    /// random, …) and by moves to the device — *not* counting transient copies.
    pub device_created_bytes: u64,
    /// Bytes of float tensors created directly in host memory.
    pub host_created_bytes: u64,
    /// Transient device copies of offloaded tensors that ops consumed (copy mode, fallbacks,
    /// and in prefetch mode every copy, prefetched or not).
    pub transient_uploads: u64,
    /// Bytes moved by those transient copies.
    pub transient_upload_bytes: u64,
    /// Ops that read an offloaded tensor in place (zero-copy).
    pub zero_copy_ops: u64,
}

thread_local! {
    static OP_STATS: Cell<OpStats> = const { Cell::new(OpStats {
        device_created_bytes: 0,
        host_created_bytes: 0,
        transient_uploads: 0,
        transient_upload_bytes: 0,
        zero_copy_ops: 0,
    }) };
}

/// The current thread's [`OpStats`].
pub fn op_stats() -> OpStats {
    OP_STATS.with(Cell::get)
}

/// Resets the current thread's [`OpStats`] to zero.
pub fn reset_op_stats() {
    OP_STATS.with(|s| s.set(OpStats::default()))
}

pub(crate) fn record(f: impl FnOnce(&mut OpStats)) {
    OP_STATS.with(|s| {
        let mut v = s.get();
        f(&mut v);
        s.set(v)
    })
}

impl<B: OffloadTarget> OffloadBackend<B> {
    /// A resident result of the inner backend.
    #[inline]
    pub(crate) fn resident(tensor: FloatTensor<B>) -> OffloadTensor<B> {
        OffloadTensor::Resident(tensor)
    }

    /// The inner backend's tensor for an op that has no host-reading kernel: resident
    /// tensors as they are, offloaded ones as a transient device copy that the op consumes.
    #[inline]
    pub(crate) fn fetch(tensor: OffloadTensor<B>) -> FloatTensor<B> {
        match tensor {
            OffloadTensor::Resident(t) => t,
            OffloadTensor::Offloaded { host, device } => Self::upload(&host, &device),
        }
    }

    pub(crate) fn upload(host: &HostTensor, device: &B::Device) -> FloatTensor<B> {
        record(|s| {
            s.transient_uploads += 1;
            s.transient_upload_bytes += host.size_bytes() as u64;
        });
        // A permuted view (a transposed tied head): upload its contiguous block in one copy and
        // permute on the device, instead of gathering it element by element on the host.
        if !host.is_contiguous()
            && let Some((block, axes)) = host.permuted_block()
        {
            let tensor = B::float_permute(Self::upload_contiguous(&block, device), &axes);
            // The permute gives the view's dims of size > 1; a reshape puts the 1s back.
            return if host.dims().contains(&1) {
                B::float_reshape(tensor, host.shape())
            } else {
                tensor
            };
        }
        Self::upload_contiguous(host, device)
    }

    /// [`upload`](Self::upload) of a view without the permuted-block shortcut: through the
    /// prefetcher where the mode prefetches, else the target's upload.
    fn upload_contiguous(host: &HostTensor, device: &B::Device) -> FloatTensor<B> {
        match Self::prefetch_lookahead(device) {
            Some(lookahead_bytes) => crate::prefetch::upload::<B>(host, device, lookahead_bytes),
            None => B::upload(host, device),
        }
    }

    /// The lookahead `device`'s copies are prefetched with: `Prefetch` mode's, or the default
    /// where `Auto` prefetches ([`crate::auto`]). Without any prefetching device (the usual
    /// case) two atomic loads and no lookup.
    fn prefetch_lookahead(device: &B::Device) -> Option<u64> {
        if !crate::device::any_prefetch() && !crate::auto::any_prefetching() {
            return None;
        }
        crate::auto::mode_lookahead(device_config(device).mode, device)
    }

    pub(crate) fn fetch_primitive(tensor: TensorPrimitive<Self>) -> TensorPrimitive<B> {
        match tensor {
            TensorPrimitive::Float(t) => TensorPrimitive::Float(Self::fetch(t)),
            TensorPrimitive::QFloat(q) => TensorPrimitive::QFloat(q),
        }
    }

    pub(crate) fn wrap_primitive(tensor: TensorPrimitive<B>) -> TensorPrimitive<Self> {
        match tensor {
            TensorPrimitive::Float(t) => TensorPrimitive::Float(Self::resident(t)),
            TensorPrimitive::QFloat(q) => TensorPrimitive::QFloat(q),
        }
    }

    /// Whether an `embedding` lookup should gather its rows of the offloaded table `host` in
    /// place on `device`: wherever the target can, except in `Copy` mode (vLLM's non-UVA
    /// path) and, for `Prefetch`, with in-place reads switched off by the environment. A
    /// prefetched copy would move the whole table (a tied LM head's, every step) for the few
    /// rows a lookup reads.
    pub(crate) fn gather_in_place(host: &HostTensor, device: &B::Device) -> bool {
        match device_config(device).mode {
            OffloadMode::Copy => false,
            OffloadMode::Prefetch { .. } if crate::device::in_place_off(device) => false,
            OffloadMode::Uva | OffloadMode::Auto | OffloadMode::Prefetch { .. } => {
                B::can_read_in_place(host, device)
            }
        }
    }

    /// Whether `lhs @ host` with `rows` rows in `lhs` should read `host` in place: `Uva` up to
    /// the target's row threshold, `Auto` where the device's calibration predicts it faster
    /// than a copy ([`crate::auto`]).
    pub(crate) fn matmul_in_place(host: &HostTensor, device: &B::Device, rows: usize) -> bool {
        let mode = device_config(device).mode;
        let kernel = || B::can_read_in_place(host, device) && rows <= B::zero_copy_max_rows(device);
        match mode {
            OffloadMode::Copy | OffloadMode::Prefetch { .. } => false,
            OffloadMode::Uva => kernel(),
            OffloadMode::Auto => {
                kernel() && crate::auto::zero_copy_pays(device, rows, host.size_bytes() as u64)
            }
        }
    }
}
