//! The wgpu target (feature `wgpu`: Vulkan, Metal, DX12; in CI Mesa's lavapipe, Vulkan on the
//! CPU): `OffloadBackend<burn::backend::Wgpu>` (fused) and `OffloadBackend<CubeBackend<
//! WgpuRuntime, …>>` (unfused), with the generic CubeCL target's defaults: pageable host
//! memory, uploads by `Queue::write_buffer`, no in-place reads (wgpu cannot map host memory
//! for the device: `uva` falls back to copies, and the report says so), and no free-memory
//! query. Every CubeCL stream shares one wgpu queue, so a prefetch thread's copies do not
//! overlap the op thread's kernels on the device; they still overlap its host-side work.

use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

use std::sync::Arc;

use super::ring::{CubeRing, CubeclCopyStreams};
use super::{OffloadRuntime, calibrate};
use crate::auto::Calibration;
use crate::copy::{CopyError, RingShape};
use crate::error::OffloadError;
use crate::inner::TargetDevice;

impl OffloadRuntime for WgpuRuntime {
    const NAME: &'static str = "wgpu";

    /// [`CubeclCopyStreams`]: CubeCL writes into the ring, flags on the host.
    fn copy_streams(
        device: &WgpuDevice,
        shape: RingShape,
    ) -> Option<Result<Arc<dyn CubeRing<Self>>, CopyError>> {
        Some(
            CubeclCopyStreams::<Self>::new(device, shape.capacity, shape.slots, shape.consumers)
                .map(|s| Arc::new(s) as Arc<dyn CubeRing<Self>>),
        )
    }
}

impl TargetDevice for WgpuDevice {
    /// Measured with `CubeBackend<WgpuRuntime, f32, i32, u32>` (burn-wgpu's bool element).
    /// Copies and kernels share one queue, so `Auto` does not prefetch here.
    fn calibrate(&self, pin: bool) -> Result<Calibration, OffloadError> {
        calibrate::<WgpuRuntime, u32>(self, pin)
    }

    /// The graphics API (`wgpu<wgsl>` on Vulkan, …) and the adapter's hardware properties as
    /// CubeCL's client reports them (plane sizes, workgroup and shared-memory limits: they
    /// tell lavapipe from a GPU, and most GPUs apart). Starts the device's client, as
    /// `calibrate` and any op would.
    fn fingerprint(&self) -> String {
        let client = <WgpuRuntime as cubecl::Runtime>::client(self);
        format!(
            "{} ({:?}): {:?}",
            <WgpuRuntime as cubecl::Runtime>::name(&client),
            client.info(),
            client.properties().hardware
        )
    }
}

/// Where the Vulkan loader looks for drivers on Linux (the ICD manifests a driver package
/// installs, e.g. Mesa's `lvp_icd.*.json` for lavapipe).
const ICD_DIRS: [&str; 4] = [
    "/usr/share/vulkan/icd.d",
    "/etc/vulkan/icd.d",
    "/usr/local/share/vulkan/icd.d",
    "/usr/local/etc/vulkan/icd.d",
];

/// Whether wgpu can find an adapter here, without starting it (CubeCL's wgpu server panics
/// when there is none): on Linux, a Vulkan driver manifest must exist (set by
/// `VK_ICD_FILENAMES`/`VK_DRIVER_FILES` or installed in the loader's directories); elsewhere
/// the platform's API (Metal, DX12) is assumed. Tests and examples use it to skip, or to say
/// what to install, instead of panicking.
pub fn probe() -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let env_set = ["VK_ICD_FILENAMES", "VK_DRIVER_FILES"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    let installed = ICD_DIRS.iter().any(|dir| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "json"))
        })
    });
    if env_set || installed {
        Ok(())
    } else {
        Err("no Vulkan driver found (no ICD manifest in /usr/share/vulkan/icd.d or /etc/vulkan/icd.d); \
             install one, e.g. `apt-get install mesa-vulkan-drivers` for lavapipe on the CPU"
            .into())
    }
}
