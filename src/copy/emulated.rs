//! The CPU reference of [`CopyStreams`]: every stream is a thread that runs its queued work in
//! order (the copy stream, and one op stream per op thread, as CubeCL gives each OS thread its
//! own stream), the flags are counters behind a condition variable, and the ring is a byte
//! vector. A queued wait blocks its stream's thread, not the caller, as a stream wait does.
//!
//! Tests read regions with [`EmulatedStreams::read`], an emulated kernel on the calling
//! thread's op stream that pauses half-way, so a copy that overwrites the region too early is
//! caught. [`Faults`] skip one side's waits, to show that such checks fail when the protocol
//! is broken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{CopyError, CopyJob, CopyStreams, Region, RingShape, Wait, reached};

/// Waits to leave out, to check that tests of the protocol can fail.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// The copy stream does not wait for readers before overwriting a region.
    pub skip_copy_wait: bool,
    /// Op streams do not wait for a region's copy before reading it.
    pub skip_op_wait: bool,
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread running queued work in order.
struct Stream {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Jobs queued and not finished.
    pending: Arc<(Mutex<usize>, Condvar)>,
}

impl Stream {
    fn new(name: String) -> Self {
        let (tx, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawning an emulated stream");
        Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            pending: Arc::new((Mutex::new(0), Condvar::new())),
        }
    }

    fn enqueue(&self, job: impl FnOnce() + Send + 'static) {
        let pending = self.pending.clone();
        *lock(&pending.0) += 1;
        let job: Job = Box::new(move || {
            job();
            *lock(&pending.0) -= 1;
            pending.1.notify_all();
        });
        if let Some(tx) = lock(&self.tx).as_ref() {
            // The thread only ends once the sender is dropped (in `Drop`).
            let _ = tx.send(job);
        }
    }

    fn drain(&self) {
        let (count, idle) = &*self.pending;
        let mut n = lock(count);
        while *n > 0 {
            n = idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        lock(&self.tx).take();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The flags: `copy_done[slot]`, then `reader_done[slot][consumer]`.
struct Flags {
    values: Mutex<Vec<u32>>,
    changed: Condvar,
    /// Set when the streams are dropped: waits give up so the threads can end.
    shutdown: AtomicBool,
}

impl Flags {
    fn wait(&self, index: usize, value: u32) {
        let mut values = lock(&self.values);
        while !reached(values[index], value) && !self.shutdown.load(Ordering::Acquire) {
            values = self.changed.wait(values).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn set(&self, index: usize, value: u32) {
        lock(&self.values)[index] = value;
        self.changed.notify_all();
    }
}

static NEXT_QUEUE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The emulated op queue of this OS thread (like CubeCL's `StreamId::current()`).
    static QUEUE: u64 = NEXT_QUEUE.fetch_add(1, Ordering::Relaxed);
}

/// Streams, flags and ring emulated on the CPU (see the [module docs](self)).
pub struct EmulatedStreams {
    shape: RingShape,
    memory: Arc<Mutex<Vec<u8>>>,
    flags: Arc<Flags>,
    faults: Faults,
    /// Sleep per copy, emulating the bus.
    copy_delay: Duration,
    batches: AtomicUsize,
    // Streams last: dropped after the fields their jobs share.
    ops: Mutex<HashMap<u64, Arc<Stream>>>,
    copy: Stream,
}

impl EmulatedStreams {
    /// A ring of `capacity` bytes, `slots` sets of flags, room for `consumers` op threads.
    pub fn new(capacity: u64, slots: usize, consumers: usize) -> Self {
        let shape = RingShape {
            capacity,
            slots,
            consumers,
            align: 1,
        };
        let flags = Flags {
            values: Mutex::new(vec![0; shape.flag_words()]),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
        };
        Self {
            shape,
            memory: Arc::new(Mutex::new(vec![0; capacity as usize])),
            flags: Arc::new(flags),
            faults: Faults::default(),
            copy_delay: Duration::ZERO,
            batches: AtomicUsize::new(0),
            ops: Mutex::new(HashMap::new()),
            copy: Stream::new("emulated-copy-stream".into()),
        }
    }

    /// With waits left out (see [`Faults`]).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Each copy takes at least `delay` on the copy stream.
    pub fn with_copy_delay(mut self, delay: Duration) -> Self {
        self.copy_delay = delay;
        self
    }

    /// Batches of copies queued so far ([`CopyStreams::copy`] calls).
    pub fn batches(&self) -> usize {
        self.batches.load(Ordering::Acquire)
    }

    /// Op streams made so far (one per op thread that used the engine).
    pub fn op_streams(&self) -> usize {
        lock(&self.ops).len()
    }

    fn op_stream(&self) -> Arc<Stream> {
        let queue = self.current_queue();
        lock(&self.ops)
            .entry(queue)
            .or_insert_with(|| Arc::new(Stream::new(format!("emulated-op-stream-{queue}"))))
            .clone()
    }

    /// An emulated kernel on the calling thread's op stream that reads `region` (half, then a
    /// pause of `pause`, then the other half) and hands the bytes to `done`; refused before it
    /// is queued if the region does not lie inside the ring.
    pub fn read(
        &self,
        region: &Region,
        pause: Duration,
        done: impl FnOnce(Vec<u8>) + Send + 'static,
    ) -> Result<(), CopyError> {
        self.shape.check_span(region.offset, region.len)?;
        let memory = self.memory.clone();
        let (start, len) = (region.offset as usize, region.len as usize);
        self.op_stream().enqueue(move || {
            let mut bytes = lock(&memory)[start..start + len / 2].to_vec();
            std::thread::sleep(pause);
            bytes.extend_from_slice(&lock(&memory)[start + len / 2..start + len]);
            done(bytes);
        });
        Ok(())
    }

    /// Waits until every stream has run all its queued work.
    pub fn drain(&self) {
        self.copy.drain();
        let ops: Vec<Arc<Stream>> = lock(&self.ops).values().cloned().collect();
        for s in ops {
            s.drain();
        }
    }
}

impl Drop for EmulatedStreams {
    fn drop(&mut self) {
        // Queued copies still run (they hold their sources); waits no longer block.
        self.flags.shutdown.store(true, Ordering::Release);
        self.flags.changed.notify_all();
    }
}

impl CopyStreams for EmulatedStreams {
    fn shape(&self) -> RingShape {
        self.shape
    }

    fn current_queue(&self) -> u64 {
        QUEUE.with(|q| *q)
    }

    fn copy_wait(&self, wait: Wait) -> Result<(), CopyError> {
        if self.faults.skip_copy_wait {
            return Ok(());
        }
        let index = self.shape.reader_flag(wait.slot, wait.consumer)?;
        let flags = self.flags.clone();
        self.copy.enqueue(move || flags.wait(index, wait.value));
        Ok(())
    }

    fn copy(&self, jobs: Vec<CopyJob>) -> Result<(), CopyError> {
        for job in &jobs {
            self.shape.check_span(job.offset, job.source.len())?;
        }
        self.batches.fetch_add(1, Ordering::AcqRel);
        let memory = self.memory.clone();
        let delay = self.copy_delay;
        self.copy.enqueue(move || {
            for job in jobs {
                std::thread::sleep(delay);
                let start = job.offset as usize;
                let bytes = job.source.bytes();
                lock(&memory)[start..start + bytes.len()].copy_from_slice(bytes);
            }
        });
        Ok(())
    }

    fn copy_signal(&self, slot: usize, value: u32) -> Result<(), CopyError> {
        let index = self.shape.copy_flag(slot)?;
        let flags = self.flags.clone();
        self.copy.enqueue(move || flags.set(index, value));
        Ok(())
    }

    fn op_wait(&self, slot: usize, value: u32) -> Result<(), CopyError> {
        let index = self.shape.copy_flag(slot)?;
        if self.faults.skip_op_wait {
            return Ok(());
        }
        let flags = self.flags.clone();
        self.op_stream().enqueue(move || flags.wait(index, value));
        Ok(())
    }

    fn op_signal(&self, slot: usize, consumer: usize, value: u32) -> Result<(), CopyError> {
        let index = self.shape.reader_flag(slot, consumer)?;
        let flags = self.flags.clone();
        self.op_stream().enqueue(move || flags.set(index, value));
        Ok(())
    }
}
