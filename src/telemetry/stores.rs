//! The stores' state, read at scrape time: size, fill, entries and index
//! load, evicted and written bytes, syncs and their age, the I/O path.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_storage::store::block::engine::Engine;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::storage::Stores;

/// One store's figures.
#[derive(Debug, Clone, Default)]
pub struct StoreView {
    pub store: &'static str,
    pub backend: &'static str,
    pub io_path: &'static str,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub entries: u64,
    pub index_slots: u64,
    pub written_bytes: u64,
    pub evicted_bytes: u64,
    pub syncs: u64,
    pub sync_failures: u64,
    pub last_sync_seconds: f64,
    /// Since the last sync; none before the first.
    pub epoch_age_seconds: Option<f64>,
    /// Why the store cannot sync, while its syncs keep failing.
    pub unhealthy: Option<String>,
    /// Uploads in progress in the staging area, and its size (a block CAS).
    pub staging: Option<(u64, u64)>,
}

/// Reads the stores for `/metrics` and the status page.
#[derive(Debug)]
pub struct StoreCollector {
    stores: Arc<Stores>,
}

impl StoreCollector {
    pub fn new(stores: Arc<Stores>) -> Self {
        Self { stores }
    }

    /// Both stores now (blocking: counting index entries asks every
    /// storage thread).
    pub fn read(&self) -> Vec<StoreView> {
        match &*self.stores {
            Stores::Memory { cas, ac } => vec![
                StoreView {
                    store: "cas",
                    backend: "memory",
                    io_path: "memory",
                    capacity_bytes: cas.capacity_bytes(),
                    used_bytes: cas.charged_bytes(),
                    entries: cas.len() as u64,
                    ..StoreView::default()
                },
                StoreView {
                    store: "ac",
                    backend: "memory",
                    io_path: "memory",
                    capacity_bytes: ac.capacity_bytes(),
                    used_bytes: ac.charged_bytes(),
                    entries: ac.len() as u64,
                    ..StoreView::default()
                },
            ],
            Stores::Block { cas, ac } => vec![block("cas", cas.engine()), block("ac", ac.engine())],
        }
    }
}

fn block(store: &'static str, e: &Arc<Engine>) -> StoreView {
    let (head, tail) = (e.ring.head(), e.ring.tail());
    let last_ms = e.stats.last_unix_ms.load(Ordering::Relaxed);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    StoreView {
        store,
        backend: "block",
        io_path: e.io_path,
        capacity_bytes: e.ring.capacity(),
        used_bytes: head.saturating_sub(tail),
        entries: e.entries() as u64,
        index_slots: e.slots,
        written_bytes: head,
        evicted_bytes: tail,
        syncs: e.stats.syncs.load(Ordering::Relaxed),
        sync_failures: e.stats.failures.load(Ordering::Relaxed),
        last_sync_seconds: e.stats.last_micros.load(Ordering::Relaxed) as f64 / 1e6,
        epoch_age_seconds: (last_ms > 0).then(|| now_ms.saturating_sub(last_ms) as f64 / 1000.0),
        unhealthy: e.unhealthy(),
        staging: e.staging.as_ref().map(|s| (s.held(), s.bytes_max())),
    }
}

type Pick = fn(&StoreView) -> Option<f64>;

const GAUGES: [(&str, &str, Pick); 7] = [
    ("store_capacity_bytes", "Bytes the store can hold", |v| Some(v.capacity_bytes as f64)),
    ("store_used_bytes", "Bytes the store holds (live records, between tail and head)", |v| {
        Some(v.used_bytes as f64)
    }),
    ("store_entries", "Entries in the store's index", |v| Some(v.entries as f64)),
    ("store_index_load_ratio", "Index entries / index slots (block stores)", |v| {
        (v.index_slots > 0).then(|| v.entries as f64 / v.index_slots as f64)
    }),
    ("store_fill_ratio", "Used / capacity", |v| {
        (v.capacity_bytes > 0).then(|| v.used_bytes as f64 / v.capacity_bytes as f64)
    }),
    ("store_last_sync_duration_seconds", "Duration of the last sync of data, index and superblock", |v| {
        (v.backend == "block").then_some(v.last_sync_seconds)
    }),
    ("store_epoch_age_seconds", "Time since the last completed sync: what a power cut would lose", |v| {
        v.epoch_age_seconds
    }),
];

type PickCount = fn(&StoreView) -> Option<u64>;

const COUNTERS: [(&str, &str, PickCount); 4] = [
    ("store_written_bytes", "Bytes ever appended to the ring", |v| {
        (v.backend == "block").then_some(v.written_bytes)
    }),
    ("store_evicted_bytes", "Bytes ever evicted from the ring's tail", |v| {
        (v.backend == "block").then_some(v.evicted_bytes)
    }),
    ("store_syncs", "Completed syncs", |v| (v.backend == "block").then_some(v.syncs)),
    ("store_sync_failures", "Failed syncs (the store keeps its last good state and retries)", |v| {
        (v.backend == "block").then_some(v.sync_failures)
    }),
];

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let views = self.read();
        for (name, help, pick) in GAUGES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for v in &views {
                if let Some(value) = pick(v) {
                    ConstGauge::new(value).encode(family.encode_family(&[("store", v.store)])?)?;
                }
            }
        }
        for (name, help, pick) in COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for v in &views {
                if let Some(value) = pick(v) {
                    ConstCounter::new(value).encode(family.encode_family(&[("store", v.store)])?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "store_info",
            "The store's backend and the I/O path in use (io_uring, pread, memory); always 1",
            None,
            MetricType::Gauge,
        )?;
        for v in &views {
            let labels = [("store", v.store), ("backend", v.backend), ("io", v.io_path)];
            ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
