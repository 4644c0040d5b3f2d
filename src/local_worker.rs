//! `kiln serve`'s local worker, in a process of its own.
//!
//! The worker is the code that handles what actions control: their input
//! trees, outputs, logs and sandboxes. A fault there (a panic outside a
//! slot, an abort, a stack overflow, the kernel's OOM killer) must end the
//! worker, not the cache and the scheduler beside it. So `kiln serve` runs
//! its local worker as `kiln worker --supervised-by PID`, a child process:
//!
//! - **Connection.** Each start gets a fresh connected Unix socket pair:
//!   the child's end is its standard input, `kiln serve`'s end is served by
//!   an internal gRPC server (the worker protocol, CAS and ByteStream)
//!   that authenticates nobody: holding the socket is the credential. There
//!   is no path to open and no port to reach, so no other process (and no
//!   action: the child makes standard input /dev/null at once) can use it.
//! - **Restart.** When the child ends, its session ends with it: the
//!   scheduler requeues the actions it was running (each counts one of its
//!   `attempts_max`) and the supervisor starts a new child after a pause of
//!   1 s, doubled after each child that lived under a minute, at most 60 s.
//!   The new child sweeps what the old one left (build directories,
//!   cgroups, slot disks) before it registers.
//! - **Configuration.** The effective `[execution.worker]`, `[log]` and
//!   `[metrics] enabled` are written to `DATA_DIR/worker/local.toml` when
//!   `kiln serve` starts; every child reads that file, so an edit of the
//!   operator's file takes effect at the next `kiln serve` start, as for
//!   every other setting.
//! - **Lifetime.** The child asks for SIGKILL when the supervisor thread
//!   (which lives as long as `kiln serve`) ends, and exits when the socket
//!   closes: it never outlives `kiln serve`, even after SIGKILL.
//! - **Figures.** The child's metrics listener is on a loopback port it
//!   picks and prints on its standard output (a pipe to the supervisor);
//!   `kiln serve`'s `/metrics` and status page include its worker figures,
//!   read when scraped.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Serialize;

use crate::config::Config;

use kiln_proto::limits::{
    LOCAL_WORKER_HEALTHY_RUN as HEALTHY_RUN, LOCAL_WORKER_METRICS_BYTES_MAX as SCRAPE_BYTES,
    LOCAL_WORKER_METRICS_TIMEOUT as SCRAPE_TIMEOUT, LOCAL_WORKER_READY_WAIT_MAX as READY_WAIT,
    LOCAL_WORKER_RESTART_BACKOFF_MAX as BACKOFF_LONGEST, LOCAL_WORKER_RESTART_BACKOFF_MIN as BACKOFF_FIRST,
};
/// How often `kiln serve` looks whether its local worker has registered.
const READY_POLL: Duration = Duration::from_millis(10);
/// Environment variables of `kiln worker` that must not reach the child
/// from `kiln serve`'s environment: the child's upstream is its socket.
const WORKER_ENV: [&str; 7] = [
    "KILN_SCHEDULER",
    "KILN_CAS",
    "KILN_CONFIG",
    "KILN_TOKEN",
    "KILN_TLS_CA",
    "KILN_TLS_CERT",
    "KILN_TLS_KEY",
];

/// What the child reads: the settings of `kiln serve` it needs.
#[derive(Serialize)]
struct ChildConfig<'a> {
    log: &'a crate::telemetry::LogConfig,
    metrics: ChildMetrics,
    execution: ChildExecution<'a>,
}

#[derive(Serialize)]
struct ChildMetrics {
    enabled: bool,
}

#[derive(Serialize)]
struct ChildExecution<'a> {
    worker: &'a crate::execution::WorkerConfig,
}

/// Writes the child's configuration file; its path.
fn write_child_config(config: &Config) -> Result<PathBuf> {
    let path = child_config_path(&config.data_dir);
    let dir = path.parent().unwrap_or(&config.data_dir);
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let child = ChildConfig {
        log: &config.log,
        metrics: ChildMetrics { enabled: config.metrics.enabled },
        execution: ChildExecution { worker: &config.execution.worker },
    };
    let text = toml::to_string(&child).context("write the local worker's configuration")?;
    kiln_auth::reload::write_atomically(&path, text.as_bytes(), 0o600)?;
    Ok(path)
}

/// What the supervisor knows of the current child.
#[derive(Debug, Default, Clone)]
struct State {
    pid: Option<u32>,
    since: Option<Instant>,
    metrics: Option<SocketAddr>,
    starts: u64,
    exits: u64,
    last_exit: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    stopping: Mutex<bool>,
    stop: Condvar,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits `pause`, or less when asked to stop; whether to go on.
    fn pause(&self, pause: Duration) -> bool {
        let stopping = self.stopping.lock().unwrap_or_else(PoisonError::into_inner);
        let (stopping, _) =
            self.stop.wait_timeout_while(stopping, pause, |s| !*s).unwrap_or_else(PoisonError::into_inner);
        !*stopping
    }

    fn stopping(&self) -> bool {
        *self.stopping.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How to start the child.
#[derive(Debug, Clone)]
struct Spec {
    id: String,
    slots: usize,
    config: PathBuf,
    data_dir: PathBuf,
}

/// The supervised local worker. Dropping it stops restarting the child;
/// the child itself ends when the socket's server stops, or with the
/// process.
#[derive(Debug)]
pub struct LocalWorker {
    id: String,
    shared: Arc<Shared>,
}

impl Drop for LocalWorker {
    fn drop(&mut self) {
        *self.shared.stopping.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.stop.notify_all();
    }
}

impl LocalWorker {
    /// Writes the child's configuration and starts the supervisor thread,
    /// which hands `kiln serve`'s end of each child's socket to `serve`.
    pub fn start(
        config: &Config,
        id: String,
        slots: usize,
        serve: tokio::sync::mpsc::Sender<UnixStream>,
    ) -> Result<Arc<LocalWorker>> {
        let spec = Spec {
            id: id.clone(),
            slots,
            config: write_child_config(config)?,
            data_dir: config.data_dir.clone(),
        };
        let shared = Arc::new(Shared::default());
        let supervisor = shared.clone();
        // The child's parent-death signal follows this thread: it must
        // live as long as the child may.
        std::thread::Builder::new()
            .name("local-worker".into())
            .spawn(move || supervise(&spec, &supervisor, &serve))
            .context("start the local worker's supervisor thread")?;
        let worker = Arc::new(LocalWorker { id, shared });
        kiln_proto::metrics::global().add_collector(worker.clone());
        Ok(worker)
    }

    /// Waits until `registered` says the worker has registered, its first
    /// process has ended (it could not start: its log says why), or
    /// [`READY_WAIT`] has passed; so that `kiln serve` does not answer
    /// its first Execute calls before it has a worker to run them.
    pub async fn ready(&self, registered: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        loop {
            if registered() {
                return;
            }
            if self.shared.state().exits > 0 {
                tracing::warn!(worker = %self.id, "serving without the local worker: its process ended at start");
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(worker = %self.id, wait = ?READY_WAIT, "serving before the local worker registered");
                return;
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// The child's `/metrics`, when it runs and answers in time.
    pub async fn metrics(&self) -> Option<String> {
        let addr = self.shared.state().metrics?;
        let text =
            crate::telemetry::client::get(&addr.to_string(), "/metrics", None, SCRAPE_BYTES, SCRAPE_TIMEOUT)
                .await;
        match text {
            Ok(text) => Some(text),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not read the local worker's metrics");
                None
            }
        }
    }

    /// Its view for the status page.
    pub async fn view(&self) -> crate::telemetry::WorkerView {
        let text = self.metrics().await.unwrap_or_default();
        crate::telemetry::WorkerView::from_metrics(self.id.clone(), &text, self.describe())
    }

    /// The process line of the status page.
    fn describe(&self) -> String {
        let s = self.shared.state().clone();
        let now = match (s.pid, s.since) {
            (Some(pid), Some(since)) => format!("pid {pid}, up {}s", since.elapsed().as_secs()),
            _ => "not running, starting again".to_owned(),
        };
        match s.last_exit {
            Some(exit) => format!("{now}; started {} times, last end: {exit}", s.starts),
            None => now,
        }
    }
}

impl Collector for LocalWorker {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = self.shared.state().clone();
        let family = encoder.encode_descriptor(
            "local_worker_up",
            "1 while the local worker's process runs",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(s.pid.is_some())).encode(family)?;
        let family = encoder.encode_descriptor(
            "local_worker_exits",
            "Times the local worker's process ended (it is started again)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(s.exits).encode(family)
    }
}

/// Starts the child, waits for it, starts it again: until asked to stop.
fn supervise(spec: &Spec, shared: &Arc<Shared>, serve: &tokio::sync::mpsc::Sender<UnixStream>) {
    let mut backoff = BACKOFF_FIRST;
    while !shared.stopping() {
        let started = Instant::now();
        match run_child(spec, shared, serve) {
            Ok(exit) => {
                {
                    let mut s = shared.state();
                    s.exits += 1;
                    s.last_exit = Some(exit.clone());
                }
                if shared.stopping() {
                    break;
                }
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = BACKOFF_FIRST;
                }
                tracing::error!(
                    worker = %spec.id, exit = %exit, restart_in = ?backoff,
                    "the local worker's process ended; the actions it ran go back to the queue"
                );
            }
            Err(e) => {
                tracing::error!(worker = %spec.id, error = %format!("{e:#}"), restart_in = ?backoff,
                    "cannot start the local worker's process");
            }
        }
        if !shared.pause(backoff) {
            break;
        }
        backoff = (backoff * 2).min(BACKOFF_LONGEST);
    }
}

/// One child, from start to end; how it ended.
fn run_child(
    spec: &Spec,
    shared: &Arc<Shared>,
    serve: &tokio::sync::mpsc::Sender<UnixStream>,
) -> Result<String> {
    let (ours, theirs) = UnixStream::pair().context("create the local worker's socket")?;
    let mut command = Command::new("/proc/self/exe");
    command
        .arg("worker")
        .arg("--supervised-by")
        .arg(std::process::id().to_string())
        .arg("--config")
        .arg(&spec.config)
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .arg("--slots")
        .arg(spec.slots.to_string())
        .arg("--id")
        .arg(&spec.id)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for name in WORKER_ENV {
        command.env_remove(name);
    }
    let mut child = command.spawn().context("start kiln worker")?;
    let pid = child.id();
    let generation = {
        let mut s = shared.state();
        s.pid = Some(pid);
        s.since = Some(Instant::now());
        s.starts += 1;
        s.starts
    };
    tracing::info!(worker = %spec.id, pid, "local worker process started");
    if let Some(out) = child.stdout.take() {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("local-worker-out".into())
            .spawn(move || read_announcements(out, &shared, generation))
            .context("start the thread reading the local worker's output")?;
    }
    if serve.blocking_send(ours).is_err() {
        // `kiln serve` is stopping: the child finds its socket closed.
        tracing::debug!("the local worker's socket server has stopped");
    }
    let status = child.wait().context("wait for the local worker's process")?;
    let mut s = shared.state();
    s.pid = None;
    s.since = None;
    s.metrics = None;
    Ok(status.to_string())
}

/// Reads the child's standard output until it closes: the metrics address
/// it prints once, early; the rest is drained so that the child never
/// blocks on a full pipe.
fn read_announcements(out: std::process::ChildStdout, shared: &Shared, generation: u64) {
    use std::io::BufRead;
    for line in std::io::BufReader::new(out).lines().map_while(std::result::Result::ok) {
        if let Some(addr) = line.strip_prefix("kiln: metrics on ").and_then(|a| a.parse().ok()) {
            let mut s = shared.state();
            if s.starts == generation && s.pid.is_some() {
                s.metrics = Some(addr);
            }
        }
    }
}

/// The local worker's id: `local-HOSTNAME`.
pub fn local_id() -> String {
    format!(
        "local-{}",
        nix::unistd::gethostname().map_or_else(|_| "kiln".into(), |h| h.to_string_lossy().into_owned())
    )
}

/// The child's configuration file in a data directory.
pub fn child_config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("worker").join("local.toml")
}
