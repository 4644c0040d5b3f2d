//! Kiln's ingress authentication and authorization.
//!
//! One machinery for every listener (the client port today, the worker port
//! later): [`tls`] and [`listener`] terminate TLS/mTLS with live certificate
//! reload; [`layer`] authenticates each request (client certificate, bearer
//! token, basic auth) into a [`Principal`]; [`policy`] decides what a
//! principal may do on a tenant; [`admin`] serves token administration.
//! Storage services call [`Authorizer::check`] with the tenant and the
//! permission an operation needs.

pub mod admin;
pub mod config;
pub mod htpasswd;
pub mod layer;
pub mod listener;
pub mod permission;
pub mod policy;
pub mod principal;
pub mod reload;
pub mod tls;
pub mod tokens;

pub use layer::{AuthLayer, Authenticator, Authorizer};
pub use permission::{Permission, Permissions};
pub use principal::Principal;
