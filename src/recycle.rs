//! Host buffers given back by an optimizer step, so that the updated parameters are written
//! into them instead of into new (pinned) allocations.
//!
//! [`OffloadOptimizer`](crate::OffloadOptimizer) runs the step in [`recycling`]: before it, the offloaded parameters' old values are kept
//! (O(1) clones); after it, [`donate`] hands their host views to this thread's pool, and moving
//! an updated (resident) parameter back to host memory takes a pooled buffer of the same shape
//! and dtype where no one else holds it ([`take`]), writing the new values into it. A buffer
//! that another tensor, view or prefetched order still refers to is never written: its owner
//! would see the values change (`Arc::get_mut` decides), and a new buffer is allocated.
//!
//! Before the first buffer is taken, the target settles the pool once
//! ([`OffloadTarget::settle_host_reads`](crate::inner::OffloadTarget::settle_host_reads)): on
//! CUDA it lets CubeCL's drop queue release the upload sources it holds (references to these
//! buffers) and waits until no device work can still read them in place, as freeing them would.

use std::cell::{Cell, RefCell};

use crate::host::HostTensor;

/// How the target settles the pool before its buffers are rewritten (see the module docs).
type Settle = Box<dyn FnOnce(&[HostTensor])>;

/// The buffers given back, and how to settle them (set by the first donation).
#[derive(Default)]
struct Pool {
    hosts: Vec<HostTensor>,
    settle: Option<Settle>,
}

thread_local! {
    static POOL: RefCell<Option<Pool>> = const { RefCell::new(None) };
    static DONATING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with a pool of recyclable host buffers on this thread (dropped afterwards, with
/// whatever was not reused).
pub(crate) fn recycling<R>(f: impl FnOnce() -> R) -> R {
    struct Guard(Option<Pool>);
    impl Drop for Guard {
        fn drop(&mut self) {
            let previous = self.0.take();
            POOL.with(|p| *p.borrow_mut() = previous);
        }
    }
    let previous = POOL.with(|p| p.borrow_mut().replace(Pool::default()));
    let _guard = Guard(previous);
    f()
}

/// Runs `f`, in which moves of offloaded tensors (`to_device`) give their host views to the
/// pool instead of moving (see [`is_donating`]).
pub(crate) fn donating<R>(f: impl FnOnce() -> R) -> R {
    struct Guard;
    impl Drop for Guard {
        fn drop(&mut self) {
            DONATING.with(|d| d.set(false));
        }
    }
    DONATING.with(|d| d.set(true));
    let _guard = Guard;
    f()
}

/// Whether `to_device` of an offloaded tensor should [`donate`] it now.
pub(crate) fn is_donating() -> bool {
    DONATING.with(Cell::get)
}

/// Adds `host` to this thread's pool, if there is one; `settle` is how its target settles the
/// pool (the first donation's is kept).
pub(crate) fn donate(host: &HostTensor, settle: impl FnOnce(&[HostTensor]) + 'static) {
    POOL.with(|p| {
        if let Some(pool) = p.borrow_mut().as_mut() {
            pool.hosts.push(host.clone());
            if pool.settle.is_none() {
                pool.settle = Some(Box::new(settle));
            }
        }
    });
}

/// A pooled host tensor of `dims` and `dtype` that covers its whole buffer and that nothing
/// else refers to (so it may be written), removed from the pool.
pub(crate) fn take(dims: &[usize], dtype: burn_backend::DType) -> Option<HostTensor> {
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        let pool = pool.as_mut()?;
        if let Some(settle) = pool.settle.take() {
            settle(&pool.hosts);
        }
        let found = pool.hosts.iter_mut().position(|h| {
            h.dims() == dims && h.dtype() == dtype && h.is_whole_buffer() && h.is_unshared()
        })?;
        Some(pool.hosts.swap_remove(found))
    })
}
