//! Kiln's worker: runs actions in Linux namespaces with cgroup limits.
//!
//! - [`cas`]: what the worker needs of a CAS, and its gRPC implementation.
//! - [`cache`]: the local content-addressed file cache inputs are
//!   hard-linked from; [`inputs`]: materializing an input tree;
//!   [`outputs`]: collecting and uploading what an action produced.
//! - [`sandbox`]: namespaces, a fresh root, cgroup limits, and the
//!   stages the `kiln` binary re-executes itself into; [`disk`]: each
//!   slot's own filesystem, which bounds what an action writes.
//!
//! By design the worker depends only on the worker protocol (defined in
//! `kiln-proto`), never on the scheduler crate.

pub mod cache;
pub mod cas;
pub mod disk;
pub mod grpc_cas;
pub mod inputs;
pub mod outputs;
pub mod remove;
pub mod runner;
pub mod sandbox;
pub mod session;
pub mod slots;
