//! The ring: the data device as one log of records, reused oldest block
//! first.
//!
//! Positions are logical: bytes written since the store was formatted,
//! never reused. A logical position `p` lives at physical offset
//! `PAGE_BYTES + p % capacity`. Everything in `tail..head` is live; a
//! record below `tail` is gone, whatever its bytes still say. The tail
//! moves a block at a time, only forward.
//!
//! Two rules keep readers and restarts safe:
//!
//! - No block is reused while an I/O holds it: an I/O pins the blocks it
//!   touches and then checks that its range is still live; the tail is moved
//!   first and the pins drained after. Whichever comes first, the I/O sees
//!   the new tail and gives up, or the mover waits for the I/O.
//! - Nothing the last persisted index may name is overwritten: space is
//!   handed out only up to `persisted_tail + capacity`. Moving the tail
//!   further needs a sync that persists the new tail first.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use super::format::PAGE_BYTES;

#[derive(Debug)]
pub struct Ring {
    capacity: u64,
    block_bytes: u64,
    head: AtomicU64,
    tail: AtomicU64,
    persisted_tail: AtomicU64,
    /// In-flight I/O per physical block.
    pins: Box<[AtomicU32]>,
    /// Index entries whose records start in each physical block, and their
    /// sum over the live blocks: the store's entry count in O(1). Moving the
    /// tail past a block takes its entries off the sum.
    block_entries: Box<[AtomicI64]>,
    entries: AtomicI64,
    /// Bytes queued to be copied forward, over all storage threads.
    refresh_backlog: AtomicU64,
}

/// Blocks held across many steps (a copy forward's source); given back
/// with [`Ring::release`].
#[derive(Debug)]
#[must_use = "held blocks are never reused until released"]
pub struct Held {
    first: u64,
    last: u64,
}

/// Blocks pinned by one I/O; unpinned on drop.
#[derive(Debug)]
pub struct Pinned<'a> {
    ring: &'a Ring,
    first: u64,
    last: u64,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        for b in self.first..=self.last {
            self.ring.pins[self.ring.block_index(b)].fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Ring {
    /// A ring of `capacity` bytes in blocks of `block_bytes`, with `tail`
    /// and `head` as persisted (both zero for a new store).
    pub fn new(capacity: u64, block_bytes: u64, tail: u64, head: u64) -> Ring {
        assert!(block_bytes > 0 && capacity.is_multiple_of(block_bytes), "the ring is whole blocks");
        assert!(tail <= head && head - tail <= capacity, "a ring's live range fits in it");
        let blocks = usize::try_from(capacity / block_bytes).unwrap_or(0);
        Ring {
            capacity,
            block_bytes,
            head: AtomicU64::new(head),
            tail: AtomicU64::new(tail),
            persisted_tail: AtomicU64::new(tail),
            pins: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            block_entries: (0..blocks).map(|_| AtomicI64::new(0)).collect(),
            entries: AtomicI64::new(0),
            refresh_backlog: AtomicU64::new(0),
        }
    }

    /// Counts an index entry for the live record at `logical`.
    pub fn entry_added(&self, logical: u64) {
        self.block_entries[self.block_index(logical / self.block_bytes)].fetch_add(1, Ordering::SeqCst);
        self.entries.fetch_add(1, Ordering::SeqCst);
    }

    /// Uncounts the entry of the record at `logical`, if it is still live
    /// (a dead one was uncounted when the tail passed its block).
    pub fn entry_removed(&self, logical: u64) {
        if logical >= self.tail() {
            self.block_entries[self.block_index(logical / self.block_bytes)].fetch_sub(1, Ordering::SeqCst);
            self.entries.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Index entries of live records. A race between an entry's change
    /// and the tail passing its block may leave it off by a few until the
    /// tail passes that block again.
    pub fn entries(&self) -> u64 {
        u64::try_from(self.entries.load(Ordering::SeqCst)).unwrap_or(0)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Room the syncer keeps free ahead of the head by evicting early: an
    /// eighth of the ring, at least two blocks, at most half.
    pub fn headroom(&self) -> u64 {
        (self.capacity / 8).max(2 * self.block_bytes).min(self.capacity / 2)
    }

    /// What a touched blob is promised: it survives at least this many
    /// bytes of further writes (half of what the ring holds past its
    /// headroom and a block; about 7/16 of the ring at default sizing). A
    /// blob older than this when touched is copied forward.
    pub fn kept_bytes(&self) -> u64 {
        self.lifetime() / 2
    }

    /// Whether the record at `logical` is older than [`Ring::kept_bytes`]:
    /// touched now, it must be copied forward to keep the promise.
    pub fn past_kept(&self, logical: u64) -> bool {
        self.head().saturating_sub(logical) > self.kept_bytes()
    }

    /// Bytes a record written now is sure to survive: the ring less the
    /// headroom the syncer evicts ahead, less a block (the tail moves in
    /// whole blocks).
    fn lifetime(&self) -> u64 {
        self.capacity.saturating_sub(self.headroom() + self.block_bytes)
    }

    /// Bytes that may wait to be copied forward at once, over all storage
    /// threads.
    pub fn refresh_backlog_bytes_max(&self) -> u64 {
        self.lifetime() / 4
    }

    /// Takes `len` bytes of the copy-forward backlog; false if it is full.
    pub fn take_refresh(&self, len: u64) -> bool {
        self.refresh_backlog
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |backlog| {
                (backlog + len <= self.refresh_backlog_bytes_max()).then_some(backlog + len)
            })
            .is_ok()
    }

    /// Bytes queued to be copied forward now.
    pub fn refresh_backlog(&self) -> u64 {
        self.refresh_backlog.load(Ordering::SeqCst)
    }

    /// Gives back what [`Ring::take_refresh`] took.
    pub fn refresh_done(&self, len: u64) {
        self.refresh_backlog.fetch_sub(len, Ordering::SeqCst);
    }

    /// Holds the blocks of `logical..logical + len` until
    /// [`Ring::release`]: the tail may be moved past them, but they are not
    /// reused (nor the tail persisted past them) while held. A copy forward
    /// holds its source so that it cannot be evicted before the copy is
    /// made: writers then wait for room instead (back-pressure). `None` if
    /// the range is no longer live.
    pub fn hold(&self, logical: u64, len: u64) -> Option<Held> {
        let pinned = self.pin(logical, len)?;
        let held = Held { first: pinned.first, last: pinned.last };
        std::mem::forget(pinned);
        Some(held)
    }

    /// Lets go of blocks [`Ring::hold`] held. Taking the hold by value
    /// means it cannot be released twice.
    #[allow(clippy::needless_pass_by_value)]
    pub fn release(&self, held: Held) {
        let Held { first, last } = held;
        drop(Pinned { ring: self, first, last });
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    pub fn head(&self) -> u64 {
        self.head.load(Ordering::SeqCst)
    }

    pub fn tail(&self) -> u64 {
        self.tail.load(Ordering::SeqCst)
    }

    pub fn persisted_tail(&self) -> u64 {
        self.persisted_tail.load(Ordering::SeqCst)
    }

    /// Bytes that can be handed out before a sync must persist a newer tail.
    pub fn free(&self) -> u64 {
        (self.persisted_tail() + self.capacity).saturating_sub(self.head())
    }

    /// Where logical position `p` lies on the device.
    pub fn physical(&self, p: u64) -> u64 {
        PAGE_BYTES + p % self.capacity
    }

    fn block_index(&self, logical_block: u64) -> usize {
        usize::try_from(logical_block % (self.capacity / self.block_bytes)).unwrap_or(0)
    }

    /// Whether `logical..logical + len` is live.
    pub fn is_live(&self, logical: u64, len: u64) -> bool {
        logical >= self.tail() && logical + len <= self.head()
    }

    /// Room that client writes leave free for copies forward, so that a
    /// blob FindMissingBlobs finds old can almost always be queued for its
    /// copy (else it is reported missing): a quarter of the headroom.
    pub fn copy_reserve(&self) -> u64 {
        self.headroom() / 4
    }

    /// Hands out `len` bytes for a client's record, leaving
    /// [`Ring::copy_reserve`] free; `Err` with the tail a sync must persist
    /// first when there is no room.
    pub fn reserve_for_client(&self, len: u64) -> Result<u64, u64> {
        self.reserve_leaving(len, self.copy_reserve())
    }

    /// Hands out `len` bytes that do not cross the device's end; `Err` with
    /// the tail a sync must persist first when there is no room.
    pub fn reserve(&self, len: u64) -> Result<u64, u64> {
        self.reserve_leaving(len, 0)
    }

    fn reserve_leaving(&self, len: u64, spare: u64) -> Result<u64, u64> {
        assert!(len > 0 && len <= self.capacity / 2, "records are at most half the ring");
        loop {
            let head = self.head();
            let mut start = head;
            let in_lap = start % self.capacity;
            if in_lap + len > self.capacity {
                start += self.capacity - in_lap;
            }
            let end = start + len;
            // Writing up to `end` overwrites what lay at `end - capacity`.
            let needed = (end + spare).saturating_sub(self.capacity);
            if needed > self.persisted_tail() {
                return Err(needed.next_multiple_of(self.block_bytes));
            }
            if self.head.compare_exchange(head, end, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                debug_assert!(self.tail() >= needed);
                return Ok(start);
            }
        }
    }

    /// Pins the blocks of `logical..logical + len` for one I/O; `None` if
    /// the range is no longer live (its blocks may be reused any moment).
    pub fn pin(&self, logical: u64, len: u64) -> Option<Pinned<'_>> {
        let first = logical / self.block_bytes;
        let last = (logical + len.max(1) - 1) / self.block_bytes;
        for b in first..=last {
            self.pins[self.block_index(b)].fetch_add(1, Ordering::SeqCst);
        }
        let pinned = Pinned { ring: self, first, last };
        (logical >= self.tail()).then_some(pinned)
    }

    /// Moves the tail to at least `tail` (whole blocks), without waiting:
    /// what lies below is dead from now on (I/O in flight there finds out
    /// when it checks), though its space is reused only after the syncer
    /// has waited for that I/O and persisted the tail. Returns the tail.
    pub fn evict_to(&self, tail: u64) -> u64 {
        // Never past the head: the tail bounds what is live.
        let target = tail.next_multiple_of(self.block_bytes).min(self.head());
        let old = self.tail.fetch_max(target, Ordering::SeqCst);
        for b in old / self.block_bytes..target.div_ceil(self.block_bytes) {
            let gone = self.block_entries[self.block_index(b)].swap(0, Ordering::SeqCst);
            self.entries.fetch_sub(gone, Ordering::SeqCst);
        }
        self.tail()
    }

    /// Moves the tail to at least `tail` (whole blocks), then waits until no
    /// I/O or copy forward holds the blocks below it that are not yet
    /// persisted as free. Returns the new tail.
    pub fn advance_tail(&self, tail: u64) -> u64 {
        let from = self.persisted_tail();
        let target = self.evict_to(tail);
        for b in from / self.block_bytes..target.div_ceil(self.block_bytes) {
            let pins = &self.pins[self.block_index(b)];
            let mut spins = 0u32;
            while pins.load(Ordering::SeqCst) != 0 {
                // I/O is brief; a held copy source may take a while.
                spins += 1;
                if spins < 1000 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        }
        self.tail()
    }

    /// Records that `tail` is now persisted (after the sync that wrote it).
    pub fn set_persisted_tail(&self, tail: u64) {
        self.persisted_tail.fetch_max(tail, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

    use super::*;

    #[test]
    fn reservations_never_cross_the_end_nor_pass_the_persisted_tail() {
        let ring = Ring::new(1000, 100, 0, 0);
        assert_eq!(ring.reserve(400), Ok(0));
        assert_eq!(ring.reserve(400), Ok(400));
        // 300 more would cross the end: padded to the next lap, which
        // overwrites 0..300 and needs the tail persisted past it.
        assert_eq!(ring.reserve(300), Err(300));
        assert_eq!(ring.advance_tail(300), 300);
        assert_eq!(ring.reserve(300), Err(300), "not persisted yet");
        ring.set_persisted_tail(300);
        assert_eq!(ring.reserve(300), Ok(1000));
        assert_eq!(ring.physical(1000), PAGE_BYTES);
        assert!(!ring.is_live(0, 10) && ring.is_live(400, 400));
    }

    #[test]
    fn pins_hold_blocks_until_the_io_ends() {
        let ring = std::sync::Arc::new(Ring::new(1000, 100, 0, 0));
        ring.reserve(450).unwrap();
        let pinned = ring.pin(120, 50).unwrap();
        let mover = {
            let ring = ring.clone();
            std::thread::spawn(move || ring.advance_tail(200))
        };
        // The mover moved the tail, so new I/O there gives up...
        while ring.tail() < 200 {
            std::thread::yield_now();
        }
        assert!(ring.pin(150, 10).is_none());
        // ...but it waits for the I/O in flight.
        assert!(!mover.is_finished());
        drop(pinned);
        assert_eq!(mover.join().unwrap(), 200);
        assert!(ring.pin(200, 10).is_some());
        // Evicting moves the tail at once, waiting for nothing; the next
        // advance waits for I/O anywhere above the persisted tail.
        let late = ring.pin(250, 10).unwrap();
        assert_eq!(ring.evict_to(300), 300);
        let mover = {
            let ring = ring.clone();
            std::thread::spawn(move || ring.advance_tail(300))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!mover.is_finished(), "the advance did not wait for I/O the eviction passed");
        drop(late);
        assert_eq!(mover.join().unwrap(), 300);
    }
}
