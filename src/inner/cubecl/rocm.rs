//! The ROCm/HIP target (feature `rocm`): `OffloadBackend<burn::backend::Rocm>` (fused) and the
//! unfused `CubeBackend<HipRuntime, …>`, with the generic CubeCL target's defaults: pageable
//! host memory, uploads by `hipMemcpyHtoDAsync` from it, no in-place reads (`uva` falls back
//! to copies) and no free-memory query. Compiled in CI; never run (no AMD GPU here).

use cubecl::hip::{AmdDevice, HipRuntime};

use super::{OffloadRuntime, calibrate};
use crate::auto::Calibration;
use crate::error::OffloadError;
use crate::inner::TargetDevice;

impl OffloadRuntime for HipRuntime {
    const NAME: &'static str = "rocm";
    /// HIP streams, like CUDA's, have copy engines beside the compute units.
    const COPIES_OVERLAP_COMPUTE: bool = true;
}

impl TargetDevice for AmdDevice {
    /// Measured with `CubeBackend<HipRuntime, f32, i32, u8>` (burn-rocm's default elements).
    fn calibrate(&self, pin: bool) -> Result<Calibration, OffloadError> {
        calibrate::<HipRuntime, u8>(self, pin)
    }

    /// The runtime's name and the GPU's hardware properties as CubeCL's client reports them
    /// (compute units, plane sizes, shared-memory limits). Starts the device's client, as
    /// `calibrate` and any op would.
    fn fingerprint(&self) -> String {
        let client = <HipRuntime as cubecl::Runtime>::client(self);
        format!(
            "{}: {:?}",
            <HipRuntime as cubecl::Runtime>::name(&client),
            client.properties().hardware
        )
    }
}
