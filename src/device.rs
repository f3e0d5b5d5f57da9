//! Placement as a device: [`OffloadDevice`] is `Device(d)` (the wrapped backend's memory) or
//! `Host(d)` (host memory that device `d` reads).

use burn_backend::{DeviceId, DeviceOps};

/// Where a float tensor lives: in the wrapped backend's device memory, or in host memory that
/// the device reads (pinned and device-mapped on CUDA).
///
/// Both placements of one device compare **equal**: Burn's tensor API refuses binary ops whose
/// operands are on unequal devices, and an offloaded weight must meet a resident activation.
/// Use [`is_host`](Self::is_host) or [`same_placement`](Self::same_placement) to tell them
/// apart. Their [`DeviceId`]s are equal too, so Burn's per-device settings (default dtypes)
/// hold for both placements of a device.
///
/// A move with Burn's `to_device` never changes placement (as a same-device move is a no-op
/// in Burn's backends): `Module::to_device(&Device(d))` after loading keeps the offloaded
/// parameters offloaded. Placement changes only through
/// [`OffloadPolicy::apply`](crate::OffloadPolicy::apply),
/// [`to_device_memory`](crate::to_device_memory) and [`keep_offloaded`](crate::keep_offloaded).
/// [`placements`](crate::placements) lists where each parameter of a module lives.
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

/// Both placements of a device have the compute device's id (Burn keys its per-device settings
/// by id); an id names the `Device` placement.
impl<D: DeviceOps> burn_backend::Device for OffloadDevice<D> {
    fn from_id(id: DeviceId) -> Self {
        Self::Device(D::from_id(id))
    }

    fn to_id(&self) -> DeviceId {
        self.compute().to_id()
    }
}

impl<D: DeviceOps> DeviceOps for OffloadDevice<D> {}
