//! `kiln bench scheduler|sandbox|inputs`: the remote execution parts
//! measured on their own, each beside its baseline in the same run.
//!
//! - scheduler: no-op actions through the real scheduler over memory
//!   stores, with in-process workers that finish each action at once:
//!   actions per second, and dispatch latency (Execute to the worker's
//!   assignment) on idle workers.
//! - sandbox: `/bin/true` in a sandbox against a plain fork and exec.
//! - inputs: materializing a tree of many files from the file cache,
//!   cold and warm.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use kiln_proto::kiln::worker::{
    Finished, Property, Register, SchedulerMessage, WorkerMessage, scheduler_message, worker_message,
};
use kiln_proto::reapi::{self, ActionResult};
use kiln_proto::{Digest, DigestFunction};
use kiln_scheduler::{ExecuteArgs, Scheduler};
use kiln_storage::store::{CasKey, MemoryAc, MemoryCas, put_all};
use prost::Message;
use serde_json::json;

use crate::execution::{ExecutionConfig, StoreBackend, StoreCas, StoreCasFactory};
use kiln_proto::access::Permit;

async fn put(cas: &MemoryCas, data: Vec<u8>) -> Result<Digest> {
    let d = DigestFunction::Sha256.compute(&data);
    put_all(
        cas,
        &CasKey::of(&Permit::<kiln_proto::access::rights::CasWrite>::internal(""), d),
        Bytes::from(data),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(d)
}

/// Stores `n` distinct no-op actions; their digests.
async fn actions(cas: &MemoryCas, n: usize) -> Result<Vec<Digest>> {
    let root = put(cas, reapi::Directory::default().encode_to_vec()).await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let command = reapi::Command { arguments: vec!["true".into(), i.to_string()], ..Default::default() };
        let command = put(cas, command.encode_to_vec()).await?;
        let action = reapi::Action {
            command_digest: Some(command.to_proto()),
            input_root_digest: Some(root.to_proto()),
            ..Default::default()
        };
        out.push(put(cas, action.encode_to_vec()).await?);
    }
    Ok(out)
}

/// A worker in this process that finishes every assignment at once.
fn fake_worker<B: kiln_scheduler::Backend>(scheduler: &Scheduler<B>, id: usize, slots: u32) -> Result<()> {
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<SchedulerMessage>(kiln_proto::limits::WORKER_SESSION_QUEUE);
    let register = Register {
        worker_id: format!("fake-{id}"),
        properties: vec![Property { name: "OSFamily".into(), value: "linux".into() }],
        slots,
    };
    let key = scheduler.attach_worker(&register, tx).map_err(|e| anyhow::anyhow!("{e}"))?;
    let scheduler = scheduler.clone();
    let result = ActionResult { exit_code: 0, ..Default::default() }.encode_to_vec();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if let Some(scheduler_message::Kind::Assign(a)) = m.kind {
                let f = Finished {
                    execution_id: a.execution_id,
                    code: 0,
                    message: String::new(),
                    action_result: result.clone(),
                    missing_blobs: vec![],
                };
                scheduler
                    .worker_message(key, WorkerMessage { kind: Some(worker_message::Kind::Finished(f)) });
            }
        }
    });
    Ok(())
}

/// No-op actions through the scheduler: throughput with `workers` fake
/// workers, then dispatch latency one action at a time.
#[allow(clippy::print_stdout, clippy::cast_precision_loss)] // A report for people.
pub async fn scheduler(n: usize, workers: usize, slots: u32, in_flight: usize) -> Result<serde_json::Value> {
    let cas = MemoryCas::new(4 << 30, 1 << 20);
    let ac = MemoryAc::new(1 << 30, 1 << 20);
    let mut config = ExecutionConfig::default().scheduler_config();
    config.operations_max = n * 2 + 1000;
    let backend = StoreBackend { cas: cas.clone(), ac, result_size_max: 1 << 20 };
    let scheduler = Scheduler::new(backend, config);
    for w in 0..workers {
        fake_worker(&scheduler, w, slots)?;
    }
    let digests = Arc::new(actions(&cas, n).await?);
    println!(
        "scheduler: {n} no-op actions, {workers} fake workers x {slots} slots, {in_flight} Execute calls in flight"
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let (scheduler, digests, next) = (scheduler.clone(), digests.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(action) = digests.get(i) else { return Ok::<(), anyhow::Error>(()) };
                let mut args = ExecuteArgs::new(&Permit::internal(""), *action);
                args.skip_cache_lookup = true;
                args.invocation = format!("inv-{}", i % 4);
                let mut watch = scheduler.execute(args).map_err(|e| anyhow::anyhow!("{e}"))?;
                loop {
                    if let Some(r) = watch.rx.borrow_and_update().response.clone() {
                        if r.status.as_ref().is_some_and(|s| s.code != 0) {
                            bail!("action failed: {:?}", r.status);
                        }
                        break;
                    }
                    watch.rx.changed().await.context("operation dropped")?;
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    let rate = n as f64 / elapsed.as_secs_f64();
    println!("throughput: {rate:.0} actions/s ({n} in {:.2} s)", elapsed.as_secs_f64());

    // Dispatch latency: one Execute at a time onto idle workers.
    let more = actions(&cas, 2000).await?;
    let mut latencies = Vec::with_capacity(more.len());
    for action in more {
        let mut args = ExecuteArgs::new(&Permit::internal(""), action);
        args.skip_cache_lookup = true;
        let t = Instant::now();
        let mut watch = scheduler.execute(args).map_err(|e| anyhow::anyhow!("{e}"))?;
        loop {
            let stage = watch.rx.borrow_and_update().stage;
            if stage != reapi::execution_stage::Value::CacheCheck {
                break;
            }
            watch.rx.changed().await.context("operation dropped")?;
        }
        latencies.push(t.elapsed());
        while watch.rx.borrow_and_update().response.is_none() {
            watch.rx.changed().await.context("operation dropped")?;
        }
    }
    latencies.sort();
    let (p50, p99) =
        (kiln_tools::bench::percentile(&latencies, 500), kiln_tools::bench::percentile(&latencies, 990));
    println!("dispatch latency (Execute to assigned, idle workers): p50 {p50:?}, p99 {p99:?}");
    Ok(json!({
        "actions": n, "workers": workers, "slots": slots, "in_flight": in_flight,
        "actions_per_second": rate,
        "dispatch_p50_us": p50.as_micros(), "dispatch_p99_us": p99.as_micros(),
    }))
}

/// The sandbox against a plain fork and exec.
#[allow(clippy::print_stdout)] // A report for people.
pub fn sandbox(runs: u32) -> Result<serde_json::Value> {
    let uid = ExecutionConfig::default().worker.uid_base;
    let config = kiln_worker::sandbox::SandboxConfig::new(
        kiln_worker::sandbox::stage_binary(&std::env::current_exe()?),
        uid,
        uid,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let scratch = tempfile_dir("sandbox")?;
    let overhead =
        kiln_worker::sandbox::fork_exec_baseline(&config, &scratch, runs).map_err(|e| anyhow::anyhow!("{e}"));
    let _ = kiln_worker::remove::remove_tree(&scratch);
    let overhead = overhead?;
    let plain = overhead.plain / runs.max(1);
    let sandboxed = overhead.sandboxed / runs.max(1);
    let prepared = overhead.prepared / runs.max(1);
    println!(
        "sandbox: /bin/true x {runs}, alternating: plain fork+exec {plain:?} each; sandboxed {sandboxed:?} each \
         (overhead {:?}); in a sandbox prepared ahead {prepared:?} each (overhead {:?})",
        overhead.per_action(),
        overhead.per_prepared_action()
    );
    Ok(json!({
        "runs": runs, "plain_us": plain.as_micros(), "sandboxed_us": sandboxed.as_micros(),
        "overhead_us": overhead.per_action().as_micros(),
        "prepared_us": prepared.as_micros(), "prepared_overhead_us": overhead.per_prepared_action().as_micros(),
    }))
}

fn tempfile_dir(what: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Materializes a tree of `files` small files (in directories of 100)
/// from the file cache: cold (fetched from a memory CAS), then warm.
#[allow(clippy::print_stdout)] // A report for people.
pub async fn inputs(files: usize) -> Result<serde_json::Value> {
    let cas = MemoryCas::new(4 << 30, 1 << 20);
    let mut dirs = Vec::new();
    let mut children = Vec::new();
    for d in 0..files.div_ceil(100) {
        let mut nodes = Vec::new();
        for f in 0..100.min(files - d * 100) {
            let data = format!("file {d}/{f}\n").into_bytes();
            let digest = put(&cas, data).await?;
            nodes.push(reapi::FileNode {
                name: format!("f{f:03}"),
                digest: Some(digest.to_proto()),
                ..Default::default()
            });
        }
        let dir = reapi::Directory { files: nodes, ..Default::default() };
        let digest = put(&cas, dir.encode_to_vec()).await?;
        children.push(reapi::DirectoryNode { name: format!("d{d:04}"), digest: Some(digest.to_proto()) });
        dirs.push(dir);
    }
    let root =
        put(&cas, reapi::Directory { directories: children, ..Default::default() }.encode_to_vec()).await?;
    let scratch = tempfile_dir("inputs")?;
    let cache = kiln_worker::cache::FileCache::open(&scratch.join("cache"), 4 << 30)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let factory = StoreCasFactory(cas);
    let client: StoreCas<MemoryCas> =
        kiln_worker::runner::CasFactory::client(&factory, "", DigestFunction::Sha256);
    let mut times = Vec::new();
    for round in 0..3 {
        let exec_root = scratch.join(format!("exec{round}"));
        let t = Instant::now();
        kiln_worker::inputs::materialize(&cache, &client, DigestFunction::Sha256, &root, &exec_root, None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        times.push(t.elapsed());
    }
    let _ = kiln_worker::remove::remove_tree(&scratch);
    let (cold, warm) = (times[0], times[1].min(times[2]));
    println!("inputs: {files} files in {} directories: cold {cold:?}, warm {warm:?}", dirs.len());
    Ok(json!({ "files": files, "cold_ms": cold.as_millis(), "warm_ms": warm.as_millis() }))
}
