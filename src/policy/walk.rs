//! Walking a module's float parameters with their full dotted paths, and moving each one to
//! the placement a caller decides — lazily for parameters that are not initialised yet.

use std::sync::Arc;

use burn::module::{ModuleMapper, Param};
use burn::tensor::{Tensor, backend::Backend};
use burn_backend::{DType, DeviceOps, get_device_settings};

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
    let mut walker = Walker {
        path: Vec::new(),
        decide,
        context: context.clone(),
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
        let info = ParamInfo {
            path: self.path.join("."),
            bytes: (shape.iter().product::<usize>() * dtype.size()) as u64,
            shape,
            dtype,
            device,
        };
        let action = (self.decide)(&info);
        let to_host = match action {
            ParamAction::Keep => info.device.is_host(),
            ParamAction::Host => true,
            ParamAction::Device => false,
        };
        let moved = to_host != info.device.is_host();
        // A parameter in host memory is re-tagged with this walk's context even if it stays.
        let param = if !moved && !to_host {
            param
        } else if initialized {
            place_initialized(
                param,
                placement_of(&info.device, to_host),
                &self.context,
                &info.path,
            )
        } else {
            retarget_lazy(
                param,
                placement_of(&info.device, to_host),
                self.context.clone(),
                &info.path,
            )
        };
        self.reports.push(ParamReport {
            path: info.path,
            shape: info.shape,
            dtype: format!("{:?}", info.dtype).to_lowercase(),
            bytes: info.bytes,
            placement: if to_host {
                Placement::Host
            } else {
                Placement::Device
            },
            moved,
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
    let moved = tensor.to_device(device).detach();
    if require_grad {
        moved.require_grad()
    } else {
        moved
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

/// An empty tensor for asking a parameter's load mapper for its mark ([`find_mark`]).
fn probe<B: Backend<Device = OffloadDevice<D>>, D: DeviceOps, const N: usize>(
    device: &OffloadDevice<D>,
) -> Tensor<B, N> {
    Tensor::<B, N>::empty([0; N], &device.to_resident())
}

/// The mark of the parameter at `path` (the one its load mapper carries, else a new one), and
/// whether it is new. A parameter that goes to the device keeps its mark, set to the device.
fn mark_for(
    found: Option<Arc<ParamMark>>,
    to_host: bool,
    context: &OffloadContext,
    path: &str,
) -> (Option<Arc<ParamMark>>, bool) {
    match (found, to_host) {
        (Some(mark), true) => {
            mark.to_host(context);
            (Some(mark), false)
        }
        (None, true) => (Some(ParamMark::new(path.to_string(), context)), true),
        (Some(mark), false) => {
            mark.to_device();
            (None, false)
        }
        (None, false) => (None, false),
    }
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
        match mark.host_context() {
            // A leaf again (with autodiff, a move is an op): Burn sets the gradient flag next.
            Some(context) => {
                let host = loaded.device().to_host();
                in_moves_marked(&context, Some(mark.clone()), || loaded.to_device(&host)).detach()
            }
            None => loaded,
        }
    }
}

/// Moves an initialised parameter to `target`, marked ([`crate::mark`]) if it goes to host
/// memory: its load mapper (the parameter's own, then burn-offload's) keeps loads there.
fn place_initialized<B, D, const N: usize>(
    param: Param<Tensor<B, N>>,
    target: OffloadDevice<D>,
    context: &OffloadContext,
    path: &str,
) -> Param<Tensor<B, N>>
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    let (id, tensor, mapper) = param.consume();
    // Only a parameter with a load mapper can hold a mark; most have none, and theirs is then
    // not run on a probe. (`ParamMapper` keeps its mappers private; its `Debug` says whether
    // there is one.)
    let found = if format!("{mapper:?}").contains("load: true") {
        find_mark(|| mapper.on_load(probe::<B, D, N>(&target))).1
    } else {
        None
    };
    let (mark, new) = mark_for(found, target.is_host(), context, path);
    let moved = in_moves_marked(context, mark.clone(), || move_tensor(tensor, &target));
    let param = Param::from_mapped_value(id, moved, mapper.clone());
    match mark {
        Some(mark) if new => param.load_mapper(load_into(mark, move |t| mapper.on_load(t))),
        _ => param,
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
) -> Param<Tensor<B, N>>
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
{
    let id = param.id;
    let shape = param.lazy_shape();
    let probe = probe::<B, D, N>(&param.lazy_device());
    let (carrier, found) = find_mark(|| param.clone().transform_for_load(probe, id));
    let (mark, _) = mark_for(found, target.is_host(), &context, path);
    let require_grad = carrier.val().is_require_grad();
    let original = Arc::new(param);
    let (on_load, on_save) = (carrier.clone(), carrier);
    let init_mark = mark.clone();
    let param = Param::uninitialized(
        id,
        move |device: &OffloadDevice<D>, require_grad| {
            let value = if device.is_host() {
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
            let mark = init_mark.clone().filter(|_| device.is_host());
            let value = in_moves_marked(&context, mark, || value.to_device(device));
            value.detach().set_require_grad(require_grad)
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
    match mark {
        Some(mark) => param.load_mapper(load_into(mark, load)),
        None => param.load_mapper(load),
    }
}
