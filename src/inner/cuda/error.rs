//! [`CudaError`]: what can go wrong in the CUDA layer, each with what to check.

use thiserror::Error;

/// Errors of the CUDA layer ([`crate::cuda`]).
///
/// Errors from work that CubeCL runs asynchronously (a kernel launch, a DMA upload) surface on
/// the next synchronising call of the same stream ([`crate::cuda::sync`], a read of a
/// tensor), as [`CudaError::Server`].
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CudaError {
    /// No usable CUDA driver: `libcuda.so` is missing, `cuInit` failed, or there is no device.
    #[error(
        "no usable CUDA driver: {reason}; install the NVIDIA driver (libcuda.so.1) and run on a machine with a GPU"
    )]
    NoDriver {
        /// Why the driver is not usable.
        reason: String,
    },
    /// The device ordinal does not exist.
    #[error("CUDA device {ordinal} does not exist ({count} device(s) present)")]
    InvalidDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// A CUDA driver call returned an error.
    #[error("CUDA driver call {call} failed: {message}")]
    Driver {
        /// The driver function, e.g. `cuMemHostAlloc`.
        call: &'static str,
        /// The driver's error name and description.
        message: String,
    },
    /// The device lacks a capability this operation needs.
    #[error("CUDA device {ordinal} is not supported here: {reason}")]
    Unsupported {
        /// The device ordinal.
        ordinal: usize,
        /// What is missing.
        reason: String,
    },
    /// An argument does not fit the operation (e.g. a range outside a buffer).
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// CubeCL's compute server reported an error (compilation, launch, copy or sync).
    #[error("CubeCL CUDA server error: {reason}")]
    Server {
        /// The server's message.
        reason: String,
    },
}

impl CudaError {
    /// Wraps a driver error returned by `call`.
    pub(crate) fn driver(call: &'static str, error: cudarc::driver::DriverError) -> Self {
        // `DriverError`'s `Debug` asks the driver for the error name and string.
        Self::Driver {
            call,
            message: format!("{error:?}"),
        }
    }

    /// Wraps an error of CubeCL's compute server.
    pub fn server(error: impl std::fmt::Display) -> Self {
        Self::Server {
            reason: error.to_string(),
        }
    }

    /// Whether this error means "no CUDA here" (as opposed to a failure on a working GPU):
    /// tests and benches skip on it.
    pub fn is_no_driver(&self) -> bool {
        matches!(self, Self::NoDriver { .. })
    }
}
