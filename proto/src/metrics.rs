//! The metrics every part of Kiln records, in one process-wide set
//! ([`global`]), exported in the Prometheus text format by the binary's
//! metrics listener.
//!
//! One set per process, like Prometheus clients' default registries: the
//! services, the scheduler and the worker record into it without handles
//! threaded through every constructor. Gauges that describe state (store
//! fill, queue lengths) are read at scrape time by collectors the binary
//! registers ([`Metrics::registry`]), so nothing here holds a copy of
//! them.
//!
//! Every label value comes from a bounded set: gRPC methods from the
//! methods Kiln serves, tenants from the configured ones
//! ([`set_tenants`]), codes from gRPC's 17, platforms from registered
//! workers. A client cannot add a series.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// A gRPC method, by service and method name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub service: &'static str,
    pub method: &'static str,
}

/// A finished gRPC call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub service: &'static str,
    pub method: &'static str,
    pub code: &'static str,
}

/// An action cache lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    pub tenant: String,
    pub result: &'static str,
}

/// Why a request was refused before a service saw it, or by one.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// How an execution ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Process-wide sums of some labelled counters, for the status page's
/// recent history (sampled, so it needs no label iteration).
#[derive(Debug, Default)]
pub struct Totals {
    pub requests: AtomicU64,
    pub ac_hits: AtomicU64,
    pub ac_misses: AtomicU64,
    pub received_bytes: AtomicU64,
    pub sent_bytes: AtomicU64,
}

/// The metrics recorded as things happen.
#[derive(Debug)]
pub struct Metrics {
    pub totals: Totals,
    pub grpc_requests: Family<CallLabels, Counter>,
    pub grpc_duration: Family<MethodLabels, Histogram>,
    pub grpc_received_bytes: Family<MethodLabels, Counter>,
    pub grpc_sent_bytes: Family<MethodLabels, Counter>,
    pub ac_lookups: Family<LookupLabels, Counter>,
    pub cas_find_missing: Family<LookupLabels, Counter>,
    pub auth_failures: Family<ReasonLabels, Counter>,
    pub admission_waits: Counter,
    pub admission_refusals: Counter,
    pub data_loss: Counter,
    pub upload_verification_failures: Counter,
    pub store_refreshes: Counter,
    pub store_refreshes_skipped: Counter,
    pub store_scrubbed_bytes: Counter,
    pub store_index_evictions: Counter,
    pub store_index_full: Counter,
    pub store_scrub_damaged: Counter,
    /// Bytes the CAS's upload staging area holds for uploads in progress.
    pub store_staged_bytes: Gauge,
    pub store_staging_refusals: Counter,
    pub dispatch_latency: Histogram,
    pub action_duration: Histogram,
    pub executions: Family<OutcomeLabels, Counter>,
    pub retries: Counter,
    /// Execute calls whose priority was raised to 0 for want of the
    /// urgent permission.
    pub priorities_clamped: Counter,
    pub lost_workers: Counter,
    pub worker_runs: Family<OutcomeLabels, Counter>,
    /// Slots of this process's workers, set when they start.
    pub worker_slots: Gauge,
    /// Actions running on this process's workers (sandbox, inputs and
    /// outputs included).
    pub worker_running: Gauge,
    /// Collectors added by the binary: read at scrape time.
    extra: Mutex<Vec<Arc<dyn Collector>>>,
}

fn seconds_histogram() -> Histogram {
    // 500 µs to about 70 minutes, doubling.
    Histogram::new(exponential_buckets(0.0005, 2.0, 24))
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            totals: Totals::default(),
            grpc_requests: Family::default(),
            grpc_duration: Family::new_with_constructor(seconds_histogram),
            grpc_received_bytes: Family::default(),
            grpc_sent_bytes: Family::default(),
            ac_lookups: Family::default(),
            cas_find_missing: Family::default(),
            auth_failures: Family::default(),
            admission_waits: Counter::default(),
            admission_refusals: Counter::default(),
            data_loss: Counter::default(),
            upload_verification_failures: Counter::default(),
            store_refreshes: Counter::default(),
            store_refreshes_skipped: Counter::default(),
            store_scrubbed_bytes: Counter::default(),
            store_index_evictions: Counter::default(),
            store_index_full: Counter::default(),
            store_scrub_damaged: Counter::default(),
            store_staged_bytes: Gauge::default(),
            store_staging_refusals: Counter::default(),
            dispatch_latency: seconds_histogram(),
            action_duration: seconds_histogram(),
            executions: Family::default(),
            retries: Counter::default(),
            priorities_clamped: Counter::default(),
            lost_workers: Counter::default(),
            worker_runs: Family::default(),
            worker_slots: Gauge::default(),
            worker_running: Gauge::default(),
            extra: Mutex::new(Vec::new()),
        }
    }

    /// Sandboxed runs by outcome, for the status page.
    pub fn worker_runs_by_outcome(&self) -> Vec<(&'static str, u64)> {
        ["exited", "timeout", "oom", "sandbox_error", "refused"]
            .into_iter()
            .map(|outcome| (outcome, self.worker_runs.get_or_create(&OutcomeLabels { outcome }).get()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Adds a collector, read on every scrape.
    pub fn add_collector(&self, collector: Arc<dyn Collector>) {
        self.extra.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(collector);
    }

    /// Everything, in the Prometheus text format (0.0.4).
    pub fn encode(&self) -> String {
        let mut registry = self.registry();
        let extra = self.extra.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for c in extra {
            registry.register_collector(Box::new(SharedCollector(c)));
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }

    /// A registry naming every metric recorded here.
    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("kiln");
        r.register(
            "grpc_requests",
            "gRPC calls finished, by service, method and status code",
            self.grpc_requests.clone(),
        );
        r.register_with_unit(
            "grpc_request_duration",
            "Time from a call's headers to its last response byte",
            Unit::Seconds,
            self.grpc_duration.clone(),
        );
        r.register_with_unit(
            "grpc_received",
            "Request body bytes received (gRPC framing included, after HTTP/2)",
            Unit::Bytes,
            self.grpc_received_bytes.clone(),
        );
        r.register_with_unit(
            "grpc_sent",
            "Response body bytes sent (gRPC framing included, before HTTP/2)",
            Unit::Bytes,
            self.grpc_sent_bytes.clone(),
        );
        r.register(
            "ac_lookups",
            "GetActionResult calls by tenant (configured tenants; others count as \"other\") and result (hit, miss)",
            self.ac_lookups.clone(),
        );
        r.register(
            "cas_find_missing_digests",
            "Digests asked about in FindMissingBlobs by tenant and result (present, missing)",
            self.cas_find_missing.clone(),
        );
        r.register(
            "auth_failures",
            "Requests refused by authentication or authorization, by reason",
            self.auth_failures.clone(),
        );
        r.register(
            "admission_waits",
            "Uploads and reads that waited for the memory budget",
            self.admission_waits.clone(),
        );
        r.register(
            "admission_refusals",
            "Uploads and reads refused with RESOURCE_EXHAUSTED after waiting for the memory budget",
            self.admission_refusals.clone(),
        );
        r.register(
            "store_data_loss",
            "Reads that found damaged bytes (a checksum or header mismatch) and answered DATA_LOSS",
            self.data_loss.clone(),
        );
        r.register(
            "cas_upload_verification_failures",
            "Uploads refused because their bytes did not match their digest (hash or size); nothing was stored",
            self.upload_verification_failures.clone(),
        );
        r.register(
            "store_refreshes",
            "Blobs copied forward in the ring because they were used while old (so eviction spares them)",
            self.store_refreshes.clone(),
        );
        r.register(
            "store_refreshes_skipped",
            "Old blobs that were touched but could not be copied forward (backlog full, too near eviction, or the copy failed); FindMissingBlobs reported them missing",
            self.store_refreshes_skipped.clone(),
        );
        r.register_with_unit(
            "store_scrubbed",
            "Bytes the background scrub re-read and checked",
            Unit::Bytes,
            self.store_scrubbed_bytes.clone(),
        );
        r.register(
            "store_index_evictions",
            "Times the index was full where a key had to go and the oldest blocks were evicted early (lower expected_blob_bytes)",
            self.store_index_evictions.clone(),
        );
        r.register(
            "store_index_full",
            "Writes refused because the index was full where their key had to go with only promised blobs there",
            self.store_index_full.clone(),
        );
        r.register(
            "store_scrub_damaged",
            "Damaged records the background scrub found and dropped (before any build read them)",
            self.store_scrub_damaged.clone(),
        );
        r.register_with_unit(
            "store_staged",
            "Bytes of uploads in progress held in the CAS's staging area (copied into the ring when complete)",
            Unit::Bytes,
            self.store_staged_bytes.clone(),
        );
        r.register(
            "store_staging_refusals",
            "Upload chunks refused because the staging area (in all, or the client's share) was full",
            self.store_staging_refusals.clone(),
        );
        r.register_with_unit(
            "scheduler_dispatch_latency",
            "Time from an execution being queued to its assignment to a worker",
            Unit::Seconds,
            self.dispatch_latency.clone(),
        );
        r.register_with_unit(
            "scheduler_action_duration",
            "Time from an execution's assignment to its result, on the worker",
            Unit::Seconds,
            self.action_duration.clone(),
        );
        r.register(
            "scheduler_executions",
            "Executions finished, by the status they ended with (OK, DEADLINE_EXCEEDED, FAILED_PRECONDITION, UNAVAILABLE ...)",
            self.executions.clone(),
        );
        r.register(
            "scheduler_retries",
            "Executions requeued after their worker was lost or gave up",
            self.retries.clone(),
        );
        r.register(
            "scheduler_priorities_clamped",
            "Execute calls asking a priority below 0 without the urgent permission, run at priority 0",
            self.priorities_clamped.clone(),
        );
        r.register(
            "worker_runs",
            "Sandboxed runs on this process's workers, by outcome (exited, timeout, oom, sandbox_error, refused)",
            self.worker_runs.clone(),
        );
        r.register("worker_slots", "Execution slots of this process's workers", self.worker_slots.clone());
        r.register(
            "worker_running_actions",
            "Actions this process's workers are running (fetching inputs, executing or uploading outputs)",
            self.worker_running.clone(),
        );
        r.register(
            "scheduler_lost_workers",
            "Workers declared lost (stream broken or heartbeats missed)",
            self.lost_workers.clone(),
        );
        r
    }
}

#[derive(Debug)]
struct SharedCollector(Arc<dyn Collector>);

impl Collector for SharedCollector {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

static TENANTS: OnceLock<BTreeSet<String>> = OnceLock::new();

/// The tenants that get their own label values; set once at start-up.
pub fn set_tenants(tenants: impl IntoIterator<Item = String>) {
    let _ = TENANTS.set(tenants.into_iter().collect());
}

/// The label for an instance name: its base tenant when configured
/// (`default` for the empty one), else `other`.
pub fn tenant_label(instance_name: &str) -> String {
    let base = crate::tenant::base(instance_name);
    if base.is_empty() {
        return "default".to_owned();
    }
    match TENANTS.get() {
        Some(known) if known.contains(base) => base.to_owned(),
        _ => "other".to_owned(),
    }
}

/// A gRPC status code's name, as in the gRPC specification.
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code).ok().and_then(|c| NAMES.get(c)).copied().unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_outside_the_configured_set_share_one_label() {
        set_tenants(["main".to_owned()]);
        assert_eq!(tenant_label(""), "default");
        assert_eq!(tenant_label("main"), "main");
        assert_eq!(tenant_label("main.dev.alice"), "main");
        assert_eq!(tenant_label("anything-else"), "other");
    }

    #[test]
    fn every_metric_has_help_and_units_in_its_name() {
        let m = global();
        m.grpc_requests.get_or_create(&CallLabels { service: "s", method: "m", code: code_name(0) }).inc();
        m.ac_lookups.get_or_create(&LookupLabels { tenant: "default".into(), result: "hit" }).inc();
        m.grpc_duration.get_or_create(&MethodLabels { service: "s", method: "m" }).observe(0.001);
        let text = m.encode();
        assert!(
            text.contains("kiln_grpc_requests_total{service=\"s\",method=\"m\",code=\"OK\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE kiln_grpc_request_duration_seconds histogram"), "{text}");
        assert!(text.contains("# HELP kiln_ac_lookups_total "), "{text}");
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has help");
            if line.ends_with("counter") {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(99), "UNKNOWN");
    }
}
