//! `kiln bench`: a small gRPC load generator for request-rate workloads.
//!
//! Each worker task sends one request at a time and records its latency;
//! workers share a few HTTP/2 connections. The report gives throughput and
//! latency percentiles, as text or JSON.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    ActionResult, FindMissingBlobsRequest, GetActionResultRequest, UpdateActionResultRequest,
};
use kiln_proto::{Digest, DigestFunction};

use crate::client::{ClientOptions, Connection, connect};

/// Most requests one run records latencies for.
const REQUESTS_MAX: u64 = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// GetActionResult of a present entry.
    AcGet,
    /// FindMissingBlobs with `digests` digests per call.
    FindMissing,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub workload: Workload,
    pub instance: String,
    pub requests: u64,
    pub concurrency: usize,
    pub connections: usize,
    pub digests_per_call: usize,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub workload: Workload,
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    /// Digests checked per second (FindMissing) or requests per second.
    pub items_per_second: f64,
}

impl Report {
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({
            "workload": format!("{:?}", self.workload),
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.elapsed.as_secs_f64(),
            "requests_per_second": self.requests_per_second(),
            "items_per_second": self.items_per_second,
            "p50_us": self.p50.as_micros(),
            "p99_us": self.p99.as_micros(),
            "p999_us": self.p999.as_micros(),
        })
        .to_string()
    }

    pub fn to_text(&self) -> String {
        format!(
            "{:?}: {} requests ({} errors) in {:.2} s: {:.0} req/s, {:.0} items/s; latency p50 {} us, p99 {} us, p99.9 {} us",
            self.workload,
            self.requests,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.requests_per_second(),
            self.items_per_second,
            self.p50.as_micros(),
            self.p99.as_micros(),
            self.p999.as_micros()
        )
    }
}

/// The `per_mille`-th latency of a sorted list (500: median, 999: p99.9).
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) * per_mille + 500) / 1000;
    sorted[rank.min(sorted.len() - 1)]
}

async fn one(
    conn: &Connection,
    options: &BenchOptions,
    action: &Digest,
    digests: &[kiln_proto::reapi::Digest],
) -> bool {
    match options.workload {
        Workload::AcGet => {
            let req = GetActionResultRequest {
                instance_name: options.instance.clone(),
                action_digest: Some(action.to_proto()),
                ..Default::default()
            };
            ActionCacheClient::new(conn.channel()).get_action_result(req).await.is_ok()
        }
        Workload::FindMissing => {
            let req = FindMissingBlobsRequest {
                instance_name: options.instance.clone(),
                blob_digests: digests.to_vec(),
                digest_function: 0,
            };
            ContentAddressableStorageClient::new(conn.channel()).find_missing_blobs(req).await.is_ok()
        }
    }
}

/// Runs the workload against `remote` and reports.
pub async fn run(client: &ClientOptions, options: &BenchOptions) -> Result<Report> {
    if options.requests == 0 || options.requests > REQUESTS_MAX {
        bail!("--requests must be between 1 and {REQUESTS_MAX}");
    }
    if options.concurrency == 0 || options.connections == 0 || options.digests_per_call == 0 {
        bail!("--concurrency, --connections and --digests must be positive");
    }
    let mut connections = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        connections.push(connect(client).await?);
    }
    // Set-up: one action result to hit; digests to look up.
    let action = DigestFunction::Sha256.compute(b"kiln bench action");
    if options.workload == Workload::AcGet {
        let req = UpdateActionResultRequest {
            instance_name: options.instance.clone(),
            action_digest: Some(action.to_proto()),
            action_result: Some(ActionResult::default()),
            ..Default::default()
        };
        ActionCacheClient::new(connections[0].channel())
            .update_action_result(req)
            .await
            .context("set-up UpdateActionResult (needs ac-write)")?;
    }
    let digests: Vec<kiln_proto::reapi::Digest> = (0..options.digests_per_call)
        .map(|i| DigestFunction::Sha256.compute(&(i as u64).to_le_bytes()).to_proto())
        .collect();

    let per_worker = options.requests.div_ceil(options.concurrency as u64);
    let started = Instant::now();
    let mut workers = Vec::with_capacity(options.concurrency);
    for w in 0..options.concurrency {
        let conn = connections[w % connections.len()].clone();
        let (options, digests) = (options.clone(), digests.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(usize::try_from(per_worker).unwrap_or(0));
            let mut errors = 0u64;
            for _ in 0..per_worker {
                let t = Instant::now();
                if !one(&conn, &options, &action, &digests).await {
                    errors += 1;
                }
                latencies.push(t.elapsed());
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let requests = latencies.len() as u64;
    let items = match options.workload {
        Workload::AcGet => requests,
        Workload::FindMissing => requests * options.digests_per_call as u64,
    };
    Ok(Report {
        workload: options.workload,
        requests,
        errors,
        elapsed,
        p50: percentile(&latencies, 500),
        p99: percentile(&latencies, 990),
        p999: percentile(&latencies, 999),
        items_per_second: items as f64 / elapsed.as_secs_f64(),
    })
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
