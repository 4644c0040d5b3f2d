//! The syncer: makes the store durable, a step at a time, and keeps room
//! in the ring.
//!
//! A sync, in this order (docs/storage-format.md gives the argument):
//!
//! 1. *Barrier*: every storage thread sets aside the index changes made
//!    since the last sync (entries put in, tombstones). Every record
//!    committed before the barrier has had its bytes written.
//! 2. The ring's `tail` and `head` are read: they bound what the new state
//!    may name.
//! 3. The data device is synced: every record the barrier covers is
//!    durable.
//! 4. The changes are appended to the log of the index region in force,
//!    and the index is synced. Once the log is longer than the region's
//!    checkpoint, the sync writes a new region instead, where no
//!    superblock's region in force lies: a checkpoint of every live entry
//!    as of the barrier, which the threads hand out a partition at a time
//!    while they go on serving.
//! 5. The superblock not written last (sequence + 1, `tail`, `head`, the
//!    region and the bytes of its checkpoint and log) is written and
//!    synced: from now on a restart uses it.
//! 6. Only now may space below the new tail be reused.
//!
//! A failure at any step abandons the sync; the previous state stays the
//! one a restart uses, the changes wait for the next sync, and what was
//! written past the end of the log in force is ignored.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use kiln_proto::{Code, Error, Result};

use super::device::BlockDevice;
use super::format::{IndexLayout, LAYOUT_LOGGED, PAGE_BYTES, REGION_START, SLOT_BYTES, Superblock};
use super::index::Shared;
use super::io::IoEngine;
use super::ring::Ring;
use super::worker::Request;

/// What the syncer is told.
#[derive(Debug)]
pub enum SyncerMessage {
    /// A reservation needs the tail at least here; 0: a storage thread
    /// asks for a sync soon (its list of unsynced entries is long).
    NeedSpace(u64),
    /// Sync now and say how it went.
    SyncNow(oneshot::Sender<Result<()>>),
    /// Sync one last time, then stop.
    Stop(oneshot::Sender<Result<()>>),
    /// Stop without syncing (a simulated power cut, in tests).
    Halt,
}

pub struct Syncer {
    pub ring: Arc<Ring>,
    pub data: Arc<dyn BlockDevice>,
    pub index_dev: Arc<dyn BlockDevice>,
    pub superblock: Superblock,
    pub workers: Vec<async_channel::Sender<Request>>,
    /// The index, to announce the drops a failed data sync makes.
    pub index: Arc<Shared>,
    pub messages: mpsc::Receiver<SyncerMessage>,
    pub interval: Duration,
    /// Room kept free in the ring ahead of the head.
    pub headroom: u64,
    /// The log is folded into a checkpoint once longer than this and than
    /// the checkpoint.
    pub log_min_bytes: u64,
    pub io: IoEngine,
    /// Syncs done and their durations, for statistics.
    pub stats: Arc<SyncStats>,
}

/// What the syncer has done, for statistics.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub syncs: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
    pub last_micros: std::sync::atomic::AtomicU64,
    /// When the last sync finished, in milliseconds since the Unix epoch.
    pub last_unix_ms: std::sync::atomic::AtomicU64,
    /// Syncs failed in a row since the last good one.
    pub failing: std::sync::atomic::AtomicU64,
    /// Why the last sync failed, while they fail.
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl SyncStats {
    /// Why the store cannot sync, while its syncs keep failing (the last
    /// [`SYNC_FAILURES_UNHEALTHY`] or more in a row).
    pub fn unhealthy(&self) -> Option<String> {
        let failing = self.failing.load(std::sync::atomic::Ordering::Relaxed);
        if failing < SYNC_FAILURES_UNHEALTHY {
            return None;
        }
        let why = self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        Some(format!("{failing} syncs in a row failed: {}", why.unwrap_or_default()))
    }

    fn record(&self, result: &Result<()>) {
        let mut last = self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(()) => {
                self.failing.store(0, std::sync::atomic::Ordering::Relaxed);
                *last = None;
            }
            Err(e) => {
                self.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.failing.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *last = Some(e.message().to_owned());
            }
        }
    }
}

/// Failed syncs in a row after which the store reports itself unhealthy.
pub const SYNC_FAILURES_UNHEALTHY: u64 = 3;

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer").field("superblock", &self.superblock).finish_non_exhaustive()
    }
}

fn unavailable(what: &str, dev: &dyn BlockDevice, e: &std::io::Error) -> Error {
    Error::new(Code::Unavailable, format!("{what} {}: {e}", dev.describe()))
}

impl Syncer {
    /// Runs until stopped.
    pub fn run(mut self) {
        let mut last = Instant::now();
        let mut synced = (self.ring.tail(), self.ring.head());
        // After a failure the next try waits, doubling up to 5 s, so that a
        // failing disk is not hammered nor the log flooded.
        let mut backoff = Duration::ZERO;
        loop {
            let wait = self.interval.min(Duration::from_millis(100));
            let mut needed = 0u64;
            // A storage thread's list of unsynced entries is long: sync.
            let mut soon = false;
            let mut now_replies = Vec::new();
            let mut stop = None;
            match self.messages.recv_timeout(wait) {
                Ok(m) => {
                    for m in std::iter::once(m).chain(self.messages.try_iter()) {
                        match m {
                            SyncerMessage::NeedSpace(0) => soon = true,
                            SyncerMessage::NeedSpace(t) => needed = needed.max(t),
                            SyncerMessage::SyncNow(reply) => now_replies.push(reply),
                            SyncerMessage::Stop(reply) => stop = Some(reply),
                            SyncerMessage::Halt => return,
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let short = self.ring.free() < self.headroom / 2 + self.ring.copy_reserve();
            let due = last.elapsed() >= self.interval && (self.ring.tail(), self.ring.head()) != synced;
            if needed > 0 || short {
                // Evict ahead: room for `headroom` more bytes after this sync.
                let target =
                    needed.max((self.ring.head() + self.headroom).saturating_sub(self.ring.capacity()));
                self.ring.advance_tail(target);
            }
            let asked = !now_replies.is_empty() || stop.is_some();
            let waited = last.elapsed() >= backoff;
            if asked || ((needed > 0 || short || due || soon) && waited) {
                let result = self.sync();
                self.stats.record(&result);
                if let Err(e) = &result {
                    backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                    tracing::error!(error = %e, retry_in = ?backoff, "store sync failed; the last synced state stays in force");
                } else {
                    backoff = Duration::ZERO;
                    synced = (self.superblock.tail, self.superblock.head);
                }
                last = Instant::now();
                for reply in now_replies {
                    let _ = reply.send(result.clone());
                }
                if let Some(reply) = stop {
                    let _ = reply.send(result);
                    return;
                }
            }
        }
    }

    /// Where a new region goes, and the offset it must stay below: at the
    /// start when room for twice the entries held lies before the region
    /// in force, else after that region's log (the file grows).
    fn place_checkpoint(&self, held: u64) -> (u64, u64) {
        let sb = &self.superblock;
        let estimate = 2 * held * SLOT_BYTES + self.log_min_bytes;
        if sb.region >= REGION_START + estimate {
            return (REGION_START, sb.region);
        }
        ((sb.region + sb.checkpoint_bytes + sb.log_bytes).next_multiple_of(PAGE_BYTES), u64::MAX)
    }

    /// Writes every thread's batches of the sync in progress one after
    /// another from `at` (growing the index file as needed, never to
    /// `limit` or past it); returns the bytes written.
    fn write_batches(&self, at: u64, limit: u64) -> Result<u64> {
        let index = &*self.index_dev;
        let mut end = at;
        for w in &self.workers {
            loop {
                let (tx, rx) = oneshot::channel();
                if w.send_blocking(Request::Persist { reply: tx }).is_err() {
                    break;
                }
                let Ok((bytes, last)) = futures::executor::block_on(rx) else {
                    return Err(Error::new(Code::Unavailable, "a storage thread stopped during a sync"));
                };
                let next = end + bytes.len() as u64;
                if next > limit {
                    return Err(Error::new(
                        Code::Unavailable,
                        "the index checkpoint outgrew the room before the region in force; the next sync writes it at the end",
                    ));
                }
                if next > index.len() {
                    // In steps of an eighth, so the file grows rarely.
                    let len = next.max(index.len() + index.len() / 8).next_multiple_of(PAGE_BYTES);
                    index.grow(len).map_err(|e| unavailable("growing the index", index, &e))?;
                }
                index.write_at(&bytes, end).map_err(|e| unavailable("writing the index", index, &e))?;
                end = next;
                if last {
                    break;
                }
            }
        }
        Ok(end - at)
    }

    fn broadcast(&self, make: impl Fn() -> Request) {
        for w in &self.workers {
            let _ = w.send_blocking(make());
        }
    }

    /// One sync (see the module documentation).
    pub fn sync(&mut self) -> Result<()> {
        let started = Instant::now();
        let copy = u8::try_from((self.superblock.sequence + 1) % 2).unwrap_or(0);
        debug_assert_ne!(copy, self.superblock.copy, "a sync never writes the superblock in force");
        let sb = self.superblock;
        let checkpoint = sb.log_bytes >= sb.checkpoint_bytes.max(self.log_min_bytes);
        // 1. Barrier.
        let mut acks = Vec::new();
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            if w.send_blocking(Request::Barrier { checkpoint, reply: tx }).is_ok() {
                acks.push(rx);
            }
        }
        let held: u64 =
            acks.into_iter().map(|ack| futures::executor::block_on(ack).map_or(0, |(h, _)| h)).sum();
        // 2. Bounds.
        let (tail, head) = (self.ring.tail(), self.ring.head());
        // 3. Data.
        if let Err(e) = self.io.sync(&*self.data) {
            // Lookups queue behind the drops until every thread made them.
            for _ in &self.workers {
                self.index.drops_told();
            }
            self.broadcast(|| Request::EndSync { ok: false, data_lost: true });
            return Err(unavailable("syncing", &*self.data, &e));
        }
        // 4. The index: the changes appended to the log, or a new region.
        let index = self.index_dev.clone();
        let abandon = |e: Error| {
            for w in &self.workers {
                let _ = w.send_blocking(Request::EndSync { ok: false, data_lost: false });
            }
            e
        };
        let (region, checkpoint_bytes, log_bytes) = if checkpoint {
            let (at, limit) = self.place_checkpoint(held);
            let written = self.write_batches(at, limit).map_err(abandon)?;
            tracing::debug!(region = at, bytes = written, "index checkpoint written");
            (at, written, 0)
        } else {
            let at = sb.region + sb.checkpoint_bytes + sb.log_bytes;
            let written = self.write_batches(at, u64::MAX).map_err(abandon)?;
            (sb.region, sb.checkpoint_bytes, sb.log_bytes + written)
        };
        index.sync().map_err(|e| abandon(unavailable("syncing the index", &*index, &e)))?;
        // 5. Superblock.
        let next = Superblock {
            sequence: sb.sequence + 1,
            copy,
            tail,
            head,
            layout: LAYOUT_LOGGED,
            region,
            checkpoint_bytes,
            log_bytes,
            ..sb
        };
        index
            .write_at(&next.encode(), IndexLayout::superblock_offset(copy))
            .and_then(|()| index.sync())
            .map_err(|e| abandon(unavailable("writing the superblock of", &*index, &e)))?;
        self.superblock = next;
        self.broadcast(|| Request::EndSync { ok: true, data_lost: false });
        // 6. Room.
        self.ring.set_persisted_tail(tail);
        self.broadcast(|| Request::SpaceFreed);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.last_micros.store(micros, std::sync::atomic::Ordering::Relaxed);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.stats.last_unix_ms.store(now_ms, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(sequence = next.sequence, tail, head, micros, "store synced");
        Ok(())
    }
}
