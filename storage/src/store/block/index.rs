//! The index: a fixed-size open-addressing hash table from fingerprint to
//! record, split into partitions that storage threads own.
//!
//! Slots are 32 bytes ([`Slot`]), in buckets of [`BUCKET_SLOTS`]. A key
//! may live in either of two buckets its fingerprint names (bucketized
//! cuckoo hashing): lookups look at those [`PROBES`] slots and never more.
//! An insert takes the key's own slot, or an empty or dead one (its record
//! has left the ring); failing that, it moves an entry of another key to
//! that key's other bucket (up to two moves deep) to make room. Moves keep
//! every entry, so tables fill to about 98% before a key finds no room,
//! which lets the table hold 1.25 slots per expected blob (40 bytes).
//! A running store never lets a live entry of another key be displaced
//! ([`Partition::try_insert`] names the oldest one instead, for the storage
//! thread to evict with its block or to refuse the write); offline
//! rebuilding and resizing fill a table newest first.
//!
//! For persistence the table is a run of 4 KiB pages. Every change marks
//! its page dirty for both on-disk copies. A sync first takes a *barrier*:
//! the pages dirty for the copy being written are set aside, and from then
//! on the first change to any slot records the slot's value at the barrier.
//! The pages are then written as they were at the barrier, so what reaches
//! disk is exactly the table the data sync covered.

use kiln_proto::limits::BLOCK_INDEX_PROBES as PROBES;
use std::collections::HashMap;

use super::format::{Fingerprint, PAGE_BYTES, SLOT_BYTES, SLOTS_PER_PAGE, Slot};

/// Slots of a bucket: a key may use two buckets.
pub const BUCKET_SLOTS: usize = PROBES / 2;

/// One partition of the table.
#[derive(Debug)]
pub struct Partition {
    slots: Vec<Slot>,
    /// The partition's first page within the whole table.
    first_page: u64,
    seed: u64,
    /// Pages changed since they were last written to each copy.
    dirty: [Vec<bool>; 2],
    /// During a sync: the pages being written and the slots' values at the
    /// barrier, for slots changed since.
    sync: Option<SyncState>,
}

#[derive(Debug)]
struct SyncState {
    copy: u8,
    pages: Vec<u64>,
    /// How many of `pages` have been handed out to be written.
    next: usize,
    at_barrier: HashMap<usize, Slot>,
}

impl Partition {
    /// An empty partition of `pages` pages starting at table page `first_page`.
    pub fn new(first_page: u64, pages: u64, seed: u64) -> Partition {
        let slots = usize::try_from(pages * SLOTS_PER_PAGE).unwrap_or(0);
        let pages = usize::try_from(pages).unwrap_or(0);
        Partition {
            slots: vec![Slot::default(); slots],
            first_page,
            seed,
            dirty: [vec![false; pages], vec![false; pages]],
            sync: None,
        }
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The slot at `i` (`i < slot_count()`), as it is.
    pub fn slot_at(&self, i: usize) -> Slot {
        self.slots[i]
    }

    pub fn first_page(&self) -> u64 {
        self.first_page
    }

    /// Fills page `page` (of this partition) from its on-disk bytes.
    pub fn load_page(&mut self, page: u64, bytes: &[u8]) -> usize {
        let base = usize::try_from(page * SLOTS_PER_PAGE).unwrap_or(0);
        let mut loaded = 0;
        for (i, raw) in bytes.chunks_exact(usize::try_from(SLOT_BYTES).unwrap_or(32)).enumerate() {
            if let Some(slot) = Slot::decode(raw, self.seed) {
                self.slots[base + i] = slot;
                loaded += 1;
            }
        }
        loaded
    }

    /// Marks every page dirty for `copy` (after a restart from the other one).
    pub fn mark_all_dirty(&mut self, copy: u8) {
        self.dirty[usize::from(copy)].fill(true);
    }

    /// The two buckets `fp` may live in. The partition is chosen by the
    /// first eight bytes modulo the partitions; the buckets by the last
    /// eight, and by the high half of the first eight.
    fn buckets(&self, fp: &[u8; 16]) -> (usize, usize) {
        let count = (self.slots.len() / BUCKET_SLOTS).max(1) as u64;
        let first = u64::from_le_bytes(fp[8..16].try_into().unwrap_or([0; 8]));
        let second = u64::from_le_bytes(fp[0..8].try_into().unwrap_or([0; 8])).rotate_right(32);
        (usize::try_from(first % count).unwrap_or(0), usize::try_from(second % count).unwrap_or(0))
    }

    /// The other bucket of the entry in slot `i`.
    fn other_bucket(&self, i: usize) -> usize {
        let (a, b) = self.buckets(&self.slots[i].fingerprint);
        if i / BUCKET_SLOTS == a { b } else { a }
    }

    fn bucket_slots(bucket: usize) -> std::ops::Range<usize> {
        bucket * BUCKET_SLOTS..(bucket + 1) * BUCKET_SLOTS
    }

    fn probe(&self, fp: &Fingerprint) -> impl Iterator<Item = usize> {
        let (a, b) = self.buckets(&fp.0);
        Self::bucket_slots(a).chain(Self::bucket_slots(b))
    }

    fn set(&mut self, i: usize, slot: Slot) {
        if let Some(sync) = &mut self.sync {
            sync.at_barrier.entry(i).or_insert(self.slots[i]);
        }
        self.slots[i] = slot;
        let page = i / usize::try_from(SLOTS_PER_PAGE).unwrap_or(128);
        self.dirty[0][page] = true;
        self.dirty[1][page] = true;
    }

    /// The slot of `fp`, live or not, changing nothing.
    pub fn get(&self, fp: &Fingerprint) -> Option<Slot> {
        self.probe(fp).map(|i| self.slots[i]).find(|s| s.fingerprint == fp.0)
    }

    /// The live slot of `fp`, if any; a dead one is removed on the way.
    pub fn lookup(&mut self, fp: &Fingerprint, live: impl Fn(&Slot) -> bool) -> Option<Slot> {
        let found = self.probe(fp).find(|i| self.slots[*i].fingerprint == fp.0)?;
        let slot = self.slots[found];
        if live(&slot) {
            return Some(slot);
        }
        self.set(found, Slot::default());
        None
    }

    /// Stores `slot`, displacing the oldest probed entry if need be;
    /// returns the entry it took the place of, if any. For offline use
    /// (resizing, rebuilding), where the table is sized for what it gets;
    /// a running store uses [`Partition::try_insert`].
    pub fn insert(&mut self, slot: Slot, live: impl Fn(&Slot) -> bool) -> Option<Slot> {
        let (moves, i) = match self.place(&slot, &live) {
            Ok(place) => place,
            Err(oldest) => (Vec::new(), oldest),
        };
        self.put(&moves, i, slot)
    }

    /// Makes the `moves` (each `(from, to)`: the entry in `from` goes to
    /// `to`, in order), then stores `slot` at `i`; returns what was
    /// overwritten at the end of the chain (an empty, dead or displaced
    /// entry, or the key's own).
    fn put(&mut self, moves: &[(usize, usize)], i: usize, slot: Slot) -> Option<Slot> {
        let overwritten = moves.first().map_or(self.slots[i], |(_, to)| self.slots[*to]);
        for &(from, to) in moves {
            self.set(to, self.slots[from]);
        }
        self.set(i, slot);
        (!overwritten.is_empty()).then_some(overwritten)
    }

    /// Stores `slot` in the key's own slot or an empty or dead one (moving
    /// entries of other keys to their other buckets to make one), and
    /// returns the entry it took the place of, if any; never displaces a
    /// live entry of another key: when no room can be made, `Err` with the
    /// oldest probed entry (the caller evicts it the way the ring evicts,
    /// or refuses the write).
    pub fn try_insert(&mut self, slot: Slot, live: impl Fn(&Slot) -> bool) -> Result<Option<Slot>, Slot> {
        let (moves, i) = self.place(&slot, &live).map_err(|oldest| self.slots[oldest])?;
        Ok(self.put(&moves, i, slot))
    }

    /// Where `slot` goes: `Ok` with the moves that make room (none for the
    /// key's own slot or a free one; else one or two entries moved to
    /// their other buckets) and the slot; `Err` the probed slot holding the
    /// oldest live entry, when no room can be made.
    fn place(
        &self,
        slot: &Slot,
        live: impl Fn(&Slot) -> bool,
    ) -> Result<(Vec<(usize, usize)>, usize), usize> {
        // On the stack: every insert places a key.
        let mut probed = [0usize; PROBES];
        for (p, i) in probed.iter_mut().zip(self.probe(&Fingerprint(slot.fingerprint))) {
            *p = i;
        }
        let free = |i: usize| self.slots[i].is_empty() || !live(&self.slots[i]);
        if let Some(i) = probed.iter().copied().find(|i| self.slots[*i].fingerprint == slot.fingerprint) {
            return Ok((Vec::new(), i));
        }
        if let Some(i) = probed.iter().copied().find(|i| free(*i)) {
            return Ok((Vec::new(), i));
        }
        // One move: an entry here goes to a free slot of its other bucket.
        for &i in &probed {
            if let Some(j) = Self::bucket_slots(self.other_bucket(i)).find(|j| free(*j)) {
                return Ok((vec![(i, j)], i));
            }
        }
        // Two moves: an entry of that other bucket makes room in its own.
        for &i in &probed {
            for j in Self::bucket_slots(self.other_bucket(i)) {
                if probed.contains(&j) {
                    continue;
                }
                let k = Self::bucket_slots(self.other_bucket(j)).find(|k| free(*k) && !probed.contains(k));
                if let Some(k) = k {
                    return Ok((vec![(j, k), (i, j)], i));
                }
            }
        }
        Err(probed.iter().copied().min_by_key(|i| self.slots[*i].logical).unwrap_or(0))
    }

    /// Removes `fp`'s entry if it still names the record at `logical`.
    pub fn remove(&mut self, fp: &Fingerprint, logical: u64) -> bool {
        let Some(i) =
            self.probe(fp).find(|i| self.slots[*i].fingerprint == fp.0 && self.slots[*i].logical == logical)
        else {
            return false;
        };
        self.set(i, Slot::default());
        true
    }

    /// Takes the barrier of a sync to `copy`: the pages to write are fixed,
    /// and later changes keep the slots' values at this moment.
    pub fn barrier(&mut self, copy: u8) {
        let dirty = &mut self.dirty[usize::from(copy)];
        let pages = dirty.iter().enumerate().filter(|(_, d)| **d).map(|(p, _)| p as u64).collect();
        dirty.fill(false);
        self.sync = Some(SyncState { copy, pages, next: 0, at_barrier: HashMap::new() });
    }

    /// The next at most `max` pages of the sync in progress, as they were
    /// at its barrier: (page within the whole table, bytes). Handed out a
    /// bounded batch at a time, so a sync that writes the whole table (the
    /// first after a restart) never holds it all in memory at once.
    pub fn pages_at_barrier(&mut self, max: usize) -> Vec<(u64, Vec<u8>)> {
        let Some(sync) = &mut self.sync else { return Vec::new() };
        let per_page = usize::try_from(SLOTS_PER_PAGE).unwrap_or(128);
        let slot_bytes = usize::try_from(SLOT_BYTES).unwrap_or(32);
        let end = (sync.next + max).min(sync.pages.len());
        let batch = &sync.pages[sync.next..end];
        let out = batch
            .iter()
            .map(|&page| {
                let mut bytes = vec![0u8; usize::try_from(PAGE_BYTES).unwrap_or(4096)];
                let base = usize::try_from(page).unwrap_or(0) * per_page;
                for j in 0..per_page {
                    let slot = sync.at_barrier.get(&(base + j)).unwrap_or(&self.slots[base + j]);
                    slot.encode(self.seed, &mut bytes[j * slot_bytes..(j + 1) * slot_bytes]);
                }
                (self.first_page + page, bytes)
            })
            .collect();
        sync.next = end;
        out
    }

    /// Whether every page of the sync in progress has been handed out.
    pub fn barrier_pages_done(&self) -> bool {
        self.sync.as_ref().is_none_or(|s| s.next == s.pages.len())
    }

    /// Ends the sync in progress; if its pages did not reach the disk,
    /// they stay dirty for the next one.
    pub fn end_sync(&mut self, written: bool) {
        if let Some(sync) = self.sync.take()
            && !written
        {
            for page in sync.pages {
                self.dirty[usize::from(sync.copy)][usize::try_from(page).unwrap_or(0)] = true;
            }
        }
    }

    /// Every entry held, live or not.
    pub fn entries(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| !s.is_empty())
    }

    /// Live entries (for statistics and tests).
    pub fn count(&self, live: impl Fn(&Slot) -> bool) -> usize {
        self.slots.iter().filter(|s| !s.is_empty() && live(s)).count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap as Model;

    fn fp(n: u32) -> Fingerprint {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&n.to_le_bytes());
        b[8..12].copy_from_slice(&n.wrapping_mul(2_654_435_761).to_le_bytes());
        b[15] = 1;
        Fingerprint(b)
    }

    /// Slots whose keys all have the same two buckets (0 and 1 of a
    /// one-page table): [`PROBES`] slots for all of them.
    fn colliding(n: u32) -> Slot {
        let mut b = [0u8; 16];
        let second = ((u64::from(n) << 4) | 1).rotate_left(32);
        b[0..8].copy_from_slice(&second.to_le_bytes());
        Slot { fingerprint: b, logical: u64::from(n), size: 1 }
    }

    fn slot(n: u32, logical: u64) -> Slot {
        Slot { fingerprint: fp(n).0, logical, size: u64::from(n) }
    }

    proptest! {
        /// Against a HashMap: while the table has room, it agrees exactly;
        /// it never holds a key the model lacks, nor an old location.
        #[test]
        fn agrees_with_a_hash_map(ops in proptest::collection::vec((0u32..200, 0u8..3), 1..600)) {
            let mut table = Partition::new(0, 8, 7);
            let mut model: Model<u32, u64> = Model::new();
            let mut clock = 1u64;
            for (key, op) in ops {
                clock += 1;
                match op {
                    0 | 1 => {
                        table.insert(slot(key, clock), |_| true);
                        model.insert(key, clock);
                    }
                    _ => {
                        if let Some(at) = model.remove(&key) {
                            prop_assert!(table.remove(&fp(key), at));
                        }
                    }
                }
                for (k, at) in &model {
                    if let Some(found) = table.lookup(&fp(*k), |_| true) {
                        prop_assert_eq!(found.logical, *at, "an old location for {}", k);
                    }
                }
            }
            // 1024 slots for at most 200 keys: nothing was displaced.
            for (k, at) in &model {
                prop_assert_eq!(table.lookup(&fp(*k), |_| true).map(|s| s.logical), Some(*at));
            }
        }
    }

    proptest! {
        /// A small table filled past its room with random fingerprints:
        /// entries move between their buckets, yet every stored key is
        /// found at its latest place, a refused insert changes nothing, and
        /// nothing is ever displaced.
        #[test]
        fn moves_keep_the_table_equal_to_a_map(
            seed in 0u64..1000,
            ops in proptest::collection::vec((0usize..300, 0u8..4), 1..1500),
        ) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let keys: Vec<[u8; 16]> = (0..300).map(|_| rng.random()).collect();
            let mut table = Partition::new(0, 1, 5);
            let mut model: Model<usize, u64> = Model::new();
            let mut clock = 0u64;
            for (key, op) in ops {
                clock += 1;
                let fp = Fingerprint(keys[key]);
                match op {
                    0..=2 => {
                        let s = Slot { fingerprint: keys[key], logical: clock, size: 1 };
                        match table.try_insert(s, |_| true) {
                            Ok(replaced) => {
                                let expected = model.insert(key, clock);
                                prop_assert_eq!(replaced.map(|r| r.logical), expected);
                            }
                            Err(oldest) => prop_assert!(model.values().any(|at| *at == oldest.logical)),
                        }
                    }
                    _ => {
                        if let Some(at) = model.remove(&key) {
                            prop_assert!(table.remove(&fp, at));
                        }
                    }
                }
                prop_assert!(model.len() <= table.slot_count());
            }
            for (k, at) in &model {
                prop_assert_eq!(table.get(&Fingerprint(keys[*k])).map(|s| s.logical), Some(*at));
            }
            prop_assert_eq!(table.count(|_| true), model.len());
        }
    }

    #[test]
    fn a_full_table_displaces_the_oldest_and_dead_entries_make_room() {
        let mut table = Partition::new(0, 1, 1);
        for n in 1..=u32::try_from(PROBES).unwrap() {
            table.insert(colliding(n), |_| true);
        }
        table.insert(colliding(100), |_| true);
        let find =
            |t: &mut Partition, n: u32| t.lookup(&Fingerprint(colliding(n).fingerprint), |_| true).is_some();
        assert!(!find(&mut table, 1), "the oldest was displaced");
        assert!(find(&mut table, 2) && find(&mut table, 100));
        // Entries whose records left the ring give way first and vanish on lookup.
        table.insert(colliding(200), |s| s.logical > 10);
        assert!(find(&mut table, 11) && find(&mut table, 200));
        assert!(table.lookup(&Fingerprint(colliding(12).fingerprint), |s| s.logical > 12).is_none());
        assert!(
            table.lookup(&Fingerprint(colliding(12).fingerprint), |_| true).is_none(),
            "removed on the way"
        );
    }

    /// Keys that find their two buckets full move others to their other
    /// buckets: a table fills to well over 90% before a key finds no room,
    /// and every entry stays findable.
    #[test]
    fn cuckoo_moves_fill_the_table_and_keep_every_entry() {
        use rand::{Rng, SeedableRng};
        for seed in 0..4 {
            // Fingerprints are hash output: random bytes.
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut table = Partition::new(0, 64, 3);
            let slots = table.slot_count();
            let mut stored = Vec::new();
            for n in 1u64.. {
                let s = Slot { fingerprint: rng.random(), logical: n, size: 1 };
                match table.try_insert(s, |_| true) {
                    Ok(None) => stored.push(s),
                    Ok(Some(old)) => panic!("displaced {old:?}"),
                    Err(_) => break,
                }
            }
            let load = stored.len() as f64 / slots as f64;
            assert!(load > 0.9, "seed {seed}: full at {load:.3} ({} of {slots})", stored.len());
            for s in stored {
                assert_eq!(table.get(&Fingerprint(s.fingerprint)), Some(s), "lost {s:?}");
            }
        }
    }

    #[test]
    fn try_insert_never_displaces_a_live_entry() {
        let mut table = Partition::new(0, 1, 1);
        for n in 1..=u32::try_from(PROBES).unwrap() {
            assert_eq!(table.try_insert(colliding(n), |_| true), Ok(None));
        }
        // Full of live entries: the oldest is named, nothing is changed.
        assert_eq!(table.try_insert(colliding(100), |_| true), Err(colliding(1)));
        assert!(table.get(&Fingerprint(colliding(1).fingerprint)).is_some());
        assert!(table.get(&Fingerprint(colliding(100).fingerprint)).is_none());
        // Its own key's slot, or a dead one, it takes.
        let again = Slot { logical: 500, ..colliding(3) };
        assert_eq!(table.try_insert(again, |_| true), Ok(Some(colliding(3))));
        assert_eq!(table.try_insert(colliding(100), |s| s.logical > 1), Ok(Some(colliding(1))));
    }

    #[test]
    fn pages_are_written_as_they_were_at_the_barrier() {
        let mut table = Partition::new(3, 2, 9);
        table.insert(slot(1, 10), |_| true);
        table.barrier(0);
        // Changed after the barrier: not in this sync's pages.
        table.insert(slot(1, 20), |_| true);
        table.insert(slot(2, 30), |_| true);
        let pages = table.pages_at_barrier(usize::MAX);
        let mut copy = Partition::new(3, 2, 9);
        for (page, bytes) in &pages {
            assert!(*page >= 3, "pages are numbered within the whole table");
            copy.load_page(page - 3, bytes);
        }
        assert_eq!(copy.lookup(&fp(1), |_| true).map(|s| s.logical), Some(10));
        table.end_sync(true);
        // The later changes are dirty for the next sync of that copy.
        table.barrier(0);
        let pages = table.pages_at_barrier(usize::MAX);
        for (page, bytes) in &pages {
            copy.load_page(page - 3, bytes);
        }
        assert_eq!(copy.lookup(&fp(1), |_| true).map(|s| s.logical), Some(20));
        assert_eq!(copy.lookup(&fp(2), |_| true).map(|s| s.logical), Some(30));
        // A failed sync leaves its pages dirty.
        table.insert(slot(3, 40), |_| true);
        table.barrier(1);
        let n = table.pages_at_barrier(usize::MAX).len();
        table.end_sync(false);
        table.barrier(1);
        assert_eq!(table.pages_at_barrier(usize::MAX).len(), n);
        // Handed out in bounded batches, each page once.
        table.end_sync(false);
        table.mark_all_dirty(1);
        table.barrier(1);
        let mut seen = Vec::new();
        while !table.barrier_pages_done() {
            let batch = table.pages_at_barrier(1);
            assert_eq!(batch.len(), 1);
            seen.extend(batch.into_iter().map(|(p, _)| p));
        }
        assert_eq!(seen, vec![3, 4]);
    }
}
