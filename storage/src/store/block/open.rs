//! What opening a store finds on its devices, and what it may do about it.
//!
//! A store's geometry (ring capacity, block size) is fixed when it is
//! formatted and read back from its own data header at every start: the
//! configuration only sizes a *new* store. Nothing here ever starts an
//! empty store in place of one it cannot read: a damaged header is
//! repaired from the index's superblock where one vouches for it; a
//! truncated file, a foreign file, a size or block size that the
//! configuration now contradicts, and an index that cannot be read are
//! refused with a message that says what to do. Destroying a store takes
//! the explicit `reformat` flag (`kiln serve --reformat-stores`).

use std::path::Path;
use std::sync::Arc;

use kiln_proto::{Code, Error, Result};

use super::device::{BlockDevice, FileDevice};
use super::engine::{BlockConfig, Devices, geometry, index_file_bytes};
use super::format::{DataHeader, IndexLayout, PAGE_BYTES, Superblock};

/// What the first page of a data device holds.
#[derive(Debug)]
pub enum Found {
    /// Nothing yet (zeros, or an empty file): a new store.
    New,
    /// Bytes that are not a Kiln store.
    Foreign,
    /// A Kiln header that fails its checks.
    Damaged(String),
    Store(DataHeader),
}

/// What to open: the ring's geometry, and whether to format it first.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub capacity: u64,
    pub block_bytes: u64,
    pub format: bool,
}

/// How an operator destroys a store on purpose.
pub const REFORMAT_HINT: &str =
    "start once with `kiln serve --reformat-stores` to discard it and start empty";

fn refused(what: String) -> Error {
    Error::new(Code::FailedPrecondition, what)
}

fn internal(what: &str, dev: &str, e: &std::io::Error) -> Error {
    Error::internal(format!("{what} {dev}: {e}"))
}

fn foreign(config: &BlockConfig, name: &str) -> Error {
    refused(format!(
        "{name} holds data that is not a Kiln {}; point the store elsewhere, or {REFORMAT_HINT}",
        config.kind.name()
    ))
}

/// Reads and classifies the data header. Bytes that are not a Kiln store
/// count as a new device where the operator allowed formatting one
/// (`format_device`, which says it destroys what is there).
pub fn read_header(config: &BlockConfig, data: &dyn BlockDevice) -> Result<Found> {
    Ok(match classify(data)? {
        Found::Foreign if config.format_device => Found::New,
        found => found,
    })
}

fn classify(data: &dyn BlockDevice) -> Result<Found> {
    if data.len() < PAGE_BYTES {
        let mut head = vec![0u8; usize::try_from(data.len()).unwrap_or(0)];
        data.read_at(&mut head, 0).map_err(|e| internal("read", &data.describe(), &e))?;
        return Ok(if head.iter().all(|b| *b == 0) { Found::New } else { Found::Foreign });
    }
    let mut page = vec![0u8; usize::try_from(PAGE_BYTES).unwrap_or(4096)];
    data.read_at(&mut page, 0).map_err(|e| internal("read the data header of", &data.describe(), &e))?;
    Ok(match DataHeader::decode(&page) {
        Ok(Some(h)) => Found::Store(h),
        Ok(None) if page.iter().all(|b| *b == 0) => Found::New,
        Ok(None) => Found::Foreign,
        Err(e) => Found::Damaged(e.message().to_owned()),
    })
}

/// The newest superblock of `index` that checks out, whatever it names.
pub fn best_superblock(index: &dyn BlockDevice) -> Option<Superblock> {
    let mut page = vec![0u8; usize::try_from(PAGE_BYTES).unwrap_or(4096)];
    let mut best: Option<Superblock> = None;
    for copy in 0..2u8 {
        let at = IndexLayout::superblock_offset(copy);
        if at + PAGE_BYTES > index.len() || index.read_at(&mut page, at).is_err() {
            continue;
        }
        if let Some(sb) = Superblock::decode(&page)
            && best.is_none_or(|b| sb.sequence > b.sequence)
        {
            best = Some(sb);
        }
    }
    best
}

/// Decides the geometry to open `devices` with, repairing a damaged data
/// header from a superblock that vouches for it.
pub fn plan(config: &BlockConfig, found: &Found, devices: &Devices) -> Result<Plan> {
    let data = &devices.data;
    let name = data.describe();
    if config.reformat {
        let (capacity, block_bytes) = geometry(data.len(), config.block_bytes)?;
        if !matches!(found, Found::New) {
            tracing::warn!(data = %name, "reformatting the store as asked: every blob it held is discarded");
        }
        return Ok(Plan { capacity, block_bytes, format: true });
    }
    let header = match found {
        Found::New => {
            let (capacity, block_bytes) = geometry(data.len(), config.block_bytes)?;
            return Ok(Plan { capacity, block_bytes, format: true });
        }
        Found::Foreign => return Err(foreign(config, &name)),
        Found::Damaged(why) => repair_header(config, devices, why)?,
        Found::Store(h) => *h,
    };
    if header.kind != config.kind {
        return Err(refused(format!(
            "{name} holds a Kiln {}, not a {}: the paths of the two stores are swapped",
            header.kind.name(),
            config.kind.name()
        )));
    }
    if data.len() < PAGE_BYTES + header.capacity {
        return Err(refused(format!(
            "{name} has {} bytes but its store needs {}: it was truncated or copied in part; restore the whole file, or {REFORMAT_HINT}",
            data.len(),
            PAGE_BYTES + header.capacity
        )));
    }
    if config.block_bytes != 0 && config.block_bytes != header.block_bytes {
        return Err(refused(format!(
            "{name} was formatted with blocks of {} bytes, but [storage] block_bytes is {}; set it back (or to 0), or {REFORMAT_HINT}",
            header.block_bytes, config.block_bytes
        )));
    }
    if config.size_configured {
        let (capacity, _) = geometry(config.size_bytes, header.block_bytes)?;
        if capacity != header.capacity {
            return Err(refused(format!(
                "{name} holds a store of {} bytes, but its size is configured as {} bytes; a store keeps the size it was formatted with: set the size back (or to 0, automatic), or {REFORMAT_HINT}",
                PAGE_BYTES + header.capacity,
                config.size_bytes
            )));
        }
    }
    Ok(Plan { capacity: header.capacity, block_bytes: header.block_bytes, format: false })
}

/// A damaged data header is rewritten from the newest superblock, which
/// records the same store id and geometry; without one it is refused.
fn repair_header(config: &BlockConfig, devices: &Devices, why: &str) -> Result<DataHeader> {
    let name = devices.data.describe();
    let Some(sb) = best_superblock(&*devices.index).filter(|sb| sb.kind == config.kind) else {
        return Err(refused(format!(
            "the data header of {name} is damaged ({why}) and no index superblock describes the store; restore the files, or {REFORMAT_HINT}"
        )));
    };
    let header = DataHeader {
        kind: sb.kind,
        fingerprints: sb.fingerprints,
        store_id: sb.store_id,
        capacity: sb.capacity,
        block_bytes: sb.block_bytes,
    };
    if devices.data.len() < PAGE_BYTES + header.capacity {
        return Err(refused(format!(
            "the data header of {name} is damaged ({why}) and the file is shorter than the store its index describes; restore the files, or {REFORMAT_HINT}"
        )));
    }
    devices
        .data
        .write_at(&header.encode(), 0)
        .and_then(|()| devices.data.sync())
        .map_err(|e| internal("repair the data header of", &name, &e))?;
    tracing::warn!(data = %name, why, "the data header was damaged; rewritten from the index superblock");
    Ok(header)
}

/// Opens a store's files, locked, and checks them against what they hold:
/// a new data file is created and allocated at the configured size; an
/// existing one keeps its own size, and its holes (a sparse copy) are
/// allocated. The index file grows with what it holds; one of an older
/// layout is rewritten when loaded.
pub fn open_files(config: &BlockConfig) -> Result<Devices> {
    let locked = |path: &Path| {
        FileDevice::open_locked(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::ResourceBusy {
                refused(e.to_string())
            } else {
                internal("open", &path.display().to_string(), &e)
            }
        })
    };
    let mut data = locked(&config.data_path)?;
    let name = config.data_path.display().to_string();
    let found = read_header(config, &data)?;
    if data.block_device() {
        if matches!(found, Found::New | Found::Foreign) && !config.format_device && !config.reformat {
            return Err(refused(format!(
                "block device {name} holds no Kiln store; set [storage] format_device = true to format it (this destroys its contents)"
            )));
        }
    } else if matches!(found, Found::New) || config.reformat {
        data.allocate(config.size_bytes).map_err(|e| internal("allocate", &name, &e))?;
        data.limit(config.size_bytes);
    } else if let Found::Store(h) = &found {
        let needed = PAGE_BYTES + h.capacity;
        let allocated = data.allocated_bytes().map_err(|e| internal("inspect", &name, &e))?;
        if data.len() >= needed && allocated < data.len() {
            tracing::warn!(
                data = %name,
                allocated,
                needed,
                "the data file is sparse (copied without its holes?); allocating them so writes cannot find the disk full"
            );
            let len = data.len();
            data.allocate(len).map_err(|e| internal("allocate", &name, &e))?;
        }
    }
    let data: Arc<dyn BlockDevice> = Arc::new(data);
    let mut index = locked(&config.index_path)?;
    let geometry_now = match &found {
        _ if config.reformat => geometry(data.len(), config.block_bytes)?,
        Found::Store(h) => (h.capacity, h.block_bytes),
        Found::Damaged(_) => match best_superblock(&index) {
            Some(sb) => (sb.capacity, sb.block_bytes),
            None => geometry(data.len(), config.block_bytes)?,
        },
        Found::Foreign => return Err(foreign(config, &name)),
        Found::New => geometry(data.len(), config.block_bytes)?,
    };
    let needed = index_file_bytes(PAGE_BYTES + geometry_now.0, geometry_now.1, config.expected_blob_bytes)?;
    index
        .allocate(needed.max(index.len()))
        .map_err(|e| internal("allocate", &config.index_path.display().to_string(), &e))?;
    Ok(Devices { data, index: Arc::new(index) })
}
