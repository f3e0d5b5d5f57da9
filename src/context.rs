//! [`OffloadContext`]: how one model's offloaded tensors are read.
//!
//! [`OffloadPolicy::apply`](crate::OffloadPolicy::apply) creates one context per application:
//! the mode and pinning after the environment overrides, the calibration `Auto` decides from,
//! `Auto`'s prefetch lookahead, and the model's own prefetchers with their statistics. Every
//! tensor it offloads carries the context (an `Arc`), so ops read the mode from their operand,
//! not from the device: two models on one device can run in different modes, each
//! prefetch-mode model learns its own read order, and dropping one model (its last tensor)
//! ends its prefetch threads without touching the other's.
//!
//! Tensors created in host memory outside any policy (on `OffloadDevice::Host(d)`, e.g. a
//! record loaded there) belong to the context of the innermost [`OffloadContext::run`] scope
//! on the thread, or else to the process's default context (`Auto` without a calibration,
//! which reads in place up to the target's static row threshold and never prefetches).

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

use burn_backend::{DeviceId, DeviceOps};

use crate::auto::Calibration;
use crate::mode::{
    OffloadMode, PrefetchCopies, effective_mode, effective_pin_memory, effective_prefetch_copies,
    in_place_disabled,
};
use crate::stats::{PrefetchCounters, PrefetchStats};

/// What a context was configured with (after the environment overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextConfig {
    /// The mode ([`ENV_DISABLE_UVA`](crate::mode::ENV_DISABLE_UVA) turns `Uva` and `Auto`
    /// into `Copy`).
    pub mode: OffloadMode,
    /// Whether host memory is pinned where the target can pin
    /// ([`ENV_DISABLE_PIN_MEMORY`](crate::mode::ENV_DISABLE_PIN_MEMORY) turns it off).
    pub pin_memory: bool,
    /// Whether [`ENV_DISABLE_UVA`](crate::mode::ENV_DISABLE_UVA) switched reading host memory
    /// in place off (what keeps `Prefetch` from gathering embedding rows in place).
    pub in_place_off: bool,
}

impl ContextConfig {
    /// `mode` and `pin_memory` after the environment overrides (read now).
    pub fn new(mode: OffloadMode, pin_memory: bool) -> Self {
        Self {
            mode: effective_mode(mode),
            pin_memory: effective_pin_memory(pin_memory),
            in_place_off: in_place_disabled(),
        }
    }
}

/// A prefetcher of some wrapped backend type, as the context needs to see it.
pub(crate) trait AnyPrefetcher: Send + Sync {
    /// Drops its copies and learned order and ends its thread.
    fn shutdown(&self);
    /// The typed prefetcher, for a downcast.
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

struct Inner {
    id: u64,
    config: ContextConfig,
    /// The calibration `Auto` decides from, per compute device (set by `apply`).
    calibrations: RwLock<HashMap<DeviceId, Arc<Calibration>>>,
    /// `Auto`'s prefetch lookahead where its copies are prefetched: the default, or twice the
    /// largest tensor `apply` offloaded, whichever is larger.
    auto_lookahead: AtomicU64,
    /// The prefetchers of this context, by wrapped backend type and compute device.
    prefetchers: Mutex<HashMap<(TypeId, DeviceId), Arc<dyn AnyPrefetcher>>>,
    stats: Arc<PrefetchCounters>,
    /// Paths of parameters that lost their host placement ([`crate::mark`]), in report order.
    lost: Mutex<Vec<String>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let prefetchers = std::mem::take(
            self.prefetchers
                .get_mut()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for p in prefetchers.into_values() {
            p.shutdown();
        }
    }
}

/// How one model's offloaded tensors are read: its mode, pinning, calibration and
/// prefetchers (see the [module docs](self)). Cloning is O(1); the context lives as long as
/// the last tensor (or report) that holds it.
#[derive(Clone)]
pub struct OffloadContext {
    inner: Arc<Inner>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl OffloadContext {
    /// A new context with `config`.
    pub fn new(config: ContextConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                config,
                calibrations: RwLock::new(HashMap::new()),
                auto_lookahead: AtomicU64::new(crate::mode::DEFAULT_PREFETCH_LOOKAHEAD_BYTES),
                prefetchers: Mutex::new(HashMap::new()),
                stats: Arc::new(PrefetchCounters::default()),
                lost: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A new context in `mode`, pinning host memory (after the environment overrides).
    pub fn with_mode(mode: OffloadMode) -> Self {
        Self::new(ContextConfig::new(mode, true))
    }

    /// The process's default context: what tensors created in host memory outside a policy and
    /// outside any [`run`](Self::run) scope belong to. `Auto` (after the environment
    /// overrides, read when it is first used) without a calibration.
    ///
    /// A process-wide value because such tensors have no model to take one from.
    pub fn default_context() -> Self {
        static DEFAULT: LazyLock<OffloadContext> =
            LazyLock::new(|| OffloadContext::new(ContextConfig::new(OffloadMode::Auto, true)));
        DEFAULT.clone()
    }

    /// A number that identifies this context in logs and `Debug` output.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The configuration.
    pub fn config(&self) -> ContextConfig {
        self.inner.config
    }

    /// The mode ops read offloaded tensors of this context with.
    pub fn mode(&self) -> OffloadMode {
        self.inner.config.mode
    }

    /// Whether host memory of this context is pinned where the target can.
    pub fn pin_memory(&self) -> bool {
        self.inner.config.pin_memory
    }

    /// The calibration `Auto` decides from on `device`, if it has one.
    pub fn calibration<D: DeviceOps>(&self, device: &D) -> Option<Arc<Calibration>> {
        self.inner
            .calibrations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&device.to_id())
            .cloned()
    }

    /// Installs the calibration `Auto` decides from on `device` (`apply` installs the
    /// device's measured one).
    pub fn set_calibration<D: DeviceOps>(&self, device: &D, calibration: Arc<Calibration>) {
        self.inner
            .calibrations
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device.to_id(), calibration);
    }

    /// Raises `Auto`'s lookahead to twice `largest` (the largest tensor offloaded), if that is
    /// above the default.
    pub(crate) fn fit_auto_lookahead(&self, largest: u64) {
        self.inner
            .auto_lookahead
            .fetch_max(largest.saturating_mul(2), Ordering::AcqRel);
    }

    /// The lookahead this context prefetches `device`'s copies with, if it does: `Prefetch`'s
    /// own, or `Auto`'s where the device's calibration says copies overlap compute.
    pub fn prefetch_lookahead<D: DeviceOps>(&self, device: &D) -> Option<u64> {
        self.prefetch_copies(device).map(|(lookahead, _)| lookahead)
    }

    /// [`prefetch_lookahead`](Self::prefetch_lookahead) with what makes the copies: the mode's
    /// [`PrefetchCopies`] (`Auto`'s is CubeCL's), after [`ENV_PREFETCH_ENGINE`](crate::mode::ENV_PREFETCH_ENGINE).
    pub fn prefetch_copies<D: DeviceOps>(&self, device: &D) -> Option<(u64, PrefetchCopies)> {
        let (lookahead, copies) = match self.mode() {
            OffloadMode::Prefetch {
                lookahead_bytes,
                copies,
            } => (lookahead_bytes, copies),
            OffloadMode::Auto => self
                .calibration(device)
                .filter(|c| c.copies_overlap_compute)
                .map(|_| {
                    (
                        self.inner.auto_lookahead.load(Ordering::Acquire),
                        PrefetchCopies::CubeCl,
                    )
                })?,
            OffloadMode::Uva | OffloadMode::Copy => return None,
        };
        Some((lookahead, effective_prefetch_copies(copies)))
    }

    /// The parameters of this model that a policy put in host memory and that are in device
    /// memory now (an optimizer step or a `Module::map` replaced them), as reported (and
    /// logged once, with the fix) by the first forward op after it happened. Placing them in
    /// host memory again ([`keep_offloaded`](crate::keep_offloaded), a policy) clears them.
    pub fn lost_placements(&self) -> Vec<String> {
        self.inner
            .lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn note_lost_placement(&self, path: String) {
        let mut lost = self.inner.lost.lock().unwrap_or_else(|e| e.into_inner());
        if !lost.contains(&path) {
            lost.push(path);
        }
    }

    pub(crate) fn clear_lost_placement(&self, path: &str) {
        self.inner
            .lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != path);
    }

    /// This context's prefetch statistics (all its devices).
    pub fn prefetch_stats(&self) -> PrefetchStats {
        self.inner.stats.snapshot()
    }

    /// Resets this context's prefetch counters (see [`PrefetchStats`]).
    pub fn reset_prefetch_stats(&self) {
        self.inner.stats.reset()
    }

    pub(crate) fn counters(&self) -> &Arc<PrefetchCounters> {
        &self.inner.stats
    }

    /// The prefetcher of wrapped backend `T` on `device`, made by `make` if there is none.
    pub(crate) fn prefetcher<P: AnyPrefetcher + 'static>(
        &self,
        backend: TypeId,
        device: DeviceId,
        make: impl FnOnce() -> Arc<P>,
    ) -> Arc<P> {
        let mut prefetchers = self
            .inner
            .prefetchers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(p) = prefetchers.get(&(backend, device))
            && let Ok(typed) = p.clone().as_any().downcast::<P>()
        {
            return typed;
        }
        let made = make();
        prefetchers.insert((backend, device), made.clone());
        made
    }

    /// A reference that does not keep the context alive.
    pub(crate) fn downgrade(&self) -> WeakContext {
        WeakContext(Arc::downgrade(&self.inner))
    }

    /// Whether `self` and `other` are the same context.
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Runs `f` with this context as the thread's current one: float tensors created in host
    /// memory inside (on `OffloadDevice::Host(d)`) belong to it.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        with_scope(
            Scope {
                context: self.clone(),
                redirect_creations: false,
                moves: false,
                mark: None,
            },
            f,
        )
    }
}

/// An [`OffloadContext`] that may have been dropped.
#[derive(Clone)]
pub(crate) struct WeakContext(std::sync::Weak<Inner>);

impl WeakContext {
    /// The context, if something still holds it.
    pub(crate) fn upgrade(&self) -> Option<OffloadContext> {
        self.0.upgrade().map(|inner| OffloadContext { inner })
    }
}

impl std::fmt::Debug for OffloadContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffloadContext")
            .field("id", &self.inner.id)
            .field("mode", &self.inner.config.mode)
            .field("pin_memory", &self.inner.config.pin_memory)
            .finish()
    }
}

impl PartialEq for OffloadContext {
    fn eq(&self, other: &Self) -> bool {
        self.same(other)
    }
}

/// What a scope on the thread changes.
#[derive(Clone)]
pub(crate) struct Scope {
    /// The context host tensors created or moved inside belong to.
    pub context: OffloadContext,
    /// Float tensor creations on `Device(d)` go to host memory instead (a retargeted lazy
    /// parameter's initialiser).
    pub redirect_creations: bool,
    /// `to_device` changes placement: `Host(d)` offloads (or re-tags an offloaded tensor with
    /// this context), `Device(d)` brings into device memory. Outside such a scope a move never
    /// changes placement (Burn's own `to_device` calls keep offloaded tensors offloaded).
    pub moves: bool,
    /// The mark of the parameter being placed: a host value placed inside carries it.
    pub mark: Option<Arc<crate::mark::ParamMark>>,
}

impl Scope {
    /// `host` is placed inside this scope: it carries the scope's mark, if there is one.
    pub(crate) fn placed(&self, host: &crate::host::HostTensor) {
        if let Some(mark) = &self.mark {
            mark.placed(host);
        }
    }
}

thread_local! {
    static SCOPES: RefCell<Vec<Scope>> = const { RefCell::new(Vec::new()) };
    static PLACEMENT_QUERY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with `Tensor::device()` naming the placement: `Host(d)` for a tensor in host
/// memory. Everywhere else a tensor's device is its compute device, `Device(d)`, whatever its
/// placement, so that code taking its device from a parameter creates in device memory.
pub(crate) fn querying_placement<R>(f: impl FnOnce() -> R) -> R {
    struct Guard(bool);
    impl Drop for Guard {
        fn drop(&mut self) {
            PLACEMENT_QUERY.with(|q| q.set(self.0));
        }
    }
    let _guard = Guard(PLACEMENT_QUERY.with(|q| q.replace(true)));
    f()
}

/// Whether [`querying_placement`] is active on this thread.
pub(crate) fn placement_queried() -> bool {
    PLACEMENT_QUERY.with(Cell::get)
}

/// Runs `f` inside `scope` on this thread.
pub(crate) fn with_scope<R>(scope: Scope, f: impl FnOnce() -> R) -> R {
    struct Guard;
    impl Drop for Guard {
        fn drop(&mut self) {
            SCOPES.with(|s| s.borrow_mut().pop());
        }
    }
    SCOPES.with(|s| s.borrow_mut().push(scope));
    let _guard = Guard;
    f()
}

/// The innermost scope on this thread, if any.
pub(crate) fn current_scope() -> Option<Scope> {
    SCOPES.with(|s| s.borrow().last().cloned())
}

/// The context host tensors created now belong to: the innermost scope's, else the default.
pub(crate) fn current_context() -> OffloadContext {
    current_scope()
        .map(|s| s.context)
        .unwrap_or_else(OffloadContext::default_context)
}

/// Whether creations on `Device(d)` are redirected to host memory on this thread.
pub(crate) fn host_redirect_active() -> bool {
    current_scope().is_some_and(|s| s.redirect_creations)
}

/// Runs `f` with every float tensor *creation* on this thread (from data, zeros, random, …)
/// that targets `Device(d)` placed on `Host(d)` instead, in the current context.
///
/// This is how [`OffloadPolicy::apply`](crate::OffloadPolicy::apply) retargets a lazy
/// parameter without running its initialiser: the new initialiser runs the old one inside
/// this scope (with the policy's context).
pub fn with_host_placement<R>(f: impl FnOnce() -> R) -> R {
    with_scope(
        Scope {
            context: current_context(),
            redirect_creations: true,
            moves: false,
            mark: None,
        },
        f,
    )
}
