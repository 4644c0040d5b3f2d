//! The block store against a model of which blobs it must have, under
//! seeded faults: random uploads, reads, FindMissingBlobs, syncs, power
//! cuts, clean restarts, I/O errors, failing syncs and flipped bytes.
//!
//! After every step each blob the model knows is looked up (without
//! copying anything forward). A blob may be missing only for a reason the
//! store documents: its block was evicted by the ring, or a fault the
//! model injected may have taken it (damage in its record, an I/O error
//! or a failed sync while it was unsynced, a power cut before its sync).
//! A blob FindMissingBlobs reported present must stay while fewer than
//! `kept_bytes` more bytes are written. Every byte read must be right.
//! A failure prints the seed and the step; the run replays from the seed.

#![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::executor::block_on;
use kiln_proto::{Code, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::device::BlockDevice;
use super::engine::index_file_bytes;
use super::faulty::{Faults, FaultyDevice};
use super::format::{Fingerprint, PAGE_BYTES, record_len};
use super::tests_promises::{blob, config};
use super::*;
use crate::store::{BlobWriter, CasStore, put_all, read_all};

const SIZE: u64 = 4 << 20;
const BLOCK: u64 = 256 << 10;
/// Index sizings: roomy, and far too small for the blobs (odd seeds), so
/// that a full index is exercised too.
const EXPECTED_BLOB_BYTES: [u64; 2] = [256, 65_536];

/// What the model knows of one blob the store acknowledged.
#[derive(Debug)]
struct Known {
    /// Where its record was when last looked up.
    logical: Option<u64>,
    synced: bool,
    /// A fault the model injected may have taken it.
    excused: bool,
    /// The head when FindMissingBlobs last reported it present.
    promised_at: Option<u64>,
    /// What happened to it, for a failure's message.
    events: Vec<String>,
    /// Reported present while old, so being copied forward: until a good
    /// sync covers the copy, a failed one may take it.
    moving: bool,
    /// Reported present while old, and not yet seen copied: an I/O error
    /// meanwhile may abandon the copy (counted as a skipped refresh), and
    /// the blob then leaves with its block.
    copy_pending: bool,
}

struct Sim {
    seed: u64,
    step: usize,
    rng: StdRng,
    data: Arc<FaultyDevice>,
    index: Arc<FaultyDevice>,
    store: BlockCas,
    known: BTreeMap<CasKey, Known>,
    /// The bytes of every blob ever uploaded: any read must match.
    bytes: HashMap<CasKey, Bytes>,
    /// Steps left with I/O errors injected, and with syncs failing.
    io_faults: usize,
    sync_faults: usize,
    next_blob: u64,
    /// The last steps, for a failure's message.
    history: std::collections::VecDeque<String>,
    expected_blob_bytes: u64,
}

fn open(data: &Arc<FaultyDevice>, index: &Arc<FaultyDevice>, expected_blob_bytes: u64) -> BlockCas {
    let cfg = BlockConfig {
        size_bytes: SIZE,
        expected_blob_bytes,
        room_wait: std::time::Duration::from_millis(300),
        scrub_bytes_per_second: 32 << 20,
        // Checkpoints every few syncs, so crashes and faults meet them.
        index_log_min_bytes: 256,
        ..config(Path::new("/nonexistent"), Kind::Cas)
    };
    BlockCas::new(Engine::open_on(&cfg, Devices { data: data.clone(), index: index.clone() }).unwrap())
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let data = Arc::new(FaultyDevice::new(SIZE, seed * 7 + 1));
        let expected_blob_bytes = EXPECTED_BLOB_BYTES[usize::try_from(seed % 2).unwrap_or(0)];
        let index_len = index_file_bytes(SIZE, BLOCK, expected_blob_bytes).unwrap();
        let index = Arc::new(FaultyDevice::new(index_len, seed * 7 + 2));
        let store = open(&data, &index, expected_blob_bytes);
        Sim {
            seed,
            step: 0,
            rng: StdRng::seed_from_u64(seed),
            data,
            index,
            store,
            known: BTreeMap::new(),
            bytes: HashMap::new(),
            io_faults: 0,
            sync_faults: 0,
            next_blob: seed << 32,
            history: std::collections::VecDeque::new(),
            expected_blob_bytes,
        }
    }

    /// Where the run is, and the steps that led there.
    fn at(&self) -> String {
        let history: Vec<&str> = self.history.iter().map(String::as_str).collect();
        format!("seed {} step {} (after:\n{})\n", self.seed, self.step, history.join("\n"))
    }

    fn ring(&self) -> &ring::Ring {
        &self.store.engine().ring
    }

    fn set_faults(&self) {
        let io = if self.io_faults > 0 { 0.2 } else { 0.0 };
        let sync = if self.sync_faults > 0 { 1.0 } else { 0.0 };
        self.data.set_faults(Faults { read_error_rate: io, write_error_rate: io, sync_error_rate: sync });
        self.index.set_faults(Faults { read_error_rate: 0.0, write_error_rate: io, sync_error_rate: sync });
    }

    fn run(&mut self, steps: usize) {
        for step in 0..steps {
            self.step = step;
            self.set_faults();
            let op = self.rng.random_range(0..100);
            let line = format!(
                "step {step}: op {op}, io faults {}, sync faults {}, head {}, tail {}",
                self.io_faults,
                self.sync_faults,
                self.ring().head(),
                self.ring().tail()
            );
            if self.history.len() == 40 {
                self.history.pop_front();
            }
            self.history.push_back(line);
            match op {
                0..37 => self.put(),
                37..40 => self.abandon_an_upload(),
                40..58 => self.read(),
                58..72 => self.find_missing(),
                72..80 => self.sync(),
                80..81 => self.retune(),
                81..82 => self.grow(),
                82..85 => self.power_cut(),
                85..86 => self.clean_restart(),
                86..87 => self.lose_the_index(),
                87..92 => self.io_faults = self.rng.random_range(1..6),
                92..95 => self.sync_faults = self.rng.random_range(1..4),
                _ => self.corrupt(),
            }
            // The syncer syncs on its own too (for room): while syncs fail,
            // whatever is unsynced may be dropped.
            if self.sync_faults > 0 {
                self.unsynced_may_be_lost();
            }
            if self.io_faults > 0 {
                self.copies_may_be_abandoned();
            }
            self.io_faults = self.io_faults.saturating_sub(1);
            self.sync_faults = self.sync_faults.saturating_sub(1);
            self.check();
        }
        // Faults off, one last sync and restart: everything not excused
        // nor evicted is there and right.
        self.io_faults = 0;
        self.sync_faults = 0;
        self.set_faults();
        self.clean_restart();
        self.check();
        for key in self.known.keys() {
            let got = block_on(read_all(&self.store, key, u64::MAX));
            match got {
                Ok(got) => assert!(got == self.bytes[key], "{}: wrong bytes at the end", self.at()),
                Err(e) => assert_eq!(e.code(), Code::DataLoss, "{}: {e}", self.at()),
            }
        }
    }

    fn put(&mut self) {
        let len = match self.rng.random_range(0..100) {
            0..70 => self.rng.random_range(0..3000),
            70..95 => self.rng.random_range(3000..60_000),
            _ => self.rng.random_range(100_000..400_000),
        };
        // Sometimes a blob uploaded before, again.
        let (key, data) = if !self.bytes.is_empty() && self.rng.random_bool(0.1) {
            let i = self.rng.random_range(0..self.bytes.len());
            let (k, d) = self.bytes.iter().nth(i).unwrap();
            (k.clone(), d.clone())
        } else {
            self.next_blob += 1;
            blob(self.next_blob, len)
        };
        self.bytes.insert(key.clone(), data.clone());
        match self.upload(&key, data) {
            Ok(()) => {
                let event = format!("step {}: uploaded ({} bytes)", self.step, self.bytes[&key].len());
                let mut events = self.known.remove(&key).map(|k| k.events).unwrap_or_default();
                events.push(event);
                let known = Known {
                    logical: None,
                    synced: false,
                    excused: false,
                    promised_at: None,
                    events,
                    moving: false,
                    copy_pending: false,
                };
                self.known.insert(key, known);
            }
            // After failed syncs the syncer backs off, so a write needing
            // room may still time out once the faults are gone.
            // An index too small for the blobs refuses rather than forgets.
            Err(e) if e.code() == Code::ResourceExhausted && e.message().contains("index") => {}
            Err(e) => assert!(
                self.io_faults > 0 || self.sync_faults > 0 || e.message().contains("syncs are failing"),
                "{}: an upload failed without a fault: {e}",
                self.at()
            ),
        }
    }

    /// Uploads whole, or in two pieces (larger blobs then wait in the
    /// staging area until commit).
    fn upload(&mut self, key: &CasKey, data: Bytes) -> Result<()> {
        if data.len() < 2 || self.rng.random_bool(0.5) {
            return block_on(put_all(&self.store, key, data));
        }
        let cut = self.rng.random_range(1..data.len());
        let mut writer = block_on(self.store.write(key))?;
        block_on(writer.write(data.slice(..cut)))?;
        block_on(writer.write(data.slice(cut..)))?;
        block_on(writer.commit())
    }

    /// An upload that sends part of a large blob and hangs up: the ring
    /// does not move.
    fn abandon_an_upload(&mut self) {
        self.next_blob += 1;
        let (key, data) = blob(self.next_blob, self.rng.random_range(100_000..400_000));
        let head = self.ring().head();
        let Ok(mut writer) = block_on(self.store.write(&key)) else { return };
        let sent = self.rng.random_range(1..data.len());
        let _ = block_on(writer.write(data.slice(..sent)));
        drop(writer);
        assert_eq!(self.ring().head(), head, "{}: an abandoned upload moved the ring", self.at());
        assert_eq!(self.store.engine().staging.as_ref().map(|s| s.held()), Some(0), "{}", self.at());
    }

    fn random_known(&mut self) -> Option<CasKey> {
        if self.known.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.known.len());
        self.known.keys().nth(i).cloned()
    }

    fn read(&mut self) {
        let Some(key) = self.random_known() else { return };
        match block_on(read_all(&self.store, &key, u64::MAX)) {
            Ok(got) => assert!(got == self.bytes[&key], "{}: wrong bytes served", self.at()),
            Err(e) if e.code() == Code::Unavailable => {
                assert!(self.io_faults > 0, "{}: UNAVAILABLE without a fault: {e}", self.at());
            }
            Err(e) if e.code() == Code::DataLoss => {
                let known = &self.known[&key];
                assert!(
                    known.excused,
                    "{}: DATA_LOSS for an intact blob: {e}; its events: {:#?}",
                    self.at(),
                    known.events
                );
            }
            // Whether it may be missing, the check after this step says.
            Err(e) => assert!(e.is_not_found(), "{}: {e}", self.at()),
        }
    }

    fn find_missing(&mut self) {
        let step = self.step;
        let mut keys: Vec<CasKey> =
            (0..self.rng.random_range(1..40)).filter_map(|_| self.random_known()).collect();
        self.next_blob += 1;
        let (never, _) = blob(self.next_blob | (1 << 62), 10);
        keys.push(never.clone());
        let missing = block_on(self.store.find_missing(&keys)).unwrap();
        assert!(missing.contains(&never), "{}: a blob never uploaded was reported present", self.at());
        let head = self.ring().head();
        let kept = self.ring().kept_bytes();
        for key in keys {
            if !missing.contains(&key)
                && self.io_faults == 0
                && let Some(known) = self.known.get_mut(&key)
            {
                known.promised_at = Some(head);
                let old = known.logical.is_none_or(|l| head - l > kept);
                known.moving |= old;
                known.copy_pending |= old;
                known.events.push(format!("{step}: reported present (head {head})"));
            }
        }
    }

    fn sync(&mut self) {
        if self.store.engine().sync().is_ok() {
            for known in self.known.values_mut() {
                if !known.synced {
                    known.events.push(format!("{}: synced", self.step));
                }
                known.synced = true;
                known.moving = false;
            }
        } else {
            self.unsynced_may_be_lost();
        }
    }

    fn copies_may_be_abandoned(&mut self) {
        for known in self.known.values_mut() {
            if known.copy_pending && known.promised_at.is_some() {
                known.promised_at = None;
                known.events.push(format!("{}: its copy forward may fail (I/O errors)", self.step));
            }
        }
    }

    fn unsynced_may_be_lost(&mut self) {
        for known in self.known.values_mut() {
            if !known.synced || known.moving {
                known.excused = true;
            }
        }
    }

    fn reopen(&mut self, data: Arc<FaultyDevice>, index: Arc<FaultyDevice>) {
        self.data = data;
        self.index = index;
        self.store = open(&self.data, &self.index, self.expected_blob_bytes);
        // Copies forward made since the last sync are forgotten with it:
        // a promise holds while the store runs.
        for known in self.known.values_mut() {
            known.promised_at = None;
        }
    }

    fn power_cut(&mut self) {
        for known in self.known.values_mut() {
            known.events.push(format!("{}: power cut (synced {})", self.step, known.synced));
        }
        self.store.engine().halt();
        self.unsynced_may_be_lost();
        let seed = self.rng.random();
        let (data, index) = (self.data.power_cut(seed), self.index.power_cut(seed + 1));
        self.reopen(Arc::new(data), Arc::new(index));
    }

    fn clean_restart(&mut self) {
        self.clean_stop("clean restart");
        let seed = self.rng.random();
        let (data, index) = (self.data.restart(seed), self.index.restart(seed + 1));
        self.reopen(Arc::new(data), Arc::new(index));
    }

    /// A clean stop, then the index is gone (deleted, a new disk): the
    /// store rebuilds it from the ring and everything synced is there.
    fn lose_the_index(&mut self) {
        self.clean_stop("index lost");
        let seed = self.rng.random();
        let data = self.data.restart(seed);
        let index = FaultyDevice::new(self.index.len(), seed + 1);
        self.reopen(Arc::new(data), Arc::new(index));
    }

    /// A clean stop, then the operator changes `expected_blob_bytes`: the
    /// index's tables are allotted another size, keeping every live entry.
    fn retune(&mut self) {
        let choices: Vec<u64> =
            [256, 4096, 65_536].into_iter().filter(|e| *e != self.expected_blob_bytes).collect();
        let expected = choices[self.rng.random_range(0..choices.len())];
        self.clean_stop(&format!("retuned for {expected}-byte blobs"));
        let seed = self.rng.random();
        let data = Arc::new(self.data.restart(seed));
        let index = Arc::new(self.index.restart(seed + 1));
        self.expected_blob_bytes = expected;
        self.reopen(data, index);
    }

    /// A clean stop, then the data volume grows: the store keeps its size
    /// and everything in it.
    fn grow(&mut self) {
        self.clean_stop("volume grown");
        let seed = self.rng.random();
        let data = Arc::new(self.data.grown(seed, BLOCK * self.rng.random_range(1..4)));
        let index = Arc::new(self.index.restart(seed + 1));
        self.reopen(data, index);
    }

    /// Closes the store (its last sync may fail while syncs do).
    fn clean_stop(&mut self, what: &str) {
        for known in self.known.values_mut() {
            known.events.push(format!("{}: {what}", self.step));
        }
        if self.store.engine().close().is_ok() {
            for known in self.known.values_mut() {
                known.synced = true;
                known.moving = false;
            }
        } else {
            self.unsynced_may_be_lost();
        }
    }

    /// Flips a byte in the ring; whatever record lies there may be lost.
    /// First every copy forward finishes, so that where each blob lies is
    /// known.
    fn corrupt(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.ring().refresh_backlog() > 0 {
            assert!(std::time::Instant::now() < deadline, "{}: copies forward never finished", self.at());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.check();
        let capacity = self.ring().capacity();
        let offset = self.rng.random_range(0..capacity);
        self.data.corrupt(PAGE_BYTES + offset, 1 << self.rng.random_range(0..8));
        for (key, known) in &mut self.known {
            if let Some(logical) = known.logical {
                let len = record_len(key.size_bytes());
                let start = logical % capacity;
                if (start..start + len).contains(&offset) {
                    known.excused = true;
                }
            }
        }
    }

    /// Every known blob is there, or gone for a documented reason.
    fn check(&mut self) {
        let at = self.at();
        let step = self.step;
        let keys: Vec<CasKey> = self.known.keys().cloned().collect();
        let fps: Vec<Fingerprint> = self.store.engine().fingerprints.cas_many(&keys);
        let found = block_on(self.store.engine().peek(&fps)).unwrap();
        let (tail, head, kept) = (self.ring().tail(), self.ring().head(), self.ring().kept_bytes());
        for (key, found) in keys.into_iter().zip(found) {
            let known = self.known.get_mut(&key).unwrap();
            if let Some(logical) = found {
                if known.logical != Some(logical) {
                    known.events.push(format!("{step}: at {logical} (head {head}, tail {tail})"));
                    // Copied forward: it now rests on a record the next
                    // sync makes durable (a failed one may drop it).
                    if known.logical.is_some() {
                        known.synced = false;
                    }
                    known.copy_pending = false;
                }
                known.logical = Some(logical);
                continue;
            }
            if let Some(promised) = known.promised_at
                && head - promised <= kept
                && !known.excused
            {
                panic!(
                    "{at}: reported present at head {promised}, gone at head {head} (kept {kept}; last at {:?}, synced {}); its events: {:#?}",
                    known.logical, known.synced, known.events
                );
            }
            let evicted = known.logical.is_some_and(|l| l < tail);
            assert!(
                evicted || known.excused,
                "{at}: an acknowledged blob vanished (last at {:?}, tail {tail}, head {head}); its events: {:#?}",
                known.logical,
                known.events
            );
            self.known.remove(&key);
        }
    }
}

/// Several seeds of a few hundred steps each; a failure names its seed.
#[test]
fn the_store_keeps_its_promises_under_seeded_faults() {
    let seeds: u64 = std::env::var("KILN_MODEL_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let first: u64 = std::env::var("KILN_MODEL_FIRST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    for seed in first..first + seeds {
        Sim::new(seed).run(500);
    }
}
