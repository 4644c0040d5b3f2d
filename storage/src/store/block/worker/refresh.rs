//! Copying blobs forward: a blob touched while old is copied to the head,
//! its source held (never evicted before the copy is made) and its copy's
//! place reserved when it is queued, a bounded step at a time, checked on
//! the way (docs/storage-format.md, "What a touched blob is promised").

use kiln_proto::limits::{
    BLOCK_REFRESH_QUEUE_MAX as REFRESH_QUEUE_MAX, BLOCK_REFRESH_STEP_BYTES as REFRESH_STEP_BYTES,
};

use super::super::format::{
    CRC_CHUNK_BYTES, Fingerprint, RECORD_HEADER_BYTES, RecordHeader, Slot, crc_offset, record_len,
};
use super::super::ring::{Held, Ring};
use super::{Location, Worker, check_chunks};

/// A blob being copied forward.
#[derive(Debug)]
pub(super) struct Refresh {
    pub(super) fp: Fingerprint,
    from: Location,
    /// The copy's place, reserved when the refresh was queued.
    to: u64,
    copied: u64,
    /// The source's blocks, held until the copy is made.
    held: Option<Held>,
}

/// What one step of a copy forward came to.
enum Step {
    More,
    Done,
    /// Abandoned: the blob is not kept (counted as a skipped refresh).
    Gone(&'static str),
}

impl Worker {
    /// Queues a copy of `fp` to the head; false if the backlog is full.
    pub(super) fn queue_refresh(&mut self, fp: Fingerprint, from: Location) -> bool {
        if self.refreshing.contains_key(&fp) {
            return true;
        }
        let len = record_len(from.size);
        if self.refreshes.len() >= REFRESH_QUEUE_MAX || !self.ring.take_refresh(len) {
            return false;
        }
        // The source is held (never evicted before it is copied) and the
        // copy's place reserved now: the copy then needs nothing else, so
        // writers waiting behind the held source always see it finish.
        let Some(held) = self.ring.hold(from.logical, len) else {
            self.ring.refresh_done(len);
            return false;
        };
        let Ok(to) = self.ring.reserve(len) else {
            self.ring.release(held);
            self.ring.refresh_done(len);
            return false;
        };
        self.refreshing.insert(fp, ());
        self.refreshes.push_back(Refresh { fp, from, to, copied: 0, held: Some(held) });
        true
    }

    /// Copies one step of the oldest queued refresh forward, checking the
    /// data's chunk checksums on the way: a damaged blob is dropped, never
    /// copied. Returns the bytes copied, `None` when there is nothing to do.
    pub(super) fn refresh_step(&mut self) -> Option<u64> {
        let mut job = self.refreshes.pop_front()?;
        let ring = self.ring.clone();
        let len = record_len(job.from.size);
        let before = job.copied;
        let outcome = self.copy_step(&ring, &mut job, len);
        let copied = job.copied - before;
        match outcome {
            Ok(Step::More) => {
                self.refreshes.push_front(job);
                return Some(copied.max(1));
            }
            Ok(Step::Done) => {
                // Only if the entry still names the old copy (dead or not:
                // the tail may have been moved past the held source).
                let current = self.partition(&job.fp).get(&job.fp);
                if current.is_some_and(|s| s.logical == job.from.logical) {
                    // The key's own slot takes the copy: this never needs room.
                    if self
                        .insert(Slot { fingerprint: job.fp.0, logical: job.to, size: job.from.size })
                        .is_ok()
                    {
                        kiln_proto::metrics::global().store_refreshes.inc();
                    }
                }
            }
            Ok(Step::Gone(why)) => {
                kiln_proto::metrics::global().store_refreshes_skipped.inc();
                tracing::warn!(store = self.kind.name(), fp = ?job.fp, why, "a copy forward was abandoned");
            }
            Err(why) => {
                self.corrupt(&job.fp, job.from, &why);
            }
        }
        self.refreshing.remove(&job.fp);
        if let Some(held) = job.held.take() {
            ring.release(held);
        }
        ring.refresh_done(len);
        Some(copied.max(1))
    }

    /// Gives back what the queued refreshes hold (at exit).
    pub(super) fn release_refreshes(&mut self) {
        for mut job in self.refreshes.drain(..) {
            if let Some(held) = job.held.take() {
                self.ring.release(held);
            }
            self.ring.refresh_done(record_len(job.from.size));
        }
    }

    /// One step of a refresh; `Err` when the source is damaged. The
    /// source is held, so its bytes are there even if the tail has been
    /// moved past it.
    fn copy_step(&mut self, ring: &Ring, job: &mut Refresh, len: u64) -> std::result::Result<Step, String> {
        let to = job.to;
        let Some(_to) = ring.pin(to, len) else {
            return Ok(Step::Gone("the ring passed the copy while it was made"));
        };
        let size = job.from.size;
        let data_end = RECORD_HEADER_BYTES + size;
        // Steps cover the header with the first data, whole checksum chunks
        // of data, then the checksums and padding.
        let (from, until) = if job.copied < data_end {
            let data_from = job.copied.saturating_sub(RECORD_HEADER_BYTES);
            (job.copied, (RECORD_HEADER_BYTES + data_from + REFRESH_STEP_BYTES).min(data_end))
        } else {
            (job.copied, len)
        };
        // An I/O error abandons the copy (the source may read fine later);
        // only bytes that fail their checks count as damage.
        let mut buf = vec![0u8; usize::try_from(until - from).unwrap_or(0)];
        if self.data.read_at(&mut buf, ring.physical(job.from.logical + from)).is_err() {
            return Ok(Step::Gone("reading the source failed"));
        }
        if from == 0 {
            let expected =
                RecordHeader { kind: self.kind, fingerprint: job.fp, size, logical: job.from.logical };
            RecordHeader::check(&buf, &expected)?;
            // The copy gets its own header (its own logical position).
            let header = RecordHeader { logical: to, ..expected };
            buf[..64].copy_from_slice(&header.encode_tagged(&self.record_key));
        }
        if from < data_end {
            let data_from = from.saturating_sub(RECORD_HEADER_BYTES);
            let data_to = until - RECORD_HEADER_BYTES;
            let (c0, c1) = (data_from / CRC_CHUNK_BYTES, data_to.div_ceil(CRC_CHUNK_BYTES));
            let mut crcs = vec![0u8; usize::try_from(4 * (c1 - c0)).unwrap_or(0)];
            if self.data.read_at(&mut crcs, ring.physical(job.from.logical + crc_offset(size, c0))).is_err() {
                return Ok(Step::Gone("reading the source failed"));
            }
            let skip = usize::try_from(RECORD_HEADER_BYTES.saturating_sub(from)).unwrap_or(0);
            check_chunks(&buf[skip..], &crcs)?;
        }
        if let Err(e) = self.data.write_at(&buf, ring.physical(to + from)) {
            tracing::error!(error = %e, "writing a copy forward failed");
            return Ok(Step::Gone("writing the copy failed"));
        }
        job.copied = until;
        Ok(if job.copied == len { Step::Done } else { Step::More })
    }
}
