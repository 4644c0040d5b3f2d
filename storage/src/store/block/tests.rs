//! Tests of the block store: round trips on both I/O paths, restarts,
//! eviction and refresh, corruption, I/O errors, and crash consistency
//! against a model under seeded power cuts.

#![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::executor::block_on;
use kiln_proto::{Code, DigestFunction};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::device::BlockDevice;
use super::engine::index_file_bytes;
use super::faulty::{Faults, FaultyDevice};
use super::*;
use crate::store::{CasStore, put_all, read_all};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 256 << 10;

pub(super) fn config(dir: &Path, kind: Kind, io: IoMode) -> BlockConfig {
    BlockConfig {
        kind,
        data_path: dir.join(format!("{kind:?}.data")),
        index_path: dir.join(format!("{kind:?}.index")),
        size_bytes: SIZE,
        size_configured: true,
        block_bytes: BLOCK,
        expected_blob_bytes: 4096,
        threads: 2,
        io,
        sync_interval: Duration::from_secs(3600),
        pin_threads: false,
        format_device: false,
        reformat: false,
        room_wait: Duration::from_millis(kiln_proto::limits::BLOCK_ROOM_WAIT_MS),
        scrub_bytes_per_second: 0,
        staging_dir: std::env::temp_dir(),
        staging_bytes: 0,
        index_log_min_bytes: kiln_proto::limits::BLOCK_INDEX_LOG_MIN_BYTES,
    }
}

fn blob(seed: u64, len: usize) -> (CasKey, Bytes) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    (CasKey::shared(DigestFunction::Sha256.compute(&data)), Bytes::from(data))
}

fn cas(dir: &Path, io: IoMode) -> BlockCas {
    BlockCas::new(Engine::open(&config(dir, Kind::Cas, io)).unwrap())
}

fn read(store: &BlockCas, key: &CasKey) -> kiln_proto::Result<Bytes> {
    block_on(read_all(store, key, u64::MAX))
}

#[test]
fn blobs_round_trip_on_both_io_paths() {
    for io in [IoMode::Pread, IoMode::Auto] {
        let dir = tempfile::tempdir().unwrap();
        let store = cas(dir.path(), io);
        let sizes = [1usize, 100, 64 << 10, (64 << 10) + 1, 200_000, 1_500_000];
        let blobs: Vec<_> = sizes.iter().enumerate().map(|(i, n)| blob(i as u64, *n)).collect();
        for (k, d) in &blobs {
            block_on(put_all(&store, k, d.clone())).unwrap();
        }
        for (k, d) in &blobs {
            assert_eq!(read(&store, k).unwrap(), *d, "{} bytes via {}", d.len(), store.engine().io_path);
        }
        // Ranged reads, across checksum chunks.
        let (k, d) = &blobs[5];
        for (offset, limit) in
            [(0u64, Some(10u64)), (65_530, Some(20)), (1 << 20, None), (d.len() as u64, None)]
        {
            let mut r = block_on(store.read(k, ByteRange { offset, limit })).unwrap();
            let mut got = Vec::new();
            while let Some(c) = block_on(r.next()).unwrap() {
                got.extend_from_slice(&c);
            }
            let end = limit.map_or(d.len(), |l| (offset + l) as usize);
            assert_eq!(got, &d[offset as usize..end]);
        }
        let absent = blob(99, 10).0;
        let missing = block_on(store.find_missing(&[blobs[0].0.clone(), absent.clone()])).unwrap();
        assert_eq!(missing, vec![absent.clone()]);
        assert!(read(&store, &absent).unwrap_err().is_not_found());
        // An incomplete or overlong upload is refused and stores nothing.
        let (k, d) = blob(7, 100_000);
        let mut w = block_on(store.write(&k)).unwrap();
        block_on(w.write(d.slice(..1000))).unwrap();
        assert!(block_on(w.commit()).is_err());
        assert!(read(&store, &k).unwrap_err().is_not_found());
    }
}

#[test]
fn a_restart_serves_what_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<_> = (0..50).map(|i| blob(i, 1000 + (i as usize) * 3000)).collect();
    {
        let store = cas(dir.path(), IoMode::Auto);
        for (k, d) in &blobs[..25] {
            block_on(put_all(&store, k, d.clone())).unwrap();
        }
        store.engine().sync().unwrap();
        for (k, d) in &blobs[25..] {
            block_on(put_all(&store, k, d.clone())).unwrap();
        }
        // A clean close syncs the rest.
        store.engine().close().unwrap();
    }
    let store = cas(dir.path(), IoMode::Pread);
    for (k, d) in &blobs {
        assert_eq!(read(&store, k).unwrap(), *d);
    }
    assert_eq!(store.engine().entries(), 50);
}

#[test]
fn a_full_store_evicts_the_oldest_and_never_fails_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = cas(dir.path(), IoMode::Auto);
    let blobs: Vec<_> = (0..400).map(|i| blob(i, 100_000)).collect();
    for (k, d) in &blobs {
        block_on(put_all(&store, k, d.clone())).unwrap();
    }
    // 40 MB through an 8 MiB ring: the newest are there, the oldest gone.
    // (Reading an old blob copies it forward, which evicts others: each is
    // read once.)
    let got: Vec<_> = blobs.iter().rev().map(|(k, _)| read(&store, k)).collect();
    let present: Vec<bool> = got.iter().rev().map(Result::is_ok).collect();
    assert!(present[390..].iter().all(|p| *p), "the newest blobs survive");
    assert!(present[..100].iter().all(|p| !*p), "the oldest blobs were evicted");
    for ((_, d), got) in blobs.iter().zip(got.iter().rev()) {
        if let Ok(got) = got {
            assert_eq!(got, d, "never wrong bytes");
        }
    }
}

#[test]
fn reads_in_a_young_ring_copy_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = cas(dir.path(), IoMode::Auto);
    let (key, data) = blob(7, 200_000);
    block_on(put_all(&store, &key, data.clone())).unwrap();
    let head = store.engine().ring.head();
    for _ in 0..20 {
        assert_eq!(read(&store, &key).unwrap(), data);
        assert!(block_on(store.find_missing(std::slice::from_ref(&key))).unwrap().is_empty());
    }
    assert_eq!(store.engine().ring.head(), head, "a blob far from eviction was copied forward");
}

#[test]
fn what_find_missing_reported_present_survives() {
    let dir = tempfile::tempdir().unwrap();
    let store = cas(dir.path(), IoMode::Auto);
    let (kept, data) = blob(1000, 50_000);
    block_on(put_all(&store, &kept, data.clone())).unwrap();
    for i in 0..300 {
        let (k, d) = blob(i, 100_000);
        block_on(put_all(&store, &k, d)).unwrap();
        // A build asks about `kept` between its actions.
        if i % 10 == 0 {
            assert!(
                block_on(store.find_missing(std::slice::from_ref(&kept))).unwrap().is_empty(),
                "lost at {i}"
            );
        }
    }
    assert_eq!(read(&store, &kept).unwrap(), data);
}

fn faulty_cas(data: Arc<FaultyDevice>, index: Arc<FaultyDevice>) -> kiln_proto::Result<BlockCas> {
    let cfg = config(Path::new("/nonexistent"), Kind::Cas, IoMode::Pread);
    Engine::open_on(&cfg, Devices { data, index }).map(BlockCas::new)
}

fn faulty_devices(seed: u64) -> (Arc<FaultyDevice>, Arc<FaultyDevice>) {
    let index_len = index_file_bytes(SIZE, BLOCK, 4096).unwrap();
    (Arc::new(FaultyDevice::new(SIZE, seed)), Arc::new(FaultyDevice::new(index_len, seed + 1)))
}

#[test]
fn damaged_data_is_data_loss_and_only_that_blob_is_dropped() {
    let (data, index) = faulty_devices(1);
    let store = faulty_cas(data.clone(), index).unwrap();
    let blobs: Vec<_> = (0..6).map(|i| blob(i, if i % 2 == 0 { 2000 } else { 300_000 })).collect();
    for (k, d) in &blobs {
        block_on(put_all(&store, k, d.clone())).unwrap();
    }
    // Records follow each other from the start of the ring (page 1).
    let mut at = format::PAGE_BYTES;
    let mut starts = Vec::new();
    for (_, d) in &blobs {
        starts.push(at);
        at += format::record_len(d.len() as u64);
    }
    data.corrupt(starts[0] + 64 + 10, 0x01); // small blob's data
    data.corrupt(starts[1] + 64 + 200_000, 0x80); // large blob, its 4th chunk
    data.corrupt(starts[2] + 20, 0x04); // a header
    for (i, (k, d)) in blobs.iter().enumerate() {
        match read(&store, k) {
            Ok(got) => {
                assert!(i > 2, "damaged blob {i} was served");
                assert_eq!(got, *d);
            }
            Err(e) => {
                assert!(i <= 2, "intact blob {i} failed: {e}");
                assert_eq!(e.code(), Code::DataLoss, "{e}");
            }
        }
    }
    // Dropped: reported missing now, so clients upload them again.
    let keys: Vec<CasKey> = blobs.iter().map(|(k, _)| k.clone()).collect();
    let missing = block_on(store.find_missing(&keys)).unwrap();
    assert_eq!(missing, keys[..3].to_vec());
    block_on(put_all(&store, &keys[0], blobs[0].1.clone())).unwrap();
    assert_eq!(read(&store, &keys[0]).unwrap(), blobs[0].1);
}

#[test]
fn io_errors_are_errors_never_crashes() {
    let (data, index) = faulty_devices(5);
    let store = faulty_cas(data.clone(), index).unwrap();
    let blobs: Vec<_> = (0..40).map(|i| blob(i, 1000 + i as usize * 5000)).collect();
    data.set_faults(Faults { read_error_rate: 0.3, write_error_rate: 0.3, sync_error_rate: 0.5 });
    for (k, d) in &blobs {
        if let Err(e) = block_on(put_all(&store, k, d.clone())) {
            assert_eq!(e.code(), Code::Unavailable, "{e}");
        }
        if let Ok(got) = read(&store, k) {
            assert_eq!(got, *d);
        }
        let _ = store.engine().sync();
    }
    assert!(data.injected() > 0);
    data.set_faults(Faults::default());
    for (k, d) in &blobs {
        block_on(put_all(&store, k, d.clone())).unwrap();
        assert_eq!(read(&store, k).unwrap(), *d);
    }
}

/// Random uploads and syncs, then a power cut at a random moment: after the
/// restart every blob synced before the cut is there and every blob served
/// is right. The model is the set of blobs committed before the last
/// successful sync.
#[test]
fn power_cuts_never_lose_synced_blobs_nor_serve_wrong_bytes() {
    for seed in 0..12u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (data, index) = faulty_devices(seed * 10);
        let store = faulty_cas(data.clone(), index.clone()).unwrap();
        let mut committed: BTreeMap<CasKey, Bytes> = BTreeMap::new();
        let mut synced: BTreeMap<CasKey, Bytes> = BTreeMap::new();
        let ops = rng.random_range(5..80);
        for i in 0..ops {
            let len = if rng.random_bool(0.8) {
                rng.random_range(1..20_000)
            } else {
                rng.random_range(60_000..400_000)
            };
            let (k, d) = blob(seed * 1000 + i, len);
            block_on(put_all(&store, &k, d.clone())).unwrap();
            committed.insert(k, d);
            if rng.random_bool(0.15) {
                store.engine().sync().unwrap();
                synced = committed.clone();
            }
        }
        // The cut: threads stop, unsynced writes are lost, kept or torn.
        store.engine().halt();
        let (data, index) = (Arc::new(data.power_cut(seed)), Arc::new(index.power_cut(seed + 7)));
        let store = faulty_cas(data, index).unwrap();
        for (k, d) in &synced {
            assert_eq!(read(&store, k).as_ref().ok(), Some(d), "seed {seed}: a synced blob was lost");
        }
        for (k, d) in &committed {
            if let Ok(got) = read(&store, k) {
                assert_eq!(got, *d, "seed {seed}: wrong bytes served");
            }
        }
        // And it keeps working.
        let (k, d) = blob(seed + 77_777, 123_456);
        block_on(put_all(&store, &k, d.clone())).unwrap();
        assert_eq!(read(&store, &k).unwrap(), d);
    }
}

#[test]
fn a_damaged_index_loses_entries_never_bytes() {
    let (data, index) = faulty_devices(3);
    let store = faulty_cas(data.clone(), index.clone()).unwrap();
    let blobs: Vec<_> = (0..300).map(|i| blob(i, 3000)).collect();
    for (k, d) in &blobs {
        block_on(put_all(&store, k, d.clone())).unwrap();
    }
    store.engine().close().unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    // Flips in the region the entries live in (300 slots of 32 bytes after
    // the two superblocks): some entries keep their checksums, some not.
    for _ in 0..40 {
        let at: u64 = rng.random_range(8192..8192 + 300 * 32);
        index.corrupt(at, 1 << rng.random_range(0..8));
    }
    for _ in 0..50 {
        let at = rng.random_range(0..data.len());
        data.corrupt(at, 1 << rng.random_range(0..8));
    }
    let store = faulty_cas(Arc::new(data.restart(1)), Arc::new(index.restart(2))).unwrap();
    let mut served = 0;
    for (k, d) in &blobs {
        match read(&store, k) {
            Ok(got) => {
                assert_eq!(got, *d, "wrong bytes after corruption");
                served += 1;
            }
            Err(e) => assert!(matches!(e.code(), Code::NotFound | Code::DataLoss), "{e}"),
        }
    }
    assert!(served > 0, "nothing survived the flipped bytes");
}

#[test]
fn the_action_cache_keeps_values_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let key = |n: u8| AcKey::new("main", DigestFunction::Sha256.compute(&[n]));
    {
        let ac = BlockAc::new(Engine::open(&config(dir.path(), Kind::Ac, IoMode::Auto)).unwrap());
        for n in 0..20u8 {
            block_on(ac.put(&key(n), Bytes::from(vec![n; 100 + usize::from(n) * 10_000]))).unwrap();
        }
        block_on(ac.put(&key(3), Bytes::from_static(b"replaced"))).unwrap();
        ac.engine().close().unwrap();
    }
    let ac = BlockAc::new(Engine::open(&config(dir.path(), Kind::Ac, IoMode::Pread)).unwrap());
    for n in 0..20u8 {
        let got = block_on(ac.get(&key(n))).unwrap();
        if n == 3 {
            assert_eq!(got, Bytes::from_static(b"replaced"));
        } else {
            assert_eq!(got, vec![n; 100 + usize::from(n) * 10_000]);
        }
    }
    assert!(block_on(ac.get(&AcKey::new("other", key(1).action))).unwrap_err().is_not_found());
}
