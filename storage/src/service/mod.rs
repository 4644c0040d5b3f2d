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
