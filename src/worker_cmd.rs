//! `kiln worker`: a worker on its own machine, connected to a scheduler's
//! worker port and to a CAS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use kiln_proto::kiln::worker::Register;
use kiln_proto::kiln::worker::workers_client::WorkersClient;
use kiln_tools::client::{ClientOptions, connect};
use kiln_worker::grpc_cas::GrpcCasFactory;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The scheduler's worker port: grpc://HOST:PORT or grpcs://HOST:PORT.
    #[arg(long, env = "KILN_SCHEDULER")]
    scheduler: String,
    /// The CAS the actions' inputs and outputs live in [default: the scheduler's host, port 8980].
    #[arg(long, env = "KILN_CAS")]
    cas: Option<String>,
    /// TOML configuration file; only its [execution.worker] section and data_dir are used.
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the worker's build directories and file cache [default: ./kiln-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Actions run at once [default: one per core].
    #[arg(long)]
    slots: Option<usize>,
    /// Worker id [default: HOSTNAME-PID].
    #[arg(long)]
    id: Option<String>,
    /// CA bundle (PEM) to verify grpcs:// servers with.
    #[arg(long, env = "KILN_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mTLS.
    #[arg(long, env = "KILN_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "KILN_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Bearer token (needs the worker permission on the scheduler, and
    /// cas-read and cas-write where actions run).
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Address of the worker's metrics listener and status page (no
    /// authentication: keep it on loopback or a private network);
    /// `[metrics] enabled = false` turns it off.
    #[arg(long, default_value = "127.0.0.1:9981")]
    metrics_listen: std::net::SocketAddr,
}

fn default_cas(scheduler: &str) -> String {
    // grpc://host:8981 -> grpc://host:8980
    match scheduler.rsplit_once(':') {
        Some((host, _)) => format!("{host}:8980"),
        None => scheduler.to_owned(),
    }
}

pub async fn run(args: WorkerArgs) -> Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let data_dir = args.data_dir.clone().unwrap_or(config.data_dir.clone());
    let slots =
        args.slots.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)).max(1);
    let host =
        nix::unistd::gethostname().map_or_else(|_| "kiln".into(), |h| h.to_string_lossy().into_owned());
    let id = args.id.clone().unwrap_or_else(|| format!("{host}-{}", std::process::id()));
    let options = |remote: String| ClientOptions {
        remote,
        tls_ca: args.tls_ca.clone(),
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        token: args.token.clone(),
        basic: None,
    };
    let cas_remote = args.cas.clone().unwrap_or_else(|| default_cas(&args.scheduler));
    let cas = connect(&options(cas_remote.clone()))
        .await
        .with_context(|| format!("connect to the CAS {cas_remote}"))?;
    let runner = Arc::new(crate::execution::runner(
        &config.execution.worker,
        &data_dir,
        &id,
        slots,
        GrpcCasFactory(cas),
    )?);
    let register = Register {
        worker_id: id.clone(),
        properties: crate::execution::worker_properties(
            &config.execution.worker,
            slots,
            runner.disk_limits(),
        ),
        slots: u32::try_from(slots).unwrap_or(u32::MAX),
    };
    tracing::info!(worker = %id, slots, scheduler = %args.scheduler, cas = %cas_remote, "worker starting");
    let _telemetry =
        start_telemetry(&config, &args, &register, &data_dir, &cas_remote, &runner.cache).await?;
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = async {
            let connection = connect(&options(args.scheduler.clone())).await?;
            let mut client = WorkersClient::new(connection.channel());
            let (tx, rx) = tokio::sync::mpsc::channel(kiln_proto::limits::WORKER_SESSION_QUEUE);
            // Register goes first; the session call resolves once the
            // scheduler answers.
            let session = client.session(ReceiverStream::new(rx));
            let register = register.clone();
            let runner = runner.clone();
            let (to_session, from_worker) =
                tokio::sync::mpsc::channel(kiln_proto::limits::WORKER_SESSION_QUEUE);
            let forward = async move {
                let mut from_worker = ReceiverStream::new(from_worker);
                while let Some(m) = from_worker.next().await {
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
            };
            let inbound = futures::stream::once(async move {
                match session.await {
                    Ok(response) => response.into_inner().map(|r| r.map_err(|s| s.to_string())).left_stream(),
                    Err(s) => futures::stream::once(async move { Err(s.to_string()) }).right_stream(),
                }
            })
            .flatten();
            let run = kiln_worker::session::run(runner, register, to_session, Box::pin(inbound));
            let (result, ()) = tokio::join!(run, forward);
            result.map_err(|e| anyhow::anyhow!("{}", e.message()))
        }
        .await;
        match result {
            Ok(()) => {
                tracing::warn!("scheduler ended the session; reconnecting");
                backoff = Duration::from_millis(200);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), ?backoff, "worker session failed; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// The worker's metrics listener: its slots, runs and file cache; the
/// status page shows the same with its configuration.
async fn start_telemetry(
    config: &Config,
    args: &WorkerArgs,
    register: &Register,
    data_dir: &std::path::Path,
    cas: &str,
    cache: &kiln_worker::cache::FileCache,
) -> Result<crate::serve::ServingTask> {
    let mut metrics = config.metrics.clone();
    metrics.listen = args.metrics_listen;
    let properties: Vec<String> =
        register.properties.iter().map(|p| format!("{}={}", p.name, p.value)).collect();
    let summary = vec![
        ("worker".to_owned(), register.worker_id.clone()),
        ("scheduler".to_owned(), args.scheduler.clone()),
        ("CAS".to_owned(), cas.to_owned()),
        ("slots".to_owned(), register.slots.to_string()),
        ("properties".to_owned(), properties.join(",")),
        ("data directory".to_owned(), data_dir.display().to_string()),
    ];
    let sources = crate::telemetry::Sources {
        started: std::time::Instant::now(),
        summary,
        stores: None,
        scheduler: None,
        fetch_log: None,
        worker: Some(Arc::new(crate::telemetry::WorkerCollector::new(
            register.worker_id.clone(),
            cache.clone(),
        ))),
        auth: None,
        history: Arc::default(),
    };
    Ok(crate::serve::ServingTask(crate::telemetry::start(&metrics, sources).await?))
}
