//! What the status page and `kiln status` show of the scheduler: workers,
//! the queue by invocation and by platform, executions in progress and
//! recent failures; and the metrics recorded when an execution ends.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use kiln_proto::Digest;
use kiln_proto::metrics::{OutcomeLabels, code_name, global};
use kiln_proto::reapi::ExecuteResponse;
use tokio::time::Instant;

use super::{Execution, Scheduler, State, exec_name, lock};
use crate::backend::Backend;
use crate::queue::ExecId;

use kiln_proto::limits::{RECENT_FAILURES_MAX, SNAPSHOT_EXECUTING_MAX, SNAPSHOT_INVOCATIONS_MAX};

/// A registered worker.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub id: String,
    pub platform: String,
    pub slots: usize,
    pub running: usize,
    /// Since its last message (heartbeat or report).
    pub silent_for: Duration,
}

/// An execution on a worker.
#[derive(Debug, Clone)]
pub struct ExecutingView {
    pub execution: String,
    pub action: String,
    pub instance: String,
    pub invocation: String,
    pub worker: String,
    pub attempt: u32,
    pub running_for: Duration,
}

/// An execution that ended with an error or a non-zero exit code.
#[derive(Debug, Clone)]
pub struct FailureView {
    pub at: SystemTime,
    pub action: String,
    pub instance: String,
    pub worker: String,
    pub code: &'static str,
    pub message: String,
    pub exit_code: Option<i32>,
    pub stdout: Option<Digest>,
    pub stderr: Option<Digest>,
}

/// The scheduler at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub workers: Vec<WorkerView>,
    /// Queued executions per invocation (`tool_invocation_id`; "" when none).
    pub queued_by_invocation: Vec<(String, usize)>,
    /// Queued executions per worker platform that could run them
    /// ("unsatisfiable" when none could).
    pub queued_by_platform: Vec<(String, usize)>,
    /// Queued executions per platform (as above) and priority class
    /// ([`priority_class`]).
    pub queued_by_priority: Vec<((String, &'static str), usize)>,
    pub executing: Vec<ExecutingView>,
    /// Newest first.
    pub failures: Vec<FailureView>,
    pub operations: usize,
}

impl<B: Backend> Scheduler<B> {
    /// The scheduler now, for people (bounded: at most 1,000 executions
    /// and the last failures are listed).
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let s = lock(&self.inner.state);
        let rules = &self.inner.config.rules;
        let mut by_invocation: BTreeMap<String, usize> = BTreeMap::new();
        let mut by_platform: BTreeMap<String, usize> = BTreeMap::new();
        let mut by_priority: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
        let mut pools: std::collections::HashMap<&crate::platform::Platform, String> = Default::default();
        let mut executing = Vec::new();
        for (id, e) in &s.executions {
            match e.running.and_then(|(w, started)| s.workers.get(&w).map(|w| (w, started))) {
                Some((w, started)) if executing.len() < SNAPSHOT_EXECUTING_MAX => {
                    executing.push(ExecutingView {
                        execution: exec_name(*id),
                        action: e.key.action.to_string(),
                        instance: e.key.instance.clone(),
                        invocation: e.lane.invocation.clone(),
                        worker: w.id.clone(),
                        attempt: e.attempts,
                        running_for: now.saturating_duration_since(started),
                    });
                }
                Some(_) => {}
                None if !e.finishing => {
                    *by_invocation.entry(e.lane.invocation.clone()).or_default() += 1;
                    // Once per distinct platform: a long queue of few
                    // platforms must not cost queue × workers under the lock.
                    let pool = pools
                        .entry(&e.platform)
                        .or_insert_with(|| {
                            s.workers
                                .values()
                                .find(|w| rules.satisfies(&w.platform, &e.platform))
                                .map_or_else(|| "unsatisfiable".to_owned(), |w| w.platform.to_string())
                        })
                        .clone();
                    *by_priority.entry((pool.clone(), priority_class(e.priority))).or_default() += 1;
                    *by_platform.entry(pool).or_default() += 1;
                }
                None => {}
            }
        }
        executing.sort_by_key(|e| std::cmp::Reverse(e.running_for));
        let mut workers: Vec<WorkerView> = s
            .workers
            .values()
            .map(|w| WorkerView {
                id: w.id.clone(),
                platform: w.platform.to_string(),
                slots: w.slots,
                running: w.running.len(),
                silent_for: now.saturating_duration_since(w.last_seen),
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Snapshot {
            workers,
            queued_by_invocation: busiest(by_invocation),
            queued_by_platform: by_platform.into_iter().collect(),
            queued_by_priority: by_priority.into_iter().collect(),
            executing,
            failures: s.failures.iter().rev().cloned().collect(),
            operations: s.operations.len(),
        }
    }
}

/// The invocations with the most queued executions, at most
/// [`SNAPSHOT_INVOCATIONS_MAX`] in name order, the rest summed in one row.
pub(super) fn busiest(by_invocation: BTreeMap<String, usize>) -> Vec<(String, usize)> {
    let mut all: Vec<(String, usize)> = by_invocation.into_iter().collect();
    if all.len() <= SNAPSHOT_INVOCATIONS_MAX {
        return all;
    }
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let rest = all.split_off(SNAPSHOT_INVOCATIONS_MAX);
    all.sort();
    let queued = rest.iter().map(|(_, n)| n).sum();
    all.push((format!("({} more invocations)", rest.len()), queued));
    all
}

/// A priority as a label value from a fixed set: REAPI priorities are
/// any int32 (lower runs sooner), so the value itself would let clients
/// add series.
pub fn priority_class(priority: i32) -> &'static str {
    match priority.cmp(&0) {
        std::cmp::Ordering::Less => "high",
        std::cmp::Ordering::Equal => "normal",
        std::cmp::Ordering::Greater => "low",
    }
}

/// Counts an execution's end, and keeps it if it failed.
pub(super) fn ended(s: &mut State, id: ExecId, e: &Execution, response: &ExecuteResponse) {
    let code = response.status.as_ref().map_or(0, |s| s.code);
    global().executions.get_or_create(&OutcomeLabels { outcome: code_name(code) }).inc();
    let exit_code = response.result.as_ref().map(|r| r.exit_code);
    tracing::debug!(
        execution = %exec_name(id),
        operations = ?e.ops,
        code = code_name(code),
        exit_code,
        "execution finished"
    );
    if code == 0 && exit_code.unwrap_or(0) == 0 {
        return;
    }
    let function = Some(e.key.action.function());
    let digest = |d: Option<&kiln_proto::reapi::Digest>| {
        d.and_then(|d| Digest::parse(function, &d.hash, d.size_bytes).ok()).filter(|d| d.size_bytes() > 0)
    };
    let message = response.status.as_ref().map(|s| s.message.chars().take(512).collect()).unwrap_or_default();
    if s.failures.len() >= RECENT_FAILURES_MAX {
        s.failures.pop_front();
    }
    s.failures.push_back(FailureView {
        at: SystemTime::now(),
        action: e.key.action.to_string(),
        instance: e.key.instance.clone(),
        worker: e.last_worker.clone(),
        code: code_name(code),
        message,
        exit_code,
        stdout: digest(response.result.as_ref().and_then(|r| r.stdout_digest.as_ref())),
        stderr: digest(response.result.as_ref().and_then(|r| r.stderr_digest.as_ref())),
    });
}
