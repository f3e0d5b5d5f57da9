//! The prefetch thread: makes the next copies of the learned cycle within the lookahead, one
//! per context, wrapped backend and compute device, and lets the target release its upload
//! sources once it holds nothing (see the [module docs](super)).

use std::any::Any;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::LIVENESS_CHECK;
use super::cycle::{Ready, State};
use crate::context::AnyPrefetcher;
use crate::host::WeakHostTensor;
use crate::inner::OffloadTarget;
use crate::stats::{Counter, PrefetchCounters};

/// One prefetcher: state shared by the op threads and the background thread.
pub(crate) struct Shared<B: OffloadTarget> {
    pub(crate) state: Mutex<State<B>>,
    /// Signals new work, a landed copy and shutdown (to the thread and to waiting requests).
    pub(crate) changed: Condvar,
}

impl<B: OffloadTarget> Shared<B> {
    pub(crate) fn new(counters: Arc<PrefetchCounters>) -> Self {
        Self {
            state: Mutex::new(State::new(counters)),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B: OffloadTarget> AnyPrefetcher for Shared<B> {
    fn shutdown(&self) {
        let mut st = self.lock();
        st.forget();
        st.shutdown = true;
        drop(st);
        self.changed.notify_all();
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// [`OffloadTarget::release_uploads`], counted in [`PrefetchStats::releases`].
fn release<B: OffloadTarget>(device: &B::Device, counters: &PrefetchCounters) {
    B::release_uploads(device);
    counters.bump(Counter::Releases);
}

pub(crate) fn spawn_worker<B: OffloadTarget>(shared: Arc<Shared<B>>, device: B::Device) -> bool {
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
    let counters = st.counters.clone();
    // The host buffers of the uploads made since the target last released their sources
    // (weak, by identity): empty when there is nothing to release.
    let mut sources: HashMap<usize, WeakHostTensor> = HashMap::new();
    loop {
        if st.shutdown {
            drop(st);
            if !sources.is_empty() {
                release::<B>(&device, &counters);
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
            release::<B>(&device, &counters);
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
        counters.add_elapsed(Counter::UploadNs, queueing);
        if matches!(copy, Some(Ok(Some(_)))) {
            sources.entry(view.buffer_id()).or_insert(view);
            // The copy is not handed out yet: the most this thread's memory holds.
            // Guarded like the upload: a panic here would leave `in_flight` set for good.
            if super::memory_probe()
                && let Ok(Some(bytes)) =
                    catch_unwind(AssertUnwindSafe(|| B::device_bytes_in_use(&device)))
            {
                counters.device_reading(bytes);
            }
        }
        st = shared.lock();
        st.in_flight = None;
        let current = st.generation == generation && !st.shutdown;
        match copy {
            Some(Ok(Some(tensor))) => {
                counters.bump(Counter::Prefetched);
                if current {
                    st.ready.push_back(Ready { pos, tensor, bytes });
                } else {
                    st.sub_alive(bytes);
                    counters.bump(Counter::Wasted);
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
