//! Kiln's storage node: blob stores and the REAPI services in front of them.
//!
//! Two layers, kept apart on purpose:
//!
//! - [`store`]: the [`CasStore`](store::CasStore) and
//!   [`AcStore`](store::AcStore) traits, their backends and decorators.
//!   Nothing here knows gRPC or an async runtime.
//! - [`service`]: the tonic services (Capabilities, ContentAddressableStorage,
//!   ActionCache, ByteStream). They validate requests, translate them into
//!   store calls and map errors to precise gRPC statuses.

pub mod service;
pub mod store;
