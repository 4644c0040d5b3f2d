//! Rebuilding a lost index from the ring: every record describes itself
//! (key fingerprint, size, its own position) and carries a tag keyed by
//! the store's id, so a scan of the data device finds every committed
//! record without trusting bytes a client uploaded.
//!
//! The scan reads the ring in order, a window at a time (bounded memory:
//! the window and one entry per record found). At each 8-byte position it
//! looks for a header that is whole, tagged under the store's key, of this
//! store, placed where its own position says, and not crossing the
//! device's end; then it checks every chunk of the record's data against
//! its checksum and steps over the record. Anything else is stepped over 8
//! bytes at a time. The newest record's end is the head; what lies more
//! than a ring behind it is gone; of two records of one key the newer
//! wins. A fresh index of what was found is written, and the store opens
//! as after any restart. Progress goes to the log.

use std::collections::HashMap;
use std::time::Instant;

use kiln_proto::{Error, Result};

use super::device::BlockDevice;
use super::engine::Devices;
use super::format::{
    CRC_CHUNK_BYTES, DataHeader, Fingerprint, Kind, LAYOUT_LOGGED, PAGE_BYTES, RECORD_HEADER_BYTES,
    REGION_START, RecordHeader, RecordKey, Slot, Superblock, crc_chunks, crc_offset, record_key, record_len,
};
use super::indexfile::{fill_index, write_checkpoint};
use super::worker::check_chunks;

/// Bytes of the ring read at once.
const WINDOW_BYTES: u64 = 4 << 20;

fn io(what: &str, dev: &dyn BlockDevice, e: &std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", dev.describe()))
}

/// Scans the ring of the store on `devices` and writes a new index of
/// `slots` slots naming every intact record it holds.
pub fn rebuild(kind: Kind, devices: &Devices, capacity: u64, slots: u64) -> Result<()> {
    let started = Instant::now();
    let data = &*devices.data;
    let mut page = vec![0u8; usize::try_from(PAGE_BYTES).unwrap_or(4096)];
    data.read_at(&mut page, 0).map_err(|e| io("read the data header of", data, &e))?;
    let header = DataHeader::decode(&page)?.ok_or_else(|| Error::internal("the data header vanished"))?;
    tracing::warn!(
        store = kind.name(),
        data = data.describe(),
        index = devices.index.describe(),
        "no index describes this store; rebuilding it by scanning the ring (the store opens when done)"
    );
    let key = record_key(&header.store_id);
    let found = scan(kind, data, capacity, &key)?;
    let head = found.values().map(|(logical, size)| logical + record_len(*size)).max().unwrap_or(0);
    let tail = head.saturating_sub(capacity).next_multiple_of(header.block_bytes).min(head);
    let seed: u64 = rand::random();
    let entries =
        found.into_iter().map(|(fp, (logical, size))| Slot { fingerprint: fp.0, logical, size }).collect();
    let (partitions, tail, kept) = fill_index(entries, slots, tail, header.block_bytes);
    let tail = tail.min(head);
    let sb = Superblock {
        kind,
        fingerprints: header.fingerprints,
        store_id: header.store_id,
        seed,
        capacity,
        block_bytes: header.block_bytes,
        slots,
        layout: LAYOUT_LOGGED,
        sequence: 0,
        copy: 0,
        tail,
        head,
        region: REGION_START,
        checkpoint_bytes: 0,
        log_bytes: 0,
    };
    write_checkpoint(&*devices.index, &partitions, &sb, REGION_START)
        .map_err(|e| io("write the rebuilt index to", &*devices.index, &e))?;
    tracing::warn!(
        store = kind.name(),
        entries = kept,
        tail,
        head,
        seconds = started.elapsed().as_secs_f64(),
        "index rebuilt from the ring"
    );
    Ok(())
}

/// Every intact, tagged record of the ring: the newest position and size
/// per key.
fn scan(
    kind: Kind,
    data: &dyn BlockDevice,
    capacity: u64,
    key: &RecordKey,
) -> Result<HashMap<Fingerprint, (u64, u64)>> {
    let mut found: HashMap<Fingerprint, (u64, u64)> = HashMap::new();
    let mut window = vec![0u8; usize::try_from(WINDOW_BYTES).unwrap_or(0)];
    let (mut window_at, mut window_len) = (0u64, 0u64);
    let mut x = 0u64;
    let mut reported = 0u64;
    while x + RECORD_HEADER_BYTES <= capacity {
        if x + RECORD_HEADER_BYTES > window_at + window_len {
            window_at = x;
            window_len = WINDOW_BYTES.min(capacity - x);
            let buf = &mut window[..usize::try_from(window_len).unwrap_or(0)];
            data.read_at(buf, PAGE_BYTES + x).map_err(|e| io("scan", data, &e))?;
        }
        if x * 16 / capacity > reported {
            reported = x * 16 / capacity;
            tracing::info!(percent = reported * 100 / 16, records = found.len(), "rebuilding the index");
        }
        let at = usize::try_from(x - window_at).unwrap_or(0);
        let bytes = &window[at..at + 64];
        let record = (bytes[..4] == *b"KLNR")
            .then(|| RecordHeader::parse_tagged(bytes, key))
            .flatten()
            .filter(|h| h.kind == kind && h.logical % capacity == x && x + record_len(h.size) <= capacity);
        match record {
            Some(h) if intact(data, x, h.size) => {
                let newer = found.get(&h.fingerprint).is_none_or(|(l, _)| *l < h.logical);
                if newer {
                    found.insert(h.fingerprint, (h.logical, h.size));
                }
                x += record_len(h.size);
            }
            _ => x += 8,
        }
    }
    Ok(found)
}

/// Whether every chunk of the record at ring offset `x` matches its
/// checksum (read a megabyte at a time).
fn intact(data: &dyn BlockDevice, x: u64, size: u64) -> bool {
    let step = 16 * CRC_CHUNK_BYTES;
    let mut crcs = vec![0u8; usize::try_from(4 * crc_chunks(size)).unwrap_or(0)];
    if data.read_at(&mut crcs, PAGE_BYTES + x + crc_offset(size, 0)).is_err() {
        return false;
    }
    let mut from = 0u64;
    let mut buf = Vec::new();
    while from < size {
        let n = step.min(size - from);
        buf.resize(usize::try_from(n).unwrap_or(0), 0);
        if data.read_at(&mut buf, PAGE_BYTES + x + RECORD_HEADER_BYTES + from).is_err() {
            return false;
        }
        let first = usize::try_from(4 * (from / CRC_CHUNK_BYTES)).unwrap_or(usize::MAX);
        if check_chunks(&buf, crcs.get(first..).unwrap_or_default()).is_err() {
            return false;
        }
        from += n;
    }
    true
}
