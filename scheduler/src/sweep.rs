//! The scheduler's once-a-second sweep: lost workers, stuck, orphaned,
//! unsatisfiable and long-queued executions, and old finished operations.

use std::collections::HashMap;

use kiln_proto::kiln::worker::{Cancel, SchedulerMessage, scheduler_message};
use kiln_proto::limits::EXECUTION_REPORT_GRACE;
use tokio::time::Instant;

use super::{ExecId, Inner, State, WorkerKey, exec_name, lock};
use crate::backend::Backend;
use crate::ops;
use crate::platform::Platform;

impl<B: Backend> Inner<B> {
    /// Once a second: lost workers, stuck, orphaned, unsatisfiable and
    /// long-queued executions, and old finished operations.
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        let mut s = lock(&self.state);
        let silent: Vec<WorkerKey> = s
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > self.config.worker_lost_after)
            .map(|(k, _)| *k)
            .collect();
        for worker in silent {
            self.lose_worker(&mut s, worker, "it missed its heartbeats");
        }
        let ids: Vec<ExecId> = s.executions.keys().copied().collect();
        // Whether some worker can run a platform, asked once per distinct
        // platform: a long queue of few platforms must not cost queue ×
        // workers under the lock every second.
        let mut satisfiable = HashMap::new();
        for id in ids {
            self.sweep_one(&mut s, id, now, &mut satisfiable);
        }
        let retention = self.config.operation_retention;
        while let Some((at, name)) = s.done.front().cloned() {
            if now.duration_since(at) < retention && s.operations.len() <= self.config.operations_max {
                break;
            }
            s.done.pop_front();
            if s.operations.get(&name).is_some_and(|op| op.tx.borrow().is_done()) {
                s.operations.remove(&name);
            }
        }
    }

    fn sweep_one(&self, s: &mut State, id: ExecId, now: Instant, satisfiable: &mut HashMap<Platform, bool>) {
        let Some(e) = s.executions.get(&id) else { return };
        if e.finishing {
            return;
        }
        let orphan = e.ops.iter().all(|n| {
            s.operations.get(n).is_none_or(|op| {
                op.waiters == 0
                    && op.idle_since.is_some_and(|t| now.duration_since(t) >= self.config.orphan_grace)
            })
        });
        if orphan {
            let status = ops::status(tonic::Code::Cancelled, "nobody waits for this execution any more");
            self.finish(s, id, &ops::response(None, status, false, String::new()));
            return;
        }
        match e.running {
            Some((worker, since)) => {
                if now.duration_since(since) <= e.timeout + EXECUTION_REPORT_GRACE {
                    return;
                }
                let attempts = e.attempts;
                let worker_id = e.last_worker.clone();
                let lane = e.lane.clone();
                if let Some(w) = s.workers.get_mut(&worker) {
                    w.running.remove(&id);
                    let cancel = SchedulerMessage {
                        kind: Some(scheduler_message::Kind::Cancel(Cancel { execution_id: exec_name(id) })),
                    };
                    let _ = w.tx.try_send(cancel);
                }
                s.queue.stopped(&lane);
                if let Some(e) = s.executions.get_mut(&id) {
                    e.running = None;
                }
                if attempts < self.config.attempts_max {
                    tracing::warn!(worker = %worker_id, "execution not reported within its timeout; requeued");
                    self.place(s, id, true);
                } else {
                    let status = ops::status(
                        tonic::Code::DeadlineExceeded,
                        format!(
                            "worker {worker_id} did not report the action within its timeout, {attempts} times"
                        ),
                    );
                    self.finish(s, id, &ops::response(None, status, false, String::new()));
                }
                self.fill(s, worker);
            }
            None => {
                if now.duration_since(e.enqueued) > self.config.queue_timeout {
                    let status = ops::status(
                        tonic::Code::Unavailable,
                        format!(
                            "the action waited in the queue longer than {:?} ([execution] queue_timeout_ms)",
                            self.config.queue_timeout
                        ),
                    );
                    self.finish(s, id, &ops::response(None, status, false, String::new()));
                    return;
                }
                let can_run = match satisfiable.get(&e.platform) {
                    Some(&known) => known,
                    None => {
                        let known =
                            s.workers.values().any(|w| self.config.rules.satisfies(&w.platform, &e.platform));
                        satisfiable.insert(e.platform.clone(), known);
                        known
                    }
                };
                let e = s.executions.get_mut(&id).expect("present");
                if can_run {
                    e.unsatisfiable_since = None;
                    return;
                }
                let since = *e.unsatisfiable_since.get_or_insert(now);
                if now.duration_since(since) >= self.config.unsatisfiable_grace {
                    let platform = e.platform.clone();
                    let explanation =
                        self.config.rules.explain(s.workers.values().map(|w| &w.platform), &platform);
                    let status = ops::status(tonic::Code::FailedPrecondition, explanation);
                    self.finish(s, id, &ops::response(None, status, false, String::new()));
                }
            }
        }
    }
}
