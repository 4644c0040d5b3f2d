//! The sandbox (being written).

/// Runs a sandbox stage when the `kiln` binary was re-executed as one
/// (`args[1]` names the stage); `None` for every other command line.
pub fn dispatch_stage(_args: &[std::ffi::OsString]) -> Option<i32> {
    None
}
