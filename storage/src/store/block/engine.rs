//! Opening a block store: devices, headers, the index loaded from disk,
//! the storage threads and the syncer; and closing it.

use kiln_proto::limits::{BLOCK_INDEX_LOG_MIN_BYTES, BLOCK_QUEUE_DEPTH as QUEUE_DEPTH, BLOCK_TICK_MS};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use kiln_proto::{Code, Error, Result};

use super::device::{BlockDevice, FileDevice};
use super::format::{
    DataHeader, FINGERPRINTS_KEYED, Fingerprint, Fingerprinter, IndexLayout, Kind, LAYOUT_LOGGED, PAGE_BYTES,
    REGION_START, Superblock, record_key, record_len,
};
use super::index::{Owned, Partition, Shared};
use super::indexfile::{Loaded, load, new_partitions};
use super::io::{IoEngine, IoMode};
use super::ring::Ring;
use super::staging::{Staging, StagingSize};
use super::syncer::{SyncStats, Syncer, SyncerMessage};
use super::worker::{Request, Scrub, Worker, partition_of};
use super::{open, rebuild};

/// How to open a block store.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub kind: Kind,
    /// The data: a file (created and allocated to `size_bytes`) or a block device.
    pub data_path: PathBuf,
    /// The index file.
    pub index_path: PathBuf,
    /// Size of a new data file (a block device's own size wins; an
    /// existing store keeps the size it was formatted with).
    pub size_bytes: u64,
    /// Whether `size_bytes` was set by the operator (then a store of
    /// another size is refused) or chosen automatically (then an existing
    /// store's own size is used).
    pub size_configured: bool,
    /// Bytes per block of the ring; 0: a 64th of the ring, 1 MiB to 256 MiB.
    pub block_bytes: u64,
    /// Expected average blob size: the index has 1.25 slots per blob that
    /// fills the ring at this size.
    pub expected_blob_bytes: u64,
    pub threads: usize,
    pub io: IoMode,
    /// Most time between syncs: the window of possible loss.
    pub sync_interval: Duration,
    /// Pin storage threads to cores.
    pub pin_threads: bool,
    /// Allow writing a new store onto a block device that holds none.
    pub format_device: bool,
    /// Discard whatever the devices hold and format a new, empty store.
    pub reformat: bool,
    /// Longest a write waits for room in the ring before it fails with
    /// UNAVAILABLE (a store whose syncs keep failing frees none).
    pub room_wait: Duration,
    /// Bytes per second the background scrub re-reads; 0: no scrub.
    pub scrub_bytes_per_second: u64,
    /// Where a CAS keeps uploads in progress (see [`super::staging`]).
    pub staging_dir: PathBuf,
    /// Most bytes of uploads in progress; 0: half the ring.
    pub staging_bytes: u64,
    /// The index log is folded into a checkpoint once longer than this and
    /// than the checkpoint ([`BLOCK_INDEX_LOG_MIN_BYTES`]; tests lower it
    /// to write checkpoints often).
    pub index_log_min_bytes: u64,
}

/// The devices of a store, for tests that bring their own.
#[derive(Debug, Clone)]
pub struct Devices {
    pub data: Arc<dyn BlockDevice>,
    pub index: Arc<dyn BlockDevice>,
}

/// A running block store.
pub struct Engine {
    pub kind: Kind,
    pub ring: Arc<Ring>,
    pub partitions: u32,
    /// The index, read here for FindMissingBlobs; written only by the
    /// storage threads.
    index: Arc<Shared>,
    workers: Vec<async_channel::Sender<Request>>,
    syncer: Mutex<Option<mpsc::Sender<SyncerMessage>>>,
    ticker: Mutex<Option<mpsc::Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    pub io_path: &'static str,
    pub slots: u64,
    pub stats: Arc<SyncStats>,
    pub devices: Devices,
    /// Uploads in progress (a CAS's; an action cache takes whole values).
    pub staging: Option<Arc<Staging>>,
    /// How this store names its keys.
    pub fingerprints: Fingerprinter,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("kind", &self.kind).field("io", &self.io_path).finish_non_exhaustive()
    }
}

fn internal(what: &str, e: &std::io::Error) -> Error {
    Error::internal(format!("{what}: {e}"))
}

impl Engine {
    /// Opens (or creates) the store `config` describes, its files locked.
    pub fn open(config: &BlockConfig) -> Result<Arc<Engine>> {
        let devices = open::open_files(config)?;
        // A block device's own size wins over a configured one.
        let size_configured = config.size_configured && !FileDevice::is_block_device(&config.data_path);
        Self::open_on(&BlockConfig { size_configured, ..config.clone() }, devices)
    }

    /// Opens the store on `devices` (tests bring fault-injecting ones).
    pub fn open_on(config: &BlockConfig, devices: Devices) -> Result<Arc<Engine>> {
        let started = Instant::now();
        let found = open::read_header(config, &*devices.data)?;
        let plan = open::plan(config, &found, &devices)?;
        let (capacity, block_bytes) = (plan.capacity, plan.block_bytes);
        if devices.data.len() >= PAGE_BYTES + capacity + block_bytes {
            tracing::warn!(
                data = devices.data.describe(),
                device_bytes = devices.data.len(),
                store_bytes = PAGE_BYTES + capacity,
                "the device is larger than its store; the rest stays unused (a store keeps its size)"
            );
        }
        let slots = slots_for(capacity, config.expected_blob_bytes);
        let loaded = if plan.format {
            format(config.kind, &devices, capacity, block_bytes, slots)?
        } else {
            match load(config.kind, &devices, slots)? {
                Some(loaded) => loaded,
                None => {
                    rebuild::rebuild(config.kind, &devices, capacity, slots)?;
                    load(config.kind, &devices, slots)?
                        .ok_or_else(|| Error::internal("the rebuilt index does not load"))?
                }
            }
        };
        let staging = match config.kind {
            Kind::Cas => {
                let size = match config.staging_bytes {
                    0 => StagingSize::Automatic(capacity / 2),
                    bytes => StagingSize::Configured(bytes),
                };
                Some(Staging::open(&config.staging_dir, size)?)
            }
            Kind::Ac => None,
        };
        let sb = loaded.superblock;
        debug_assert_eq!(sb.layout, LAYOUT_LOGGED, "loading rewrites older layouts");
        let ring = Arc::new(Ring::new(capacity, block_bytes, sb.tail, sb.head));
        for slot in loaded.partitions.iter().flat_map(Partition::entries) {
            if ring.is_live(slot.logical, record_len(slot.size)) {
                ring.entry_added(slot.logical);
            }
        }
        let partition_count = loaded.partitions.len();
        let threads = config.threads.clamp(1, partition_count.max(1));
        let index = Arc::new(Shared::new(loaded.partitions));
        // Both at most the partitions, which number at most 256.
        let threads_u32 = u32::try_from(threads).unwrap_or(1);
        let owned = (0..threads_u32).map(|t| Owned::new(index.clone(), t, threads_u32));
        let (syncer_tx, syncer_rx) = mpsc::channel();
        let (space_tx, space_rx) = async_channel::unbounded::<u64>();
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        let mut io_path = "pread/pwrite";
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        for (t, partitions) in owned.enumerate() {
            let (tx, rx) = async_channel::bounded(QUEUE_DEPTH);
            let io = IoEngine::new(config.io).map_err(|e| {
                Error::new(
                    Code::FailedPrecondition,
                    format!("io_uring is not available here ({e}); set [storage] io = \"auto\" or \"pread\""),
                )
            })?;
            io_path = io.path();
            let mut worker = Worker::new(
                config.kind,
                ring.clone(),
                devices.data.clone(),
                io,
                partitions,
                u32::try_from(partition_count).unwrap_or(1),
                rx,
                space_tx.clone(),
            );
            worker.room_wait = config.room_wait;
            worker.record_key = record_key(&sb.store_id);
            worker.seed = sb.seed;
            worker.scrub = Scrub::new(config.scrub_bytes_per_second / threads as u64);
            let pin = config.pin_threads.then_some(t % cores);
            let handle = std::thread::Builder::new()
                .name(format!("kiln-{}-{t}", short(config.kind)))
                .spawn(move || {
                    if let Some(core) = pin {
                        pin_to(core);
                    }
                    worker.run();
                })
                .map_err(|e| internal("start a storage thread", &e))?;
            senders.push(tx);
            handles.push(handle);
        }
        // Reservations waiting for room reach the syncer through this relay.
        let relay_tx = syncer_tx.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("kiln-{}-space", short(config.kind)))
                .spawn(move || {
                    while let Ok(t) = space_rx.recv_blocking() {
                        if relay_tx.send(SyncerMessage::NeedSpace(t)).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| internal("start a storage thread", &e))?,
        );
        // Parked writes are failed past their deadline even while the
        // syncer is stuck in a hung device call: time reaches the storage
        // threads from here.
        let tick_to = senders.clone();
        let (ticker_tx, ticker_rx) = mpsc::channel::<()>();
        handles.push(
            std::thread::Builder::new()
                .name(format!("kiln-{}-tick", short(config.kind)))
                .spawn(move || {
                    // Ends when the engine drops the sender.
                    while let Err(mpsc::RecvTimeoutError::Timeout) =
                        ticker_rx.recv_timeout(Duration::from_millis(BLOCK_TICK_MS))
                    {
                        for w in &tick_to {
                            let _ = w.try_send(Request::Tick);
                        }
                    }
                })
                .map_err(|e| internal("start a storage thread", &e))?,
        );
        let stats = Arc::new(SyncStats::default());
        let syncer = Syncer {
            ring: ring.clone(),
            data: devices.data.clone(),
            index_dev: devices.index.clone(),
            superblock: sb,
            workers: senders.clone(),
            index: index.clone(),
            messages: syncer_rx,
            interval: config.sync_interval,
            headroom: ring.headroom(),
            log_min_bytes: config.index_log_min_bytes,
            io: IoEngine::new(if config.io == IoMode::IoUring { IoMode::Auto } else { config.io })
                .map_err(|e| internal("start the syncer", &e))?,
            stats: stats.clone(),
        };
        handles.push(
            std::thread::Builder::new()
                .name(format!("kiln-{}-sync", short(config.kind)))
                .spawn(move || syncer.run())
                .map_err(|e| internal("start the syncer", &e))?,
        );
        tracing::info!(
            store = config.kind.name(),
            data = devices.data.describe(),
            capacity_bytes = capacity,
            block_bytes,
            index_slots = slots,
            entries = ring.entries(),
            threads,
            io = io_path,
            millis = started.elapsed().as_millis(),
            "store open"
        );
        Ok(Arc::new(Engine {
            kind: config.kind,
            ring,
            partitions: u32::try_from(partition_count).unwrap_or(1),
            index,
            workers: senders,
            syncer: Mutex::new(Some(syncer_tx)),
            ticker: Mutex::new(Some(ticker_tx)),
            threads: Mutex::new(handles),
            io_path,
            slots,
            stats,
            devices,
            staging,
            fingerprints: Fingerprinter::new(sb.fingerprints, &sb.store_id),
        }))
    }

    /// The queue of the thread that owns `fp`.
    pub fn worker(&self, fp: &Fingerprint) -> &async_channel::Sender<Request> {
        let p = partition_of(fp, self.partitions) as usize;
        &self.workers[p % self.workers.len()]
    }

    /// Sends a request to the thread owning `fp` and waits for its answer.
    pub async fn call<T>(
        &self,
        fp: &Fingerprint,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.worker(fp).send(make(tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Which of `fps` are present, in order.
    ///
    /// The index is read on the calling thread; only keys whose records
    /// are near eviction go to their storage threads, which copy them
    /// forward (or answer missing when they cannot).
    pub async fn lookup(&self, fps: &[Fingerprint]) -> Result<Vec<Option<u64>>> {
        if self.index.drops_pending() {
            return self.ask_each_worker(fps, |fps, reply| Request::Lookup { fps, reply }).await;
        }
        let (mut answers, old) = self.lookup_here(fps);
        if old.is_empty() {
            return Ok(answers);
        }
        let asked: Vec<Fingerprint> = old.iter().map(|&i| fps[i]).collect();
        let found = self.ask_each_worker(&asked, |fps, reply| Request::Lookup { fps, reply }).await?;
        for (i, f) in old.into_iter().zip(found) {
            answers[i] = f;
        }
        Ok(answers)
    }

    /// The sizes of the live records of `fps` (`None`: absent), read from
    /// the index one partition at a time; and the positions of the keys
    /// whose records are old enough to need a copy forward (their answers
    /// are left `None`).
    fn lookup_here(&self, fps: &[Fingerprint]) -> (Vec<Option<u64>>, Vec<usize>) {
        let partitions = self.index.partitions();
        // Positions grouped by partition (a counting sort): one lock each.
        let of: Vec<u32> = fps.iter().map(|fp| partition_of(fp, partitions)).collect();
        let mut starts = vec![0usize; partitions as usize + 1];
        for &p in &of {
            starts[p as usize + 1] += 1;
        }
        for p in 0..partitions as usize {
            starts[p + 1] += starts[p];
        }
        let mut order = vec![0usize; fps.len()];
        let mut next = starts.clone();
        for (i, &p) in of.iter().enumerate() {
            order[next[p as usize]] = i;
            next[p as usize] += 1;
        }
        let mut answers = vec![None; fps.len()];
        let mut old = Vec::new();
        for p in (0..partitions).filter(|&p| starts[p as usize] < starts[p as usize + 1]) {
            let table = self.index.read(p);
            for &i in &order[starts[p as usize]..starts[p as usize + 1]] {
                let Some(slot) = table.get(&fps[i]) else { continue };
                if !self.ring.is_live(slot.logical, record_len(slot.size)) {
                    continue;
                }
                if self.ring.past_kept(slot.logical) {
                    old.push(i);
                } else {
                    answers[i] = Some(slot.size);
                }
            }
        }
        (answers, old)
    }

    /// Where the records of `fps` lie, if present, without copying any
    /// forward (for tests and diagnostics).
    pub async fn peek(&self, fps: &[Fingerprint]) -> Result<Vec<Option<u64>>> {
        self.ask_each_worker(fps, |fps, reply| Request::Peek { fps, reply }).await
    }

    /// Asks each storage thread about its share of `fps` in one request;
    /// the answers come back in the order of `fps`.
    async fn ask_each_worker<T: Default + Clone>(
        &self,
        fps: &[Fingerprint],
        make: impl Fn(Vec<Fingerprint>, oneshot::Sender<Vec<T>>) -> Request,
    ) -> Result<Vec<T>> {
        // Each thread's share, and where each answer goes back.
        let threads = self.workers.len();
        let share = fps.len() / threads + 1;
        let mut asked: Vec<(Vec<Fingerprint>, Vec<usize>)> =
            (0..threads).map(|_| (Vec::with_capacity(share), Vec::with_capacity(share))).collect();
        for (i, fp) in fps.iter().enumerate() {
            let (fps, at) = &mut asked[partition_of(fp, self.partitions) as usize % threads];
            fps.push(*fp);
            at.push(i);
        }
        let mut answers = vec![T::default(); fps.len()];
        let mut waits = Vec::new();
        for (w, (fps, at)) in asked.into_iter().enumerate().filter(|(_, (fps, _))| !fps.is_empty()) {
            let (tx, rx) = oneshot::channel();
            self.workers[w].send(make(fps, tx)).await.map_err(|_| stopped())?;
            waits.push((at, rx));
        }
        for (at, rx) in waits {
            let found = rx.await.map_err(|_| stopped())?;
            for (i, f) in at.into_iter().zip(found) {
                answers[i] = f;
            }
        }
        Ok(answers)
    }

    /// Sends a request that needs no answer.
    pub fn tell(&self, fp: &Fingerprint, request: Request) {
        let _ = self.worker(fp).try_send(request);
    }

    /// Drops `fp`'s entry if it still names the record at `logical` (a
    /// reader found it damaged). Until its storage thread has done so,
    /// lookups go through the threads' queues, behind the drop: a client
    /// told DATA_LOSS never hears the blob present again.
    pub fn forget(&self, fp: &Fingerprint, logical: u64) {
        self.index.drops_told();
        if self.worker(fp).try_send(Request::Forget { fp: *fp, logical }).is_err() {
            self.index.drops_done();
        }
    }

    /// Why the store cannot make its writes durable, while its syncs keep
    /// failing; `None` when healthy.
    pub fn unhealthy(&self) -> Option<String> {
        self.stats.unhealthy()
    }

    /// Syncs now.
    pub fn sync(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .syncer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|s| s.send(SyncerMessage::SyncNow(tx)));
        if !matches!(sent, Some(Ok(()))) {
            return Err(stopped());
        }
        futures::executor::block_on(rx).map_err(|_| stopped())?
    }

    /// Live entries in the index, from a counter: O(1), for metrics.
    pub fn entries(&self) -> usize {
        usize::try_from(self.ring.entries()).unwrap_or(usize::MAX)
    }

    /// Live entries in the index, counted by every storage thread walking
    /// its partitions: O(slots), for tests.
    pub fn count_entries(&self) -> usize {
        self.count().0
    }

    /// The slots the index's tables have now (they grow): O(slots).
    pub fn index_slots(&self) -> usize {
        self.count().1
    }

    fn count(&self) -> (usize, usize) {
        let mut total = (0, 0);
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            if w.send_blocking(Request::Count { reply: tx }).is_ok() {
                let (entries, slots) = futures::executor::block_on(rx).unwrap_or((0, 0));
                total = (total.0 + entries, total.1 + slots);
            }
        }
        total
    }

    /// Syncs a last time and stops every thread.
    pub fn close(&self) -> Result<()> {
        let syncer = self.syncer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let result = match syncer {
            Some(s) => {
                let (tx, rx) = oneshot::channel();
                let _ = s.send(SyncerMessage::Stop(tx));
                futures::executor::block_on(rx).unwrap_or_else(|_| Err(stopped()))
            }
            None => Ok(()),
        };
        self.join();
        result
    }

    /// Stops every thread without syncing: what a power cut leaves.
    pub fn halt(&self) {
        if let Some(s) = self.syncer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = s.send(SyncerMessage::Halt);
        }
        self.join();
    }

    fn join(&self) {
        self.ticker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        for w in &self.workers {
            w.close();
        }
        let handles: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "store closed without a final sync");
        }
    }
}

fn stopped() -> Error {
    Error::new(Code::Unavailable, "the store is shutting down")
}

fn short(kind: Kind) -> &'static str {
    match kind {
        Kind::Cas => "cas",
        Kind::Ac => "ac",
    }
}

fn pin_to(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(core).is_ok()
        && let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
    {
        tracing::debug!(core, error = %e, "could not pin a storage thread");
    }
}

/// The ring's capacity and block size for a data device of `len` bytes.
pub(super) fn geometry(len: u64, block_bytes: u64) -> Result<(u64, u64)> {
    let usable = len.saturating_sub(PAGE_BYTES);
    let block = if block_bytes == 0 {
        (usable / 64).clamp(1 << 20, 256 << 20).next_power_of_two().min(usable.max(PAGE_BYTES)) / PAGE_BYTES
            * PAGE_BYTES
    } else {
        block_bytes
    };
    if block == 0 || !block.is_multiple_of(PAGE_BYTES) || usable / block < 4 {
        return Err(Error::invalid_argument(format!(
            "a store of {len} bytes with blocks of {block} bytes has fewer than 4 blocks; make it larger or the blocks smaller (a multiple of 4096)"
        )));
    }
    Ok((usable / block * block, block))
}

/// Bytes of a new index file (it grows with the entries it holds) for a
/// data device of `data_len` bytes.
pub fn index_file_bytes(data_len: u64, block_bytes: u64, _expected_blob_bytes: u64) -> Result<u64> {
    geometry(data_len, block_bytes)?;
    Ok(REGION_START + BLOCK_INDEX_LOG_MIN_BYTES)
}

/// Index slots for a ring of `capacity` bytes: 1.25 per blob of the
/// expected size that fills it (the table fills to about 98%); the tables
/// start there and grow as they need (see `index.rs`).
pub(super) fn slots_for(capacity: u64, expected_blob_bytes: u64) -> u64 {
    let blobs = capacity / expected_blob_bytes.max(64);
    (blobs + blobs / 4).max(1024)
}

/// Writes a new, empty store onto `devices`.
fn format(kind: Kind, devices: &Devices, capacity: u64, block_bytes: u64, slots: u64) -> Result<Loaded> {
    let store_id: [u8; 16] = rand::random();
    let seed: u64 = rand::random();
    let write = |dev: &Arc<dyn BlockDevice>, data: &[u8], at: u64| {
        dev.write_at(data, at).map_err(|e| internal("format the store", &e))
    };
    devices.index.grow(REGION_START).map_err(|e| internal("format the store", &e))?;
    let sb = Superblock {
        kind,
        fingerprints: FINGERPRINTS_KEYED,
        store_id,
        seed,
        capacity,
        block_bytes,
        slots,
        layout: LAYOUT_LOGGED,
        sequence: 0,
        copy: 0,
        tail: 0,
        head: 0,
        region: REGION_START,
        checkpoint_bytes: 0,
        log_bytes: 0,
    };
    write(&devices.index, &sb.encode(), IndexLayout::superblock_offset(0))?;
    write(&devices.index, &vec![0u8; 4096], IndexLayout::superblock_offset(1))?;
    devices.index.sync().map_err(|e| internal("format the store", &e))?;
    let header = DataHeader { kind, fingerprints: FINGERPRINTS_KEYED, store_id, capacity, block_bytes };
    write(&devices.data, &header.encode(), 0)?;
    devices.data.sync().map_err(|e| internal("format the store", &e))?;
    tracing::info!(store = kind.name(), data = devices.data.describe(), capacity, "formatted a new store");
    Ok(Loaded { superblock: sb, partitions: new_partitions(slots) })
}
