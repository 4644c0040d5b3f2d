//! Kiln's worker: runs actions in Linux namespaces with cgroup limits.
//!
//! Not implemented yet. By design the worker depends only on the worker
//! protocol (defined in `kiln-proto`), never on the scheduler crate.

/// Whether this build of Kiln includes a worker.
pub const WORKER_AVAILABLE: bool = false;
