//! REAPI v2 wire types and the small value types every Kiln crate shares.
//!
//! The generated REAPI, ByteStream, longrunning and google.rpc code comes from
//! the maintained `bazel-remote-apis` crate and is re-exported here, so the
//! rest of the workspace names one crate for wire types. Next to it live the
//! hand-written helpers that must agree byte for byte with the specification:
//! [`Digest`] (SHA-256 and BLAKE3), ByteStream [`resource`] names, and the
//! [`Error`] type that keeps its gRPC code as it gains context; and the one
//! walk over a Directory tree in a CAS ([`tree`]), shared by the storage
//! node's GetTree and the worker.

pub mod access;
pub mod digest;
pub mod error;
pub mod grpc_metrics;
pub mod limits;
pub mod metrics;
pub mod resource;
pub mod tenant;
pub mod text;
pub mod transport;
pub mod tree;

pub use digest::{Digest, DigestFunction, Hasher};
pub use error::{Code, Error, Result};

/// Generated REAPI v2 messages and service stubs.
pub mod reapi {
    pub use bazel_remote_apis::build::bazel::remote::execution::v2::*;
    pub use bazel_remote_apis::build::bazel::semver::SemVer;
}

/// Generated Remote Asset API v1 messages and service stubs.
pub mod asset {
    pub use bazel_remote_apis::build::bazel::remote::asset::v1::*;
}

/// Kiln's own protocols, compiled from `proto/kiln/` at build time.
pub mod kiln {
    /// Token administration (`kiln token ...`).
    pub mod admin {
        #![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
        tonic::include_proto!("kiln.admin.v1");
    }

    /// The worker protocol between the scheduler and its workers.
    pub mod worker {
        #![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
        tonic::include_proto!("kiln.worker.v1");
    }
}

/// Generated `google.*` messages and service stubs (ByteStream, longrunning, rpc).
pub mod google {
    pub use bazel_remote_apis::google::*;
}

/// A wall-clock time as a protobuf Timestamp (times before 1970 as 1970).
pub fn timestamp(t: std::time::SystemTime) -> google::protobuf::Timestamp {
    let d = t.duration_since(std::time::SystemTime::UNIX_EPOCH).unwrap_or_default();
    google::protobuf::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
