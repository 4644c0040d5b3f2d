//! The scheduler's state machine against an in-memory backend and workers
//! driven by hand, on tokio's paused (controllable) clock.

#![allow(clippy::cast_possible_truncation)] // Test counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kiln_proto::google::longrunning::operation;
use kiln_proto::kiln::worker::{
    Assign, Finished, Heartbeat, Property, Register, SchedulerMessage, WorkerMessage, scheduler_message,
    worker_message,
};
use kiln_proto::reapi::{self, ActionResult, ExecuteResponse};
use kiln_proto::{Digest, DigestFunction, Result};
use prost::Message;
use tokio::sync::mpsc;

use super::*;
use crate::ops::PreconditionFailure;
use crate::platform::Rule;

#[derive(Default, Clone)]
struct MemoryBackend {
    blobs: Arc<Mutex<HashMap<Digest, Bytes>>>,
    ac: Arc<Mutex<HashMap<Digest, ActionResult>>>,
}

impl Backend for MemoryBackend {
    async fn read_blob(&self, _instance: &str, digest: &Digest, _max: u64) -> Result<Bytes> {
        self.blobs.lock().unwrap().get(digest).cloned().ok_or_else(|| Error::not_found(format!("{digest}")))
    }

    async fn get_action_result(&self, _instance: &str, action: &Digest) -> Result<Option<ActionResult>> {
        Ok(self.ac.lock().unwrap().get(action).cloned())
    }

    async fn put_action_result(&self, _instance: &str, action: &Digest, result: &ActionResult) -> Result<()> {
        self.ac.lock().unwrap().insert(*action, result.clone());
        Ok(())
    }
}

impl MemoryBackend {
    fn put<M: Message>(&self, m: &M) -> Digest {
        let bytes = m.encode_to_vec();
        let d = DigestFunction::Sha256.compute(&bytes);
        self.blobs.lock().unwrap().insert(d, Bytes::from(bytes));
        d
    }

    /// Stores an action running `args` on `platform`.
    fn action(&self, args: &[&str], platform: &[(&str, &str)], timeout_s: i64, do_not_cache: bool) -> Digest {
        let command = reapi::Command {
            arguments: args.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        };
        let command_digest = self.put(&command);
        let input_root = self.put(&reapi::Directory::default());
        let properties = platform
            .iter()
            .map(|(n, v)| reapi::platform::Property { name: (*n).into(), value: (*v).into() })
            .collect();
        self.put(&reapi::Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(input_root.to_proto()),
            timeout: (timeout_s > 0)
                .then_some(kiln_proto::google::protobuf::Duration { seconds: timeout_s, nanos: 0 }),
            do_not_cache,
            platform: Some(reapi::Platform { properties }),
            ..Default::default()
        })
    }
}

fn config() -> Config {
    Config {
        rules: Rules::new([("cores".to_owned(), Rule::Minimum)].into_iter().collect()),
        default_timeout: Duration::from_secs(600),
        max_timeout: Duration::from_secs(3600),
        unsatisfiable_grace: Duration::from_secs(30),
        queue_timeout: Duration::from_secs(24 * 3600),
        attempts_max: 3,
        heartbeat_interval: Duration::from_secs(5),
        worker_lost_after: Duration::from_secs(30),
        orphan_grace: Duration::from_secs(60),
        operation_retention: Duration::from_secs(600),
        operations_max: 100_000,
        queued_max: 100_000,
        tenants: HashMap::new(),
    }
}

struct FakeWorker {
    key: u64,
    rx: mpsc::Receiver<SchedulerMessage>,
}

impl FakeWorker {
    fn attach(s: &Scheduler<MemoryBackend>, id: &str, slots: u32, properties: &[(&str, &str)]) -> FakeWorker {
        let (tx, rx) = mpsc::channel(1024);
        let register = Register {
            worker_id: id.to_owned(),
            properties: properties
                .iter()
                .map(|(n, v)| Property { name: (*n).into(), value: (*v).into() })
                .collect(),
            slots,
        };
        let key = s.attach_worker(&register, tx).unwrap();
        FakeWorker { key, rx }
    }

    /// The next message, within a minute of (paused) time.
    async fn next(&mut self) -> scheduler_message::Kind {
        tokio::time::timeout(Duration::from_secs(60), self.rx.recv())
            .await
            .expect("a message for the worker")
            .expect("session open")
            .kind
            .expect("a kind")
    }

    async fn assigned(&mut self) -> Assign {
        match self.next().await {
            scheduler_message::Kind::Assign(a) => a,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    fn idle(&mut self) -> bool {
        self.rx.try_recv().is_err()
    }

    fn finish(
        &self,
        s: &Scheduler<MemoryBackend>,
        a: &Assign,
        code: tonic::Code,
        result: Option<ActionResult>,
    ) {
        let f = Finished {
            execution_id: a.execution_id.clone(),
            code: code as i32,
            message: String::new(),
            action_result: result.map(|r| r.encode_to_vec()).unwrap_or_default(),
            missing_blobs: vec![],
        };
        s.worker_message(self.key, WorkerMessage { kind: Some(worker_message::Kind::Finished(f)) });
    }
}

/// Lets `d` of (paused) time pass while `w` heartbeats.
async fn pass(s: &Scheduler<MemoryBackend>, w: &FakeWorker, d: Duration) {
    let step = Duration::from_secs(5);
    let mut left = d;
    while !left.is_zero() {
        let now = step.min(left);
        tokio::time::advance(now).await;
        left -= now;
        s.worker_message(w.key, WorkerMessage { kind: Some(worker_message::Kind::Heartbeat(Heartbeat {})) });
    }
    tokio::task::yield_now().await;
}

fn ok(exit_code: i32) -> Option<ActionResult> {
    Some(ActionResult { exit_code, stdout_raw: b"out".to_vec(), ..Default::default() })
}

fn args(action: Digest, invocation: &str) -> ExecuteArgs {
    let mut args = ExecuteArgs::new(&kiln_proto::access::Permit::internal("main"), action);
    args.invocation = invocation.into();
    args
}

/// Waits until the operation is done; its response.
async fn done(w: &mut Watch) -> ExecuteResponse {
    tokio::time::timeout(Duration::from_secs(3600), async {
        loop {
            if let Some(r) = w.rx.borrow().response.clone() {
                return r;
            }
            w.rx.changed().await.expect("operation kept");
        }
    })
    .await
    .expect("the operation ends")
}

fn code(r: &ExecuteResponse) -> tonic::Code {
    tonic::Code::from_i32(r.status.as_ref().map_or(0, |s| s.code))
}

#[tokio::test(start_paused = true)]
async fn actions_run_on_a_worker_and_their_results_are_cached() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "w1", 2, &[("OSFamily", "linux")]);
    let action = b.action(&["true"], &[("OSFamily", "linux")], 0, false);
    let mut op = s.execute(args(action, "i1")).unwrap();
    assert!(!op.operation().done, "the first message comes at once, not done");
    let a = w.assigned().await;
    assert_eq!(a.timeout_ms, 600_000, "the default timeout");
    assert!(reapi::Action::decode(a.action.as_slice()).unwrap().command_digest.is_some());
    w.finish(&s, &a, tonic::Code::Ok, ok(0));
    let r = done(&mut op).await;
    assert_eq!(code(&r), tonic::Code::Ok);
    assert!(!r.cached_result);
    let meta = r.result.as_ref().unwrap().execution_metadata.as_ref().unwrap();
    assert!(meta.queued_timestamp.is_some(), "the scheduler adds the queue time");
    assert!(b.ac.lock().unwrap().contains_key(&action), "exit code 0 is cached");

    let mut again = s.execute(args(action, "i2")).unwrap();
    let r = done(&mut again).await;
    assert!(r.cached_result, "the second Execute is a cache hit");
    assert!(w.idle(), "and runs nothing");
    let mut skip = s.execute(ExecuteArgs { skip_cache_lookup: true, ..args(action, "i2") }).unwrap();
    let a = w.assigned().await;
    w.finish(&s, &a, tonic::Code::Ok, ok(0));
    assert!(!done(&mut skip).await.cached_result, "skip_cache_lookup runs it again");
}

#[tokio::test(start_paused = true)]
async fn failures_are_not_cached_and_cached_failures_rerun() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "w1", 1, &[]);
    let action = b.action(&["false"], &[], 0, false);
    b.ac.lock().unwrap().insert(action, ActionResult { exit_code: 1, ..Default::default() });
    let mut op = s.execute(args(action, "")).unwrap();
    let a = w.assigned().await;
    w.finish(&s, &a, tonic::Code::Ok, ok(1));
    let r = done(&mut op).await;
    assert_eq!(r.result.unwrap().exit_code, 1);
    assert_eq!(b.ac.lock().unwrap()[&action].exit_code, 1, "a non-zero exit is not written");

    let uncached = b.action(&["date"], &[], 0, true);
    let mut op = s.execute(args(uncached, "")).unwrap();
    let a = w.assigned().await;
    w.finish(&s, &a, tonic::Code::Ok, ok(0));
    done(&mut op).await;
    assert!(!b.ac.lock().unwrap().contains_key(&uncached), "do_not_cache is not cached");
}

#[tokio::test(start_paused = true)]
async fn identical_actions_in_flight_merge_and_do_not_cache_ones_do_not() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "w1", 4, &[]);
    let action = b.action(&["cc"], &[], 0, false);
    let mut first = s.execute(args(action, "a")).unwrap();
    let a = w.assigned().await;
    let mut second = s.execute(args(action, "b")).unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(second.rx.borrow().stage, Stage::Executing) {
            second.rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the second caller joins the running execution");
    assert!(w.idle(), "one execution for both callers");
    assert_ne!(first.name, second.name, "each caller has its own operation");
    w.finish(&s, &a, tonic::Code::Ok, ok(0));
    assert_eq!(done(&mut first).await.result, done(&mut second).await.result);

    let fresh = b.action(&["stamp"], &[], 0, true);
    let mut x = s.execute(args(fresh, "a")).unwrap();
    let mut y = s.execute(args(fresh, "a")).unwrap();
    let (a1, a2) = (w.assigned().await, w.assigned().await);
    assert_ne!(a1.execution_id, a2.execution_id, "do_not_cache actions never merge");
    w.finish(&s, &a1, tonic::Code::Ok, ok(0));
    w.finish(&s, &a2, tonic::Code::Ok, ok(0));
    done(&mut x).await;
    done(&mut y).await;
}

#[tokio::test(start_paused = true)]
async fn unsatisfiable_platforms_fail_fast_after_the_grace() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let action = b.action(&["true"], &[("OSFamily", "linux")], 0, false);
    let mut op = s.execute(args(action, "")).unwrap();
    let r = done(&mut op).await;
    assert_eq!(code(&r), tonic::Code::Unavailable, "during the start-up grace: retry later");
    tokio::time::advance(Duration::from_secs(31)).await;
    let _w = FakeWorker::attach(&s, "w1", 1, &[("OSFamily", "linux"), ("cores", "8")]);
    let windows = b.action(&["true"], &[("OSFamily", "windows")], 0, false);
    let mut op = s.execute(args(windows, "")).unwrap();
    let r = done(&mut op).await;
    assert_eq!(code(&r), tonic::Code::FailedPrecondition);
    let message = r.status.unwrap().message;
    assert!(message.contains("OSFamily=windows") && message.contains("linux"), "{message}");
    let big = b.action(&["true"], &[("cores", "64")], 0, false);
    let r = done(&mut s.execute(args(big, "")).unwrap()).await;
    assert_eq!(code(&r), tonic::Code::FailedPrecondition, "minimum rule: 8 cores offered, 64 asked");
    let small = b.action(&["true"], &[("cores", "4")], 0, false);
    let op = s.execute(args(small, "")).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!op.operation().done, "4 cores fit on an 8-core worker");
}

#[tokio::test(start_paused = true)]
async fn queued_actions_whose_workers_leave_fail_instead_of_waiting_forever() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "gpu", 1, &[("gpu", "1")]);
    let first = b.action(&["a"], &[("gpu", "1")], 0, false);
    let second = b.action(&["b"], &[("gpu", "1")], 0, false);
    let _running = s.execute(args(first, "")).unwrap();
    let mut queued = s.execute(args(second, "")).unwrap();
    w.assigned().await;
    s.detach_worker(w.key, "test");
    let r = done(&mut queued).await;
    assert_eq!(code(&r), tonic::Code::FailedPrecondition, "{r:?}");
}

/// A worker that goes away (its process restarting, a reconnect) fails no
/// action submitted before it is back within the grace; past the grace,
/// an action for its platform is refused as before.
#[tokio::test(start_paused = true)]
async fn an_action_submitted_while_its_worker_restarts_waits_for_it() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    // Past the start-up grace, when nobody offering a platform means no.
    tokio::time::advance(Duration::from_secs(31)).await;
    let w = FakeWorker::attach(&s, "local", 1, &[("gpu", "1")]);
    s.detach_worker(w.key, "its process ended");
    let mut op = s.execute(args(b.action(&["a"], &[("gpu", "1")], 0, false), "")).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!op.operation().done, "queued while the worker is away");
    let mut back = FakeWorker::attach(&s, "local", 1, &[("gpu", "1")]);
    let a = back.assigned().await;
    back.finish(&s, &a, tonic::Code::Ok, ok(0));
    assert_eq!(code(&done(&mut op).await), tonic::Code::Ok);
    s.detach_worker(back.key, "gone for good");
    tokio::time::advance(Duration::from_secs(31)).await;
    let r = done(&mut s.execute(args(b.action(&["b"], &[("gpu", "1")], 0, false), "")).unwrap()).await;
    assert_eq!(code(&r), tonic::Code::FailedPrecondition, "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn lost_workers_requeue_their_actions_a_bounded_number_of_times() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let action = b.action(&["crash"], &[], 0, false);
    let mut w1 = FakeWorker::attach(&s, "w1", 1, &[]);
    let mut op = s.execute(args(action, "")).unwrap();
    w1.assigned().await;
    let mut w2 = FakeWorker::attach(&s, "w2", 1, &[]);
    s.detach_worker(w1.key, "SIGKILL");
    let a = w2.assigned().await;
    assert!(!op.operation().done, "requeued, not failed");
    // w2 then stops heartbeating: lost after 30 s.
    tokio::time::advance(Duration::from_secs(31)).await;
    let mut w3 = FakeWorker::attach(&s, "w3", 1, &[]);
    let third = w3.assigned().await;
    assert_eq!(third.execution_id, a.execution_id, "same execution, third attempt");
    s.detach_worker(w3.key, "SIGKILL");
    let r = done(&mut op).await;
    assert_eq!(code(&r), tonic::Code::Unavailable);
    assert!(r.status.unwrap().message.contains("3 times"));

    // Heartbeats keep a worker alive.
    let mut w4 = FakeWorker::attach(&s, "w4", 1, &[]);
    let mut op = s.execute(args(b.action(&["ok"], &[], 0, false), "")).unwrap();
    let a = w4.assigned().await;
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(10)).await;
        s.worker_message(w4.key, WorkerMessage { kind: Some(worker_message::Kind::Heartbeat(Heartbeat {})) });
    }
    w4.finish(&s, &a, tonic::Code::Ok, ok(0));
    assert_eq!(code(&done(&mut op).await), tonic::Code::Ok);
}

#[tokio::test(start_paused = true)]
async fn timeouts_are_bounded_and_stuck_executions_requeued() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "w1", 1, &[]);
    let long = b.action(&["sleep"], &[], 7200, false);
    let r = done(&mut s.execute(args(long, "")).unwrap()).await;
    assert_eq!(code(&r), tonic::Code::InvalidArgument, "above max_timeout");
    assert!(r.status.unwrap().message.contains("max_timeout_ms"));

    let action = b.action(&["sleep"], &[], 10, false);
    let mut op = s.execute(args(action, "")).unwrap();
    let a = w.assigned().await;
    assert_eq!(a.timeout_ms, 10_000);
    // The worker heartbeats but never reports: requeued after timeout + grace.
    for _ in 0..20 {
        tokio::time::advance(Duration::from_secs(5)).await;
        s.worker_message(w.key, WorkerMessage { kind: Some(worker_message::Kind::Heartbeat(Heartbeat {})) });
    }
    assert!(matches!(w.next().await, scheduler_message::Kind::Cancel(_)), "the stuck run is cancelled");
    let again = w.assigned().await;
    assert_eq!(again.execution_id, a.execution_id);
    w.finish(&s, &again, tonic::Code::DeadlineExceeded, ok(142));
    let r = done(&mut op).await;
    assert_eq!(code(&r), tonic::Code::DeadlineExceeded, "a timeout keeps its partial result");
    assert_eq!(r.result.unwrap().stdout_raw, b"out");
}

#[tokio::test(start_paused = true)]
async fn missing_blobs_are_precondition_failures() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "w1", 1, &[]);
    let absent = DigestFunction::Sha256.compute(b"never uploaded");
    let r = done(&mut s.execute(args(absent, "")).unwrap()).await;
    assert_eq!(code(&r), tonic::Code::FailedPrecondition);
    let f = PreconditionFailure::decode(r.status.unwrap().details[0].value.as_slice()).unwrap();
    assert_eq!(f.violations[0].subject, format!("blobs/{}/{}", absent.hash_hex(), absent.size_bytes()));

    let action = b.action(&["cc"], &[], 0, false);
    let mut op = s.execute(args(action, "")).unwrap();
    let a = w.assigned().await;
    let input = DigestFunction::Sha256.compute(b"input");
    let f = Finished {
        execution_id: a.execution_id,
        code: tonic::Code::FailedPrecondition as i32,
        message: "inputs missing".into(),
        action_result: vec![],
        missing_blobs: vec![format!("{}/{}", input.hash_hex(), input.size_bytes())],
    };
    s.worker_message(w.key, WorkerMessage { kind: Some(worker_message::Kind::Finished(f)) });
    let r = done(&mut op).await;
    let f = PreconditionFailure::decode(r.status.unwrap().details[0].value.as_slice()).unwrap();
    assert_eq!(f.violations[0].r#type, "MISSING");
    assert_eq!(f.violations[0].subject, format!("blobs/{}/5", input.hash_hex()));
}

#[tokio::test(start_paused = true)]
async fn executions_nobody_waits_for_are_cancelled_after_a_grace() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "w1", 1, &[]);
    let op = s.execute(args(b.action(&["slow"], &[], 0, false), "")).unwrap();
    let name = op.name.clone();
    let a = w.assigned().await;
    drop(op);
    // A client whose stream broke comes back within the grace.
    pass(&s, &w, Duration::from_secs(30)).await;
    let back = s.watch(&name).expect("still known");
    pass(&s, &w, Duration::from_secs(120)).await;
    assert!(w.idle(), "a waiter keeps it running");
    drop(back);
    pass(&s, &w, Duration::from_secs(65)).await;
    match w.next().await {
        scheduler_message::Kind::Cancel(c) => assert_eq!(c.execution_id, a.execution_id),
        other => panic!("expected a cancel, got {other:?}"),
    }
    let (_, operation) = s.get(&name).unwrap();
    assert!(operation.done);
    assert_eq!(s.stats().running, 0);

    // CancelOperation stops an execution only when it was the last caller.
    let action = b.action(&["shared"], &[], 0, false);
    let first = s.execute(args(action, "")).unwrap();
    let a = w.assigned().await;
    let mut second = s.execute(args(action, "")).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    s.cancel(&first.name).unwrap();
    assert!(w.idle(), "the other caller still waits");
    w.finish(&s, &a, tonic::Code::Ok, ok(0));
    assert_eq!(code(&done(&mut second).await), tonic::Code::Ok);
}

#[tokio::test(start_paused = true)]
async fn two_invocations_share_the_slots_about_evenly() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "w1", 4, &[]);
    let mut ops = Vec::new();
    for i in 0..200 {
        ops.push(s.execute(args(b.action(&["big", &i.to_string()], &[], 0, false), "huge")).unwrap());
    }
    let mut assigned = Vec::new();
    for _ in 0..4 {
        assigned.push(w.assigned().await);
    }
    for i in 0..20 {
        ops.push(s.execute(args(b.action(&["small", &i.to_string()], &[], 0, false), "small")).unwrap());
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Run 40 more to completion, one at a time, and see whose they were.
    let mut small = 0;
    for _ in 0..40 {
        let a = assigned.remove(0);
        w.finish(&s, &a, tonic::Code::Ok, ok(0));
        let next = w.assigned().await;
        let command = reapi::Action::decode(next.action.as_slice()).unwrap().command_digest.unwrap();
        let bytes = b.blobs.lock().unwrap()
            [&Digest::from_proto(Some(DigestFunction::Sha256), &command).unwrap()]
            .clone();
        if reapi::Command::decode(bytes.as_ref()).unwrap().arguments[0] == "small" {
            small += 1;
        }
        assigned.push(next);
    }
    assert!(small >= 16, "the small build got {small} of 40 slots while it waited (20 queued)");
}

#[tokio::test(start_paused = true)]
async fn finished_operations_are_kept_for_late_waiters_then_forgotten() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "w1", 1, &[]);
    let mut op = s.execute(args(b.action(&["x"], &[], 0, false), "")).unwrap();
    let a = w.assigned().await;
    w.finish(&s, &a, tonic::Code::Ok, ok(0));
    done(&mut op).await;
    let name = op.name.clone();
    drop(op);
    tokio::time::advance(Duration::from_secs(300)).await;
    let late = s.watch(&name).expect("kept for late waiters");
    assert!(late.operation().done);
    assert!(matches!(late.operation().result, Some(operation::Result::Response(_))));
    drop(late);
    tokio::time::advance(Duration::from_secs(301)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(s.watch(&name).is_none(), "forgotten after operation_retention");
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_shows_the_queue_by_platform_priority_and_invocation() {
    let b = MemoryBackend::default();
    let s = Scheduler::new(b.clone(), config());
    let mut w = FakeWorker::attach(&s, "w1", 1, &[("OSFamily", "linux")]);
    let linux = [("OSFamily", "linux")];
    let mut ops = Vec::new();
    for (i, (priority, invocation)) in
        [(-5, "a"), (0, "a"), (7, "b"), (i32::MAX, "b")].into_iter().enumerate()
    {
        let action = b.action(&["cc", &i.to_string()], &linux, 0, false);
        ops.push(s.execute(ExecuteArgs { priority, ..args(action, invocation) }).unwrap());
    }
    let first = w.assigned().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let snap = s.snapshot();
    let platform = snap.workers[0].platform.clone();
    assert_eq!(snap.executing.len(), 1);
    assert_eq!(snap.executing[0].worker, "w1");
    assert_eq!(snap.executing[0].execution, first.execution_id);
    assert_eq!(snap.queued_by_invocation, vec![("a".to_owned(), 1), ("b".to_owned(), 2)]);
    assert_eq!(snap.queued_by_platform, vec![(platform.clone(), 3)]);
    assert_eq!(
        snap.queued_by_priority,
        vec![((platform.clone(), "low"), 2), ((platform, "normal"), 1)],
        "the highest priority runs first; any int32 maps to one of three labels"
    );
    w.finish(&s, &first, tonic::Code::Ok, ok(3));
    let r = done(&mut ops[0]).await;
    assert_eq!(r.result.unwrap().exit_code, 3);
    let failure = &s.snapshot().failures[0];
    assert_eq!((failure.exit_code, failure.worker.as_str()), (Some(3), "w1"));
}

#[test]
fn the_queue_by_invocation_lists_the_busiest_and_sums_the_rest() {
    let by_invocation = (0..150usize).map(|i| (format!("inv-{i:03}"), i + 1)).collect();
    let rows = super::snapshot::busiest(by_invocation);
    assert_eq!(rows.len(), kiln_proto::limits::SNAPSHOT_INVOCATIONS_MAX + 1);
    assert_eq!(rows[0], ("inv-050".to_owned(), 51), "the busiest, in name order");
    assert_eq!(rows[99], ("inv-149".to_owned(), 150));
    assert_eq!(rows[100], ("(50 more invocations)".to_owned(), (1..=50).sum::<usize>()));
}

#[tokio::test(start_paused = true)]
async fn sessions_without_register_end_with_deadline_exceeded() {
    let s = Scheduler::new(MemoryBackend::default(), config());
    let silent = futures::stream::pending::<std::result::Result<WorkerMessage, String>>();
    let refused = crate::workers::session(s.clone(), silent).await.unwrap_err();
    assert_eq!(refused.code(), kiln_proto::Code::DeadlineExceeded, "{refused:?}");
    let broken = futures::stream::iter([Err::<WorkerMessage, _>("reset".to_owned())]);
    let refused = crate::workers::session(s, broken).await.unwrap_err();
    assert_eq!(refused.code(), kiln_proto::Code::Unavailable, "{refused:?}");
}

/// A tenant at its cap waits even for free slots; when one of its runs
/// ends, its waiting execution goes to any worker that can run it, not
/// only to the one whose slot came back.
#[tokio::test(start_paused = true)]
async fn a_tenant_leaving_its_cap_gets_any_free_worker() {
    let b = MemoryBackend::default();
    let share = TenantShare { weight: 1, slots_max: 1 };
    let s = Scheduler::new(
        b.clone(),
        Config { tenants: HashMap::from([("main".to_owned(), share)]), ..config() },
    );
    let mut a = FakeWorker::attach(&s, "a", 1, &[("pool", "a")]);
    let mut other = FakeWorker::attach(&s, "b", 1, &[("pool", "b")]);
    let first = b.action(&["true"], &[("pool", "a")], 0, false);
    let second = b.action(&["true"], &[("pool", "b")], 0, false);
    let _first_op = s.execute(args(first, "")).unwrap();
    let assign = a.assigned().await;
    let _second_op = s.execute(args(second, "")).unwrap();
    tokio::task::yield_now().await;
    assert!(other.idle(), "the tenant is at its cap: the free worker waits");
    a.finish(&s, &assign, tonic::Code::Ok, ok(0));
    other.assigned().await;
}
