//! What a sandbox costs: `/bin/true` started plainly and in sandboxes, for
//! `kiln bench sandbox` (goal: at most 5 ms more per action).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{SandboxConfig, SandboxError, Spec, prepare, run, run_prepared};

/// `runs` runs of `/bin/true`, plainly and sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overhead {
    pub runs: u32,
    /// All plain runs (`Command::status`).
    pub plain: Duration,
    /// All sandboxed runs made from scratch ([`run`], cgroups and cleanup
    /// included).
    pub sandboxed: Duration,
    /// All sandboxed runs in a sandbox prepared ahead ([`run_prepared`],
    /// cleanup included; the preparing, which a worker does between
    /// actions, not).
    pub prepared: Duration,
}

impl Overhead {
    /// The sandbox's cost per action beyond a plain fork and exec.
    pub fn per_action(&self) -> Duration {
        self.sandboxed.saturating_sub(self.plain) / self.runs.max(1)
    }

    /// The same for a sandbox prepared ahead, as a worker's slots run
    /// every action after their first.
    pub fn per_prepared_action(&self) -> Duration {
        self.prepared.saturating_sub(self.plain) / self.runs.max(1)
    }
}

/// Measures `runs` plain, `runs` sandboxed and `runs` prepared runs of
/// `true`, in alternating turns (so that the machine's slow moments hit
/// all three alike), using `scratch` (an empty directory) for the exec
/// root and output files.
pub fn fork_exec_baseline(
    config: &SandboxConfig,
    scratch: &Path,
    runs: u32,
) -> Result<Overhead, SandboxError> {
    let exec_root = scratch.join("exec");
    std::fs::create_dir_all(&exec_root)
        .and_then(|()| std::os::unix::fs::chown(&exec_root, Some(config.uid), Some(config.gid)))
        .map_err(|e| SandboxError::Setup(format!("cannot prepare {}: {e}", exec_root.display())))?;
    let mut total =
        Overhead { runs, plain: Duration::ZERO, sandboxed: Duration::ZERO, prepared: Duration::ZERO };
    for i in 0..runs {
        let start = Instant::now();
        let status = Command::new("/bin/true")
            .status()
            .map_err(|e| SandboxError::Setup(format!("cannot run /bin/true: {e}")))?;
        if !status.success() {
            return Err(SandboxError::Setup(format!("/bin/true failed: {status}")));
        }
        total.plain += start.elapsed();

        let spec = true_spec(scratch, &exec_root, &format!("bench-{}-{i}", std::process::id()));
        let start = Instant::now();
        check(&run(config, &spec)?)?;
        total.sandboxed += start.elapsed();

        let spec = true_spec(scratch, &exec_root, &format!("bench-{}-{i}-p", std::process::id()));
        let ready = prepare(config, &spec)?;
        let start = Instant::now();
        check(&run_prepared(config, ready, &spec)?)?;
        total.prepared += start.elapsed();
    }
    Ok(total)
}

fn true_spec(scratch: &Path, exec_root: &Path, id: &str) -> Spec {
    Spec {
        id: id.to_owned(),
        exec_root: exec_root.to_owned(),
        working_directory: String::new(),
        arguments: vec!["true".to_owned()],
        environment: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
        stdout: scratch.join("stdout"),
        stderr: scratch.join("stderr"),
        timeout: Duration::from_secs(10),
        kill_grace: Duration::from_secs(1),
        memory_bytes: Some(256 << 20),
        pids_max: Some(64),
        cpu_millicores: None,
        network: false,
    }
}

fn check(outcome: &super::Outcome) -> Result<(), SandboxError> {
    if outcome.exit_code == 0 {
        Ok(())
    } else {
        Err(SandboxError::Setup(format!("true exited with {} in the sandbox", outcome.exit_code)))
    }
}
