//! `kiln bench`: a gRPC load generator for any REAPI endpoint.
//!
//! Each worker task runs one operation at a time and records its latency;
//! workers share a few HTTP/2 connections. A run reports operations and
//! bytes (or digests) per second and latency percentiles, as text or JSON.
//! [`null_server`] is the baseline server and the generator's own ceiling;
//! [`suite`] runs everything with the other baselines and checks floors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::client::{ClientOptions, connect};

pub mod hash;
pub mod null_server;
pub mod suite;
mod workloads;

pub use workloads::Workload;

use kiln_proto::limits::{BENCH_OPERATIONS_MAX as OPERATIONS_MAX, BENCH_SETUP_BYTES_MAX as SETUP_BYTES_MAX};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub workload: Workload,
    pub instance: String,
    /// Operations in total (request-rate workloads).
    pub requests: u64,
    /// Bytes in total (transfer workloads).
    pub total_bytes: u64,
    pub blob_size_bytes: u64,
    pub concurrency: usize,
    pub connections: usize,
    /// Digests per FindMissingBlobs call, blobs per Batch* call.
    pub digests_per_call: usize,
    /// Drop the page cache after the set-up, so reads come from the disk
    /// (needs root).
    pub cold: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            workload: Workload::AcGet,
            instance: String::new(),
            requests: 100_000,
            total_bytes: 1 << 30,
            blob_size_bytes: 64 << 20,
            concurrency: 64,
            connections: 4,
            digests_per_call: 1000,
            cold: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub workload: Workload,
    pub operations: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    /// Payload bytes moved (transfer and batch workloads).
    pub bytes: u64,
    /// Digests looked up (FindMissingBlobs), or operations.
    pub items: u64,
}

impl Report {
    pub fn operations_per_second(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64()
    }

    pub fn items_per_second(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64()
    }

    /// Payload throughput in bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }

    /// The figure a workload is judged by: bytes/s for transfers,
    /// digests/s for FindMissingBlobs, operations/s otherwise.
    pub fn headline(&self) -> f64 {
        match self.workload {
            Workload::BytestreamRead
            | Workload::BytestreamWrite
            | Workload::BatchRead
            | Workload::BatchUpdate => self.bytes_per_second(),
            // Successful operations only: a server that refuses load does
            // not get credit for fast refusals.
            Workload::FindMissing | Workload::AcGet | Workload::AcUpdate | Workload::Execute => {
                self.items_per_second()
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "workload": self.workload.name(),
            "operations": self.operations,
            "errors": self.errors,
            "seconds": self.elapsed.as_secs_f64(),
            "operations_per_second": self.operations_per_second(),
            "bytes_per_second": self.bytes_per_second(),
            "items_per_second": self.items_per_second(),
            "p50_us": self.p50.as_micros(),
            "p99_us": self.p99.as_micros(),
            "p999_us": self.p999.as_micros(),
        })
    }

    pub fn to_text(&self) -> String {
        let rate = match self.workload {
            Workload::FindMissing => format!("{:.2} M digests/s", self.items_per_second() / 1e6),
            _ if self.bytes > 0 => format!("{:.3} GB/s", self.bytes_per_second() / 1e9),
            _ => format!("{:.0} req/s", self.operations_per_second()),
        };
        format!(
            "{}: {} operations ({} errors) in {:.2} s: {rate}, {:.0} ops/s; latency p50 {} us, p99 {} us, p99.9 {} us",
            self.workload.name(),
            self.operations,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.operations_per_second(),
            self.p50.as_micros(),
            self.p99.as_micros(),
            self.p999.as_micros()
        )
    }
}

/// The `per_mille`-th latency of a sorted list (500: median, 999: p99.9).
pub fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) * per_mille + 500) / 1000;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs a workload against `client.remote` and reports.
pub async fn run(client: &ClientOptions, options: &BenchOptions) -> Result<Report> {
    if options.concurrency == 0 || options.connections == 0 || options.digests_per_call == 0 {
        bail!("--concurrency, --connections and --digests must be positive");
    }
    let operations = options.workload.operations(options);
    if operations == 0 || operations > OPERATIONS_MAX {
        bail!("the run would make {operations} operations; it must be between 1 and {OPERATIONS_MAX}");
    }
    if options.workload.setup_bytes(options) > SETUP_BYTES_MAX {
        bail!(
            "the run would hold more than {SETUP_BYTES_MAX} bytes of blobs in memory; lower --total or --blob-size"
        );
    }
    let mut connections = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        connections.push(connect(client).await?);
    }
    let plan = Arc::new(workloads::Plan::prepare(&connections[0], options).await?);
    if options.cold {
        drop_page_cache()?;
    }

    let workers = options.concurrency.min(usize::try_from(operations).unwrap_or(usize::MAX));
    let warned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let conn = connections[w % connections.len()].clone();
        let plan = plan.clone();
        let warned = warned.clone();
        // Worker w runs operations w, w + workers, w + 2 * workers, ...
        let mine: Vec<u64> = (w as u64..operations).step_by(workers).collect();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(mine.len());
            let (mut errors, mut bytes, mut items) = (0u64, 0u64, 0u64);
            for op in mine {
                let t = Instant::now();
                match plan.run(&conn, op).await {
                    Ok((b, i)) => {
                        bytes += b;
                        items += i;
                    }
                    Err(e) => {
                        if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::warn!(error = format!("{e:#}"), "bench operation failed");
                        }
                        errors += 1;
                    }
                }
                latencies.push(t.elapsed());
            }
            (latencies, errors, bytes, items)
        }));
    }
    let (mut latencies, mut errors, mut bytes, mut items) = (Vec::new(), 0, 0, 0);
    for task in tasks {
        let (l, e, b, i) = task.await?;
        latencies.extend(l);
        errors += e;
        bytes += b;
        items += i;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Report {
        workload: options.workload,
        operations: latencies.len() as u64,
        errors,
        elapsed,
        p50: percentile(&latencies, 500),
        p99: percentile(&latencies, 990),
        p999: percentile(&latencies, 999),
        bytes,
        items,
    })
}

/// Writes dirty pages out and drops the page cache, so the next reads of
/// a file come from its disk.
pub fn drop_page_cache() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| anyhow::anyhow!("drop the page cache (needs root): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 500), Duration::from_micros(501));
        assert_eq!(percentile(&v, 990), Duration::from_micros(990));
        assert_eq!(percentile(&v, 999), Duration::from_micros(999));
        assert_eq!(percentile(&[], 500), Duration::ZERO);
    }
}
