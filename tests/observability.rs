//! What operators see, against a real `kiln serve`: `/metrics` agrees with
//! what Bazel reports and with the bytes moved, label sets stay bounded
//! whatever clients send, the status page and `kiln status` show the
//! sections operators look for and refuse visitors without `admin`, in a
//! real browser (headless Chromium, its screenshot read back by OCR).
//!
//! Needs root (remote execution sandboxes actions), `bazel`, `chromium`
//! and `tesseract` (`./scripts/test` installs them).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Kiln;
use common::bazel::{Bazel, assert_all_hits, exclusive, remote_execution_flags};
use common::http::{get, get_with_headers, metric};
use kiln_proto::reapi::{Digest, GetActionResultRequest};

/// Runs a tool under coreutils' `timeout`; its stdout.
fn tool(program: &str, args: &[&str], install: &str) -> String {
    let out = Command::new("timeout")
        .arg("120")
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} failed ({}; install Debian's {install}, as ./scripts/test does):\n{stderr}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Headless Chromium's flags, with its profile under `dir`.
fn chromium_flags(dir: &Path) -> Vec<String> {
    let profile = format!("--user-data-dir={}", dir.join("profile").display());
    ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", &profile].map(str::to_owned).to_vec()
}

/// `url` rendered by headless Chromium: the DOM after rendering.
fn chromium_dom(url: &str, dir: &Path) -> String {
    let flags = [chromium_flags(dir), vec!["--dump-dom".to_owned(), url.to_owned()]].concat();
    tool("chromium", &flags.iter().map(String::as_str).collect::<Vec<_>>(), "chromium")
}

/// `url` rendered by headless Chromium: a screenshot (PNG) written under
/// `dir`.
fn chromium_screenshot(url: &str, dir: &Path) -> PathBuf {
    let shot = dir.join("status.png");
    let size = "--window-size=1280,2400".to_owned();
    let flags = [chromium_flags(dir), vec![size, format!("--screenshot={}", shot.display()), url.to_owned()]]
        .concat();
    tool("chromium", &flags.iter().map(String::as_str).collect::<Vec<_>>(), "chromium");
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000), "a screenshot was written");
    shot
}

/// The text tesseract reads in an image.
fn ocr(image: &Path) -> String {
    tool("tesseract", &[image.to_str().unwrap(), "stdout"], "tesseract-ocr")
}

/// One section of the status page's HTML: from its heading to the next.
fn section<'a>(page: &'a str, id: &str) -> &'a str {
    let start = page.find(&format!("<h2 id=\"{id}\">")).unwrap_or_else(|| panic!("no section {id}:\n{page}"));
    let rest = &page[start + 4..];
    &page[start..start + 4 + rest.find("<h2").unwrap_or(rest.len())]
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
    let flags = remote_execution_flags(&kiln.remote());
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
    assert!(!page.to_ascii_lowercase().contains("<script"), "no script: text browsers read it too");
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
        // An upload whose bytes do not match its digest is counted.
        let wrong = kiln_proto::reapi::batch_update_blobs_request::Request {
            digest: Some(Digest { hash: "0".repeat(64), size_bytes: 5 }),
            data: b"hello".to_vec(),
            compressor: 0,
        };
        let request =
            kiln_proto::reapi::BatchUpdateBlobsRequest { requests: vec![wrong], ..Default::default() };
        let response = kiln.cas().await.batch_update_blobs(request).await.unwrap().into_inner();
        assert_eq!(response.responses[0].status.as_ref().unwrap().code, tonic::Code::InvalidArgument as i32);
    });
    let text = scrape(&kiln);
    assert_eq!(metric(&text, "kiln_cas_upload_verification_failures_total", &[]), 1.0, "{text}");
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

    let (status, body) = get_with_headers(addr, "/status", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("WWW-Authenticate: Bearer") || body.contains("www-authenticate: Bearer"), "{body}");
    // A browser without credentials sees the refusal, not the page.
    let browser = tempfile::tempdir().unwrap();
    let dom = chromium_dom(&format!("http://{addr}/status"), browser.path());
    assert!(dom.contains("needs the admin permission") && !dom.contains("id=\"configuration\""), "{dom}");
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

#[test]
fn the_status_page_renders_in_chromium_during_a_remote_build() {
    let _turn = exclusive();
    let kiln = Kiln::start();
    let bazel = Bazel::new();
    let flags = remote_execution_flags(&kiln.remote());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (ok, output) = bazel.try_run(&[&["build", "//gen:fails"][..], &flags].concat());
    assert!(!ok, "the failing action fails the build:\n{output}");
    let url = format!("http://{}/status", kiln.metrics_addr());
    let dir = tempfile::tempdir().unwrap();

    std::thread::scope(|s| {
        let build = s.spawn(|| bazel.try_run(&[&["build", "//gen:long"][..], &flags].concat()));
        // The long action is on the worker: the page shows it executing.
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        while !section(&get(kiln.metrics_addr(), "/status", None).1, "executing").contains("local-") {
            assert!(!build.is_finished(), "the build ended before its action was seen executing");
            assert!(std::time::Instant::now() < deadline, "the long action never started");
            std::thread::sleep(Duration::from_millis(100));
        }
        let dom = chromium_dom(&url, dir.path());
        let shot = chromium_screenshot(&url, dir.path());
        let executing = section(&dom, "executing");
        assert!(executing.contains("local-") && executing.contains("<td>e"), "{executing}");
        assert!(section(&dom, "workers").contains("1 of 2 busy"), "{dom}");
        assert!(section(&dom, "configuration").contains("local worker with"), "{dom}");
        let failures = section(&dom, "failures");
        assert!(failures.contains("<td>3</td>"), "the failed action's exit code:\n{failures}");
        // KILN_STATUS_SCREENSHOT=FILE keeps the picture, to look at.
        if let Some(keep) = std::env::var_os("KILN_STATUS_SCREENSHOT") {
            std::fs::copy(&shot, keep).unwrap();
        }
        // What a person sees: every section's heading, read off the pixels.
        let seen = ocr(&shot);
        for heading in [
            "Kiln status",
            "Configuration",
            "Cache and traffic",
            "Stores",
            "Health",
            "Queue",
            "Executing",
            "Workers",
            "Recent failed actions",
        ] {
            assert!(seen.contains(heading), "{heading:?} is not in the screenshot; OCR read:\n{seen}");
        }
        // The failure's log links fetch its output.
        let links: Vec<&str> =
            failures.split("href=\"").skip(1).filter_map(|h| h.split('"').next()).collect();
        assert_eq!(links.len(), 2, "stdout and stderr links: {failures}");
        let logs: Vec<String> = links.iter().map(|l| get(kiln.metrics_addr(), l, None).1).collect();
        assert_eq!(logs, ["kiln-test-stdout\n", "kiln-test-stderr\n"], "{links:?}");

        let (ok, output) = build.join().unwrap();
        assert!(ok, "{output}");
        // The executing action carried the invocation id Bazel printed
        // (from its RequestMetadata header): the queue is fair per build.
        let invocation = output
            .lines()
            .find_map(|l| l.strip_prefix("INFO: Invocation ID: "))
            .unwrap_or_else(|| panic!("no invocation id in\n{output}"));
        assert!(executing.contains(invocation.trim()), "{invocation} in {executing}");
    });
    let page = get(kiln.metrics_addr(), "/status", None).1;
    assert!(!section(&page, "executing").contains("local-"), "{page}");
    assert!(section(&page, "workers").contains("0 of 2 busy"), "{page}");
}

#[test]
fn the_status_page_takes_htpasswd_users_like_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    // apr1 hash of "secret" with salt abcdefgh (openssl passwd -apr1).
    std::fs::write(
        &htpasswd,
        "ops:$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/\ndev:$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/\n",
    )
    .unwrap();
    let rule = |who: &str, perms: &str| {
        format!("[[auth.rules]]\nprincipal = \"user:{who}\"\ntenant = \"*\"\npermissions = [{perms}]\n")
    };
    let config = format!(
        "[auth]\nhtpasswd = \"{}\"\n\n{}\n{}",
        htpasswd.display(),
        rule("ops", "\"admin\""),
        rule("dev", "\"read\"")
    );
    let kiln = Kiln::start_with_config(&config);
    let metrics = kiln.metrics_addr().to_string();
    let (status, response) = get_with_headers(kiln.metrics_addr(), "/status", None);
    assert_eq!(status, 401);
    assert!(response.to_ascii_lowercase().contains("www-authenticate: basic realm=\"kiln\""), "{response}");
    for (user, allowed) in [("ops:secret", true), ("dev:secret", false), ("ops:wrong", false)] {
        let (ok, text, err) = common::kiln(&["status", "--metrics", &metrics, "--basic-auth", user]);
        assert_eq!(ok, allowed, "{user}: {text}{err}");
        if allowed {
            assert!(text.contains("basic auth (htpasswd)"), "{text}");
        }
    }
}

/// Sends `request` as is; the whole response (empty when the server just
/// closed the connection).
fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = tcp.write_all(request);
    let mut response = Vec::new();
    let _ = tcp.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn the_metrics_listener_answers_bad_requests_and_outlives_floods() {
    use kiln_proto::limits::{METRICS_CONNECTIONS_MAX, METRICS_HEADER_TIMEOUT};
    let kiln = Kiln::start();
    let addr = kiln.metrics_addr();
    // Wrong methods, paths, digests and bytes get precise answers.
    let post =
        raw(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(post.to_ascii_lowercase().contains("allow: get, head"), "{post}");
    assert_eq!(get(addr, "/nope", None).0, 404);
    assert_eq!(get(addr, "/logs/abc", None).0, 404, "a path that is not HASH/SIZE/INSTANCE");
    assert_eq!(get(addr, "/logs/zz/1/", None).0, 400, "not a digest");
    assert_eq!(get(addr, &format!("/logs/{}/-5/", "0".repeat(64)), None).0, 400, "a negative size");
    assert_eq!(get(addr, &format!("/logs/{}/5/main", "0".repeat(64)), None).0, 404, "no such log");
    // A log above the 16 MiB the page serves is refused, naming the way.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.log");
    std::fs::write(&big, vec![b'x'; usize::try_from(kiln_proto::limits::STATUS_LOG_BYTES_MAX + 1).unwrap()])
        .unwrap();
    let (ok, out, err) = common::kiln(&["cas", "--remote", &kiln.remote(), "put", big.to_str().unwrap()]);
    assert!(ok, "{err}");
    let digest = out.split_whitespace().next().unwrap().to_owned();
    let (status, body) = get(addr, &format!("/logs/{digest}/"), None);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("kiln cas get"), "{body}");
    assert!(raw(addr, b"NOT HTTP AT ALL\r\n\r\n").starts_with("HTTP/1.1 400"));
    let huge = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20));
    let answer = raw(addr, huge.as_bytes());
    assert!(!answer.contains(" 200 "), "a 1 MiB header is refused: {}", &answer[..answer.len().min(200)]);

    // Connections that never send a request take every slot; a scrape
    // behind them waits for the header deadline to close them, then is
    // served.
    let silent: Vec<TcpStream> =
        (0..METRICS_CONNECTIONS_MAX).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let started = std::time::Instant::now();
    let (status, body) = get(addr, "/metrics", None);
    assert_eq!(status, 200);
    assert!(body.contains("kiln_store_capacity_bytes"), "{body}");
    let waited = started.elapsed();
    assert!(
        waited >= METRICS_HEADER_TIMEOUT - Duration::from_secs(1) && waited < Duration::from_secs(60),
        "the scrape waited {waited:?} for a slot"
    );
    for mut c in silent {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0, "closed without an answer"),
            Err(e) => assert!(
                !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                "a silent connection was left open"
            ),
        }
    }
    assert_eq!(get(addr, "/status.txt", None).0, 200, "and the listener serves on");
}
