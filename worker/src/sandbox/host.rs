//! The worker's side of a run: cgroups, stage 1, the id maps, the
//! deadline, the kill, the cleanup.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;

use super::cgroup::RunCgroup;
use super::limits::{SANDBOX_CLEANUP_TIMEOUT, SANDBOX_KILL_REPORT_TIMEOUT, TMPFS_SIZE_BYTES_DEFAULT};
use super::plan::plan;
use super::prepared::{Prepared, prepare};
use super::protocol::{Event, Go, InitSpec, Report, send_go};
use super::spec::{validate, validate_config};
use super::{Outcome, SandboxConfig, SandboxError, Spec};

fn setup(message: String) -> SandboxError {
    SandboxError::Setup(message)
}

/// Checks that this host can run sandboxes as `config` describes: root,
/// the namespaces, the cgroup controllers, and one real sandbox built (and
/// nothing run in it). The error says what is missing.
pub fn probe(config: &SandboxConfig) -> Result<(), SandboxError> {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    if !nix::unistd::geteuid().is_root() {
        return Err(setup(format!(
            "the worker runs as uid {}, but sandboxes need root: only root may map a sandbox's root to \
             another uid ({})",
            nix::unistd::geteuid(),
            config.uid
        )));
    }
    validate_config(config)?;
    for ns in ["user", "mnt", "pid", "ipc", "uts", "net"] {
        if !Path::new("/proc/self/ns").join(ns).exists() {
            return Err(setup(format!("this kernel has no {ns} namespaces (/proc/self/ns/{ns} is missing)")));
        }
    }
    let user_namespaces = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    if user_namespaces.trim() == "0" {
        return Err(setup("user namespaces are disabled: sysctl user.max_user_namespaces is 0".to_owned()));
    }
    let missing = config.cgroups.missing();
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
        return Err(setup(format!(
            "no cgroup hierarchy serves the {} controller(s) ({}): mount them as cgroup v1, or enable them \
             in cgroup2 for the worker's cgroup; under cgroup2 a worker outside the root cgroup needs a \
             delegated, empty cgroup (Cgroups::detect_under)",
            names.join(", "),
            config.cgroups.describe()
        )));
    }
    let name = format!("probe-{}-{}", std::process::id(), PROBES.fetch_add(1, Ordering::Relaxed));
    let scratch = std::env::temp_dir().join(format!("kiln-sandbox-{name}"));
    let exec_root = scratch.join("exec");
    std::fs::create_dir_all(&exec_root)
        .and_then(|()| std::os::unix::fs::chown(&exec_root, Some(config.uid), Some(config.gid)))
        .map_err(|e| setup(format!("cannot create probe directory {}: {e}", exec_root.display())))?;
    let spec = Spec {
        id: name,
        exec_root,
        working_directory: String::new(),
        arguments: vec!["true".to_owned()],
        environment: Vec::new(),
        stdout: "/dev/null".into(),
        stderr: "/dev/null".into(),
        timeout: Duration::from_secs(10),
        kill_grace: Duration::from_secs(1),
        memory_bytes: None,
        pids_max: None,
        cpu_millicores: None,
        network: false,
    };
    let result = execute(config, &spec, None, true);
    let _ = crate::remove::remove_tree(&scratch);
    match result?.exit_code {
        0 => Ok(()),
        code => Err(setup(format!("the probe sandbox exited with {code}"))),
    }
}

/// Runs `spec` in a sandbox and waits for it, its timeout and its cleanup
/// (blocking: call it from a thread that may block). An `Ok` outcome
/// means nothing of the run is left: no process, no cgroup.
pub fn run(config: &SandboxConfig, spec: &Spec) -> Result<Outcome, SandboxError> {
    execute(config, spec, None, false)
}

/// [`run`] in a sandbox [`prepare`]d for it (see [`Prepared::fits`]).
pub fn run_prepared(
    config: &SandboxConfig,
    prepared: Prepared,
    spec: &Spec,
) -> Result<Outcome, SandboxError> {
    if !prepared.fits(config, spec) {
        return Err(SandboxError::Invalid(format!(
            "the sandbox prepared as {} does not fit run {}",
            prepared.id(),
            spec.id
        )));
    }
    execute(config, spec, Some(prepared), false)
}

fn execute(
    config: &SandboxConfig,
    spec: &Spec,
    prepared: Option<Prepared>,
    dry_run: bool,
) -> Result<Outcome, SandboxError> {
    validate(spec)?;
    validate_config(config)?;
    let plan = plan(config, &spec.exec_root)?;
    let init = InitSpec {
        mounts: plan.mounts,
        working_directory: spec.working_directory.clone(),
        arguments: spec.arguments.clone(),
        environment: spec.environment.clone(),
        network: spec.network,
        tmpfs_size_bytes: spec.memory_bytes.unwrap_or(TMPFS_SIZE_BYTES_DEFAULT),
        dry_run,
    };
    // The worker's own, empty files; stage 1 opens them as their owner.
    for path in [&spec.stdout, &spec.stderr] {
        File::create(path)
            .map_err(|e| setup(format!("cannot create output file {}: {e}", path.display())))?;
    }
    let go = Go { sources: plan.sources, stdout: spec.stdout.clone(), stderr: spec.stderr.clone() };
    let mut prepared = match prepared {
        Some(prepared) => prepared,
        None => prepare(config, spec)?,
    };
    let mut cgroup = prepared.cgroup.take().ok_or_else(|| setup("the sandbox was used before".to_owned()))?;

    let started = SystemTime::now();
    let supervised = supervise(spec, &go, &init, &mut prepared, &cgroup);
    let oom_killed = cgroup.oom_killed();
    let removed = cgroup.remove(SANDBOX_CLEANUP_TIMEOUT);
    let finished = SystemTime::now();
    // Leftovers are the graver news: the worker must stop taking work.
    removed?;
    let ended = supervised?;

    let (exit_code, signal) = match ended.status {
        Some(Report::Exited(code)) => (code, None),
        Some(Report::Signaled(signal)) => (128 + signal, Some(signal)),
        Some(Report::Failed(message)) => return Err(setup(message)),
        Some(Report::CannotExec(message)) => return Err(SandboxError::Exec(message)),
        Some(Report::Ready) | None if ended.timed_out || oom_killed => {
            (128 + Signal::SIGKILL as i32, Some(9))
        }
        Some(Report::Ready) | None => {
            return Err(setup(format!(
                "the sandbox ended without reporting the action's end (stage 1 {})",
                ended.stage1
            )));
        }
    };
    Ok(Outcome { exit_code, signal, timed_out: ended.timed_out, oom_killed, started, finished })
}

/// What the stages told and how the run ended.
#[derive(Debug)]
struct Ended {
    status: Option<Report>,
    timed_out: bool,
    stage1: String,
}

/// Gives the prepared sandbox its go-ahead and follows the run to its end:
/// the timeout's SIGTERM, the grace, the kill.
fn supervise(
    spec: &Spec,
    go: &Go,
    init: &InitSpec,
    prepared: &mut Prepared,
    cgroup: &RunCgroup,
) -> Result<Ended, SandboxError> {
    let lost = |e: std::io::Error| setup(format!("lost the sandbox's control channel: {e}"));
    let mut deadline = later(Instant::now(), spec.timeout);
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let reader = &mut prepared.reader;
    let stage1 = &mut prepared.stage1;
    reader.stream().set_write_timeout(Some(left)).map_err(lost)?;
    send_go(reader.stream(), go, init).map_err(lost)?;
    let mut ended = Ended { status: None, timed_out: false, stage1: String::new() };
    // 0: running; 1: SIGTERM sent; 2: killed.
    let mut phase = 0;
    loop {
        match reader.next(deadline).map_err(lost)? {
            Event::Report(Report::Ready) => return Err(setup("stage 1 sent Ready out of turn".to_owned())),
            Event::Report(report @ (Report::Exited(_) | Report::Signaled(_))) => ended.status = Some(report),
            Event::Report(report @ (Report::Failed(_) | Report::CannotExec(_))) => {
                if ended.status.is_none() {
                    ended.status = Some(report);
                }
            }
            Event::Closed => break,
            Event::Deadline if phase == 0 => {
                ended.timed_out = true;
                stage1.signal(Signal::SIGTERM);
                deadline = later(Instant::now(), spec.kill_grace);
                phase = 1;
            }
            Event::Deadline if phase == 1 => {
                cgroup.kill_all();
                stage1.signal(Signal::SIGKILL);
                deadline = Instant::now() + SANDBOX_KILL_REPORT_TIMEOUT;
                phase = 2;
            }
            Event::Deadline => break,
        }
    }
    if ended.status.is_none() {
        // Ended without a word: make sure nothing lingers before reaping.
        cgroup.kill_all();
    }
    stage1.signal(Signal::SIGKILL);
    ended.stage1 = stage1.reap();
    Ok(ended)
}

/// `from + wait`, or a day later if that does not fit in an `Instant`.
fn later(from: Instant, wait: Duration) -> Instant {
    from.checked_add(wait).unwrap_or_else(|| from + Duration::from_secs(86_400))
}
