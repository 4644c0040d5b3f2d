//! Kiln's ingress authentication and authorization.
//!
//! Not implemented yet: today Kiln serves only loopback addresses unless the
//! operator passes `--insecure-no-auth`. This crate will hold TLS/mTLS,
//! bearer tokens, basic auth and per-tenant permissions as a tower layer
//! that every listener (client and worker ports) shares.

/// Whether this build of Kiln can authenticate clients.
pub const AUTH_AVAILABLE: bool = false;
