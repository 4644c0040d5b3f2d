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
    #[arg(long, env = "KILN_SCHEDULER", required_unless_present = "supervised_by")]
    scheduler: Option<String>,
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
    /// Run as `kiln serve`'s local worker, started by the process PID:
    /// the scheduler and the CAS are reached over the connected Unix
    /// socket on standard input; the worker ends when that socket closes
    /// or when PID ends, and PID starts it again.
    #[arg(long, hide = true, conflicts_with_all = ["scheduler", "cas", "token", "tls_ca", "tls_cert"])]
    supervised_by: Option<u32>,
}

/// Where the worker's scheduler and CAS are.
enum Upstream {
    /// Dialled, and dialled again after a session ends.
    Remote { scheduler: String, options: ClientOptions },
    /// One connection, inherited from the supervising `kiln serve`.
    Inherited(kiln_tools::client::Connection),
}

impl Upstream {
    fn describe(&self) -> String {
        match self {
            Upstream::Remote { scheduler, .. } => scheduler.clone(),
            Upstream::Inherited(_) => "the supervising kiln serve".to_owned(),
        }
    }
}

/// The connection a supervising `kiln serve` handed over on standard
/// input. Standard input becomes /dev/null, so that no process the worker
/// starts inherits it; the worker dies with the supervisor.
async fn inherited_connection(parent: u32) -> Result<kiln_tools::client::Connection> {
    use std::os::fd::AsFd;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("set the parent-death signal")?;
    // The parent may have ended before the signal was set.
    let ppid = nix::unistd::getppid().as_raw();
    if u32::try_from(ppid).ok() != Some(parent) {
        anyhow::bail!("the supervising kiln serve (pid {parent}) has ended");
    }
    let socket = std::io::stdin().as_fd().try_clone_to_owned().context("standard input")?;
    let null = std::fs::File::open("/dev/null").context("open /dev/null")?;
    nix::unistd::dup2_stdin(&null).context("replace standard input")?;
    let socket = std::os::unix::net::UnixStream::from(socket);
    socket.set_nonblocking(true).context("standard input is not the supervisor's socket")?;
    let socket = tokio::net::UnixStream::from_std(socket).context("standard input is not a socket")?;
    kiln_tools::client::connect_stream(socket).await
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
    let (upstream, cas, cas_remote) = match (args.supervised_by, &args.scheduler) {
        (Some(parent), _) => {
            let connection = inherited_connection(parent).await?;
            (Upstream::Inherited(connection.clone()), connection, "the supervising kiln serve".to_owned())
        }
        (None, Some(scheduler)) => {
            let cas_remote = args.cas.clone().unwrap_or_else(|| default_cas(scheduler));
            let cas = connect(&options(cas_remote.clone()))
                .await
                .with_context(|| format!("connect to the CAS {cas_remote}"))?;
            let upstream =
                Upstream::Remote { scheduler: scheduler.clone(), options: options(scheduler.clone()) };
            (upstream, cas, cas_remote)
        }
        (None, None) => anyhow::bail!("--scheduler is required"),
    };
    let runner = Arc::new(crate::execution::runner(
        &config.execution.worker,
        &data_dir,
        &id,
        slots,
        GrpcCasFactory::new(cas, Duration::from_secs(10)).await,
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
    let scheduler = upstream.describe();
    tracing::info!(worker = %id, slots, %scheduler, cas = %cas_remote, "worker starting");
    let _telemetry =
        start_telemetry(&config, &args, &register, &data_dir, &scheduler, &cas_remote, &runner.cache).await?;
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = async {
            let connection = match &upstream {
                Upstream::Remote { options, .. } => connect(options).await?,
                Upstream::Inherited(connection) => connection.clone(),
            };
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
        if let Upstream::Inherited(_) = upstream {
            // The supervisor starts a fresh worker with a fresh connection.
            let why = result.err().map_or_else(|| "it ended".to_owned(), |e| format!("{e:#}"));
            anyhow::bail!("the session with the supervising kiln serve ended: {why}");
        }
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
    scheduler: &str,
    cas: &str,
    cache: &kiln_worker::cache::FileCache,
) -> Result<crate::serve::ServingTask> {
    let mut metrics = config.metrics.clone();
    metrics.listen = args.metrics_listen;
    let properties: Vec<String> =
        register.properties.iter().map(|p| format!("{}={}", p.name, p.value)).collect();
    let summary = vec![
        ("worker".to_owned(), register.worker_id.clone()),
        ("scheduler".to_owned(), scheduler.to_owned()),
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
        local_worker: None,
        auth: None,
        history: Arc::default(),
    };
    Ok(crate::serve::ServingTask(crate::telemetry::start(&metrics, sources).await?))
}
