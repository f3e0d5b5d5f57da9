//! Float ops that know about offloaded tensors; the rest are generated delegations.
//!
//! - creation ops on `Host(d)` (or inside [`with_host_placement`](crate::with_host_placement))
//!   write straight into host memory;
//! - metadata-only ops on an offloaded tensor return offloaded views (no copy);
//! - `matmul` with an offloaded rhs reads it in place where the mode and target allow;
//! - every other op gets a transient device copy of offloaded inputs (`fetch`).

use burn_backend::TensorMetadata;

use super::generated::delegate_float_tensor_ops;
use super::prelude::*;
use super::record;
use super::tensor::{host_from_data, host_random, offload};
use crate::device::host_redirect_active;
use crate::host::HostTensor;

impl<B: OffloadTarget> OffloadBackend<B> {
    /// Where a creation op on `device` puts its tensor: host memory for `Host(d)` and inside
    /// a host-placement scope.
    fn creates_on_host(device: &Device<Self>) -> bool {
        device.is_host() || host_redirect_active()
    }

    /// Creates a float tensor from data, in host or device memory as `device` says.
    fn create(data: TensorData, device: &Device<Self>) -> OffloadTensor<B> {
        let d = device.compute();
        if Self::creates_on_host(device) {
            OffloadTensor::Offloaded {
                host: host_from_data::<B>(data, d),
                device: d.clone(),
            }
        } else {
            record(|s| s.device_created_bytes += data.as_bytes().len() as u64);
            Self::resident(B::float_from_data(data, d))
        }
    }

    /// Counts a resident creation done by the inner backend.
    fn created(tensor: FloatTensor<B>) -> OffloadTensor<B> {
        record(|s| {
            s.device_created_bytes += (tensor.shape().num_elements() * tensor.dtype().size()) as u64
        });
        Self::resident(tensor)
    }

    /// A view of an offloaded tensor if `view` can make one, else `op` on the device.
    fn view_or(
        tensor: OffloadTensor<B>,
        view: impl FnOnce(&HostTensor) -> Option<HostTensor>,
        op: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
    ) -> OffloadTensor<B> {
        match tensor {
            OffloadTensor::Offloaded { host, device } => match view(&host) {
                Some(host) => OffloadTensor::Offloaded { host, device },
                None => Self::resident(op(Self::upload(&host, &device))),
            },
            OffloadTensor::Resident(t) => Self::resident(op(t)),
        }
    }
}

impl<B: OffloadTarget> FloatTensorOps<Self> for OffloadBackend<B> {
    delegate_float_tensor_ops!();

    fn float_from_data(data: TensorData, device: &Device<Self>) -> FloatTensor<Self> {
        Self::create(data, device)
    }

    fn float_random(
        shape: Shape,
        distribution: Distribution,
        device: &Device<Self>,
        dtype: FloatDType,
    ) -> FloatTensor<Self> {
        if Self::creates_on_host(device) {
            let d = device.compute();
            OffloadTensor::Offloaded {
                host: host_random::<B>(shape, distribution, dtype, d),
                device: d.clone(),
            }
        } else {
            Self::created(B::float_random(
                shape,
                distribution,
                device.compute(),
                dtype,
            ))
        }
    }

    fn float_zeros(shape: Shape, device: &Device<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        Self::float_full(shape, 0.0.into(), device, dtype)
    }

    fn float_ones(shape: Shape, device: &Device<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        Self::float_full(shape, 1.0.into(), device, dtype)
    }

    fn float_full(
        shape: Shape,
        fill_value: Scalar,
        device: &Device<Self>,
        dtype: FloatDType,
    ) -> FloatTensor<Self> {
        if Self::creates_on_host(device) {
            Self::create(
                TensorData::full_dtype(shape, fill_value, dtype.into()),
                device,
            )
        } else {
            Self::created(B::float_full(shape, fill_value, device.compute(), dtype))
        }
    }

    fn float_empty(shape: Shape, device: &Device<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        if Self::creates_on_host(device) {
            Self::create(TensorData::full_dtype(shape, 0.0, dtype.into()), device)
        } else {
            Self::created(B::float_empty(shape, device.compute(), dtype))
        }
    }

    async fn float_into_data(tensor: FloatTensor<Self>) -> Result<TensorData, ExecutionError> {
        match tensor {
            OffloadTensor::Resident(t) => B::float_into_data(t).await,
            OffloadTensor::Offloaded { host, .. } => Ok(host.to_data()),
        }
    }

    fn float_device(tensor: &FloatTensor<Self>) -> Device<Self> {
        match tensor {
            OffloadTensor::Resident(t) => OffloadDevice::Device(B::float_device(t)),
            OffloadTensor::Offloaded { device, .. } => OffloadDevice::Host(device.clone()),
        }
    }

    fn float_to_device(tensor: FloatTensor<Self>, device: &Device<Self>) -> FloatTensor<Self> {
        let target = device.compute();
        match (tensor, device) {
            (OffloadTensor::Resident(t), OffloadDevice::Device(_)) => {
                Self::resident(B::float_to_device(t, target))
            }
            (OffloadTensor::Resident(t), OffloadDevice::Host(_)) => {
                let t = B::float_to_device(t, target);
                let (host, device) = offload::<B>(t);
                OffloadTensor::Offloaded { host, device }
            }
            // Host memory is readable by any device of the target: only the reader changes.
            (OffloadTensor::Offloaded { host, .. }, OffloadDevice::Host(_)) => {
                B::note_host_reader(&host, target);
                OffloadTensor::Offloaded {
                    host,
                    device: target.clone(),
                }
            }
            (OffloadTensor::Offloaded { host, .. }, OffloadDevice::Device(_)) => {
                record(|s| s.device_created_bytes += host.size_bytes() as u64);
                Self::resident(B::upload(&host, target))
            }
        }
    }

    fn float_reshape(tensor: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        let dims = shape.to_vec();
        Self::view_or(
            tensor,
            |h| h.reshape(dims).ok().flatten(),
            |t| B::float_reshape(t, shape),
        )
    }

    fn float_swap_dims(tensor: FloatTensor<Self>, dim1: usize, dim2: usize) -> FloatTensor<Self> {
        Self::view_or(
            tensor,
            |h| h.swap_dims(dim1, dim2).ok(),
            |t| B::float_swap_dims(t, dim1, dim2),
        )
    }

    fn float_transpose(tensor: FloatTensor<Self>) -> FloatTensor<Self> {
        let rank = tensor.shape().num_dims();
        if rank < 2 {
            return tensor;
        }
        Self::view_or(
            tensor,
            |h| h.swap_dims(rank - 2, rank - 1).ok(),
            B::float_transpose,
        )
    }

    fn float_permute(tensor: FloatTensor<Self>, axes: &[usize]) -> FloatTensor<Self> {
        Self::view_or(
            tensor,
            |h| h.permute(axes).ok(),
            |t| B::float_permute(t, axes),
        )
    }

    fn float_flip(tensor: FloatTensor<Self>, axes: &[usize]) -> FloatTensor<Self> {
        Self::view_or(
            tensor,
            |h| {
                let ranges: Vec<_> = h
                    .dims()
                    .iter()
                    .enumerate()
                    .map(|(d, &n)| (0..n, if axes.contains(&d) { -1 } else { 1 }))
                    .collect();
                h.slice(&ranges).ok()
            },
            |t| B::float_flip(t, axes),
        )
    }

    fn float_slice(tensor: FloatTensor<Self>, slices: &[Slice]) -> FloatTensor<Self> {
        Self::view_or(
            tensor,
            |h| {
                let ranges: Vec<_> = h
                    .dims()
                    .iter()
                    .enumerate()
                    .map(|(d, &n)| match slices.get(d) {
                        Some(s) => (s.to_range(n), s.step()),
                        None => (0..n, 1),
                    })
                    .collect();
                h.slice(&ranges).ok()
            },
            |t| B::float_slice(t, slices),
        )
    }

    fn float_expand(tensor: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        let dims = shape.to_vec();
        Self::view_or(
            tensor,
            |h| h.expand(dims).ok(),
            |t| B::float_expand(t, shape),
        )
    }

    fn float_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        match (lhs, rhs) {
            (OffloadTensor::Resident(lhs), OffloadTensor::Offloaded { host, device }) => {
                Self::resident(Self::matmul_host_rhs(lhs, &host, &device))
            }
            (lhs, rhs) => Self::resident(B::float_matmul(Self::fetch(lhs), Self::fetch(rhs))),
        }
    }

    fn float_detach(tensor: FloatTensor<Self>) -> FloatTensor<Self> {
        match tensor {
            OffloadTensor::Resident(t) => Self::resident(B::float_detach(t)),
            offloaded => offloaded,
        }
    }

    fn float_set_require_grad(tensor: FloatTensor<Self>, require_grad: bool) -> FloatTensor<Self> {
        match tensor {
            OffloadTensor::Resident(t) => {
                Self::resident(B::float_set_require_grad(t, require_grad))
            }
            offloaded => offloaded,
        }
    }

    fn float_is_require_grad(tensor: &FloatTensor<Self>) -> bool {
        match tensor {
            OffloadTensor::Resident(t) => B::float_is_require_grad(t),
            OffloadTensor::Offloaded { .. } => false,
        }
    }

    fn float_cast(tensor: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        match tensor {
            OffloadTensor::Offloaded { .. } if tensor.dtype() == dtype.into() => tensor,
            other => Self::resident(B::float_cast(Self::fetch(other), dtype)),
        }
    }
}

impl<B: OffloadTarget> OffloadBackend<B> {
    /// `lhs @ rhs` with `rhs` in host memory: in place when the mode, the target's kernel and
    /// (in `Auto`) the device's calibration say so ([`Self::matmul_in_place`]); else copy +
    /// B's GEMM.
    pub(crate) fn matmul_host_rhs(
        lhs: FloatTensor<B>,
        host: &HostTensor,
        device: &B::Device,
    ) -> FloatTensor<B> {
        let dims = lhs.shape();
        let rows: usize = dims
            .iter()
            .take(dims.num_dims().saturating_sub(1))
            .product();
        let lhs = if Self::matmul_in_place(host, device, rows) {
            match B::host_matmul(lhs, host) {
                Ok(out) => {
                    record(|s| s.zero_copy_ops += 1);
                    return out;
                }
                Err(lhs) => lhs,
            }
        } else {
            lhs
        };
        B::float_matmul(lhs, Self::upload(host, device))
    }
}
