//! What operators see, against a real `kiln serve`: `/metrics` agrees with
//! what Bazel reports and with the bytes moved, label sets stay bounded
//! whatever clients send, the status page and `kiln status` show the
//! sections operators look for and refuse visitors without `admin`.
//!
//! Needs root (remote execution sandboxes actions) and `bazel`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::Kiln;
use common::bazel::{Bazel, assert_all_hits, exclusive};
use kiln_proto::reapi::{Digest, GetActionResultRequest};

/// GET over HTTP/1.1: (status, body).
fn get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The sum of the samples of `name` whose labels contain every one of
/// `labels` (`key="value"`).
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn scrape(kiln: &Kiln) -> String {
    let (status, body) = get(kiln.metrics_addr(), "/metrics", None);
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn action_cache_hits_and_bytes_match_what_clients_saw() {
    let _turn = exclusive();
    let kiln = Kiln::start();
    let bazel = Bazel::new();
    let flags = [
        format!("--remote_executor={}", kiln.remote()),
        "--remote_default_exec_properties=OSFamily=linux".to_owned(),
        "--spawn_strategy=remote".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    bazel.run(&[&["build", "//..."][..], &flags].concat());
    let before = scrape(&kiln);
    assert_eq!(
        metric(&before, "kiln_ac_lookups_total", &["result=\"hit\""]),
        0.0,
        "a fresh cache has no hits"
    );
    bazel.run(&["clean"]);
    let output = bazel.run(&[&["build", "//..."][..], &flags].concat());
    let hits = assert_all_hits(&output);
    let after = scrape(&kiln);
    assert_eq!(
        metric(&after, "kiln_ac_lookups_total", &["result=\"hit\"", "tenant=\"default\""]),
        f64::from(hits),
        "the AC hits Kiln counted are the remote cache hits Bazel reported"
    );
    assert!(metric(&after, "kiln_scheduler_executions_total", &["outcome=\"OK\""]) >= 10.0, "{after}");
    assert!(metric(&after, "kiln_grpc_requests_total", &["method=\"Execute\"", "code=\"OK\""]) >= 10.0);
    assert_eq!(metric(&after, "kiln_scheduler_workers", &["OSFamily=linux"]), 1.0, "{after}");

    // Bytes: one 8 MB upload and download through the kiln CLI move that
    // many body bytes, plus gRPC framing and small calls.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    let data: Vec<u8> = (0..8_000_000u32).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2]).collect();
    std::fs::write(&file, &data).unwrap();
    let total = |text: &str, name: &str| metric(text, name, &[]);
    let before = scrape(&kiln);
    let (ok, out, err) = common::kiln(&["cas", "--remote", &kiln.remote(), "put", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let digest = out.split_whitespace().next().unwrap().to_owned();
    let (ok, _, err) = common::kiln(&[
        "cas",
        "--remote",
        &kiln.remote(),
        "get",
        &digest,
        dir.path().join("back").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let after = scrape(&kiln);
    let received =
        total(&after, "kiln_grpc_received_bytes_total") - total(&before, "kiln_grpc_received_bytes_total");
    let sent = total(&after, "kiln_grpc_sent_bytes_total") - total(&before, "kiln_grpc_sent_bytes_total");
    let size = data.len() as f64;
    assert!(
        (size..size * 1.01 + 65536.0).contains(&received),
        "received {received} for {size} bytes uploaded"
    );
    assert!((size..size * 1.01 + 65536.0).contains(&sent), "sent {sent} for {size} bytes downloaded");

    // The status page shows what was built, and `kiln status` the same.
    let (status, page) = get(kiln.metrics_addr(), "/status", None);
    assert_eq!(status, 200);
    for id in ["configuration", "cache", "stores", "health", "queue", "executing", "workers", "failures"] {
        assert!(page.contains(&format!("<h2 id=\"{id}\">")), "section {id} is on the page");
    }
    assert!(page.contains("OSFamily=linux"), "the local worker and its properties are listed");
    let (ok, text, err) = common::kiln(&["status", "--metrics", &kiln.metrics_addr().to_string()]);
    assert!(ok, "{err}");
    for heading in ["== Stores", "== Cache and traffic", "== Workers", "== Recent failed actions"] {
        assert!(text.contains(heading), "{heading} in\n{text}");
    }
}

#[test]
fn label_sets_stay_bounded_under_ten_thousand_instance_names() {
    let kiln = Kiln::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let ac = kiln.ac().await;
        let digest = Digest { hash: "0".repeat(64), size_bytes: 1 };
        let calls = (0..10_000).map(|i| {
            let mut ac = ac.clone();
            let request = GetActionResultRequest {
                instance_name: format!("tenant-{i}"),
                action_digest: Some(digest.clone()),
                ..Default::default()
            };
            async move { ac.get_action_result(request).await }
        });
        let results = futures::future::join_all(calls).await;
        assert!(results.iter().all(|r| r.as_ref().is_err_and(|s| s.code() == tonic::Code::NotFound)));
    });
    let text = scrape(&kiln);
    let series = |name: &str| text.lines().filter(|l| l.starts_with(&format!("{name}{{"))).count();
    assert_eq!(series("kiln_ac_lookups_total"), 1, "every unconfigured tenant is \"other\"");
    assert_eq!(metric(&text, "kiln_ac_lookups_total", &["tenant=\"other\"", "result=\"miss\""]), 10_000.0);
    assert!(series("kiln_grpc_requests_total") <= 10, "{text}");
    assert!(text.lines().count() < 2_000, "the whole exposition stays small: {} lines", text.lines().count());
}

#[test]
fn the_status_page_needs_admin_when_auth_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    let admin = common::bootstrap_token(&tokens, "ops", "*", "all", "1d");
    let reader = common::bootstrap_token(&tokens, "ci", "main", "cas-read,ac-read", "1d");
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, common::token_config(&tokens, "")).unwrap();
    let kiln = Kiln::start_with(&["--config", config.to_str().unwrap()]);
    let addr = kiln.metrics_addr();

    let (status, body) = get(addr, "/status", None);
    assert_eq!(status, 401, "{body}");
    let (status, _) = get(addr, "/status.txt", Some(&format!("Bearer {reader}")));
    assert_eq!(status, 403, "a token without admin is refused");
    let (status, page) = get(addr, "/status", Some(&format!("Bearer {admin}")));
    assert_eq!(status, 200);
    assert!(page.contains("bearer tokens") && !page.contains(&admin), "methods are named, secrets never");
    let (status, _) = get(addr, "/metrics", None);
    assert_eq!(status, 200, "metrics stay open to scrapers on the (loopback) listener");

    let metrics = addr.to_string();
    let (ok, _, err) = common::kiln(&["status", "--metrics", &metrics]);
    assert!(!ok && err.contains("401"), "{err}");
    let (ok, text, err) = common::kiln(&["status", "--metrics", &metrics, "--token", &admin]);
    assert!(ok, "{err}");
    assert!(text.contains("== Configuration") && text.contains("bearer tokens"), "{text}");
    let failures = metric(&scrape(&kiln), "kiln_auth_failures_total", &[]);
    assert_eq!(failures, 0.0, "refusals on the status page are not gRPC failures");
}
