//! The scheduler's state machine: operations, executions, the fair queue
//! and the workers, under one lock; the gRPC services and the worker
//! sessions are thin layers over it.
//!
//! An Execute call creates an operation at once (CACHE_CHECK), then a task
//! looks the action up in the action cache, reads the Action and Command,
//! checks the timeout and that some registered worker could run the
//! platform, and either joins an identical execution in flight (same
//! instance and action digest, unless `do_not_cache`) or creates one. An
//! execution runs on one worker slot at a time; a lost worker's executions
//! go back to the front of the queue, a bounded number of times. Every
//! waiting execution ends: it runs, or its platform becomes unsatisfiable,
//! or it waits past the queue timeout, or nobody waits for it any more.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use kiln_proto::access::{Permit, rights};
use kiln_proto::kiln::worker::{
    Assign, Cancel, Finished, Register, SchedulerMessage, WorkerMessage, scheduler_message, worker_message,
};
use kiln_proto::limits::SCHEDULER_SWEEP_INTERVAL;
use kiln_proto::reapi::{ActionResult, ExecuteResponse, execution_stage::Value as Stage};
use kiln_proto::{Code, Digest, Error, Result};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::backend::Backend;
use crate::ops::{self, OpState};
use crate::platform::{Platform, Rules};
use crate::queue::{Entry, ExecId, FairQueue, Lane, TenantShare};

/// How the scheduler behaves; see the `[execution]` configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub rules: Rules,
    /// Timeout of actions that set none.
    pub default_timeout: Duration,
    /// Longest timeout an action may ask for (INVALID_ARGUMENT above).
    pub max_timeout: Duration,
    /// After start-up, how long an action no registered worker can run is
    /// UNAVAILABLE (workers may still be connecting) rather than
    /// FAILED_PRECONDITION; also how long a queued action may wait once
    /// the last worker that could run it is gone.
    pub unsatisfiable_grace: Duration,
    /// Longest an action waits in the queue.
    pub queue_timeout: Duration,
    /// Runs of one execution (each lost worker costs one).
    pub attempts_max: u32,
    pub heartbeat_interval: Duration,
    /// A worker silent this long is lost.
    pub worker_lost_after: Duration,
    /// How long an execution nobody waits for is kept before it is
    /// cancelled (a client whose stream broke calls WaitExecution).
    pub orphan_grace: Duration,
    /// How long finished operations are kept for late waiters.
    pub operation_retention: Duration,
    /// Most operations kept, finished or not.
    pub operations_max: usize,
    /// Most executions waiting in the queue.
    pub queued_max: usize,
    /// Tenants' weights and caps; a tenant not named has weight 1, no cap.
    pub tenants: HashMap<String, TenantShare>,
}

/// One Execute call. Its instance and principal come from the caller's
/// permit to execute there ([`ExecuteArgs::new`]): nothing runs, and no
/// action or result of the instance is read, without one.
#[derive(Debug, Clone)]
pub struct ExecuteArgs {
    pub(crate) instance: String,
    pub action: Digest,
    pub skip_cache_lookup: bool,
    pub priority: i32,
    /// `tool_invocation_id` from the request metadata ("" when absent).
    pub invocation: String,
    /// Who asked: shares are fair between principals within a tenant.
    pub(crate) principal: String,
}

impl ExecuteArgs {
    pub fn new(permit: &Permit<rights::Execute>, action: Digest) -> Self {
        ExecuteArgs {
            instance: permit.tenant().to_owned(),
            action,
            skip_cache_lookup: false,
            priority: 0,
            invocation: String::new(),
            principal: permit.principal().to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ActionKey {
    instance: String,
    action: Digest,
}

type WorkerKey = u64;

struct Op {
    instance: String,
    action: Digest,
    exec: Option<ExecId>,
    tx: watch::Sender<Arc<OpState>>,
    waiters: u32,
    idle_since: Option<Instant>,
}

struct Execution {
    key: ActionKey,
    /// Registered in `in_flight` (identical actions join it).
    merges: bool,
    action: Bytes,
    platform: Platform,
    priority: i32,
    /// Its tenant and invocation, whose shares it counts against.
    lane: Lane,
    timeout: Duration,
    do_not_cache: bool,
    ops: Vec<String>,
    running: Option<(WorkerKey, Instant)>,
    attempts: u32,
    seq: u64,
    enqueued: Instant,
    queued_wall: SystemTime,
    unsatisfiable_since: Option<Instant>,
    last_worker: String,
    /// Ran; its result is being written to the action cache.
    finishing: bool,
}

struct Worker {
    id: String,
    platform: Platform,
    slots: usize,
    running: HashSet<ExecId>,
    tx: mpsc::Sender<SchedulerMessage>,
    last_seen: Instant,
}

#[derive(Default)]
struct State {
    next_id: u64,
    executions: HashMap<ExecId, Execution>,
    in_flight: HashMap<ActionKey, ExecId>,
    operations: HashMap<String, Op>,
    done: VecDeque<(Instant, String)>,
    queue: FairQueue,
    workers: HashMap<WorkerKey, Worker>,
    worker_ids: HashMap<String, WorkerKey>,
    failures: VecDeque<snapshot::FailureView>,
    lost_platforms: crate::platform::LostPlatforms,
}

/// Counts for tests, logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub operations: usize,
    pub executions: usize,
    pub queued: usize,
    pub running: usize,
    pub workers: usize,
    pub slots: usize,
}

struct Inner<B> {
    me: Weak<Inner<B>>,
    backend: B,
    config: Config,
    started: Instant,
    state: Mutex<State>,
}

/// The scheduler; cheap to clone.
pub struct Scheduler<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for Scheduler<B> {
    fn clone(&self) -> Self {
        Scheduler { inner: self.inner.clone() }
    }
}

impl<B> std::fmt::Debug for Scheduler<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

/// A stream's interest in an operation: while one exists, the operation's
/// execution is not an orphan.
pub struct Watch {
    pub name: String,
    pub action: Digest,
    pub rx: watch::Receiver<Arc<OpState>>,
    guard: WaiterGuard,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Watch {
    /// The operation as it is now.
    pub fn operation(&self) -> kiln_proto::google::longrunning::Operation {
        self.rx.borrow().to_operation(&self.name, &self.action)
    }

    pub fn keep_alive(&self) -> &dyn std::any::Any {
        &self.guard
    }
}

struct WaiterGuard {
    release: Box<dyn Fn() + Send + Sync>,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        (self.release)();
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn exec_name(id: ExecId) -> String {
    format!("e{id}")
}

fn parse_exec_name(name: &str) -> Option<ExecId> {
    name.strip_prefix('e')?.parse().ok()
}

impl<B: Backend> Scheduler<B> {
    /// A scheduler; its sweeper runs on the current tokio runtime until
    /// the last clone is dropped.
    pub fn new(backend: B, config: Config) -> Self {
        let state = State { queue: FairQueue::with_shares(config.tenants.clone()), ..State::default() };
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            backend,
            config,
            started: Instant::now(),
            state: Mutex::new(state),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SCHEDULER_SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.sweep();
            }
        });
        Scheduler { inner }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn stats(&self) -> Stats {
        let s = lock(&self.inner.state);
        Stats {
            operations: s.operations.len(),
            executions: s.executions.len(),
            queued: s.queue.len(),
            running: s.workers.values().map(|w| w.running.len()).sum(),
            workers: s.workers.len(),
            slots: s.workers.values().map(|w| w.slots).sum(),
        }
    }

    /// Starts an execution; the operation exists (at CACHE_CHECK) when
    /// this returns, and the rest happens in the background.
    pub fn execute(&self, args: ExecuteArgs) -> Result<Watch> {
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let watch = {
            let mut s = lock(&self.inner.state);
            if s.operations.len() >= self.inner.config.operations_max {
                return Err(Error::resource_exhausted(format!(
                    "{} operations are in progress or kept; try again later",
                    s.operations.len()
                )));
            }
            let (tx, _) = watch::channel(OpState::at(Stage::CacheCheck));
            s.operations.insert(
                name.clone(),
                Op {
                    instance: args.instance.clone(),
                    action: args.action,
                    exec: None,
                    tx,
                    waiters: 0,
                    idle_since: None,
                },
            );
            Inner::watch_locked(&self.inner, &mut s, &name).expect("just inserted")
        };
        let inner = self.inner.clone();
        let op = name.clone();
        tokio::spawn(async move { inner.prepare(op, args).await });
        Ok(watch)
    }

    /// Follows an existing operation (WaitExecution, WaitOperation).
    pub fn watch(&self, name: &str) -> Option<Watch> {
        let mut s = lock(&self.inner.state);
        Inner::watch_locked(&self.inner, &mut s, name)
    }

    /// The instance an operation belongs to, and its operation message.
    pub fn get(&self, name: &str) -> Option<(String, kiln_proto::google::longrunning::Operation)> {
        let s = lock(&self.inner.state);
        let op = s.operations.get(name)?;
        Some((op.instance.clone(), op.tx.borrow().to_operation(name, &op.action)))
    }

    /// Operations in name order after `after`, at most `limit`.
    pub fn list(
        &self,
        after: &str,
        limit: usize,
    ) -> Vec<(String, kiln_proto::google::longrunning::Operation)> {
        let s = lock(&self.inner.state);
        let mut names: Vec<&String> = s.operations.keys().filter(|n| n.as_str() > after).collect();
        names.sort_unstable();
        names
            .into_iter()
            .take(limit)
            .map(|n| {
                let op = &s.operations[n];
                (op.instance.clone(), op.tx.borrow().to_operation(n, &op.action))
            })
            .collect()
    }

    /// Cancels one caller's operation; its execution stops when no other
    /// operation shares it.
    pub fn cancel(&self, name: &str) -> Result<()> {
        let mut s = lock(&self.inner.state);
        let op =
            s.operations.get_mut(name).ok_or_else(|| Error::not_found(format!("no operation {name}")))?;
        if op.tx.borrow().is_done() {
            return Ok(());
        }
        let exec = op.exec.take();
        tracing::debug!(operation = %name, execution = ?exec.map(exec_name), "operation cancelled");
        let response = ops::response(
            None,
            ops::status(tonic::Code::Cancelled, "cancelled by CancelOperation"),
            false,
            String::new(),
        );
        op.tx.send_replace(OpState::done(response.clone()));
        s.done.push_back((Instant::now(), name.to_owned()));
        if let Some(id) = exec {
            let alone = s.executions.get_mut(&id).is_some_and(|e| {
                e.ops.retain(|o| o != name);
                e.ops.is_empty()
            });
            if alone {
                self.inner.finish(&mut s, id, &response);
            }
        }
        Ok(())
    }

    /// Forgets a finished operation.
    pub fn delete(&self, name: &str) -> Result<()> {
        let mut s = lock(&self.inner.state);
        match s.operations.get(name) {
            None => Err(Error::not_found(format!("no operation {name}"))),
            Some(op) if !op.tx.borrow().is_done() => Err(Error::new(
                Code::FailedPrecondition,
                format!("operation {name} is not done; cancel it first"),
            )),
            Some(_) => {
                s.operations.remove(name);
                Ok(())
            }
        }
    }

    /// A worker session begins; `tx` carries messages to it.
    pub fn attach_worker(&self, register: &Register, tx: mpsc::Sender<SchedulerMessage>) -> Result<u64> {
        if register.worker_id.is_empty() || register.worker_id.len() > 256 {
            return Err(Error::invalid_argument("worker_id must be 1 to 256 bytes"));
        }
        if register.slots == 0 || register.slots > 4096 {
            return Err(Error::invalid_argument("slots must be 1 to 4096"));
        }
        let platform =
            Platform::new(register.properties.iter().map(|p| (p.name.clone(), p.value.clone())).collect());
        let mut s = lock(&self.inner.state);
        if let Some(old) = s.worker_ids.get(&register.worker_id).copied() {
            self.inner.lose_worker(&mut s, old, "it registered again");
        }
        s.next_id += 1;
        let key = s.next_id;
        s.worker_ids.insert(register.worker_id.clone(), key);
        s.workers.insert(
            key,
            Worker {
                id: register.worker_id.clone(),
                platform,
                slots: register.slots as usize,
                running: HashSet::new(),
                tx,
                last_seen: Instant::now(),
            },
        );
        tracing::info!(worker = %register.worker_id, slots = register.slots, "worker registered");
        self.inner.fill(&mut s, key);
        Ok(key)
    }

    /// A message from a worker session.
    pub fn worker_message(&self, key: u64, message: WorkerMessage) {
        let mut s = lock(&self.inner.state);
        let Some(worker) = s.workers.get_mut(&key) else { return };
        worker.last_seen = Instant::now();
        match message.kind {
            Some(worker_message::Kind::Finished(f)) => self.inner.finished(&mut s, key, f),
            Some(worker_message::Kind::Started(_) | worker_message::Kind::Heartbeat(_)) | None => {}
            Some(worker_message::Kind::Register(_)) => {
                self.inner.lose_worker(&mut s, key, "it sent a second Register");
            }
        }
    }

    /// A worker session ended.
    pub fn detach_worker(&self, key: u64, why: &str) {
        let mut s = lock(&self.inner.state);
        self.inner.lose_worker(&mut s, key, why);
    }
}

impl<B: Backend> Inner<B> {
    fn watch_locked(self: &Arc<Self>, s: &mut State, name: &str) -> Option<Watch> {
        let op = s.operations.get_mut(name)?;
        op.waiters += 1;
        op.idle_since = None;
        let weak: Weak<Inner<B>> = Arc::downgrade(self);
        let owned = name.to_owned();
        let release = move || {
            if let Some(inner) = weak.upgrade() {
                let mut s = lock(&inner.state);
                if let Some(op) = s.operations.get_mut(&owned) {
                    op.waiters = op.waiters.saturating_sub(1);
                    if op.waiters == 0 {
                        op.idle_since = Some(Instant::now());
                    }
                }
            }
        };
        Some(Watch {
            name: name.to_owned(),
            action: op.action,
            rx: op.tx.subscribe(),
            guard: WaiterGuard { release: Box::new(release) },
        })
    }

    async fn prepare(self: Arc<Self>, name: String, args: ExecuteArgs) {
        match self.look(&args).await {
            Ok(Prepared::Cached(result)) => {
                tracing::debug!(operation = %name, action = %args.action, "action cache hit; nothing to run");
                let response =
                    ops::response(Some(*result), ops::status(tonic::Code::Ok, ""), true, String::new());
                let mut s = lock(&self.state);
                Self::complete_op(&mut s, &name, &response);
            }
            Ok(Prepared::Ready { action, platform, timeout, do_not_cache }) => {
                let mut s = lock(&self.state);
                self.enqueue(&mut s, &name, &args, action, platform, timeout, do_not_cache);
            }
            Err(status) => {
                tracing::debug!(operation = %name, action = %args.action, code = status.code, "refused before queueing");
                let response = ops::response(None, status, false, String::new());
                let mut s = lock(&self.state);
                Self::complete_op(&mut s, &name, &response);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        s: &mut State,
        name: &str,
        args: &ExecuteArgs,
        action: Bytes,
        platform: Platform,
        timeout: Duration,
        do_not_cache: bool,
    ) {
        // Cancelled (or pruned) while we looked.
        if s.operations.get(name).is_none_or(|op| op.tx.borrow().is_done()) {
            return;
        }
        let grace = self.config.unsatisfiable_grace;
        if !s.workers.values().any(|w| self.config.rules.satisfies(&w.platform, &platform))
            && !s.lost_platforms.covers(&self.config.rules, &platform, Instant::now(), grace)
        {
            let explanation = self.config.rules.explain(s.workers.values().map(|w| &w.platform), &platform);
            let status = if self.started.elapsed() < self.config.unsatisfiable_grace {
                ops::status(
                    tonic::Code::Unavailable,
                    format!("{explanation}; workers may still be connecting after a restart, retry"),
                )
            } else {
                ops::status(tonic::Code::FailedPrecondition, explanation)
            };
            Self::complete_op(s, name, &ops::response(None, status, false, String::new()));
            return;
        }
        let key = ActionKey { instance: args.instance.clone(), action: args.action };
        if !do_not_cache && let Some(&id) = s.in_flight.get(&key) {
            let stage = s
                .executions
                .get(&id)
                .map(|e| if e.running.is_some() { Stage::Executing } else { Stage::Queued });
            if let Some(stage) = stage {
                s.executions.get_mut(&id).expect("looked up").ops.push(name.to_owned());
                tracing::debug!(operation = %name, execution = %exec_name(id), "joined an identical execution in flight");
                let op = s.operations.get_mut(name).expect("checked");
                op.exec = Some(id);
                op.tx.send_replace(OpState::at(stage));
                return;
            }
        }
        if s.queue.len() >= self.config.queued_max {
            let status = ops::status(
                tonic::Code::ResourceExhausted,
                format!("{} actions are queued already; try again later", s.queue.len()),
            );
            Self::complete_op(s, name, &ops::response(None, status, false, String::new()));
            return;
        }
        s.next_id += 1;
        let id = s.next_id;
        let now = Instant::now();
        s.executions.insert(
            id,
            Execution {
                key: key.clone(),
                merges: !do_not_cache,
                action,
                platform,
                priority: args.priority,
                lane: Lane::new(kiln_proto::tenant::base(&args.instance), &args.principal, &args.invocation),
                timeout,
                do_not_cache,
                ops: vec![name.to_owned()],
                running: None,
                attempts: 0,
                seq: id,
                enqueued: now,
                queued_wall: SystemTime::now(),
                unsatisfiable_since: None,
                last_worker: String::new(),
                finishing: false,
            },
        );
        if !do_not_cache {
            s.in_flight.insert(key, id);
        }
        if let Some(op) = s.operations.get_mut(name) {
            op.exec = Some(id);
        }
        tracing::debug!(
            operation = %name,
            execution = %exec_name(id),
            action = %args.action,
            instance = %kiln_proto::text::quoted(&args.instance),
            invocation = %kiln_proto::text::quoted(&args.invocation),
            "action queued"
        );
        self.place(s, id, false);
    }

    /// Runs `id` on a free worker that can, or queues it.
    fn place(&self, s: &mut State, id: ExecId, front: bool) {
        let Some(e) = s.executions.get(&id) else { return };
        if front {
            kiln_proto::metrics::global().retries.inc();
        }
        let free = s
            .workers
            .iter()
            .filter(|(_, w)| {
                w.running.len() < w.slots && self.config.rules.satisfies(&w.platform, &e.platform)
            })
            .min_by_key(|(_, w)| w.running.len() * 1000 / w.slots)
            .map(|(k, _)| *k)
            // A tenant at its cap waits even for a free slot.
            .filter(|_| !s.queue.at_cap(&e.lane.tenant));
        match free {
            Some(worker) => self.assign(s, id, worker),
            None => {
                let entry = Entry { id, priority: e.priority, seq: e.seq };
                let lane = e.lane.clone();
                let ops = e.ops.clone();
                s.queue.push(&lane, entry, front);
                Self::set_stage(s, &ops, Stage::Queued);
            }
        }
    }

    /// Gives a worker's free slots to the queue; when a tenant came off its
    /// cap, every worker's: its executions waited although slots were free,
    /// maybe on workers other than the one whose slot came back.
    fn fill(&self, s: &mut State, worker: WorkerKey) {
        self.fill_one(s, worker);
        if s.queue.take_uncapped() {
            let free: Vec<WorkerKey> =
                s.workers.iter().filter(|(_, w)| w.running.len() < w.slots).map(|(k, _)| *k).collect();
            for w in free {
                self.fill_one(s, w);
            }
        }
    }

    fn fill_one(&self, s: &mut State, worker: WorkerKey) {
        loop {
            let Some(w) = s.workers.get(&worker) else { return };
            if w.running.len() >= w.slots || s.queue.is_empty() {
                return;
            }
            let platform = w.platform.clone();
            let executions = &s.executions;
            let rules = &self.config.rules;
            let picked = s
                .queue
                .pick(|id| executions.get(&id).is_some_and(|e| rules.satisfies(&platform, &e.platform)));
            let Some((_, entry)) = picked else { return };
            self.assign(s, entry.id, worker);
        }
    }

    fn assign(&self, s: &mut State, id: ExecId, worker: WorkerKey) {
        let (Some(e), Some(w)) = (s.executions.get_mut(&id), s.workers.get_mut(&worker)) else { return };
        e.attempts += 1;
        let now = Instant::now();
        kiln_proto::metrics::global()
            .dispatch_latency
            .observe(now.saturating_duration_since(e.enqueued).as_secs_f64());
        e.running = Some((worker, now));
        e.unsatisfiable_since = None;
        e.last_worker = w.id.clone();
        w.running.insert(id);
        let message = SchedulerMessage {
            kind: Some(scheduler_message::Kind::Assign(Assign {
                execution_id: exec_name(id),
                instance_name: e.key.instance.clone(),
                digest_function: e.key.action.function().name().to_owned(),
                action_digest: format!("{}/{}", e.key.action.hash_hex(), e.key.action.size_bytes()),
                action: e.action.to_vec(),
                timeout_ms: u64::try_from(e.timeout.as_millis()).unwrap_or(u64::MAX),
            })),
        };
        tracing::debug!(
            execution = %exec_name(id),
            action = %e.key.action,
            worker = %w.id,
            attempt = e.attempts,
            "action dispatched"
        );
        let sent = w.tx.try_send(message).is_ok();
        let lane = e.lane.clone();
        let ops = e.ops.clone();
        s.queue.started(&lane);
        Self::set_stage(s, &ops, Stage::Executing);
        if !sent {
            self.lose_worker(s, worker, "its message queue is full or closed");
        }
    }

    fn set_stage(s: &mut State, ops: &[String], stage: Stage) {
        for name in ops {
            if let Some(op) = s.operations.get_mut(name)
                && !op.tx.borrow().is_done()
            {
                op.tx.send_replace(OpState::at(stage));
            }
        }
    }

    fn complete_op(s: &mut State, name: &str, response: &ExecuteResponse) {
        if let Some(op) = s.operations.get_mut(name) {
            op.exec = None;
            if !op.tx.borrow().is_done() {
                op.tx.send_replace(OpState::done(response.clone()));
                s.done.push_back((Instant::now(), name.to_owned()));
            }
        }
    }

    /// Ends an execution: every operation on it gets `response`, its slot
    /// (if it held one) goes back, and a running worker is told to stop.
    fn finish(&self, s: &mut State, id: ExecId, response: &ExecuteResponse) {
        let Some(e) = s.executions.remove(&id) else { return };
        snapshot::ended(s, id, &e, response);
        if e.merges && s.in_flight.get(&e.key) == Some(&id) {
            s.in_flight.remove(&e.key);
        }
        for name in &e.ops {
            Self::complete_op(s, name, response);
        }
        match e.running {
            Some((worker, _)) => {
                s.queue.stopped(&e.lane);
                if let Some(w) = s.workers.get_mut(&worker)
                    && w.running.remove(&id)
                {
                    let cancel = SchedulerMessage {
                        kind: Some(scheduler_message::Kind::Cancel(Cancel { execution_id: exec_name(id) })),
                    };
                    // Best effort: a worker that finished reports it anyway.
                    let _ = w.tx.try_send(cancel);
                }
                self.fill(s, worker);
            }
            None => {
                s.queue.remove(&e.lane, id);
            }
        }
    }

    /// A worker reported an execution's end.
    fn finished(&self, s: &mut State, worker: WorkerKey, f: Finished) {
        let Some(id) = parse_exec_name(&f.execution_id) else { return };
        let ours = s.executions.get(&id).is_some_and(|e| e.running.is_some_and(|(w, _)| w == worker));
        if let Some(w) = s.workers.get_mut(&worker) {
            w.running.remove(&id);
        }
        if !ours {
            self.fill(s, worker);
            return;
        }
        let e = s.executions.get_mut(&id).expect("checked");
        if let Some((_, started)) = e.running {
            kiln_proto::metrics::global().action_duration.observe(started.elapsed().as_secs_f64());
        }
        e.running = None;
        let lane = e.lane.clone();
        s.queue.stopped(&lane);
        let code = tonic::Code::from_i32(f.code);
        let mut result = if f.action_result.is_empty() {
            None
        } else {
            match ActionResult::decode(f.action_result.as_slice()) {
                Ok(r) => Some(r),
                Err(err) => {
                    let status = ops::status(
                        tonic::Code::Internal,
                        format!("the worker sent a bad ActionResult: {err}"),
                    );
                    self.finish(s, id, &ops::response(None, status, false, String::new()));
                    self.fill(s, worker);
                    return;
                }
            }
        };
        let e = s.executions.get(&id).expect("checked");
        if let Some(r) = result.as_mut() {
            let meta = r.execution_metadata.get_or_insert_with(Default::default);
            meta.queued_timestamp = Some(kiln_proto::timestamp(e.queued_wall));
        }
        let retry = matches!(code, tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown)
            && e.attempts < self.config.attempts_max;
        if retry {
            tracing::warn!(worker = %e.last_worker, code = ?code, message = %f.message, "execution failed on its worker; requeued");
            self.place(s, id, true);
            self.fill(s, worker);
            return;
        }
        let response = match code {
            tonic::Code::FailedPrecondition if !f.missing_blobs.is_empty() => {
                let function = Some(e.key.action.function());
                let missing: Vec<Digest> = f
                    .missing_blobs
                    .iter()
                    .filter_map(|m| {
                        let (hash, size) = m.split_once('/')?;
                        Digest::parse(function, hash, size.parse().ok()?).ok()
                    })
                    .collect();
                ops::response(None, ops::missing_blobs(&missing), false, String::new())
            }
            tonic::Code::Ok => {
                let cache = !e.do_not_cache && result.as_ref().is_some_and(|r| r.exit_code == 0);
                if cache && let Some(r) = &result {
                    // The cache write goes first, so that a client that
                    // asks the action cache after this answer finds it.
                    return self.cache_then_finish(s, id, worker, r.clone());
                }
                ops::response(result, ops::status(tonic::Code::Ok, ""), false, String::new())
            }
            _ => ops::response(result, ops::status(code, f.message), false, String::new()),
        };
        self.finish(s, id, &response);
        self.fill(s, worker);
    }

    fn cache_then_finish(&self, s: &mut State, id: ExecId, worker: WorkerKey, result: ActionResult) {
        let Some(e) = s.executions.get_mut(&id) else { return };
        e.finishing = true;
        let (instance, action) = (e.key.instance.clone(), e.key.action);
        self.fill(s, worker);
        let this = self.me.clone();
        tokio::spawn(async move {
            let Some(this) = this.upgrade() else { return };
            if let Err(e) = this.backend.put_action_result(&instance, &action, &result).await {
                tracing::warn!(error = %e, action = %action, "could not cache the action result");
            }
            let response =
                ops::response(Some(result), ops::status(tonic::Code::Ok, ""), false, String::new());
            let mut s = lock(&this.state);
            this.finish(&mut s, id, &response);
        });
    }

    /// Requeues (or fails) a lost worker's executions and forgets it.
    fn lose_worker(&self, s: &mut State, worker: WorkerKey, why: &str) {
        let Some(w) = s.workers.remove(&worker) else { return };
        if s.worker_ids.get(&w.id) == Some(&worker) {
            s.worker_ids.remove(&w.id);
        }
        tracing::warn!(worker = %w.id, running = w.running.len(), "worker lost: {why}");
        s.lost_platforms.record(&w.platform, Instant::now());
        kiln_proto::metrics::global().lost_workers.inc();
        for id in w.running {
            let Some(e) = s.executions.get_mut(&id) else { continue };
            e.running = None;
            let lane = e.lane.clone();
            s.queue.stopped(&lane);
            let e = s.executions.get(&id).expect("present");
            if e.attempts < self.config.attempts_max {
                self.place(s, id, true);
            } else {
                let status = ops::status(
                    tonic::Code::Unavailable,
                    format!(
                        "the action's worker was lost {} times (last: {}, {why}); giving up",
                        e.attempts, w.id
                    ),
                );
                self.finish(s, id, &ops::response(None, status, false, String::new()));
            }
        }
    }
}

#[path = "prepare.rs"]
mod prepare;
use prepare::Prepared;

#[path = "sweep.rs"]
mod sweep;

#[path = "snapshot.rs"]
pub mod snapshot;

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
