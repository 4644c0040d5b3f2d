//! Opening a store that exists: it keeps its geometry whatever the
//! configuration now says, it is never replaced by an empty one, and only
//! one process holds it.

#![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

use std::path::Path;

use futures::executor::block_on;
use kiln_proto::Code;

use super::tests_promises::{SIZE, blob, config};
use super::*;
use crate::store::{put_all, read_all};

fn fill(dir: &Path, n: u64) -> Vec<(CasKey, Bytes)> {
    let store = BlockCas::new(Engine::open(&config(dir, Kind::Cas)).unwrap());
    let blobs: Vec<_> = (0..n).map(|i| blob(i, 500 + 37 * i as usize)).collect();
    for (k, d) in &blobs {
        block_on(put_all(&store, k, d.clone())).unwrap();
    }
    store.engine().close().unwrap();
    blobs
}

fn all_present(cfg: &BlockConfig, blobs: &[(CasKey, Bytes)]) -> BlockCas {
    let store = BlockCas::new(Engine::open(cfg).unwrap());
    for (k, d) in blobs {
        assert_eq!(block_on(read_all(&store, k, u64::MAX)).unwrap(), *d);
    }
    store
}

fn refused(cfg: &BlockConfig, needle: &str) {
    let err = Engine::open(cfg).unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains(needle), "{}", err.message());
}

/// The automatic size is recomputed from the free space at every start:
/// an existing store ignores it and keeps its own.
#[test]
fn a_store_keeps_its_size_whatever_the_automatic_size_says() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = fill(dir.path(), 50);
    for size in [16 << 20, 6 << 20] {
        let cfg = BlockConfig { size_bytes: size, size_configured: false, ..config(dir.path(), Kind::Cas) };
        let store = all_present(&cfg, &blobs);
        assert_eq!(store.engine().ring.capacity(), (8 << 20) - (256 << 10), "its own size");
        store.engine().close().unwrap();
    }
}

/// A configured size or block size that contradicts the store is refused
/// with what to do, and the store is untouched; only `reformat` discards it.
#[test]
fn a_contradicting_size_is_refused_and_only_reformat_discards() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = fill(dir.path(), 20);
    let base = config(dir.path(), Kind::Cas);
    refused(&BlockConfig { size_bytes: 16 << 20, ..base.clone() }, "keeps the size it was formatted with");
    refused(&BlockConfig { block_bytes: 512 << 10, ..base.clone() }, "blocks of 262144 bytes");
    refused(&config(dir.path(), Kind::Ac).clone_with_paths(&base), "not a action cache");
    all_present(&base, &blobs).engine().close().unwrap();
    let bigger = BlockConfig { size_bytes: 16 << 20, reformat: true, ..base.clone() };
    let store = BlockCas::new(Engine::open(&bigger).unwrap());
    assert_eq!(store.engine().entries(), 0);
    assert!(store.engine().ring.capacity() > 15 << 20);
}

/// Lowering `expected_blob_bytes` re-sizes the index and keeps every
/// entry, across the resize and the restarts after it.
#[test]
fn resizing_the_index_keeps_every_blob() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = fill(dir.path(), 300);
    for (i, expected) in [512, 512, 16 << 10].into_iter().enumerate() {
        let cfg = BlockConfig { expected_blob_bytes: expected, ..config(dir.path(), Kind::Cas) };
        let store = all_present(&cfg, &blobs);
        assert_eq!(store.engine().entries(), 300 + i);
        let (k, d) = blob(10_000 + i as u64, 3000);
        block_on(put_all(&store, &k, d)).unwrap();
        store.engine().close().unwrap();
        assert!(!dir.path().join("Cas.index.resizing").exists());
    }
}

/// Every entry a logged index file names, replayed (for tests).
fn logged_entries(index: &[u8]) -> (format::Superblock, Vec<format::Slot>) {
    let sb = (0..2u64)
        .filter_map(|c| format::Superblock::decode(&index[(c * 4096) as usize..(c * 4096 + 4096) as usize]))
        .max_by_key(|s| s.sequence)
        .unwrap();
    assert_eq!(sb.layout, format::LAYOUT_LOGGED);
    let from = usize::try_from(sb.region).unwrap();
    let to = from + usize::try_from(sb.checkpoint_bytes + sb.log_bytes).unwrap();
    let mut map = std::collections::HashMap::new();
    for raw in index[from..to].chunks(32) {
        let slot = format::Slot::decode(raw, sb.seed).unwrap();
        if slot.size == format::TOMBSTONE_SIZE {
            map.remove(&slot.fingerprint);
        } else {
            map.insert(slot.fingerprint, slot);
        }
    }
    (sb, map.into_values().collect())
}

/// Indexes of the older page-table layouts (keys in 16 consecutive slots,
/// or in two buckets; one table copy per superblock, page checksums) are
/// read and rewritten in the logged layout when the store opens, keeping
/// every entry; a restart after that finds them all again.
#[test]
fn an_index_of_an_older_layout_is_rewritten_keeping_every_blob() {
    for layout in [format::LAYOUT_PAGES_LINEAR, format::LAYOUT_PAGES_TWO_BUCKETS] {
        let dir = tempfile::tempdir().unwrap();
        let blobs = fill(dir.path(), 300);
        let base = config(dir.path(), Kind::Cas);
        let (sb, entries) = logged_entries(&std::fs::read(&base.index_path).unwrap());
        assert_eq!(entries.len(), 300);
        // The same entries as an older store wrote them: copy 1 in force.
        let slots = 4 * 128;
        let pages = format::IndexLayout::new(slots);
        let mut file = vec![0u8; usize::try_from(pages.file_bytes()).unwrap()];
        let mut crcs = vec![0u8; usize::try_from(pages.crc_table_bytes).unwrap()];
        for p in 0..pages.pages {
            let mut page = vec![0u8; 4096];
            for (i, e) in entries.iter().skip(usize::try_from(p).unwrap() * 128).take(128).enumerate() {
                e.encode(sb.seed, &mut page[i * 32..i * 32 + 32]);
            }
            let at = usize::try_from(pages.page_offset(1, p)).unwrap();
            file[at..at + 4096].copy_from_slice(&page);
            let c = usize::try_from(4 * p).unwrap();
            crcs[c..c + 4].copy_from_slice(&format::page_crc(&page).to_le_bytes());
        }
        let at = usize::try_from(pages.crc_table_offset(1)).unwrap();
        file[at..at + crcs.len()].copy_from_slice(&crcs);
        let older = format::Superblock {
            slots,
            layout,
            sequence: 7,
            copy: 1,
            region: 0,
            checkpoint_bytes: 0,
            log_bytes: 0,
            ..sb
        };
        file[4096..8192].copy_from_slice(&older.encode());
        std::fs::write(&base.index_path, &file).unwrap();
        {
            let store = all_present(&base, &blobs);
            assert_eq!(store.engine().entries(), 300);
            store.engine().close().unwrap();
        }
        let (now, entries) = logged_entries(&std::fs::read(&base.index_path).unwrap());
        assert!(now.sequence > 7 && entries.len() == 300, "{now:?}");
        all_present(&base, &blobs).engine().close().unwrap();
    }
}

/// A damaged data header is rewritten from the index superblock; with the
/// superblocks gone too, the store is refused, never replaced.
#[test]
fn a_damaged_header_is_repaired_or_refused_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = fill(dir.path(), 40);
    let base = config(dir.path(), Kind::Cas);
    let flip = |path: &Path, at: usize| {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at] ^= 0x20;
        std::fs::write(path, bytes).unwrap();
    };
    flip(&base.data_path, 35);
    all_present(&base, &blobs).engine().close().unwrap();
    flip(&base.data_path, 35);
    flip(&base.index_path, 70);
    flip(&base.index_path, 4096 + 70);
    refused(&base, "no index superblock describes the store");
    refused(&base, "no index superblock describes the store");
}

/// A lost index, or one whose superblocks are both damaged, is rebuilt by
/// scanning the ring: every blob is there again.
#[test]
fn a_lost_index_is_rebuilt_from_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = fill(dir.path(), 60);
    let base = config(dir.path(), Kind::Cas);
    std::fs::remove_file(&base.index_path).unwrap();
    let store = all_present(&base, &blobs);
    assert_eq!(store.engine().count_entries(), 60);
    store.engine().close().unwrap();
    drop(store);
    let mut index = std::fs::read(&base.index_path).unwrap();
    index[70] ^= 1;
    index[4096 + 70] ^= 1;
    std::fs::write(&base.index_path, index).unwrap();
    all_present(&base, &blobs).engine().close().unwrap();
}

/// Bytes a client uploaded cannot pass for a record in a rebuild, even
/// laid out as one with a right checksum inside a blob: headers carry a
/// tag keyed by the store's id, which no client knows.
#[test]
fn a_rebuild_believes_no_forged_record() {
    use crate::store::{BlobWriter, CasStore};
    let dir = tempfile::tempdir().unwrap();
    let base = config(dir.path(), Kind::Cas);
    let store = BlockCas::new(Engine::open(&base).unwrap());
    let (victim, _) = blob(7, 5000);
    // The carrier's record goes at the head of an empty ring: the forgery
    // sits at a known ring position inside it.
    let reserved = store.engine().ring.head();
    let at = reserved + 64 + 4096;
    let fake = Bytes::from(vec![0x5a; 5000]);
    let fp = store.engine().fingerprints.cas(&victim);
    let header = format::RecordHeader { kind: Kind::Cas, fingerprint: fp, size: 5000, logical: at };
    let mut forged = header.encode().to_vec();
    forged.extend_from_slice(&fake);
    forged.extend_from_slice(&format::chunk_crc(&fake).to_le_bytes());
    forged.resize(format::record_len(5000) as usize, 0);
    let mut content = vec![0u8; 4096];
    content.extend_from_slice(&forged);
    content.resize(200_000, 0);
    let carrier = CasKey::shared(kiln_proto::DigestFunction::Sha256.compute(&content));
    let mut writer = block_on(store.write(&carrier)).unwrap();
    block_on(writer.write(Bytes::copy_from_slice(&content[..4096]))).unwrap();
    block_on(writer.write(Bytes::copy_from_slice(&content[4096..]))).unwrap();
    block_on(writer.commit()).unwrap();
    assert_eq!(
        store.engine().ring.head(),
        reserved + format::record_len(200_000),
        "not where the test put it"
    );
    store.engine().close().unwrap();
    drop(store);
    // The carrier's own header torn: the scan looks inside it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&base.data_path).unwrap();
        assert!(reserved < SIZE / 2, "a fresh ring starts near its beginning");
        f.write_all_at(&[0xff; 8], format::PAGE_BYTES + reserved + 8).unwrap();
    }
    std::fs::remove_file(&base.index_path).unwrap();
    let store = BlockCas::new(Engine::open(&base).unwrap());
    assert_eq!(
        block_on(store.find_missing(&[victim.clone(), carrier.clone()])).unwrap(),
        vec![victim, carrier]
    );
}

/// A truncated data file is refused; a sparse copy of the right length is
/// allocated again and serves everything.
#[test]
fn truncated_files_are_refused_and_sparse_ones_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = fill(dir.path(), 30);
    let base = config(dir.path(), Kind::Cas);
    let bytes = std::fs::read(&base.data_path).unwrap();
    // A sparse copy: zero pages become holes.
    let sparse = dir.path().join("sparse");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(bytes.len() as u64).unwrap();
        for (i, page) in bytes.chunks(4096).enumerate() {
            if page.iter().any(|b| *b != 0) {
                f.write_all_at(page, i as u64 * 4096).unwrap();
            }
        }
    }
    let blocks = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
    assert!(blocks(&sparse) < bytes.len() as u64 / 2);
    std::fs::rename(&sparse, &base.data_path).unwrap();
    all_present(&base, &blobs).engine().close().unwrap();
    assert!(blocks(&base.data_path) >= bytes.len() as u64, "the holes were allocated");
    std::fs::OpenOptions::new().write(true).open(&base.data_path).unwrap().set_len(4 << 20).unwrap();
    refused(&base, "truncated");
    assert_eq!(std::fs::metadata(&base.data_path).unwrap().len(), 4 << 20, "left as it was");
}

/// Files that are not a Kiln store are refused and left alone.
#[test]
fn a_foreign_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base = config(dir.path(), Kind::Cas);
    std::fs::write(&base.data_path, b"precious data that is not a store").unwrap();
    refused(&base, "not a Kiln CAS");
    assert_eq!(std::fs::read(&base.data_path).unwrap(), b"precious data that is not a store");
}

/// A second opener of the same files (another process, or this one) is
/// refused, naming the holder.
#[test]
fn a_second_opener_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let base = config(dir.path(), Kind::Cas);
    let first = Engine::open(&base).unwrap();
    let other_index = BlockConfig { index_path: dir.path().join("other.index"), ..base.clone() };
    refused(&other_index, &format!("locked by process {}", std::process::id()));
    let other_data = BlockConfig { data_path: dir.path().join("other.data"), ..base.clone() };
    refused(&other_data, "two Kiln processes must not share a store file");
    first.close().unwrap();
    drop(first);
    Engine::open(&base).unwrap().close().unwrap();
}

impl BlockConfig {
    /// This configuration's kind on `other`'s files.
    fn clone_with_paths(&self, other: &BlockConfig) -> BlockConfig {
        BlockConfig {
            data_path: other.data_path.clone(),
            index_path: other.index_path.clone(),
            ..self.clone()
        }
    }
}
