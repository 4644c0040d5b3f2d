//! Operations as clients see them: each Execute call gets its own
//! operation, whose state the scheduler publishes through a watch channel.

use std::sync::Arc;

use kiln_proto::Digest;
use kiln_proto::google::longrunning::{Operation, operation};
use kiln_proto::google::protobuf::Any;
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::reapi::{
    ActionResult, ExecuteOperationMetadata, ExecuteResponse, execution_stage::Value as Stage,
};
use prost::Message;

const TYPE_PREFIX: &str = "type.googleapis.com/";

/// google.rpc.PreconditionFailure, for missing inputs (not among the
/// generated REAPI types).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<Violation>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Violation {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(string, tag = "2")]
    pub subject: String,
    #[prost(string, tag = "3")]
    pub description: String,
}

fn any<M: Message>(type_name: &str, m: &M) -> Any {
    Any { type_url: format!("{TYPE_PREFIX}{type_name}"), value: m.encode_to_vec() }
}

/// What an operation's watchers see.
#[derive(Debug, Clone)]
pub struct OpState {
    pub stage: Stage,
    /// Set when the operation is done.
    pub response: Option<ExecuteResponse>,
}

impl OpState {
    pub fn at(stage: Stage) -> Arc<OpState> {
        Arc::new(OpState { stage, response: None })
    }

    pub fn done(response: ExecuteResponse) -> Arc<OpState> {
        Arc::new(OpState { stage: Stage::Completed, response: Some(response) })
    }

    pub fn is_done(&self) -> bool {
        self.response.is_some()
    }

    /// The longrunning Operation for `name`.
    pub fn to_operation(&self, name: &str, action: &Digest) -> Operation {
        let metadata = ExecuteOperationMetadata {
            stage: self.stage as i32,
            action_digest: Some(action.to_proto()),
            digest_function: action.function().to_proto() as i32,
            ..Default::default()
        };
        Operation {
            name: name.to_owned(),
            metadata: Some(any("build.bazel.remote.execution.v2.ExecuteOperationMetadata", &metadata)),
            done: self.is_done(),
            result: self.response.as_ref().map(|r| {
                operation::Result::Response(any("build.bazel.remote.execution.v2.ExecuteResponse", r))
            }),
        }
    }
}

/// A finished execution's response.
pub fn response(
    result: Option<ActionResult>,
    status: RpcStatus,
    cached: bool,
    message: String,
) -> ExecuteResponse {
    ExecuteResponse { result, cached_result: cached, status: Some(status), message, ..Default::default() }
}

pub fn status(code: tonic::Code, message: impl Into<String>) -> RpcStatus {
    RpcStatus { code: code as i32, message: kiln_proto::text::clip_message(message.into()), details: vec![] }
}

/// The status for an error from the store, the backend or a worker.
pub fn error_status(e: &kiln_proto::Error) -> RpcStatus {
    e.to_rpc_status()
}

/// FAILED_PRECONDITION naming every missing blob as a MISSING violation,
/// which makes Bazel upload them and call Execute again.
pub fn missing_blobs(digests: &[Digest]) -> RpcStatus {
    let violations = digests
        .iter()
        .map(|d| Violation {
            r#type: "MISSING".to_owned(),
            subject: format!("blobs/{}/{}", d.hash_hex(), d.size_bytes()),
            description: String::new(),
        })
        .collect();
    let failure = PreconditionFailure { violations };
    let shown: Vec<String> = digests.iter().take(4).map(ToString::to_string).collect();
    let more = if digests.len() > 4 { format!(" and {} more", digests.len() - 4) } else { String::new() };
    RpcStatus {
        code: tonic::Code::FailedPrecondition as i32,
        message: format!("{} blob(s) missing from the CAS: {}{more}", digests.len(), shown.join(", ")),
        details: vec![any("google.rpc.PreconditionFailure", &failure)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::DigestFunction;

    #[test]
    fn missing_blobs_are_precondition_failures_bazel_understands() {
        let d = DigestFunction::Sha256.compute(b"x");
        let s = missing_blobs(&[d]);
        assert_eq!(s.code, tonic::Code::FailedPrecondition as i32);
        assert_eq!(s.details[0].type_url, "type.googleapis.com/google.rpc.PreconditionFailure");
        let f = PreconditionFailure::decode(s.details[0].value.as_slice()).unwrap();
        assert_eq!(f.violations[0].r#type, "MISSING");
        assert_eq!(f.violations[0].subject, format!("blobs/{}/1", d.hash_hex()));
    }

    #[test]
    fn operations_carry_stage_and_response() {
        let d = DigestFunction::Sha256.compute(b"a");
        let op = OpState::at(Stage::Queued).to_operation("operations/x", &d);
        assert!(!op.done && op.result.is_none());
        let m = ExecuteOperationMetadata::decode(op.metadata.unwrap().value.as_slice()).unwrap();
        assert_eq!(m.stage, Stage::Queued as i32);
        let done = OpState::done(response(
            Some(ActionResult::default()),
            status(tonic::Code::Ok, ""),
            true,
            String::new(),
        ));
        let op = done.to_operation("operations/x", &d);
        assert!(op.done);
        let Some(operation::Result::Response(any)) = op.result else { panic!("a response") };
        assert!(ExecuteResponse::decode(any.value.as_slice()).unwrap().cached_result);
    }
}
