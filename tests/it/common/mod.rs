//! Shared test fixtures: a small model with known parameter sizes and visitors that read back
//! where each parameter lives; tests that run in a process of their own ([`process`]); the GPU
//! tests' device and guard ([`gpu`]).
#![allow(dead_code)]

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn_backend::DeviceOps;
use burn_offload::OffloadDevice;

#[cfg(feature = "cuda")]
pub mod gpu;
pub mod process;

pub(crate) use process::own_process;

/// The CPU device.
pub const CPU: burn::backend::ndarray::NdArrayDevice = burn::backend::ndarray::NdArrayDevice::Cpu;

/// The decorated CPU backend every test uses.
pub type B = burn_offload::OffloadBackend<burn::backend::NdArray>;

/// `Device(CPU)`: where models are initialised.
pub fn device() -> OffloadDevice<burn::backend::ndarray::NdArrayDevice> {
    OffloadDevice::Device(CPU)
}

/// Every mode, with a prefetch lookahead of 1 MiB.
pub const MODES: [burn_offload::OffloadMode; 4] = [
    burn_offload::OffloadMode::Uva,
    burn_offload::OffloadMode::Copy,
    burn_offload::OffloadMode::Auto,
    burn_offload::OffloadMode::prefetch(1 << 20),
];

pub const D_MODEL: usize = 8;
pub const D_FF: usize = 16;
pub const D_OUT: usize = 4;
pub const N_LAYERS: usize = 2;

/// `up` then `down`, with a ReLU between.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub up: Linear<B>,
    pub down: Linear<B>,
}

/// A pre-norm residual MLP block, so that paths have both `mlp` and `mlp_norm` segments.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub mlp_norm: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

/// `layers.{0,1}.{mlp_norm.{gamma,beta}, mlp.{up,down}.{weight,bias}}`, `head.{weight,bias}`.
#[derive(Module, Debug)]
pub struct Net<B: Backend> {
    pub layers: Vec<Block<B>>,
    pub head: Linear<B>,
}

impl<B: Backend> Net<B> {
    /// Initialises lazily (Burn's initialisers create uninitialised parameters).
    pub fn new(device: &B::Device) -> Self {
        let layers = (0..N_LAYERS)
            .map(|_| Block {
                mlp_norm: LayerNormConfig::new(D_MODEL).init(device),
                mlp: Mlp {
                    up: LinearConfig::new(D_MODEL, D_FF).init(device),
                    down: LinearConfig::new(D_FF, D_MODEL).init(device),
                },
            })
            .collect();
        Self {
            layers,
            head: LinearConfig::new(D_MODEL, D_OUT).init(device),
        }
    }

    /// Any rank: `[batch, d_model]` or `[batch, seq, d_model]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut x = x;
        for layer in &self.layers {
            let h = layer.mlp_norm.forward(x.clone());
            let h = layer.mlp.down.forward(relu(layer.mlp.up.forward(h)));
            x = x + h;
        }
        self.head.forward(x)
    }
}

/// A plain two-layer MLP (`fc1`, `fc2`).
#[derive(Module, Debug)]
pub struct SmallMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> SmallMlp<B> {
    pub fn new(device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(D_MODEL, D_FF).init(device),
            fc2: LinearConfig::new(D_FF, D_OUT).init(device),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.fc2.forward(relu(self.fc1.forward(x)))
    }
}

/// `Net`'s parameters in module order: path, shape, bytes (f32).
pub const NET_PARAMS: &[(&str, &[usize], u64)] = &[
    ("layers.0.mlp_norm.gamma", &[8], 32),
    ("layers.0.mlp_norm.beta", &[8], 32),
    ("layers.0.mlp.up.weight", &[8, 16], 512),
    ("layers.0.mlp.up.bias", &[16], 64),
    ("layers.0.mlp.down.weight", &[16, 8], 512),
    ("layers.0.mlp.down.bias", &[8], 32),
    ("layers.1.mlp_norm.gamma", &[8], 32),
    ("layers.1.mlp_norm.beta", &[8], 32),
    ("layers.1.mlp.up.weight", &[8, 16], 512),
    ("layers.1.mlp.up.bias", &[16], 64),
    ("layers.1.mlp.down.weight", &[16, 8], 512),
    ("layers.1.mlp.down.bias", &[8], 32),
    ("head.weight", &[8, 4], 128),
    ("head.bias", &[4], 16),
];

/// Bytes of one `Block`.
pub const BLOCK_BYTES: u64 = 32 + 32 + 512 + 64 + 512 + 32;
/// Bytes of all of `Net`'s parameters.
pub const NET_BYTES: u64 = 2 * BLOCK_BYTES + 128 + 16;

/// Tracks the dotted path of the parameter being visited.
struct PathVisitor<F> {
    path: Vec<String>,
    f: F,
}

impl<B: Backend, F: FnMut(String, &dyn ParamView<B>)> ModuleVisitor<B> for PathVisitor<F> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        (self.f)(self.path.join("."), param)
    }
}

/// What the visitors need of a float parameter of any rank.
trait ParamView<B: Backend> {
    fn initialized(&self) -> bool;
    fn data(&self) -> TensorData;
    fn device(&self) -> B::Device;
    fn require_grad(&self) -> bool;
}

impl<B: Backend, const D: usize> ParamView<B> for Param<Tensor<B, D>> {
    fn initialized(&self) -> bool {
        self.is_initialized()
    }
    fn data(&self) -> TensorData {
        self.val().into_data()
    }
    fn device(&self) -> B::Device {
        self.val().device()
    }
    fn require_grad(&self) -> bool {
        self.val().is_require_grad()
    }
}

fn visit<B: Backend, M: Module<B>>(module: &M, f: impl FnMut(String, &dyn ParamView<B>)) {
    let mut visitor = PathVisitor {
        path: Vec::new(),
        f,
    };
    module.visit(&mut visitor);
}

/// Path and whether the parameter is initialised, without initialising anything.
pub fn init_states<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    visit::<B, M>(module, |path, p| out.push((path, p.initialized())));
    out
}

/// Path and value of every float parameter (initialises lazy ones).
pub fn values<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, TensorData)> {
    let mut out = Vec::new();
    visit::<B, M>(module, |path, p| out.push((path, p.data())));
    out
}

/// Whether `tensor` is in host memory (its `device()` is the compute device either way).
pub fn on_host<D, B, const N: usize, K>(tensor: &Tensor<B, N, K>) -> bool
where
    D: DeviceOps,
    B: Backend<Device = OffloadDevice<D>>,
    K: burn::tensor::BasicOps<B>,
    K::Elem: burn::tensor::Element,
{
    burn_offload::tensor_placement(tensor) == burn_offload::Placement::Host
}

/// Path and whether the parameter's tensor is in host memory (initialises lazy ones).
pub fn placements<D, B, M>(module: &M) -> Vec<(String, bool)>
where
    D: DeviceOps,
    B: Backend<Device = OffloadDevice<D>>,
    M: Module<B>,
{
    visit::<B, M>(module, |_, p| drop(p.device()));
    burn_offload::placements(module)
        .into_iter()
        .map(|(path, placement)| (path, placement == burn_offload::Placement::Host))
        .collect()
}

/// Path and whether the parameter requires a gradient.
pub fn require_grads<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    visit::<B, M>(module, |path, p| out.push((path, p.require_grad())));
    out
}

/// Paths a report placed in host memory.
pub fn offloaded_paths(report: &burn_offload::OffloadReport) -> Vec<String> {
    report.offloaded().map(|p| p.path.clone()).collect()
}

/// Asserts that two value lists (from [`values`]) have the same paths and equal values.
pub fn assert_same_values(actual: &[(String, TensorData)], expected: &[(String, TensorData)]) {
    assert_eq!(
        actual.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        expected.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for ((path, a), (_, e)) in actual.iter().zip(expected) {
        assert_eq!(a.shape, e.shape, "{path}: shape");
        assert_eq!(
            a.to_vec::<f32>().unwrap(),
            e.to_vec::<f32>().unwrap(),
            "{path}: values"
        );
    }
}

/// `module` with its float parameters set to `values` (in module order, as [`values`] reads
/// them), created on `device`: the same weights on another backend.
pub fn load_values<B: Backend, M: Module<B>>(
    module: M,
    values: &[(String, TensorData)],
    device: &B::Device,
) -> M {
    struct Loader<'a, B: Backend> {
        values: std::slice::Iter<'a, (String, TensorData)>,
        device: &'a B::Device,
    }
    impl<B: Backend> burn::module::ModuleMapper<B> for Loader<'_, B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, _, mapper) = param.consume();
            let (_, data) = self.values.next().expect("as many values as parameters");
            Param::from_mapped_value(id, Tensor::from_data(data.clone(), self.device), mapper)
        }
    }
    module.map(&mut Loader {
        values: values.iter(),
        device,
    })
}

/// Deterministic pseudo-random values in [-2, 2) (24-bit fractions).
pub fn data(shape: &[usize], seed: u64) -> TensorData {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    TensorData::new(values, shape.to_vec())
}

/// The device an op body creates its int and bool inputs on; its type names the backend.
pub struct Dev<B: Backend>(pub B::Device);

impl<B: Backend> Dev<B> {
    pub fn int<const N: usize>(&self, data: impl Into<TensorData>) -> Tensor<B, N, Int> {
        Tensor::from_data(data.into(), &self.0)
    }

    pub fn bool<const N: usize>(&self, data: impl Into<TensorData>) -> Tensor<B, N, Bool> {
        Tensor::from_data(data.into(), &self.0)
    }
}
