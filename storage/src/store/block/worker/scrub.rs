//! The scrub: every storage thread re-reads the records its index names,
//! at a bounded rate, and checks their headers and chunk checksums, so that
//! damage is found (and the blob reported missing, for clients to upload
//! again) before a build relies on it, not when it reads it.
//!
//! It walks the thread's partitions slot by slot and reads each live
//! record a step at a time, spending a budget that grows with time
//! (`scrub_bytes_per_second` over all threads). A record that fails its
//! checks is dropped and counted, exactly as a read that found it would;
//! an I/O error, or a record evicted meanwhile, proves nothing and is
//! passed over.

use std::time::Instant;

use kiln_proto::limits::{
    BLOCK_REFRESH_STEP_BYTES as STEP_BYTES, BLOCK_SCRUB_SLOTS_PER_TICK_MAX as SLOTS_PER_TICK_MAX,
};

use super::super::format::{
    CRC_CHUNK_BYTES, Fingerprint, RECORD_HEADER_BYTES, RecordHeader, crc_offset, record_len,
};
use super::super::index::Partition;
use super::{Location, Worker, check_chunks};

/// Where the scrub of one storage thread stands.
#[derive(Debug)]
pub(crate) struct Scrub {
    /// Bytes per second this thread reads; 0: no scrub.
    rate_bytes_per_second: u64,
    /// Bytes it may read now.
    budget: u64,
    last: Instant,
    /// The next slot to look at: index into the thread's partitions (in
    /// partition order) and slot within it.
    partition: usize,
    slot: usize,
    /// The record being checked, and how many of its data bytes are.
    current: Option<(Fingerprint, Location, u64)>,
    /// The thread's partition numbers in order.
    numbers: Vec<u32>,
}

impl Scrub {
    pub(crate) fn new(rate_bytes_per_second: u64) -> Scrub {
        Scrub {
            rate_bytes_per_second,
            budget: 0,
            last: Instant::now(),
            partition: 0,
            slot: 0,
            current: None,
            numbers: Vec::new(),
        }
    }
}

/// What one step of the scrub came to.
enum Checked {
    /// Bytes read; the record is not finished.
    More(u64),
    /// Bytes read; the record checked out (or proved nothing).
    Done(u64),
    /// The record is damaged.
    Damaged(String),
}

impl Worker {
    /// Spends the time since the last call on the scrub.
    pub(super) fn scrub_tick(&mut self) {
        let rate = self.scrub.rate_bytes_per_second;
        if rate == 0 {
            return;
        }
        let now = Instant::now();
        let micros = u64::try_from((now - self.scrub.last).as_micros()).unwrap_or(u64::MAX);
        let earned = micros.saturating_mul(rate) / 1_000_000;
        self.scrub.last = now;
        // At most a second's worth (and a step) saved up: a stalled thread
        // does not make up for it in one burst.
        let cap = rate.saturating_add(STEP_BYTES);
        self.scrub.budget = self.scrub.budget.saturating_add(earned).min(cap);
        let mut visited = 0usize;
        while self.scrub.budget > 0 {
            let Some(spent) = self.scrub_step(&mut visited) else { break };
            self.scrub.budget = self.scrub.budget.saturating_sub(spent.max(1));
        }
    }

    /// One step: the next piece of the current record, or the next record.
    /// `None` when a whole pass found nothing to check.
    fn scrub_step(&mut self, visited: &mut usize) -> Option<u64> {
        let (fp, loc, done) = match self.scrub.current {
            Some(current) => current,
            None => {
                let next = self.scrub_next(visited)?;
                self.scrub.current = Some((next.0, next.1, 0));
                (next.0, next.1, 0)
            }
        };
        let checked = self.scrub_check(fp, loc, done);
        match checked {
            Checked::More(read) => {
                let step = (STEP_BYTES).min(loc.size - done);
                self.scrub.current = Some((fp, loc, done + step));
                self.scrub_counted(read);
                Some(read)
            }
            Checked::Done(read) => {
                self.scrub.current = None;
                self.scrub_counted(read);
                Some(read)
            }
            Checked::Damaged(why) => {
                self.scrub.current = None;
                kiln_proto::metrics::global().store_scrub_damaged.inc();
                let _ = self.corrupt(&fp, loc, &format!("found by the scrub: {why}"));
                Some(1)
            }
        }
    }

    fn scrub_counted(&self, read: u64) {
        kiln_proto::metrics::global().store_scrubbed_bytes.inc_by(read);
    }

    /// The next live entry of this thread's partitions, going round.
    fn scrub_next(&mut self, visited: &mut usize) -> Option<(Fingerprint, Location)> {
        if self.scrub.numbers.is_empty() {
            // The thread's partitions never change: listed once, in order.
            self.scrub.numbers = self.partitions.keys().collect();
        }
        // Tables grow: their slots are counted afresh.
        let total = self.partitions.sum(Partition::slot_count);
        let numbers = &self.scrub.numbers;
        let ring = self.ring.clone();
        // A sparse table is walked a bounded number of slots per tick.
        let limit = total.min(SLOTS_PER_TICK_MAX);
        while *visited < limit {
            *visited += 1;
            let partition = self.partitions.get(numbers[self.scrub.partition % numbers.len()])?;
            let slot = (self.scrub.slot < partition.slot_count()).then(|| partition.slot_at(self.scrub.slot));
            self.scrub.slot += 1;
            if self.scrub.slot >= partition.slot_count() {
                self.scrub.slot = 0;
                self.scrub.partition = (self.scrub.partition + 1) % numbers.len();
            }
            if let Some(slot) = slot.filter(|s| !s.is_empty() && ring.is_live(s.logical, record_len(s.size)))
            {
                return Some((
                    Fingerprint(slot.fingerprint),
                    Location { logical: slot.logical, size: slot.size },
                ));
            }
        }
        None
    }

    /// Checks the header (first step) and the data from `done` on, a step
    /// of whole checksum chunks at a time.
    fn scrub_check(&self, fp: Fingerprint, loc: Location, done: u64) -> Checked {
        let ring = self.ring.clone();
        let Some(_pin) = ring.pin(loc.logical, record_len(loc.size)) else { return Checked::Done(0) };
        let mut read = 0;
        if done == 0 {
            let mut header = vec![0u8; 64];
            if self.data.read_at(&mut header, ring.physical(loc.logical)).is_err() {
                return Checked::Done(0);
            }
            read += 64;
            let expected =
                RecordHeader { kind: self.kind, fingerprint: fp, size: loc.size, logical: loc.logical };
            if let Err(why) = RecordHeader::check(&header, &expected) {
                return self.scrub_verdict(loc, Checked::Damaged(why));
            }
        }
        let end = (done + STEP_BYTES).min(loc.size);
        if end > done {
            let (c0, c1) = (done / CRC_CHUNK_BYTES, end.div_ceil(CRC_CHUNK_BYTES));
            let mut data = vec![0u8; usize::try_from(end - done).unwrap_or(0)];
            let mut crcs = vec![0u8; usize::try_from(4 * (c1 - c0)).unwrap_or(0)];
            let at = ring.physical(loc.logical + RECORD_HEADER_BYTES + done);
            let crc_at = ring.physical(loc.logical + crc_offset(loc.size, c0));
            if self.data.read_at(&mut data, at).is_err() || self.data.read_at(&mut crcs, crc_at).is_err() {
                return Checked::Done(read);
            }
            read += data.len() as u64 + crcs.len() as u64;
            if let Err(why) = check_chunks(&data, &crcs) {
                return self.scrub_verdict(loc, Checked::Damaged(why));
            }
        }
        let outcome = if end >= loc.size { Checked::Done(read) } else { Checked::More(read) };
        self.scrub_verdict(loc, outcome)
    }

    /// Bytes read from a record the ring has since passed prove nothing.
    fn scrub_verdict(&self, loc: Location, checked: Checked) -> Checked {
        if self.ring.is_live(loc.logical, record_len(loc.size)) { checked } else { Checked::Done(0) }
    }
}
