//! A sandbox made ahead of its action: the run's cgroups created, stage 1
//! started in them, its user namespace mapped, waiting for the go-ahead.
//! What costs the most of a sandbox's start (executing stage 1, and
//! moving it into cgroups, which waits for an RCU grace period) is then
//! off the action's path: a worker's slot prepares its next sandbox as
//! soon as a run ends (`crate::slots`).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::cgroup::{Limits, RunCgroup};
use super::limits::{SANDBOX_CLEANUP_TIMEOUT, SANDBOX_PREPARE_TIMEOUT};
use super::protocol::{Event, Report, ReportReader};
use super::spec::validate_config;
use super::{STAGE1, SandboxConfig, SandboxError, Spec};

fn setup(message: String) -> SandboxError {
    SandboxError::Setup(message)
}

/// Stage 1, killed and reaped if it is still there when dropped.
#[derive(Debug)]
pub(super) struct Stage1(Option<Child>);

impl Stage1 {
    pub(super) fn pid(&self) -> Option<Pid> {
        let child = self.0.as_ref()?;
        i32::try_from(child.id()).ok().map(Pid::from_raw)
    }

    pub(super) fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            // Our unreaped child: the pid cannot belong to anyone else.
            let _ = kill(pid, signal);
        }
    }

    pub(super) fn reap(&mut self) -> String {
        match self.0.take().map(|mut child| child.wait()) {
            Some(Ok(status)) => status.to_string(),
            Some(Err(e)) => format!("cannot be waited for: {e}"),
            None => "was already reaped".to_owned(),
        }
    }
}

impl Drop for Stage1 {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A sandbox waiting for its action. Dropped unused, its stage 1 is killed
/// and its cgroups removed.
#[derive(Debug)]
pub struct Prepared {
    pub(super) id: String,
    pub(super) network: bool,
    pub(super) limits: Limits,
    pub(super) uid: u32,
    pub(super) stage1: Stage1,
    pub(super) reader: ReportReader,
    /// Taken by the run that uses it.
    pub(super) cgroup: Option<RunCgroup>,
}

impl Prepared {
    /// The id its cgroups are named by, which the run must carry.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether its stage 1 still waits (it dies with a cancelled run's
    /// cgroup, or by an operator's hand).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.stage1.0.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Whether `spec` can run in it: same id, network choice, limits and
    /// uid.
    pub fn fits(&self, config: &SandboxConfig, spec: &Spec) -> bool {
        self.id == spec.id
            && self.network == spec.network
            && self.limits == limits_of(spec)
            && self.uid == config.uid
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(mut cgroup) = self.cgroup.take() {
            self.stage1.signal(Signal::SIGKILL);
            self.stage1.reap();
            cgroup.kill_all();
            if let Err(e) = cgroup.remove(SANDBOX_CLEANUP_TIMEOUT) {
                tracing::warn!(id = %self.id, error = %e, "could not remove an unused sandbox's cgroups");
            }
        }
    }
}

pub(super) fn limits_of(spec: &Spec) -> Limits {
    Limits { memory_bytes: spec.memory_bytes, pids_max: spec.pids_max, cpu_millicores: spec.cpu_millicores }
}

/// Makes a sandbox for a run with `spec`'s id, network choice and limits
/// (its arguments, files and timeout come with [`super::run_prepared`]).
/// Blocks until stage 1 is ready; the thread that calls it must outlive
/// the run, since stage 1 dies with it (its parent-death signal).
pub fn prepare(config: &SandboxConfig, spec: &Spec) -> Result<Prepared, SandboxError> {
    validate_config(config)?;
    let limits = limits_of(spec);
    let cgroup = RunCgroup::create(&config.cgroups, &spec.id, limits)?;
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| setup(format!("cannot create a socket pair: {e}")))?;
    let child = Command::new(&config.kiln_binary)
        .arg(STAGE1)
        .arg(if spec.network { "net" } else { "isolated" })
        .arg(std::process::id().to_string())
        .env_clear()
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| setup(format!("cannot start {}: {e}", config.kiln_binary.display())))?;
    let mut prepared = Prepared {
        id: spec.id.clone(),
        network: spec.network,
        limits,
        uid: config.uid,
        stage1: Stage1(Some(child)),
        reader: ReportReader::new(ours),
        cgroup: Some(cgroup),
    };
    // At once, while stage 1 starts up: moving a process between cgroups
    // waits for an RCU grace period (milliseconds) unless the hierarchy
    // is mounted with `favordynmods`. Stage 1 starts nothing before Go.
    let pid = prepared.stage1.pid().ok_or_else(|| setup("stage 1 has no pid".to_owned()))?;
    if let Some(cgroup) = &prepared.cgroup {
        cgroup.attach(u32::try_from(pid.as_raw()).unwrap_or(0))?;
    }
    let deadline = Instant::now() + SANDBOX_PREPARE_TIMEOUT;
    match prepared
        .reader
        .next(deadline)
        .map_err(|e| setup(format!("lost the sandbox's control channel: {e}")))?
    {
        Event::Report(Report::Ready) => {}
        Event::Report(Report::Failed(message)) => return Err(setup(message)),
        other => {
            let status = prepared.stage1.reap();
            return Err(setup(format!("stage 1 did not get ready ({other:?}; it {status})")));
        }
    }
    map_ids(pid, config.uid, config.gid)?;
    Ok(prepared)
}

/// Maps root of stage 1's new user namespace to the sandbox's uid and gid,
/// and denies it `setgroups`.
fn map_ids(pid: Pid, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let proc = std::path::Path::new("/proc").join(pid.to_string());
    for (file, content) in [
        ("setgroups", "deny".to_owned()),
        ("uid_map", format!("0 {uid} 1\n")),
        ("gid_map", format!("0 {gid} 1\n")),
    ] {
        std::fs::write(proc.join(file), &content)
            .map_err(|e| setup(format!("cannot write {content:?} to /proc/{pid}/{file}: {e}")))?;
    }
    Ok(())
}
