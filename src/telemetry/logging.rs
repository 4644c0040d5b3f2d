//! Logs on stderr (text or JSON) and, when configured, traces exported
//! over OTLP/gRPC to an OpenTelemetry collector.
//!
//! Two layers over one registry, each with its own filter: stderr follows
//! `KILN_LOG` (default `info`); the exporter always receives the per-call
//! `grpc` span (debug level, off on stderr by default) and the worker's
//! `action` span with their events; `otlp_sample_ratio` of the calls get
//! a span at all (every action does). Spans wait in a bounded queue and are sent in
//! batches from a background thread: a slow or absent collector costs
//! dropped spans, never memory or request latency.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The `[log]` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (default) or `json` (one object per line, with the spans).
    pub format: LogFormat,
    /// An OpenTelemetry collector's OTLP/gRPC endpoint
    /// (`http://HOST:4317`); empty: no export.
    pub otlp_endpoint: String,
    /// Share of traces exported, 0.0 to 1.0.
    pub otlp_sample_ratio: f64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, otlp_endpoint: String::new(), otlp_sample_ratio: 1.0 }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.otlp_sample_ratio) {
            bail!("[log] otlp_sample_ratio must be between 0.0 and 1.0, not {}", self.otlp_sample_ratio);
        }
        if !self.otlp_endpoint.is_empty() {
            let uri: http::Uri = self
                .otlp_endpoint
                .parse()
                .with_context(|| format!("[log] otlp_endpoint {:?} is not a URL", self.otlp_endpoint))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                bail!("[log] otlp_endpoint {:?} must look like http://HOST:4317", self.otlp_endpoint);
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Keeps the exporter running; flushes what it holds when dropped.
pub struct Logging {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Logging {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Starts logging to stderr, filtered by `KILN_LOG` (default `info`), and
/// the OTLP export when `config` names an endpoint. Call it inside the
/// tokio runtime (the exporter's connection lives there).
pub fn init_logging(config: &LogConfig) -> Result<Logging> {
    config.validate()?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald, files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let stderr: BoxedLayer = match config.format {
        LogFormat::Text => stderr.with_filter(filter).boxed(),
        LogFormat::Json => {
            stderr.json().with_current_span(true).with_span_list(true).with_filter(filter).boxed()
        }
    };
    let mut layers = vec![stderr];
    let mut provider = None;
    if !config.otlp_endpoint.is_empty() {
        let (layer, p) = otlp_layer(config)?;
        layers.push(layer);
        provider = Some(p);
    }
    tracing_subscriber::registry().with(layers).try_init().context("start logging")?;
    if !config.otlp_endpoint.is_empty() {
        tracing::info!(endpoint = %config.otlp_endpoint, ratio = config.otlp_sample_ratio, "exporting traces over OTLP");
    }
    Ok(Logging { provider })
}

fn otlp_layer(config: &LogConfig) -> Result<(BoxedLayer, opentelemetry_sdk::trace::SdkTracerProvider)> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.otlp_endpoint.clone())
        // Bounds each export, and so how long a stop waits to flush when
        // the collector is gone.
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .with_context(|| format!("[log] otlp_endpoint {}", config.otlp_endpoint))?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(kiln_proto::limits::OTLP_QUEUED_SPANS_MAX)
        .with_scheduled_delay(std::time::Duration::from_secs(1))
        .build();
    let host =
        nix::unistd::gethostname().map_or_else(|_| "unknown".into(), |h| h.to_string_lossy().into_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("kiln")
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attribute(opentelemetry::KeyValue::new("host.name", host))
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batch).build())
        // Calls are sampled where their spans are made (creating a span
        // costs what exporting saves); what is made is exported.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(resource)
        .build();
    kiln_proto::grpc_metrics::sample_spans(config.otlp_sample_ratio);
    let tracer = provider.tracer("kiln");
    // The call and action spans with what happens inside them, and what
    // is logged at info and above. A static filter: each callsite is
    // asked once, so the many disabled trace and debug events of the HTTP
    // stack stay free (a dynamic filter would be asked on every one).
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("kiln_proto::grpc_metrics", tracing::Level::DEBUG)
        .with_target("kiln_worker::runner", tracing::Level::DEBUG)
        .with_default(tracing::Level::INFO);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(filter)
        .boxed();
    Ok((layer, provider))
}
