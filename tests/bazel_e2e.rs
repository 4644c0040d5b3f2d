//! Real Bazel against a real `kiln serve`: a build fills the cache, a clean
//! rebuild must be served entirely from it with byte-identical outputs, and
//! the same holds with `--remote_download_minimal`, over plaintext and over
//! TLS with each kind of credentials.
//!
//! Needs `bazel` (Debian's bazel-bootstrap, 4.2.3) and the mock rule
//! repositories from bazel-bootstrap-source; `./scripts/test` installs both.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use common::Kiln;
use common::bazel::{Bazel, assert_all_hits, exclusive, process_summary};

#[test]
fn bazel_build_is_served_from_kiln_after_clean() {
    let _turn = exclusive();
    let kiln = Kiln::start();
    let bazel = Bazel::new();
    let remote = format!("--remote_cache={}", kiln.remote());
    let flags = [remote.as_str(), "--remote_timeout=60s"];

    let first = bazel.run(&[&["test", "//..."][..], &flags].concat());
    let summary = process_summary(&first);
    assert!(!summary.contains_key("remote cache hit"), "the cache started empty: {summary:?}");
    let executed: u32 = summary.iter().filter(|(k, _)| *k != "internal").map(|(_, n)| n).sum();
    assert!(executed >= 10, "{summary:?}");
    let expected = bazel.outputs();

    bazel.run(&["clean"]);
    let second = bazel.run(&[&["test", "//..."][..], &flags].concat());
    let hits = assert_all_hits(&second);
    assert_eq!(hits, executed, "every action of the first build is a hit");
    assert_eq!(bazel.outputs(), expected, "outputs from the cache are byte-identical");
    println!("kiln e2e: remote cache hits {hits} of {executed}, outputs identical");

    // Builds without the bytes: outputs stay in Kiln, and are fetched later.
    bazel.run(&["clean"]);
    let minimal = bazel.run(&[&["test", "//...", "--remote_download_minimal"][..], &flags].concat());
    let hits = assert_all_hits(&minimal);
    assert_eq!(hits, executed);
    assert!(!bazel.workspace.join("bazel-bin/gen/random.bin").exists(), "minimal mode downloads nothing");
    bazel.run(&[&["build", "//...", "--remote_download_toplevel"][..], &flags].concat());
    assert_eq!(bazel.outputs(), expected, "outputs fetched after a minimal build are byte-identical");
    println!(
        "kiln e2e (--remote_download_minimal): remote cache hits {hits} of {executed}, outputs identical"
    );
}

/// Builds `//...`, cleans, shuts the Bazel server down (so the next build
/// opens new connections), rebuilds, and checks that every action of the
/// second build is a remote cache hit with identical outputs.
fn round_trip(bazel: &Bazel, flags: &[&str]) -> u32 {
    let first = bazel.run(&[&["test", "//..."][..], flags].concat());
    let executed: u32 =
        process_summary(&first).iter().filter(|(k, _)| *k != "internal").map(|(_, n)| n).sum();
    let expected = bazel.outputs();
    bazel.run(&["clean"]);
    bazel.run(&["shutdown"]);
    let second = bazel.run(&[&["test", "//..."][..], flags].concat());
    let hits = assert_all_hits(&second);
    assert_eq!(hits, executed);
    assert_eq!(bazel.outputs(), expected, "outputs from the cache are byte-identical");
    hits
}

#[test]
fn bazel_over_mtls_survives_certificate_rotation() {
    let _turn = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let ca = common::pki::Ca::new(dir.path(), "kiln");
    let (server_cert, server_key) = ca.server("server", 1);
    let (client_cert, client_key) = ca.client("bazel-ci", 2);
    let kiln = Kiln::start_with_config(&format!(
        "[auth]\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\nreload_interval_ms = 250\n\n\
         [[auth.rules]]\nprincipal = \"bazel-*\"\ntenant = \"main\"\npermissions = [\"read\", \"write\"]\n",
        server_cert.display(),
        server_key.display(),
        ca.cert_path().display()
    ));
    let mut bazel = Bazel::new();
    bazel.enable_tls();
    let remote = format!("--remote_cache=grpcs://localhost:{}", kiln.addr.port());
    let tls = [
        format!("--tls_certificate={}", ca.cert_path().display()),
        format!("--tls_client_certificate={}", client_cert.display()),
        format!("--tls_client_key={}", client_key.display()),
    ];
    let mut flags: Vec<&str> = vec![&remote, "--remote_instance_name=main", "--remote_timeout=60s"];
    flags.extend(tls.iter().map(String::as_str));
    let hits = round_trip(&bazel, &flags);
    println!("kiln e2e (grpcs, mTLS): remote cache hits {hits}, outputs identical");

    // Rotate the server certificate while a build is running (its slow
    // action touches the marker when it starts).
    let marker = dir.path().join("slow-started");
    let marker_env = format!("--action_env=KILN_TEST_MARKER={}", marker.display());
    flags.push(&marker_env);
    let slow = std::thread::scope(|s| {
        let build = s.spawn(|| bazel.try_run(&[&["build", "//gen:slow"][..], &flags].concat()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while !marker.exists() && !build.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the slow action never started");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (cert, key) = ca.server("server-rotated", 3);
        common::pki::write_atomically(&server_key, &std::fs::read_to_string(key).unwrap());
        common::pki::write_atomically(&server_cert, &std::fs::read_to_string(cert).unwrap());
        build.join().unwrap()
    });
    assert!(slow.0, "the build running across the rotation failed:\n{}", slow.1);
    // New connections get the rotated certificate, and the cache still serves.
    bazel.run(&["clean"]);
    bazel.run(&["shutdown"]);
    let again = bazel.run(&[&["build", "//gen:slow"][..], &flags].concat());
    assert_eq!(assert_all_hits(&again), 1, "{again}");
}

#[test]
fn bazel_with_bearer_token() {
    let _turn = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let (ok, token, err) = common::kiln(&[
        "token",
        "create",
        "--token-file",
        file.to_str().unwrap(),
        "--principal",
        "ci",
        "--tenant",
        "main",
        "--perm",
        "read,write",
        "--expires",
        "1d",
    ]);
    assert!(ok, "{err}");
    let kiln =
        Kiln::start_with_config(&format!("[auth]\ntokens = true\ntoken_file = \"{}\"\n", file.display()));
    let bazel = Bazel::new();
    let remote = format!("--remote_cache={}", kiln.remote());
    let header = format!("--remote_header=Authorization=Bearer {}", token.trim());
    let hits = round_trip(&bazel, &[&remote, &header, "--remote_instance_name=main", "--remote_timeout=60s"]);
    println!("kiln e2e (bearer token): remote cache hits {hits}, outputs identical");

    // Without the token Bazel gets UNAUTHENTICATED and says so.
    bazel.run(&["clean"]);
    let (ok, text) = bazel.try_run(&["build", "//gen:words", &remote, "--remote_instance_name=main"]);
    assert!(!ok || text.contains("UNAUTHENTICATED"), "{text}");
    assert!(text.contains("UNAUTHENTICATED"), "{text}");
}

#[test]
fn bazel_with_netrc_basic_auth() {
    let _turn = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("builder:{}\n", bcrypt::hash("hunter2", 4).unwrap())).unwrap();
    let kiln = Kiln::start_with_config(&format!(
        "[auth]\nhtpasswd = \"{}\"\n\n[[auth.rules]]\nprincipal = \"builder\"\ntenant = \"*\"\npermissions = [\"read\", \"write\"]\n",
        htpasswd.display()
    ));
    let netrc = dir.path().join("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login builder password hunter2\n").unwrap();
    let mut bazel = Bazel::new();
    bazel.env.push(("NETRC".into(), netrc.display().to_string()));
    let remote = format!("--remote_cache={}", kiln.remote());
    let hits = round_trip(&bazel, &[&remote, "--remote_timeout=60s"]);
    println!("kiln e2e (.netrc basic auth): remote cache hits {hits}, outputs identical");
}

/// README's tenant workflow with its own two rules, exactly as written: CI
/// fills `main`; a developer building on `main.dev.alice` gets every action
/// from CI's results.
#[test]
fn bazel_readme_subtenant_workflow() {
    let _turn = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!(
            "ci-runner-7:{}\nalice:{}\n",
            bcrypt::hash("ci-pw", 4).unwrap(),
            bcrypt::hash("alice-pw", 4).unwrap()
        ),
    )
    .unwrap();
    let kiln = Kiln::start_with_config(&format!(
        "[auth]\nhtpasswd = \"{}\"\n\n\
         [[auth.rules]]                       # CI may read and write the main cache\n\
         principal = \"ci-*\"\ntenant = \"main\"\npermissions = [\"read\", \"write\"]\n\n\
         [[auth.rules]]                       # everyone may read CI's results\n\
         principal = \"*\"\ntenant = \"main\"\npermissions = [\"read\"]\n",
        htpasswd.display()
    ));
    let remote = format!("--remote_cache={}", kiln.remote());
    let as_user = |user: &str, password: &str| {
        let netrc = dir.path().join(format!("netrc-{user}"));
        std::fs::write(&netrc, format!("machine 127.0.0.1 login {user} password {password}\n")).unwrap();
        let mut bazel = Bazel::new();
        bazel.env.push(("NETRC".into(), netrc.display().to_string()));
        bazel
    };
    let ci = as_user("ci-runner-7", "ci-pw");
    let first = ci.run(&["test", "//...", &remote, "--remote_instance_name=main", "--remote_timeout=60s"]);
    let executed: u32 =
        process_summary(&first).iter().filter(|(k, _)| *k != "internal").map(|(_, n)| n).sum();
    let expected = ci.outputs();

    let alice = as_user("alice", "alice-pw");
    let second = alice.run(&[
        "test",
        "//...",
        &remote,
        "--remote_instance_name=main.dev.alice",
        "--remote_timeout=60s",
    ]);
    let hits = assert_all_hits(&second);
    assert_eq!(hits, executed, "every action of CI's build is a hit for the developer");
    assert_eq!(alice.outputs(), expected);
    println!("kiln e2e (README tenant workflow): {hits} of {executed} hits on main.dev.alice");
}

/// The cache survives a restart of Kiln: build, stop Kiln, start it again
/// on the same data, `bazel clean`, rebuild: every action is a hit.
#[test]
fn bazel_rebuild_after_a_kiln_restart_is_all_hits() {
    let _turn = exclusive();
    let kiln = Kiln::start();
    let bazel = Bazel::new();
    let flags = |k: &Kiln| vec![format!("--remote_cache={}", k.remote()), "--remote_timeout=60s".to_owned()];
    let first_flags = flags(&kiln);
    let first_flags: Vec<&str> = first_flags.iter().map(String::as_str).collect();
    let first = bazel.run(&[&["test", "//..."][..], &first_flags].concat());
    let executed: u32 =
        process_summary(&first).iter().filter(|(k, _)| *k != "internal").map(|(_, n)| n).sum();
    let expected = bazel.outputs();
    let (status, log, data_dir) = kiln.stop_keeping_data();
    assert!(status.success(), "{log}");

    let kiln = Kiln::start_in(data_dir, &[]);
    bazel.run(&["clean"]);
    bazel.run(&["shutdown"]);
    let second_flags = flags(&kiln);
    let second_flags: Vec<&str> = second_flags.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let second = bazel.run(&[&["test", "//..."][..], &second_flags].concat());
    let warm = started.elapsed();
    let hits = assert_all_hits(&second);
    assert_eq!(hits, executed, "every action of the first build is a hit after the restart");
    assert_eq!(bazel.outputs(), expected, "outputs from the restarted cache are byte-identical");
    drop(kiln);

    // The same warm rebuild from the memory store, for docs/BENCHMARKS.md.
    let memory = Kiln::start_with_config("[storage]\nbackend = \"memory\"\n");
    let memory_flags = flags(&memory);
    let memory_flags: Vec<&str> = memory_flags.iter().map(String::as_str).collect();
    bazel.run(&["clean"]);
    bazel.run(&[&["test", "//..."][..], &memory_flags].concat());
    bazel.run(&["clean"]);
    bazel.run(&["shutdown"]);
    let started = std::time::Instant::now();
    let from_memory = bazel.run(&[&["test", "//..."][..], &memory_flags].concat());
    let memory_warm = started.elapsed();
    assert_eq!(assert_all_hits(&from_memory), executed);
    println!(
        "kiln e2e (restart): remote cache hits {hits} of {executed}, warm rebuild {:.1} s from the block store after a restart, {:.1} s from the memory store",
        warm.as_secs_f64(),
        memory_warm.as_secs_f64()
    );
}
