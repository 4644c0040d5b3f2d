//! Stage 1: a fresh, single-threaded process that enters a new user
//! namespace, waits for the worker to map its ids, creates the other
//! namespaces and starts init, the first process of the new pid namespace.
//! It then forwards the worker's SIGTERM to init and exits with it.
//!
//! It opens init's bind sources in the new mount namespace while its uid
//! is still the worker's root (unmapped, without capabilities on the host,
//! but the owner of root's directories), then takes the sandbox's uid.
//!
//! Arguments: `net` or `isolated`, then the worker's pid.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, unshare};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid, getppid, setgroups, setresgid, setresuid};

use super::protocol::{Go, Report, SourcePath, report, wait_go};
use super::{INIT, keyring};

/// Signals stage 1 and init handle through a signalfd.
pub(super) fn handled_signals() -> SigSet {
    let mut mask = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT] {
        mask.add(signal);
    }
    mask
}

/// Blocks [`handled_signals`] and returns a signalfd for them; children
/// start with an empty mask again (`Command` resets it).
pub(super) fn signal_fd() -> Result<SignalFd, String> {
    let mask = handled_signals();
    mask.thread_block().map_err(|e| format!("cannot block signals: {e}"))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).map_err(|e| format!("cannot create a signalfd: {e}"))
}

/// Closes every descriptor above stderr: nothing the worker's process may
/// have left inheritable reaches the sandbox.
pub(super) fn close_stray_fds() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> =
        entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|fd| *fd > 2).collect();
    for fd in fds {
        // The directory's own descriptor is already closed: EBADF.
        let _ = nix::unistd::close(fd);
    }
}

/// The control channel, stdin, as a socket of this stage's own.
pub(super) fn channel() -> Option<UnixStream> {
    std::io::stdin().as_fd().try_clone_to_owned().ok().map(UnixStream::from)
}

pub(super) fn main(args: &[OsString]) -> i32 {
    close_stray_fds();
    let Some(channel) = channel() else { return 125 };
    match run(args, &channel) {
        Ok(code) => code,
        Err(message) => {
            report(&channel, &Report::Failed(message));
            125
        }
    }
}

fn run(args: &[OsString], channel: &UnixStream) -> Result<i32, String> {
    let network = match args.first().and_then(|a| a.to_str()) {
        Some("net") => true,
        Some("isolated") => false,
        other => return Err(format!("stage 1 expects `net` or `isolated`, got {other:?}")),
    };
    let worker = args
        .get(1)
        .and_then(|a| a.to_str())
        .and_then(|a| a.parse::<i32>().ok())
        .ok_or("stage 1 expects the worker's pid")?;

    // Still the worker's root: drop root's supplementary groups, which an
    // unmapped group would otherwise keep granting on the host's files.
    setgroups(&[]).map_err(|e| format!("cannot drop supplementary groups: {e}"))?;
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| format!("cannot create a user namespace: {e}"))?;
    report(channel, &Report::Ready);
    let go = wait_go(channel)?;
    take_logs(&go)?;
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("cannot create a mount namespace: {e}"))?;
    // Inherited by init (no close-on-exec; this process has one thread),
    // which closes them once bound.
    let opened = go.sources.iter().map(open_source).collect::<Result<Vec<OwnedFd>, String>>()?;
    let fds: Vec<String> = opened.iter().map(|fd| fd.as_raw_fd().to_string()).collect();
    // Root of the new namespace is the sandbox's unprivileged host uid.
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    setresgid(root_gid, root_gid, root_gid)
        .map_err(|e| format!("cannot take the sandbox's gid (is its gid map written?): {e}"))?;
    setresuid(root_uid, root_uid, root_uid)
        .map_err(|e| format!("cannot take the sandbox's uid (is its uid map written?): {e}"))?;
    keyring::join_fresh_session()?;

    // The worker moved this process into the run's cgroups before `go`: a
    // cgroup namespace rooted there hides the host's cgroup paths.
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    if !network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| format!("cannot create the sandbox's namespaces: {e}"))?;

    // Set after the credential changes, which clear it. The worker's
    // thread waits for this process, so its exit means the worker is gone.
    set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("cannot set the parent-death signal: {e}"))?;
    if getppid().as_raw() != worker {
        return Err("the worker exited".to_owned());
    }
    let signals = signal_fd()?;
    let init = Command::new("/proc/self/exe")
        .arg(INIT)
        .arg(fds.join(","))
        .env_clear()
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            format!("cannot start the sandbox's init (the kiln binary must be executable by its uid): {e}")
        })?;
    let init = Pid::from_raw(i32::try_from(init.id()).map_err(|_| "init's pid is out of range")?);
    loop {
        let Some(info) = signals.read_signal().map_err(|e| format!("cannot read signals: {e}"))? else {
            continue;
        };
        let signal = i32::try_from(info.ssi_signo).ok().and_then(|s| Signal::try_from(s).ok());
        match signal {
            Some(Signal::SIGCHLD) => match waitpid(init, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
                Ok(_) => {}
                Err(e) => return Err(format!("cannot wait for init: {e}")),
            },
            Some(signal) => {
                let _ = kill(init, signal);
            }
            None => {}
        }
    }
}

/// Makes the worker's log files this process's stdout and stderr, which
/// init and the action inherit. Opened while this process is still the
/// files' owner (the worker's root, without capabilities), never through
/// a final symlink.
fn take_logs(go: &Go) -> Result<(), String> {
    let open = |path: &std::path::Path| {
        open(path, OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| format!("cannot open the action's log {}: {e}", path.display()))
    };
    let stdout = open(&go.stdout)?;
    let stderr = if go.stderr == go.stdout { None } else { Some(open(&go.stderr)?) };
    nix::unistd::dup2_stdout(&stdout).map_err(|e| format!("cannot make the log the action's stdout: {e}"))?;
    nix::unistd::dup2_stderr(stderr.as_ref().unwrap_or(&stdout))
        .map_err(|e| format!("cannot make the log the action's stderr: {e}"))?;
    Ok(())
}

fn open_source(source: &SourcePath) -> Result<OwnedFd, String> {
    let follow = if source.follow { OFlag::empty() } else { OFlag::O_NOFOLLOW };
    open(source.path.as_path(), OFlag::O_PATH | follow, Mode::empty())
        .map_err(|e| format!("cannot open {} for the sandbox: {e}", source.path.display()))
}
