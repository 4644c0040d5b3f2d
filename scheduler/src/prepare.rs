//! Preparing an execution: the action cache, then the Action and the
//! Command, read and checked before anything is queued.

use std::time::Duration;

use bytes::Bytes;
use kiln_proto::limits::ACTION_MESSAGE_SIZE_BYTES_MAX;
use kiln_proto::reapi::{self, ActionResult};
use kiln_proto::{Digest, Error};
use prost::Message;

use super::{ExecuteArgs, Inner};
use crate::backend::Backend;
use crate::ops;
use crate::platform::Platform;

/// What preparing an execution found.
pub(super) enum Prepared {
    Cached(Box<ActionResult>),
    Ready { action: Bytes, platform: Platform, timeout: Duration, do_not_cache: bool },
}

impl<B: Backend> Inner<B> {
    /// The action cache, then the Action and Command.
    pub(super) async fn look(&self, args: &ExecuteArgs) -> Result<Prepared, kiln_proto::google::rpc::Status> {
        let b = &self.backend;
        if !args.skip_cache_lookup {
            match b.get_action_result(&args.instance, &args.action).await {
                Ok(Some(result)) if result.exit_code == 0 => return Ok(Prepared::Cached(Box::new(result))),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "action cache lookup failed; executing"),
            }
        }
        let missing = |e: Error, d: &Digest| {
            if e.is_not_found() { ops::missing_blobs(std::slice::from_ref(d)) } else { ops::error_status(&e) }
        };
        let action_bytes = b
            .read_blob(&args.instance, &args.action, ACTION_MESSAGE_SIZE_BYTES_MAX)
            .await
            .map_err(|e| missing(e, &args.action))?;
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            ops::status(tonic::Code::InvalidArgument, format!("{what} does not decode: {e}"))
        };
        let action = reapi::Action::decode(action_bytes.as_ref()).map_err(|e| invalid("the Action", &e))?;
        let function = Some(args.action.function());
        let command_digest =
            Digest::from_required(function, action.command_digest.as_ref(), "command_digest")
                .map_err(|e| ops::error_status(&e))?;
        let _input_root =
            Digest::from_required(function, action.input_root_digest.as_ref(), "input_root_digest")
                .map_err(|e| ops::error_status(&e))?;
        let command_bytes = b
            .read_blob(&args.instance, &command_digest, ACTION_MESSAGE_SIZE_BYTES_MAX)
            .await
            .map_err(|e| missing(e, &command_digest))?;
        let command =
            reapi::Command::decode(command_bytes.as_ref()).map_err(|e| invalid("the Command", &e))?;
        if command.arguments.is_empty() {
            return Err(ops::status(tonic::Code::InvalidArgument, "the Command has no arguments"));
        }
        let timeout = match &action.timeout {
            None => self.config.default_timeout,
            Some(t) if t.seconds < 0 || t.nanos < 0 => {
                return Err(ops::status(tonic::Code::InvalidArgument, "Action.timeout is negative"));
            }
            Some(t) if t.seconds == 0 && t.nanos == 0 => self.config.default_timeout,
            Some(t) => {
                let d = Duration::new(t.seconds.unsigned_abs(), t.nanos.unsigned_abs());
                if d > self.config.max_timeout {
                    return Err(ops::status(
                        tonic::Code::InvalidArgument,
                        format!(
                            "Action.timeout {:?} is above the longest this scheduler allows ({:?}; [execution] max_timeout_ms)",
                            d, self.config.max_timeout
                        ),
                    ));
                }
                d
            }
        };
        let platform = Platform::of(&action, Some(&command));
        self.config.rules.validate(&platform).map_err(|e| ops::error_status(&e))?;
        Ok(Prepared::Ready { action: action_bytes, platform, timeout, do_not_cache: action.do_not_cache })
    }
}
