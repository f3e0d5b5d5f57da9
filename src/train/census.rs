//! Counting the float tensors of a value that only exposes `to_device` (an optimizer's state,
//! whose type is the optimizer's own): inside [`census`], `float_to_device` returns each tensor
//! unchanged and adds its bytes to the count of its placement.

use std::cell::RefCell;

/// Bytes of float tensors by placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bytes {
    /// In device memory.
    pub device: u64,
    /// In host memory.
    pub host: u64,
}

impl Bytes {
    /// Both placements together.
    pub fn total(&self) -> u64 {
        self.device + self.host
    }
}

impl std::ops::AddAssign for Bytes {
    fn add_assign(&mut self, other: Self) {
        self.device += other.device;
        self.host += other.host;
    }
}

thread_local! {
    static CENSUS: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Runs `f` (which moves tensors with `to_device`) as a census: no tensor moves, and the
/// bytes of every float tensor `f` moves are counted by placement.
pub(crate) fn census(f: impl FnOnce()) -> Bytes {
    struct Guard(Option<Bytes>);
    impl Drop for Guard {
        fn drop(&mut self) {
            let previous = self.0.take();
            CENSUS.with(|c| *c.borrow_mut() = previous);
        }
    }
    let mut guard = Guard(CENSUS.with(|c| c.borrow_mut().replace(Bytes::default())));
    f();
    let counted = CENSUS.with(|c| c.borrow().unwrap_or_default());
    // The guard restores the outer census (if any) and it gets this one's counts too.
    if let Some(outer) = guard.0.as_mut() {
        *outer += counted;
    }
    counted
}

/// Counts a tensor of `bytes` in host memory (`host`) or device memory, if a census runs on
/// this thread; true if it does (the tensor must then not move).
pub(crate) fn count(bytes: u64, host: bool) -> bool {
    CENSUS.with(|c| match c.borrow_mut().as_mut() {
        Some(b) => {
            if host {
                b.host += bytes;
            } else {
                b.device += bytes;
            }
            true
        }
        None => false,
    })
}
