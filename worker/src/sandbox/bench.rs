//! What a sandbox costs: `/bin/true` started plainly and in sandboxes, for
//! `kiln bench sandbox` (goal: at most 5 ms more per action).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{SandboxConfig, SandboxError, Spec, run};

/// `runs` runs of `/bin/true`, plainly and sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overhead {
    pub runs: u32,
    /// All plain runs (`Command::status`).
    pub plain: Duration,
    /// All sandboxed runs ([`run`], cgroups and cleanup included).
    pub sandboxed: Duration,
}

impl Overhead {
    /// The sandbox's cost per action beyond a plain fork and exec.
    pub fn per_action(&self) -> Duration {
        self.sandboxed.saturating_sub(self.plain) / self.runs.max(1)
    }
}

/// Measures `runs` plain and `runs` sandboxed runs of `true`, using
/// `scratch` (an empty directory) for the exec root and output files.
pub fn fork_exec_baseline(
    config: &SandboxConfig,
    scratch: &Path,
    runs: u32,
) -> Result<Overhead, SandboxError> {
    let exec_root = scratch.join("exec");
    std::fs::create_dir_all(&exec_root)
        .and_then(|()| std::os::unix::fs::chown(&exec_root, Some(config.uid), Some(config.gid)))
        .map_err(|e| SandboxError::Setup(format!("cannot prepare {}: {e}", exec_root.display())))?;
    let start = Instant::now();
    for _ in 0..runs {
        let status = Command::new("/bin/true")
            .status()
            .map_err(|e| SandboxError::Setup(format!("cannot run /bin/true: {e}")))?;
        if !status.success() {
            return Err(SandboxError::Setup(format!("/bin/true failed: {status}")));
        }
    }
    let plain = start.elapsed();
    let start = Instant::now();
    for i in 0..runs {
        let spec = Spec {
            id: format!("bench-{}-{i}", std::process::id()),
            exec_root: exec_root.clone(),
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
        };
        let outcome = run(config, &spec)?;
        if outcome.exit_code != 0 {
            return Err(SandboxError::Setup(format!(
                "true exited with {} in the sandbox",
                outcome.exit_code
            )));
        }
    }
    Ok(Overhead { runs, plain, sandboxed: start.elapsed() })
}
