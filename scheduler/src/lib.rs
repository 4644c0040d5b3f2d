//! Kiln's scheduler: REAPI Execution and Operations over a fair queue of
//! executions and a set of workers.
//!
//! - [`core`]: the state machine (operations, executions, merging,
//!   dispatch, lost workers, timeouts, sweeps).
//! - [`queue`]: fairness across invocations, with priorities.
//! - [`platform`]: matching action platforms to workers.
//! - [`ops`]: operations as clients see them.
//! - [`backend`]: what the scheduler needs of the CAS and action cache.
//! - [`service`]: the gRPC Execution and Operations services;
//!   [`workers`]: worker sessions (the worker protocol).

pub mod backend;
pub mod core;
pub mod ops;
pub mod platform;
pub mod queue;
pub mod service;
pub mod workers;

pub use backend::Backend;
pub use core::snapshot::{ExecutingView, FailureView, Snapshot, WorkerView};
pub use core::{Config, ExecuteArgs, Scheduler, Stats, Watch};
pub use queue::TenantShare;

/// What the scheduler advertises in GetCapabilities: execution enabled,
/// SHA-256 in the singular field Bazel 4 reads, every digest function in
/// the list, and the priority range.
#[allow(deprecated)] // digest_function: Bazel 4.2 reads the singular field
pub fn execution_capabilities() -> kiln_proto::reapi::ExecutionCapabilities {
    use kiln_proto::DigestFunction;
    use kiln_proto::reapi::{
        ExecutionCapabilities, PriorityCapabilities, priority_capabilities::PriorityRange,
    };
    ExecutionCapabilities {
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        exec_enabled: true,
        execution_priority_capabilities: Some(PriorityCapabilities {
            priorities: vec![PriorityRange {
                min_priority: *kiln_proto::limits::EXECUTION_PRIORITY_RANGE.start(),
                max_priority: *kiln_proto::limits::EXECUTION_PRIORITY_RANGE.end(),
            }],
        }),
        supported_node_properties: vec![],
        digest_functions: DigestFunction::ALL.iter().map(|f| f.to_proto() as i32).collect(),
    }
}
