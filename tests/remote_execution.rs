//! Real Bazel executing remotely on a real `kiln serve` (its scheduler and
//! local worker, actions in sandboxes): nothing runs locally, a rebuild
//! after `bazel clean` is all cache hits, and keepalive mode works.
//!
//! Through a proxy that misbehaves on purpose: an input that disappears
//! between FindMissingBlobs and Execute is uploaded again after one
//! FAILED_PRECONDITION, and an Execute stream cut mid-action is resumed
//! with WaitExecution, the action running once.
//!
//! Needs root (the sandbox maps actions to other uids), `bazel`
//! (bazel-bootstrap) and the mock repositories of bazel-bootstrap-source.

mod common;

use std::sync::atomic::Ordering;

use common::Kiln;
use common::bazel::{Bazel, assert_all_hits, exclusive, process_summary, remote_execution_flags};
use common::proxy::{Fault, Proxy};
use kiln_proto::reapi::{Digest, FindMissingBlobsRequest};

/// Asserts that every action of a build ran remotely; returns how many.
fn assert_all_remote(output: &str) -> u32 {
    let summary = process_summary(output);
    for strategy in ["local", "linux-sandbox", "processwrapper-sandbox", "worker"] {
        assert!(!summary.contains_key(strategy), "actions ran {strategy}: {summary:?}\n{output}");
    }
    let remote = summary.get("remote").copied().unwrap_or(0);
    assert!(remote >= 10, "{summary:?}\n{output}");
    remote
}

#[test]
fn bazel_executes_remotely_and_rebuilds_from_the_cache() {
    let _turn = exclusive();
    let kiln = Kiln::start();
    let bazel = Bazel::new();
    let flags = remote_execution_flags(&kiln.remote());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

    // Timed from a running Bazel server, beside a local build of the same
    // workspace, for docs/BENCHMARKS.md.
    bazel.run(&["info", "release"]);
    let started = std::time::Instant::now();
    let first = bazel.run(&[&["test", "//..."][..], &flags].concat());
    let remote_time = started.elapsed();
    let executed = assert_all_remote(&first);
    let local = Bazel::new();
    local.run(&["info", "release"]);
    let started = std::time::Instant::now();
    local.run(&["test", "//..."]);
    let local_time = started.elapsed();
    let expected = bazel.outputs();

    bazel.run(&["clean"]);
    let second = bazel.run(&[&["test", "//..."][..], &flags].concat());
    let hits = assert_all_hits(&second);
    assert_eq!(hits, executed, "every remotely executed action is a cache hit after clean");
    assert_eq!(bazel.outputs(), expected, "outputs from the cache are byte-identical");

    // Keepalive mode: every call has a deadline; the scheduler's updates
    // keep the streams alive. Skipping the cache makes everything run again.
    bazel.run(&["clean"]);
    bazel.run(&["shutdown"]);
    let keepalive = bazel.run(
        &[
            &["test", "//...", "--experimental_remote_execution_keepalive", "--noremote_accept_cached"][..],
            &flags,
        ]
        .concat(),
    );
    let again = assert_all_remote(&keepalive);
    assert_eq!(again, executed, "with keepalive every action ran remotely again");
    println!(
        "kiln remote execution: {executed} actions remote in {:.1} s (local build {:.1} s), {hits} cache hits after clean, keepalive ok",
        remote_time.as_secs_f64(),
        local_time.as_secs_f64()
    );
}

#[test]
fn an_input_gone_between_find_missing_and_execute_is_uploaded_again() {
    let _turn = exclusive();
    let kiln = Kiln::start();
    let proxy = Proxy::start(kiln.addr, Fault::HideOneMissingBlob);
    let bazel = Bazel::new();
    let flags = remote_execution_flags(&proxy.remote());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

    // One action at a time, so that the hidden blob belongs to one action
    // and no other uploads it meanwhile.
    let output = bazel.run(&[&["build", "//...", "--jobs=1"][..], &flags].concat());
    assert_all_remote(&output);
    let hidden = proxy.seen.hidden.lock().unwrap().clone();
    assert_eq!(hidden.len(), 1, "one blob was hidden from Bazel");
    assert_eq!(
        proxy.seen.precondition_failures.load(Ordering::SeqCst),
        1,
        "Execute answered FAILED_PRECONDITION once, then Bazel uploaded and retried"
    );

    // Bazel uploaded it after the MISSING violation named it.
    let (hash, size) = hidden[0].split_once('/').unwrap();
    let digest = Digest { hash: hash.to_owned(), size_bytes: size.parse().unwrap() };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let missing = runtime.block_on(async {
        let mut cas = kiln.cas().await;
        let request = FindMissingBlobsRequest { blob_digests: vec![digest], ..Default::default() };
        cas.find_missing_blobs(request).await.unwrap().into_inner().missing_blob_digests
    });
    assert!(missing.is_empty(), "the hidden blob {} is stored now", hidden[0]);
}

#[test]
fn a_cut_execute_stream_resumes_with_wait_execution_and_runs_once() {
    let _turn = exclusive();
    let kiln = Kiln::start_logging(tempfile::tempdir().unwrap(), &[], "info,kiln_scheduler=debug");
    let proxy = Proxy::start(kiln.addr, Fault::CutExecuteWhenExecuting);
    let bazel = Bazel::new();
    let flags = remote_execution_flags(&proxy.remote());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

    let output = bazel.run(&[&["build", "//..."][..], &flags].concat());
    let remote = assert_all_remote(&output);
    let seen = &proxy.seen;
    assert_eq!(seen.cut.load(Ordering::SeqCst), 1, "one Execute stream was cut while EXECUTING");
    assert!(seen.wait_executions.load(Ordering::SeqCst) >= 1, "Bazel resumed with WaitExecution");
    assert_eq!(seen.executes.load(Ordering::SeqCst), remote, "Bazel called Execute once per action");
    let dispatched = kiln.log().matches("action dispatched").count();
    assert_eq!(dispatched, remote as usize, "every action, the cut one too, ran exactly once");
}
