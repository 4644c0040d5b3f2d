//! Real Pants (2.17, from PyPI) building with remote execution against a
//! real `kiln serve`, configured with the `pants.toml` of README's Pants
//! section (only its address replaced): every process of the build runs on
//! Kiln's worker and none locally, the outputs are right and were made in
//! Kiln's sandbox, and a second build from empty local caches is served
//! from Kiln's action cache with identical outputs.
//!
//! Needs root (the worker's sandbox), CPython 3.9 (Pants 2.17 ships wheels
//! for cp39 only: `python3.9` on PATH, or pyenv's) and PyPI through pip. The
//! test installs Pants into a virtual environment under target/tmp once and
//! reuses it; Pants itself downloads nothing (the shell and adhoc backends
//! only). Without Python 3.9 it says so and skips.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Kiln;

const PANTS_REQUIREMENT: &str = "pantsbuild.pants==2.17.1";
const PANTS_VERSION: &str = "2.17.1";

/// Where README's `pants.toml` points; the test's Kiln listens elsewhere.
const README_ADDRESS: &str = "grpc://127.0.0.1:8980";

/// `sort` found on the worker and run there by `adhoc_tool`; a
/// `shell_command` over its output with tools from the worker's PATH.
/// Pants before 2.25 leaves `{chroot}` unreplaced in the environment of a
/// remote process, so the command resolves its tool directory itself.
const BUILD: &str = r#"files(name="words", sources=["words.txt"])

system_binary(name="sort", binary_name="sort", fingerprint_args=["--version"])

adhoc_tool(
    name="sorted",
    runnable=":sort",
    args=["words.txt"],
    execution_dependencies=[":words"],
    stdout="sorted.txt",
)

shell_command(
    name="counted",
    command='PATH="${PATH//\\{chroot\\}/$PWD}"; wc -l < sorted.txt > count.txt; cat sorted.txt | tr a-z A-Z > upper.txt; pwd > where.txt',
    tools=["cat", "tr", "wc"],
    execution_dependencies=[":sorted"],
    output_files=["count.txt", "upper.txt", "where.txt"],
)
"#;

/// What the build generates (under dist/codegen), and its expected bytes:
/// `where.txt` is the action's working directory, Kiln's exec root.
const OUTPUTS: &[(&str, &str)] = &[
    ("sorted.txt", "apple\nfig\npear\n"),
    ("count.txt", "3\n"),
    ("upper.txt", "APPLE\nFIG\nPEAR\n"),
    ("where.txt", "/kiln/exec\n"),
];

/// How long one Pants run may take before the test gives up.
const PANTS_DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn pants_executes_remotely_on_kiln_and_rebuilds_from_its_cache() {
    let Some(python) = python39() else {
        println!(
            "skipped: Pants 2.17 needs CPython 3.9 (no working python3.9 on PATH or under pyenv's versions)"
        );
        return;
    };
    let pants = pants_install(&python);
    let kiln = Kiln::start();
    let project = Project::new(&pants, &kiln.remote());

    let started = Instant::now();
    let first = project.build("first");
    let first_time = started.elapsed();
    let executed = assert_all_remote(&first);
    assert_eq!(first.counter("remote_cache_requests_cached"), 0, "Kiln started empty:\n{}", first.log);
    let cacheable = first.counter("remote_cache_requests");
    assert!(cacheable >= 2, "the adhoc_tool and the shell_command are cacheable:\n{}", first.log);
    assert_eq!(first.counter("remote_cache_write_errors"), 0, "{}", first.log);
    let expected: BTreeMap<String, String> =
        OUTPUTS.iter().map(|(f, c)| ((*f).into(), (*c).into())).collect();
    assert_eq!(first.outputs, expected, "{}", first.log);
    // Kiln's side of the same build: every Execute answered, every process a
    // sandboxed run on its worker, every cacheable process looked up.
    settled(
        &kiln,
        "kiln_grpc_requests_total",
        &["method=\"Execute\""],
        first.counter("remote_execution_rpc_execute"),
    );
    settled(&kiln, "kiln_scheduler_executions_total", &["outcome=\"OK\""], executed);
    settled(&kiln, "kiln_worker_runs_total", &["outcome=\"exited\""], executed);
    settled(&kiln, "kiln_ac_lookups_total", &["result=\"miss\""], cacheable);

    // Empty local caches: what can be cached comes from Kiln's action cache.
    let hits_before = kiln.metric("kiln_ac_lookups_total", &["result=\"hit\""]);
    let started = Instant::now();
    let second = project.build("second");
    let second_time = started.elapsed();
    assert_all_remote(&second);
    // Pants races each lookup against executing the process remotely (no
    // delay for these processes): a lookup can lose the race, never miss.
    let cached = second.counter("remote_cache_requests_cached");
    let beaten = second.counter("remote_cache_speculation_local_completed_first");
    assert_eq!(second.counter("remote_cache_requests"), cacheable, "{}", second.log);
    assert_eq!(second.counter("remote_cache_requests_uncached"), 0, "{}", second.log);
    assert_eq!(second.counter("remote_cache_read_errors"), 0, "{}", second.log);
    assert_eq!(cached + beaten, cacheable, "{}", second.log);
    assert!(cached >= 1, "no process came from Kiln's cache:\n{}", second.log);
    let hits = kiln.metric("kiln_ac_lookups_total", &["result=\"hit\""]) - hits_before;
    assert!(hits >= cached as f64, "Kiln served {hits} hits, Pants used {cached}");
    assert_eq!(second.outputs, first.outputs, "outputs from the cache are identical");
    println!(
        "kiln pants e2e: {executed} processes remote in {:.1} s, then {cached} of {cacheable} cacheable \
         ones from Kiln's cache in {:.1} s (Pants {PANTS_VERSION})",
        first_time.as_secs_f64(),
        second_time.as_secs_f64()
    );
}

/// Asserts that a build ran every process remotely, without an error, and
/// none locally; returns how many it ran.
fn assert_all_remote(build: &Build) -> u64 {
    let log = &build.log;
    assert_eq!(build.counter("local_execution_requests"), 0, "processes ran locally:\n{log}");
    let executed = build.counter("remote_execution_requests");
    assert!(executed >= 4, "too few remote processes:\n{log}");
    for counter in ["remote_execution_errors", "remote_execution_rpc_errors", "remote_execution_timeouts"] {
        assert_eq!(build.counter(counter), 0, "{counter}:\n{log}");
    }
    executed
}

/// Waits until metric `name` (summed over `labels`) reaches `want`, as a
/// call's metrics are recorded as it ends, which a client may not wait
/// for; fails if it is still different after a few seconds.
fn settled(kiln: &Kiln, name: &str, labels: &[&str], want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = kiln.metric(name, labels);
        if got == want as f64 {
            return;
        }
        assert!(Instant::now() < deadline, "{name}{labels:?} is {got}, Pants counted {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CPython 3.9 that runs: `python3.9` on PATH (a pyenv shim may not), or
/// the newest 3.9 under pyenv's versions.
fn python39() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("python3.9")];
    let roots = [
        std::env::var_os("PYENV_ROOT").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")),
        Some(PathBuf::from("/root/.pyenv")),
    ];
    for root in roots.into_iter().flatten() {
        let Ok(entries) = std::fs::read_dir(root.join("versions")) else { continue };
        let mut versions: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("3.9."))
            .map(|e| e.path().join("bin/python"))
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            .output()
            .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "3.9")
    })
}

/// Pants installed from PyPI into a virtual environment under target/tmp,
/// made once (a marker names what was installed) and reused; returns the
/// `pants` script.
fn pants_install(python: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pants-{PANTS_VERSION}"));
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::File::create(dir.join("lock")).unwrap();
    lock.lock().unwrap(); // another test process installing at once waits
    let venv = dir.join("venv");
    let pants = venv.join("bin/pants");
    let marker = dir.join("installed");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == PANTS_REQUIREMENT) && pants.exists() {
        return pants;
    }
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_dir_all(&venv);
    let started = Instant::now();
    run_checked(Command::new(python).arg("-m").arg("venv").arg(&venv));
    run_checked(
        Command::new(venv.join("bin/python"))
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .arg(PANTS_REQUIREMENT),
    );
    assert!(pants.exists(), "pip installed no {}", pants.display());
    std::fs::write(&marker, PANTS_REQUIREMENT).unwrap();
    println!("installed {PANTS_REQUIREMENT} in {:.1} s", started.elapsed().as_secs_f64());
    pants
}

fn run_checked(command: &mut Command) {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// README's Pants configuration for `remote`, plus what this project needs:
/// the Pants version, its backends, and no telemetry (no network).
fn pants_toml(remote: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split_once("\n### Pants\n").expect("README has a Pants section").1;
    let block = section.split_once("```toml\n").expect("a toml block in README's Pants section").1;
    let block = block.split_once("```").expect("the toml block ends").0;
    assert_eq!(block.matches(README_ADDRESS).count(), 2, "README's pants.toml names {README_ADDRESS} twice");
    assert!(block.starts_with("[GLOBAL]\n"), "{block}");
    let ours = format!(
        "[GLOBAL]\npants_version = \"{PANTS_VERSION}\"\n\
         backend_packages = [\"pants.backend.shell\", \"pants.backend.experimental.adhoc\"]\n"
    );
    format!(
        "{}\n[anonymous-telemetry]\nenabled = false\n",
        block.replace(README_ADDRESS, remote).replacen("[GLOBAL]\n", &ours, 1)
    )
}

/// A Pants project in a temporary directory, with Pants' home inside it.
struct Project {
    pants: PathBuf,
    root: PathBuf,
    dir: tempfile::TempDir,
}

/// One build: Pants' log, its counters (`--stats-log`) and the outputs.
struct Build {
    log: String,
    counters: BTreeMap<String, u64>,
    outputs: BTreeMap<String, String>,
}

impl Build {
    fn counter(&self, name: &str) -> u64 {
        *self.counters.get(name).unwrap_or_else(|| panic!("Pants reported no counter {name}:\n{}", self.log))
    }
}

impl Project {
    fn new(pants: &Path, remote: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("project");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("pants.toml"), pants_toml(remote)).unwrap();
        std::fs::write(root.join("BUILD"), BUILD).unwrap();
        std::fs::write(root.join("words.txt"), "pear\napple\nfig\n").unwrap();
        Project { pants: pants.to_owned(), root, dir }
    }

    /// Runs `pants export-codegen ::` without pantsd, with local caches of
    /// its own (named `label`) and nothing left of earlier runs' outputs.
    fn build(&self, label: &str) -> Build {
        for old in ["dist", ".pants.d"] {
            let _ = std::fs::remove_dir_all(self.root.join(old));
        }
        let caches = self.dir.path().join("caches").join(label);
        let log_path = self.dir.path().join(format!("{label}.log"));
        let log_file = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(&self.pants)
            .args(["--no-pantsd", "--no-pantsrc", "--stats-log"])
            .arg(format!("--local-store-dir={}", caches.join("lmdb_store").display()))
            .arg(format!("--named-caches-dir={}", caches.join("named_caches").display()))
            .arg(format!("--local-execution-root-dir={}", caches.join("sandboxes").display()))
            .args(["export-codegen", "::"])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", self.dir.path().join("home"))
            .env("LANG", "C.UTF-8")
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("run pants");
        let status = wait_for(&mut child, &log_path);
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(status.success(), "pants {label} build failed ({status}):\n{log}");
        let codegen = self.root.join("dist/codegen");
        let outputs = OUTPUTS
            .iter()
            .map(|(name, _)| {
                let path = codegen.join(name);
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}\n{log}", path.display()));
                ((*name).to_owned(), text)
            })
            .collect();
        Build { counters: counters(&log), log, outputs }
    }
}

/// Waits for Pants to exit; kills it and fails, with its log, after
/// [`PANTS_DEADLINE`].
fn wait_for(child: &mut std::process::Child, log_path: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + PANTS_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pants ran past {PANTS_DEADLINE:?}:\n{}", std::fs::read_to_string(log_path).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The counters `--stats-log` prints at the end of a run ("  name: value"
/// lines after "Counters:").
fn counters(log: &str) -> BTreeMap<String, u64> {
    let after = log.rsplit_once("Counters:").unwrap_or_else(|| panic!("no counters in:\n{log}")).1;
    after
        .lines()
        .skip(1)
        .map_while(|line| {
            let (name, value) = line.strip_prefix("  ")?.split_once(": ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}
