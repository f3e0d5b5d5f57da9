//! Placement marks: what a parameter that a policy put in host memory carries, so that its
//! placement survives a record load and a lost placement is reported.
//!
//! [`OffloadPolicy::apply`](crate::OffloadPolicy::apply) gives every parameter it offloads a
//! [`ParamMark`] inside the parameter's load mapper (Burn keeps a parameter's mappers through
//! optimizer steps, `Module::map`, clones and loads, so the mark lives exactly as long as the
//! parameter, in whatever model holds it):
//!
//! - **Loads keep placement.** `Module::load_record` and burn-store's appliers run the load
//!   mapper on the loaded tensor: the mark puts it in host memory of the model's context.
//! - **A lost placement is reported.** A host buffer that is a marked parameter's value holds
//!   the mark's `(mark, generation)`. When the buffer is freed while its mark is still alive
//!   and no newer value was placed (Burn's optimizers compute each new parameter in device
//!   memory, a user's `Module::map` may too), the parameter is in device memory now. The next
//!   forward op (a matmul, linear, embedding or convolution, of any model) logs one warning
//!   naming every such parameter and the fix, and the model's context lists them
//!   ([`OffloadContext::lost_placements`](crate::OffloadContext::lost_placements)). A model
//!   that was dropped drops its marks with it, so freeing its buffers reports nothing.
//!
//! Freed buffers are queued process-wide: an op on device tensors cannot name the model it
//! belongs to, so the forward op that reports is any model's (see README's list of globals).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::context::{OffloadContext, WeakContext};
use crate::host::HostTensor;

/// The log target of the lost-placement warning (as [`crate::policy::WARNINGS_LOG_TARGET`]).
pub const LOST_PLACEMENT_LOG_TARGET: &str = "burn_offload::lost_placement";

/// What one offloaded parameter carries (see the [module docs](self)).
pub(crate) struct ParamMark {
    path: String,
    state: Mutex<MarkState>,
}

struct MarkState {
    /// Whether the parameter should be in host memory.
    host: bool,
    /// The context its host values belong to.
    context: WeakContext,
    /// Bumped for every host value placed; a freed buffer of an older one is not a loss.
    generation: u64,
    /// Reported once per loss.
    reported: bool,
    /// The scheme a policy quantizes the parameter into (loads are quantized into it).
    quantize: Option<burn_std::quantization::QuantScheme>,
}

/// What a host buffer holds while it is a marked parameter's value.
pub(crate) struct BufferMark {
    mark: Weak<ParamMark>,
    generation: u64,
}

impl ParamMark {
    /// A mark for the parameter at `path`, to live in host memory of `context`.
    pub(crate) fn new(path: String, context: &OffloadContext) -> Arc<Self> {
        Arc::new(Self {
            path,
            state: Mutex::new(MarkState {
                host: true,
                context: context.downgrade(),
                generation: 0,
                reported: false,
                quantize: None,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MarkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The parameter's path.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The scheme loads are quantized into, if any.
    pub(crate) fn quantize(&self) -> Option<burn_std::quantization::QuantScheme> {
        self.state().quantize
    }

    /// Loads are quantized into `scheme` from now on (`None`: kept as loaded).
    pub(crate) fn set_quantize(&self, scheme: Option<burn_std::quantization::QuantScheme>) {
        self.state().quantize = scheme;
    }

    /// From now on the parameter belongs in host memory of `context`.
    pub(crate) fn to_host(&self, context: &OffloadContext) {
        let mut state = self.state();
        state.host = true;
        state.context = context.downgrade();
    }

    /// From now on the parameter belongs in device memory (`to_device_memory`, a policy that
    /// no longer selects it): freeing its host value is no loss.
    pub(crate) fn to_device(&self) {
        self.state().host = false;
    }

    /// The context a loaded value goes to, if the parameter belongs in host memory and the
    /// context is still alive.
    pub(crate) fn host_context(&self) -> Option<OffloadContext> {
        let state = self.state();
        if state.host {
            state.context.upgrade()
        } else {
            None
        }
    }

    /// `host` is the parameter's value now: its buffer carries this mark.
    pub(crate) fn placed(self: &Arc<Self>, host: &HostTensor) {
        let (generation, context) = {
            let mut state = self.state();
            state.generation += 1;
            state.reported = false;
            (state.generation, state.context.upgrade())
        };
        if let Some(context) = context {
            context.clear_lost_placement(&self.path);
        }
        host.buffer().set_mark(BufferMark {
            mark: Arc::downgrade(self),
            generation,
        });
    }
}

/// Buffers freed while they carried a mark, checked at the next forward op.
static FREED: Mutex<Vec<BufferMark>> = Mutex::new(Vec::new());
/// Whether `FREED` may hold something (one relaxed load per forward op when it does not).
static ANY_FREED: AtomicBool = AtomicBool::new(false);

/// Called when a buffer that carried `mark` is freed.
pub(crate) fn buffer_freed(mark: BufferMark) {
    let mut freed = FREED.lock().unwrap_or_else(|e| e.into_inner());
    // Dropped models free many buffers and never run again: keep the queue short.
    if freed.len() >= 4096 {
        freed.retain(|m| m.mark.strong_count() > 0);
    }
    freed.push(mark);
    ANY_FREED.store(true, Ordering::Release);
}

/// At a forward op: reports the parameters whose host value was freed without a newer one
/// being placed, while their mark (their model) lives on.
pub(crate) fn check_lost() {
    if !ANY_FREED.load(Ordering::Relaxed) {
        return;
    }
    let freed = {
        let mut freed = FREED.lock().unwrap_or_else(|e| e.into_inner());
        ANY_FREED.store(false, Ordering::Release);
        std::mem::take(&mut *freed)
    };
    let mut lost: Vec<(String, Option<OffloadContext>)> = Vec::new();
    for m in freed {
        let Some(mark) = m.mark.upgrade() else {
            continue;
        };
        let mut state = mark.state();
        if state.host && state.generation == m.generation && !state.reported {
            state.reported = true;
            lost.push((mark.path.clone(), state.context.upgrade()));
        }
    }
    if lost.is_empty() {
        return;
    }
    for (path, context) in &lost {
        if let Some(context) = context {
            context.note_lost_placement(path.clone());
        }
    }
    let paths: Vec<&str> = lost.iter().map(|(p, _)| p.as_str()).collect();
    log::warn!(target: LOST_PLACEMENT_LOG_TARGET, "{}", lost_message(&paths));
}

/// The warning for `paths`, with the fix.
pub(crate) fn lost_message(paths: &[&str]) -> String {
    const SHOWN: usize = 8;
    let mut names = paths
        .iter()
        .take(SHOWN)
        .map(|p| format!("`{p}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if paths.len() > SHOWN {
        names.push_str(&format!(" and {} more", paths.len() - SHOWN));
    }
    format!(
        "{} parameter(s) that the offload policy put in host memory are in device memory now: \
         {names}. An optimizer step (Burn's optimizers compute each new parameter on the \
         device) or a `Module::map` replaced them. Wrap the optimizer in \
         `OffloadOptimizer::new(optimizer, &report)` (it writes each step's values into the old \
         host buffers), or call `keep_offloaded(model, &report)` after the step",
        paths.len()
    )
}

thread_local! {
    /// Set while [`find_mark`] asks a load mapper for its mark.
    static QUERY: RefCell<Option<Option<Arc<ParamMark>>>> = const { RefCell::new(None) };
}

/// Runs `f` (which applies a parameter's load mapper to a probe) and returns what it returned
/// and the mark of burn-offload's load mapper, if the parameter has one: inside, that mapper
/// reports its mark and returns the probe untouched instead of placing it.
pub(crate) fn find_mark<R>(f: impl FnOnce() -> R) -> (R, Option<Arc<ParamMark>>) {
    /// Restores the enclosing query (also if `f` panics).
    struct Guard(Option<Option<Arc<ParamMark>>>);
    impl Drop for Guard {
        fn drop(&mut self) {
            let previous = self.0.take();
            QUERY.with(|q| *q.borrow_mut() = previous);
        }
    }
    let _guard = Guard(QUERY.with(|q| q.borrow_mut().replace(None)));
    let out = f();
    let found = QUERY.with(|q| q.borrow_mut().take()).flatten();
    (out, found)
}

/// In burn-offload's load mapper: if a [`find_mark`] query is running on this thread, reports
/// `mark` to it and returns `true` (the mapper then returns its input untouched).
pub(crate) fn answer_query(mark: &Arc<ParamMark>) -> bool {
    QUERY.with(|q| match &mut *q.borrow_mut() {
        Some(found) => {
            *found = Some(mark.clone());
            true
        }
        None => false,
    })
}
