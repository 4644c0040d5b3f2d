//! One error type for the whole workspace below the service layer.
//!
//! Stores and helpers do not know tonic; they return [`Error`], whose [`Code`]
//! mirrors the gRPC codes Kiln uses. Context is prepended as the error travels
//! up ("CAS shard 3: ..."), and the code never changes on the way.

use std::fmt;

/// The gRPC status codes Kiln produces, named as in `google.rpc.Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
    FailedPrecondition,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    DeadlineExceeded,
    Cancelled,
    Aborted,
}

/// An error with a gRPC code and a message a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    code: Code,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::new(Code::ResourceExhausted, message)
    }

    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(Code::OutOfRange, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prepends `context` to the message, keeping the code.
    #[must_use]
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self { code: self.code, message: format!("{context}: {}", self.message) }
    }

    pub fn is_not_found(&self) -> bool {
        self.code == Code::NotFound
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

impl From<Code> for tonic::Code {
    fn from(code: Code) -> Self {
        match code {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::Unauthenticated => tonic::Code::Unauthenticated,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::OutOfRange => tonic::Code::OutOfRange,
            Code::Unimplemented => tonic::Code::Unimplemented,
            Code::Internal => tonic::Code::Internal,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::DataLoss => tonic::Code::DataLoss,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::Cancelled => tonic::Code::Cancelled,
            Code::Aborted => tonic::Code::Aborted,
        }
    }
}

/// The other way: every code Kiln has maps back to itself; OK, UNKNOWN
/// and codes Kiln does not use become INTERNAL.
impl From<tonic::Code> for Code {
    fn from(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument => Code::InvalidArgument,
            tonic::Code::NotFound => Code::NotFound,
            tonic::Code::AlreadyExists => Code::AlreadyExists,
            tonic::Code::PermissionDenied => Code::PermissionDenied,
            tonic::Code::Unauthenticated => Code::Unauthenticated,
            tonic::Code::ResourceExhausted => Code::ResourceExhausted,
            tonic::Code::FailedPrecondition => Code::FailedPrecondition,
            tonic::Code::OutOfRange => Code::OutOfRange,
            tonic::Code::Unimplemented => Code::Unimplemented,
            tonic::Code::Unavailable => Code::Unavailable,
            tonic::Code::DataLoss => Code::DataLoss,
            tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
            tonic::Code::Cancelled => Code::Cancelled,
            tonic::Code::Aborted => Code::Aborted,
            _ => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        tonic::Status::new(error.code.into(), crate::text::clip_message(error.message))
    }
}

impl Error {
    /// The `google.rpc.Status` form, for per-item results in batch responses.
    pub fn to_rpc_status(&self) -> crate::google::rpc::Status {
        crate::google::rpc::Status {
            code: tonic::Code::from(self.code) as i32,
            message: crate::text::clip_message(self.message.clone()),
            details: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_the_round_trip_through_tonic() {
        use Code::*;
        for code in [
            InvalidArgument,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            Unauthenticated,
            ResourceExhausted,
            FailedPrecondition,
            OutOfRange,
            Unimplemented,
            Internal,
            Unavailable,
            DataLoss,
            DeadlineExceeded,
            Cancelled,
            Aborted,
        ] {
            assert_eq!(Code::from(tonic::Code::from(code)), code);
        }
        assert_eq!(Code::from(tonic::Code::Unknown), Internal);
    }

    #[test]
    fn context_keeps_code() {
        let e = Error::not_found("blob abc/3").context("CAS").context("instance main");
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), "instance main: CAS: blob abc/3");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::NotFound);
    }

    #[test]
    fn rpc_status_uses_grpc_numbers() {
        let s = Error::invalid_argument("bad").to_rpc_status();
        assert_eq!(s.code, 3);
        assert_eq!(s.message, "bad");
    }
}
