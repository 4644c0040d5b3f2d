//! The `[storage]` section: which backend holds the CAS and the action
//! cache, where, and how large; and opening them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use kiln_storage::store::block::{BlockAc, BlockCas, BlockConfig, Engine, IoMode, Kind};
use kiln_storage::store::{MemoryAc, MemoryCas};
use serde::Deserialize;

/// Where blobs and action results live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// A ring of blocks on a preallocated file or a raw block device each.
    Block,
    /// Memory only: everything is gone at exit (tests, throwaway nodes).
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: Backend,
    /// CAS data: a file (created and fully allocated) or a block device.
    pub cas_path: Option<PathBuf>,
    /// The CAS index file.
    pub cas_index_path: Option<PathBuf>,
    /// Bytes of the CAS data file; 0: automatic (see README).
    pub cas_size_bytes: u64,
    pub ac_path: Option<PathBuf>,
    pub ac_index_path: Option<PathBuf>,
    /// Bytes of the action cache data file; 0: 1/32 of the CAS, 64 MiB to 4 GiB.
    pub ac_size_bytes: u64,
    /// Bytes per block of the ring; 0: automatic.
    pub block_bytes: u64,
    /// Average blob size the index is sized for (1.25 slots per blob that
    /// fills the store at this size).
    pub expected_blob_bytes: u64,
    /// Storage threads; 0: one per core.
    pub threads: usize,
    pub io: IoMode,
    /// Most time between syncs: what a power cut may lose.
    pub sync_interval_ms: u64,
    /// Bytes per second the background scrub re-reads and checks, per
    /// store; 0 turns it off.
    pub scrub_bytes_per_second: u64,
    /// Where CAS uploads in progress wait until complete; default
    /// `<data_dir>/staging`.
    pub upload_staging_dir: Option<PathBuf>,
    /// Most bytes of CAS uploads in progress (half per client); 0: half
    /// the CAS.
    pub upload_staging_bytes: u64,
    pub pin_threads: bool,
    /// Allow formatting a block device that holds no Kiln store.
    pub format_device: bool,
    /// Discard both stores and start empty (only from the command line:
    /// `kiln serve --reformat-stores`, never from a file that stays set).
    #[serde(skip)]
    pub reformat: bool,
    /// Memory backend: bytes for CAS blobs, and for action results.
    pub cas_memory_bytes: u64,
    pub ac_memory_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Block,
            cas_path: None,
            cas_index_path: None,
            cas_size_bytes: 0,
            ac_path: None,
            ac_index_path: None,
            ac_size_bytes: 0,
            block_bytes: 0,
            expected_blob_bytes: 16 << 10,
            threads: 0,
            io: IoMode::Auto,
            sync_interval_ms: 10_000,
            scrub_bytes_per_second: 16 << 20,
            upload_staging_dir: None,
            upload_staging_bytes: 0,
            pin_threads: true,
            format_device: false,
            reformat: false,
            cas_memory_bytes: 2 << 30,
            ac_memory_bytes: 64 << 20,
        }
    }
}

/// The default size of a new CAS: 8 GiB, or a quarter of the free space
/// when less than 32 GiB is free (at least 256 MiB). Only a new store is
/// sized so: an existing one keeps the size it was formatted with.
fn automatic_cas_size(data_dir: &Path) -> u64 {
    let free = nix::sys::statvfs::statvfs(data_dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(u64::MAX);
    (free / 4).clamp(256 << 20, 8 << 30)
}

impl StorageConfig {
    pub fn validate(&self, blob_size_bytes_max: u64) -> Result<()> {
        match self.backend {
            Backend::Memory => {
                if self.cas_memory_bytes < 1 << 20 || self.ac_memory_bytes < 1 << 20 {
                    bail!("[storage] cas_memory_bytes and ac_memory_bytes must be at least 1 MiB");
                }
                if blob_size_bytes_max > self.cas_memory_bytes / 2 {
                    bail!(
                        "[limits] blob_size_bytes_max ({blob_size_bytes_max}) must be at most half of [storage] cas_memory_bytes ({})",
                        self.cas_memory_bytes
                    );
                }
            }
            Backend::Block => {
                if self.sync_interval_ms == 0 || self.sync_interval_ms > 60_000 {
                    bail!(
                        "[storage] sync_interval_ms must be between 1 and 60000 (it bounds what a power cut may lose)"
                    );
                }
                if self.expected_blob_bytes < 64 {
                    bail!("[storage] expected_blob_bytes must be at least 64");
                }
                if self.block_bytes != 0 && !self.block_bytes.is_multiple_of(4096) {
                    bail!("[storage] block_bytes must be a multiple of 4096 (or 0 for automatic)");
                }
                for (key, size) in
                    [("cas_size_bytes", self.cas_size_bytes), ("ac_size_bytes", self.ac_size_bytes)]
                {
                    if size != 0 && size < 16 << 20 {
                        bail!("[storage] {key} must be at least 16 MiB (or 0 for automatic)");
                    }
                }
                if self.scrub_bytes_per_second > 10 << 30 {
                    bail!(
                        "[storage] scrub_bytes_per_second must be at most 10 GiB/s (0 turns the scrub off)"
                    );
                }
                if self.upload_staging_bytes != 0
                    && self.upload_staging_bytes < kiln_proto::limits::BLOCK_STAGING_BYTES_MIN
                {
                    bail!(
                        "[storage] upload_staging_bytes must be at least 2 MiB (0: half the CAS); half of it bounds the largest blob"
                    );
                }
                if self.threads > 1024 {
                    bail!("[storage] threads must be at most 1024 (0: one per core)");
                }
            }
        }
        Ok(())
    }

    fn block_config(&self, kind: Kind, data_dir: &Path) -> BlockConfig {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let (path, index, name) = match kind {
            Kind::Cas => (&self.cas_path, &self.cas_index_path, "cas"),
            Kind::Ac => (&self.ac_path, &self.ac_index_path, "ac"),
        };
        let cas_size =
            if self.cas_size_bytes == 0 { automatic_cas_size(data_dir) } else { self.cas_size_bytes };
        let size_bytes = match kind {
            Kind::Cas => cas_size,
            Kind::Ac if self.ac_size_bytes == 0 => (cas_size / 32).clamp(64 << 20, 4 << 30),
            Kind::Ac => self.ac_size_bytes,
        };
        let threads = if self.threads == 0 { cores } else { self.threads };
        let size_configured = match kind {
            Kind::Cas => self.cas_size_bytes != 0,
            Kind::Ac => self.ac_size_bytes != 0,
        };
        BlockConfig {
            kind,
            data_path: path.clone().unwrap_or_else(|| data_dir.join(format!("{name}.data"))),
            index_path: index.clone().unwrap_or_else(|| data_dir.join(format!("{name}.index"))),
            size_bytes,
            size_configured,
            block_bytes: self.block_bytes,
            // Action results are small: size the AC's index for them.
            expected_blob_bytes: if kind == Kind::Ac { 2048 } else { self.expected_blob_bytes },
            threads: if kind == Kind::Ac { (threads / 4).max(1) } else { threads },
            io: self.io,
            sync_interval: Duration::from_millis(self.sync_interval_ms),
            pin_threads: self.pin_threads,
            format_device: self.format_device,
            reformat: self.reformat,
            room_wait: Duration::from_millis(kiln_proto::limits::BLOCK_ROOM_WAIT_MS),
            scrub_bytes_per_second: self.scrub_bytes_per_second,
            staging_dir: self.upload_staging_dir.clone().unwrap_or_else(|| data_dir.join("staging")),
            staging_bytes: self.upload_staging_bytes,
            index_log_min_bytes: kiln_proto::limits::BLOCK_INDEX_LOG_MIN_BYTES,
        }
    }
}

/// The opened stores.
#[derive(Debug)]
pub enum Stores {
    Memory { cas: MemoryCas, ac: MemoryAc },
    Block { cas: BlockCas, ac: BlockAc },
}

impl Stores {
    /// Opens the stores `config` describes (blocking: it may read the index).
    pub fn open(
        config: &StorageConfig,
        data_dir: &Path,
        blob_size_bytes_max: u64,
        result_size_bytes_max: u64,
    ) -> Result<Stores> {
        match config.backend {
            Backend::Memory => Ok(Stores::Memory {
                cas: MemoryCas::new(config.cas_memory_bytes, blob_size_bytes_max),
                ac: MemoryAc::new(config.ac_memory_bytes, result_size_bytes_max),
            }),
            Backend::Block => {
                let cas = Engine::open(&config.block_config(Kind::Cas, data_dir))
                    .map_err(|e| anyhow::anyhow!("CAS store: {}", e.message()))?;
                let ac = Engine::open(&config.block_config(Kind::Ac, data_dir))
                    .map_err(|e| anyhow::anyhow!("action cache store: {}", e.message()))?;
                Ok(Stores::Block { cas: BlockCas::new(cas), ac: BlockAc::new(ac) })
            }
        }
    }

    /// Why a store cannot make writes durable (its syncs keep failing);
    /// `None` while both are healthy.
    pub fn unhealthy(&self) -> Option<String> {
        match self {
            Stores::Memory { .. } => None,
            Stores::Block { cas, ac } => [("CAS", cas.engine()), ("action cache", ac.engine())]
                .into_iter()
                .find_map(|(name, e)| e.unhealthy().map(|why| format!("{name} store: {why}"))),
        }
    }

    /// The largest blob the CAS can hold.
    pub fn blob_size_bytes_max(&self) -> u64 {
        match self {
            Stores::Memory { cas, .. } => cas.blob_size_bytes_max(),
            Stores::Block { cas, .. } => cas.blob_size_bytes_max(),
        }
    }

    /// Syncs and closes the stores (blocking).
    pub fn close(&self) {
        if let Stores::Block { cas, ac } = self {
            for engine in [cas.engine(), ac.engine()] {
                if let Err(e) = engine.close() {
                    tracing::error!(error = %e, "the final sync failed; a restart keeps the last synced state");
                }
            }
        }
    }

    /// A line for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            Stores::Memory { .. } => "memory (nothing survives a restart)".into(),
            Stores::Block { cas, ac } => {
                let describe = |e: &Arc<Engine>| {
                    format!(
                        "{} ({} MiB, index of {} slots, {})",
                        e.devices.data.describe(),
                        e.ring.capacity() >> 20,
                        e.slots,
                        e.io_path
                    )
                };
                format!("CAS {}, action cache {}", describe(cas.engine()), describe(ac.engine()))
            }
        }
    }
}
