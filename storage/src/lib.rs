//! Kiln's storage node: blob stores and the REAPI services in front of them.
//!
//! Two layers, kept apart on purpose:
//!
//! - [`store`]: the [`BlobStore`](store::BlobStore) trait, its backends and
//!   its decorators. Nothing here knows gRPC or tonic.
//! - [`service`]: the tonic services (Capabilities, ContentAddressableStorage,
//!   ActionCache, ByteStream). They validate requests, translate them into
//!   store calls and map errors to precise gRPC statuses.

pub mod blob;
pub mod service;
pub mod store;
