//! The copy engine's protocol on the CPU emulation of streams and events
//! (`burn_offload::copy::emulated`): every read sees its copy, a region is overwritten only
//! behind its readers, several op threads, an order change, an engine dropped mid-cycle. Each
//! ordering property is also run with the wait that guarantees it left out ([`Faults`]), to
//! show that the check fails then.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use burn_offload::HostBuffer;
use burn_offload::copy::emulated::{EmulatedStreams, Faults};
use burn_offload::copy::{CopyEngine, CopyError, CopySource, Region};

const KIB: usize = 1024;

/// `n` host weights of the given sizes, each with its own byte pattern.
fn weights(sizes: &[usize]) -> Vec<Arc<HostBuffer>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut b = HostBuffer::pageable(len).unwrap();
            for (j, v) in b.as_mut_slice().iter_mut().enumerate() {
                *v = ((i * 31 + j * 7 + 1) % 251) as u8;
            }
            Arc::new(b)
        })
        .collect()
}

/// Sizes of a small "model": 10 weights of 3..40 KiB.
fn model_sizes() -> Vec<usize> {
    [12, 40, 3, 24, 24, 8, 33, 16, 5, 20]
        .iter()
        .map(|k| k * KIB)
        .collect()
}

/// What the op threads saw.
#[derive(Default)]
struct Seen {
    reads: AtomicUsize,
    wrong: AtomicUsize,
}

/// One op thread: for each region it receives, acquire, read (an emulated kernel that pauses
/// half-way for `pause`), release, all queued without waiting; then waits for its stream.
fn op_thread(
    engine: Arc<CopyEngine<EmulatedStreams>>,
    weights: Vec<Arc<HostBuffer>>,
    rx: Receiver<(usize, Region)>,
    pause: Duration,
    seen: Arc<Seen>,
) -> std::thread::JoinHandle<Vec<Region>> {
    std::thread::spawn(move || {
        let mut regions = Vec::new();
        for (w, region) in rx {
            engine.acquire(&region).unwrap();
            let expected = weights[w].clone();
            let seen = seen.clone();
            engine
                .streams()
                .read(&region, pause, move |bytes| {
                    seen.reads.fetch_add(1, Ordering::AcqRel);
                    if bytes != expected.as_slice() {
                        seen.wrong.fetch_add(1, Ordering::AcqRel);
                    }
                })
                .unwrap();
            engine.release(&region).unwrap();
            regions.push(region);
        }
        engine.streams().drain();
        regions
    })
}

/// Fills `order` `cycles` times in groups of `group`, handing the regions to the op threads in
/// turn, which read them. Returns what was seen, the regions, and the copy batches queued.
fn run(
    streams: EmulatedStreams,
    order: &[usize],
    cycles: usize,
    group: usize,
    op_threads: usize,
    pause: Duration,
) -> (Arc<Seen>, Vec<Region>, usize) {
    let engine = Arc::new(CopyEngine::new(streams));
    let weights = weights(&model_sizes());
    let seen = Arc::new(Seen::default());
    let (senders, threads): (Vec<_>, Vec<_>) = (0..op_threads)
        .map(|_| {
            let (tx, rx) = channel();
            let t = op_thread(engine.clone(), weights.clone(), rx, pause, seen.clone());
            (tx, t)
        })
        .unzip();
    let mut sent = 0;
    for _ in 0..cycles {
        for chunk in order.chunks(group) {
            let sources = chunk
                .iter()
                .map(|&w| CopySource::whole(weights[w].clone()))
                .collect();
            let regions = engine.fill(sources).unwrap();
            for (&w, region) in chunk.iter().zip(regions) {
                // Each copy goes to one op thread (as each prefetched copy goes to one
                // request), in turn.
                senders[sent % senders.len()].send((w, region)).unwrap();
                sent += 1;
            }
        }
    }
    drop(senders);
    let mut regions = Vec::new();
    for t in threads {
        regions.extend(t.join().unwrap());
    }
    engine.streams().drain();
    let batches = engine.streams().batches();
    (seen, regions, batches)
}

fn order() -> Vec<usize> {
    (0..model_sizes().len()).collect()
}

#[test]
fn every_read_sees_its_copy_and_the_ring_is_reused() {
    let streams =
        EmulatedStreams::new(128 * KIB as u64, 16, 4).with_copy_delay(Duration::from_micros(200));
    let (seen, regions, batches) = run(streams, &order(), 3, 3, 1, Duration::from_micros(200));
    assert_eq!(seen.reads.load(Ordering::Acquire), 30);
    assert_eq!(seen.wrong.load(Ordering::Acquire), 0);
    // 3 cycles of 10 weights in groups of 3: 4 groups a cycle, one batch each.
    assert_eq!(batches, 12);
    // 3 x 195 KiB went through 128 KiB: the ring wrapped, and every region stayed inside it.
    let wraps = regions.iter().filter(|r| r.offset == 0).count();
    assert!(wraps >= 4, "the ring wrapped {wraps} times");
    assert!(regions.iter().all(|r| r.offset + r.len <= 128 * KIB as u64));
    // Regions of one cycle in fill order do not overlap those still live then: checked by
    // the reads above; and slots were reused with growing generations.
    let max_gen = regions.iter().map(|r| r.generation).max().unwrap();
    assert!(max_gen > 1);
}

#[test]
fn without_the_op_wait_reads_race_their_copies() {
    let streams = EmulatedStreams::new(128 * KIB as u64, 16, 4)
        .with_copy_delay(Duration::from_millis(2))
        .with_faults(Faults {
            skip_op_wait: true,
            ..Faults::default()
        });
    let (seen, _, _) = run(streams, &order(), 2, 3, 1, Duration::ZERO);
    assert!(
        seen.wrong.load(Ordering::Acquire) > 0,
        "reads that do not wait for their copy must see other bytes"
    );
}

#[test]
fn a_region_is_overwritten_only_behind_its_readers() {
    // Slow readers: the op stream lags behind the host, which releases each region as soon
    // as its read is queued. The copy stream must wait for the reads on the device side.
    let slow = Duration::from_millis(2);
    let streams = EmulatedStreams::new(96 * KIB as u64, 16, 4);
    let (seen, _, _) = run(streams, &order(), 2, 2, 1, slow);
    assert_eq!(seen.wrong.load(Ordering::Acquire), 0);

    let broken = EmulatedStreams::new(96 * KIB as u64, 16, 4).with_faults(Faults {
        skip_copy_wait: true,
        ..Faults::default()
    });
    let (seen, _, _) = run(broken, &order(), 2, 2, 1, slow);
    assert!(
        seen.wrong.load(Ordering::Acquire) > 0,
        "a copy that does not wait for the readers must overwrite bytes being read"
    );
}

#[test]
fn several_op_threads_take_turns_reading_the_ring() {
    let streams =
        EmulatedStreams::new(160 * KIB as u64, 16, 4).with_copy_delay(Duration::from_micros(100));
    let engine_threads = 3;
    let (seen, regions, _) = run(
        streams,
        &order(),
        2,
        4,
        engine_threads,
        Duration::from_micros(300),
    );
    assert_eq!(seen.reads.load(Ordering::Acquire), 20);
    assert_eq!(seen.wrong.load(Ordering::Acquire), 0);
    assert_eq!(regions.len(), 20);

    // The same with the copy-side wait left out: some thread's read gets overwritten.
    let broken = EmulatedStreams::new(160 * KIB as u64, 16, 4).with_faults(Faults {
        skip_copy_wait: true,
        ..Faults::default()
    });
    let (seen, _, _) = run(broken, &order(), 2, 4, 3, Duration::from_millis(2));
    assert!(seen.wrong.load(Ordering::Acquire) > 0);
}

#[test]
fn each_op_thread_gets_its_own_queue_and_the_limit_is_an_error() {
    let engine = Arc::new(CopyEngine::new(EmulatedStreams::new(1024, 4, 1)));
    let w = weights(&[16]);
    let r = engine.fill(vec![CopySource::whole(w[0].clone())]).unwrap()[0];
    engine.acquire(&r).unwrap();
    let other = engine.clone();
    let err = std::thread::spawn(move || other.acquire(&r).unwrap_err())
        .join()
        .unwrap();
    assert_eq!(err, CopyError::TooManyConsumers { max: 1 });
    assert!(err.to_string().contains("more consumers"));
    engine.release(&r).unwrap();
    assert_eq!(engine.streams().op_streams(), 1);
}

#[test]
fn an_order_change_discards_what_was_not_taken() {
    let weights = weights(&model_sizes());
    let engine = CopyEngine::new(EmulatedStreams::new(64 * KIB as u64, 16, 2));
    let whole = |w: usize| CopySource::whole(weights[w].clone());
    // Prefetched ahead in order 0, 1, 2, 3 (12 + 40 + 3 + 24 KiB: the ring is nearly full).
    let ahead = engine.fill(vec![whole(0), whole(1)]).unwrap();
    let more = engine.fill(vec![whole(2)]).unwrap();
    // The op side reads weight 0, then asks for weight 9: the order changed.
    engine.acquire(&ahead[0]).unwrap();
    engine.release(&ahead[0]).unwrap();
    engine.discard_untaken();
    for r in [ahead[1], more[0]] {
        assert!(matches!(
            engine.acquire(&r),
            Err(CopyError::Region { what: "taken", .. })
        ));
    }
    // The new order fills the room the discarded copies held, without blocking.
    let new_order = [9, 5, 1, 7, 3];
    let (tx, rx) = channel();
    let filler = std::thread::scope(|s| {
        let h = s.spawn(|| {
            for &w in &new_order {
                let r = engine.fill(vec![whole(w)]).unwrap()[0];
                tx.send((w, r)).unwrap();
            }
        });
        let mut wrong = 0;
        for (w, r) in rx.iter().take(new_order.len()) {
            engine.acquire(&r).unwrap();
            let expected = weights[w].clone();
            let (done_tx, done_rx) = channel();
            engine
                .streams()
                .read(&r, Duration::ZERO, move |bytes| {
                    done_tx.send(bytes == expected.as_slice()).unwrap();
                })
                .unwrap();
            engine.release(&r).unwrap();
            wrong += usize::from(!done_rx.recv().unwrap());
        }
        h.join().unwrap();
        wrong
    });
    assert_eq!(filler, 0);
}

/// Weak references to the weights, to check they are freed.
fn weak(weights: &[Arc<HostBuffer>]) -> Vec<Weak<HostBuffer>> {
    weights.iter().map(Arc::downgrade).collect()
}

#[test]
fn an_engine_dropped_mid_cycle_frees_everything_and_wakes_its_filler() {
    let weights = weights(&model_sizes());
    let weak_weights = weak(&weights);
    let engine = Arc::new(CopyEngine::new(
        EmulatedStreams::new(64 * KIB as u64, 16, 2).with_copy_delay(Duration::from_millis(5)),
    ));
    let (tx, rx) = channel();
    let filler = {
        let engine = engine.clone();
        let weights = weights.clone();
        std::thread::spawn(move || {
            for weight in &weights {
                match engine.fill(vec![CopySource::whole(weight.clone())]) {
                    Ok(r) => tx.send(r[0]).unwrap(),
                    Err(e) => return e,
                }
            }
            panic!("the ring cannot hold the whole model while nothing is released");
        })
    };
    // The op side takes the first copies and never releases them (its model is dropped
    // mid-cycle): the filler blocks once the ring is full.
    let first = rx.recv().unwrap();
    engine.acquire(&first).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    engine.close();
    assert_eq!(filler.join().unwrap(), CopyError::Closed);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(
        engine.fill(vec![CopySource::whole(weights[0].clone())]),
        Err(CopyError::Closed)
    ));
    drop(rx);
    drop(weights);
    // Copies still queued hold their sources until they have run; dropping the engine waits
    // for its streams, after which nothing holds the weights.
    let engine = Arc::try_unwrap(engine).ok().expect("the filler has ended");
    drop(engine);
    assert!(weak_weights.iter().all(|w| w.upgrade().is_none()));
}

#[test]
fn copies_in_flight_keep_their_sources_until_they_land() {
    let weights = weights(&[32 * KIB]);
    let weak_weights = weak(&weights);
    let engine = CopyEngine::new(
        EmulatedStreams::new(64 * KIB as u64, 4, 1).with_copy_delay(Duration::from_millis(20)),
    );
    let r = engine
        .fill(vec![CopySource::whole(weights[0].clone())])
        .unwrap()[0];
    drop(weights);
    assert!(
        weak_weights[0].upgrade().is_some(),
        "the queued copy holds its source"
    );
    engine.acquire(&r).unwrap();
    let (tx, rx) = channel();
    engine
        .streams()
        .read(&r, Duration::ZERO, move |b| tx.send(b[7]).unwrap())
        .unwrap();
    engine.release(&r).unwrap();
    // Weight 0's pattern at byte 7: (0 * 31 + 7 * 7 + 1) % 251.
    assert_eq!(rx.recv().unwrap(), 50);
    engine.streams().drain();
    assert!(weak_weights[0].upgrade().is_none());
}

#[test]
fn misuse_is_an_error_not_a_hang() {
    let engine = CopyEngine::new(EmulatedStreams::new(1024, 2, 2));
    let big = weights(&[2048]);
    assert_eq!(
        engine
            .fill(vec![CopySource::whole(big[0].clone())])
            .unwrap_err(),
        CopyError::TooLarge {
            bytes: 2048,
            capacity: 1024
        }
    );
    let w = weights(&[600, 600]);
    let a = engine.fill(vec![CopySource::whole(w[0].clone())]).unwrap()[0];
    // Released without being acquired: refused, and no signal is queued.
    assert!(matches!(
        engine.release(&a),
        Err(CopyError::Region {
            what: "released",
            ..
        })
    ));
    engine.acquire(&a).unwrap();
    engine.release(&a).unwrap();
    // Overwritten by the next fill: a late acquire or release is refused.
    let b = engine.fill(vec![CopySource::whole(w[1].clone())]).unwrap()[0];
    assert!(engine.acquire(&a).is_err());
    assert!(engine.release(&a).is_err());
    engine.discard(&b);
    // A group the ring cannot hold at once is refused, not left waiting for itself.
    let err = engine
        .fill(vec![
            CopySource::whole(w[0].clone()),
            CopySource::whole(w[1].clone()),
        ])
        .unwrap_err();
    assert!(matches!(err, CopyError::GroupTooLarge { bytes: 1200, .. }));
    assert!(matches!(
        CopySource::new(w[0].clone(), 0..601),
        Err(CopyError::OutOfBounds { .. })
    ));
}
