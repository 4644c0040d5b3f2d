//! Real Bazel (Debian's bazel-bootstrap, 4.2.3) on the test workspace in
//! `tests/bazel/workspace`, against a real `kiln serve`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// Bazel servers are heavy; tests in one binary take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn exclusive() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub const MOCK_REPOS: &str = "/usr/src/bazel-bootstrap/mock_repos";

/// Outputs compared byte for byte between builds.
pub const OUTPUTS: &[&str] = &[
    "gen/words.txt",
    "gen/upper.txt",
    "gen/sub/count.txt",
    "gen/tool.sh",
    "gen/big.bin",
    "gen/random.bin",
    "lib/libgreet.a",
    "app/app",
];

/// Flags for remote execution on the endpoint `remote`.
pub fn remote_execution_flags(remote: &str) -> Vec<String> {
    vec![
        format!("--remote_executor={remote}"),
        "--remote_timeout=60s".to_owned(),
        "--spawn_strategy=remote".to_owned(),
        "--remote_default_exec_properties=OSFamily=linux".to_owned(),
    ]
}

pub struct Bazel {
    pub workspace: PathBuf,
    pub output_user_root: PathBuf,
    pub env: Vec<(String, String)>,
    /// Startup options, before the command.
    pub startup: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Bazel {
    pub fn new() -> Bazel {
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
        Bazel { workspace, output_user_root, env: Vec::new(), startup: Vec::new(), _dir: dir }
    }

    /// Runs bazel and returns its combined output; panics on failure.
    pub fn run(&self, args: &[&str]) -> String {
        let (ok, text) = self.try_run(args);
        assert!(ok, "bazel {args:?} failed:\n{text}");
        text
    }

    /// Runs bazel; returns whether it succeeded and its combined output.
    pub fn try_run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("bazel")
            .arg(format!("--output_user_root={}", self.output_user_root.display()))
            .arg("--nohome_rc")
            .args(&self.startup)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.workspace)
            .output()
            .expect("run bazel (install bazel-bootstrap)");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Lets Debian's Bazel speak TLS: its bundled netty has no JDK ALPN, so
    /// it needs netty-tcnative (package libnetty-tcnative-jni), which it loads
    /// only under the upstream file name.
    pub fn enable_tls(&mut self) {
        let jni = self.output_user_root.with_file_name("jni");
        std::fs::create_dir_all(&jni).unwrap();
        let lib = "/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so";
        std::fs::copy(lib, jni.join("libnetty_tcnative.so"))
            .unwrap_or_else(|e| panic!("{lib}: {e}; install libnetty-tcnative-jni"));
        self.startup.push(format!("--host_jvm_args=-Djava.library.path={}", jni.display()));
    }

    pub fn outputs(&self) -> BTreeMap<&'static str, Vec<u8>> {
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
pub fn process_summary(output: &str) -> BTreeMap<String, u32> {
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
pub fn assert_all_hits(output: &str) -> u32 {
    let summary = process_summary(output);
    let hits = summary.get("remote cache hit").copied().unwrap_or(0);
    let other: Vec<_> =
        summary.iter().filter(|(k, _)| *k != "remote cache hit" && *k != "internal").collect();
    assert!(other.is_empty() && hits > 0, "expected only remote cache hits, got {summary:?}");
    hits
}
