//! The syncer: makes the store durable, a step at a time, and keeps room
//! in the ring.
//!
//! A sync, in this order (docs/storage-format.md gives the argument):
//!
//! 1. *Barrier*: every storage thread sets aside the index pages to write
//!    and keeps their contents as of now. Every record committed before the
//!    barrier has had its bytes written.
//! 2. The ring's `tail` and `head` are read: they bound what the new state
//!    may name.
//! 3. The data device is synced: every record the barrier covers is
//!    durable.
//! 4. The threads write their pages, as of the barrier, into the index copy
//!    not in use; their page checksums follow, then the index is synced.
//! 5. That copy's superblock (sequence + 1, `tail`, `head`) is written and
//!    synced: from now on a restart uses the new copy.
//! 6. Only now may space below the new tail be reused.
//!
//! A failure at any step abandons the sync; the previous state stays the
//! one a restart uses, and the next sync tries again.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use kiln_proto::{Code, Error, Result};

use super::device::BlockDevice;
use super::format::{IndexLayout, Superblock};
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
    pub layout: IndexLayout,
    pub superblock: Superblock,
    /// Page checksums of each index copy.
    pub crc_tables: [Vec<u32>; 2],
    pub workers: Vec<async_channel::Sender<Request>>,
    pub messages: mpsc::Receiver<SyncerMessage>,
    pub interval: Duration,
    /// Room kept free in the ring ahead of the head.
    pub headroom: u64,
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

    fn broadcast(&self, make: impl Fn() -> Request) {
        for w in &self.workers {
            let _ = w.send_blocking(make());
        }
    }

    /// One sync (see the module documentation).
    pub fn sync(&mut self) -> Result<()> {
        let started = Instant::now();
        let copy = u8::try_from((self.superblock.sequence + 1) % 2).unwrap_or(0);
        debug_assert_ne!(copy, self.superblock.copy, "a sync never writes the copy in force");
        // 1. Barrier.
        let mut acks = Vec::new();
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            if w.send_blocking(Request::Barrier { copy, reply: tx }).is_ok() {
                acks.push(rx);
            }
        }
        for ack in acks {
            let _ = futures::executor::block_on(ack);
        }
        // 2. Bounds.
        let (tail, head) = (self.ring.tail(), self.ring.head());
        // 3. Data.
        if let Err(e) = self.io.sync(&*self.data) {
            self.broadcast(|| Request::AbandonSync { data_lost: true });
            return Err(unavailable("syncing", &*self.data, &e));
        }
        // 4. Index pages, a bounded batch per thread at a time, checksums.
        let mut writing: Vec<usize> = (0..self.workers.len()).collect();
        while !writing.is_empty() {
            let mut waits = Vec::new();
            for &w in &writing {
                let (tx, rx) = oneshot::channel();
                if self.workers[w].send_blocking(Request::Persist { reply: tx }).is_ok() {
                    waits.push((w, rx));
                }
            }
            let mut still = Vec::new();
            let mut failed = None;
            for (w, wait) in waits {
                match futures::executor::block_on(wait) {
                    Ok(Ok((pages, last))) => {
                        for (page, crc) in pages {
                            self.crc_tables[usize::from(copy)][usize::try_from(page).unwrap_or(0)] = crc;
                        }
                        if !last {
                            still.push(w);
                        }
                    }
                    Ok(Err(e)) => failed = Some(e),
                    Err(_) => {
                        failed = Some(Error::new(Code::Unavailable, "a storage thread stopped during a sync"))
                    }
                }
            }
            if let Some(e) = failed {
                // Threads that had not finished keep their pages dirty.
                self.broadcast(|| Request::AbandonSync { data_lost: false });
                return Err(e);
            }
            writing = still;
        }
        let table: Vec<u8> =
            self.crc_tables[usize::from(copy)].iter().flat_map(|c| c.to_le_bytes()).collect();
        let mut padded = table;
        padded.resize(usize::try_from(self.layout.crc_table_bytes).unwrap_or(0), 0);
        // The pages went out; if what follows fails, they may not be on the
        // disk: the next sync of this copy writes every page again.
        let workers = self.workers.clone();
        let rewrite = |e: Error| {
            for w in &workers {
                let _ = w.send_blocking(Request::Rewrite { copy });
            }
            e
        };
        self.index_dev
            .write_at(&padded, self.layout.crc_table_offset(copy))
            .and_then(|()| self.io.sync(&*self.index_dev))
            .map_err(|e| rewrite(unavailable("writing the index of", &*self.index_dev, &e)))?;
        // 5. Superblock.
        let next = Superblock { sequence: self.superblock.sequence + 1, copy, tail, head, ..self.superblock };
        self.index_dev
            .write_at(&next.encode(), IndexLayout::superblock_offset(copy))
            .and_then(|()| self.io.sync(&*self.index_dev))
            .map_err(|e| rewrite(unavailable("writing the superblock of", &*self.index_dev, &e)))?;
        self.superblock = next;
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
