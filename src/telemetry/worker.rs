//! A worker's own figures, read at scrape time: its slots and running
//! actions (recorded as they happen) and its file cache.

use kiln_worker::cache::{CacheStats, FileCache};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// One worker process's (or `kiln serve`'s local worker's) state.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub id: String,
    pub slots: i64,
    pub running: i64,
    pub cache: CacheStats,
    pub cache_capacity_bytes: u64,
}

/// Reads a worker for `/metrics` and the status page.
pub struct WorkerCollector {
    id: String,
    cache: FileCache,
}

impl std::fmt::Debug for WorkerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCollector").field("id", &self.id).finish_non_exhaustive()
    }
}

impl WorkerCollector {
    pub fn new(id: String, cache: FileCache) -> Self {
        Self { id, cache }
    }

    pub fn read(&self) -> WorkerView {
        let m = kiln_proto::metrics::global();
        WorkerView {
            id: self.id.clone(),
            slots: m.worker_slots.get(),
            running: m.worker_running.get(),
            cache: self.cache.stats(),
            cache_capacity_bytes: self.cache.capacity_bytes(),
        }
    }
}

impl Collector for WorkerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let v = self.read();
        let c = &v.cache;
        let gauges: [(&str, &str, u64); 3] = [
            ("worker_file_cache_bytes", "Bytes of input files in the worker's file cache", c.bytes),
            (
                "worker_file_cache_capacity_bytes",
                "Most bytes the worker's file cache keeps ([execution.worker] cache_size_bytes)",
                v.cache_capacity_bytes,
            ),
            ("worker_file_cache_entries", "Files in the worker's file cache", c.entries),
        ];
        for (name, help, value) in gauges {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family)?;
        }
        let counters: [(&str, &str, u64); 3] = [
            ("worker_file_cache_hits", "Input files found in the worker's file cache", c.hits),
            ("worker_file_cache_misses", "Input files the worker fetched from the CAS", c.misses),
            (
                "worker_file_cache_evictions",
                "Files removed from the worker's file cache to stay in bounds",
                c.evictions,
            ),
        ];
        for (name, help, value) in counters {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        Ok(())
    }
}
