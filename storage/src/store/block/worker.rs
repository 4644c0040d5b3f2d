//! A storage thread: owns some partitions of the index and an I/O engine,
//! and serves the requests for keys in those partitions.
//!
//! The loop takes every request waiting in its queue (up to a batch), plans
//! them against the index, runs all their I/O as one batch, then checks
//! what came back (record headers, chunk checksums), updates the index and
//! answers. A request that finds the ring full waits, without blocking the
//! thread, until the syncer has made room. Blobs found in the older half
//! of the ring are copied forward in the background, a bounded step at a
//! time, so that what a read or FindMissingBlobs found keeps living.

use kiln_proto::limits::{
    BLOCK_BATCH_REQUESTS_MAX as BATCH_REQUESTS_MAX, BLOCK_ROOM_WAIT_MS,
    BLOCK_UNSYNCED_ENTRIES_SOFT_MAX as UNSYNCED_ENTRIES_SOFT_MAX,
};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use kiln_proto::{Code, Error, Result};

use super::device::BlockDevice;
use super::format::{
    CRC_CHUNK_BYTES, Fingerprint, Kind, RECORD_HEADER_BYTES, RecordHeader, RecordKey, Slot, chunk_crc,
    crc_chunks, crc_offset, record_len,
};
use super::index::{Owned, Partition};
use super::io::{Io, IoEngine};
use super::ring::{Pinned, Ring};

mod persist;
mod refresh;
mod scrub;

use refresh::Refresh;
pub(crate) use scrub::Scrub;

/// Where a blob's record lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub logical: u64,
    pub size: u64,
}

pub type Reply<T> = oneshot::Sender<Result<T>>;

/// What a storage thread is asked to do.
#[derive(Debug)]
pub enum Request {
    /// The sizes of these keys' blobs, for those present (refreshing old
    /// ones).
    Lookup { fps: Vec<Fingerprint>, reply: oneshot::Sender<Vec<Option<u64>>> },
    /// Where these keys' records lie, changing nothing (no copy forward):
    /// for tests and diagnostics.
    Peek { fps: Vec<Fingerprint>, reply: oneshot::Sender<Vec<Option<u64>>> },
    /// Finds a blob and checks its record header; small records come whole.
    Open { fp: Fingerprint, reply: Reply<(Location, Option<Bytes>)> },
    /// Bytes `from..to` of a blob, checked against their chunk checksums.
    Read { fp: Fingerprint, loc: Location, from: u64, to: u64, reply: Reply<Bytes> },
    /// Space for a record of a `size`-byte blob.
    Reserve { size: u64, reply: Reply<u64> },
    /// Bytes at `offset` within the record at `logical`.
    Write { logical: u64, offset: u64, data: Bytes, reply: Reply<()> },
    /// Writes the record's header and makes it visible.
    Commit { fp: Fingerprint, loc: Location, reply: Reply<()> },
    /// A whole small blob or value, in one go.
    Put { fp: Fingerprint, data: Bytes, reply: Reply<()> },
    /// Drops a record found corrupt.
    Forget { fp: Fingerprint, logical: u64 },
    /// Sync protocol (see the syncer): the barrier (with `checkpoint`, the
    /// sync writes every live entry, not the changes); answers the entries
    /// held and the changes the sync covers.
    Barrier { checkpoint: bool, reply: oneshot::Sender<(u64, u64)> },
    /// The next bounded batch of the sync's entries, encoded, and whether
    /// it is the last.
    Persist { reply: oneshot::Sender<(Vec<u8>, bool)> },
    /// The sync reached the disk (`ok`), or was abandoned. With
    /// `data_lost`, the data device failed its sync: every entry committed
    /// since the last good sync may name bytes that never reached the disk
    /// (Linux reports such an error once), so those entries are dropped
    /// rather than persisted later.
    EndSync { ok: bool, data_lost: bool },
    /// Time passed: writes waiting for room past their deadline fail.
    Tick,
    /// The syncer persisted a newer tail: waiting reservations may go on.
    SpaceFreed,
    /// Statistics: live entries in this thread's partitions, and their
    /// slots.
    Count { reply: oneshot::Sender<(usize, usize)> },
}

/// A request that touches the index, and the I/O it waits for.
enum Pending<'r> {
    Open {
        fp: Fingerprint,
        loc: Location,
        op: usize,
        whole: bool,
        _pin: Pinned<'r>,
        reply: Reply<(Location, Option<Bytes>)>,
    },
    Read {
        fp: Fingerprint,
        loc: Location,
        from: u64,
        to: u64,
        data: usize,
        crcs: usize,
        first_chunk: u64,
        _pin: Pinned<'r>,
        reply: Reply<Bytes>,
    },
    Write {
        op: usize,
        _pin: Pinned<'r>,
        reply: Reply<()>,
    },
    Commit {
        fp: Fingerprint,
        loc: Location,
        op: usize,
        _pin: Pinned<'r>,
        reply: Reply<()>,
    },
    Put {
        fp: Fingerprint,
        loc: Location,
        op: usize,
        _pin: Pinned<'r>,
        reply: Reply<()>,
    },
}

/// An index entry not yet covered by a good sync, and the key's entry it
/// replaced.
#[derive(Debug, Clone, Copy)]
struct Unsynced {
    fp: Fingerprint,
    logical: u64,
    /// The earlier record's position and size, or [`NO_PREVIOUS`].
    previous: (u64, u64),
}

const NO_PREVIOUS: (u64, u64) = (u64::MAX, 0);

/// What a storage thread owns.
pub struct Worker {
    pub kind: Kind,
    pub ring: Arc<Ring>,
    pub data: Arc<dyn BlockDevice>,
    pub io: IoEngine,
    /// This thread's partitions, by partition number.
    pub partitions: Owned,
    pub partition_count: u32,
    pub requests: async_channel::Receiver<Request>,
    /// Tells the syncer that space is needed (the tail a reservation needs).
    pub need_space: async_channel::Sender<u64>,
    /// Seeds the checksums of encoded index entries.
    pub seed: u64,
    /// Changes for the index log, and a checkpoint in progress.
    log: persist::Log,
    /// Writes waiting for room, since when.
    pub waiting: VecDeque<(Instant, Request)>,
    /// Longest a write waits for room.
    pub room_wait: Duration,
    /// The background re-read of this thread's records.
    pub(crate) scrub: Scrub,
    /// What record headers are tagged with.
    pub record_key: RecordKey,
    /// Entries inserted since the last barrier, and those the sync in
    /// progress covers: dropped if the data device fails its sync.
    unsynced: Vec<Unsynced>,
    in_sync: Vec<Unsynced>,
    /// While re-planning parked writes: when they first waited.
    since: Option<Instant>,
    refreshes: VecDeque<Refresh>,
    refreshing: HashMap<Fingerprint, ()>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("kind", &self.kind).field("io", &self.io).finish_non_exhaustive()
    }
}

pub fn partition_of(fp: &Fingerprint, partitions: u32) -> u32 {
    u32::try_from(fp.bits() % u64::from(partitions.max(1))).unwrap_or(0)
}

fn io_error(what: &str, dev: &dyn BlockDevice, e: &std::io::Error) -> Error {
    Error::new(Code::Unavailable, format!("{what} {}: {e}", dev.describe()))
}

fn index_full() -> Error {
    Error::resource_exhausted(
        "the store's index has no room for this key now (it is sized by [storage] expected_blob_bytes; lower it and restart); retry later",
    )
}

fn wrapped() -> Error {
    Error::new(Code::Unavailable, "the store wrapped around while this upload was in progress; retry it")
}

fn evicted() -> Error {
    Error::not_found("the blob was evicted from the store while it was in use; retry")
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: Kind,
        ring: Arc<Ring>,
        data: Arc<dyn BlockDevice>,
        io: IoEngine,
        partitions: Owned,
        partition_count: u32,
        requests: async_channel::Receiver<Request>,
        need_space: async_channel::Sender<u64>,
    ) -> Worker {
        Worker {
            kind,
            ring,
            data,
            io,
            partitions,
            partition_count,
            requests,
            need_space,
            seed: 0,
            log: persist::Log::default(),
            waiting: VecDeque::new(),
            room_wait: Duration::from_millis(BLOCK_ROOM_WAIT_MS),
            scrub: Scrub::new(0),
            record_key: [0; 32],
            unsynced: Vec::new(),
            in_sync: Vec::new(),
            since: None,
            refreshes: VecDeque::new(),
            refreshing: HashMap::new(),
        }
    }

    /// The partition `fp` belongs to, to change; held no longer than a
    /// statement, never across I/O, so that readers on other threads wait
    /// no more than one index operation.
    fn partition(&self, fp: &Fingerprint) -> RwLockWriteGuard<'_, Partition> {
        self.partitions.write(partition_of(fp, self.partition_count))
    }

    fn live(ring: &Ring) -> impl Fn(&Slot) -> bool + '_ {
        |s: &Slot| ring.is_live(s.logical, record_len(s.size))
    }

    /// The live entry of `fp`, copied forward if it is near eviction.
    /// `None` also when the blob is near eviction and cannot be copied now
    /// (the refresh backlog is full): then it is as good as gone, and
    /// saying "missing" makes the client upload it again rather than rely
    /// on it. Reads call this with `must_keep` false: they serve what is
    /// there now.
    fn lookup(&mut self, fp: &Fingerprint, must_keep: bool) -> Option<Location> {
        let slot = self.partition(fp).lookup(fp, Self::live(&self.ring))?;
        let loc = Location { logical: slot.logical, size: slot.size };
        if self.ring.past_kept(loc.logical) && !self.queue_refresh(*fp, loc) {
            kiln_proto::metrics::global().store_refreshes_skipped.inc();
            if must_keep {
                return None;
            }
        }
        Some(loc)
    }

    /// Serves requests until the queue closes.
    pub fn run(mut self) {
        loop {
            let mut batch = Vec::new();
            let idle = self.refreshes.is_empty();
            if idle {
                match self.requests.recv_blocking() {
                    Ok(r) => batch.push(r),
                    Err(_) => return self.release_refreshes(),
                }
            }
            while batch.len() < BATCH_REQUESTS_MAX {
                match self.requests.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(async_channel::TryRecvError::Closed) if batch.is_empty() => {
                        return self.release_refreshes();
                    }
                    Err(_) => break,
                }
            }
            // Copies forward keep pace with writes: twice what the batch
            // wrote, at least one step.
            let written: u64 = batch
                .iter()
                .map(|r| match r {
                    Request::Write { data, .. } | Request::Put { data, .. } => data.len() as u64,
                    _ => 0,
                })
                .sum();
            if !batch.is_empty() {
                self.serve(batch);
            }
            let budget = 2 * written;
            let mut copied = 0;
            while copied == 0 || copied < budget {
                let Some(step) = self.refresh_step() else { break };
                copied += step;
            }
        }
    }

    /// Plans, runs and completes one batch.
    fn serve(&mut self, batch: Vec<Request>) {
        let ring = self.ring.clone();
        let mut ops = Ops::default();
        let mut pending: Vec<Pending<'_>> = Vec::new();
        for request in batch {
            self.plan(&ring, request, &mut ops, &mut pending);
        }
        let data = self.data.clone();
        let data_results = if ops.data.is_empty() { Vec::new() } else { self.io.run(&*data, &mut ops.data) };
        let mut done = Done { data: ops.data.into_iter().map(Some).collect(), data_results };
        for p in pending {
            self.complete(&ring, p, &mut done);
        }
    }

    /// Decides what a request needs: answers at once, or queues its I/O.
    fn plan<'r>(&mut self, ring: &'r Ring, request: Request, ops: &mut Ops, pending: &mut Vec<Pending<'r>>) {
        match request {
            Request::Lookup { fps, reply } => {
                let found = fps.iter().map(|fp| self.lookup(fp, true).map(|loc| loc.size)).collect();
                let _ = reply.send(found);
            }
            Request::Peek { fps, reply } => {
                let live = Self::live(ring);
                let found =
                    fps.iter().map(|fp| self.partition(fp).lookup(fp, &live).map(|s| s.logical)).collect();
                let _ = reply.send(found);
            }
            Request::Open { fp, reply } => {
                let Some(loc) = self.lookup(&fp, false) else {
                    let _ = reply.send(Err(Error::not_found("blob not found")));
                    return;
                };
                let len = record_len(loc.size);
                let Some(pin) = ring.pin(loc.logical, len) else {
                    let _ = reply.send(Err(Error::not_found("blob not found")));
                    return;
                };
                // Small records are read whole at once; large ones, the header.
                let whole = len <= CRC_CHUNK_BYTES;
                let op = ops.data(Io::read(
                    ring.physical(loc.logical),
                    if whole { len } else { RECORD_HEADER_BYTES },
                ));
                pending.push(Pending::Open { fp, loc, op, whole, _pin: pin, reply });
            }
            Request::Read { fp, loc, from, to, reply } => {
                let Some(pin) = ring.pin(loc.logical, record_len(loc.size)) else {
                    let _ = reply.send(Err(evicted()));
                    return;
                };
                let first_chunk = from / CRC_CHUNK_BYTES;
                let end_chunk = to.div_ceil(CRC_CHUNK_BYTES).min(crc_chunks(loc.size));
                let data_from = first_chunk * CRC_CHUNK_BYTES;
                let data_to = (end_chunk * CRC_CHUNK_BYTES).min(loc.size);
                let data = ops.data(Io::read(
                    ring.physical(loc.logical + RECORD_HEADER_BYTES + data_from),
                    data_to - data_from,
                ));
                let crc_at = ring.physical(loc.logical + crc_offset(loc.size, first_chunk));
                let crcs = ops.data(Io::read(crc_at, 4 * (end_chunk - first_chunk)));
                pending.push(Pending::Read { fp, loc, from, to, data, crcs, first_chunk, _pin: pin, reply });
            }
            Request::Reserve { size, reply } => match ring.reserve_for_client(record_len(size)) {
                Ok(logical) => {
                    let _ = reply.send(Ok(logical));
                }
                Err(needed) => {
                    let _ = self.need_space.try_send(needed);
                    self.wait_for_room(Request::Reserve { size, reply });
                }
            },
            Request::Write { logical, offset, data, reply } => {
                let Some(pin) = ring.pin(logical, offset + data.len() as u64) else {
                    let _ = reply.send(Err(wrapped()));
                    return;
                };
                let op = ops.data(Io::Write { at: ring.physical(logical + offset), data });
                pending.push(Pending::Write { op, _pin: pin, reply });
            }
            Request::Commit { fp, loc, reply } => {
                let Some(pin) = ring.pin(loc.logical, record_len(loc.size)) else {
                    let _ = reply.send(Err(wrapped()));
                    return;
                };
                let header =
                    RecordHeader { kind: self.kind, fingerprint: fp, size: loc.size, logical: loc.logical };
                let op = ops.data(Io::Write {
                    at: ring.physical(loc.logical),
                    data: Bytes::copy_from_slice(&header.encode_tagged(&self.record_key)),
                });
                pending.push(Pending::Commit { fp, loc, op, _pin: pin, reply });
            }
            Request::Put { fp, data, reply } => {
                let size = data.len() as u64;
                let len = record_len(size);
                let logical = match ring.reserve_for_client(len) {
                    Ok(logical) => logical,
                    Err(needed) => {
                        let _ = self.need_space.try_send(needed);
                        self.wait_for_room(Request::Put { fp, data, reply });
                        return;
                    }
                };
                let Some(pin) = ring.pin(logical, len) else {
                    let _ = reply
                        .send(Err(Error::new(Code::Unavailable, "the store is too small for this write")));
                    return;
                };
                let record = encode_record(self.kind, &self.record_key, fp, logical, &data);
                let op = ops.data(Io::Write { at: ring.physical(logical), data: record });
                pending.push(Pending::Put { fp, loc: Location { logical, size }, op, _pin: pin, reply });
            }
            Request::Forget { fp, logical } => {
                self.remove(&fp, logical);
                self.partitions.drops_done();
            }
            Request::Barrier { checkpoint, reply } => {
                let _ = reply.send(self.barrier(checkpoint));
            }
            Request::Persist { reply } => {
                let _ = reply.send(self.persist_batch());
            }
            Request::EndSync { ok, data_lost } => {
                self.end_sync(ok, data_lost);
                if data_lost {
                    self.partitions.drops_done();
                }
            }
            Request::SpaceFreed => {
                let waiting: Vec<(Instant, Request)> = self.waiting.drain(..).collect();
                for (since, r) in waiting {
                    self.since = Some(since);
                    self.plan(ring, r, ops, pending);
                }
                self.since = None;
            }
            Request::Tick => {
                self.expire_waiting();
                self.scrub_tick();
            }
            Request::Count { reply } => {
                let live = Self::live(ring);
                let count = self.partitions.sum(|p| p.count(&live));
                let _ = reply.send((count, self.partitions.sum(Partition::slot_count)));
            }
        }
    }

    /// Checks what the I/O brought, updates the index, answers.
    fn complete(&mut self, ring: &Ring, p: Pending<'_>, done: &mut Done) {
        let mut take = |i: usize| done.data(i);
        match p {
            Pending::Open { fp, loc, op, whole, _pin, reply } => {
                let answer = take(op).map_err(|e| io_error("reading", &*self.data, &e)).and_then(|bytes| {
                    let expected = RecordHeader {
                        kind: self.kind,
                        fingerprint: fp,
                        size: loc.size,
                        logical: loc.logical,
                    };
                    RecordHeader::check(&bytes, &expected).map_err(|why| self.corrupt(&fp, loc, &why))?;
                    if !whole {
                        return Ok((loc, None));
                    }
                    let data = bytes.slice(64..64 + usize::try_from(loc.size).unwrap_or(0));
                    let crcs = &bytes[usize::try_from(crc_offset(loc.size, 0)).unwrap_or(0)..];
                    check_chunks(&data, crcs).map_err(|why| self.corrupt(&fp, loc, &why))?;
                    Ok((loc, Some(data)))
                });
                let _ = reply.send(answer);
            }
            Pending::Read { fp, loc, from, to, data, crcs, first_chunk, _pin, reply } => {
                let answer = take(data)
                    .and_then(|d| take(crcs).map(|c| (d, c)))
                    .map_err(|e| io_error("reading", &*self.data, &e))
                    .and_then(|(bytes, crcs)| {
                        check_chunks(&bytes, &crcs).map_err(|why| self.corrupt(&fp, loc, &why))?;
                        let base = first_chunk * CRC_CHUNK_BYTES;
                        let (a, b) = (
                            usize::try_from(from - base).unwrap_or(0),
                            usize::try_from(to - base).unwrap_or(0),
                        );
                        Ok(bytes.slice(a..b.min(bytes.len())))
                    });
                // The range was live when pinned; still live now means no
                // block it read from was reused meanwhile.
                let answer = answer.and_then(|b| {
                    if ring.is_live(loc.logical, record_len(loc.size)) { Ok(b) } else { Err(evicted()) }
                });
                let _ = reply.send(answer);
            }
            Pending::Write { op, _pin, reply } => {
                let _ = reply.send(take(op).map(drop).map_err(|e| io_error("writing", &*self.data, &e)));
            }
            Pending::Commit { fp, loc, op, _pin, reply } | Pending::Put { fp, loc, op, _pin, reply } => {
                let answer = take(op).map_err(|e| io_error("writing", &*self.data, &e)).and_then(|_| {
                    // The tail may have passed the record while its header
                    // was being written (the pin only keeps its blocks from
                    // reuse): then it is dead, and acknowledging it would
                    // promise a blob the store does not have.
                    if !ring.is_live(loc.logical, record_len(loc.size)) {
                        return Err(wrapped());
                    }
                    self.insert(Slot { fingerprint: fp.0, logical: loc.logical, size: loc.size })
                });
                let _ = reply.send(answer);
            }
        }
    }

    /// Puts a live record's entry into the index, keeping the entry count
    /// and the list of what the next sync covers.
    ///
    /// The index never drops a live entry to make room: its partition
    /// grows. Only at its bound (see `index.rs`), when every slot the key
    /// may use holds a live entry, is the oldest of them evicted the way
    /// the ring evicts, with everything older (FIFO, as if the ring were
    /// full), provided no promise of FindMissingBlobs can still cover it
    /// (older than twice `kept`); else the write is refused.
    fn insert(&mut self, slot: Slot) -> Result<()> {
        let ring = self.ring.clone();
        let fp = Fingerprint(slot.fingerprint);
        // Bound first: a guard in the match's scrutinee would be held
        // through its arms, which take the partition again.
        let tried = self.partition(&fp).try_insert(slot, Self::live(&ring));
        let replaced = match tried {
            Ok(replaced) => replaced,
            Err(oldest) => {
                // Only what no promise can still cover: a blob reported
                // present younger than `kept` was promised `kept` more.
                if ring.head().saturating_sub(oldest.logical) <= 2 * ring.kept_bytes() {
                    kiln_proto::metrics::global().store_index_full.inc();
                    return Err(index_full());
                }
                let evicted = kiln_proto::metrics::global().store_index_evictions.get() + 1;
                kiln_proto::metrics::global().store_index_evictions.inc();
                if evicted.is_power_of_two() {
                    tracing::warn!(
                        store = self.kind.name(),
                        evicted,
                        "the index reached its bound where a key must go: evicting the oldest blocks early; lower [storage] expected_blob_bytes (it sizes the index, which grows to 16 times that)"
                    );
                }
                ring.evict_to(oldest.logical + record_len(oldest.size));
                // In a ring of few blocks the evicted block may hold the
                // record itself: then it is not acknowledged.
                if !ring.is_live(slot.logical, record_len(slot.size)) {
                    return Err(index_full());
                }
                self.partition(&fp).try_insert(slot, Self::live(&ring)).map_err(|_| index_full())?
            }
        };
        if let Some(old) = replaced {
            ring.entry_removed(old.logical);
        }
        ring.entry_added(slot.logical);
        // The key's own earlier entry (a copy forward, an upload again) is
        // what a failed data sync goes back to.
        let previous = replaced.filter(|old| old.fingerprint == slot.fingerprint);
        self.log_insert(slot, previous);
        self.unsynced.push(Unsynced {
            fp,
            logical: slot.logical,
            previous: previous.map_or(NO_PREVIOUS, |p| (p.logical, p.size)),
        });
        // The list is what a failed data sync undoes: bounded, by syncing.
        if self.unsynced.len().is_multiple_of(UNSYNCED_ENTRIES_SOFT_MAX) {
            let _ = self.need_space.try_send(0);
        }
        Ok(())
    }

    /// Removes `fp`'s entry if it still names the record at `logical`.
    fn remove(&mut self, fp: &Fingerprint, logical: u64) -> bool {
        let Some(removed) = self.partition(fp).remove(fp, logical) else { return false };
        self.ring.entry_removed(logical);
        self.log_remove(removed);
        true
    }

    /// Parks a write until the syncer makes room (or its deadline passes).
    fn wait_for_room(&mut self, request: Request) {
        let since = self.since.unwrap_or_else(Instant::now);
        self.waiting.push_back((since, request));
    }

    /// Fails the writes that waited for room past their deadline.
    fn expire_waiting(&mut self) {
        let deadline = self.room_wait;
        while self.waiting.front().is_some_and(|(since, _)| since.elapsed() >= deadline) {
            let Some((_, request)) = self.waiting.pop_front() else { break };
            let err = Error::new(
                Code::Unavailable,
                format!(
                    "the store found no room for this write within {deadline:?}: its syncs are failing (see the server log); retry later"
                ),
            );
            match request {
                Request::Reserve { reply, .. } => {
                    let _ = reply.send(Err(err));
                }
                Request::Put { reply, .. } => {
                    let _ = reply.send(Err(err));
                }
                _ => {}
            }
        }
    }

    /// Undoes every entry committed since the last good sync, newest
    /// first: the data device failed to sync, so their bytes may not be on
    /// the disk. A key whose earlier record is still live (it was copied
    /// forward, or uploaded again) goes back to it; others are dropped.
    fn drop_unsynced(&mut self) {
        let entries: Vec<Unsynced> = self.in_sync.drain(..).chain(self.unsynced.drain(..)).collect();
        let ring = self.ring.clone();
        let (mut dropped, mut restored) = (0u64, 0u64);
        for entry in entries.into_iter().rev() {
            if !self.remove(&entry.fp, entry.logical) {
                continue;
            }
            let previous = (entry.previous != NO_PREVIOUS).then_some(Slot {
                fingerprint: entry.fp.0,
                logical: entry.previous.0,
                size: entry.previous.1,
            });
            match previous.filter(|p| ring.is_live(p.logical, record_len(p.size))) {
                Some(previous) => {
                    self.partition(&entry.fp).insert(previous, Self::live(&ring));
                    ring.entry_added(previous.logical);
                    restored += 1;
                }
                None => dropped += 1,
            }
        }
        if dropped + restored > 0 {
            tracing::error!(
                store = self.kind.name(),
                dropped,
                restored,
                "the data device failed to sync: entries written since the last good sync are undone (clients upload the dropped ones again)"
            );
        }
    }

    /// Drops a corrupt record's entry and describes the loss.
    fn corrupt(&mut self, fp: &Fingerprint, loc: Location, why: &str) -> Error {
        tracing::error!(
            store = self.kind.name(),
            ?fp,
            logical = loc.logical,
            size = loc.size,
            why,
            "corrupt record dropped"
        );
        self.remove(fp, loc.logical);
        kiln_proto::metrics::global().data_loss.inc();
        Error::new(
            Code::DataLoss,
            format!("the stored copy is damaged ({why}); it has been dropped, upload it again"),
        )
    }
}

/// The I/O of one batch, on the data device.
#[derive(Debug, Default)]
pub struct Ops {
    data: Vec<Io>,
}

impl Ops {
    fn data(&mut self, op: Io) -> usize {
        self.data.push(op);
        self.data.len() - 1
    }
}

/// The I/O of one batch, done.
struct Done {
    data: Vec<Option<Io>>,
    data_results: Vec<std::io::Result<()>>,
}

impl Done {
    fn data(&mut self, i: usize) -> std::io::Result<Bytes> {
        std::mem::replace(&mut self.data_results[i], Ok(()))?;
        Ok(self.data[i].take().map(Io::into_bytes).unwrap_or_default())
    }
}

/// A whole record for `data`: header, data, chunk checksums, padding.
pub fn encode_record(kind: Kind, key: &RecordKey, fp: Fingerprint, logical: u64, data: &[u8]) -> Bytes {
    let size = data.len() as u64;
    let mut record = Vec::with_capacity(usize::try_from(record_len(size)).unwrap_or(0));
    record.extend_from_slice(&RecordHeader { kind, fingerprint: fp, size, logical }.encode_tagged(key));
    record.extend_from_slice(data);
    for chunk in data.chunks(usize::try_from(CRC_CHUNK_BYTES).unwrap_or(usize::MAX)) {
        record.extend_from_slice(&chunk_crc(chunk).to_le_bytes());
    }
    record.resize(usize::try_from(record_len(size)).unwrap_or(0), 0);
    Bytes::from(record)
}

/// Checks chunk-aligned `data` against its chunks' checksums.
pub(super) fn check_chunks(data: &[u8], crcs: &[u8]) -> std::result::Result<(), String> {
    for (i, chunk) in data.chunks(usize::try_from(CRC_CHUNK_BYTES).unwrap_or(usize::MAX)).enumerate() {
        let Some(stored) = crcs.get(i * 4..i * 4 + 4) else {
            return Err("a chunk checksum is missing".into());
        };
        if u32::from_le_bytes(stored.try_into().unwrap_or([0; 4])) != chunk_crc(chunk) {
            return Err(format!("chunk {i} of the range does not match its checksum"));
        }
    }
    Ok(())
}
