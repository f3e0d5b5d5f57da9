//! The prefetcher's state machine: learning a cycle of reads, predicting the next request,
//! choosing the next copy within the lookahead, and handing copies to requests. Pure (no
//! threads, no device work): [`super::worker`] and [`super::upload`] drive it under a lock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use burn_backend::DType;

use crate::host::{HostTensor, WeakHostTensor};
use crate::inner::OffloadTarget;
use crate::stats::{Counter, PrefetchCounters};

/// The longest learning history kept (keys); a longer one is dropped and learning restarts.
const HISTORY_CAP: usize = 1 << 16;

/// The identity of a host view.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    /// The buffer's `Arc` pointer. Unique while the prefetcher holds a `Weak` of it (the
    /// allocation is not reused before the last `Weak` goes).
    pub(crate) buffer: usize,
    pub(crate) offset: usize,
    pub(crate) shape: Vec<usize>,
    pub(crate) strides: Vec<isize>,
    pub(crate) dtype: DType,
}

impl Key {
    pub(crate) fn of(host: &HostTensor) -> Self {
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
pub(crate) struct Entry {
    pub(crate) key: Key,
    pub(crate) view: WeakHostTensor,
    pub(crate) bytes: u64,
}

impl Entry {
    pub(crate) fn of(key: Key, host: &HostTensor) -> Self {
        Self {
            key,
            view: host.downgrade(),
            bytes: host.size_bytes() as u64,
        }
    }
}

/// A learned cycle and where the requests and the background thread are in it. Positions
/// are absolute (they keep growing); position `p` is `order[p % order.len()]`.
pub(crate) struct Cycle {
    pub(crate) order: Vec<Entry>,
    /// The position the next request should be.
    pub(crate) expect: u64,
    /// The next position the background thread will consider.
    pub(crate) scheduled: u64,
    /// Whether the cycle was followed once all the way round.
    pub(crate) confirmed: bool,
    /// Requests that followed the cycle since it was learned (until confirmed).
    pub(crate) followed: usize,
}

/// A prefetched copy, not yet handed to an op.
pub(crate) struct Ready<T> {
    pub(crate) pos: u64,
    pub(crate) tensor: T,
    pub(crate) bytes: u64,
}

/// The copy the background thread is making.
pub(crate) struct InFlight {
    pub(crate) pos: u64,
    pub(crate) generation: u64,
}

pub(crate) struct State<B: OffloadTarget> {
    /// The counters of the context this prefetcher belongs to.
    pub(crate) counters: Arc<PrefetchCounters>,
    pub(crate) lookahead: u64,
    pub(crate) history: Vec<Entry>,
    /// Key → index of its latest occurrence in `history`.
    pub(crate) last_seen: HashMap<Key, usize>,
    pub(crate) cycle: Option<Cycle>,
    /// Prefetched copies, in increasing position.
    pub(crate) ready: VecDeque<Ready<B::Staged>>,
    pub(crate) in_flight: Option<InFlight>,
    /// Bytes of `ready` and of the copy in flight (counted until the thread has dropped or
    /// queued it, so a cancelled copy still counts against the lookahead).
    pub(crate) alive_bytes: u64,
    /// Bumped whenever the prefetched copies are dropped: an in-flight copy of an older
    /// generation is dropped when it lands.
    pub(crate) generation: u64,
    pub(crate) worker_started: bool,
    pub(crate) shutdown: bool,
    /// The work queues of the op threads that requested copies
    /// ([`OffloadTarget::work_queue`]): every copy is ordered after their queued work.
    pub(crate) consumers: Vec<u64>,
}

impl<B: OffloadTarget> State<B> {
    pub(crate) fn new(counters: Arc<PrefetchCounters>) -> Self {
        Self {
            counters,
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

    pub(crate) fn add_alive(&mut self, bytes: u64) {
        self.alive_bytes += bytes;
        self.counters.add_alive(bytes);
    }

    pub(crate) fn sub_alive(&mut self, bytes: u64) {
        self.alive_bytes -= bytes;
        self.counters.sub_alive(bytes);
    }

    /// Drops every prefetched copy (an in-flight one when it lands) and the cycle.
    pub(crate) fn cancel(&mut self) {
        while let Some(r) = self.ready.pop_front() {
            self.sub_alive(r.bytes);
            self.counters.bump(Counter::Wasted);
        }
        self.generation += 1;
        self.cycle = None;
    }

    /// Records the work queue of an op thread. A new one drops the prefetched copies and the
    /// cycle (returns `true`): they were ordered after the other threads' work only. The list
    /// only grows (a queue left out could still be reading a copy whose memory the next one
    /// reuses), so each thread that ever requested a copy costs every later copy one wait.
    pub(crate) fn add_consumer(&mut self, queue: u64) -> bool {
        if self.consumers.contains(&queue) {
            return false;
        }
        self.consumers.push(queue);
        self.cancel();
        true
    }

    /// Forgets everything learned (and drops the prefetched copies).
    pub(crate) fn forget(&mut self) {
        self.cancel();
        self.history = Vec::new();
        self.last_seen = HashMap::new();
    }

    pub(crate) fn remember(&mut self, entry: Entry) {
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
    pub(crate) fn learn(&mut self, entry: Entry) -> bool {
        let learned = match self.last_seen.get(&entry.key) {
            Some(&j) => {
                self.cycle = Some(Cycle {
                    order: self.history[j..].to_vec(),
                    expect: 1,
                    scheduled: 1,
                    confirmed: false,
                    followed: 1,
                });
                self.counters.bump(Counter::Relearns);
                true
            }
            None => false,
        };
        self.remember(entry);
        learned
    }

    /// The position of this request in the cycle when it is the predicted one; else handles
    /// the mismatch or learns, and returns `None` (upload on demand).
    pub(crate) fn predict(&mut self, key: Key, host: &HostTensor) -> Predicted {
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
        self.counters.bump(Counter::Mismatches);
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
    pub(crate) fn next_job(&mut self) -> Option<(u64, WeakHostTensor, u64)> {
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
    pub(crate) fn drop_dead(&mut self) {
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
    pub(crate) fn take(&mut self, pos: u64, generation: u64) -> Take<B::Staged> {
        if self.generation != generation {
            // Positions count from the start of each cycle: a copy of a newer cycle at `pos`
            // is another tensor.
            return Take::Upload { dropped: true };
        }
        while self.ready.front().is_some_and(|r| r.pos < pos) {
            let stale = self.ready.pop_front().expect("checked");
            self.sub_alive(stale.bytes);
            self.counters.bump(Counter::Wasted);
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

    pub(crate) fn holds_anything(&self) -> bool {
        self.cycle.is_some() || !self.history.is_empty() || !self.ready.is_empty()
    }
}

pub(crate) enum Predicted {
    Yes(u64),
    No { learned: bool },
}

/// What a request predicted at a position gets now ([`State::take`]).
pub(crate) enum Take<T> {
    /// Its prefetched copy.
    Copy(T),
    /// Its copy is in flight: wait for it to land.
    Wait,
    /// Upload on demand: the copy was not started (or never is, being larger than the
    /// lookahead), or the copies of the request's cycle were dropped (`dropped`).
    Upload { dropped: bool },
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn_backend::TensorData;
    use burn_backend::ops::FloatTensorOps;
    use burn_backend::tensor::FloatTensor;
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
        let mut st = State::<NdArray>::new(Default::default());
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
        let mut st = State::<NdArray>::new(Default::default());
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
