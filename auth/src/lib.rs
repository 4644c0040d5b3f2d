//! Kiln's ingress authentication and authorization machinery.
//!
//! One machinery for every listener (the client port today, the worker port
//! later): [`listener`] accepts connections (plaintext or TLS, bounded) and
//! [`tls`] terminates TLS/mTLS with live certificate and CRL reload
//! ([`crl`]); [`layer`] authenticates each request (client certificate,
//! bearer token, basic auth) into a principal; [`policy`] decides what a
//! principal may do on a tenant; [`admin`] serves token administration;
//! [`reload`] holds the one rule for files an operator edits.
//!
//! The value types services use (principal, permissions, the authorizer
//! they call) live in `kiln_proto::access`, so that services and tools never
//! depend on this crate.

pub mod admin;
pub mod config;
pub mod crl;
pub mod htpasswd;
pub mod layer;
pub mod listener;
pub mod policy;
pub mod reload;
pub mod tls;
pub mod tokens;

pub use layer::{AuthLayer, Authenticator};
