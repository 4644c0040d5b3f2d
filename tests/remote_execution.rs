//! Real Bazel executing remotely on a real `kiln serve` (its scheduler and
//! local worker, actions in sandboxes): nothing runs locally, a rebuild
//! after `bazel clean` is all cache hits, and keepalive mode works.
//!
//! Needs root (the sandbox maps actions to other uids), `bazel`
//! (bazel-bootstrap) and the mock repositories of bazel-bootstrap-source.

mod common;

use common::Kiln;
use common::bazel::{Bazel, assert_all_hits, exclusive, process_summary};

/// Flags for remote execution on `kiln`.
fn remote_flags(kiln: &Kiln) -> Vec<String> {
    vec![
        format!("--remote_executor={}", kiln.remote()),
        "--remote_timeout=60s".to_owned(),
        "--spawn_strategy=remote".to_owned(),
        "--remote_default_exec_properties=OSFamily=linux".to_owned(),
    ]
}

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
    let flags = remote_flags(&kiln);
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
