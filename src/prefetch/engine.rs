//! Prefetching through the copy engine ([`PrefetchCopies::Engine`](crate::PrefetchCopies)):
//! the learned read order ([`super::cycle`]) is cut into *groups* of consecutive reads, and a
//! filler thread copies one group per [`CopyEngine::fill`] into the ring of an engine of the
//! model's context. Device memory for prefetching is exactly the ring.
//!
//! # The op side: one boundary per group
//! An op thread that takes the first copy of a group crosses a *boundary*:
//! 1. the group it was reading *retires*: the op running now may still read it (a `linear`
//!    fetches its weight from one group and its bias from the next before the inner op is
//!    queued), so it is released only once that op has ended (`OffloadBackend` counts the
//!    ends of its ops, [`op_ended`]);
//! 2. the groups that retired during ops that have ended are released: first the thread's
//!    queued lazy ops are handed to the device ([`OffloadTarget::drain_ops`]: a fused backend
//!    runs its fusion stream; unfused ones queue ops as they are called), so that their readers
//!    are queued on its stream, then [`CopyEngine::release`] queues the release behind them;
//! 3. it acquires the new group ([`CopyEngine::acquire`]: its stream waits for the copies).
//!
//! So a release is ordered with the reads *as they execute*, not as they are registered, with
//! at most one drain per group, before the new group's first reader is registered (a matmul's
//! epilogue still fuses). A group is at most a third of the ring: the retiring group, the
//! current one and the one being filled fit at once. A thread that waits for a group being
//! filled crosses its boundary first (the fill may need that room), and gives up (uploads on
//! demand) when the fill needs room it cannot release yet or another thread holds.
//! [`end_ring_leases`] (called by `OffloadBackend::sync`, and when a thread ends) releases
//! everything a thread holds.
//!
//! # Views of a region
//! A view op (reshape, slice, `unfold`, …) of a ring region returns a view of the ring, which
//! would outlive the region's release. The ops that can return a view count the ring takes
//! made while they ran ([`ring_takes`]) and copy their result out where one was
//! (`OffloadBackend::unalias`). Ops never write into the ring in place: its buffer is held
//! by the engine, so no tensor owns it alone.
//!
//! # Limits
//! The ring is made at the first copy, `lookahead_bytes` long; a group is at most a third of
//! it, and a tensor larger than that (or a non-contiguous view) is uploaded on demand. Each op
//! thread that reads from the engine is one of its 8 consumers.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use burn_backend::{Device as _, tensor::FloatTensor};

use super::LIVENESS_CHECK;
use super::cycle::{Key, Predicted, State};
use crate::context::{AnyPrefetcher, OffloadContext};
use crate::copy::{CopyEngine, CopyError, CopySource, CopyStreams, Region, RingShape};
use crate::host::{HostTensor, WeakHostTensor};
use crate::inner::{OffloadTarget, RingStreams};
use crate::stats::{Counter, PrefetchCounters};

/// Op threads (consumers) one engine has flags for.
pub const CONSUMERS: usize = 8;

/// How long an op thread waits for a group being filled, per check of whether the fill is
/// stuck on room another thread holds.
const WAIT_STEP: Duration = Duration::from_millis(20);

type Engine<B> = CopyEngine<Arc<dyn RingStreams<B>>>;

/// The most bytes of one group in a ring of `capacity` bytes: a third, so that the group an
/// op thread reads, the one it read before (released once the op that crossed into the new
/// group has ended) and the next one being filled fit at once.
fn group_budget(capacity: u64) -> u64 {
    capacity / 3
}

/// The groups of an order of `sizes` (bytes, each placed at a multiple of `align`): consecutive
/// runs of at most `budget` bytes, greedily. A tensor larger than `budget` is a group of its
/// own (never copied: uploaded on demand).
pub(crate) fn groups(sizes: &[u64], budget: u64, align: u64) -> Vec<Range<usize>> {
    let align = align.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, &size) in sizes.iter().enumerate() {
        let placed = size.div_ceil(align) * align;
        if i > start && used + placed > budget {
            out.push(start..i);
            start = i;
            used = 0;
        }
        used += placed;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// A filled group, waiting for its reads.
struct Filled {
    /// Unique per engine.
    id: u64,
    /// Absolute positions of the cycle.
    positions: Range<u64>,
    /// The region of each position; `None`: uploaded on demand.
    regions: Vec<Option<Region>>,
    /// Whether an op thread acquired it (its regions are then retired by that thread's
    /// release, not discarded).
    acquired: bool,
}

impl Filled {
    fn regions(&self) -> Vec<Region> {
        self.regions.iter().flatten().copied().collect()
    }

    /// The group leaves the ready list: no thread acquired it, its regions are discarded
    /// (wasted copies); one that acquired it releases them.
    fn drop_from_ready<B: OffloadTarget>(self, engine: &Engine<B>, counters: &PrefetchCounters) {
        if !self.acquired {
            for r in self.regions() {
                engine.discard(&r);
                counters.bump(Counter::Wasted);
            }
        }
    }
}

/// A group to fill: positions and the views to copy (`None`: not copied).
struct Job {
    generation: u64,
    positions: Range<u64>,
    views: Vec<Option<WeakHostTensor>>,
}

struct EngineState<B: OffloadTarget> {
    /// Learning and prediction, and whether the filler runs and was told to stop (its copy
    /// bookkeeping, for CubeCL's path, is unused here).
    cycle: State<B>,
    /// The groups of the learned order (order indices), and the generation they are for.
    groups: Option<(u64, Vec<Range<usize>>)>,
    ready: VecDeque<Filled>,
    /// The positions being filled, and their generation.
    filling: Option<(Range<u64>, u64)>,
    /// The first position the filler has not considered.
    next_fill: u64,
    next_id: u64,
}

impl<B: OffloadTarget> EngineState<B> {
    /// The next group the filler should copy.
    fn next_job(&mut self, capacity: u64, align: u64) -> Option<Job> {
        let generation = self.cycle.generation;
        let cycle = self.cycle.cycle.as_ref()?;
        let n = cycle.order.len() as u64;
        if self.groups.as_ref().is_none_or(|(g, _)| *g != generation) {
            let sizes: Vec<u64> = cycle.order.iter().map(|e| e.bytes).collect();
            self.groups = Some((generation, groups(&sizes, group_budget(capacity), align)));
        }
        let (_, groups) = self.groups.as_ref().expect("made above");
        let mut start = self.next_fill.max(cycle.expect);
        // Groups start where they start: a position inside one moves on to the next.
        loop {
            if start >= cycle.expect + n {
                return None; // a whole cycle ahead
            }
            let (lap, index) = (start / n, (start % n) as usize);
            let group = groups.iter().find(|g| g.contains(&index))?;
            let absolute = lap * n + group.start as u64..lap * n + group.end as u64;
            if absolute.start < start {
                start = absolute.end;
                continue;
            }
            self.next_fill = absolute.end;
            let budget = group_budget(capacity);
            let views = group
                .clone()
                .map(|i| {
                    let e = &cycle.order[i];
                    (e.bytes <= budget).then(|| e.view.clone())
                })
                .collect();
            return Some(Job {
                generation,
                positions: absolute,
                views,
            });
        }
    }

    /// Drops the filled groups (an order change): the ones no thread acquired are discarded.
    fn drop_ready(&mut self, engine: &Engine<B>) {
        for group in self.ready.drain(..) {
            group.drop_from_ready(engine, &self.cycle.counters);
        }
    }
}

/// The engine prefetcher of one context, wrapped backend and device.
pub(crate) struct EngineShared<B: OffloadTarget> {
    state: Mutex<EngineState<B>>,
    changed: Condvar,
    /// The engine, or why there is none (the CubeCL path is then used).
    engine: Result<Arc<Engine<B>>, CopyError>,
    device: B::Device,
    warned: AtomicBool,
}

impl<B: OffloadTarget> EngineShared<B> {
    fn new(context: &OffloadContext, device: &B::Device, lookahead: u64) -> Self {
        let align = 256;
        let capacity = lookahead / align * align;
        let shape = RingShape {
            capacity,
            slots: (capacity / align).clamp(16, 4096) as usize,
            consumers: CONSUMERS,
            align,
        };
        let engine = match B::ring_streams(device, shape) {
            Some(Ok(streams)) => Ok(Arc::new(CopyEngine::new(streams))),
            Some(Err(e)) => Err(e),
            None => Err(CopyError::Device {
                reason: format!("{} has no copy engine", B::name(device)),
            }),
        };
        Self {
            state: Mutex::new(EngineState {
                cycle: State::new(context.counters().clone()),
                groups: None,
                ready: VecDeque::new(),
                filling: None,
                next_fill: 0,
                next_id: 0,
            }),
            changed: Condvar::new(),
            engine,
            device: device.clone(),
            warned: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, EngineState<B>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B: OffloadTarget> AnyPrefetcher for EngineShared<B> {
    fn shutdown(&self) {
        let mut st = self.lock();
        st.cycle.shutdown = true;
        st.cycle.forget();
        if let Ok(engine) = &self.engine {
            st.drop_ready(engine);
            engine.close();
        }
        drop(st);
        self.changed.notify_all();
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// What a thread's lease needs of its engine, whatever the backend.
trait LeaseOwner: Send + Sync {
    /// Queues the thread's lazy ops, then releases `regions` behind them.
    fn end(&self, regions: &[Region]);
}

impl<B: OffloadTarget> LeaseOwner for EngineShared<B> {
    fn end(&self, regions: &[Region]) {
        if let Ok(engine) = &self.engine {
            release_behind_ops::<B, _>(engine, &self.device, regions);
        }
    }
}

/// On an op thread: hands its lazy ops on `device` to the device ([`OffloadTarget::drain_ops`]),
/// then releases `regions` (which it acquired) behind them: the release of a boundary (see the
/// [module docs](self)). Errors are logged (a region already gone needs no release).
pub fn release_behind_ops<B: OffloadTarget, S: CopyStreams>(
    engine: &CopyEngine<S>,
    device: &B::Device,
    regions: &[Region],
) {
    if !crate::copy::fault(|f| f.skip_drain) {
        B::drain_ops(device);
    }
    for r in regions {
        if let Err(e) = engine.release(r) {
            log::warn!("copy engine: releasing a region: {e}");
        }
    }
}

/// Regions a thread acquired and has not released.
struct Lease {
    owner: Weak<dyn LeaseOwner>,
    /// The owner's address: which engine.
    key: usize,
    group: u64,
    regions: Vec<Region>,
    /// `None` while it is the thread's current group of its engine; else the thread's
    /// [`ops_ended`] count when the thread moved on to another group (the op then running may
    /// still read it: it is released once that op has ended).
    retired: Option<u64>,
}

/// The calling thread's leases; released when the thread ends.
struct Leases(Vec<Lease>);

impl Drop for Leases {
    fn drop(&mut self) {
        let _ = catch_unwind(AssertUnwindSafe(|| end(std::mem::take(&mut self.0))));
    }
}

thread_local! {
    static LEASES: RefCell<Leases> = const { RefCell::new(Leases(Vec::new())) };
    static RING_TAKES: Cell<u64> = const { Cell::new(0) };
    static OPS_ENDED: Cell<u64> = const { Cell::new(0) };
}

/// How many ring regions the calling thread has been handed as tensors so far (see the
/// [module docs](self), "Views of a region").
pub(crate) fn ring_takes() -> u64 {
    RING_TAKES.with(|t| t.get())
}

/// How many ops of `OffloadBackend` that return a float tensor have ended on the calling thread.
fn ops_ended() -> u64 {
    OPS_ENDED.with(|t| t.get())
}

/// Called by `OffloadBackend` at the end of each op that returns a float tensor (its operands'
/// reads have been queued by then): regions the thread left during the op may be released at
/// its next boundary.
pub(crate) fn op_ended() {
    OPS_ENDED.with(|t| t.set(t.get().wrapping_add(1)));
}

/// Releases `leases`, each owner's after one drain of the thread's lazy ops.
fn end(leases: Vec<Lease>) {
    let mut by_owner: Vec<(usize, Weak<dyn LeaseOwner>, Vec<Region>)> = Vec::new();
    for lease in leases {
        match by_owner.iter_mut().find(|(k, _, _)| *k == lease.key) {
            Some((_, _, regions)) => regions.extend(lease.regions),
            None => by_owner.push((lease.key, lease.owner, lease.regions)),
        }
    }
    for (_, owner, regions) in by_owner {
        if let Some(owner) = owner.upgrade() {
            owner.end(&regions);
        }
    }
}

/// Releases every ring region the calling thread holds, after queuing its lazy ops (outside any
/// op: `OffloadBackend::sync`).
pub(crate) fn end_ring_leases() {
    end(LEASES.with(|l| std::mem::take(&mut l.borrow_mut().0)));
}

/// A boundary of the engine at `key` on the calling thread: its current group of the engine
/// retires, and the groups that retired during ops that have ended since are released (after
/// a drain). Returns whether any was released.
fn boundary(key: usize) -> bool {
    let now = ops_ended();
    let done: Vec<Lease> = LEASES.with(|l| {
        let mut l = l.borrow_mut();
        let (done, kept) = std::mem::take(&mut l.0)
            .into_iter()
            .partition(|lease| lease.key == key && lease.retired.is_some_and(|mark| mark != now));
        l.0 = kept;
        for lease in l.0.iter_mut().filter(|lease| lease.key == key) {
            lease.retired.get_or_insert(now);
        }
        done
    });
    let released = !done.is_empty();
    end(done);
    released
}

fn holds(key: usize, group: u64) -> bool {
    LEASES.with(|l| {
        l.borrow()
            .0
            .iter()
            .any(|lease| lease.key == key && lease.group == group)
    })
}

/// A device copy of `host` for one op, through the context's copy engine on `device` (see the
/// [module docs](self)); CubeCL's prefetch path where the target has no engine.
pub(crate) fn upload<B: OffloadTarget>(
    host: &HostTensor,
    device: &B::Device,
    context: &OffloadContext,
    lookahead: u64,
) -> FloatTensor<B> {
    let shared = context.prefetcher(TypeId::of::<EngineShared<B>>(), device.to_id(), || {
        Arc::new(EngineShared::<B>::new(context, device, lookahead))
    });
    let engine = match &shared.engine {
        Ok(engine) => engine.clone(),
        Err(e) => {
            if !shared.warned.swap(true, Ordering::AcqRel) {
                log::warn!(
                    "prefetching through the copy engine is off ({e}): using CubeCL's copies"
                );
            }
            return super::upload::<B>(host, device, context, lookahead);
        }
    };
    let key = Arc::as_ptr(&shared) as *const () as usize;
    let counters = context.counters().clone();
    let mut st = shared.lock();
    let before = st.cycle.generation;
    let predicted = st.cycle.predict(Key::of(host), host);
    if st.cycle.generation != before {
        // The order changed: the groups filled for it are not read.
        st.drop_ready(&engine);
        engine.discard_untaken();
        st.next_fill = 0;
    }
    let pos = match predicted {
        Predicted::Yes(pos) => pos,
        Predicted::No { learned } => {
            if learned && !st.cycle.worker_started {
                st.cycle.worker_started = spawn_filler(shared.clone());
            }
            drop(st);
            shared.changed.notify_all();
            counters.bump(Counter::Misses);
            return B::upload(host, device);
        }
    };
    let generation = st.cycle.generation;
    let mut stuck = 0;
    loop {
        if st.cycle.generation != generation {
            drop(st);
            counters.bump(Counter::Misses);
            return B::upload(host, device);
        }
        while st.ready.front().is_some_and(|g| g.positions.end <= pos) {
            let stale = st.ready.pop_front().expect("checked");
            stale.drop_from_ready(&engine, &counters);
        }
        if let Some(group) = st.ready.front_mut()
            && group.positions.contains(&pos)
        {
            let Some(region) = group.regions[(pos - group.positions.start) as usize] else {
                drop(st);
                counters.bump(Counter::Misses);
                return B::upload(host, device);
            };
            let id = group.id;
            let acquire = (!holds(key, id)).then(|| {
                group.acquired = true;
                group.regions()
            });
            drop(st);
            shared.changed.notify_all();
            if let Some(regions) = acquire
                && let Err(e) = cross_boundary(&shared, &engine, key, id, regions)
            {
                log::warn!("copy engine: acquiring a group: {e}; uploading on demand");
                counters.bump(Counter::Misses);
                return B::upload(host, device);
            }
            let streams = engine.streams();
            return match streams.tensor(&region, host.shape(), host.dtype()) {
                Ok(tensor) => {
                    RING_TAKES.with(|t| t.set(t.get() + 1));
                    counters.bump(Counter::Hits);
                    tensor
                }
                Err(e) => {
                    log::warn!("copy engine: a region as a tensor: {e}; uploading on demand");
                    counters.bump(Counter::Misses);
                    B::upload(host, device)
                }
            };
        }
        let in_flight = st
            .filling
            .as_ref()
            .is_some_and(|(p, g)| p.contains(&pos) && *g == generation);
        if !in_flight || stuck >= 3 {
            // Late: the filler has not got to it (it skips it now), or its fill waits for room
            // another thread holds.
            if st.next_fill <= pos {
                st.next_fill = pos + 1;
            }
            drop(st);
            shared.changed.notify_all();
            counters.bump(Counter::Late);
            return B::upload(host, device);
        }
        // The fill may need room this thread holds: a boundary releases what it can.
        drop(st);
        let released = boundary(key);
        let waiting = Instant::now();
        st = shared.lock();
        if released {
            continue;
        }
        st = shared
            .changed
            .wait_timeout(st, WAIT_STEP)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        counters.add_elapsed(Counter::WaitNs, waiting);
        if engine.wants_room() {
            stuck += 1;
        }
    }
}

/// A boundary (see the [module docs](self)), then `regions` (group `id`) acquired and held as
/// the thread's current group. (The acquire needs no drain: the copy it waits for was queued
/// behind releases already queued.)
fn cross_boundary<B: OffloadTarget>(
    shared: &Arc<EngineShared<B>>,
    engine: &Engine<B>,
    key: usize,
    id: u64,
    regions: Vec<Region>,
) -> Result<(), CopyError> {
    boundary(key);
    for (i, r) in regions.iter().enumerate() {
        if let Err(e) = engine.acquire(r) {
            for done in &regions[..i] {
                let _ = engine.release(done);
            }
            return Err(e);
        }
    }
    let owner: Arc<dyn LeaseOwner> = shared.clone();
    LEASES.with(|l| {
        l.borrow_mut().0.push(Lease {
            owner: Arc::downgrade(&owner),
            key,
            group: id,
            regions,
            retired: None,
        })
    });
    Ok(())
}

fn spawn_filler<B: OffloadTarget>(shared: Arc<EngineShared<B>>) -> bool {
    let spawned = std::thread::Builder::new()
        .name("burn-offload-ring-fill".into())
        .spawn(move || filler::<B>(shared));
    match spawned {
        Ok(_) => true,
        Err(e) => {
            log::warn!("could not start the copy engine's fill thread ({e}): uploading on demand");
            false
        }
    }
}

/// The filler: copies the next group of the learned order into the ring, one fill per group.
fn filler<B: OffloadTarget>(shared: Arc<EngineShared<B>>) {
    let Ok(engine) = shared.engine.clone() else {
        return;
    };
    let shape = engine.streams().shape();
    let mut st = shared.lock();
    let counters = st.cycle.counters.clone();
    loop {
        if st.cycle.shutdown {
            return;
        }
        let Some(job) = st.next_job(shape.capacity, shape.align) else {
            st = shared
                .changed
                .wait_timeout(st, LIVENESS_CHECK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            let before = st.cycle.generation;
            st.cycle.drop_dead();
            if st.cycle.generation != before {
                st.drop_ready(&engine);
            }
            continue;
        };
        st.filling = Some((job.positions.clone(), job.generation));
        drop(st);
        let queueing = Instant::now();
        let mut sources = Vec::new();
        let mut at = Vec::new();
        let mut dead = false;
        for (i, view) in job.views.iter().enumerate() {
            let Some(view) = view else { continue };
            match view.upgrade() {
                Some(host) => {
                    if let Some(source) = source_of(&host) {
                        sources.push(source);
                        at.push(i);
                    }
                }
                None => dead = true,
            }
        }
        let filled = (!dead).then(|| engine.fill(sources));
        counters.add_elapsed(Counter::UploadNs, queueing);
        // What this thread's own allocations hold (the ring is the op thread's): nothing is
        // allocated per copy.
        if super::memory_probe()
            && let Ok(Some(bytes)) =
                catch_unwind(AssertUnwindSafe(|| B::device_bytes_in_use(&shared.device)))
        {
            counters.device_reading(bytes);
        }
        st = shared.lock();
        st.filling = None;
        match filled {
            Some(Ok(regions)) => {
                let current = st.cycle.generation == job.generation && !st.cycle.shutdown;
                counters.bump(Counter::RingFills);
                if current {
                    let mut placed = vec![None; job.views.len()];
                    for (i, r) in at.into_iter().zip(regions) {
                        placed[i] = Some(r);
                        counters.bump(Counter::Prefetched);
                    }
                    let id = st.next_id;
                    st.next_id += 1;
                    st.ready.push_back(Filled {
                        id,
                        positions: job.positions,
                        regions: placed,
                        acquired: false,
                    });
                } else {
                    for r in regions {
                        engine.discard(&r);
                        counters.bump(Counter::Prefetched);
                        counters.bump(Counter::Wasted);
                    }
                }
            }
            Some(Err(CopyError::Closed)) => return,
            Some(Err(e)) => {
                log::warn!("copy engine: a fill failed ({e}): forgetting the learned order");
                st.cycle.forget();
                st.drop_ready(&engine);
            }
            None => {
                // A buffer of the order is gone: the model was dropped.
                st.cycle.forget();
                st.drop_ready(&engine);
            }
        }
        shared.changed.notify_all();
    }
}

/// The bytes of a contiguous float view, as a copy source; `None` for a view the engine does
/// not copy (strided, quantized).
fn source_of(host: &HostTensor) -> Option<CopySource> {
    if host.is_quantized() || !host.is_contiguous() {
        return None;
    }
    let start = host.offset() * host.dtype().size();
    CopySource::new(host.buffer().clone(), start..start + host.size_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_pack_consecutive_reads_within_the_budget() {
        // 256-byte alignment: 100 bytes take 256.
        assert_eq!(
            groups(&[100, 100, 100, 100, 100], 512, 256),
            vec![0..2, 2..4, 4..5]
        );
        // A tensor above the budget is a group of its own.
        assert_eq!(groups(&[256, 2048, 256], 512, 256), vec![0..1, 1..2, 2..3]);
        assert_eq!(groups(&[512, 512], 1024, 256), vec![0..2]);
        assert!(groups(&[], 1024, 256).is_empty());
        // Every read is in exactly one group, in order.
        let sizes: Vec<u64> = (0..40).map(|i| 64 + 97 * (i % 7)).collect();
        let g = groups(&sizes, 1500, 256);
        assert_eq!(g.first().unwrap().start, 0);
        assert_eq!(g.last().unwrap().end, sizes.len());
        for pair in g.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        for r in &g {
            let placed: u64 = sizes[r.clone()].iter().map(|s| s.div_ceil(256) * 256).sum();
            assert!(placed <= 1500 || r.len() == 1, "{r:?}: {placed}");
        }
    }
}
