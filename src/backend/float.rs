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
use super::tensor::{Offloaded, host_from_data, offload};
use crate::context::{
    OffloadContext, current_context, current_scope, host_redirect_active, placement_queried,
};
use crate::host::HostTensor;
use crate::plan::{OpKind, ReadPath};
use crate::recycle;
use crate::stats::record;

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
            OffloadTensor::Offloaded(host_from_data::<B>(data, d, current_context()))
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
            OffloadTensor::Offloaded(o) => match view(o.host()) {
                Some(host) => OffloadTensor::Offloaded(o.with_host(host)),
                None => {
                    let takes = crate::prefetch::ring_takes();
                    Self::resident(Self::unalias(op(Self::upload(&o)), takes))
                }
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

    /// Drawn by `B` on the device whatever the placement, so that a seed gives the same values
    /// (and leaves `B`'s generator in the same state) with and without a policy; a tensor for
    /// host memory is then copied out, one at a time.
    fn float_random(
        shape: Shape,
        distribution: Distribution,
        device: &Device<Self>,
        dtype: FloatDType,
    ) -> FloatTensor<Self> {
        let drawn = B::float_random(shape, distribution, device.compute(), dtype);
        if Self::creates_on_host(device) {
            let offloaded = offload::<B>(drawn, current_context());
            record(|s| s.host_created_bytes += offloaded.host().size_bytes() as u64);
            OffloadTensor::Offloaded(offloaded)
        } else {
            Self::created(drawn)
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
            OffloadTensor::Offloaded(o) if !o.host().is_quantized() => Ok(o.host().to_data()),
            // Dequantized on the device, as any read of it.
            OffloadTensor::Offloaded(o) => B::float_into_data(Self::upload(&o)).await,
        }
    }

    /// The compute device, `Device(d)`, for every tensor: code that takes its device from a
    /// parameter (a KV cache, a RoPE table, `Module::devices()`) creates in device memory
    /// whatever the parameter's placement. Only burn-offload's own placement queries
    /// ([`tensor_placement`](crate::tensor_placement), [`placements`](crate::placements)) see
    /// `Host(d)` for a tensor in host memory.
    fn float_device(tensor: &FloatTensor<Self>) -> Device<Self> {
        match tensor {
            OffloadTensor::Resident(t) => OffloadDevice::Device(B::float_device(t)),
            OffloadTensor::Offloaded(o) if placement_queried() => {
                OffloadDevice::Host(o.device().clone())
            }
            OffloadTensor::Offloaded(o) => OffloadDevice::Device(o.device().clone()),
        }
    }

    /// Moves never change placement (as a same-device move is a no-op in Burn's backends), so
    /// `Module::to_device(&Device(d))` keeps offloaded parameters offloaded; another compute
    /// device only changes who reads the host memory. Inside a placement scope (a policy's walk,
    /// [`to_device_memory`](crate::to_device_memory), [`keep_offloaded`](crate::keep_offloaded))
    /// `Host(d)` offloads (or gives an offloaded tensor the scope's context) and `Device(d)`
    /// brings into device memory.
    fn float_to_device(tensor: FloatTensor<Self>, device: &Device<Self>) -> FloatTensor<Self> {
        let bytes = (tensor.shape().num_elements() * tensor.dtype().size()) as u64;
        if crate::train::census::count(bytes, matches!(tensor, OffloadTensor::Offloaded(_))) {
            return tensor;
        }
        let target = device.compute();
        let moves = current_scope().filter(|s| s.moves);
        match tensor {
            OffloadTensor::Resident(t) => {
                let t = B::float_to_device(t, target);
                match moves {
                    Some(scope) if device.is_host() => {
                        let o = Self::offload_into_recycled(t, scope.context.clone());
                        scope.placed(o.host());
                        OffloadTensor::Offloaded(o)
                    }
                    _ => Self::resident(t),
                }
            }
            OffloadTensor::Offloaded(o) if recycle::is_donating() => {
                let device = o.device().clone();
                recycle::donate(o.host(), move |pool| B::settle_host_reads(&device, pool));
                OffloadTensor::Offloaded(o)
            }
            OffloadTensor::Offloaded(o) => match moves {
                Some(_) if !device.is_host() => {
                    record(|s| s.device_created_bytes += o.host().size_bytes() as u64);
                    Self::resident(B::upload(o.host(), target))
                }
                // Host memory is readable by any device of the target: the reader changes.
                Some(scope) => {
                    B::note_host_reader(o.host(), target);
                    scope.placed(o.host());
                    OffloadTensor::Offloaded(o.retag(target.clone(), scope.context))
                }
                None => {
                    B::note_host_reader(o.host(), target);
                    let context = o.context().clone();
                    OffloadTensor::Offloaded(o.retag(target.clone(), context))
                }
            },
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
        crate::mark::check_lost();
        match (lhs, rhs) {
            (OffloadTensor::Resident(lhs), OffloadTensor::Offloaded(rhs)) => {
                Self::resident(Self::matmul_host_rhs(lhs, &rhs))
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
            OffloadTensor::Offloaded(_) => false,
        }
    }

    fn float_cast(tensor: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        match tensor {
            OffloadTensor::Offloaded(_) if tensor.dtype() == dtype.into() => tensor,
            other => Self::resident(B::float_cast(Self::fetch(other), dtype)),
        }
    }
}

impl<B: OffloadTarget> OffloadBackend<B> {
    /// Moves a resident tensor into host memory of `context`: into a buffer an optimizer step
    /// gave back ([`crate::recycle`]) where one fits, else into a new one.
    fn offload_into_recycled(tensor: FloatTensor<B>, context: OffloadContext) -> Offloaded<B> {
        let device = B::float_device(&tensor);
        if let Some(mut host) = recycle::take(&tensor.shape().to_vec(), tensor.dtype()) {
            let buffer = host
                .buffer_mut()
                .expect("the pool hands out unshared buffers");
            B::download_into(tensor, buffer).unwrap_or_else(|e| panic!("{e}"));
            return Offloaded::new(host, device, context);
        }
        offload::<B>(tensor, context)
    }

    /// `lhs @ rhs` with `rhs` offloaded: in place where the planner says so and the target's
    /// kernel takes the shapes, else a (prefetched) copy + B's GEMM.
    pub(crate) fn matmul_host_rhs(lhs: FloatTensor<B>, rhs: &Offloaded<B>) -> FloatTensor<B> {
        let dims = lhs.shape();
        let rows: usize = dims
            .iter()
            .take(dims.num_dims().saturating_sub(1))
            .product();
        let lhs = match Self::read_path(rhs, OpKind::Matmul { rows }) {
            ReadPath::InPlace => match B::host_matmul(lhs, rhs.host()) {
                Ok(out) => {
                    let bytes = rhs.host().size_bytes() as u64;
                    record(|s| {
                        s.zero_copy_ops += 1;
                        s.zero_copy_bytes += bytes;
                    });
                    return out;
                }
                Err(lhs) => lhs,
            },
            ReadPath::Copy | ReadPath::PrefetchedCopy => lhs,
        };
        let rhs_copy = Self::upload(rhs);
        // A quantized weight has no broadcast view (see `linear`): give the copy lhs's rank.
        let (lhs_rank, rhs_dims) = (lhs.shape().num_dims(), rhs.host().dims());
        let rhs_copy = if rhs_dims.len() < lhs_rank {
            let mut dims = vec![1; lhs_rank - rhs_dims.len()];
            dims.extend_from_slice(rhs_dims);
            B::float_reshape(rhs_copy, Shape::from(dims))
        } else {
            rhs_copy
        };
        B::float_matmul(lhs, rhs_copy)
    }
}
