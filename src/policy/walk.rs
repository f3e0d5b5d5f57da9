//! Walking a module's float parameters with their full dotted paths, and moving each one to
//! the placement a caller decides — lazily for parameters that are not initialised yet.

use std::sync::Arc;

use burn::module::{ModuleMapper, Param};
use burn::tensor::{Tensor, backend::Backend};
use burn_backend::{DType, DeviceOps, get_device_settings};
use burn_std::quantization::QuantScheme;

use super::report::{ParamReport, Placement};
use crate::context::{OffloadContext, Scope, querying_placement, with_scope};
use crate::device::OffloadDevice;
use crate::mark::{ParamMark, answer_query, find_mark};

/// What the walker knows of one parameter before deciding.
#[derive(Debug, Clone)]
pub(crate) struct ParamInfo<D> {
    pub path: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub bytes: u64,
    pub device: OffloadDevice<D>,
    /// The scheme the walk quantizes it into (`bytes` is then its packed size).
    pub quantize: Option<QuantScheme>,
}

/// Where a parameter should be after the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParamAction {
    /// Leave it where it is.
    Keep,
    /// Host memory.
    Host,
    /// Device memory.
    Device,
}

struct Walker<F> {
    path: Vec<String>,
    decide: F,
    context: OffloadContext,
    quantization: Option<super::Quantization>,
    reports: Vec<ParamReport>,
}

/// Maps every float parameter of `module` (in module order) through `decide`, moving it as
/// decided; returns the module and one report row per parameter. Parameters that end up in
/// host memory belong to `context` (those already there are given it: an O(1) re-tag).
pub(crate) fn walk_params<B, D, M, F>(
    module: M,
    context: &OffloadContext,
    decide: F,
) -> (M, Vec<ParamReport>)
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    M: burn::module::Module<B>,
    F: FnMut(&ParamInfo<D>) -> ParamAction,
{
    walk_params_quantized(module, context, None, decide)
}

/// [`walk_params`] that also quantizes the float parameters `quantization` selects (before
/// deciding, so that `decide` sees their packed size), now for initialised ones and at
/// initialisation and load for lazy ones. Errors of the selection (`scheme_for`) must have
/// been reported before: here a parameter it refuses stays float.
pub(crate) fn walk_params_quantized<B, D, M, F>(
    module: M,
    context: &OffloadContext,
    quantization: Option<&super::Quantization>,
    decide: F,
) -> (M, Vec<ParamReport>)
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    M: burn::module::Module<B>,
    F: FnMut(&ParamInfo<D>) -> ParamAction,
{
    let mut walker = Walker {
        path: Vec::new(),
        decide,
        context: context.clone(),
        quantization: quantization.cloned(),
        reports: Vec::new(),
    };
    let module = module.map(&mut walker);
    (module, walker.reports)
}

impl<B, D, F> ModuleMapper<B> for Walker<F>
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    F: FnMut(&ParamInfo<D>) -> ParamAction,
{
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const N: usize>(&mut self, param: Param<Tensor<B, N>>) -> Param<Tensor<B, N>> {
        let initialized = param.is_initialized();
        let (shape, dtype, device) = if initialized {
            let value = param.val();
            let device = querying_placement(|| value.device());
            (value.shape().to_vec(), value.dtype(), device)
        } else {
            // A lazy parameter is created with the device's default float type.
            let device = param.lazy_device();
            let dtype = get_device_settings::<B>(&device).float_dtype.into();
            (param.lazy_shape().to_vec(), dtype, device)
        };
        let path = self.path.join(".");
        let quantize = match (&self.quantization, dtype) {
            (Some(q), dtype) if dtype.is_float() => q.scheme_for(&path, &shape).ok().flatten(),
            _ => None,
        };
        let dtype = quantize.map_or(dtype, DType::QFloat);
        let info = ParamInfo {
            path,
            bytes: crate::quant::tensor_bytes(&shape, dtype),
            shape,
            dtype,
            device,
            quantize,
        };
        let action = (self.decide)(&info);
        let to_host = match action {
            ParamAction::Keep => info.device.is_host(),
            ParamAction::Host => true,
            ParamAction::Device => false,
        };
        let moved = to_host != info.device.is_host();
        // A parameter in host memory is re-tagged with this walk's context even if it stays.
        let param = if !moved && !to_host && info.quantize.is_none() {
            param
        } else if initialized {
            place_initialized(
                param,
                placement_of(&info.device, to_host),
                &self.context,
                &info.path,
                info.quantize,
            )
        } else {
            retarget_lazy(
                param,
                placement_of(&info.device, to_host),
                self.context.clone(),
                &info.path,
                info.quantize,
            )
        };
        self.reports.push(ParamReport {
            path: info.path,
            shape: info.shape,
            dtype: crate::quant::dtype_name(info.dtype),
            bytes: info.bytes,
            placement: if to_host {
                Placement::Host
            } else {
                Placement::Device
            },
            moved,
            device: format!("{:?}", info.device.compute()),
        });
        param
    }
}

fn placement_of<D: Clone>(device: &OffloadDevice<D>, host: bool) -> OffloadDevice<D> {
    if host {
        device.to_host()
    } else {
        device.to_resident()
    }
}

/// Moves a parameter's tensor, keeping it a leaf with the same gradient requirement (as
/// `Module::fork` does).
fn move_tensor<B: Backend, const N: usize>(
    tensor: Tensor<B, N>,
    device: &B::Device,
) -> Tensor<B, N> {
    let require_grad = tensor.is_require_grad();
    let moved = detached(tensor.to_device(device));
    if require_grad {
        moved.require_grad()
    } else {
        moved
    }
}

/// `tensor` detached from any autodiff graph. A quantized tensor is returned as it is: it is
/// never in a graph (Burn 0.21's autodiff has no quantized ops), and Burn's `detach`
/// dequantizes it.
pub(crate) fn detached<B: Backend, const N: usize>(tensor: Tensor<B, N>) -> Tensor<B, N> {
    if matches!(tensor.dtype(), DType::QFloat(_)) {
        tensor
    } else {
        tensor.detach()
    }
}

/// Runs `f` in a placement scope of `context`: `to_device` moves between host and device
/// memory, and tensors in host memory are given `context`.
pub(crate) fn in_moves<R>(context: &OffloadContext, f: impl FnOnce() -> R) -> R {
    in_moves_marked(context, None, f)
}

/// [`in_moves`] for the parameter `mark`: a host value placed inside carries it.
fn in_moves_marked<R>(
    context: &OffloadContext,
    mark: Option<Arc<ParamMark>>,
    f: impl FnOnce() -> R,
) -> R {
    with_scope(
        Scope {
            context: context.clone(),
            redirect_creations: false,
            moves: true,
            mark,
        },
        f,
    )
}

/// The context a value loaded into `param` goes to in host memory, if a policy marked it for
/// host memory (its mark, [`crate::mark`]). Initialises nothing: the parameter's load mapper is
/// asked with an empty probe, as [`retarget_lazy`] does.
#[cfg(feature = "collective")]
pub(crate) fn marked_host_context<B, D, const N: usize>(
    param: &Param<Tensor<B, N>>,
) -> Option<OffloadContext>
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    let probe = probe::<B, D, N>(&param.lazy_device());
    let (_, found) = find_mark(|| param.clone().transform_for_load(probe, param.id));
    found.and_then(|mark| mark.host_context())
}

/// An empty tensor for asking a parameter's load mapper for its mark ([`find_mark`]).
fn probe<B: Backend<Device = OffloadDevice<D>>, D: DeviceOps, const N: usize>(
    device: &OffloadDevice<D>,
) -> Tensor<B, N> {
    Tensor::<B, N>::empty([0; N], &device.to_resident())
}

/// The mark of the parameter at `path` (the one its load mapper carries, else a new one), and
/// whether it is new. A parameter that goes to the device keeps its mark, set to the device.
/// Either way the mark quantizes loads into `quantize` from now on.
fn mark_for(
    found: Option<Arc<ParamMark>>,
    to_host: bool,
    context: &OffloadContext,
    path: &str,
    quantize: Option<QuantScheme>,
) -> (Option<Arc<ParamMark>>, bool) {
    let (mark, new) = match (found, to_host) {
        (Some(mark), true) => {
            mark.to_host(context);
            (Some(mark), false)
        }
        (None, true) => (Some(ParamMark::new(path.to_string(), context)), true),
        (Some(mark), false) => {
            mark.to_device();
            mark.set_quantize(quantize);
            (None, false)
        }
        (None, false) => (None, false),
    };
    if let Some(mark) = &mark {
        mark.set_quantize(quantize);
    }
    (mark, new)
}

/// A load mapper that runs `inner` (the parameter's own) and then puts the loaded tensor in
/// host memory of `mark`'s context while the parameter belongs there. Answers [`find_mark`].
fn load_into<B, D, const N: usize>(
    mark: Arc<ParamMark>,
    inner: impl Fn(Tensor<B, N>) -> Tensor<B, N> + Send + Sync + 'static,
) -> impl Fn(Tensor<B, N>) -> Tensor<B, N> + Send + Sync + 'static
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    move |tensor| {
        if answer_query(&mark) {
            return tensor;
        }
        let loaded = inner(tensor);
        let quantize = mark.quantize();
        if let DType::QFloat(scheme) = loaded.dtype()
            && quantize.is_none_or(|q| q != scheme)
        {
            log::warn!(
                "`{}`: the checkpoint holds `{}` values, the model's parameter {}; it is loaded \
                 as the checkpoint has it (dequantize the checkpoint, or quantize the model with \
                 the same scheme, to match)",
                mark.path(),
                crate::quant::scheme_name(&scheme),
                match quantize {
                    Some(q) => format!("is quantized to `{}`", crate::quant::scheme_name(&q)),
                    None => "is float".to_string(),
                }
            );
        }
        // Quantized as it is loaded, one tensor at a time; straight into host memory for a
        // parameter that belongs there.
        let loaded = quantized(loaded, quantize, mark.host_context().as_ref());
        match mark.host_context() {
            // A leaf again (with autodiff, a move is an op): Burn sets the gradient flag next.
            Some(context) => {
                let host = loaded.device().to_host();
                detached(in_moves_marked(&context, Some(mark.clone()), || {
                    loaded.to_device(&host)
                }))
            }
            None => loaded,
        }
    }
}

/// `tensor` quantized into `scheme` if it is float (a loaded float checkpoint, an initial
/// value); a quantized tensor is kept as it is (`load_into` says when its scheme differs).
/// Quantized on the device, or, for a tensor that goes to host memory (`to_host`), straight
/// into host memory of `context`.
fn quantized<B, D, const N: usize>(
    tensor: Tensor<B, N>,
    scheme: Option<QuantScheme>,
    to_host: Option<&OffloadContext>,
) -> Tensor<B, N>
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    let Some(scheme) = scheme else {
        return tensor;
    };
    if !tensor.dtype().is_float() {
        return tensor;
    }
    match to_host {
        Some(context) => with_scope(
            Scope {
                context: context.clone(),
                redirect_creations: true,
                moves: false,
                mark: None,
            },
            || tensor.quantize_dynamic(&scheme),
        ),
        None => tensor.quantize_dynamic(&scheme),
    }
}

/// Moves an initialised parameter to `target`, marked ([`crate::mark`]) if it goes to host
/// memory: its load mapper (the parameter's own, then burn-offload's) keeps loads there.
/// With `quantize`, the value is quantized first, and so is every float value loaded later.
fn place_initialized<B, D, const N: usize>(
    param: Param<Tensor<B, N>>,
    target: OffloadDevice<D>,
    context: &OffloadContext,
    path: &str,
    quantize: Option<QuantScheme>,
) -> Param<Tensor<B, N>>
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    let (id, tensor, mapper) = param.consume();
    let host_context = target.is_host().then_some(context);
    let tensor = quantized(tensor, quantize, host_context);
    // Only a parameter with a load mapper can hold a mark; most have none, and theirs is then
    // not run on a probe. (`ParamMapper` keeps its mappers private; its `Debug` says whether
    // there is one.)
    let found = if format!("{mapper:?}").contains("load: true") {
        find_mark(|| mapper.on_load(probe::<B, D, N>(&target))).1
    } else {
        None
    };
    let (mark, new) = mark_for(found, target.is_host(), context, path, quantize);
    let moved = in_moves_marked(context, mark.clone(), || move_tensor(tensor, &target));
    let param = Param::from_mapped_value(id, moved, mapper.clone());
    match mark {
        Some(mark) if new => param.load_mapper(load_into(mark, move |t| mapper.on_load(t))),
        Some(_) => param,
        None if quantize.is_some() => {
            param.load_mapper(move |t| quantized(mapper.on_load(t), quantize, None))
        }
        None => param,
    }
}

/// A new lazy parameter (same id and shape) on `target` whose initialiser runs the original
/// one with creations redirected to host memory (or moves its result to the device), so that
/// nothing is allocated now and nothing on the wrong side later. What ends up in host memory
/// (created, moved or loaded) belongs to `context`.
///
/// Burn keeps a lazy parameter's gradient requirement and load/save mappers private, but
/// `transform_for_load` applies them: loading an empty probe into a clone gives an initialised
/// *carrier* with the original's mappers and gradient requirement (nothing of the parameter is
/// initialised or allocated). The new parameter's mappers delegate to the carrier's, so that
/// e.g. `LinearLayout::Col`'s transposes still happen on load and save. A custom load mapper
/// therefore also sees that empty probe once.
fn retarget_lazy<B, D, const N: usize>(
    param: Param<Tensor<B, N>>,
    target: OffloadDevice<D>,
    context: OffloadContext,
    path: &str,
    quantize: Option<QuantScheme>,
) -> Param<Tensor<B, N>>
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    let id = param.id;
    let shape = param.lazy_shape();
    let probe = probe::<B, D, N>(&param.lazy_device());
    let (carrier, found) = find_mark(|| param.clone().transform_for_load(probe, id));
    let (mark, _) = mark_for(found, target.is_host(), &context, path, quantize);
    let require_grad = carrier.val().is_require_grad();
    let original = Arc::new(param);
    let (on_load, on_save) = (carrier.clone(), carrier);
    let init_mark = mark.clone();
    let param = Param::uninitialized(
        id,
        move |device: &OffloadDevice<D>, require_grad| {
            // A parameter to quantize is drawn on the device and quantized there, straight into
            // host memory if it belongs there: no float copy in host memory, none uploaded.
            let value = if device.is_host() && quantize.is_none() {
                let redirect = Scope {
                    context: context.clone(),
                    redirect_creations: true,
                    moves: false,
                    mark: None,
                };
                with_scope(redirect, || original.val())
            } else {
                original.val()
            };
            let value = quantized(value, quantize, device.is_host().then_some(&context));
            let mark = init_mark.clone().filter(|_| device.is_host());
            let value = in_moves_marked(&context, mark, || value.to_device(device));
            detached(value).set_require_grad(require_grad)
        },
        target,
        require_grad,
        shape,
    )
    .save_mapper(move |tensor| on_save.clone().map(|_| tensor).transform_for_save().val());
    // Placements compare equal, so the carrier's `transform_for_load` does not move `tensor`;
    // the mark then puts what a store loaded (in host or in device memory) in host memory of
    // the model's context while the parameter belongs there.
    let load = move |tensor| on_load.clone().transform_for_load(tensor, id).val();
    match (mark, quantize) {
        (Some(mark), _) => param.load_mapper(load_into(mark, load)),
        (None, Some(_)) => param.load_mapper(move |t| quantized(load(t), quantize, None)),
        (None, None) => param.load_mapper(load),
    }
}
