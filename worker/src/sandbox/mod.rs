//! The action sandbox: Linux namespaces, a fresh root, cgroup limits.
//!
//! The worker is multi-threaded, and a multi-threaded process cannot enter
//! a new user namespace, so [`run`] executes a binary into two stages: the
//! small `kiln-sandbox` (`src/bin/kiln-sandbox.rs`) where it lies next to
//! `kiln`, or `kiln` itself (`src/main.rs` hands the stages to
//! [`dispatch_stage`] before anything else runs):
//!
//! ```text
//! slot thread (root)            stage 1                       init (pid 1)          action (pid 2)
//! prepare: cgroups for spec.id
//! spawn stage 1 --------------> close stray fds, drop groups
//! cgroup.procs                  unshare(user)
//!            <---- Ready ------
//! setgroups, uid_map, gid_map
//! ... (ahead of the action: [`prepare`]; then [`run_prepared`])
//! log files
//!            ----- Go, sources, logs, spec ------>
//!                               open logs as stdout, stderr
//!                               unshare(mnt), open sources
//!                               setresuid(0) in the userns
//!                               unshare(pid ipc uts [net])
//!                               spawn init ---------------->  build the root (tmpfs,
//!                                                             read-only binds, /dev,
//!                                                             /tmp, fresh /proc),
//!                                                             hostname, lo up,
//!                                                             pivot_root, seccomp,
//!                                                             spawn ---------------> argv, env
//!            <---------------------------------- Exited/Signaled/Failed ---------
//! ```
//!
//! Everything travels over one socket, the stages' stdin; their stdout and
//! stderr are the action's files. The worker only ever signals stage 1 (its
//! own child, so its pid cannot be reused under it): stage 1 forwards
//! SIGTERM to init, init to the action. Init reaps every process of the pid
//! namespace and, when the action ends, reports and exits, which makes the
//! kernel kill whatever the action left behind. On a timeout the worker
//! sends SIGTERM, waits `kill_grace`, then kills the cgroup (`cgroup.kill`,
//! or SIGKILL to stage 1, whose death kills init through its parent-death
//! signal, then to every pid left in the v1 cgroups). [`run`] returns only
//! once the run's cgroups are empty and removed.
//!
//! What the action sees: the root is a read-only tmpfs holding read-only
//! binds of the host's system directories (or of a per-platform root file
//! system), the exec root read-write at [`EXEC_ROOT`], an empty `/tmp`, a
//! minimal `/dev`, its own `/proc`, hostname `localhost`, and without
//! `network` a network namespace with only `lo`. It runs as root of its
//! user namespace, which is an unprivileged host uid ([`SandboxConfig::uid`]):
//! the host's files and the worker's read-only inputs are not its to change
//! even where a mount would allow it.
//!
//! A known limit: the action holds every capability of its own user
//! namespace, so it could ptrace init and forge its own report (an exit
//! code, or an error the worker reads as its own); it gains nothing it
//! could not have by exiting with that code, and the timeout and cgroup
//! kill do not depend on init.

mod bench;
mod cgroup;
mod host;
mod init;
mod keyring;
mod limits;
mod netlink;
mod plan;
mod prepared;
mod protocol;
mod rootfs;
mod seccomp;
mod spec;
mod stage1;

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

pub use bench::{Overhead, fork_exec_baseline};
pub use cgroup::{Cgroups, Controller};
pub use host::{probe, run, run_prepared};
pub use limits::*;
pub use prepared::{Prepared, prepare};
pub use seccomp::DENIED_SYSCALLS;

/// Where the exec root is mounted, read-write, inside the sandbox; the
/// action's working directory is relative to it.
pub const EXEC_ROOT: &str = "/kiln/exec";

/// Host directories and files bound read-only into the sandbox by default,
/// where they exist: the system directories, and what a toolchain reads of
/// `/etc`.
pub const DEFAULT_HOST_PATHS: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/etc/hosts",
];

const STAGE1: &str = "__kiln-sandbox-stage1";
const INIT: &str = "__kiln-sandbox-init";

/// How this worker builds sandboxes; made once at start and checked with
/// [`probe`].
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The binary run as the sandbox's stages: [`stage_binary`] of
    /// `std::env::current_exe()` in the worker (either binary reaches
    /// [`dispatch_stage`] first thing), and `env!("CARGO_BIN_EXE_kiln-sandbox")`
    /// in tests.
    pub kiln_binary: PathBuf,
    /// The host uid the sandbox's root maps to: unprivileged, never the
    /// worker's own; one per slot keeps concurrent actions apart.
    pub uid: u32,
    /// The host gid the sandbox's root group maps to.
    pub gid: u32,
    /// A per-platform root file system: its top-level entries are bound
    /// read-only (symlinks recreated). `None`: [`Self::host_dirs`] instead.
    pub root_fs: Option<PathBuf>,
    /// Host directories and files bound read-only, at the same path, when
    /// `root_fs` is `None`; missing ones are skipped, symlinks recreated.
    pub host_dirs: Vec<PathBuf>,
    /// The cgroup hierarchies runs are placed in.
    pub cgroups: Cgroups,
}

impl SandboxConfig {
    /// A configuration with the host's system directories
    /// ([`DEFAULT_HOST_PATHS`]) and the cgroups detected for this process.
    pub fn new(kiln_binary: PathBuf, uid: u32, gid: u32) -> Result<Self, SandboxError> {
        Ok(Self {
            kiln_binary,
            uid,
            gid,
            root_fs: None,
            host_dirs: Self::default_host_dirs(),
            cgroups: Cgroups::detect()?,
        })
    }

    /// [`DEFAULT_HOST_PATHS`] that exist on this host (symlinks included).
    pub fn default_host_dirs() -> Vec<PathBuf> {
        DEFAULT_HOST_PATHS.iter().map(PathBuf::from).filter(|path| path.symlink_metadata().is_ok()).collect()
    }
}

/// One run of an action.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Unique per run; names the run's cgroups: `[A-Za-z0-9_-]`, at most
    /// [`SANDBOX_ID_BYTES_MAX`] bytes.
    pub id: String,
    /// The host directory holding the action's inputs (directories owned by
    /// the sandbox's uid, input files read-only and not its own); mounted
    /// read-write at [`EXEC_ROOT`].
    pub exec_root: PathBuf,
    /// Relative to the exec root (`""` is the exec root); no `..`.
    pub working_directory: String,
    /// argv; `arguments[0]` without a `/` is looked up in the `PATH` of
    /// `environment` inside the sandbox (`/bin:/usr/bin` when it has none).
    pub arguments: Vec<String>,
    /// The only environment the action sees.
    pub environment: Vec<(String, String)>,
    /// Host file the action's stdout goes to (created or truncated).
    pub stdout: PathBuf,
    /// Host file the action's stderr goes to (created or truncated).
    pub stderr: PathBuf,
    /// From the start of the sandbox; then SIGTERM.
    pub timeout: Duration,
    /// Between SIGTERM and killing everything left.
    pub kill_grace: Duration,
    /// Memory limit of all the action's processes (cgroup `memory`); tmpfs
    /// pages written to `/tmp` count.
    pub memory_bytes: Option<u64>,
    /// Most processes and threads the action may have at once (cgroup
    /// `pids`; the sandbox's own two processes are added).
    pub pids_max: Option<u64>,
    /// CPU bandwidth in thousandths of a core (cgroup `cpu`), at least
    /// [`SANDBOX_CPU_MILLICORES_MIN`].
    pub cpu_millicores: Option<u64>,
    /// `true`: the action shares the host's network namespace (a platform
    /// property: it can reach whatever the host can, loopback included).
    /// `false`: its own network namespace with only `lo`, up.
    pub network: bool,
}

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The action's exit code; 128 + the signal when a signal killed it.
    pub exit_code: i32,
    /// The signal that killed the action, if one did.
    pub signal: Option<i32>,
    /// The action ran past its timeout and was stopped.
    pub timed_out: bool,
    /// The kernel killed a process of the action for exceeding its memory
    /// limit.
    pub oom_killed: bool,
    /// When the sandbox was started.
    pub started: SystemTime,
    /// When the sandbox and everything in it had ended.
    pub finished: SystemTime,
}

/// Why a sandbox could not run or could not be cleaned up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxError {
    /// The spec or configuration is invalid: the caller's to fix.
    Invalid(String),
    /// The host cannot build sandboxes (privileges, namespaces, cgroups,
    /// mounts): the worker's operator's to fix.
    Setup(String),
    /// The sandbox was built, but the action's command could not be
    /// started in it (missing program or working directory).
    Exec(String),
    /// Processes of the sandbox outlived it, or its cgroups could not be
    /// removed: the worker should stop taking work.
    Cleanup(String),
}

impl fmt::Display for SandboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(message) => write!(f, "invalid sandbox request: {message}"),
            Self::Setup(message) => write!(f, "cannot set up the sandbox: {message}"),
            Self::Exec(message) => write!(f, "cannot start the action: {message}"),
            Self::Cleanup(message) => write!(f, "sandbox cleanup failed: {message}"),
        }
    }
}

impl std::error::Error for SandboxError {}

/// The name of the small binary that holds only the sandbox's stages.
pub const STAGE_BINARY: &str = "kiln-sandbox";

/// The binary to run the sandbox's stages with: [`STAGE_BINARY`] next to
/// `kiln` when it is there, which costs less to start than `kiln` itself
/// (docs/BENCHMARKS.md), else `kiln`.
pub fn stage_binary(kiln: &std::path::Path) -> PathBuf {
    let small = kiln.with_file_name(STAGE_BINARY);
    if small.is_file() { small } else { kiln.to_owned() }
}

/// Runs a sandbox stage when the `kiln` binary was re-executed as one
/// (`args[1]` names the stage); `None` for every other command line.
pub fn dispatch_stage(args: &[OsString]) -> Option<i32> {
    match args.get(1)?.to_str()? {
        STAGE1 => Some(stage1::main(&args[2..])),
        INIT => Some(init::main(&args[2..])),
        _ => None,
    }
}
