//! Where a module's parameters live, and bringing a whole module back into device memory.
//!
//! Burn's own `Module::to_device` never changes placement (see [`OffloadDevice`]), and
//! `Tensor::device()` / `Module::devices()` name compute devices (`Device(d)`, whatever the
//! placement: what a model's code creates its activations on): these functions are the
//! explicit way to ask and to undo.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, backend::Backend};
use burn_backend::DeviceOps;

use crate::context::{OffloadContext, querying_placement};
use crate::device::OffloadDevice;
use crate::policy::{ParamAction, Placement, walk_params};

/// Every float parameter's full dotted path, shape and placement, in module order (lazy
/// parameters: the shape and placement they will have). Initialises nothing.
pub(crate) fn param_shapes<B, D, M>(module: &M) -> Vec<(String, Vec<usize>, OffloadDevice<D>)>
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    M: Module<B>,
{
    struct Visitor<D> {
        path: Vec<String>,
        out: Vec<(String, Vec<usize>, OffloadDevice<D>)>,
    }
    impl<B, D> ModuleVisitor<B> for Visitor<D>
    where
        B: Backend<Device = OffloadDevice<D>>,
        D: DeviceOps,
    {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }

        fn visit_float<const N: usize>(&mut self, param: &Param<Tensor<B, N>>) {
            let (shape, device) = if param.is_initialized() {
                let value = param.val();
                (
                    value.shape().to_vec(),
                    querying_placement(|| value.device()),
                )
            } else {
                (param.lazy_shape().to_vec(), param.lazy_device())
            };
            self.out.push((self.path.join("."), shape, device));
        }
    }
    let mut visitor = Visitor {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// Every float parameter of `module`, in module order, with its full dotted path and where it
/// lives (lazy parameters: where they will be created). Initialises nothing.
pub fn placements<B, D, M>(module: &M) -> Vec<(String, Placement)>
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    M: Module<B>,
{
    param_shapes(module)
        .into_iter()
        .map(|(path, _, device)| {
            let placement = if device.is_host() {
                Placement::Host
            } else {
                Placement::Device
            };
            (path, placement)
        })
        .collect()
}

/// Where `tensor` lives: [`Placement::Host`] for a tensor in host memory (`tensor.device()`
/// names the compute device, `Device(d)`, for both).
/// Int and bool tensors are always in device memory.
pub fn tensor_placement<B, D, const N: usize, K>(tensor: &Tensor<B, N, K>) -> Placement
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    K: burn::tensor::BasicOps<B>,
    K::Elem: burn::tensor::Element,
{
    if querying_placement(|| tensor.device()).is_host() {
        Placement::Host
    } else {
        Placement::Device
    }
}

/// Brings every parameter of `module` that lives in host memory into device memory (lazy ones
/// are retargeted: they will be created on the device). The undo of
/// [`OffloadPolicy::apply`](crate::OffloadPolicy::apply); the same as applying a budget of 0.
pub fn to_device_memory<B, D, M>(module: M) -> M
where
    B: Backend<Device = OffloadDevice<D>>,
    D: DeviceOps,
    M: Module<B>,
{
    walk_params(module, &OffloadContext::default_context(), |_| {
        ParamAction::Device
    })
    .0
}

impl OffloadContext {
    /// Moves `tensor` to `device` *with* its placement: `Host(d)` puts it in host memory of
    /// this context (a resident tensor is copied there; an offloaded one is re-tagged, O(1)),
    /// `Device(d)` brings it into device memory. Burn's own `Tensor::to_device` never changes
    /// placement (see [`OffloadDevice`]). The result is a leaf with `tensor`'s gradient flag,
    /// as `Module::fork` gives: for parameters and inputs, not for the middle of a graph.
    pub fn place<B, D, const N: usize>(
        &self,
        tensor: Tensor<B, N>,
        device: &OffloadDevice<D>,
    ) -> Tensor<B, N>
    where
        B: Backend<Device = OffloadDevice<D>>,
        D: DeviceOps,
    {
        // A leaf with the same gradient flag, as `Module::fork` gives (with autodiff a move
        // is an op, whose result is no leaf: an optimizer could not update it).
        let require_grad = tensor.is_require_grad();
        let moved =
            crate::policy::detached(crate::policy::in_moves(self, || tensor.to_device(device)));
        if require_grad {
            moved.require_grad()
        } else {
            moved
        }
    }

    /// Gives `tensor`, if it is offloaded, to this context: an O(1) re-tag (the same host
    /// memory, read from now on as this context says). A resident tensor is returned as is.
    pub fn adopt<B, D, const N: usize>(&self, tensor: Tensor<B, N>) -> Tensor<B, N>
    where
        B: Backend<Device = OffloadDevice<D>>,
        D: DeviceOps,
    {
        let device = querying_placement(|| tensor.device());
        if device.is_host() {
            self.place(tensor, &device)
        } else {
            tensor
        }
    }

    /// Gives every parameter of `module` that lives in host memory to this context (see
    /// [`adopt`](Self::adopt)): e.g. the same offloaded weights read in another mode, without
    /// applying a policy again. Lazy parameters are retargeted, not initialised.
    pub fn adopt_module<B, D, M>(&self, module: M) -> M
    where
        B: Backend<Device = OffloadDevice<D>>,
        D: DeviceOps,
        M: Module<B>,
    {
        walk_params(module, self, |_| ParamAction::Keep).0
    }
}
