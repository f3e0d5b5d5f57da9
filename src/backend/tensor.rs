//! The float primitive of [`OffloadBackend`](super::OffloadBackend).

use burn_backend::{DType, Distribution, Shape, TensorData, TensorMetadata};
use burn_std::FloatDType;

use crate::host::HostTensor;
use crate::target::OffloadTarget;

/// A float tensor of [`OffloadBackend<B>`](super::OffloadBackend): in `B`'s memory, or a view
/// of host memory that `device` reads.
#[derive(Clone, Debug)]
pub enum OffloadTensor<B: OffloadTarget> {
    /// In the inner backend's memory.
    Resident(B::FloatTensorPrimitive),
    /// In host memory read by `device`.
    Offloaded {
        /// The host view (cloning it is O(1)).
        host: HostTensor,
        /// The compute device that reads it.
        device: B::Device,
    },
}

impl<B: OffloadTarget> OffloadTensor<B> {
    /// Whether the tensor lives in host memory.
    pub fn is_offloaded(&self) -> bool {
        matches!(self, Self::Offloaded { .. })
    }

    /// The host view, if offloaded.
    pub fn host(&self) -> Option<&HostTensor> {
        match self {
            Self::Offloaded { host, .. } => Some(host),
            Self::Resident(_) => None,
        }
    }
}

impl<B: OffloadTarget> TensorMetadata for OffloadTensor<B> {
    fn dtype(&self) -> DType {
        match self {
            Self::Resident(t) => t.dtype(),
            Self::Offloaded { host, .. } => host.dtype(),
        }
    }

    fn shape(&self) -> Shape {
        match self {
            Self::Resident(t) => t.shape(),
            Self::Offloaded { host, .. } => host.shape(),
        }
    }
}

/// A random tensor created directly in new host memory for `device` (pinned if the device's
/// config says so), filled in place by several threads ([`crate::random`]).
pub(crate) fn host_random<B: OffloadTarget>(
    shape: Shape,
    distribution: Distribution,
    dtype: FloatDType,
    device: &B::Device,
) -> HostTensor {
    let pin = crate::device::device_config(device).pin_memory;
    let bytes = shape.num_elements() * DType::from(dtype).size();
    let mut buffer = B::alloc_host(device, bytes, pin).unwrap_or_else(|e| panic!("{e}"));
    crate::random::fill(buffer.as_mut_slice(), dtype, distribution);
    let host =
        HostTensor::new(buffer, shape.to_vec(), dtype.into()).expect("buffer sized for shape");
    super::record(|s| s.host_created_bytes += host.size_bytes() as u64);
    host
}

/// Stores `data` in new host memory for `device` (pinned if the device's config says so).
pub(crate) fn host_from_data<B: OffloadTarget>(data: TensorData, device: &B::Device) -> HostTensor {
    let pin = crate::device::device_config(device).pin_memory;
    let host = HostTensor::from_data(&data, |bytes| B::alloc_host(device, bytes, pin))
        .unwrap_or_else(|e| panic!("{e}"));
    super::record(|s| s.host_created_bytes += host.size_bytes() as u64);
    host
}

/// Moves a resident tensor into new host memory.
pub(crate) fn offload<B: OffloadTarget>(
    tensor: B::FloatTensorPrimitive,
) -> (HostTensor, B::Device) {
    let device = B::float_device(&tensor);
    let pin = crate::device::device_config(&device).pin_memory;
    let host = B::download(tensor, pin).unwrap_or_else(|e| panic!("{e}"));
    (host, device)
}
