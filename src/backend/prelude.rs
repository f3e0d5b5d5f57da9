//! Names the generated delegations (`generated.rs`) refer to, imported by each op-trait file.

pub(crate) use burn_backend::{
    ExecutionError, Scalar, TensorData, TensorPrimitive,
    distribution::Distribution,
    ops::*,
    quantization::{QuantScheme, QuantizationParametersPrimitive},
    tensor::{BoolTensor, Device, FloatTensor, IndexingUpdateOp, IntTensor, QuantizedTensor},
};
pub(crate) use burn_std::{BoolDType, FloatDType, IntDType, Shape, Slice};
pub(crate) use std::ops::Range;

pub(crate) use super::convert::FromInner;
pub(crate) use super::{OffloadBackend, OffloadTensor};
pub(crate) use crate::device::OffloadDevice;
pub(crate) use crate::inner::OffloadTarget;
