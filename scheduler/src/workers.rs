//! Worker sessions: the worker protocol (`kiln.worker.v1.Workers`) over
//! gRPC, and the same session for a worker in the scheduler's process.
//!
//! A session starts with Register (within [`REGISTER_TIMEOUT`]); the
//! scheduler answers Accepted, then sends Assign and Cancel. Heartbeats,
//! Started and Finished flow the other way. A session that ends, fails or
//! stays silent past the configured limit loses its worker.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kiln_proto::access::{Authorizer, rights};
use kiln_proto::kiln::worker::workers_server::Workers;
use kiln_proto::kiln::worker::{
    Accepted, SchedulerMessage, WorkerMessage, scheduler_message, worker_message,
};
use kiln_proto::limits::WORKER_SESSION_QUEUE;
use kiln_proto::{Code, Error, Result};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::backend::Backend;
use crate::core::Scheduler;

/// Longest wait for a new session's Register message.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a worker session whose messages arrive on `inbound`; returns the
/// messages for the worker. The session lives until `inbound` ends.
pub async fn session<B, S, E>(
    scheduler: Scheduler<B>,
    mut inbound: S,
) -> Result<mpsc::Receiver<SchedulerMessage>>
where
    B: Backend,
    S: Stream<Item = std::result::Result<WorkerMessage, E>> + Send + Unpin + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.next()).await.map_err(|_| {
        Error::new(
            Code::DeadlineExceeded,
            format!("a worker session must start with Register within {REGISTER_TIMEOUT:?}"),
        )
    })?;
    let register = match first {
        Some(Ok(WorkerMessage { kind: Some(worker_message::Kind::Register(r)) })) => r,
        Some(Err(e)) => return Err(Error::new(Code::Unavailable, format!("worker session failed: {e}"))),
        _ => return Err(Error::invalid_argument("a worker session must start with Register")),
    };
    let config = scheduler.config();
    let (tx, rx) = mpsc::channel(WORKER_SESSION_QUEUE);
    let accepted = Accepted {
        heartbeat_interval_ms: u64::try_from(config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX),
    };
    tx.try_send(SchedulerMessage { kind: Some(scheduler_message::Kind::Accepted(accepted)) })
        .map_err(|_| Error::internal("worker session queue"))?;
    let lost_after = config.worker_lost_after;
    let key = scheduler.attach_worker(&register, tx)?;
    tokio::spawn(async move {
        let why = loop {
            match tokio::time::timeout(lost_after, inbound.next()).await {
                Err(_) => break "it missed its heartbeats".to_owned(),
                Ok(None) => break "its session ended".to_owned(),
                Ok(Some(Err(e))) => break format!("its session failed: {e}"),
                Ok(Some(Ok(message))) => scheduler.worker_message(key, message),
            }
        };
        scheduler.detach_worker(key, &why);
    });
    Ok(rx)
}

/// The gRPC side: workers need the `worker` permission (on the root
/// tenant).
pub struct WorkerService<B> {
    scheduler: Scheduler<B>,
    auth: Authorizer,
}

impl<B> std::fmt::Debug for WorkerService<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerService").finish_non_exhaustive()
    }
}

impl<B: Backend> WorkerService<B> {
    pub fn new(scheduler: Scheduler<B>, auth: Authorizer) -> Self {
        WorkerService { scheduler, auth }
    }
}

type SessionStream =
    Pin<Box<dyn Stream<Item = std::result::Result<SchedulerMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<B: Backend> Workers for WorkerService<B> {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> std::result::Result<Response<SessionStream>, Status> {
        self.auth.permit::<rights::Worker, _>(&request, "")?;
        let inbound = request.into_inner();
        let rx = session(self.scheduler.clone(), inbound).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}
