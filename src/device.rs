//! Placement as a device: [`OffloadDevice`] is `Device(d)` (the wrapped backend's memory) or
//! `Host(d)` (host memory that device `d` reads).

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, RwLock};

use burn_backend::{DeviceId, DeviceOps};

use crate::mode::{OffloadMode, effective_mode, effective_pin_memory};

/// Bit set in [`DeviceId::type_id`] for the `Host` placement of a device.
const HOST_TYPE_BIT: u16 = 0x4000;

/// Where a float tensor lives: in the wrapped backend's device memory, or in host memory that
/// the device reads (pinned and device-mapped on CUDA).
///
/// Both placements of one device compare **equal**: Burn's tensor API refuses binary ops whose
/// operands are on unequal devices, and an offloaded weight must meet a resident activation.
/// Use [`is_host`](Self::is_host) or [`same_placement`](Self::same_placement) to tell them
/// apart; their [`DeviceId`]s differ.
#[derive(Clone, Debug)]
pub enum OffloadDevice<D> {
    /// The wrapped backend's own memory on device `d`.
    Device(D),
    /// Host memory read by device `d`.
    Host(D),
}

impl<D> OffloadDevice<D> {
    /// The device placement of `d` (what a model is usually initialised on).
    pub fn device(d: D) -> Self {
        Self::Device(d)
    }

    /// The host placement of `d`.
    pub fn host(d: D) -> Self {
        Self::Host(d)
    }

    /// The compute device, whatever the placement.
    pub fn compute(&self) -> &D {
        match self {
            Self::Device(d) | Self::Host(d) => d,
        }
    }

    /// Whether this is the host placement.
    pub fn is_host(&self) -> bool {
        matches!(self, Self::Host(_))
    }
}

impl<D: Clone> OffloadDevice<D> {
    /// The host placement of the same compute device.
    pub fn to_host(&self) -> Self {
        Self::Host(self.compute().clone())
    }

    /// The device placement of the same compute device.
    pub fn to_resident(&self) -> Self {
        Self::Device(self.compute().clone())
    }
}

impl<D: PartialEq> OffloadDevice<D> {
    /// Same compute device *and* same placement.
    pub fn same_placement(&self, other: &Self) -> bool {
        self.is_host() == other.is_host() && self.compute() == other.compute()
    }
}

impl<D: PartialEq> PartialEq for OffloadDevice<D> {
    fn eq(&self, other: &Self) -> bool {
        self.compute() == other.compute()
    }
}

impl<D: Eq> Eq for OffloadDevice<D> {}

impl<D: Default> Default for OffloadDevice<D> {
    fn default() -> Self {
        Self::Device(D::default())
    }
}

impl<D: DeviceOps> burn_backend::Device for OffloadDevice<D> {
    fn from_id(id: DeviceId) -> Self {
        let inner = D::from_id(DeviceId::new(id.type_id & !HOST_TYPE_BIT, id.index_id));
        if id.type_id & HOST_TYPE_BIT != 0 {
            Self::Host(inner)
        } else {
            Self::Device(inner)
        }
    }

    fn to_id(&self) -> DeviceId {
        let id = self.compute().to_id();
        match self {
            Self::Device(_) => id,
            Self::Host(_) => DeviceId::new(id.type_id | HOST_TYPE_BIT, id.index_id),
        }
    }
}

impl<D: DeviceOps> DeviceOps for OffloadDevice<D> {}

/// How offloaded tensors of one compute device are read; set by
/// [`OffloadPolicy::apply`](crate::OffloadPolicy::apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The mode, after the environment overrides.
    pub mode: OffloadMode,
    /// Whether host memory for this device is pinned (where the target can pin).
    pub pin_memory: bool,
}

impl Default for DeviceConfig {
    /// `Auto` with pinning, after the environment overrides: what a device gets before any
    /// policy is applied to it.
    fn default() -> Self {
        Self {
            mode: effective_mode(OffloadMode::Auto),
            pin_memory: effective_pin_memory(true),
        }
    }
}

static CONFIGS: LazyLock<RwLock<HashMap<DeviceId, DeviceConfig>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

/// The configuration of compute device `device` (the default until a policy is applied).
pub fn device_config<D: DeviceOps>(device: &D) -> DeviceConfig {
    CONFIGS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&device.to_id())
        .copied()
        .unwrap_or_default()
}

/// Devices whose mode is `Prefetch`: when 0 (the usual case), uploads skip the config lookup.
static PREFETCH_DEVICES: AtomicUsize = AtomicUsize::new(0);

/// Sets the configuration of compute device `device`; the last one set wins.
///
/// A changed configuration drops the device's prefetcher (its prefetched copies, learned
/// order and thread; see [`crate::prefetch`]).
pub fn set_device_config<D: DeviceOps>(device: &D, config: DeviceConfig) {
    let id = device.to_id();
    let is_prefetch = |c: &DeviceConfig| matches!(c.mode, OffloadMode::Prefetch { .. });
    let old = {
        let mut configs = CONFIGS.write().unwrap_or_else(|e| e.into_inner());
        let old = configs.insert(id, config);
        if is_prefetch(&config) {
            PREFETCH_DEVICES.fetch_add(1, Ordering::AcqRel);
        }
        if old.as_ref().is_some_and(is_prefetch) {
            PREFETCH_DEVICES.fetch_sub(1, Ordering::AcqRel);
        }
        old
    };
    if old != Some(config) {
        crate::prefetch::forget_device(id);
    }
}

/// Devices on which the last policy applied found in-place reads switched off
/// ([`crate::mode::in_place_disabled`]).
static IN_PLACE_OFF: LazyLock<RwLock<HashSet<DeviceId>>> = LazyLock::new(Default::default);

/// Records whether in-place reads are switched off on compute device `device` (by `apply`,
/// from the environment).
pub(crate) fn set_in_place_off<D: DeviceOps>(device: &D, off: bool) {
    let mut devices = IN_PLACE_OFF.write().unwrap_or_else(|e| e.into_inner());
    if off {
        devices.insert(device.to_id());
    } else {
        devices.remove(&device.to_id());
    }
}

/// Whether the last policy applied to `device` found in-place reads switched off.
pub(crate) fn in_place_off<D: DeviceOps>(device: &D) -> bool {
    IN_PLACE_OFF
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&device.to_id())
}

/// Whether some device is in prefetch mode (one atomic load).
#[inline]
pub(crate) fn any_prefetch() -> bool {
    PREFETCH_DEVICES.load(Ordering::Acquire) > 0
}

thread_local! {
    static HOST_REDIRECT: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f` with every float tensor *creation* on this thread (from data, zeros, random, …)
/// that targets `Device(d)` placed on `Host(d)` instead.
///
/// This is how [`OffloadPolicy::apply`](crate::OffloadPolicy::apply) retargets a lazy
/// parameter without running its initialiser: the new initialiser runs the old one inside
/// this scope.
pub fn with_host_placement<R>(f: impl FnOnce() -> R) -> R {
    struct Guard;
    impl Drop for Guard {
        fn drop(&mut self) {
            HOST_REDIRECT.with(|c| c.set(c.get() - 1));
        }
    }
    HOST_REDIRECT.with(|c| c.set(c.get() + 1));
    let _guard = Guard;
    f()
}

/// Whether creations are currently redirected to host memory on this thread.
pub(crate) fn host_redirect_active() -> bool {
    HOST_REDIRECT.with(|c| c.get() > 0)
}
