mod global;
pub use global::*;

mod config;
pub use config::*;

mod api;
pub use api::*;

mod local;

#[cfg(test)]
mod tests;

/// burn-offload's patch of the multi-node barrier is applied (see `BURN_OFFLOAD_PATCH.md`):
/// burn-offload refers to this, so that a build with the unpatched crate fails to compile
/// instead of hanging at its second global all-reduce.
pub const BURN_OFFLOAD_SYNC_PATCH: u32 = 1;
