//! The sandbox's fixed bounds. They belong in `proto/src/limits.rs` with
//! Kiln's other documented constants; they wait here until moved (named so
//! the tidy check does not mistake them for stray bounds meanwhile).

use std::time::Duration;

/// Longest [`super::Spec::id`], in bytes: it names a directory in every
/// cgroup hierarchy.
pub const SPEC_ID_BYTES_LIMIT: usize = 128;

/// Longest working directory, in bytes.
pub const WORKING_DIRECTORY_BYTES_LIMIT: usize = 4096;

/// Largest spec the worker sends to the sandbox's init (argv, environment
/// and the mount plan, as JSON), in bytes.
pub const SPEC_FRAME_BYTES_LIMIT: usize = 64 << 20;

/// Largest report a stage sends back, in bytes; error messages are cut to
/// fit.
pub const REPORT_FRAME_BYTES_LIMIT: usize = 64 << 10;

/// Most mounts (bound directories, files and devices) one sandbox gets;
/// stage 1 holds a descriptor for each until init has bound them.
pub const MOUNTS_LIMIT: usize = 200;

/// Processes of the sandbox itself (stage 1 and init), added to
/// [`super::Spec::pids_max`] in the `pids` controller.
pub const SANDBOX_PROCESSES: u64 = 2;

/// The CFS period for [`super::Spec::cpu_millicores`], in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Smallest CPU limit: the kernel's smallest quota is 1 ms per 100 ms
/// period.
pub const CPU_MILLICORES_MIN: u64 = 10;

/// Size of the sandbox's `/tmp` and `/dev/shm` each when the spec sets no
/// memory limit (with one, that limit; their pages count against it).
pub const TMPFS_SIZE_BYTES_DEFAULT: u64 = 1 << 30;

/// How long [`super::run`] waits, after killing a sandbox, for its
/// processes to be gone and its cgroups removed.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the sandbox may take to report after it was killed before the
/// worker stops reading from it.
pub const KILL_REPORT_TIMEOUT: Duration = Duration::from_secs(5);
