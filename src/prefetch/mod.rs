//! [`OffloadMode::Prefetch`](crate::OffloadMode::Prefetch): transient copies of offloaded
//! tensors made ahead of time, on a background thread, in an order learned at run time.
//!
//! Model-agnostic: nothing is configured per layer (unlike vLLM's `PrefetchOffloader`, which
//! needs layer groups and only reaches the decoder stack). Per model (its
//! [`OffloadContext`]), compute device and wrapped backend type, a
//! prefetcher watches the transient uploads that ops ask for:
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
//! ([`OffloadTarget::release_uploads`], counted in
//! [`PrefetchStats::releases`](crate::PrefetchStats::releases)), and only then: on CUDA a
//! release holds up CubeCL's device thread, which launches every thread's kernels, until all
//! the copies queued on the prefetch stream are done; released whenever the lookahead is full
//! (after nearly every copy) it would serialise copies and compute.
//! It also releases once when a buffer it copied from has died while another model keeps it
//! busy (that model's requests replaced the dropped one's order, so it never holds nothing):
//! it keeps weak references to the buffers of the copies made since its last release.
//! Dropping the model's context (its last tensor, and the report) drops its prefetchers and
//! ends their threads; another model's prefetchers are untouched.
//!
//! **Threads.** One thread per context, device and backend type, started when the first cycle is
//! learned; it parks on a condition variable when idle and never blocks process exit.
//!
//! **CubeCL targets (CUDA, wgpu, ROCm).** The thread makes its copies with the target's
//! `prefetch_upload`. CubeCL gives each thread its own stream, so the copies run on a second
//! stream and, on CUDA, overlap the kernels of the op thread (wgpu has one queue for every
//! stream: no overlap on the device). A fused backend's copies stay unfused until the op thread
//! takes one ([`OffloadTarget::take_staged`] registers it in that thread's fusion stream).
//! Both directions are ordered on the device: a copy read on the op thread's stream
//! waits for its DMA (CubeCL's cross-stream events), and each DMA waits for the work already
//! queued on the op threads' streams ([`OffloadTarget::work_queue`]), because a dropped copy's
//! memory goes back to the prefetch stream's pool while kernels that read it may still be
//! queued: without that wait the next copy could overwrite it (seen on an H100 as logits that
//! differed from copy mode's). A thread that requests copies for the first time makes the
//! prefetcher drop its copies and relearn, so that no copy ordered without it is handed to it.
//!
//! **Through the copy engine** ([`PrefetchCopies::Engine`](crate::PrefetchCopies::Engine),
//! `prefetch:<bytes>:engine`): the same learning and prediction, but the copies go into the
//! ring of a copy engine of the model's context, one fill per group of the learned order, and
//! op threads acquire and release whole groups at group boundaries, behind a drain of their
//! fused stream; see [`engine`].
//!
//! **Limitations.** One learned cycle per model and device: threads that run the same model
//! with different read orders interleave their requests and mostly miss. A view whose key
//! changes every step (a slice of an offloaded tensor at a moving offset) mismatches once per step. A request that
//! skips ahead in the cycle is a mismatch (the prefetched copies are dropped, not searched).

mod cycle;
pub mod engine;
mod worker;

pub(crate) use engine::{end_ring_leases, op_ended, ring_takes};

use std::any::TypeId;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn_backend::{Device as _, tensor::FloatTensor};

use crate::context::OffloadContext;
use crate::host::HostTensor;
use crate::inner::OffloadTarget;
use crate::stats::Counter;
use cycle::{Key, Predicted, Take};
use worker::{Shared, spawn_worker};

/// How often an idle prefetch thread that holds copies or a learned order checks that the
/// host buffers of that order are still alive.
pub const LIVENESS_CHECK: Duration = Duration::from_millis(50);

/// Whether prefetch threads measure their device memory after each copy.
static MEMORY_PROBE: AtomicBool = AtomicBool::new(false);

/// Turns on (or off) the measurement of
/// [`PrefetchStats::peak_device_bytes`](crate::PrefetchStats::peak_device_bytes): after each
/// copy the prefetch thread asks the target how much device memory its allocations hold. On
/// CUDA that is a blocking round trip to CubeCL's device thread per copy, which costs overlap:
/// for tests and diagnostics, not for timed runs. Off by default.
///
/// Process-wide: a diagnostic switch, like a log level, not a property of a model.
pub fn set_prefetch_memory_probe(on: bool) {
    MEMORY_PROBE.store(on, Ordering::Release);
}

fn memory_probe() -> bool {
    MEMORY_PROBE.load(Ordering::Acquire)
}

/// A transient device copy of `host` for one op, in prefetch mode: the prefetched copy when
/// there is one, else an upload on demand. Keeps at most `lookahead_bytes` prefetched.
pub(crate) fn upload<B: OffloadTarget>(
    host: &HostTensor,
    device: &B::Device,
    context: &OffloadContext,
    lookahead_bytes: u64,
) -> FloatTensor<B> {
    let shared = context.prefetcher(TypeId::of::<B>(), device.to_id(), || {
        Arc::new(Shared::<B>::new(context.counters().clone()))
    });
    let counters = context.counters();
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
            counters.bump(Counter::Misses);
            return B::upload(host, device);
        }
    };
    // The copies of this prediction's cycle: a mismatch of another thread's request while this
    // one waits drops them and learns a new cycle, whose positions start again.
    let generation = st.generation;
    loop {
        match st.take(pos, generation) {
            Take::Copy(staged) => {
                drop(st);
                shared.changed.notify_all(); // room for the next copy
                counters.bump(Counter::Hits);
                return B::take_staged(staged);
            }
            Take::Wait => {
                let waiting = Instant::now();
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                counters.add_elapsed(Counter::WaitNs, waiting);
            }
            Take::Upload { dropped } => {
                let too_big = host.size_bytes() as u64 > st.lookahead;
                drop(st);
                shared.changed.notify_all();
                counters.bump(if dropped || too_big {
                    Counter::Misses
                } else {
                    Counter::Late
                });
                return B::upload(host, device);
            }
        }
    }
}
