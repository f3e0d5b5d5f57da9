//! The ring's bookkeeping: where each copy goes, which flags guard it, and what the copy stream
//! must wait for before it overwrites older copies. Pure (no threads, no device):
//! [`super::CopyEngine`] drives it under a lock.
//!
//! Copies are placed one after the other in a fixed byte range, wrapping to offset 0 when the
//! next one does not fit before the end (the tail left over is skipped). Each live copy (a
//! [`Region`]) holds a *slot*: the index of its flags. A slot's generation counts its fills;
//! `copy_done[slot]` reaches the generation once the copy has landed, and
//! `reader_done[slot][consumer]` once the consumer's reads of it are done. A region may be
//! overwritten once every consumer that took it has released it (the copy stream then waits
//! for those consumers' `reader_done`), or once it was discarded without being taken (nothing
//! read it; the copy stream runs in order, so its own copy into it is done).

use std::collections::VecDeque;

/// A copy in the ring, as handed from the copy side to the op side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Region {
    /// Unique per engine: the number of the fill.
    pub id: u64,
    /// First byte in the ring.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Index of the region's flags.
    pub slot: usize,
    /// The slot's fill number: the value `copy_done[slot]` reaches when this copy has landed,
    /// and `reader_done[slot][consumer]` when a consumer's reads of it are done. Starts at 1.
    pub generation: u32,
}

/// A wait the copy stream makes before a fill: until `reader_done[slot][consumer] >= value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// The op queue whose reads are waited for.
    pub consumer: usize,
    /// The slot of the region being overwritten.
    pub slot: usize,
    /// Its generation.
    pub value: u32,
}

/// Why a region cannot be reserved now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The space is held by a region not released yet (its id).
    Held(u64),
    /// Every slot holds a live region.
    NoSlot,
}

/// What [`Ring::take`], [`Ring::release`] and [`Ring::discard`] can refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No live region has this id: it was overwritten, or never existed.
    Unknown,
    /// The region was discarded: it may be overwritten as soon as its readers are done.
    Discarded,
    /// Released by a consumer that has not taken it.
    NotTaken,
}

#[derive(Debug)]
struct Live {
    region: Region,
    /// Bits of the consumers that took it.
    taken: u64,
    /// Bits of the consumers that released it since they last took it.
    released: u64,
    discarded: bool,
}

impl Live {
    /// Whether the region may be overwritten: every taker released it, and it was taken or
    /// discarded (a region still waiting for its request is neither).
    fn retirable(&self) -> bool {
        self.taken == self.released && (self.discarded || self.taken != 0)
    }

    fn waits(&self) -> impl Iterator<Item = Wait> + '_ {
        (0..64)
            .filter(|c| self.taken & (1u64 << c) != 0)
            .map(|consumer| Wait {
                consumer,
                slot: self.region.slot,
                value: self.region.generation,
            })
    }

    fn intersects(&self, span: &[(u64, u64)]) -> bool {
        let (a, b) = (self.region.offset, self.region.offset + self.region.len);
        self.region.len > 0 && span.iter().any(|&(s, e)| s < b && a < e)
    }
}

/// The ring's state: the live regions in fill order and the slots' generations.
#[derive(Debug)]
pub struct Ring {
    capacity: u64,
    /// Every region starts at a multiple of this.
    align: u64,
    /// Where the next region starts (before wrapping).
    head: u64,
    live: VecDeque<Live>,
    free_slots: Vec<usize>,
    generations: Vec<u32>,
    next_id: u64,
}

impl Ring {
    /// A ring of `capacity` bytes whose regions use `slots` sets of flags (at most that many
    /// regions are live at once) and start at multiples of `align` (at least 1).
    pub fn new(capacity: u64, slots: usize, align: u64) -> Self {
        Self {
            capacity,
            align: align.max(1),
            head: 0,
            live: VecDeque::new(),
            free_slots: (0..slots).rev().collect(),
            generations: vec![0; slots],
            next_id: 0,
        }
    }

    /// Bytes in all.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The live regions, oldest first.
    pub fn live(&self) -> impl Iterator<Item = &Region> {
        self.live.iter().map(|l| &l.region)
    }

    /// The bytes a region of `len` would occupy: at the head, or at 0 with the tail skipped.
    fn place(&self, len: u64) -> (u64, Vec<(u64, u64)>) {
        if self.head + len <= self.capacity {
            (self.head, vec![(self.head, self.head + len)])
        } else {
            (0, vec![(self.head, self.capacity), (0, len)])
        }
    }

    /// Reserves the next region of `len` bytes (`len <= capacity`, checked by the caller), and
    /// returns it with the waits the copy stream must make before writing it: the readers of
    /// the regions it overwrites. Those regions are forgotten.
    pub fn reserve(&mut self, len: u64) -> Result<(Region, Vec<Wait>), Busy> {
        debug_assert!(len <= self.capacity);
        let (offset, span) = self.place(len);
        let mut overwritten = 0;
        for live in self.live.iter().filter(|l| l.intersects(&span)) {
            if !live.retirable() {
                return Err(Busy::Held(live.region.id));
            }
            overwritten += 1;
        }
        if self.free_slots.is_empty() && overwritten == 0 {
            // Without a region to overwrite, the oldest retirable one gives up its slot.
            match self.live.front() {
                Some(front) if front.retirable() => {}
                Some(front) => return Err(Busy::Held(front.region.id)),
                None => return Err(Busy::NoSlot),
            }
        }
        let mut waits = Vec::new();
        let mut kept = VecDeque::with_capacity(self.live.len());
        for live in std::mem::take(&mut self.live) {
            if live.intersects(&span) {
                waits.extend(live.waits());
                self.free_slots.push(live.region.slot);
            } else {
                kept.push_back(live);
            }
        }
        self.live = kept;
        if self.free_slots.is_empty() {
            let front = self.live.pop_front().expect("checked above");
            waits.extend(front.waits());
            self.free_slots.push(front.region.slot);
        }
        let slot = self.free_slots.pop().expect("a slot was freed");
        self.generations[slot] = self.generations[slot].wrapping_add(1).max(1);
        let region = Region {
            id: self.next_id,
            offset,
            len,
            slot,
            generation: self.generations[slot],
        };
        self.next_id += 1;
        self.head = (offset + len)
            .div_ceil(self.align)
            .saturating_mul(self.align)
            .min(self.capacity);
        self.live.push_back(Live {
            region,
            taken: 0,
            released: 0,
            discarded: false,
        });
        Ok((region, waits))
    }

    fn find(&mut self, id: u64) -> Result<&mut Live, Refused> {
        self.live
            .iter_mut()
            .find(|l| l.region.id == id)
            .ok_or(Refused::Unknown)
    }

    fn get(&self, id: u64) -> Result<&Live, Refused> {
        self.live
            .iter()
            .find(|l| l.region.id == id)
            .ok_or(Refused::Unknown)
    }

    /// `consumer` (below 64) reads region `id` from now on.
    pub fn take(&mut self, id: u64, consumer: usize) -> Result<Region, Refused> {
        let live = self.find(id)?;
        if live.discarded {
            return Err(Refused::Discarded);
        }
        live.taken |= 1 << consumer;
        live.released &= !(1 << consumer);
        Ok(live.region)
    }

    /// `consumer`'s reads of region `id` are queued, and so is the signal that they are done.
    pub fn release(&mut self, id: u64, consumer: usize) -> Result<(), Refused> {
        self.check_taken(id, consumer)?;
        self.find(id)?.released |= 1 << consumer;
        Ok(())
    }

    /// Whether `consumer` took region `id` (and the region is live), without changing anything.
    pub fn check_taken(&self, id: u64, consumer: usize) -> Result<(), Refused> {
        if self.get(id)?.taken & (1 << consumer) == 0 {
            return Err(Refused::NotTaken);
        }
        Ok(())
    }

    /// Region `id` will not be handed out (any more): it may be overwritten once its takers
    /// have released it.
    pub fn discard(&mut self, id: u64) -> Result<(), Refused> {
        self.find(id)?.discarded = true;
        Ok(())
    }

    /// Discards each of `regions` that is still live (a group that was never handed out).
    pub fn discard_all(&mut self, regions: &[Region]) {
        for r in regions {
            let _ = self.discard(r.id);
        }
    }

    /// Discards every region no consumer has taken (an order change).
    pub fn discard_untaken(&mut self) {
        for live in self.live.iter_mut().filter(|l| l.taken == 0) {
            live.discarded = true;
        }
    }

    /// Consumers that took a live region and have not released it.
    pub fn unreleased(&self) -> u64 {
        self.live.iter().fold(0, |a, l| a | (l.taken & !l.released))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retire(ring: &mut Ring, region: Region) {
        ring.take(region.id, 0).unwrap();
        ring.release(region.id, 0).unwrap();
    }

    #[test]
    fn regions_follow_each_other_and_wrap_skipping_the_tail() {
        let mut ring = Ring::new(100, 8, 1);
        let (a, w) = ring.reserve(40).unwrap();
        assert_eq!((a.offset, a.len, w.len()), (0, 40, 0));
        let (b, _) = ring.reserve(40).unwrap();
        assert_eq!(b.offset, 40);
        // 30 more do not fit before the end: the region goes to 0, over `a`, which is live.
        assert_eq!(ring.reserve(30), Err(Busy::Held(a.id)));
        retire(&mut ring, a);
        let (c, w) = ring.reserve(30).unwrap();
        assert_eq!(c.offset, 0);
        assert_eq!(
            w,
            vec![Wait {
                consumer: 0,
                slot: a.slot,
                value: a.generation
            }]
        );
        // The next one starts after `c`, over `b`'s bytes.
        assert_eq!(ring.reserve(20), Err(Busy::Held(b.id)));
    }

    #[test]
    fn the_skipped_tail_is_overwritten_too() {
        let mut ring = Ring::new(100, 8, 1);
        let (a, _) = ring.reserve(60).unwrap();
        let (b, _) = ring.reserve(30).unwrap(); // 60..90
        retire(&mut ring, a);
        let (c, _) = ring.reserve(50).unwrap(); // wraps: 0..50, skipping 90..100
        assert_eq!(c.offset, 0);
        // 50..100 next: over `b`.
        assert_eq!(ring.reserve(50), Err(Busy::Held(b.id)));
        ring.discard(b.id).unwrap();
        let (d, w) = ring.reserve(50).unwrap();
        assert_eq!(
            (d.offset, w.len()),
            (50, 0),
            "a discarded, untaken region has no readers"
        );
    }

    #[test]
    fn every_taker_must_release_and_is_waited_for() {
        let mut ring = Ring::new(10, 4, 1);
        let (a, _) = ring.reserve(10).unwrap();
        ring.take(a.id, 1).unwrap();
        ring.take(a.id, 3).unwrap();
        ring.release(a.id, 1).unwrap();
        assert_eq!(ring.reserve(10), Err(Busy::Held(a.id)));
        assert_eq!(ring.unreleased(), 1 << 3);
        ring.release(a.id, 3).unwrap();
        let (b, w) = ring.reserve(10).unwrap();
        let consumers: Vec<usize> = w.iter().map(|w| w.consumer).collect();
        assert_eq!(consumers, vec![1, 3]);
        assert!(
            w.iter()
                .all(|w| w.slot == a.slot && w.value == a.generation)
        );
        assert_eq!(b.slot, a.slot, "the freed slot is reused");
        assert_eq!(b.generation, a.generation + 1);
        assert_eq!(ring.take(a.id, 1), Err(Refused::Unknown), "overwritten");
    }

    #[test]
    fn a_region_waiting_for_its_request_is_never_overwritten() {
        let mut ring = Ring::new(10, 4, 1);
        let (a, _) = ring.reserve(10).unwrap();
        assert_eq!(ring.reserve(1), Err(Busy::Held(a.id)));
        assert_eq!(ring.release(a.id, 0), Err(Refused::NotTaken));
        ring.discard_untaken();
        assert_eq!(ring.take(a.id, 0), Err(Refused::Discarded));
        assert!(ring.reserve(1).is_ok());
    }

    #[test]
    fn slots_run_out_before_bytes_do() {
        let mut ring = Ring::new(100, 2, 1);
        let (a, _) = ring.reserve(1).unwrap();
        let (b, _) = ring.reserve(1).unwrap();
        assert_eq!(ring.reserve(1), Err(Busy::Held(a.id)));
        retire(&mut ring, a);
        let (c, w) = ring.reserve(1).unwrap();
        assert_eq!((c.slot, c.offset, w.len()), (a.slot, 2, 1));
        assert_eq!(
            ring.live().map(|r| r.id).collect::<Vec<_>>(),
            vec![b.id, c.id]
        );
    }

    #[test]
    fn regions_start_aligned() {
        let mut ring = Ring::new(1000, 8, 256);
        let offsets: Vec<u64> = (0..4)
            .map(|_| ring.reserve(100).unwrap().0.offset)
            .collect();
        assert_eq!(offsets, [0, 256, 512, 768]);
        // The next would start at 1024 > 1000: it wraps, over region 0.
        assert_eq!(ring.reserve(100), Err(Busy::Held(0)));
    }

    #[test]
    fn zero_length_regions_overwrite_nothing() {
        let mut ring = Ring::new(10, 4, 1);
        let (a, _) = ring.reserve(10).unwrap();
        let (z, w) = ring.reserve(0).unwrap();
        assert_eq!((z.len, w.len()), (0, 0));
        assert!(ring.take(a.id, 0).is_ok());
    }
}
