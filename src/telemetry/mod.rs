//! What operators see: Prometheus metrics and the status page on their own
//! HTTP listener (`[metrics] listen`, loopback by default), the gRPC
//! metrics layer, the logs and the optional OpenTelemetry export.
//!
//! Routes: `/metrics` (Prometheus text format, open to whoever can reach
//! the listener, like every exporter), `/status` (HTML) and `/status.txt`
//! (what `kiln status` prints), and `/logs/HASH/SIZE/INSTANCE` (a failed
//! action's stdout or stderr). The last three need the `admin` permission
//! on every tenant when authentication is configured (bearer token or
//! basic auth; the listener speaks plain HTTP, so not certificates).

pub mod client;

mod http;
mod logging;
mod status;
mod stores;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use kiln_proto::Digest;
use serde::Deserialize;

pub use http::serve;
pub use logging::{LogConfig, LogFormat, init_logging};
pub use status::History;
pub use stores::StoreCollector;
pub use worker::{WorkerCollector, WorkerView};

/// The `[metrics]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` and the status page.
    pub enabled: bool,
    /// Their address; loopback by default.
    pub listen: SocketAddr,
    /// Tenants that get their own label values (with those named in
    /// `[[auth.rules]]`); every other tenant counts as `other`.
    pub tenants: Vec<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, listen: SocketAddr::from(([127, 0, 0, 1], 9980)), tenants: Vec::new() }
    }
}

/// Reads a failed action's log from the CAS, at most a bound of bytes.
pub type FetchLog =
    Arc<dyn Fn(String, Digest) -> BoxFuture<'static, kiln_proto::Result<bytes::Bytes>> + Send + Sync>;

/// The scheduler as the status page sees it.
pub type SchedulerView = Arc<dyn Fn() -> kiln_scheduler::Snapshot + Send + Sync>;

/// Everything the listener reports on.
pub struct Sources {
    pub started: Instant,
    /// Configuration lines for the page: no secrets, only what and where.
    pub summary: Vec<(String, String)>,
    /// None on a worker process.
    pub stores: Option<Arc<StoreCollector>>,
    pub scheduler: Option<SchedulerView>,
    /// None where there is no CAS to read failed actions' logs from.
    pub fetch_log: Option<FetchLog>,
    /// The worker of this process, if it runs one.
    pub worker: Option<Arc<WorkerCollector>>,
    /// `kiln serve`'s local worker, in a process of its own.
    pub local_worker: Option<Arc<crate::local_worker::LocalWorker>>,
    /// None when Kiln runs without authentication.
    pub auth: Option<(kiln_auth::Authenticator, kiln_proto::access::Authorizer)>,
    pub history: Arc<History>,
}

/// The tenants that get their own label values: configured ones and
/// those named by permission rules (patterns, `*`, are skipped).
pub fn label_tenants(config: &MetricsConfig, rules: &[kiln_auth::policy::Rule]) -> Vec<String> {
    let mut tenants = config.tenants.clone();
    for rule in rules {
        let base = kiln_proto::tenant::base(&rule.tenant);
        if !base.is_empty() && !base.contains('*') && !tenants.iter().any(|t| t == base) {
            tenants.push(base.to_owned());
        }
    }
    tenants
}

/// Exports the scheduler's state at scrape time: queue, executing actions,
/// workers and slots, by worker platform.
pub struct SchedulerCollector(pub SchedulerView);

impl std::fmt::Debug for SchedulerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SchedulerCollector")
    }
}

impl prometheus_client::collector::Collector for SchedulerCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::gauge::ConstGauge;
        let s = (self.0)();
        let mut by_platform: std::collections::BTreeMap<String, [i64; 4]> = Default::default();
        for w in &s.workers {
            let e = by_platform.entry(w.platform.clone()).or_default();
            e[0] += 1;
            e[1] += i64::try_from(w.slots).unwrap_or(i64::MAX);
            e[2] += i64::try_from(w.slots.saturating_sub(w.running)).unwrap_or(0);
            e[3] += i64::try_from(w.running).unwrap_or(0);
        }
        let families: [(&str, &str, usize); 4] = [
            ("scheduler_workers", "Registered workers, by platform (their properties)", 0),
            ("scheduler_slots", "Execution slots of registered workers, by platform", 1),
            ("scheduler_free_slots", "Idle execution slots, by platform", 2),
            ("scheduler_executing_actions", "Actions running on workers, by platform", 3),
        ];
        for (name, help, i) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (platform, v) in &by_platform {
                ConstGauge::new(v[i]).encode(family.encode_family(&[("platform", platform.as_str())])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "scheduler_queued_actions",
            "Queued actions, by the platform of the workers that could run them (\"unsatisfiable\": none yet) and priority (high: below 0, normal: 0, low: above 0)",
            None,
            MetricType::Gauge,
        )?;
        for ((platform, priority), n) in &s.queued_by_priority {
            let n = i64::try_from(*n).unwrap_or(i64::MAX);
            let labels = [("platform", platform.as_str()), ("priority", priority)];
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "scheduler_operations",
            "Operations kept (running or finished)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(s.operations).unwrap_or(i64::MAX))
            .encode(family.encode_family(&[("state", "all")])?)?;
        Ok(())
    }
}

/// Binds the metrics listener, registers the collectors, samples the
/// history; the task serves until dropped. Prints `kiln: metrics on ADDR`.
pub async fn start(
    config: &MetricsConfig,
    sources: Sources,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    use anyhow::Context as _;
    let metrics = kiln_proto::metrics::global();
    if let Some(stores) = &sources.stores {
        metrics.add_collector(stores.clone());
    }
    if let Some(worker) = &sources.worker {
        metrics.add_collector(worker.clone());
    }
    if let Some(view) = &sources.scheduler {
        metrics.add_collector(Arc::new(SchedulerCollector(view.clone())));
    }
    if !config.enabled {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("[metrics] listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    println!("kiln: metrics on {addr}");
    tracing::info!(%addr, "metrics and status page (/metrics, /status)");
    let history = sources.history.clone();
    let sources = Arc::new(sources);
    Ok(Some(tokio::spawn(async move {
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(status::SAMPLE_INTERVAL);
            loop {
                tick.tick().await;
                history.record();
            }
        });
        serve(listener, sources).await;
        sampler.abort();
    })))
}
