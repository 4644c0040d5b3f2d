//! Running one assigned action: fetch the Command, materialize the inputs
//! from the file cache, run the command in the sandbox, collect and upload
//! the outputs, and report an ActionResult with its execution metadata.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiln_proto::kiln::worker::{Assign, Finished};
use kiln_proto::reapi::{self, ActionResult, ExecutedActionMetadata};
use kiln_proto::{Code, Digest, DigestFunction, Error, Result};
use prost::Message;
use tracing::Instrument;

use crate::cache::FileCache;
use crate::cas::CasClient;
use crate::disk::{RunDisk, SlotDisks};
use crate::inputs::{self, MaterializeError};
use crate::outputs;
use crate::outputs::OutputLimits;
use crate::sandbox::{self, SandboxConfig, SandboxError};

/// The platform property an action sets to `host` to share the host's
/// network (workers that allow it offer `network=host`).
pub const NETWORK_PROPERTY: &str = "network";
/// The platform property a worker with per-slot disks offers: each
/// action's disk in bytes (matched as a minimum).
pub const DISK_PROPERTY: &str = "disk-bytes";

/// Gives the CAS client for an action's instance and digest function.
pub trait CasFactory: Send + Sync + 'static {
    type Client: CasClient;
    fn client(&self, instance: &str, function: DigestFunction) -> Self::Client;
}

/// The prefix of this worker's run ids (and so of its runs' cgroups),
/// apart from other workers' on the host: derived from its build
/// directory, which a worker owns (it empties it at start) and which
/// stays the same across restarts, unlike its id. Ends with `_`, which
/// the rest of a run id never holds.
pub fn run_prefix(build_dir: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let hash = kiln_proto::DigestFunction::Sha256.compute(build_dir.as_os_str().as_bytes()).hash_hex();
    format!("{}_", &hash[..12])
}

/// What every action on this worker shares.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub worker_id: String,
    /// Per-execution directories are made below it (same filesystem as
    /// the file cache).
    pub build_dir: PathBuf,
    pub sandbox: SandboxConfig,
    /// Host uid and gid the sandbox of slot `i` maps to: base + i.
    pub uid_base: u32,
    /// Per-action limits.
    pub memory_bytes: Option<u64>,
    pub pids_max: Option<u64>,
    pub cpu_millicores: Option<u64>,
    /// Whether actions may ask for the host network.
    pub allow_host_network: bool,
    pub kill_grace: Duration,
    /// Variables every action gets unless its Command sets them.
    pub environment: Vec<(String, String)>,
    /// Bounds on collecting each action's outputs and logs.
    pub outputs: OutputLimits,
    /// Each slot's filesystem, where actions write; `None`: actions write
    /// in the build directory, unbounded.
    pub disks: Option<Arc<SlotDisks>>,
}

/// Runs actions; shared by the worker's slots.
pub struct Runner<F> {
    pub config: RunnerConfig,
    pub cache: FileCache,
    pub cas: F,
    /// Each slot's sandbox thread, which prepares its next sandbox ahead.
    pub slots: crate::slots::Slots,
}

impl<F> std::fmt::Debug for Runner<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("worker", &self.config.worker_id).finish_non_exhaustive()
    }
}

fn finished(execution_id: &str, code: tonic::Code, message: String) -> Finished {
    Finished { execution_id: execution_id.to_owned(), code: code as i32, message, ..Default::default() }
}

fn error_code(code: Code) -> tonic::Code {
    tonic::Code::from(code)
}

/// The Command's variables, then the worker's defaults it does not set.
fn action_environment(
    command: &[kiln_proto::reapi::command::EnvironmentVariable],
    defaults: &[(String, String)],
) -> Vec<(String, String)> {
    let mut environment: Vec<(String, String)> =
        command.iter().map(|v| (v.name.clone(), v.value.clone())).collect();
    for (name, value) in defaults {
        if !command.iter().any(|v| &v.name == name) {
            environment.push((name.clone(), value.clone()));
        }
    }
    environment
}

/// What an assignment asks, read and checked.
struct Job<C> {
    function: DigestFunction,
    input_root: Digest,
    command: reapi::Command,
    network: bool,
    cas: C,
}

/// The Finished that reports `digests` missing from the CAS.
fn missing(assign: &Assign, digests: &[Digest]) -> Finished {
    let mut f = finished(
        &assign.execution_id,
        tonic::Code::FailedPrecondition,
        format!("{} blob(s) missing from the CAS", digests.len()),
    );
    f.missing_blobs = digests.iter().map(|d| format!("{}/{}", d.hash_hex(), d.size_bytes())).collect();
    f
}

/// Keeps an execution's directory until the run ends, then removes it.
struct ExecDir(PathBuf);

impl Drop for ExecDir {
    fn drop(&mut self) {
        let dir = std::mem::take(&mut self.0);
        let remove = move || {
            // The action shaped this tree: removed without recursion.
            if let Err(e) = crate::remove::remove_tree(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove an execution directory");
            }
        };
        // An input tree can hold a million links: remove it on the
        // blocking pool, not on an async thread.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// Counts a run in `kiln_worker_running_actions` while it lives.
struct Running;

impl Running {
    fn start() -> Running {
        kiln_proto::metrics::global().worker_running.inc();
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        kiln_proto::metrics::global().worker_running.dec();
    }
}

/// Kills a sandbox whose run was abandoned, or keeps it from starting.
struct KillOnDrop {
    config: SandboxConfig,
    id: String,
    cancelled: Arc<std::sync::atomic::AtomicBool>,
    armed: bool,
}

impl KillOnDrop {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.armed {
            // Not started: it never will. Started: its pid namespace's init
            // dies, the kernel takes the rest, and the slot's thread cleans
            // up. The flag goes first: the slot checks it once the run's
            // cgroups exist.
            self.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
            self.config.cgroups.kill_run(&self.id);
        }
    }
}

impl<F: CasFactory> Runner<F> {
    /// Each action's disk, when slots have disks of their own.
    pub fn disk_limits(&self) -> Option<crate::disk::DiskLimits> {
        self.config.disks.as_ref().map(|d| d.limits())
    }

    /// Runs `assign` on slot `slot`; always answers with a Finished.
    pub async fn run(self: &Arc<Self>, assign: &Assign, slot: u32) -> Finished {
        // Every event of the run carries its execution name, which the
        // scheduler's log ties to the client's operation name.
        let span = tracing::info_span!("action", execution = %safe_name(&assign.execution_id));
        let _running = Running::start();
        match self.try_run(assign, slot).instrument(span).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(execution = %assign.execution_id, error = %e, "action could not run");
                let code = match e.code() {
                    Code::NotFound => tonic::Code::FailedPrecondition,
                    // What another attempt cannot fix reaches the client as
                    // it is, run once: a broken request, a limit the action
                    // passed (an output larger than the store takes).
                    Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted
                    | Code::OutOfRange
                    | Code::Unimplemented => error_code(e.code()),
                    // Everything else is this worker's trouble (its disk,
                    // its sandbox, its connection, a damaged copy the store
                    // has since dropped), which the scheduler retries.
                    _ => tonic::Code::Internal,
                };
                finished(&assign.execution_id, code, e.message().to_owned())
            }
        }
    }

    async fn try_run(self: &Arc<Self>, assign: &Assign, slot: u32) -> Result<Finished> {
        let worker_start = SystemTime::now();
        let job = match self.read_job(assign).await? {
            Ok(job) => job,
            Err(missing) => return Ok(missing),
        };
        let name = safe_name(&assign.execution_id);
        // Unique across runs and worker processes.
        let run_id =
            format!("{}{name}-{}", run_prefix(&self.config.build_dir), uuid::Uuid::new_v4().simple());
        let dir = self.config.build_dir.join(&run_id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("create {}: {e}", dir.display())))?;
        let dir = ExecDir(dir);
        let uid = self.config.uid_base + slot;

        let fetch_start = SystemTime::now();
        let inputs = dir.0.join("root");
        if let Some(missing) = self.stage_inputs(assign, &job, &inputs, uid).await? {
            return Ok(missing);
        }
        let fetch_done = SystemTime::now();

        let (run_disk, exec_root) = self.mount_disk(slot, &run_id, &dir.0, inputs).await?;
        let log = |name: &str| run_disk.as_ref().map_or_else(|| dir.0.join(name), |d| d.log_path(name));
        let logs = (log("stdout"), log("stderr"));
        let outcome = self.sandboxed(assign, slot, &job, &exec_root, &logs).await?;
        if let Some(why) = run_disk.as_ref().and_then(RunDisk::exhausted) {
            return Err(Error::resource_exhausted(why));
        }

        let upload_start = SystemTime::now();
        let mut result = self.collect(&job, outcome.exit_code, &exec_root, &logs).await?;
        let upload_done = SystemTime::now();
        result.execution_metadata = Some(ExecutedActionMetadata {
            worker: self.config.worker_id.clone(),
            worker_start_timestamp: Some(kiln_proto::timestamp(worker_start)),
            input_fetch_start_timestamp: Some(kiln_proto::timestamp(fetch_start)),
            input_fetch_completed_timestamp: Some(kiln_proto::timestamp(fetch_done)),
            execution_start_timestamp: Some(kiln_proto::timestamp(outcome.started)),
            execution_completed_timestamp: Some(kiln_proto::timestamp(outcome.finished)),
            output_upload_start_timestamp: Some(kiln_proto::timestamp(upload_start)),
            output_upload_completed_timestamp: Some(kiln_proto::timestamp(upload_done)),
            worker_completed_timestamp: Some(kiln_proto::timestamp(SystemTime::now())),
            ..Default::default()
        });
        let (code, message) = if outcome.timed_out {
            (tonic::Code::DeadlineExceeded, format!("the action timed out after {} ms", assign.timeout_ms))
        } else if outcome.oom_killed {
            (tonic::Code::Ok, "the action was killed: it exceeded its memory limit".to_owned())
        } else {
            (tonic::Code::Ok, String::new())
        };
        let mut f = finished(&assign.execution_id, code, message);
        f.action_result = result.encode_to_vec();
        if let Some(disk) = run_disk {
            disk.clear().await;
        }
        Ok(f)
    }

    /// The Action and its Command, or the Finished that reports the
    /// Command missing.
    async fn read_job(&self, assign: &Assign) -> Result<std::result::Result<Job<F::Client>, Finished>> {
        let function = DigestFunction::from_name(&assign.digest_function).ok_or_else(|| {
            Error::invalid_argument(format!("unknown digest function {}", assign.digest_function))
        })?;
        let action = reapi::Action::decode(assign.action.as_slice())
            .map_err(|e| Error::invalid_argument(format!("the Action does not decode: {e}")))?;
        let command_digest =
            Digest::from_required(Some(function), action.command_digest.as_ref(), "command_digest")?;
        let input_root =
            Digest::from_required(Some(function), action.input_root_digest.as_ref(), "input_root_digest")?;
        let cas = self.cas.client(&assign.instance_name, function);
        let command = match cas.read_bytes(&command_digest).await {
            Ok(bytes) => reapi::Command::decode(bytes.as_ref())
                .map_err(|e| Error::invalid_argument(format!("the Command does not decode: {e}")))?,
            Err(e) if e.is_not_found() => return Ok(Err(missing(assign, &[command_digest]))),
            Err(e) => return Err(e),
        };
        if command.arguments.is_empty() {
            return Err(Error::invalid_argument("the Command has no arguments"));
        }
        let network = action
            .platform
            .iter()
            .flat_map(|p| p.properties.iter())
            .any(|p| p.name == NETWORK_PROPERTY && p.value == "host");
        if network && !self.config.allow_host_network {
            return Err(Error::new(Code::FailedPrecondition, "this worker does not offer the host network"));
        }
        Ok(Ok(Job { function, input_root, command, network, cas }))
    }

    /// Materializes the input tree at `root` for the sandbox's `uid`, with
    /// the outputs' parents; the Finished that reports missing inputs.
    async fn stage_inputs(
        &self,
        assign: &Assign,
        job: &Job<F::Client>,
        root: &std::path::Path,
        uid: u32,
    ) -> Result<Option<Finished>> {
        let owner = Some((uid, uid));
        match inputs::materialize(&self.cache, &job.cas, job.function, &job.input_root, root, owner).await {
            Ok(stats) => tracing::debug!(
                files = stats.files,
                bytes = stats.bytes,
                fetched = stats.cache_misses,
                ms = stats.duration.as_millis(),
                "inputs fetched"
            ),
            Err(MaterializeError::MissingInputs(digests)) => return Ok(Some(missing(assign, &digests))),
            Err(MaterializeError::Failed(e)) => return Err(e),
        }
        let (root, cmd) = (root.to_owned(), job.command.clone());
        tokio::task::spawn_blocking(move || {
            inputs::prepare_outputs(&root, &cmd.working_directory, &cmd, owner)
        })
        .await
        .map_err(|e| Error::internal(format!("prepare outputs: {e}")))??;
        Ok(None)
    }

    /// Runs the job's command in `slot`'s sandbox, its logs going to `logs`.
    async fn sandboxed(
        &self,
        assign: &Assign,
        slot: u32,
        job: &Job<F::Client>,
        exec_root: &std::path::Path,
        logs: &(PathBuf, PathBuf),
    ) -> Result<sandbox::Outcome> {
        let uid = self.config.uid_base + slot;
        let spec = sandbox::Spec {
            id: self.slots.next_id(slot),
            exec_root: exec_root.to_owned(),
            working_directory: job.command.working_directory.clone(),
            arguments: job.command.arguments.clone(),
            environment: action_environment(&job.command.environment_variables, &self.config.environment),
            stdout: logs.0.clone(),
            stderr: logs.1.clone(),
            timeout: Duration::from_millis(assign.timeout_ms),
            kill_grace: self.config.kill_grace,
            memory_bytes: self.config.memory_bytes,
            pids_max: self.config.pids_max,
            cpu_millicores: self.config.cpu_millicores,
            network: job.network,
        };
        let mut sandbox_config = self.config.sandbox.clone();
        sandbox_config.uid = uid;
        sandbox_config.gid = uid;
        // If this run is abandoned (cancelled, or its session ended), the
        // guard kills what the sandbox runs.
        let cancelled = Arc::default();
        let guard = KillOnDrop {
            config: sandbox_config.clone(),
            id: spec.id.clone(),
            cancelled: Arc::clone(&cancelled),
            armed: true,
        };
        let outcome = self.slots.run(slot, sandbox_config, spec, cancelled).await.map_err(|e| match e {
            // The request's fault: not retried elsewhere.
            SandboxError::Invalid(_) | SandboxError::Exec(_) => {
                run_outcome("refused");
                Error::invalid_argument(e.to_string())
            }
            // This worker's: the scheduler retries on another.
            SandboxError::Setup(_) | SandboxError::Cleanup(_) => {
                run_outcome("sandbox_error");
                tracing::warn!(error = %e, "sandbox failed");
                Error::internal(e.to_string())
            }
        })?;
        run_outcome(if outcome.timed_out {
            "timeout"
        } else if outcome.oom_killed {
            "oom"
        } else {
            "exited"
        });
        guard.disarm();
        tracing::debug!(
            exit_code = outcome.exit_code,
            timed_out = outcome.timed_out,
            oom_killed = outcome.oom_killed,
            ms = outcome.finished.duration_since(outcome.started).unwrap_or_default().as_millis(),
            "executed"
        );
        Ok(outcome)
    }

    /// The ActionResult: outputs and logs uploaded, within the collection's
    /// bounds.
    async fn collect(
        &self,
        job: &Job<F::Client>,
        exit_code: i32,
        exec_root: &std::path::Path,
        logs: &(PathBuf, PathBuf),
    ) -> Result<ActionResult> {
        let start = std::time::Instant::now();
        let mut result = ActionResult { exit_code, ..Default::default() };
        let limits = &self.config.outputs;
        let deadline = limits.deadline();
        outputs::collect_with_limits(&job.cas, job.function, exec_root, &job.command, limits, deadline)
            .await?
            .apply_to(&mut result);
        for (log, digest) in [(&logs.0, &mut result.stdout_digest), (&logs.1, &mut result.stderr_digest)] {
            *digest =
                Some(outputs::upload_log(&job.cas, job.function, log, limits, deadline).await?.to_proto());
        }
        tracing::debug!(
            files = result.output_files.len(),
            directories = result.output_directories.len(),
            ms = start.elapsed().as_millis(),
            "outputs uploaded"
        );
        Ok(result)
    }

    /// With per-slot disks, mounts the run's exec root (an overlay of the
    /// input tree at `lower` and the slot's filesystem) and returns it
    /// with where the action sees its files; without, `lower` itself.
    async fn mount_disk(
        &self,
        slot: u32,
        run_id: &str,
        dir: &std::path::Path,
        lower: PathBuf,
    ) -> Result<(Option<RunDisk>, PathBuf)> {
        let Some(disks) = self.config.disks.clone() else { return Ok((None, lower)) };
        let merged = dir.join("exec");
        let (run, target) = (run_id.to_owned(), merged.clone());
        let disk = tokio::task::spawn_blocking(move || disks.mount(slot, &run, &lower, &target))
            .await
            .map_err(|e| Error::internal(format!("mounting the exec root: {e}")))?
            .map_err(Error::internal)?;
        Ok((Some(disk), merged))
    }
}

/// An execution name as the scheduler makes them (`e42`), kept to
/// characters safe in paths and logs whatever a scheduler sends.
fn safe_name(execution_id: &str) -> String {
    execution_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect()
}

/// Counts a sandboxed run by how it ended.
fn run_outcome(outcome: &'static str) {
    let labels = kiln_proto::metrics::OutcomeLabels { outcome };
    kiln_proto::metrics::global().worker_runs.get_or_create(&labels).inc();
}
