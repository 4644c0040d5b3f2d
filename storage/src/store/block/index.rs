//! The index: hash tables from fingerprint to record, one per partition,
//! each written only by the storage thread that owns it and read by any
//! thread ([`Shared`]), each growing on its own.
//!
//! Slots are 32 bytes ([`Slot`]), in buckets of [`BUCKET_SLOTS`]. A key
//! may live in either of two buckets its fingerprint names (bucketized
//! cuckoo hashing): lookups look at those [`PROBES`] slots and never more.
//! An insert takes the key's own slot, or an empty or dead one (its record
//! has left the ring); failing that, it moves an entry of another key to
//! that key's other bucket (up to two moves deep) to make room. Moves keep
//! every entry, so tables fill to about 98% before a key finds no room;
//! then the table doubles, every live entry placed anew. A table starts at
//! the slots `expected_blob_bytes` allots it (1.25 per expected blob: 40
//! bytes) and grows to at most [`BLOCK_INDEX_GROWTH_MAX`] times that.
//! Only at that bound does a running store evict to make room
//! ([`Partition::try_insert`] names the oldest entry, for the storage
//! thread to evict with its block); offline rebuilding and rewriting fill a
//! table newest first.
//!
//! The tables are not written as they are: the syncer appends what changed
//! to a log and from time to time writes every live entry to a checkpoint
//! (see `syncer.rs`), so what reaches the disk grows with the entries held,
//! not with the slots.
//!
//! [`BLOCK_INDEX_GROWTH_MAX`]: kiln_proto::limits::BLOCK_INDEX_GROWTH_MAX

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kiln_proto::limits::BLOCK_INDEX_PROBES as PROBES;

use super::format::{Fingerprint, SLOT_BYTES, Slot};

/// Slots of a bucket: a key may use two buckets.
pub const BUCKET_SLOTS: usize = PROBES / 2;

/// Eight slots, field by field: a lookup that misses reads the 64 bytes of
/// first fingerprint halves and nothing else.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    lo: [u64; BUCKET_SLOTS],
    hi: [u64; BUCKET_SLOTS],
    logical: [u64; BUCKET_SLOTS],
    size: [u64; BUCKET_SLOTS],
}

const _: () = assert!(BUCKET_SLOTS == 8 && std::mem::size_of::<Bucket>() == 8 * 32);

impl Bucket {
    /// The lane holding the fingerprint `(lo, hi)`, if any. The first
    /// halves are compared in every lane without a branch per lane (one
    /// cache line); the second halves only where the first matched, so a
    /// key that is absent costs one cache line per bucket.
    fn lane_of(&self, lo: u64, hi: u64) -> Option<usize> {
        let mut hits = 0u32;
        for lane in 0..BUCKET_SLOTS {
            hits |= u32::from(self.lo[lane] == lo) << lane;
        }
        while hits != 0 {
            let lane = hits.trailing_zeros() as usize;
            if self.hi[lane] == hi {
                return Some(lane);
            }
            hits &= hits - 1;
        }
        None
    }
}

/// `x` scaled from `0..2^64` to `0..count` by its high bits: a multiply
/// where a remainder would divide. The buckets are chosen again whenever a
/// table is built, so the choice is free to change between versions.
fn scale(x: u64, count: u64) -> usize {
    usize::try_from((u128::from(x) * u128::from(count)) >> 64).unwrap_or(0)
}

fn halves(fp: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_le_bytes(fp[0..8].try_into().unwrap_or([0; 8])),
        u64::from_le_bytes(fp[8..16].try_into().unwrap_or([0; 8])),
    )
}

/// One partition of the index.
#[derive(Debug)]
pub struct Partition {
    buckets: Vec<Bucket>,
    /// Per bucket, how many entries whose first bucket it is live in their
    /// second: a lookup reads the second bucket only when this is not 0
    /// (an absent key then costs one bucket, not two). Saturates: a count
    /// that reached the maximum stays there, which only costs the read.
    spilled: Vec<u8>,
    /// Slots the table may grow to.
    max_slots: usize,
    /// Slots that hold an entry (live or not).
    used: usize,
}

impl Partition {
    /// An empty table of `slots` slots (at least one bucket, whole
    /// buckets) that may grow to `max_slots`.
    pub fn new(slots: usize, max_slots: usize) -> Partition {
        let slots = slots.max(BUCKET_SLOTS).next_multiple_of(BUCKET_SLOTS);
        Partition {
            buckets: vec![Bucket::default(); slots / BUCKET_SLOTS],
            spilled: vec![0; slots / BUCKET_SLOTS],
            max_slots: max_slots.max(slots),
            used: 0,
        }
    }

    pub fn slot_count(&self) -> usize {
        self.buckets.len() * BUCKET_SLOTS
    }

    fn slot(&self, i: usize) -> Slot {
        let (b, lane) = (&self.buckets[i / BUCKET_SLOTS], i % BUCKET_SLOTS);
        let mut fingerprint = [0u8; 16];
        fingerprint[0..8].copy_from_slice(&b.lo[lane].to_le_bytes());
        fingerprint[8..16].copy_from_slice(&b.hi[lane].to_le_bytes());
        Slot { fingerprint, logical: b.logical[lane], size: b.size[lane] }
    }

    fn is_empty_at(&self, i: usize) -> bool {
        let (b, lane) = (&self.buckets[i / BUCKET_SLOTS], i % BUCKET_SLOTS);
        b.lo[lane] == 0 && b.hi[lane] == 0
    }

    /// The slot holding `fp`, if any: the first halves of its two buckets
    /// are compared first.
    fn find(&self, fp: &[u8; 16]) -> Option<usize> {
        let (lo, hi) = halves(fp);
        let (a, b) = self.buckets(fp);
        if let Some(lane) = self.buckets[a].lane_of(lo, hi) {
            return Some(a * BUCKET_SLOTS + lane);
        }
        if self.spilled[a] == 0 {
            return None;
        }
        Some(b * BUCKET_SLOTS + self.buckets[b].lane_of(lo, hi)?)
    }

    /// Counts (`add`) or uncounts the entry `fp` stored in bucket `at` in
    /// its first bucket's spill count, if `at` is its second.
    fn count_spill(&mut self, fp: &[u8; 16], at: usize, add: bool) {
        let (a, _) = self.buckets(fp);
        if at == a {
            return;
        }
        let count = &mut self.spilled[a];
        *count = match (add, *count) {
            (_, u8::MAX) => u8::MAX,
            (true, n) => n + 1,
            (false, n) => n.saturating_sub(1),
        };
    }

    /// Every slot, empty or not.
    fn all(&self) -> impl Iterator<Item = Slot> + '_ {
        (0..self.slot_count()).map(|i| self.slot(i))
    }

    /// Slots holding an entry, live or not.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The slot at `i` (`i < slot_count()`), as it is.
    pub fn slot_at(&self, i: usize) -> Slot {
        self.slot(i)
    }

    /// The two buckets `fp` may live in. The partition is chosen by the
    /// first eight bytes modulo the partitions (their low bits); the
    /// buckets by the high bits of the last eight and of the first eight.
    fn buckets(&self, fp: &[u8; 16]) -> (usize, usize) {
        let count = self.buckets.len().max(1) as u64;
        let first = u64::from_le_bytes(fp[8..16].try_into().unwrap_or([0; 8]));
        let second = u64::from_le_bytes(fp[0..8].try_into().unwrap_or([0; 8]));
        (scale(first, count), scale(second, count))
    }

    /// The other bucket of the entry in slot `i`.
    fn other_bucket(&self, i: usize) -> usize {
        let (a, b) = self.buckets(&self.slot(i).fingerprint);
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
        let (bucket, lane) = (i / BUCKET_SLOTS, i % BUCKET_SLOTS);
        let old = self.slot(i);
        match (old.is_empty(), slot.is_empty()) {
            (true, false) => self.used += 1,
            (false, true) => self.used -= 1,
            _ => {}
        }
        if !old.is_empty() {
            self.count_spill(&old.fingerprint, bucket, false);
        }
        if !slot.is_empty() {
            self.count_spill(&slot.fingerprint, bucket, true);
        }
        let (lo, hi) = halves(&slot.fingerprint);
        let b = &mut self.buckets[bucket];
        b.lo[lane] = lo;
        b.hi[lane] = hi;
        b.logical[lane] = slot.logical;
        b.size[lane] = slot.size;
    }

    /// The slot of `fp`, live or not, changing nothing.
    pub fn get(&self, fp: &Fingerprint) -> Option<Slot> {
        self.find(&fp.0).map(|i| self.slot(i))
    }

    /// The live slot of `fp`, if any; a dead one is removed on the way.
    pub fn lookup(&mut self, fp: &Fingerprint, live: impl Fn(&Slot) -> bool) -> Option<Slot> {
        let found = self.find(&fp.0)?;
        let slot = self.slot(found);
        if live(&slot) {
            return Some(slot);
        }
        self.set(found, Slot::default());
        None
    }

    /// Stores `slot`, growing the table if need be and, at its bound,
    /// displacing the oldest probed entry; returns the entry it took the
    /// place of, if any. For loading and offline use (rewriting,
    /// rebuilding); a running store uses [`Partition::try_insert`].
    pub fn insert(&mut self, slot: Slot, live: impl Fn(&Slot) -> bool) -> Option<Slot> {
        match self.try_insert(slot, &live) {
            Ok(replaced) => replaced,
            Err(_) => {
                let oldest = self.place(&slot, &live).err().unwrap_or(0);
                self.put(&[], oldest, slot)
            }
        }
    }

    /// Makes the `moves` (each `(from, to)`: the entry in `from` goes to
    /// `to`, in order), then stores `slot` at `i`; returns what was
    /// overwritten at the end of the chain (an empty, dead or displaced
    /// entry, or the key's own).
    fn put(&mut self, moves: &[(usize, usize)], i: usize, slot: Slot) -> Option<Slot> {
        let overwritten = moves.first().map_or(self.slot(i), |(_, to)| self.slot(*to));
        for &(from, to) in moves {
            self.set(to, self.slot(from));
        }
        self.set(i, slot);
        (!overwritten.is_empty()).then_some(overwritten)
    }

    /// Stores `slot` in the key's own slot or an empty or dead one (moving
    /// entries of other keys to their other buckets to make one, and
    /// doubling the table when that fails), and returns the entry it took
    /// the place of, if any; never displaces a live entry of another key:
    /// when the table is at its bound and no room can be made, `Err` with
    /// the oldest probed entry (the caller evicts it the way the ring
    /// evicts, or refuses the write).
    pub fn try_insert(&mut self, slot: Slot, live: impl Fn(&Slot) -> bool) -> Result<Option<Slot>, Slot> {
        loop {
            match self.place(&slot, &live) {
                Ok((moves, i)) => return Ok(self.put(&moves, i, slot)),
                Err(oldest) if !self.grow(&live) => return Err(self.slot(oldest)),
                Err(_) => {}
            }
        }
    }

    /// Doubles the table, placing every live entry anew (dead ones are
    /// dropped); `false` at the bound.
    fn grow(&mut self, live: impl Fn(&Slot) -> bool) -> bool {
        let mut size = self.slot_count() * 2;
        while size <= self.max_slots {
            let mut grown = Partition::new(size, size);
            let placed = self
                .all()
                .filter(|s| !s.is_empty() && live(s))
                .all(|s| grown.place(&s, |_| true).map(|(moves, i)| grown.put(&moves, i, s)).is_ok());
            if placed {
                grown.max_slots = self.max_slots;
                *self = grown;
                return true;
            }
            size *= 2;
        }
        false
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
        let free = |i: usize| self.is_empty_at(i) || !live(&self.slot(i));
        if let Some(i) = self.find(&slot.fingerprint) {
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
        Err(probed.iter().copied().min_by_key(|i| self.slot(*i).logical).unwrap_or(0))
    }

    /// Removes `fp`'s entry if it still names the record at `logical`;
    /// returns it.
    pub fn remove(&mut self, fp: &Fingerprint, logical: u64) -> Option<Slot> {
        let i = self.find(&fp.0).filter(|i| self.slot(*i).logical == logical)?;
        let removed = self.slot(i);
        self.set(i, Slot::default());
        Some(removed)
    }

    /// Every entry held, live or not.
    pub fn entries(&self) -> impl Iterator<Item = Slot> + '_ {
        self.all().filter(|s| !s.is_empty())
    }

    /// Live entries (for statistics and tests).
    pub fn count(&self, live: impl Fn(&Slot) -> bool) -> usize {
        self.all().filter(|s| !s.is_empty() && live(s)).count()
    }

    /// Appends the live entries, encoded, to `out`, but none whose key
    /// `skip` names (a checkpoint takes those as they were at its barrier).
    pub fn encode_live(
        &self,
        seed: u64,
        live: impl Fn(&Slot) -> bool,
        skip: impl Fn(&[u8; 16]) -> bool,
        out: &mut Vec<u8>,
    ) {
        let size = usize::try_from(SLOT_BYTES).unwrap_or(32);
        for s in self.all().filter(|s| !s.is_empty() && live(s) && !skip(&s.fingerprint)) {
            let at = out.len();
            out.resize(at + size, 0);
            s.encode(seed, &mut out[at..]);
        }
    }
}

/// Every partition of a store's index, each behind its own lock.
/// Partition `p` is written only by the storage thread that owns it
/// ([`Owned`]); any thread may read it: FindMissingBlobs answers on the
/// caller's thread, without a hop to the storage threads.
#[derive(Debug)]
pub struct Shared {
    tables: Box<[RwLock<Partition>]>,
    /// Drops of entries sent to the storage threads and not yet made (of
    /// damaged records; of writes a failed data sync lost): while any are,
    /// lookups queue behind them.
    drops: AtomicUsize,
}

impl Shared {
    pub fn new(tables: Vec<Partition>) -> Shared {
        Shared { tables: tables.into_iter().map(RwLock::new).collect(), drops: AtomicUsize::new(0) }
    }

    pub fn drops_told(&self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }

    pub fn drops_done(&self) {
        self.drops.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn drops_pending(&self) -> bool {
        self.drops.load(Ordering::SeqCst) > 0
    }

    /// How many partitions there are (at least one).
    pub fn partitions(&self) -> u32 {
        u32::try_from(self.tables.len()).unwrap_or(u32::MAX).max(1)
    }

    /// Partition `p`, to read. A storage thread that panicked while writing
    /// leaves its table as it was: the store is stopping then.
    pub fn read(&self, p: u32) -> RwLockReadGuard<'_, Partition> {
        self.tables[p as usize].read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, p: u32) -> RwLockWriteGuard<'_, Partition> {
        self.tables[p as usize].write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The partitions one storage thread owns, and writes.
#[derive(Debug)]
pub struct Owned {
    shared: Arc<Shared>,
    thread: u32,
    threads: u32,
}

impl Owned {
    /// Thread `thread` of `threads` owns the partitions `p` with
    /// `p % threads == thread`.
    pub fn new(shared: Arc<Shared>, thread: u32, threads: u32) -> Owned {
        Owned { shared, thread, threads: threads.max(1) }
    }

    /// The partition numbers owned, in order.
    pub fn keys(&self) -> impl Iterator<Item = u32> + '_ {
        (self.thread..self.shared.partitions()).step_by(self.threads as usize)
    }

    fn owns(&self, p: u32) -> bool {
        p < self.shared.partitions() && p % self.threads == self.thread
    }

    /// Partition `p`, if this thread owns it, to read.
    pub fn get(&self, p: u32) -> Option<RwLockReadGuard<'_, Partition>> {
        self.owns(p).then(|| self.shared.read(p))
    }

    /// Partition `p`, which this thread owns, to change.
    pub fn write(&self, p: u32) -> RwLockWriteGuard<'_, Partition> {
        assert!(self.owns(p), "requests reach the thread that owns their partition");
        self.shared.write(p)
    }

    /// Drops [`Shared::drops_told`] announced are made.
    pub fn drops_done(&self) {
        self.shared.drops_done();
    }

    /// `f` summed over the partitions owned.
    pub fn sum(&self, f: impl Fn(&Partition) -> usize) -> usize {
        self.keys().map(|p| f(&self.shared.read(p))).sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap as Model;

    /// Distinct, spread over every bit as real fingerprints are, never zero.
    fn fp(n: u32) -> Fingerprint {
        let mut b = [0u8; 16];
        let n = u64::from(n) + 1;
        b[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        b[8..].copy_from_slice(&(n ^ 0x5555).wrapping_mul(0xC2B2_AE3D_27D4_EB4F).to_le_bytes());
        Fingerprint(b)
    }

    /// Slots whose keys all have the same two buckets (0 and 1 of a
    /// one-page table): [`PROBES`] slots for all of them.
    fn colliding(n: u32) -> Slot {
        let mut b = [0u8; 16];
        let second = (1 << 60) | (u64::from(n) << 4) | 1;
        b[0..8].copy_from_slice(&second.to_le_bytes());
        Slot { fingerprint: b, logical: u64::from(n), size: 1 }
    }

    /// Each bucket's spill count, counted afresh from the entries.
    fn spills_recounted(table: &Partition) -> Vec<u8> {
        let mut counts = vec![0u8; table.buckets.len()];
        for i in (0..table.slot_count()).filter(|i| !table.is_empty_at(*i)) {
            let (a, _) = table.buckets(&table.slot(i).fingerprint);
            if i / BUCKET_SLOTS != a {
                counts[a] = counts[a].saturating_add(1);
            }
        }
        counts
    }

    fn slot(n: u32, logical: u64) -> Slot {
        Slot { fingerprint: fp(n).0, logical, size: u64::from(n) }
    }

    proptest! {
        /// Against a HashMap: while the table has room, it agrees exactly;
        /// it never holds a key the model lacks, nor an old location.
        #[test]
        fn agrees_with_a_hash_map(ops in proptest::collection::vec((0u32..200, 0u8..3), 1..600)) {
            let mut table = Partition::new(1024, 1024);
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
                            prop_assert!(table.remove(&fp(key), at).is_some());
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
            let mut table = Partition::new(128, 128);
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
                            prop_assert!(table.remove(&fp, at).is_some());
                        }
                    }
                }
                prop_assert!(model.len() <= table.slot_count());
            }
            for (k, at) in &model {
                prop_assert_eq!(table.get(&Fingerprint(keys[*k])).map(|s| s.logical), Some(*at));
            }
            prop_assert_eq!(table.count(|_| true), model.len());
            prop_assert_eq!(&table.spilled, &spills_recounted(&table));
        }
    }

    #[test]
    fn a_full_table_displaces_the_oldest_and_dead_entries_make_room() {
        let mut table = Partition::new(128, 128);
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
            let mut table = Partition::new(8192, 8192);
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
        let mut table = Partition::new(128, 128);
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

    /// A table allotted too few slots doubles instead of refusing or
    /// displacing: every key stays findable, dead entries are dropped on
    /// the way, and only at its bound does an insert fail.
    #[test]
    fn a_full_table_grows_and_keeps_every_live_entry() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut table = Partition::new(16, 1024);
        let mut stored = Vec::new();
        for n in 1..=900u64 {
            let s = Slot { fingerprint: rng.random(), logical: n, size: 1 };
            assert_eq!(table.try_insert(s, |_| true), Ok(None), "entry {n}");
            stored.push(s);
        }
        assert!(table.slot_count() <= 1024 && table.slot_count() >= 512, "{}", table.slot_count());
        for s in &stored {
            assert_eq!(table.get(&Fingerprint(s.fingerprint)), Some(*s), "lost {s:?}");
        }
        assert_eq!(table.count(|_| true), table.used());
        // At the bound, a key that finds no room names the oldest entry.
        let mut refused = 0;
        for n in 901..=2000u64 {
            let s = Slot { fingerprint: rng.random(), logical: n, size: 1 };
            refused += usize::from(table.try_insert(s, |_| true).is_err());
        }
        assert!(refused > 0, "a bounded table refuses at its bound");
        assert_eq!(table.slot_count(), 1024);
        let mut out = Vec::new();
        table.encode_live(5, |s| s.logical > 1500, |fp| fp[0] == 0, &mut out);
        let expected = (0..table.slot_count())
            .map(|i| table.slot_at(i))
            .filter(|s| !s.is_empty() && s.logical > 1500 && s.fingerprint[0] != 0)
            .count();
        assert_eq!(out.len(), expected * 32);
        for raw in out.chunks_exact(32) {
            assert!(Slot::decode(raw, 5).is_some_and(|s| s.logical > 1500));
        }
    }
}
