//! The worker's side of a session with the scheduler: register, heartbeat,
//! run what is assigned on free slots, report, and stop what is cancelled.
//! When the session ends, every running action is stopped: the scheduler
//! has requeued it already.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kiln_proto::kiln::worker::{
    Heartbeat, Register, SchedulerMessage, Started, WorkerMessage, scheduler_message, worker_message,
};
use kiln_proto::{Error, Result};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::runner::{CasFactory, Runner};

/// Longest wait for the scheduler's Accepted.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

fn message(kind: worker_message::Kind) -> WorkerMessage {
    WorkerMessage { kind: Some(kind) }
}

/// Runs one session: `outbound` carries messages to the scheduler,
/// `inbound` brings its messages. Returns when the session ends.
pub async fn run<F, S, E>(
    runner: Arc<Runner<F>>,
    register: Register,
    outbound: mpsc::Sender<WorkerMessage>,
    mut inbound: S,
) -> Result<()>
where
    F: CasFactory,
    S: Stream<Item = std::result::Result<SchedulerMessage, E>> + Unpin,
    E: std::fmt::Display,
{
    let slots = register.slots;
    let closed = |_| Error::new(kiln_proto::Code::Unavailable, "the scheduler closed the session");
    outbound.send(message(worker_message::Kind::Register(register))).await.map_err(closed)?;
    let first = tokio::time::timeout(ACCEPT_TIMEOUT, inbound.next()).await.map_err(|_| {
        Error::new(kiln_proto::Code::Unavailable, "the scheduler did not accept the worker in time")
    })?;
    let interval = match first {
        Some(Ok(SchedulerMessage { kind: Some(scheduler_message::Kind::Accepted(a)) })) => {
            Duration::from_millis(a.heartbeat_interval_ms.clamp(100, 60_000))
        }
        Some(Err(e)) => {
            return Err(Error::new(kiln_proto::Code::Unavailable, format!("session refused: {e}")));
        }
        _ => {
            return Err(Error::new(kiln_proto::Code::Unavailable, "the scheduler did not accept the worker"));
        }
    };
    tracing::info!(slots, "worker session accepted");
    kiln_proto::metrics::global().worker_slots.set(i64::from(slots));
    let heartbeat = {
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                if outbound.send(message(worker_message::Kind::Heartbeat(Heartbeat {}))).await.is_err() {
                    return;
                }
            }
        })
    };
    let free: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new((0..slots).rev().collect()));
    let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
    let result = loop {
        let Some(next) = inbound.next().await else { break Ok(()) };
        let kind = match next {
            Ok(SchedulerMessage { kind: Some(kind) }) => kind,
            Ok(_) => continue,
            Err(e) => break Err(Error::new(kiln_proto::Code::Unavailable, format!("session failed: {e}"))),
        };
        running.retain(|_, task| !task.is_finished());
        match kind {
            scheduler_message::Kind::Assign(assign) => {
                let slot = free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
                let Some(slot) = slot else {
                    tracing::warn!(execution = %assign.execution_id, "assigned more actions than slots; ignored");
                    continue;
                };
                let (runner, outbound) = (runner.clone(), outbound.clone());
                // The slot comes back when the run ends or is aborted
                // (cancelled): either way the task is dropped.
                let held = SlotGuard { free: free.clone(), slot };
                let id = assign.execution_id.clone();
                let task = tokio::spawn(async move {
                    let started = Started { execution_id: assign.execution_id.clone() };
                    let _ = outbound.send(message(worker_message::Kind::Started(started))).await;
                    let finished = runner.run(&assign, held.slot).await;
                    drop(held);
                    let _ = outbound.send(message(worker_message::Kind::Finished(finished))).await;
                });
                running.insert(id, task);
            }
            scheduler_message::Kind::Cancel(cancel) => {
                if let Some(task) = running.remove(&cancel.execution_id) {
                    tracing::info!(execution = %cancel.execution_id, "cancelled by the scheduler");
                    task.abort();
                }
            }
            scheduler_message::Kind::Accepted(_) => {}
        }
    };
    heartbeat.abort();
    // Aborting a run drops its sandbox guard, which kills what it runs.
    for (_, task) in running.drain() {
        task.abort();
    }
    result
}

/// A slot taken by a run; given back to the free list when dropped.
struct SlotGuard {
    free: Arc<Mutex<Vec<u32>>>,
    slot: u32,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(self.slot);
    }
}
