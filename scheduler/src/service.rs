//! The REAPI Execution service and the longrunning Operations service over
//! the scheduler.
//!
//! Execute and WaitExecution send the operation at once, again on every
//! stage change and at least every [`OPERATION_UPDATE_INTERVAL`], and end
//! after sending it done. Every call needs the `execute` permission on the
//! operation's instance.

use std::pin::Pin;

use futures::Stream;
use kiln_proto::access::{Authorizer, Permission, rights};
use kiln_proto::google::longrunning::operations_server::Operations;
use kiln_proto::google::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use kiln_proto::google::protobuf::Empty;
use kiln_proto::limits::{OPERATION_UPDATE_INTERVAL, OPERATIONS_PAGE_MAX};
use kiln_proto::reapi::execution_server::Execution;
use kiln_proto::reapi::{ExecuteRequest, RequestMetadata, WaitExecutionRequest};
use kiln_proto::resource::validate_instance_name;
use kiln_proto::{Digest, DigestFunction};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::backend::Backend;
use crate::core::{ExecuteArgs, Scheduler, Watch};

pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send + 'static>>;

/// The Execution and Operations services.
pub struct ExecutionService<B> {
    scheduler: Scheduler<B>,
    auth: Authorizer,
}

impl<B> Clone for ExecutionService<B> {
    fn clone(&self) -> Self {
        ExecutionService { scheduler: self.scheduler.clone(), auth: self.auth.clone() }
    }
}

impl<B> std::fmt::Debug for ExecutionService<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutionService").finish_non_exhaustive()
    }
}

impl<B: Backend> ExecutionService<B> {
    pub fn new(scheduler: Scheduler<B>, auth: Authorizer) -> Self {
        ExecutionService { scheduler, auth }
    }

    /// The instance of operation `name`, checked against the caller.
    fn authorized<T>(&self, request: &Request<T>, name: &str) -> Result<Operation, Status> {
        let (instance, operation) = self
            .scheduler
            .get(name)
            .ok_or_else(|| Status::not_found(format!("no operation {}", kiln_proto::text::quoted(name))))?;
        self.auth.permit::<rights::Execute, _>(request, &instance)?;
        Ok(operation)
    }
}

/// The tool invocation a request belongs to, from the client's
/// `RequestMetadata` header ("" when absent or unreadable).
fn invocation_of<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get_bin(kiln_proto::transport::REQUEST_METADATA_HEADER)
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| RequestMetadata::decode(b.as_ref()).ok())
        .map(|m| m.tool_invocation_id.chars().take(256).collect())
        .unwrap_or_default()
}

/// The operation now, then on every change and at least every
/// [`OPERATION_UPDATE_INTERVAL`], ending after it is done.
fn follow(watch: Watch) -> OperationStream {
    Box::pin(futures::stream::unfold((Some(watch), true), |(watch, first)| async move {
        let mut watch = watch?;
        if !first {
            tokio::select! {
                changed = watch.rx.changed() => {
                    // The operation was forgotten: end without `done`, so
                    // the client asks WaitExecution, gets NOT_FOUND and
                    // executes again.
                    changed.ok()?;
                }
                () = tokio::time::sleep(OPERATION_UPDATE_INTERVAL) => {}
            }
        }
        let operation = watch.rx.borrow_and_update().to_operation(&watch.name, &watch.action);
        let next = if operation.done { None } else { Some(watch) };
        Some((Ok(operation), (next, false)))
    }))
}

#[tonic::async_trait]
impl<B: Backend> Execution for ExecutionService<B> {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<OperationStream>, Status> {
        let permit = self.auth.permit::<rights::Execute, _>(&request, &request.get_ref().instance_name)?;
        let invocation = invocation_of(&request);
        let req = request.into_inner();
        validate_instance_name(&req.instance_name).map_err(Status::from)?;
        let function = DigestFunction::from_proto(req.digest_function).map_err(Status::from)?;
        let action = Digest::from_required(function, req.action_digest.as_ref(), "action_digest")?;
        let mut priority = req.execution_policy.as_ref().map_or(0, |p| p.priority);
        let range = kiln_proto::limits::EXECUTION_PRIORITY_RANGE;
        if !range.contains(&priority) {
            return Err(Status::invalid_argument(format!(
                "execution_policy.priority {priority} is outside {}..={} (GetCapabilities lists the range)",
                range.start(),
                range.end()
            )));
        }
        // More urgent than the default only with the urgent permission;
        // otherwise clamped, so a build that asks still runs.
        if priority < 0 && self.auth.try_extend::<rights::Urgent, _>(&permit, &req.instance_name).is_none() {
            tracing::debug!(principal = %permit.principal(), priority, "priority clamped to 0: no urgent permission");
            kiln_proto::metrics::global().priorities_clamped.inc();
            priority = 0;
        }
        let mut args = ExecuteArgs::new(&permit, action);
        args.skip_cache_lookup = req.skip_cache_lookup;
        args.priority = priority;
        args.invocation = invocation;
        let watch = self.scheduler.execute(args)?;
        Ok(Response::new(follow(watch)))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let name = request.get_ref().name.clone();
        self.authorized(&request, &name)?;
        let watch = self
            .scheduler
            .watch(&name)
            .ok_or_else(|| Status::not_found(format!("no operation {}", kiln_proto::text::quoted(&name))))?;
        Ok(Response::new(follow(watch)))
    }
}

#[tonic::async_trait]
impl<B: Backend> Operations for ExecutionService<B> {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        if !request.get_ref().filter.is_empty() {
            return Err(Status::invalid_argument(
                "ListOperations filters are not supported; leave filter empty",
            ));
        }
        let Ok(size) = usize::try_from(request.get_ref().page_size) else {
            return Err(Status::invalid_argument("page_size must not be negative"));
        };
        let size = if size == 0 { OPERATIONS_PAGE_MAX } else { size.min(OPERATIONS_PAGE_MAX) };
        let after = request.get_ref().page_token.clone();
        // Only operations of instances the caller may execute on; the
        // others are skipped quietly (they are not refusals to count).
        let caller = kiln_proto::access::Authorizer::caller(&request)?;
        let mut operations = Vec::new();
        let mut last = after.clone();
        for (instance, operation) in self.scheduler.list(&after, size * 4) {
            last.clone_from(&operation.name);
            if self.auth.allows(&caller.principal, &instance, Permission::Execute) {
                operations.push(operation);
                if operations.len() == size {
                    break;
                }
            }
        }
        let next_page_token = if last == after { String::new() } else { last };
        Ok(Response::new(ListOperationsResponse { operations, next_page_token, unreachable: vec![] }))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let name = request.get_ref().name.clone();
        Ok(Response::new(self.authorized(&request, &name)?))
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let name = request.get_ref().name.clone();
        self.authorized(&request, &name)?;
        self.scheduler.delete(&name)?;
        Ok(Response::new(Empty {}))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let name = request.get_ref().name.clone();
        self.authorized(&request, &name)?;
        self.scheduler.cancel(&name)?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let name = request.get_ref().name.clone();
        self.authorized(&request, &name)?;
        let timeout = match request.get_ref().timeout.as_ref() {
            None => OPERATION_UPDATE_INTERVAL,
            Some(t) if t.seconds < 0 || t.nanos < 0 => {
                return Err(Status::invalid_argument("WaitOperation timeout must not be negative"));
            }
            Some(t) => std::time::Duration::new(t.seconds.unsigned_abs(), t.nanos.unsigned_abs())
                .min(OPERATION_UPDATE_INTERVAL),
        };
        let mut watch = self
            .scheduler
            .watch(&name)
            .ok_or_else(|| Status::not_found(format!("no operation {}", kiln_proto::text::quoted(&name))))?;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            if watch.rx.borrow_and_update().is_done() {
                break;
            }
            tokio::select! {
                changed = watch.rx.changed() => if changed.is_err() { break },
                () = &mut deadline => break,
            }
        }
        Ok(Response::new(watch.operation()))
    }
}
