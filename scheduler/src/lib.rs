//! Kiln's scheduler: REAPI Execution and Operations.
//!
//! Not served yet. It will match an action's platform properties to
//! workers, deduplicate identical in-flight actions and write execution
//! results to the AC itself. Until then `kiln serve` advertises no execution
//! capabilities, and Bazel must run actions locally (`--remote_cache` only).

/// Whether this build of Kiln serves the Execution API.
pub const EXECUTION_SERVED: bool = false;
