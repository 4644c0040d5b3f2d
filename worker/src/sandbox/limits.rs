//! The sandbox's fixed figures that are not bounds (those live in
//! `kiln_proto::limits` with Kiln's others, re-exported here).

pub use kiln_proto::limits::{
    SANDBOX_CLEANUP_TIMEOUT, SANDBOX_CPU_MILLICORES_MIN, SANDBOX_ID_BYTES_MAX, SANDBOX_KILL_REPORT_TIMEOUT,
    SANDBOX_MOUNTS_MAX, SANDBOX_PREPARE_TIMEOUT, SANDBOX_REPORT_FRAME_BYTES_MAX,
    SANDBOX_SPEC_FRAME_BYTES_MAX, WORKING_DIRECTORY_BYTES_MAX,
};

/// Processes of the sandbox itself (stage 1 and init), added to
/// [`super::Spec::pids_max`] in the `pids` controller.
pub const SANDBOX_PROCESSES: u64 = 2;

/// The CFS period for [`super::Spec::cpu_millicores`], in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Size of the sandbox's `/tmp` and `/dev/shm` each when the spec sets no
/// memory limit (with one, that limit; their pages count against it).
pub const TMPFS_SIZE_BYTES_DEFAULT: u64 = 1 << 30;
