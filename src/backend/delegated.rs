//! Op traits with nothing offload-specific: every method delegates to the inner backend.
//! Int and bool tensors are always the inner backend's own.

use super::generated::{
    delegate_activation_ops, delegate_bool_tensor_ops, delegate_int_tensor_ops,
};
use super::prelude::*;

impl<B: OffloadTarget> IntTensorOps<Self> for OffloadBackend<B> {
    delegate_int_tensor_ops!();
}

impl<B: OffloadTarget> BoolTensorOps<Self> for OffloadBackend<B> {
    delegate_bool_tensor_ops!();
}

impl<B: OffloadTarget> ActivationOps<Self> for OffloadBackend<B> {
    delegate_activation_ops!();
}
