//! A storage thread's part of a sync: what changed in its partitions since
//! the last one, for the syncer to append to the index log, or every live
//! entry as of the barrier, for a checkpoint (see `syncer.rs`).
//!
//! Changes are kept in order: an entry put in, or a tombstone (a key's
//! entry at a position taken out). A checkpoint is written a partition at a
//! time while the thread goes on serving; so that it still shows the index
//! exactly as it was at the barrier (whose data the sync made durable), the
//! first change to each key after the barrier records the key's entry at
//! the barrier, and the checkpoint takes that instead of the table's.

use std::collections::HashMap;

use kiln_proto::limits::BLOCK_PERSIST_BYTES_MAX as PERSIST_BYTES_MAX;

use super::Worker;
use crate::store::block::format::{SLOT_BYTES, Slot, TOMBSTONE_SIZE};
use crate::store::block::index::Partition;

/// This thread's changes not yet in the index log, and a checkpoint in
/// progress.
#[derive(Debug, Default)]
pub(crate) struct Log {
    /// Changes since the last barrier, in order.
    pending: Vec<Slot>,
    /// Changes the sync in progress covers (kept when it fails, for the
    /// next one), and how many of them were handed out.
    in_sync: Vec<Slot>,
    handed: usize,
    checkpoint: Option<Checkpoint>,
}

#[derive(Debug)]
struct Checkpoint {
    /// Partitions not yet handed out.
    left: Vec<u32>,
    /// Keys changed since the barrier, with their entry then.
    changed: HashMap<[u8; 16], Option<Slot>>,
}

impl Worker {
    /// Notes that `slot` went into the index, where `before` was the key's
    /// entry.
    pub(super) fn log_insert(&mut self, slot: Slot, before: Option<Slot>) {
        self.log.pending.push(slot);
        if let Some(c) = &mut self.log.checkpoint {
            c.changed.entry(slot.fingerprint).or_insert(before);
        }
    }

    /// Notes that `removed` left the index.
    pub(super) fn log_remove(&mut self, removed: Slot) {
        self.log.pending.push(Slot { size: TOMBSTONE_SIZE, ..removed });
        if let Some(c) = &mut self.log.checkpoint {
            c.changed.entry(removed.fingerprint).or_insert(Some(removed));
        }
    }

    /// Takes a sync's barrier: the changes so far are what it covers (with
    /// any a failed sync left); with `checkpoint`, it writes every live
    /// entry instead. Answers the entries held and the changes covered.
    pub(super) fn barrier(&mut self, checkpoint: bool) -> (u64, u64) {
        let pending = std::mem::take(&mut self.log.pending);
        self.log.in_sync.extend(pending);
        self.log.handed = 0;
        let unsynced = std::mem::take(&mut self.unsynced);
        self.in_sync.extend(unsynced);
        self.log.checkpoint = checkpoint.then(|| {
            let mut left: Vec<u32> = self.partitions.keys().collect();
            left.sort_unstable_by(|a, b| b.cmp(a));
            Checkpoint { left, changed: HashMap::new() }
        });
        let held = self.partitions.sum(Partition::used) as u64;
        (held, self.log.in_sync.len() as u64)
    }

    /// The next bounded batch of the sync in progress, encoded, and
    /// whether it is the last.
    pub(super) fn persist_batch(&mut self) -> (Vec<u8>, bool) {
        let slot_bytes = usize::try_from(SLOT_BYTES).unwrap_or(32);
        let mut out = Vec::new();
        let seed = self.seed;
        let Some(c) = &mut self.log.checkpoint else {
            let end = (self.log.handed + PERSIST_BYTES_MAX / slot_bytes).min(self.log.in_sync.len());
            for s in &self.log.in_sync[self.log.handed..end] {
                let at = out.len();
                out.resize(at + slot_bytes, 0);
                s.encode(seed, &mut out[at..]);
            }
            self.log.handed = end;
            return (out, end == self.log.in_sync.len());
        };
        let ring = self.ring.clone();
        let live = Self::live(&ring);
        // At least one partition per batch.
        while let Some(p) = c.left.pop() {
            if let Some(partition) = self.partitions.get(p) {
                partition.encode_live(seed, &live, |fp| c.changed.contains_key(fp), &mut out);
            }
            if out.len() >= PERSIST_BYTES_MAX {
                return (out, false);
            }
        }
        // Then the changed keys, as they were at the barrier.
        for s in c.changed.values().flatten().filter(|s| live(s)) {
            let at = out.len();
            out.resize(at + slot_bytes, 0);
            s.encode(seed, &mut out[at..]);
        }
        self.log.checkpoint = None;
        (out, true)
    }

    /// Ends the sync in progress. When it reached the disk, what it covered
    /// is done with; when it failed, its changes wait for the next one, or,
    /// when the data device failed its sync (`data_lost`), every entry
    /// committed since the last good sync is undone (Linux reports such an
    /// error once: those entries may name bytes that never reached the
    /// disk, so they are never persisted).
    pub(super) fn end_sync(&mut self, ok: bool, data_lost: bool) {
        self.log.checkpoint = None;
        self.log.handed = 0;
        if ok {
            self.log.in_sync.clear();
            self.in_sync.clear();
        } else if data_lost {
            self.drop_unsynced();
            self.log.in_sync.clear();
            self.log.pending.clear();
        }
    }
}
