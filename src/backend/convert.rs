//! Conversions of the inner backend's result structs into the decorator's.

use burn_backend::ops::{
    DeformConv2dBackward, MaxPool1dBackward, MaxPool1dWithIndices, MaxPool2dBackward,
    MaxPool2dWithIndices,
};

use super::OffloadBackend;
use crate::inner::OffloadTarget;

/// Converts a result of the inner backend `B` into the same result of `OffloadBackend<B>`
/// (float tensors become resident tensors; the rest is unchanged).
pub(crate) trait FromInner<T> {
    fn from_inner(inner: T) -> Self;
}

/// Implements [`FromInner`] for a struct by converting its float fields.
macro_rules! from_inner_struct {
    ($name:ident { $($float:ident),* } { $($opt:ident),* } { $($other:ident),* }) => {
        impl<B: OffloadTarget> FromInner<$name<B>> for $name<OffloadBackend<B>> {
            fn from_inner(inner: $name<B>) -> Self {
                Self {
                    $($float: OffloadBackend::<B>::resident(inner.$float),)*
                    $($opt: inner.$opt.map(OffloadBackend::<B>::resident),)*
                    $($other: inner.$other,)*
                }
            }
        }
    };
}

from_inner_struct!(MaxPool1dWithIndices { output } {} { indices });
from_inner_struct!(MaxPool2dWithIndices { output } {} { indices });
from_inner_struct!(MaxPool1dBackward { x_grad } {} {});
from_inner_struct!(MaxPool2dBackward { x_grad } {} {});
from_inner_struct!(DeformConv2dBackward { x_grad, offset_grad, weight_grad } { mask_grad, bias_grad } {});
