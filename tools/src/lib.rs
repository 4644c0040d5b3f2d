//! Client-side tools: the operator CLI's CAS and token commands and the
//! `kiln bench` load generator. Everything here talks to Kiln, or any REAPI server, over gRPC
//! only.

pub mod bench;
pub mod cas;
pub mod client;
pub mod token;
