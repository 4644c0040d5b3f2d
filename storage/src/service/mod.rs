//! The REAPI services: the only modules of the storage node that know tonic.
//!
//! Each service validates its request completely before touching a store,
//! so that bad input gets a precise status and stores never see it.

use kiln_proto::resource::validate_instance_name;
use kiln_proto::{DigestFunction, Error};
use tonic::Status;

mod action_cache;
mod admission;
mod asset;
mod bytestream;
mod capabilities;
mod cas;
mod compression;
pub mod origin;
mod partial;
mod responses;

pub use action_cache::ActionCacheService;
pub use asset::AssetService;
pub use bytestream::ByteStreamService;
pub use capabilities::CapabilitiesService;
pub use cas::CasService;
pub use responses::ResponseBudgetLayer;

/// The newest REAPI version whose storage features Kiln implements fully.
pub const HIGH_API_VERSION: (i32, i32) = (2, 3);

/// Validates the instance name of a request.
fn instance(name: &str) -> Result<(), Status> {
    validate_instance_name(name).map_err(Status::from)
}

/// Interprets a request's `digest_function` field.
fn digest_function(value: i32) -> Result<Option<DigestFunction>, Status> {
    DigestFunction::from_proto(value).map_err(Status::from)
}

/// Turns for tree walks (`tree_walks_max`), shared by every service that
/// walks a Directory tree in the CAS: GetTree, and the Remote Asset API's
/// completeness check.
#[derive(Debug, Clone)]
pub struct WalkTurns {
    turns: std::sync::Arc<tokio::sync::Semaphore>,
    max: usize,
    wait: std::time::Duration,
}

impl WalkTurns {
    pub fn new(limits: &kiln_proto::limits::Limits) -> Self {
        WalkTurns {
            turns: std::sync::Arc::new(tokio::sync::Semaphore::new(limits.tree_walks_max)),
            max: limits.tree_walks_max,
            wait: std::time::Duration::from_millis(limits.admission_timeout_ms),
        }
    }

    /// A turn, within `admission_timeout_ms`; RESOURCE_EXHAUSTED naming the
    /// limit otherwise.
    async fn take(&self, what: &str) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        match tokio::time::timeout(self.wait, self.turns.clone().acquire_owned()).await {
            Ok(Ok(turn)) => Ok(turn),
            Ok(Err(_)) => Err(Status::unavailable("the server is shutting down")),
            Err(_) => Err(Error::resource_exhausted(format!(
                "the server is busy: {} {what} walks are running (tree_walks_max); retry later",
                self.max
            ))
            .into()),
        }
    }
}

/// Checks the number of digests in one request.
fn check_count(what: &str, count: usize, max: usize) -> Result<(), Status> {
    if count > max {
        return Err(Error::invalid_argument(format!(
            "{what} names {count} digests; at most {max} are allowed per call, split the request"
        ))
        .into());
    }
    Ok(())
}
