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
pub use core::{Config, ExecuteArgs, Scheduler, Stats, Watch};
