//! Init: pid 1 of the sandbox's pid namespace. It builds the root, starts
//! the action, forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to it, reaps
//! every process that ends in the namespace, and when the action ends
//! reports how and exits, which makes the kernel kill everything left.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::prctl::{set_no_new_privs, set_pdeathsig};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{AccessFlags, Pid, access, sethostname};

use super::protocol::{Report, receive_spec, report};
use super::stage1::{channel, signal_fd};
use super::{EXEC_ROOT, netlink, rootfs, seccomp};

/// Where programs are looked up when the action's environment has no
/// `PATH` (what `execvp` uses).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

enum Failure {
    Setup(String),
    Exec(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Setup(message)
    }
}

/// Arguments: the bind sources' descriptors, comma-separated.
pub(super) fn main(args: &[OsString]) -> i32 {
    let Some(channel) = channel() else { return 125 };
    let fds: Option<Vec<RawFd>> = match args.first().and_then(|a| a.to_str()) {
        Some("") => Some(Vec::new()),
        Some(list) => list.split(',').map(|fd| fd.parse().ok()).collect(),
        None => None,
    };
    let Some(fds) = fds else {
        report(&channel, &Report::Failed("init expects its descriptors as an argument".to_owned()));
        return 125;
    };
    match run(&channel, fds) {
        Ok(status) => {
            report(&channel, &status);
            0
        }
        Err(Failure::Setup(message)) => {
            report(&channel, &Report::Failed(message));
            125
        }
        Err(Failure::Exec(message)) => {
            report(&channel, &Report::CannotExec(message));
            127
        }
    }
}

fn run(channel: &UnixStream, fds: Vec<RawFd>) -> Result<Report, Failure> {
    let signals = signal_fd()?;
    // Stage 1 waits for init, so its death means the sandbox is being
    // killed; it is set before init starts anything.
    set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("cannot set the parent-death signal: {e}"))?;
    let spec = receive_spec(channel)?;
    let filter = seccomp::program()?;
    rootfs::build(&spec, &fds)?;
    sethostname("localhost").map_err(|e| format!("cannot set the sandbox's hostname: {e}"))?;
    if !spec.network {
        netlink::loopback_up()?;
    }
    rootfs::enter()?;
    for fd in fds {
        let _ = nix::unistd::close(fd);
    }
    set_no_new_privs().map_err(|e| format!("cannot set no_new_privs: {e}"))?;
    seccomp::install(&filter)?;
    if spec.dry_run {
        return Ok(Report::Exited(0));
    }

    let dir = Path::new(EXEC_ROOT).join(&spec.working_directory);
    std::env::set_current_dir(&dir).map_err(|e| {
        Failure::Exec(format!("working directory {:?} in the exec root: {e}", spec.working_directory))
    })?;
    let name = &spec.arguments[0];
    let path_var = spec.environment.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
    let program = resolve(name, path_var.unwrap_or(DEFAULT_PATH)).ok_or_else(|| {
        Failure::Exec(format!(
            "program {name:?} not found in PATH {:?} inside the sandbox",
            path_var.unwrap_or(DEFAULT_PATH)
        ))
    })?;
    let child = Command::new(&program)
        .arg0(name)
        .args(&spec.arguments[1..])
        .env_clear()
        .envs(spec.environment.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Failure::Exec(format!("cannot execute {}: {e}", program.display())))?;
    let action =
        Pid::from_raw(i32::try_from(child.id()).map_err(|_| "the action's pid is out of range".to_owned())?);
    drop(child);

    loop {
        let Some(info) = signals.read_signal().map_err(|e| format!("cannot read signals: {e}"))? else {
            continue;
        };
        match i32::try_from(info.ssi_signo).ok().and_then(|s| Signal::try_from(s).ok()) {
            Some(Signal::SIGCHLD) => {
                if let Some(status) = reap(action) {
                    return Ok(status);
                }
            }
            Some(signal) => {
                let _ = kill(action, signal);
            }
            None => {}
        }
    }
}

/// Reaps every child that has ended; the action's end, if it is among
/// them.
fn reap(action: Pid) -> Option<Report> {
    let mut ended = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == action => ended = Some(Report::Exited(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == action => {
                ended = Some(Report::Signaled(signal as i32));
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return ended,
            Ok(_) => {}
        }
    }
}

/// `name` as `execvp` would find it: as given when it holds a `/`, else
/// the first executable file of that name in `path`.
fn resolve(name: &str, path: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    path.split(':').map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name)).find(
        |candidate| {
            candidate.metadata().is_ok_and(|m| m.is_file()) && access(candidate, AccessFlags::X_OK).is_ok()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_like_execvp() {
        assert_eq!(resolve("./tool", "/nowhere"), Some(PathBuf::from("./tool")));
        assert_eq!(resolve("sh", "/nowhere:/bin:/usr/bin"), Some(PathBuf::from("/bin/sh")));
        assert_eq!(resolve("kiln-no-such-program", "/bin:/usr/bin"), None);
        // A directory of that name is not a program.
        assert_eq!(resolve("bin", "/usr"), None);
    }
}
