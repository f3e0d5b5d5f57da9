//! The float primitive of [`OffloadBackend`](super::OffloadBackend).

use burn_backend::{DType, Shape, TensorData, TensorMetadata};

use crate::context::OffloadContext;
use crate::host::HostTensor;
use crate::inner::OffloadTarget;
use crate::stats::record;

/// A float tensor of [`OffloadBackend<B>`](super::OffloadBackend): in `B`'s memory, or a view
/// of host memory that a device reads.
#[derive(Clone, Debug)]
pub enum OffloadTensor<B: OffloadTarget> {
    /// In the inner backend's memory.
    Resident(B::FloatTensorPrimitive),
    /// In host memory read by a device, on behalf of one model's context.
    Offloaded(Offloaded<B>),
}

/// An offloaded float tensor: a host view, the compute device that reads it, and the
/// [`OffloadContext`] of the model it belongs to (which decides how ops read it).
///
/// Only burn-offload makes these (creation on `OffloadDevice::Host`, a policy, views of other
/// offloaded tensors), so every one holds a view that lies within its buffer.
#[derive(Clone, Debug)]
pub struct Offloaded<B: OffloadTarget> {
    host: HostTensor,
    device: B::Device,
    context: OffloadContext,
}

impl<B: OffloadTarget> Offloaded<B> {
    pub(crate) fn new(host: HostTensor, device: B::Device, context: OffloadContext) -> Self {
        Self {
            host,
            device,
            context,
        }
    }

    /// The host view (cloning it is O(1)).
    pub fn host(&self) -> &HostTensor {
        &self.host
    }

    /// The compute device that reads it.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The context of the model it belongs to.
    pub fn context(&self) -> &OffloadContext {
        &self.context
    }

    /// Another view of the same memory, read by the same device in the same context.
    pub(crate) fn with_host(&self, host: HostTensor) -> Self {
        Self {
            host,
            device: self.device.clone(),
            context: self.context.clone(),
        }
    }

    /// The same view, read by `device` on behalf of `context`.
    pub(crate) fn retag(self, device: B::Device, context: OffloadContext) -> Self {
        Self {
            host: self.host,
            device,
            context,
        }
    }
}

impl<B: OffloadTarget> OffloadTensor<B> {
    /// Whether the tensor lives in host memory.
    pub fn is_offloaded(&self) -> bool {
        matches!(self, Self::Offloaded(_))
    }

    /// The host view, if offloaded.
    pub fn host(&self) -> Option<&HostTensor> {
        self.offloaded().map(Offloaded::host)
    }

    /// The offloaded tensor, if offloaded.
    pub fn offloaded(&self) -> Option<&Offloaded<B>> {
        match self {
            Self::Offloaded(o) => Some(o),
            Self::Resident(_) => None,
        }
    }
}

impl<B: OffloadTarget> TensorMetadata for OffloadTensor<B> {
    fn dtype(&self) -> DType {
        match self {
            Self::Resident(t) => t.dtype(),
            Self::Offloaded(o) => o.host.read_dtype(),
        }
    }

    fn shape(&self) -> Shape {
        match self {
            Self::Resident(t) => t.shape(),
            Self::Offloaded(o) => o.host.shape(),
        }
    }
}

/// Stores `data` in new host memory for `device` (pinned if `context` says so).
pub(crate) fn host_from_data<B: OffloadTarget>(
    data: TensorData,
    device: &B::Device,
    context: OffloadContext,
) -> Offloaded<B> {
    let pin = context.pin_memory();
    let host = HostTensor::from_data(&data, |bytes| B::alloc_host(device, bytes, pin))
        .unwrap_or_else(|e| panic!("{e}"));
    record(|s| s.host_created_bytes += host.size_bytes() as u64);
    Offloaded::new(host, device.clone(), context)
}

/// Moves a resident tensor into new host memory of `context`.
pub(crate) fn offload<B: OffloadTarget>(
    tensor: B::FloatTensorPrimitive,
    context: OffloadContext,
) -> Offloaded<B> {
    let device = B::float_device(&tensor);
    let host = B::download(tensor, context.pin_memory()).unwrap_or_else(|e| panic!("{e}"));
    Offloaded::new(host, device, context)
}
