//! The index file: two superblocks, and the region the newer valid one
//! names, which holds a checkpoint of every live entry followed by a log
//! of the changes since (entries put in, tombstones), all 32-byte slots
//! (see `syncer.rs` for how they are written, docs/storage-format.md for
//! the bytes). Loading reads the checkpoint and replays the log into
//! tables sized for what they hold, so a restart reads about as many
//! bytes as the store holds entries, whatever the slots it was allotted.
//!
//! Indexes of the older page-table layouts are read once and rewritten as
//! a checkpoint past their pages, then a superblock naming it is written
//! over the older of the two: a crash at any point leaves one whole index.

use kiln_proto::limits::{
    BLOCK_INDEX_GROWTH_MAX as GROWTH_MAX, BLOCK_PARTITIONS_MAX as PARTITIONS_MAX,
    BLOCK_PERSIST_BYTES_MAX as PERSIST_BYTES_MAX,
};

use kiln_proto::{Error, Result};

use super::device::BlockDevice;
use super::engine::Devices;
use super::format::{
    DataHeader, Fingerprint, IndexLayout, Kind, LAYOUT_LOGGED, PAGE_BYTES, REGION_START, SLOT_BYTES, Slot,
    Superblock, TOMBSTONE_SIZE, page_crc, record_len,
};
use super::index::Partition;
use super::worker::partition_of;

/// What loading found on disk.
#[derive(Debug)]
pub struct Loaded {
    pub superblock: Superblock,
    pub partitions: Vec<Partition>,
}

fn internal(what: &str, dev: &dyn BlockDevice, e: &std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", dev.describe()))
}

/// Empty tables for `slots` slots in all: up to [`PARTITIONS_MAX`]
/// partitions of at least 1,024 slots, each allowed to grow to
/// [`GROWTH_MAX`] times its share.
pub fn new_partitions(slots: u64) -> Vec<Partition> {
    let count = (slots / 1024).clamp(1, PARTITIONS_MAX);
    let per = usize::try_from(slots.div_ceil(count)).unwrap_or(usize::MAX);
    let max = per.saturating_mul(usize::try_from(GROWTH_MAX).unwrap_or(16));
    (0..count).map(|_| Partition::new(per, max)).collect()
}

/// Whether `sb` can name the store whose data header is `header`, with a
/// region inside `index`.
fn plausible(sb: &Superblock, header: &DataHeader, kind: Kind, index_len: u64) -> bool {
    let region_ok = if sb.layout == LAYOUT_LOGGED {
        sb.region >= REGION_START
            && sb.checkpoint_bytes.is_multiple_of(SLOT_BYTES)
            && sb.log_bytes.is_multiple_of(SLOT_BYTES)
            && sb.region.checked_add(sb.checkpoint_bytes).and_then(|x| x.checked_add(sb.log_bytes))
                <= Some(index_len)
    } else {
        IndexLayout::new(sb.slots).file_bytes() <= index_len
    };
    sb.store_id == header.store_id
        && sb.fingerprints == header.fingerprints
        && sb.kind == kind
        && sb.capacity == header.capacity
        && sb.block_bytes == header.block_bytes
        && sb.tail <= sb.head
        && sb.head - sb.tail <= header.capacity
        && region_ok
}

/// Reads the index of the store on `devices`, which `plan` found valid,
/// into tables allotted `slots` slots; `None` if no superblock describes
/// the store (the index was lost, damaged, or is another store's): then
/// it is rebuilt from the ring.
pub fn load(kind: Kind, devices: &Devices, slots: u64) -> Result<Option<Loaded>> {
    let index = &*devices.index;
    let mut page = vec![0u8; usize::try_from(PAGE_BYTES).unwrap_or(4096)];
    devices
        .data
        .read_at(&mut page, 0)
        .map_err(|e| internal("read the data header of", &*devices.data, &e))?;
    let header = DataHeader::decode(&page)?
        .ok_or_else(|| Error::internal("the data header vanished while the store was opened"))?;
    let mut best: Option<Superblock> = None;
    for copy in 0..2u8 {
        let at = IndexLayout::superblock_offset(copy);
        if at + PAGE_BYTES > index.len() {
            continue;
        }
        index.read_at(&mut page, at).map_err(|e| internal("read", index, &e))?;
        if let Some(sb) = Superblock::decode(&page)
            && plausible(&sb, &header, kind, index.len())
            && best.is_none_or(|b| sb.sequence > b.sequence)
        {
            best = Some(sb);
        }
    }
    let Some(sb) = best else { return Ok(None) };
    let live = |s: &Slot| s.logical >= sb.tail && s.logical + record_len(s.size) <= sb.head;
    let mut partitions = new_partitions(slots);
    let count = u32::try_from(partitions.len()).unwrap_or(1);
    if sb.layout != LAYOUT_LOGGED {
        let entries: Vec<Slot> = load_pages(index, &sb)?.into_iter().filter(|s| live(s)).collect();
        let (partitions, tail, entries) = fill_index(entries, slots, sb.tail, sb.block_bytes);
        let next = Superblock { tail: tail.min(sb.head), ..sb };
        let region = IndexLayout::new(sb.slots).file_bytes().next_multiple_of(PAGE_BYTES);
        let next = write_checkpoint(index, &partitions, &next, region)
            .map_err(|e| internal("rewrite the index", index, &e))?;
        tracing::info!(index = index.describe(), entries, "the index was rewritten in the logged layout");
        return Ok(Some(Loaded { superblock: next, partitions }));
    }
    let mut bad = 0u64;
    let end = sb.region + sb.checkpoint_bytes + sb.log_bytes;
    let mut buf = vec![0u8; 4 * PERSIST_BYTES_MAX];
    // Threads replay disjoint runs of partitions, each in the file's order.
    let threads = std::thread::available_parallelism().map_or(1, usize::from).clamp(1, 8);
    let per_thread = partitions.len().div_ceil(threads);
    let mut at = sb.region;
    while at < end {
        let n = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(0);
        index.read_at(&mut buf[..n], at).map_err(|e| internal("read the index", index, &e))?;
        let bytes = &buf[..n];
        let sb = &sb;
        bad += std::thread::scope(|scope| {
            let runs: Vec<_> = partitions
                .chunks_mut(per_thread)
                .enumerate()
                .map(|(i, run)| scope.spawn(move || replay(bytes, run, i * per_thread, count, sb)))
                .collect();
            runs.into_iter().map(|r| r.join().unwrap_or(0)).sum::<u64>()
        });
        at += n as u64;
    }
    if bad > 0 {
        tracing::error!(
            bad,
            index = index.describe(),
            "index entries failed their checksums; they are dropped"
        );
    }
    // The entries are counted as the engine registers them with the ring.
    Ok(Some(Loaded { superblock: sb, partitions }))
}

/// Applies the slots in `bytes` that belong to partitions `first..` (the
/// run `partitions`) of `count`, in order: an entry replaces its key's
/// entry, a tombstone removes it. Returns how many slots failed their
/// checksum.
fn replay(bytes: &[u8], partitions: &mut [Partition], first: usize, count: u32, sb: &Superblock) -> u64 {
    let live = |s: &Slot| s.logical >= sb.tail && s.logical + record_len(s.size) <= sb.head;
    let mut bad = 0;
    for raw in bytes.chunks_exact(usize::try_from(SLOT_BYTES).unwrap_or(32)) {
        let mut fp = Fingerprint([0; 16]);
        fp.0.copy_from_slice(&raw[..16]);
        let Some(part) =
            (partition_of(&fp, count) as usize).checked_sub(first).and_then(|p| partitions.get_mut(p))
        else {
            continue;
        };
        let Some(slot) = Slot::decode(raw, sb.seed) else {
            bad += 1;
            continue;
        };
        if slot.size == TOMBSTONE_SIZE {
            part.remove(&fp, slot.logical);
        } else if live(&slot) {
            part.insert(slot, live);
        }
    }
    bad
}

/// Every entry of a page-table index, from the copy `sb` vouches for
/// (pages failing their checksums are dropped).
fn load_pages(index: &dyn BlockDevice, sb: &Superblock) -> Result<Vec<Slot>> {
    let layout = IndexLayout::new(sb.slots);
    let copy = sb.copy.min(1);
    let mut table = vec![0u8; usize::try_from(layout.crc_table_bytes).unwrap_or(0)];
    index.read_at(&mut table, layout.crc_table_offset(copy)).map_err(|e| internal("read", index, &e))?;
    let mut entries = Vec::new();
    let mut bad_pages = 0u64;
    let run = 256u64;
    let mut buf = vec![0u8; usize::try_from(run * PAGE_BYTES).unwrap_or(0)];
    let mut first = 0u64;
    while first < layout.pages {
        let n = run.min(layout.pages - first);
        let bytes = &mut buf[..usize::try_from(n * PAGE_BYTES).unwrap_or(0)];
        index.read_at(bytes, layout.page_offset(copy, first)).map_err(|e| internal("read", index, &e))?;
        for (i, page) in bytes.chunks_exact(usize::try_from(PAGE_BYTES).unwrap_or(4096)).enumerate() {
            let at = usize::try_from((first + i as u64) * 4).unwrap_or(0);
            if table.get(at..at + 4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                != Some(page_crc(page))
            {
                bad_pages += 1;
                continue;
            }
            let slot_bytes = usize::try_from(SLOT_BYTES).unwrap_or(32);
            entries.extend(page.chunks_exact(slot_bytes).filter_map(|raw| Slot::decode(raw, sb.seed)));
        }
        first += n;
    }
    if bad_pages > 0 {
        tracing::error!(
            bad_pages,
            index = index.describe(),
            "index pages failed their checksums; their entries are dropped"
        );
    }
    Ok(entries)
}

/// Tables allotted `slots` slots holding `entries` (live records), newest
/// first; if they reach their bound, the oldest are evicted (the tail
/// moves past them, whole blocks), never a newer one dropped. Returns the
/// partitions, the tail, and how many entries they hold.
pub fn fill_index(
    mut entries: Vec<Slot>,
    slots: u64,
    mut tail: u64,
    block_bytes: u64,
) -> (Vec<Partition>, u64, u64) {
    let mut partitions = new_partitions(slots);
    let count = u32::try_from(partitions.len()).unwrap_or(1);
    entries.sort_unstable_by_key(|s| std::cmp::Reverse(s.logical));
    let mut kept = 0u64;
    for slot in entries {
        if slot.logical < tail {
            break;
        }
        let fp = Fingerprint(slot.fingerprint);
        if partitions[partition_of(&fp, count) as usize].try_insert(slot, |_| true).is_err() {
            tail = (slot.logical + record_len(slot.size)).next_multiple_of(block_bytes);
            tracing::warn!(tail, "the index reached its bound: the oldest records are evicted");
            break;
        }
        kept += 1;
    }
    (partitions, tail, kept)
}

/// Writes every live entry of `partitions` as a checkpoint at `region`,
/// then a superblock naming it (`sb` with the next sequence, over the
/// older superblock), syncing after each; returns that superblock.
pub fn write_checkpoint(
    index: &dyn BlockDevice,
    partitions: &[Partition],
    sb: &Superblock,
    region: u64,
) -> std::io::Result<Superblock> {
    let live = |s: &Slot| s.logical >= sb.tail && s.logical + record_len(s.size) <= sb.head;
    let mut at = region;
    let mut out = Vec::new();
    let flush = |out: &mut Vec<u8>, at: &mut u64| -> std::io::Result<()> {
        index.grow((*at + out.len() as u64).next_multiple_of(PAGE_BYTES))?;
        index.write_at(out, *at)?;
        *at += out.len() as u64;
        out.clear();
        Ok(())
    };
    for p in partitions {
        p.encode_live(sb.seed, live, |_| false, &mut out);
        if out.len() >= PERSIST_BYTES_MAX {
            flush(&mut out, &mut at)?;
        }
    }
    flush(&mut out, &mut at)?;
    index.sync()?;
    let sequence = sb.sequence + 1;
    let copy = u8::try_from(sequence % 2).unwrap_or(0);
    let next = Superblock {
        sequence,
        copy,
        layout: LAYOUT_LOGGED,
        region,
        checkpoint_bytes: at - region,
        log_bytes: 0,
        ..*sb
    };
    index.write_at(&next.encode(), IndexLayout::superblock_offset(copy))?;
    index.sync()?;
    Ok(next)
}
