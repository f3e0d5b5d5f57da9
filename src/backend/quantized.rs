//! Quantized tensors (`TensorPrimitive::QFloat`): placed by a policy like float ones, their
//! packed values and scales in host memory ([`crate::quant`]).
//!
//! - `dequantize` of an offloaded quantized tensor is free: an offloaded float tensor over the
//!   same host memory, *read as* float ([`HostTensor::read_as`]). The op that reads it
//!   dequantizes as it reads: a host-reading kernel (few-row matmul, embedding gather) where
//!   the planner says in place, else a copy of the packed bytes that the device dequantizes
//!   with Burn's kernels. So Burn's `Linear` and `Embedding`, which dequantize their weight
//!   and then run the float op, move only packed bytes.
//! - quantizing an offloaded float tensor (Burn's `Quantizer`, `quantize_dynamic`) gives an
//!   offloaded quantized tensor in the same context, and a parameter's mark goes with it.
//! - every other op gets a device copy of offloaded inputs (`fetch_q`), as float ops do.

use burn_backend::QTensorPrimitive;
use burn_backend::TensorMetadata;
use burn_std::DType;
use burn_std::quantization::{QuantAcc, QuantPropagation};

use super::generated::delegate_q_tensor_ops;
use super::prelude::*;
use super::tensor::Offloaded;
use crate::context::{
    OffloadContext, current_context, current_scope, host_redirect_active, placement_queried,
};
use crate::host::HostTensor;
use crate::quant::scheme_name;
use crate::stats::record;

/// A quantized tensor of [`OffloadBackend<B>`](super::OffloadBackend): in `B`'s memory, or its
/// packed bytes in host memory read by a device.
#[derive(Clone, Debug)]
pub enum OffloadQTensor<B: OffloadTarget> {
    /// In the inner backend's memory.
    Resident(B::QuantizedTensorPrimitive),
    /// Packed values and scales in host memory ([`HostTensor::quant_scheme`] is `Some`).
    Offloaded(Offloaded<B>),
}

impl<B: OffloadTarget> OffloadQTensor<B> {
    /// The offloaded tensor, if offloaded.
    pub fn offloaded(&self) -> Option<&Offloaded<B>> {
        match self {
            Self::Offloaded(o) => Some(o),
            Self::Resident(_) => None,
        }
    }
}

impl<B: OffloadTarget> TensorMetadata for OffloadQTensor<B> {
    fn dtype(&self) -> DType {
        match self {
            Self::Resident(t) => t.dtype(),
            Self::Offloaded(o) => o.host().dtype(),
        }
    }

    fn shape(&self) -> Shape {
        match self {
            Self::Resident(t) => t.shape(),
            Self::Offloaded(o) => o.host().shape(),
        }
    }
}

impl<B: OffloadTarget> QTensorPrimitive for OffloadQTensor<B> {
    fn scheme(&self) -> &QuantScheme {
        match self {
            Self::Resident(t) => t.scheme(),
            Self::Offloaded(o) => o
                .host()
                .quant_scheme()
                .expect("an offloaded quantized tensor holds quantized memory"),
        }
    }

    fn acc_precision(&self) -> QuantAcc {
        match self {
            Self::Resident(t) => t.acc_precision(),
            Self::Offloaded(_) => QuantAcc::F32,
        }
    }

    fn propagation(&self) -> QuantPropagation {
        match self {
            Self::Resident(t) => t.propagation(),
            Self::Offloaded(_) => QuantPropagation::Inhibit,
        }
    }

    fn default_scheme() -> QuantScheme {
        B::QuantizedTensorPrimitive::default_scheme()
    }
}

/// Logs once per scheme that `B` cannot hold it in its memory and that host memory holds it.
fn log_kept_on_host<B: OffloadTarget>(scheme: &QuantScheme, why: &str) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    // Process-wide: it deduplicates a log line, nothing else reads it.
    static LOGGED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let name = scheme_name(scheme);
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    if logged.get_or_insert_with(HashSet::new).insert(name.clone()) {
        log::warn!(
            "{}: cannot hold quantized tensors of `{name}` in its own memory ({why}): they are \
             kept in host memory, which its ops read (and dequantize as they read)",
            std::any::type_name::<B>()
        );
    }
}

impl<B: OffloadTarget> OffloadBackend<B> {
    /// The inner backend's quantized tensor: resident as it is, offloaded ones copied (packed)
    /// to the device for one op.
    ///
    /// # Panics
    /// When `B` cannot hold the scheme in its memory (the CPU reference target holds only
    /// 8-bit values with f32 scales): only `dequantize`, placement and data reads work on such
    /// a tensor there; the message names the scheme.
    pub(crate) fn fetch_q(tensor: OffloadQTensor<B>) -> QuantizedTensor<B> {
        match tensor {
            OffloadQTensor::Resident(t) => t,
            OffloadQTensor::Offloaded(o) => {
                let host = o.host();
                let scheme = *host.quant_scheme().expect("quantized memory");
                if let Some(why) = B::cannot_hold_quantized(&scheme) {
                    panic!(
                        "{}: this op needs `{}` in the backend's own memory, which cannot hold \
                         it ({why}); on this target use such tensors only through `dequantize` \
                         (Burn's `Linear`, `Embedding`, `matmul` do), or quantize with a scheme \
                         it holds",
                        std::any::type_name::<B>(),
                        scheme_name(&scheme)
                    );
                }
                record(|s| {
                    s.transient_uploads += 1;
                    s.transient_upload_bytes += host.size_bytes() as u64;
                });
                B::upload_quantized(host, o.device())
            }
        }
    }

    /// A resident result of the inner backend.
    #[inline]
    pub(crate) fn resident_q(tensor: QuantizedTensor<B>) -> OffloadQTensor<B> {
        crate::prefetch::op_ended();
        OffloadQTensor::Resident(tensor)
    }

    /// Moves a resident quantized tensor into new host memory of `context`.
    fn offload_q(tensor: QuantizedTensor<B>, context: OffloadContext) -> Offloaded<B> {
        let device = B::q_device(&tensor);
        let host =
            B::download_quantized(tensor, context.pin_memory()).unwrap_or_else(|e| panic!("{e}"));
        record(|s| s.host_created_bytes += host.size_bytes() as u64);
        Offloaded::new(host, device, context)
    }

    /// Quantizes `tensor` (scales given or, with `None`, computed from its values): in host
    /// memory when it is offloaded (same context; the parameter's mark moves to the new
    /// buffer), when creations go to host memory, or when `B` cannot hold the scheme; else
    /// by `B` on the device.
    fn quantize_placed(
        tensor: FloatTensor<Self>,
        scheme: &QuantScheme,
        scales: Option<FloatTensor<Self>>,
    ) -> OffloadQTensor<B> {
        let scales = scales.map(Self::fetch);
        let cannot_hold = B::cannot_hold_quantized(scheme);
        let (resident, into) = match tensor {
            OffloadTensor::Offloaded(o) => {
                let mark = o.host().buffer().take_mark();
                let context = o.context().clone();
                (Self::upload(&o), Some((context, mark)))
            }
            OffloadTensor::Resident(t) => {
                let redirect = host_redirect_active();
                if let (Some(why), false) = (&cannot_hold, redirect) {
                    log_kept_on_host::<B>(scheme, why);
                }
                let to_host = redirect || cannot_hold.is_some();
                (t, to_host.then(|| (current_context(), None)))
            }
        };
        match into {
            None => Self::resident_q(crate::inner::quantize_with::<B>(resident, scheme, scales)),
            Some((context, mark)) => {
                let device = B::float_device(&resident);
                let host = B::quantize_to_host(resident, scheme, scales, context.pin_memory())
                    .unwrap_or_else(|e| panic!("{e}"));
                record(|s| s.host_created_bytes += host.size_bytes() as u64);
                if let Some(mark) = mark {
                    host.buffer().set_mark(mark);
                }
                OffloadQTensor::Offloaded(Offloaded::new(host, device, context))
            }
        }
    }
}

impl<B: OffloadTarget> QTensorOps<Self> for OffloadBackend<B> {
    delegate_q_tensor_ops!();

    fn q_from_data(data: TensorData, device: &Device<Self>) -> QuantizedTensor<Self> {
        let d = device.compute();
        let DType::QFloat(scheme) = data.dtype else {
            // As Burn's backends do: the caller gave float data to a quantized constructor.
            panic!("q_from_data: expected DType::QFloat, got {:?}", data.dtype);
        };
        let cannot_hold = B::cannot_hold_quantized(&scheme);
        if device.is_host() || host_redirect_active() || cannot_hold.is_some() {
            if let (Some(why), false) = (&cannot_hold, device.is_host() || host_redirect_active()) {
                log_kept_on_host::<B>(&scheme, why);
            }
            let context = current_context();
            let host =
                HostTensor::from_data(&data, |bytes| B::alloc_host(d, bytes, context.pin_memory()))
                    .unwrap_or_else(|e| panic!("{e}"));
            record(|s| s.host_created_bytes += host.size_bytes() as u64);
            return OffloadQTensor::Offloaded(Offloaded::new(host, d.clone(), context));
        }
        record(|s| s.device_created_bytes += data.as_bytes().len() as u64);
        Self::resident_q(B::q_from_data(data, d))
    }

    fn quantize(
        tensor: FloatTensor<Self>,
        scheme: &QuantScheme,
        qparams: QuantizationParametersPrimitive<Self>,
    ) -> QuantizedTensor<Self> {
        Self::quantize_placed(tensor, scheme, Some(qparams.scales))
    }

    fn quantize_dynamic(tensor: FloatTensor<Self>, scheme: &QuantScheme) -> QuantizedTensor<Self> {
        Self::quantize_placed(tensor, scheme, None)
    }

    /// Free for an offloaded tensor: the same host memory, read as `dtype` by the op that
    /// reads it (see the module docs).
    fn dequantize(tensor: QuantizedTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        match tensor {
            OffloadQTensor::Resident(t) => Self::resident(B::dequantize(t, dtype)),
            OffloadQTensor::Offloaded(o) => {
                let host = o
                    .host()
                    .read_as(Some(dtype.into()))
                    .expect("offloaded quantized tensors hold quantized memory");
                OffloadTensor::Offloaded(o.with_host(host))
            }
        }
    }

    fn q_device(tensor: &QuantizedTensor<Self>) -> Device<Self> {
        match tensor {
            OffloadQTensor::Resident(t) => OffloadDevice::Device(B::q_device(t)),
            OffloadQTensor::Offloaded(o) if placement_queried() => {
                OffloadDevice::Host(o.device().clone())
            }
            OffloadQTensor::Offloaded(o) => OffloadDevice::Device(o.device().clone()),
        }
    }

    /// As `float_to_device`: moves never change placement, except inside a placement scope (a
    /// policy's walk, `to_device_memory`, `keep_offloaded`).
    fn q_to_device(tensor: QuantizedTensor<Self>, device: &Device<Self>) -> QuantizedTensor<Self> {
        let target = device.compute();
        let moves = current_scope().filter(|s| s.moves);
        match tensor {
            OffloadQTensor::Resident(t) => {
                let t = B::q_to_device(t, target);
                match moves {
                    Some(scope) if device.is_host() => {
                        let o = Self::offload_q(t, scope.context.clone());
                        scope.placed(o.host());
                        OffloadQTensor::Offloaded(o)
                    }
                    _ => Self::resident_q(t),
                }
            }
            OffloadQTensor::Offloaded(o) => match moves {
                Some(_) if !device.is_host() => {
                    let scheme = *o.host().quant_scheme().expect("quantized memory");
                    match B::cannot_hold_quantized(&scheme) {
                        // Host memory is the only memory that holds it on this target.
                        Some(why) => {
                            log_kept_on_host::<B>(&scheme, &why);
                            OffloadQTensor::Offloaded(o)
                        }
                        None => {
                            record(|s| s.device_created_bytes += o.host().size_bytes() as u64);
                            Self::resident_q(B::upload_quantized(o.host(), target))
                        }
                    }
                }
                Some(scope) => {
                    B::note_host_reader(o.host(), target);
                    scope.placed(o.host());
                    OffloadQTensor::Offloaded(o.retag(target.clone(), scope.context))
                }
                None => {
                    B::note_host_reader(o.host(), target);
                    let context = o.context().clone();
                    OffloadQTensor::Offloaded(o.retag(target.clone(), context))
                }
            },
        }
    }

    async fn q_into_data(tensor: QuantizedTensor<Self>) -> Result<TensorData, ExecutionError> {
        match tensor {
            OffloadQTensor::Resident(t) => B::q_into_data(t).await,
            OffloadQTensor::Offloaded(o) => Ok(o.host().to_data()),
        }
    }

    fn q_detach(tensor: QuantizedTensor<Self>) -> QuantizedTensor<Self> {
        match tensor {
            OffloadQTensor::Resident(t) => Self::resident_q(B::q_detach(t)),
            offloaded => offloaded,
        }
    }

    fn q_set_require_grad(
        tensor: QuantizedTensor<Self>,
        require_grad: bool,
    ) -> QuantizedTensor<Self> {
        match tensor {
            OffloadQTensor::Resident(t) => Self::resident_q(B::q_set_require_grad(t, require_grad)),
            offloaded => offloaded,
        }
    }

    fn q_matmul(lhs: TensorPrimitive<Self>, rhs: TensorPrimitive<Self>) -> TensorPrimitive<Self> {
        q_matmul(lhs, rhs)
    }

    fn q_is_require_grad(tensor: &QuantizedTensor<Self>) -> bool {
        match tensor {
            OffloadQTensor::Resident(t) => B::q_is_require_grad(t),
            OffloadQTensor::Offloaded(_) => false,
        }
    }
}

impl<B: OffloadTarget> OffloadBackend<B> {
    /// Whether a primitive is an offloaded tensor (float, or quantized).
    fn is_offloaded_primitive(t: &TensorPrimitive<Self>) -> bool {
        match t {
            TensorPrimitive::Float(f) => f.is_offloaded(),
            TensorPrimitive::QFloat(q) => q.offloaded().is_some(),
        }
    }
}

/// `matmul` with a quantized operand: with an offloaded one, dequantized by this backend
/// (free: read as float) and multiplied by its `float_matmul`, which reads the packed weight in
/// place where the planner says so; else `B`'s own quantized matmul.
pub(super) fn q_matmul<B: OffloadTarget>(
    lhs: TensorPrimitive<OffloadBackend<B>>,
    rhs: TensorPrimitive<OffloadBackend<B>>,
) -> TensorPrimitive<OffloadBackend<B>> {
    type S<B> = OffloadBackend<B>;
    if !S::<B>::is_offloaded_primitive(&lhs) && !S::<B>::is_offloaded_primitive(&rhs) {
        return S::<B>::wrap_primitive(B::q_matmul(
            S::<B>::fetch_primitive(lhs),
            S::<B>::fetch_primitive(rhs),
        ));
    }
    let float_dtype = match (&lhs, &rhs) {
        (TensorPrimitive::Float(t), _) | (_, TensorPrimitive::Float(t)) => Some(t.dtype().into()),
        _ => None,
    };
    let mut propagation = QuantPropagation::Inhibit;
    let mut scheme = None;
    let mut to_float = |t: TensorPrimitive<S<B>>| match t {
        TensorPrimitive::Float(f) => f,
        TensorPrimitive::QFloat(q) => {
            propagation = q.propagation();
            scheme = Some(*q.scheme());
            let dtype = float_dtype.unwrap_or_else(|| {
                burn_backend::get_device_settings::<S<B>>(&S::<B>::q_device(&q)).float_dtype
            });
            S::<B>::dequantize(q, dtype)
        }
    };
    let (lhs, rhs) = (to_float(lhs), to_float(rhs));
    let out = S::<B>::float_matmul(lhs, rhs);
    match (propagation, scheme) {
        (QuantPropagation::Propagate, Some(scheme)) => {
            TensorPrimitive::QFloat(S::<B>::quantize_dynamic(out, &scheme))
        }
        _ => TensorPrimitive::Float(out),
    }
}
