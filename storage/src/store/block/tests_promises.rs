//! Tests of the block store's promises to its clients: what it
//! acknowledged it has, and what it cannot keep it refuses to acknowledge.

#![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use bytes::Bytes;
use futures::executor::block_on;
use kiln_proto::{Code, DigestFunction};

use super::device::BlockDevice;
use super::engine::index_file_bytes;
use super::faulty::FaultyDevice;
use super::*;
use crate::store::{CasStore, put_all, read_all};

pub(super) const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 256 << 10;

pub(super) fn config(dir: &Path, kind: Kind) -> BlockConfig {
    super::tests::config(dir, kind, IoMode::Pread)
}

pub(super) fn blob(seed: u64, len: usize) -> (CasKey, Bytes) {
    let data: Vec<u8> =
        (0..len as u64).map(|i| (i.wrapping_mul(seed | 1).wrapping_add(seed) >> 3) as u8).collect();
    (CasKey::shared(DigestFunction::Sha256.compute(&data)), Bytes::from(data))
}

/// Fault-free devices for a store of [`SIZE`].
fn devices(seed: u64) -> Devices {
    let index = index_file_bytes(SIZE, BLOCK, 4096).unwrap();
    Devices {
        data: Arc::new(FaultyDevice::new(SIZE, seed)),
        index: Arc::new(FaultyDevice::new(index, seed + 1)),
    }
}

/// A device that stops the first 64-byte write (a record header, written
/// at commit) until the test lets it go.
#[derive(Debug)]
struct GatedDevice {
    inner: FaultyDevice,
    armed: AtomicBool,
    entered: Barrier,
    release: Barrier,
}

impl BlockDevice for GatedDevice {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if data.len() == 64 && self.armed.swap(false, Ordering::SeqCst) {
            self.entered.wait();
            self.release.wait();
        }
        self.inner.write_at(data, offset)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }

    fn describe(&self) -> String {
        "gated device".into()
    }
}

/// A commit whose record the tail passed while its header was being
/// written is refused (UNAVAILABLE, retry), never acknowledged dead; a
/// writer then copies its staged bytes again into new space, and that
/// copy is acknowledged live.
#[test]
fn a_commit_overtaken_by_the_tail_is_not_acknowledged() {
    let data = Arc::new(GatedDevice {
        inner: FaultyDevice::new(SIZE, 1),
        armed: AtomicBool::new(false),
        entered: Barrier::new(2),
        release: Barrier::new(2),
    });
    let index = Arc::new(FaultyDevice::new(index_file_bytes(SIZE, BLOCK, 4096).unwrap(), 2));
    let cfg = config(Path::new("/nonexistent"), Kind::Cas);
    let store = BlockCas::new(Engine::open_on(&cfg, Devices { data: data.clone(), index }).unwrap());
    let engine = store.engine().clone();
    let (key, bytes) = blob(1, 300_000);
    let (fp, size) = (engine.fingerprints.cas(&key), 300_000);
    // While the header write is in flight, the tail passes the record.
    let overtake = |logical: u64, commit: Box<dyn FnOnce() -> Result<()> + Send>| {
        data.armed.store(true, Ordering::SeqCst);
        let committing = std::thread::spawn(commit);
        data.entered.wait();
        let ring = engine.ring.clone();
        let mover = std::thread::spawn(move || ring.advance_tail(logical + 1));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while engine.ring.tail() <= logical {
            assert!(std::time::Instant::now() < deadline, "the tail never moved");
            std::thread::yield_now();
        }
        data.release.wait();
        mover.join().unwrap();
        committing.join().unwrap()
    };
    let logical = block_on(engine.call(&fp, |reply| Request::Reserve { size, reply })).unwrap();
    let offset = format::RECORD_HEADER_BYTES;
    let data_bytes = bytes.clone();
    block_on(engine.call(&fp, |reply| Request::Write { logical, offset, data: data_bytes, reply })).unwrap();
    let loc = Location { logical, size };
    let committing = engine.clone();
    let err = overtake(
        logical,
        Box::new(move || block_on(committing.call(&fp, |reply| Request::Commit { fp, loc, reply }))),
    )
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(block_on(store.find_missing(std::slice::from_ref(&key))).unwrap(), vec![key.clone()]);
    assert!(block_on(read_all(&store, &key, u64::MAX)).unwrap_err().is_not_found());

    let mut writer = block_on(store.write(&key)).unwrap();
    block_on(writer.write(bytes.slice(..1000))).unwrap();
    block_on(writer.write(bytes.slice(1000..))).unwrap();
    // Its record goes at the head.
    overtake(engine.ring.head(), Box::new(move || block_on(writer.commit()))).unwrap();
    assert_eq!(block_on(read_all(&store, &key, u64::MAX)).unwrap(), bytes);
}

/// A write the store failed counts for nothing: the offset a resumption
/// is told (and the hash behind `Verifying`) stay where they were, so
/// resuming there succeeds. An upload waits in the staging area, which the
/// ring's moving on cannot take from it.
#[test]
fn a_failed_write_counts_nothing_and_a_resumption_there_succeeds() {
    use crate::store::{BlobWriter, Verifying};
    let cfg = BlockConfig { staging_bytes: 4 << 20, ..config(Path::new("/nonexistent"), Kind::Cas) };
    let engine = Engine::open_on(&cfg, devices(3)).unwrap();
    let store = Verifying::new(BlockCas::new(engine.clone()));
    let (key, bytes) = blob(9, 3 << 19);
    let mut writer = block_on(store.write(&key)).unwrap();
    let piece = 1 << 19;
    block_on(writer.write(bytes.slice(..piece))).unwrap();
    // Another upload of the same client takes the rest of its share (2 MiB).
    let (other, other_bytes) = blob(10, 3 << 19);
    let mut hog = block_on(store.write(&other)).unwrap();
    block_on(hog.write(other_bytes.slice(..(3 << 19) - 1))).unwrap();
    let err = block_on(writer.write(bytes.slice(piece..2 * piece))).unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("upload_staging_bytes"), "{err}");
    assert_eq!(writer.written(), piece as u64, "a chunk the store failed was counted");
    assert!(writer.resumable());
    drop(hog);
    // The ring moving on takes nothing from an upload in progress.
    let head = engine.ring.head();
    engine.ring.advance_tail(head);
    for at in [piece, 2 * piece] {
        block_on(writer.write(bytes.slice(at..at + piece))).unwrap();
    }
    assert_eq!(engine.ring.head(), head, "the ring advanced before the upload was complete");
    block_on(writer.commit()).unwrap();
    assert_eq!(block_on(read_all(&store, &key, u64::MAX)).unwrap(), bytes);
    assert_eq!(engine.staging.as_ref().unwrap().held(), 0);
}

/// A large blob sent whole in one message is held in memory until commit;
/// interrupted, it is not kept for resumption, so interrupted uploads
/// cannot pile up in memory. One sent in pieces is staged and kept.
#[test]
fn only_staged_uploads_are_kept_for_resumption() {
    use crate::store::BlobWriter;
    let cfg = config(Path::new("/nonexistent"), Kind::Cas);
    let store = BlockCas::new(Engine::open_on(&cfg, devices(13)).unwrap());
    let (key, bytes) = blob(77, 200_000);
    let mut whole = block_on(store.write(&key)).unwrap();
    block_on(whole.write(bytes.clone())).unwrap();
    assert_eq!(whole.buffered(), 200_000);
    assert!(!whole.resumable());
    let mut pieces = block_on(store.write(&key)).unwrap();
    block_on(pieces.write(bytes.slice(..100_000))).unwrap();
    assert_eq!(pieces.buffered(), 0);
    assert!(pieces.resumable());
    let (small, small_bytes) = blob(78, 5000);
    let mut small_writer = block_on(store.write(&small)).unwrap();
    block_on(small_writer.write(small_bytes)).unwrap();
    assert!(small_writer.resumable(), "small blobs stay resumable");
    block_on(whole.commit()).unwrap();
    assert_eq!(block_on(read_all(&store, &key, u64::MAX)).unwrap(), bytes);
}

/// Uploads that declare a large blob, send a little and hang up take no
/// space from the ring: every blob stays, and the staging area has all its
/// bytes back. The area's bounds (in all, per client) hold.
#[test]
fn abandoned_uploads_evict_nothing() {
    use crate::store::BlobWriter;
    let cfg = BlockConfig { staging_bytes: 4 << 20, ..config(Path::new("/nonexistent"), Kind::Cas) };
    let store = BlockCas::new(Engine::open_on(&cfg, devices(11)).unwrap());
    let kept: Vec<_> = (0..100).map(|i| blob(1000 + i, 20_000)).collect();
    for (key, bytes) in &kept {
        block_on(put_all(&store, key, bytes.clone())).unwrap();
    }
    let keys: Vec<CasKey> = kept.iter().map(|(k, _)| k.clone()).collect();
    assert!(block_on(store.find_missing(&keys)).unwrap().is_empty());
    let ring = store.engine().ring.clone();
    let (tail, head) = (ring.tail(), ring.head());
    let staging = store.engine().staging.clone().unwrap();
    let largest = store.blob_size_bytes_max();
    for i in 0..40u8 {
        // A blob of the largest size, from its own client.
        let key = CasKey::shared(kiln_proto::Digest::new(DigestFunction::Sha256, [i; 32], largest).unwrap());
        let client = Some(std::net::IpAddr::from([10, 0, 0, i]));
        let mut writer = block_on(store.write_from(&key, client)).unwrap();
        match block_on(writer.write(Bytes::from(vec![i; 70_000]))) {
            Ok(()) => assert!(staging.held() <= staging.bytes_max()),
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e}"),
        }
        // Hung up: the writer is dropped.
    }
    assert_eq!((ring.tail(), ring.head()), (tail, head), "abandoned uploads moved the ring");
    assert_eq!(staging.held(), 0);
    assert!(block_on(store.find_missing(&keys)).unwrap().is_empty());

    // Bounds: one client holds at most half the area, all at most the area.
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..12u64 {
        let (key, _) = blob(5000 + i, 1 << 20);
        let client = Some(std::net::IpAddr::from([10, 1, 0, (i % 3) as u8]));
        let mut writer = block_on(store.write_from(&key, client)).unwrap();
        match block_on(writer.write(Bytes::from(vec![1u8; 1 << 19]))) {
            Ok(()) => held.push(writer),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                refused += 1;
            }
        }
        assert!(staging.held() <= staging.bytes_max());
    }
    // 4 MiB staged of 12 × 512 KiB asked: 8 refused.
    assert_eq!((held.len(), refused), (8, 4), "staged {}", staging.held());
    assert_eq!(staging.held(), staging.bytes_max());
}

/// A store whose syncs keep failing frees no room: writes that need room
/// fail with UNAVAILABLE at their deadline instead of hanging, the store
/// says it is unhealthy and why, and it recovers when the disk does.
#[test]
fn writes_end_at_their_deadline_when_syncs_keep_failing() {
    use super::faulty::Faults;
    let data = Arc::new(FaultyDevice::new(SIZE, 5));
    let index = Arc::new(FaultyDevice::new(index_file_bytes(SIZE, BLOCK, 4096).unwrap(), 6));
    let cfg =
        BlockConfig { room_wait: Duration::from_millis(500), ..config(Path::new("/nonexistent"), Kind::Cas) };
    let store = BlockCas::new(Engine::open_on(&cfg, Devices { data: data.clone(), index }).unwrap());
    assert!(store.engine().unhealthy().is_none());
    data.set_faults(Faults { sync_error_rate: 1.0, ..Faults::default() });
    let started = std::time::Instant::now();
    let mut refused = None;
    for i in 0..200 {
        let (k, d) = blob(100 + i, 200_000);
        if let Err(e) = block_on(crate::store::put_all(&store, &k, d)) {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("40 MB went into an 8 MiB store that cannot sync");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("syncs are failing"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "the write waited {:?}", started.elapsed());
    let why = store.engine().unhealthy().expect("unhealthy while syncs fail");
    assert!(why.contains("injected sync error"), "{why}");
    data.set_faults(Faults::default());
    store.engine().sync().unwrap();
    assert!(store.engine().unhealthy().is_none());
    let (k, d) = blob(999, 200_000);
    block_on(crate::store::put_all(&store, &k, d.clone())).unwrap();
    assert_eq!(block_on(read_all(&store, &k, u64::MAX)).unwrap(), d);
}

/// After the data device fails a sync, the entries written since the last
/// good sync are dropped, never persisted by a later sync that "succeeds"
/// (Linux reports a writeback error once): what was synced before stays.
#[test]
fn a_failed_data_sync_drops_what_it_covered() {
    use super::faulty::Faults;
    let data = Arc::new(FaultyDevice::new(SIZE, 7));
    let index = Arc::new(FaultyDevice::new(index_file_bytes(SIZE, BLOCK, 4096).unwrap(), 8));
    let cfg = config(Path::new("/nonexistent"), Kind::Cas);
    let store =
        BlockCas::new(Engine::open_on(&cfg, Devices { data: data.clone(), index: index.clone() }).unwrap());
    let (synced, synced_bytes) = blob(1, 100_000);
    block_on(crate::store::put_all(&store, &synced, synced_bytes.clone())).unwrap();
    store.engine().sync().unwrap();
    let (lost, lost_bytes) = blob(2, 100_000);
    block_on(crate::store::put_all(&store, &lost, lost_bytes)).unwrap();
    data.set_faults(Faults { sync_error_rate: 1.0, ..Faults::default() });
    assert!(store.engine().sync().is_err());
    data.set_faults(Faults::default());
    store.engine().sync().unwrap();
    let both = [synced.clone(), lost.clone()];
    assert_eq!(block_on(store.find_missing(&both)).unwrap(), vec![lost.clone()]);
    store.engine().close().unwrap();
    let store = BlockCas::new(
        Engine::open_on(&cfg, Devices { data: Arc::new(data.restart(1)), index: Arc::new(index.restart(2)) })
            .unwrap(),
    );
    assert_eq!(block_on(store.find_missing(&both)).unwrap(), vec![lost]);
    assert_eq!(block_on(read_all(&store, &synced, u64::MAX)).unwrap(), synced_bytes);
}

/// The entry count a scrape reads is a counter, and it agrees with a walk
/// of the index through puts, replacements, drops, eviction and restarts.
#[test]
fn the_entry_counter_agrees_with_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Kind::Cas);
    let store = BlockCas::new(Engine::open(&cfg).unwrap());
    let agree = |store: &BlockCas, what: &str| {
        assert_eq!(store.engine().entries(), store.engine().count_entries(), "{what}");
    };
    for i in 0..40 {
        let (k, d) = blob(i, 1000 + 100 * i as usize);
        block_on(crate::store::put_all(&store, &k, d.clone())).unwrap();
        block_on(crate::store::put_all(&store, &k, d)).unwrap(); // the same again
    }
    agree(&store, "after puts");
    assert_eq!(store.engine().entries(), 40);
    let (k, _) = blob(3, 1300);
    let fp = store.engine().fingerprints.cas(&k);
    let logical =
        block_on(store.engine().call(&fp, |reply| worker::Request::Open { fp, reply })).unwrap().0.logical;
    store.engine().forget(&fp, logical);
    assert_eq!(block_on(store.find_missing(std::slice::from_ref(&k))).unwrap().len(), 1);
    agree(&store, "after a drop");
    // Through the ring several times: eviction takes entries off.
    for i in 100..400 {
        let (k, d) = blob(i, 60_000);
        block_on(crate::store::put_all(&store, &k, d)).unwrap();
    }
    agree(&store, "after eviction");
    assert!(store.engine().entries() < 200);
    store.engine().close().unwrap();
    drop(store);
    let store = BlockCas::new(Engine::open(&cfg).unwrap());
    agree(&store, "after a restart");
}

/// What FindMissingBlobs reports present survives at least
/// `kept_bytes` of further writes, wherever in the ring it was: young
/// blobs by their age, old ones copied forward. What cannot be kept (the
/// copy backlog is full, or it is too near eviction) is reported missing
/// and counted, never reported present and then lost.
#[test]
fn what_find_missing_reports_present_survives_the_promised_writes() {
    let dir = tempfile::tempdir().unwrap();
    // An index with room for every blob: this is about the ring.
    let cfg = BlockConfig { expected_blob_bytes: 512, ..config(dir.path(), Kind::Cas) };
    let store = BlockCas::new(Engine::open(&cfg).unwrap());
    let ring = store.engine().ring.clone();
    let skipped_before = kiln_proto::metrics::global().store_refreshes_skipped.get();
    let mut filler = 1_000_000u64;
    // Writes about `bytes` (copies forward included), never more.
    let mut write = |store: &BlockCas, bytes: u64| {
        let target = store.engine().ring.head() + bytes;
        while store.engine().ring.head() + (64 << 10) < target {
            let (k, d) = blob(filler, 20_000);
            filler += 1;
            block_on(crate::store::put_all(store, &k, d)).unwrap();
        }
    };
    let small: Vec<_> = (0..3000).map(|i| blob(i, 1000)).collect();
    for (k, d) in &small {
        block_on(crate::store::put_all(&store, k, d.clone())).unwrap();
    }
    // At every age from young to near eviction, ask about all of them.
    let keys: Vec<CasKey> = small.iter().map(|(k, _)| k.clone()).collect();
    let mut reported = 0;
    let mut refused = 0;
    for _ in 0..12 {
        write(&store, ring.capacity() / 16);
        let missing: std::collections::HashSet<CasKey> =
            block_on(store.find_missing(&keys)).unwrap().into_iter().collect();
        let present: Vec<&(CasKey, Bytes)> = small.iter().filter(|(k, _)| !missing.contains(k)).collect();
        reported += present.len();
        refused += missing.len();
        // The promise: after nearly `kept_bytes` more bytes, each is still
        // there (looked at without copying anything forward).
        let checkpoint = ring.head();
        write(&store, ring.kept_bytes());
        let later = ring.head() - checkpoint;
        assert!(
            later <= ring.kept_bytes() && later + (128 << 10) >= ring.kept_bytes(),
            "{later} {}",
            ring.kept_bytes()
        );
        let fps: Vec<format::Fingerprint> =
            present.iter().map(|(k, _)| store.engine().fingerprints.cas(k)).collect();
        let there = block_on(store.engine().peek(&fps)).unwrap();
        let lost = there.iter().filter(|p| p.is_none()).count();
        assert_eq!(
            lost,
            0,
            "of {} reported present at head {checkpoint}, {lost} gone {later} bytes later",
            present.len()
        );
        // Put back what was reported missing, as a client would.
        for (k, d) in &small {
            if missing.contains(k) {
                block_on(crate::store::put_all(&store, k, d.clone())).unwrap();
            }
        }
    }
    assert!(reported > 0);
    let skipped = kiln_proto::metrics::global().store_refreshes_skipped.get() - skipped_before;
    assert!(refused == 0 || skipped > 0, "{refused} reported missing without a count");
}

/// A blob copied forward and then caught by a failed data sync goes back
/// to its earlier, durable record: it is not dropped.
#[test]
fn a_failed_data_sync_after_a_copy_forward_keeps_the_earlier_copy() {
    use super::faulty::Faults;
    let data = Arc::new(FaultyDevice::new(SIZE, 11));
    let index = Arc::new(FaultyDevice::new(index_file_bytes(SIZE, BLOCK, 512).unwrap(), 12));
    let cfg = BlockConfig { expected_blob_bytes: 512, ..config(Path::new("/nonexistent"), Kind::Cas) };
    let store = BlockCas::new(Engine::open_on(&cfg, Devices { data: data.clone(), index }).unwrap());
    let (key, bytes) = blob(1, 40_000);
    block_on(crate::store::put_all(&store, &key, bytes.clone())).unwrap();
    store.engine().sync().unwrap();
    let ring = store.engine().ring.clone();
    let mut filler = 100;
    while ring.head() < ring.kept_bytes() + 100_000 {
        let (k, d) = blob(filler, 30_000);
        filler += 1;
        block_on(crate::store::put_all(&store, &k, d)).unwrap();
    }
    let fp = store.engine().fingerprints.cas(&key);
    let before = block_on(store.engine().peek(&[fp])).unwrap()[0].unwrap();
    assert!(block_on(store.find_missing(std::slice::from_ref(&key))).unwrap().is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while block_on(store.engine().peek(&[fp])).unwrap()[0] == Some(before) {
        assert!(std::time::Instant::now() < deadline, "never copied forward");
        std::thread::sleep(Duration::from_millis(1));
    }
    data.set_faults(Faults { sync_error_rate: 1.0, ..Faults::default() });
    assert!(store.engine().sync().is_err());
    data.set_faults(Faults::default());
    assert_eq!(block_on(store.engine().peek(&[fp])).unwrap()[0], Some(before));
    assert_eq!(block_on(read_all(&store, &key, u64::MAX)).unwrap(), bytes);
}

/// The scrub finds damage no read has met yet: the blob is dropped (so
/// FindMissingBlobs reports it missing and the client uploads it again)
/// and counted; intact blobs stay.
#[test]
fn the_scrub_finds_damage_before_a_read_does() {
    let data = Arc::new(FaultyDevice::new(SIZE, 21));
    let index = Arc::new(FaultyDevice::new(index_file_bytes(SIZE, BLOCK, 4096).unwrap(), 22));
    let cfg =
        BlockConfig { scrub_bytes_per_second: 64 << 20, ..config(Path::new("/nonexistent"), Kind::Cas) };
    let store = BlockCas::new(Engine::open_on(&cfg, Devices { data: data.clone(), index }).unwrap());
    let blobs: Vec<_> = (0..30).map(|i| blob(300 + i, 5_000 + 8_000 * i as usize)).collect();
    for (k, d) in &blobs {
        block_on(crate::store::put_all(&store, k, d.clone())).unwrap();
    }
    let damaged_before = kiln_proto::metrics::global().store_scrub_damaged.get();
    let (victim, victim_bytes) = &blobs[17];
    let fp = store.engine().fingerprints.cas(victim);
    let logical = block_on(store.engine().peek(&[fp])).unwrap()[0].unwrap();
    data.corrupt(store.engine().ring.physical(logical) + 64 + victim_bytes.len() as u64 / 2, 0x08);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while block_on(store.engine().peek(&[fp])).unwrap()[0].is_some() {
        assert!(std::time::Instant::now() < deadline, "the scrub never found the damage");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(kiln_proto::metrics::global().store_scrub_damaged.get() > damaged_before);
    let keys: Vec<CasKey> = blobs.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(block_on(store.find_missing(&keys)).unwrap(), vec![victim.clone()]);
    for (k, d) in blobs.iter().filter(|(k, _)| k != victim) {
        assert_eq!(block_on(read_all(&store, k, u64::MAX)).unwrap(), *d);
    }
}

/// An index allotted too few slots for the blobs grows instead of
/// forgetting or refusing: nothing is refused or evicted early until its
/// tables reach their bound (16 times the allotment). Only there does a
/// write find no room: the ring evicts its oldest blocks early where no
/// promise covers them (as it would when full), else the write is refused
/// with RESOURCE_EXHAUSTED; every acknowledged blob the tail has not
/// passed stays findable throughout.
#[test]
fn a_full_index_grows_then_evicts_by_age_and_never_forgets_a_live_blob() {
    let dir = tempfile::tempdir().unwrap();
    // 1,024 slots allotted (the least), so at most 16,384; 40,000 blobs
    // of about 250 bytes, more than the ring holds.
    let cfg = BlockConfig { expected_blob_bytes: 1 << 30, ..config(dir.path(), Kind::Cas) };
    let store = BlockCas::new(Engine::open(&cfg).unwrap());
    let allotted = store.engine().index_slots();
    let evictions_before = kiln_proto::metrics::global().store_index_evictions.get();
    let full_before = kiln_proto::metrics::global().store_index_full.get();
    let mut acked: Vec<(CasKey, u64)> = Vec::new();
    let mut first_eviction_at = None;
    for i in 0..40_000u64 {
        // Distinct bytes for every blob, so every write adds a key.
        let mut d = vec![0u8; 150 + usize::try_from(i % 7).unwrap() * 10];
        d[..8].copy_from_slice(&i.to_le_bytes());
        let (k, d) = (CasKey::shared(DigestFunction::Sha256.compute(&d)), Bytes::from(d));
        match block_on(crate::store::put_all(&store, &k, d)) {
            Ok(()) => {
                let fp = store.engine().fingerprints.cas(&k);
                let at =
                    block_on(store.engine().peek(&[fp])).unwrap()[0].expect("acknowledged and not findable");
                acked.push((k, at));
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e}"),
        }
        let full = kiln_proto::metrics::global().store_index_full.get() > full_before;
        if first_eviction_at.is_none()
            && (full || kiln_proto::metrics::global().store_index_evictions.get() > evictions_before)
        {
            first_eviction_at = Some(store.engine().entries());
        }
        if i % 1000 == 999 {
            let tail = store.engine().ring.tail();
            acked.retain(|(_, at)| *at >= tail);
            let fps: Vec<format::Fingerprint> =
                acked.iter().map(|(k, _)| store.engine().fingerprints.cas(k)).collect();
            let found = block_on(store.engine().peek(&fps)).unwrap();
            for ((k, at), found) in acked.iter().zip(found) {
                assert!(found.is_some() || *at < tail, "{k} at {at} was forgotten (tail {tail})");
            }
        }
    }
    let first = first_eviction_at.expect("the bounded index makes room or refuses at its bound");
    assert!(first > 8 * allotted, "full at {first} entries with {allotted} slots allotted");
    assert!(store.engine().index_slots() >= 16 * allotted / 2);
}

/// A fingerprint does not cover the size (a slot records it): a key that
/// differs from a stored one only in its size is missing and unreadable,
/// never the stored blob's bytes; a new store names keys the keyed way.
#[test]
fn a_key_differing_only_in_size_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlockCas::new(Engine::open(&config(dir.path(), Kind::Cas)).unwrap());
    assert_eq!(store.engine().fingerprints.scheme(), format::FINGERPRINTS_KEYED);
    let (key, bytes) = blob(77, 5000);
    block_on(put_all(&store, &key, bytes.clone())).unwrap();
    let d = &key.digest;
    let wrong = CasKey::new(
        key.scope.clone(),
        kiln_proto::Digest::new(d.function(), *d.hash(), d.size_bytes() + 1).unwrap(),
    );
    let missing = block_on(store.find_missing(&[key.clone(), wrong.clone()])).unwrap();
    assert_eq!(missing, vec![wrong.clone()]);
    let e = block_on(read_all(&store, &wrong, u64::MAX)).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert_eq!(block_on(read_all(&store, &key, u64::MAX)).unwrap(), bytes);
}

/// FindMissingBlobs reads the index on the caller's thread, while drops go
/// through the storage threads' queues: a blob a reader found damaged is
/// never reported present after the reader was told DATA_LOSS.
#[test]
fn a_blob_found_damaged_is_never_reported_present_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlockCas::new(Engine::open(&config(dir.path(), Kind::Cas)).unwrap());
    for i in 0..200 {
        let (k, d) = blob(i, 500);
        block_on(put_all(&store, &k, d)).unwrap();
        let fp = store.engine().fingerprints.cas(&k);
        let (loc, _) =
            block_on(store.engine().call(&fp, |reply| worker::Request::Open { fp, reply })).unwrap();
        store.engine().forget(&fp, loc.logical);
        let missing = block_on(store.find_missing(std::slice::from_ref(&k))).unwrap();
        assert_eq!(missing, vec![k], "blob {i} reported present after its drop");
    }
}
