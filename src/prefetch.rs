//! [`OffloadMode::Prefetch`](crate::OffloadMode::Prefetch): transient copies of offloaded
//! tensors made ahead of time, on a background thread, in an order learned at run time.
//!
//! Model-agnostic: nothing is configured per layer (unlike vLLM's `PrefetchOffloader`, which
//! needs layer groups and only reaches the decoder stack). Per compute device (and wrapped
//! backend type) a prefetcher watches the transient uploads that ops ask for:
//!
//! 1. **Learning.** Every upload is made on demand (a *miss*) and its key is appended to a
//!    history. The key of a host view is its buffer's identity (the `Arc` pointer), offset,
//!    shape, strides and dtype: two reads of the same weight through the same view have equal
//!    keys. When a key comes round again, the keys since its previous occurrence become the
//!    candidate cycle (a *relearn*), e.g. one forward's weights in read order. Prefill and
//!    decode read the same weights through the same views, so they share one cycle.
//! 2. **Prefetching.** While the requests follow the cycle, the background thread uploads the
//!    next tensors of the cycle with the target's `upload`, keeping at most `lookahead_bytes`
//!    of uploaded-but-unused copies alive (tensors larger than that are never prefetched). A
//!    request returns its prefetched copy (a *hit*), waits for it if its upload is in flight,
//!    or uploads it itself if the thread has not got to it (*late*).
//! 3. **Mismatch.** A request that is not the predicted one drops every prefetched copy and
//!    returns to learning (the request is a miss). A candidate cycle is *confirmed* after it
//!    was followed once all the way round; until then the history is kept across mismatches,
//!    so a cycle that contains the same key twice (a tied weight read twice per forward
//!    through one view) is still found: the candidate is rebuilt from the most recent
//!    occurrence of each key. After a confirmed cycle breaks, learning starts afresh.
//!
//! Results never change: a prefetched copy is an upload of immutable host memory, the same
//! bytes an on-demand upload gives.
//!
//! **Memory.** The learned order and the history hold *weak* references to host buffers: a
//! dropped model's host memory is freed at once. The thread checks every
//! [`LIVENESS_CHECK`] while it holds anything, and drops its prefetched copies and the learned
//! order once a buffer of that order is gone (a request for a tensor of another model is a
//! mismatch anyway). Once it holds nothing more (no order, no history, no copies) it lets
//! the target drop the host sources its uploads still hold
//! ([`OffloadTarget::release_uploads`], counted in [`PrefetchStats::releases`]), and only
//! then: on CUDA a release holds up CubeCL's device thread, which launches every thread's
//! kernels, until all the copies queued on the prefetch stream are done; released whenever
//! the lookahead is full (after nearly every copy) it would serialise copies and compute.
//! It also releases once when a buffer it copied from has died while another model keeps it
//! busy (that model's requests replaced the dropped one's order, so it never holds nothing):
//! it keeps weak references to the buffers of the copies made since its last release.
//! Changing a device's configuration
//! ([`set_device_config`](crate::device::set_device_config)) drops its prefetcher and ends its
//! thread.
//!
//! **Threads.** One thread per device and backend type, started when the first cycle is
//! learned; it parks on a condition variable when idle and never blocks process exit.
//!
//! **CUDA.** The thread makes its copies with the target's `prefetch_upload`. CubeCL gives each
//! thread its own stream, so the copies run on a second stream and overlap the kernels of the
//! op thread. Both directions are ordered on the device: a copy read on the op thread's stream
//! waits for its DMA (CubeCL's cross-stream events), and each DMA waits for the work already
//! queued on the op threads' streams ([`OffloadTarget::work_queue`]), because a dropped copy's
//! memory goes back to the prefetch stream's pool while kernels that read it may still be
//! queued: without that wait the next copy could overwrite it (seen on an H100 as logits that
//! differed from copy mode's). A thread that requests copies for the first time makes the
//! prefetcher drop its copies and relearn, so that no copy ordered without it is handed to it.
//!
//! **Limitations.** One learned cycle per device: threads that run different models on one
//! device interleave their requests and mostly miss. A view whose key changes every step (a
//! slice of an offloaded tensor at a moving offset) mismatches once per step. A request that
//! skips ahead in the cycle is a mismatch (the prefetched copies are dropped, not searched).

use std::any::{Any, TypeId};
use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn_backend::{DType, Device as _, DeviceId, tensor::FloatTensor};

use crate::host::{HostTensor, WeakHostTensor};
use crate::target::OffloadTarget;

/// How often an idle prefetch thread that holds copies or a learned order checks that the
/// host buffers of that order are still alive.
pub const LIVENESS_CHECK: Duration = Duration::from_millis(50);

/// The longest learning history kept (keys); a longer one is dropped and learning restarts.
const HISTORY_CAP: usize = 1 << 16;

/// Process-wide prefetch counters (all devices), from [`prefetch_stats`].
///
/// Global, not thread-local like [`OpStats`](crate::OpStats): the copies are made on another
/// thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefetchStats {
    /// Requests served by a prefetched copy (ready, or waited for while in flight).
    pub hits: u64,
    /// Requests uploaded on demand because no cycle predicted them (learning, a mismatch, or a
    /// tensor larger than the lookahead).
    pub misses: u64,
    /// Requests the cycle predicted, uploaded on demand because the background thread had not
    /// started their copy yet.
    pub late: u64,
    /// Requests that differed from the predicted one (the prefetched copies were dropped).
    pub mismatches: u64,
    /// Cycles learned (the first one included).
    pub relearns: u64,
    /// Copies made by background threads.
    pub prefetched: u64,
    /// Of those, copies dropped without being used (mismatch, model dropped).
    pub wasted: u64,
    /// Bytes of prefetched copies alive now (uploaded or in flight, not yet handed to an op).
    pub alive_bytes: u64,
    /// The most `alive_bytes` seen since the last [`reset_prefetch_stats`], summed over devices.
    pub peak_alive_bytes: u64,
    /// Times a prefetch thread let go of the host sources its uploads still held
    /// ([`OffloadTarget::release_uploads`]; on CUDA two flushes of its stream, the second of
    /// which holds up CubeCL's device thread until every copy queued on that stream is done).
    /// It happens only when the thread has nothing left to prefetch or learn (the model was
    /// dropped), so it should not grow while a model runs.
    pub releases: u64,
    /// The most device memory a prefetch thread's own allocations held right after one of its
    /// copies, as the target measures it ([`OffloadTarget::device_bytes_in_use`]; on CUDA the
    /// `bytes_in_use` of the pool of the thread's CubeCL stream: its copies not handed out yet
    /// and those ops still hold, plus the output of any op that worked in place on a copy).
    /// Measured only while [`set_prefetch_memory_probe`] is on; 0 where the target cannot tell
    /// (the CPU target). The largest single reading over all devices.
    pub peak_device_bytes: u64,
    /// Nanoseconds the prefetch threads spent in the target's `prefetch_upload`, i.e. queueing
    /// their copies. On CUDA that is CubeCL's device queue, which makes a caller spin while it
    /// is full (CubeCL's device thread, which also launches every op thread's kernels, is busy
    /// or blocked), and, every 256 MiB of copies, a flush of the thread's stream that waits on
    /// the GPU for the copies queued before the previous one: a large share of the run's time
    /// here says the host side or those flushes set the pace.
    pub upload_ns: u64,
    /// Nanoseconds requests spent waiting for a predicted copy that was being queued (a copy
    /// that had not been started is uploaded on demand instead, see `late`).
    pub wait_ns: u64,
}

static HITS: AtomicU64 = AtomicU64::new(0);
static MISSES: AtomicU64 = AtomicU64::new(0);
static LATE: AtomicU64 = AtomicU64::new(0);
static MISMATCHES: AtomicU64 = AtomicU64::new(0);
static RELEARNS: AtomicU64 = AtomicU64::new(0);
static PREFETCHED: AtomicU64 = AtomicU64::new(0);
static WASTED: AtomicU64 = AtomicU64::new(0);
static ALIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static RELEASES: AtomicU64 = AtomicU64::new(0);
static PEAK_DEVICE: AtomicU64 = AtomicU64::new(0);
static UPLOAD_NS: AtomicU64 = AtomicU64::new(0);
static WAIT_NS: AtomicU64 = AtomicU64::new(0);
static MEMORY_PROBE: AtomicBool = AtomicBool::new(false);

/// Turns on (or off) the measurement of [`PrefetchStats::peak_device_bytes`]: after each copy
/// the prefetch thread asks the target how much device memory its allocations hold. On CUDA
/// that is a blocking round trip to CubeCL's device thread per copy, which costs overlap: for
/// tests and diagnostics, not for timed runs. Off by default; process-wide.
pub fn set_prefetch_memory_probe(on: bool) {
    MEMORY_PROBE.store(on, Ordering::Release);
}

/// Reads the process-wide [`PrefetchStats`].
pub fn prefetch_stats() -> PrefetchStats {
    PrefetchStats {
        hits: HITS.load(Ordering::Acquire),
        misses: MISSES.load(Ordering::Acquire),
        late: LATE.load(Ordering::Acquire),
        mismatches: MISMATCHES.load(Ordering::Acquire),
        relearns: RELEARNS.load(Ordering::Acquire),
        prefetched: PREFETCHED.load(Ordering::Acquire),
        wasted: WASTED.load(Ordering::Acquire),
        alive_bytes: ALIVE.load(Ordering::Acquire),
        peak_alive_bytes: PEAK.load(Ordering::Acquire),
        releases: RELEASES.load(Ordering::Acquire),
        peak_device_bytes: PEAK_DEVICE.load(Ordering::Acquire),
        upload_ns: UPLOAD_NS.load(Ordering::Acquire),
        wait_ns: WAIT_NS.load(Ordering::Acquire),
    }
}

/// Resets the counters of [`PrefetchStats`] to zero (`alive_bytes` is a level, not a
/// counter: it stays, and the peak restarts from it).
pub fn reset_prefetch_stats() {
    for c in [
        &HITS,
        &MISSES,
        &LATE,
        &MISMATCHES,
        &RELEARNS,
        &PREFETCHED,
        &WASTED,
        &RELEASES,
        &PEAK_DEVICE,
        &UPLOAD_NS,
        &WAIT_NS,
    ] {
        c.store(0, Ordering::Release);
    }
    PEAK.store(ALIVE.load(Ordering::Acquire), Ordering::Release);
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::AcqRel);
}

/// Adds the time since `start` to `counter`, in nanoseconds.
fn add_elapsed(counter: &AtomicU64, start: Instant) {
    let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(ns, Ordering::AcqRel);
}

/// The identity of a host view.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    /// The buffer's `Arc` pointer. Unique while the prefetcher holds a `Weak` of it (the
    /// allocation is not reused before the last `Weak` goes).
    buffer: usize,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<isize>,
    dtype: DType,
}

impl Key {
    fn of(host: &HostTensor) -> Self {
        Self {
            buffer: Arc::as_ptr(host.buffer()) as usize,
            offset: host.offset(),
            shape: host.dims().to_vec(),
            strides: host.strides().to_vec(),
            dtype: host.dtype(),
        }
    }
}

/// One read of the learned order.
#[derive(Clone, Debug)]
struct Entry {
    key: Key,
    view: WeakHostTensor,
    bytes: u64,
}

impl Entry {
    fn of(key: Key, host: &HostTensor) -> Self {
        Self {
            key,
            view: host.downgrade(),
            bytes: host.size_bytes() as u64,
        }
    }
}

/// A learned cycle and where the requests and the background thread are in it. Positions
/// are absolute (they keep growing); position `p` is `order[p % order.len()]`.
struct Cycle {
    order: Vec<Entry>,
    /// The position the next request should be.
    expect: u64,
    /// The next position the background thread will consider.
    scheduled: u64,
    /// Whether the cycle was followed once all the way round.
    confirmed: bool,
    /// Requests that followed the cycle since it was learned (until confirmed).
    followed: usize,
}

/// A prefetched copy, not yet handed to an op.
struct Ready<T> {
    pos: u64,
    tensor: T,
    bytes: u64,
}

/// The copy the background thread is making.
struct InFlight {
    pos: u64,
    generation: u64,
}

struct State<B: OffloadTarget> {
    lookahead: u64,
    history: Vec<Entry>,
    /// Key → index of its latest occurrence in `history`.
    last_seen: HashMap<Key, usize>,
    cycle: Option<Cycle>,
    /// Prefetched copies, in increasing position.
    ready: VecDeque<Ready<FloatTensor<B>>>,
    in_flight: Option<InFlight>,
    /// Bytes of `ready` and of the copy in flight (counted until the thread has dropped or
    /// queued it, so a cancelled copy still counts against the lookahead).
    alive_bytes: u64,
    /// Bumped whenever the prefetched copies are dropped: an in-flight copy of an older
    /// generation is dropped when it lands.
    generation: u64,
    worker_started: bool,
    shutdown: bool,
    /// The work queues of the op threads that requested copies
    /// ([`OffloadTarget::work_queue`]): every copy is ordered after their queued work.
    consumers: Vec<u64>,
}

impl<B: OffloadTarget> State<B> {
    fn new() -> Self {
        Self {
            lookahead: 0,
            history: Vec::new(),
            last_seen: HashMap::new(),
            cycle: None,
            ready: VecDeque::new(),
            in_flight: None,
            alive_bytes: 0,
            generation: 0,
            worker_started: false,
            shutdown: false,
            consumers: Vec::new(),
        }
    }

    fn add_alive(&mut self, bytes: u64) {
        self.alive_bytes += bytes;
        let now = ALIVE.fetch_add(bytes, Ordering::AcqRel) + bytes;
        PEAK.fetch_max(now, Ordering::AcqRel);
    }

    fn sub_alive(&mut self, bytes: u64) {
        self.alive_bytes -= bytes;
        ALIVE.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Drops every prefetched copy (an in-flight one when it lands) and the cycle.
    fn cancel(&mut self) {
        while let Some(r) = self.ready.pop_front() {
            self.sub_alive(r.bytes);
            bump(&WASTED);
        }
        self.generation += 1;
        self.cycle = None;
    }

    /// Records the work queue of an op thread. A new one drops the prefetched copies and the
    /// cycle (returns `true`): they were ordered after the other threads' work only. The list
    /// only grows (a queue left out could still be reading a copy whose memory the next one
    /// reuses), so each thread that ever requested a copy costs every later copy one wait.
    fn add_consumer(&mut self, queue: u64) -> bool {
        if self.consumers.contains(&queue) {
            return false;
        }
        self.consumers.push(queue);
        self.cancel();
        true
    }

    /// Forgets everything learned (and drops the prefetched copies).
    fn forget(&mut self) {
        self.cancel();
        self.history = Vec::new();
        self.last_seen = HashMap::new();
    }

    fn remember(&mut self, entry: Entry) {
        if self.history.len() >= HISTORY_CAP {
            self.history.clear();
            self.last_seen.clear();
        }
        self.last_seen.insert(entry.key.clone(), self.history.len());
        self.history.push(entry);
    }

    /// Learning: records `entry`; when its key was seen before, the keys since then become
    /// the candidate cycle, with this request as its position 0. Returns whether a cycle was
    /// learned.
    fn learn(&mut self, entry: Entry) -> bool {
        let learned = match self.last_seen.get(&entry.key) {
            Some(&j) => {
                self.cycle = Some(Cycle {
                    order: self.history[j..].to_vec(),
                    expect: 1,
                    scheduled: 1,
                    confirmed: false,
                    followed: 1,
                });
                bump(&RELEARNS);
                true
            }
            None => false,
        };
        self.remember(entry);
        learned
    }

    /// The position of this request in the cycle when it is the predicted one; else handles
    /// the mismatch or learns, and returns `None` (upload on demand).
    fn predict(&mut self, key: Key, host: &HostTensor) -> Predicted {
        let Some(cycle) = self.cycle.as_mut() else {
            return Predicted::No {
                learned: self.learn(Entry::of(key, host)),
            };
        };
        let n = cycle.order.len();
        if cycle.order[(cycle.expect % n as u64) as usize].key == key {
            let pos = cycle.expect;
            cycle.expect += 1;
            if !cycle.confirmed {
                cycle.followed += 1;
                if cycle.followed >= n {
                    cycle.confirmed = true;
                    self.history = Vec::new();
                    self.last_seen = HashMap::new();
                } else {
                    self.remember(Entry::of(key, host));
                }
            }
            return Predicted::Yes(pos);
        }
        bump(&MISMATCHES);
        let confirmed = cycle.confirmed;
        self.cancel();
        if confirmed {
            self.history.clear();
            self.last_seen.clear();
        }
        Predicted::No {
            learned: self.learn(Entry::of(key, host)),
        }
    }

    /// The next copy the background thread should make, reserved against the lookahead.
    fn next_job(&mut self) -> Option<(u64, WeakHostTensor, u64)> {
        let lookahead = self.lookahead;
        let alive = self.alive_bytes;
        let cycle = self.cycle.as_mut()?;
        let n = cycle.order.len() as u64;
        cycle.scheduled = cycle.scheduled.max(cycle.expect);
        // Each key once: positions expect .. expect + n.
        while cycle.scheduled < cycle.expect + n {
            let entry = &cycle.order[(cycle.scheduled % n) as usize];
            if entry.bytes > lookahead {
                cycle.scheduled += 1; // never prefetched: its request uploads on demand
                continue;
            }
            if alive + entry.bytes > lookahead {
                return None;
            }
            let job = (cycle.scheduled, entry.view.clone(), entry.bytes);
            cycle.scheduled += 1;
            self.add_alive(job.2);
            self.in_flight = Some(InFlight {
                pos: job.0,
                generation: self.generation,
            });
            return Some(job);
        }
        None
    }

    /// Forgets a learned order whose buffers are not all alive (the model was dropped: frees
    /// the prefetched copies), and a learning history that refers to dropped buffers.
    fn drop_dead(&mut self) {
        let dead = |e: &Entry| !e.view.is_alive();
        if self
            .cycle
            .as_ref()
            .is_some_and(|c| c.order.iter().any(dead))
        {
            self.forget();
        } else if self.cycle.is_none() && self.history.iter().any(dead) {
            self.history = Vec::new();
            self.last_seen = HashMap::new();
        }
    }

    /// For a request predicted at position `pos` of the cycle of `generation`: its copy, a wait
    /// for the copy in flight, or an upload on demand (which the thread then skips). Drops the
    /// copies before `pos`, which no request will take.
    fn take(&mut self, pos: u64, generation: u64) -> Take<FloatTensor<B>> {
        if self.generation != generation {
            // Positions count from the start of each cycle: a copy of a newer cycle at `pos`
            // is another tensor.
            return Take::Upload { dropped: true };
        }
        while self.ready.front().is_some_and(|r| r.pos < pos) {
            let stale = self.ready.pop_front().expect("checked");
            self.sub_alive(stale.bytes);
            bump(&WASTED);
        }
        if self.ready.front().is_some_and(|r| r.pos == pos) {
            let r = self.ready.pop_front().expect("checked");
            self.sub_alive(r.bytes);
            return Take::Copy(r.tensor);
        }
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.pos == pos && f.generation == generation)
        {
            return Take::Wait;
        }
        if let Some(cycle) = self.cycle.as_mut() {
            cycle.scheduled = cycle.scheduled.max(pos + 1);
        }
        Take::Upload { dropped: false }
    }

    fn holds_anything(&self) -> bool {
        self.cycle.is_some() || !self.history.is_empty() || !self.ready.is_empty()
    }
}

enum Predicted {
    Yes(u64),
    No { learned: bool },
}

/// What a request predicted at a position gets now ([`State::take`]).
enum Take<T> {
    /// Its prefetched copy.
    Copy(T),
    /// Its copy is in flight: wait for it to land.
    Wait,
    /// Upload on demand: the copy was not started (or never is, being larger than the
    /// lookahead), or the copies of the request's cycle were dropped (`dropped`).
    Upload { dropped: bool },
}

/// One device's prefetcher: state shared by the op threads and the background thread.
struct Shared<B: OffloadTarget> {
    state: Mutex<State<B>>,
    /// Signals new work, a landed copy and shutdown (to the thread and to waiting requests).
    changed: Condvar,
}

impl<B: OffloadTarget> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the registry needs of a prefetcher of any backend type.
trait Prefetcher: Send + Sync {
    fn shutdown(&self);
}

impl<B: OffloadTarget> Prefetcher for Shared<B> {
    fn shutdown(&self) {
        let mut st = self.lock();
        st.forget();
        st.shutdown = true;
        drop(st);
        self.changed.notify_all();
    }
}

type AnyArc = Arc<dyn Any + Send + Sync>;

/// Prefetchers by wrapped backend type and compute device (the same `Arc` twice: typed and
/// erased).
#[allow(clippy::type_complexity)]
static REGISTRY: LazyLock<Mutex<HashMap<(TypeId, DeviceId), (AnyArc, Arc<dyn Prefetcher>)>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn prefetcher<B: OffloadTarget>(device: &B::Device) -> Arc<Shared<B>> {
    let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let key = (TypeId::of::<B>(), device.to_id());
    if let Some((any, _)) = registry.get(&key)
        && let Ok(shared) = any.clone().downcast::<Shared<B>>()
    {
        return shared;
    }
    let shared = Arc::new(Shared::<B> {
        state: Mutex::new(State::new()),
        changed: Condvar::new(),
    });
    registry.insert(key, (shared.clone(), shared.clone()));
    shared
}

/// Drops the prefetchers of compute device `id` (their copies and learned orders) and ends
/// their threads; called when the device's configuration changes.
pub(crate) fn forget_device(id: DeviceId) {
    let removed: Vec<_> = {
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<_> = registry.keys().filter(|k| k.1 == id).copied().collect();
        keys.into_iter()
            .filter_map(|k| registry.remove(&k))
            .collect()
    };
    for (_, p) in removed {
        p.shutdown();
    }
}

/// A transient device copy of `host` for one op, in prefetch mode: the prefetched copy when
/// there is one, else an upload on demand. Keeps at most `lookahead_bytes` prefetched.
pub(crate) fn upload<B: OffloadTarget>(
    host: &HostTensor,
    device: &B::Device,
    lookahead_bytes: u64,
) -> FloatTensor<B> {
    let shared = prefetcher::<B>(device);
    let mut st = shared.lock();
    st.lookahead = lookahead_bytes;
    if let Some(queue) = B::work_queue(device) {
        // The copy in flight, if any, was made without this queue; it is of an older
        // generation now, so it is dropped when it lands, and it was allocated before this
        // thread could free any prefetched copy.
        st.add_consumer(queue);
    }
    let pos = match st.predict(Key::of(host), host) {
        Predicted::Yes(pos) => pos,
        Predicted::No { learned } => {
            if learned && !st.worker_started {
                st.worker_started = spawn_worker(shared.clone(), device.clone());
            }
            drop(st);
            shared.changed.notify_all();
            bump(&MISSES);
            return B::upload(host, device);
        }
    };
    // The copies of this prediction's cycle: a mismatch of another thread's request while this
    // one waits drops them and learns a new cycle, whose positions start again.
    let generation = st.generation;
    loop {
        match st.take(pos, generation) {
            Take::Copy(tensor) => {
                drop(st);
                shared.changed.notify_all(); // room for the next copy
                bump(&HITS);
                return tensor;
            }
            Take::Wait => {
                let waiting = Instant::now();
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                add_elapsed(&WAIT_NS, waiting);
            }
            Take::Upload { dropped } => {
                let too_big = host.size_bytes() as u64 > st.lookahead;
                drop(st);
                shared.changed.notify_all();
                bump(if dropped || too_big { &MISSES } else { &LATE });
                return B::upload(host, device);
            }
        }
    }
}

/// [`OffloadTarget::release_uploads`], counted in [`PrefetchStats::releases`].
fn release<B: OffloadTarget>(device: &B::Device) {
    B::release_uploads(device);
    bump(&RELEASES);
}

fn spawn_worker<B: OffloadTarget>(shared: Arc<Shared<B>>, device: B::Device) -> bool {
    let spawned = std::thread::Builder::new()
        .name("burn-offload-prefetch".into())
        .spawn(move || worker::<B>(shared, device));
    match spawned {
        Ok(_) => true,
        Err(e) => {
            log::warn!("could not start the prefetch thread ({e}): uploading on demand");
            false
        }
    }
}

/// The background thread: makes the next copies of the cycle, within the lookahead.
fn worker<B: OffloadTarget>(shared: Arc<Shared<B>>, device: B::Device) {
    let mut st = shared.lock();
    // The host buffers of the uploads made since the target last released their sources
    // (weak, by identity): empty when there is nothing to release.
    let mut sources: HashMap<usize, WeakHostTensor> = HashMap::new();
    loop {
        if st.shutdown {
            drop(st);
            if !sources.is_empty() {
                release::<B>(&device);
            }
            return;
        }
        let Some((pos, view, bytes)) = st.next_job() else {
            if st.holds_anything() {
                // The lookahead is full (or the cycle is all prefetched): wait for a request
                // to take a copy. No release for that: it happens after nearly every copy
                // while a model runs, and on CUDA a release waits (on CubeCL's device
                // thread, which also launches the op threads' kernels) for every copy queued
                // on this thread's stream, which would serialise copies and compute.
                st = shared
                    .changed
                    .wait_timeout(st, LIVENESS_CHECK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                st.drop_dead();
                // Only a model dropped while another one keeps the thread busy (its requests
                // replaced the learned order) calls for a release here.
                if !sources.values().any(|s| !s.is_alive()) {
                    continue;
                }
            } else if sources.is_empty() {
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Nothing learned or held any more (the model was dropped, or its order was
            // forgotten), or a buffer copied from has died: let the target drop the host
            // buffers of the copies made (CUDA: this thread's stream queue, until two
            // flushes), which would keep a dropped model's pinned memory alive.
            drop(st);
            release::<B>(&device);
            sources.clear();
            st = shared.lock();
            continue;
        };
        let generation = st.generation;
        let consumers = st.consumers.clone();
        drop(st);
        // The strong reference lives only for the copy.
        let queueing = Instant::now();
        let copy = view.upgrade().map(|host| {
            catch_unwind(AssertUnwindSafe(|| {
                B::prefetch_upload(&host, &device, &consumers)
            }))
        });
        add_elapsed(&UPLOAD_NS, queueing);
        if matches!(copy, Some(Ok(Some(_)))) {
            sources.entry(view.buffer_id()).or_insert(view);
            // The copy is not handed out yet: the most this thread's memory holds.
            // Guarded like the upload: a panic here would leave `in_flight` set for good.
            if MEMORY_PROBE.load(Ordering::Acquire)
                && let Ok(Some(bytes)) =
                    catch_unwind(AssertUnwindSafe(|| B::device_bytes_in_use(&device)))
            {
                PEAK_DEVICE.fetch_max(bytes, Ordering::AcqRel);
            }
        }
        st = shared.lock();
        st.in_flight = None;
        let current = st.generation == generation && !st.shutdown;
        match copy {
            Some(Ok(Some(tensor))) => {
                bump(&PREFETCHED);
                if current {
                    st.ready.push_back(Ready { pos, tensor, bytes });
                } else {
                    st.sub_alive(bytes);
                    bump(&WASTED);
                }
            }
            Some(Ok(None) | Err(_)) => {
                log::warn!("a prefetch upload failed: forgetting the learned order");
                st.sub_alive(bytes);
                st.forget();
            }
            None => {
                st.sub_alive(bytes);
                st.forget(); // a buffer of the order is gone: the model was dropped
            }
        }
        shared.changed.notify_all();
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn_backend::TensorData;
    use burn_backend::ops::FloatTensorOps;
    use burn_ndarray::{NdArray, NdArrayDevice};

    use super::*;

    fn ready(pos: u64) -> Ready<FloatTensor<NdArray>> {
        let tensor = <NdArray as FloatTensorOps<NdArray>>::float_from_data(
            TensorData::new(vec![0f32; 4], [4]),
            &NdArrayDevice::Cpu,
        );
        Ready {
            pos,
            tensor,
            bytes: 16,
        }
    }

    #[test]
    fn a_request_never_takes_a_copy_of_a_newer_cycle() {
        let mut st = State::<NdArray>::new();
        st.lookahead = 1 << 20;
        st.ready.push_back(ready(1));
        st.add_alive(16);
        let predicted_in = st.generation;
        // While the request waits, another thread's mismatch drops the copies, and the new
        // cycle's copy at the same position lands (another tensor).
        st.cancel();
        st.ready.push_back(ready(1));
        st.add_alive(16);
        assert!(matches!(
            st.take(1, predicted_in),
            Take::Upload { dropped: true }
        ));
        assert_eq!(
            (st.ready.len(), st.alive_bytes),
            (1, 16),
            "left for its own request"
        );
        // A request of the new cycle takes it.
        assert!(matches!(st.take(1, st.generation), Take::Copy(_)));
        assert_eq!(st.alive_bytes, 0);
    }

    #[test]
    fn a_new_consumer_drops_the_copies_made_without_it() {
        let mut st = State::<NdArray>::new();
        st.lookahead = 1 << 20;
        for pos in 1..3 {
            st.ready.push_back(ready(pos));
            st.add_alive(16);
        }
        assert!(st.add_consumer(7));
        assert!(st.ready.is_empty() && st.alive_bytes == 0 && st.cycle.is_none());
        assert_eq!((st.generation, st.consumers.clone()), (1, vec![7]));

        // A known consumer changes nothing.
        st.ready.push_back(ready(3));
        st.add_alive(16);
        assert!(!st.add_consumer(7));
        assert_eq!((st.ready.len(), st.alive_bytes, st.generation), (1, 16, 1));

        // Another thread's queue is added to the set the copies wait for.
        assert!(st.add_consumer(9));
        assert_eq!((st.generation, st.consumers.clone()), (2, vec![7, 9]));
        assert!(st.ready.is_empty());
    }
}
