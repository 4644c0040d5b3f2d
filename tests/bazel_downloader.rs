//! Real Bazel 4.2.3 with `--experimental_remote_downloader` on Kiln: an
//! `http_file` and an `http_archive` are downloaded by Kiln from a local
//! origin, once; a clean rebuild with Bazel's repository cache off
//! downloads nothing from the origin; a wrong checksum and a host outside
//! Kiln's allow-list fail the build with Kiln's reason.
//!
//! Needs `bazel` (Debian's bazel-bootstrap) and `tar`; `./scripts/test`
//! installs Bazel.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::Kiln;
use common::bazel::{Bazel, exclusive};
use common::origin::Origin;
use sha2::Digest as _;

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// `lib/hello.txt` in a gzipped tarball.
fn tarball() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("lib")).unwrap();
    std::fs::write(dir.path().join("lib/hello.txt"), "hello from the archive\n").unwrap();
    let out = dir.path().join("lib.tar.gz");
    let ok = Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "-czf"])
        .arg(&out)
        .arg("-C")
        .arg(dir.path())
        .arg("lib")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar");
    std::fs::read(out).unwrap()
}

/// The test workspace with a WORKSPACE fetching `data` and `lib` from
/// `base`, and a target using both.
fn workspace(bazel: &Bazel, base: &str, data_name: &str, data_sha: &str, lib_sha: &str) {
    let workspace = format!(
        r#"workspace(name = "kiln_e2e")

load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive", "http_file")

http_file(
    name = "data",
    urls = ["{base}{data_name}"],
    sha256 = "{data_sha}",
    downloaded_file_path = "data.txt",
)

http_archive(
    name = "lib",
    urls = ["{base}lib.tar.gz"],
    sha256 = "{lib_sha}",
    strip_prefix = "lib",
    build_file_content = "filegroup(name = 'all', srcs = ['hello.txt'], visibility = ['//visibility:public'])",
)
"#
    );
    std::fs::write(bazel.workspace.join("WORKSPACE"), workspace).unwrap();
    let package = bazel.workspace.join("fetched");
    std::fs::create_dir_all(&package).unwrap();
    let build = r#"genrule(
    name = "both",
    srcs = ["@data//file", "@lib//:all"],
    outs = ["both.txt"],
    cmd = "cat $(SRCS) > $@",
)
"#;
    std::fs::write(package.join("BUILD"), build).unwrap();
}

#[test]
fn bazel_fetches_http_files_and_archives_through_kiln_once() {
    let _turn = exclusive();
    let data = b"data served by the origin\n".to_vec();
    let lib = tarball();
    let files: HashMap<String, Vec<u8>> = [
        ("data.txt".to_owned(), data.clone()),
        ("data2.txt".to_owned(), data.clone()),
        ("lib.tar.gz".to_owned(), lib.clone()),
    ]
    .into();
    let origin = Origin::start(files);
    let base = origin.base();
    let kiln = Kiln::start_with_config(&format!(
        "[assets]\nfetch_from_origin = true\nfetch_allow = [\"{base}\"]\nfetch_private_addresses = true\n"
    ));
    let bazel = Bazel::new();
    let cache = format!("--remote_cache={}", kiln.remote());
    let downloader = format!("--experimental_remote_downloader={}", kiln.remote());
    let flags = ["build", "//fetched:both", cache.as_str(), downloader.as_str(), "--repository_cache="];
    workspace(&bazel, &base, "data.txt", &sha256_hex(&data), &sha256_hex(&lib));

    bazel.run(&flags);
    let built = std::fs::read_to_string(bazel.workspace.join("bazel-bin/fetched/both.txt")).unwrap();
    assert_eq!(built, "data served by the origin\nhello from the archive\n");
    assert_eq!((origin.hits("/data.txt"), origin.hits("/lib.tar.gz")), (1, 1), "Kiln downloaded each once");

    // From scratch, with no repository cache: Kiln answers, the origin is
    // not asked again.
    bazel.run(&["clean", "--expunge"]);
    bazel.run(&flags);
    assert_eq!((origin.hits("/data.txt"), origin.hits("/lib.tar.gz")), (1, 1), "nothing downloaded twice");
    let again = std::fs::read_to_string(bazel.workspace.join("bazel-bin/fetched/both.txt")).unwrap();
    assert_eq!(again, built);

    // A wrong checksum fails the build with Kiln's reason.
    let wrong = sha256_hex(b"something else");
    workspace(&bazel, &base, "data2.txt", &wrong, &sha256_hex(&lib));
    let (ok, out) = bazel.try_run(&flags);
    assert!(!ok, "{out}");
    assert!(out.contains("checksum.sri"), "{out}");

    // A host outside the allow-list is refused before anything is fetched.
    let elsewhere = format!("http://127.0.0.2:{}/", origin.port);
    workspace(&bazel, &elsewhere, "data.txt", &sha256_hex(&data), &sha256_hex(&lib));
    let before = origin.hits("/data.txt");
    let (ok, out) = bazel.try_run(&flags);
    assert!(!ok, "{out}");
    assert!(out.contains("fetch_allow"), "{out}");
    assert_eq!(origin.hits("/data.txt"), before, "the refused host was not asked");
}
