//! Real Bazel against a real `kiln serve`: a build fills the cache, a clean
//! rebuild must be served entirely from it with byte-identical outputs, and
//! the same holds with `--remote_download_minimal`.
//!
//! Needs `bazel` (Debian's bazel-bootstrap, 4.2.3) and the mock rule
//! repositories from bazel-bootstrap-source; `.ci/run` installs both.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Kiln;

const MOCK_REPOS: &str = "/usr/src/bazel-bootstrap/mock_repos";

/// Outputs compared byte for byte between builds.
const OUTPUTS: &[&str] = &[
    "gen/words.txt",
    "gen/upper.txt",
    "gen/sub/count.txt",
    "gen/tool.sh",
    "gen/big.bin",
    "gen/random.bin",
    "lib/libgreet.a",
    "app/app",
];

struct Bazel {
    workspace: PathBuf,
    output_user_root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bazel {
    fn new() -> Bazel {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("ws");
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bazel/workspace"), &workspace);
        let mut rc = String::new();
        let mut repos: Vec<_> = std::fs::read_dir(MOCK_REPOS)
            .unwrap_or_else(|e| panic!("{MOCK_REPOS}: {e}; install bazel-bootstrap-source"))
            .map(|e| e.unwrap().path())
            .collect();
        repos.sort();
        for repo in repos {
            let name = repo.file_name().unwrap().to_str().unwrap().to_owned();
            rc.push_str(&format!("common --override_repository={name}={}\n", repo.display()));
        }
        let coverage = workspace.join("third_party/remote_coverage_tools");
        rc.push_str(&format!("common --override_repository=remote_coverage_tools={}\n", coverage.display()));
        rc.push_str(
            "build --spawn_strategy=local --nosandbox_debug --noshow_progress --color=no --curses=no\n",
        );
        std::fs::write(workspace.join(".bazelrc"), rc).unwrap();
        let output_user_root = dir.path().join("root");
        Bazel { workspace, output_user_root, _dir: dir }
    }

    /// Runs bazel and returns its combined output; panics on failure.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("bazel")
            .arg(format!("--output_user_root={}", self.output_user_root.display()))
            .arg("--nohome_rc")
            .args(args)
            .current_dir(&self.workspace)
            .output()
            .expect("run bazel (install bazel-bootstrap)");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "bazel {args:?} failed:\n{text}");
        text
    }

    fn outputs(&self) -> BTreeMap<&'static str, Vec<u8>> {
        OUTPUTS
            .iter()
            .map(|o| {
                let path = self.workspace.join("bazel-bin").join(o);
                (*o, std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
            })
            .collect()
    }
}

impl Drop for Bazel {
    fn drop(&mut self) {
        let _ = Command::new("bazel")
            .arg(format!("--output_user_root={}", self.output_user_root.display()))
            .arg("shutdown")
            .current_dir(&self.workspace)
            .output();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Parses "INFO: 29 processes: 15 remote cache hit, 14 internal." into
/// {"remote cache hit": 15, "internal": 14}.
fn process_summary(output: &str) -> BTreeMap<String, u32> {
    let line = output
        .lines()
        .rfind(|l| l.starts_with("INFO: ") && l.contains(" processes: ") || l.contains(" process: "))
        .unwrap_or_else(|| panic!("no process summary in:\n{output}"));
    let kinds = line.split_once(": ").unwrap().1.split_once(": ").unwrap().1.trim_end_matches('.');
    kinds
        .split(", ")
        .map(|k| {
            let (n, kind) = k.split_once(' ').unwrap();
            (kind.to_owned(), n.parse().unwrap())
        })
        .collect()
}

/// Asserts that every non-internal action was a remote cache hit; returns the hit count.
fn assert_all_hits(output: &str) -> u32 {
    let summary = process_summary(output);
    let hits = summary.get("remote cache hit").copied().unwrap_or(0);
    let other: Vec<_> =
        summary.iter().filter(|(k, _)| *k != "remote cache hit" && *k != "internal").collect();
    assert!(other.is_empty() && hits > 0, "expected only remote cache hits, got {summary:?}");
    hits
}

#[test]
fn bazel_build_is_served_from_kiln_after_clean() {
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
