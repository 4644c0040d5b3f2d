//! The action sandbox against real namespaces and cgroups: each test has
//! an action try to break out, and checks that it failed inside while the
//! host and the file cache are untouched and nothing is left running.
//!
//! These tests need root (the sandbox maps its root to another uid); they
//! fail, rather than pass silently, without it.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiln_worker::sandbox::{self, Outcome, SandboxConfig, SandboxError, Spec};

const CACHE_CONTENT: &str = "cached input: do not change\n";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the sandbox tests need root: the sandbox maps its root to an unprivileged uid, which only root may do \
         (run `cargo test --test sandbox` as root)"
    );
}

/// A number no other test run uses, for paths and markers.
fn nonce() -> u64 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    u64::from(std::process::id()) * 1_000_000
        + u64::from(NEXT.fetch_add(1, Ordering::Relaxed)) * 1000
        + u64::from(nanos % 1000)
}

/// An exec root with a hard-linked, read-only input from a "file cache"
/// owned by root, and the checks every test ends with.
struct Fixture {
    dir: tempfile::TempDir,
    config: SandboxConfig,
    exec_root: PathBuf,
    cache_file: PathBuf,
    /// In every sandboxed shell's command line (`$0`) and in the duration
    /// of every sleep the actions start: a process that has it outlived
    /// its sandbox.
    marker: String,
    sleep: String,
    runs: AtomicU32,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture").field("exec_root", &self.exec_root).finish_non_exhaustive()
    }
}

impl Fixture {
    fn new() -> Self {
        require_root();
        let n = nonce();
        let uid = 2_000_000 + u32::try_from(n % 100_000).unwrap();
        let stages = PathBuf::from(env!("CARGO_BIN_EXE_kiln-sandbox"));
        let config = SandboxConfig::new(stages, uid, uid).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let exec_root = dir.path().join("exec");
        std::fs::create_dir_all(exec_root.join("pkg/sub")).unwrap();
        for d in [exec_root.clone(), exec_root.join("pkg"), exec_root.join("pkg/sub")] {
            std::os::unix::fs::chown(&d, Some(uid), Some(uid)).unwrap();
        }
        let cache = dir.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let cache_file = cache.join("blob");
        std::fs::write(&cache_file, CACHE_CONTENT).unwrap();
        std::fs::set_permissions(&cache_file, std::fs::Permissions::from_mode(0o444)).unwrap();
        std::fs::hard_link(&cache_file, exec_root.join("input.txt")).unwrap();
        Self {
            dir,
            config,
            exec_root,
            cache_file,
            marker: format!("kiln-sandbox-test-{n}"),
            sleep: format!("1000.{n}"),
            runs: AtomicU32::new(0),
        }
    }

    /// `sh -c script` with `$0` the marker; `{sleep}` in the script is the
    /// marked sleep duration.
    fn shell(&self, script: &str) -> Spec {
        let script = script.replace("{sleep}", &self.sleep);
        self.spec(&["sh", "-c", &script, &self.marker])
    }

    fn spec(&self, args: &[&str]) -> Spec {
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        Spec {
            id: format!("{}-{run}", self.marker),
            exec_root: self.exec_root.clone(),
            working_directory: String::new(),
            arguments: args.iter().map(|a| (*a).to_owned()).collect(),
            environment: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
            stdout: self.dir.path().join(format!("stdout-{run}")),
            stderr: self.dir.path().join(format!("stderr-{run}")),
            timeout: Duration::from_secs(60),
            kill_grace: Duration::from_secs(1),
            memory_bytes: Some(512 << 20),
            pids_max: Some(256),
            cpu_millicores: None,
            network: false,
        }
    }

    /// Runs `spec`, checks the host is intact, returns the outcome, stdout
    /// and stderr.
    fn run(&self, spec: &Spec) -> (Outcome, String, String) {
        let outcome = sandbox::run(&self.config, spec).unwrap_or_else(|e| panic!("{e}"));
        self.assert_host_intact(spec);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        (outcome, read(&spec.stdout), read(&spec.stderr))
    }

    /// The file cache unchanged, no process of the run left, its cgroups
    /// gone: at once, since `run` returns only after cleaning up.
    fn assert_host_intact(&self, spec: &Spec) {
        assert_eq!(
            std::fs::read_to_string(&self.cache_file).unwrap(),
            CACHE_CONTENT,
            "the cached input changed"
        );
        let meta = std::fs::metadata(&self.cache_file).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o444, "the cached input's mode changed");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "the cached input changed owner");
        let left = processes_with(&[&self.marker, &self.sleep]);
        assert!(left.is_empty(), "processes outlived the sandbox: {left:?}");
        for dir in self.config.cgroups.run_dirs(&spec.id) {
            assert!(!dir.exists(), "cgroup {} outlived the sandbox", dir.display());
        }
    }
}

/// Host processes whose command line holds one of `needles` (this test
/// process aside).
fn processes_with(needles: &[&str]) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if u32::try_from(pid).ok() == Some(std::process::id()) {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if needles.iter().any(|n| cmdline.contains(n)) {
            found.push((pid, cmdline));
        }
    }
    found
}

#[test]
fn an_action_runs_with_its_argv_environment_and_directory_only() {
    let f = Fixture::new();
    let mut spec = f.shell(
        "echo hi; echo err >&2; echo pid=$$; cat /proc/sys/kernel/hostname; pwd; \
         echo made > made.txt; echo scratch > /tmp/scratch && cat /tmp/scratch; exit 3",
    );
    spec.working_directory = "pkg/sub".to_owned();
    let (outcome, stdout, stderr) = f.run(&spec);
    assert_eq!(
        (outcome.exit_code, outcome.signal, outcome.timed_out, outcome.oom_killed),
        (3, None, false, false)
    );
    assert_eq!(stdout, "hi\npid=2\nlocalhost\n/kiln/exec/pkg/sub\nscratch\n");
    assert_eq!(stderr, "err\n");
    assert!(outcome.started <= outcome.finished);
    // Outputs land in the exec root, owned by the sandbox's uid.
    let made = f.exec_root.join("pkg/sub/made.txt");
    assert_eq!(std::fs::read_to_string(&made).unwrap(), "made\n");
    assert_eq!(std::fs::metadata(&made).unwrap().uid(), f.config.uid);

    let mut spec = f.spec(&["env"]);
    spec.environment = vec![
        ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
        ("GREETING".to_owned(), "hello world".to_owned()),
        ("EMPTY".to_owned(), String::new()),
    ];
    let (outcome, stdout, _) = f.run(&spec);
    assert_eq!(outcome.exit_code, 0);
    let mut seen: Vec<&str> = stdout.lines().collect();
    seen.sort_unstable();
    assert_eq!(seen, ["EMPTY=", "GREETING=hello world", "PATH=/usr/bin:/bin"]);
}

/// A host file the test made, removed however the test ends.
#[derive(Debug)]
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn reading_a_host_file_outside_the_inputs_fails() {
    let f = Fixture::new();
    let secret = Removed(PathBuf::from(format!("/root/kiln-sandbox-secret-{}", nonce())));
    std::fs::write(&secret.0, "the host's secret").unwrap();
    let script = format!(
        "cat {s} || cat /proc/1/root{s} || cat /proc/self/root{s}; ls /; exit 0",
        s = secret.0.display()
    );
    let (outcome, stdout, stderr) = f.run(&f.shell(&script));
    assert_eq!(outcome.exit_code, 0);
    assert!(!stdout.contains("secret"), "the action read the host's secret: {stdout}");
    assert!(stderr.contains("No such file"), "{stderr}");
    let mut root: Vec<&str> = stdout.lines().collect();
    root.sort_unstable();
    assert!(!root.contains(&"root") && !root.contains(&"home") && !root.contains(&"work"), "{root:?}");
    assert!(root.contains(&"usr") && root.contains(&"kiln") && root.contains(&"proc"), "{root:?}");
}

#[test]
fn writing_to_usr_fails_even_after_a_remount() {
    let f = Fixture::new();
    let name = format!("kiln-sandbox-{}", nonce());
    // Only new, uniquely named files: a failing run must not harm the host.
    let script = format!(
        "touch /usr/{name} && exit 10; echo x > /usr/bin/{name} && exit 11; \
         mount -o remount,bind,rw /usr; touch /usr/{name} && exit 12; \
         mkdir /usr/{name} && exit 13; touch /{name} && exit 14; exit 0"
    );
    let spec = f.shell(&script);
    let run = sandbox::run(&f.config, &spec);
    let written: Vec<PathBuf> = [Path::new("/usr").join(&name), Path::new("/usr/bin").join(&name)]
        .into_iter()
        .filter(|p| p.exists())
        .collect();
    for path in &written {
        let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir(path));
    }
    assert!(written.is_empty(), "the action wrote {written:?} on the host");
    let outcome = run.unwrap();
    f.assert_host_intact(&spec);
    assert_eq!(outcome.exit_code, 0, "a write to the host's system directories succeeded");
}

#[test]
fn changing_a_hard_linked_input_fails() {
    let f = Fixture::new();
    let script = "cat input.txt; echo pwned > input.txt && exit 10; echo more >> input.txt && exit 11; \
                  chmod 666 input.txt && exit 12; chown 0 input.txt && exit 13; \
                  truncate -s 0 input.txt && exit 14; exit 0";
    let (outcome, stdout, stderr) = f.run(&f.shell(script));
    assert_eq!(outcome.exit_code, 0, "the action changed its input: {stderr}");
    assert_eq!(stdout, CACHE_CONTENT, "the action could not read its input");
    assert_eq!(std::fs::read_to_string(f.exec_root.join("input.txt")).unwrap(), CACHE_CONTENT);
}

/// Whether `listener` gets a connection before `deadline`.
fn accepts(listener: &TcpListener, deadline: Instant) -> bool {
    listener.set_nonblocking(true).unwrap();
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let mut buf = String::new();
                stream.set_nonblocking(false).unwrap();
                let _ = stream.read_to_string(&mut buf);
                return true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::yield_now();
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn the_hosts_loopback_is_unreachable_without_network() {
    let f = Fixture::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = format!("echo x > /dev/tcp/127.0.0.1/{port}");
    let (outcome, _, stderr) = f.run(&f.spec(&["bash", "-c", &connect]));
    assert_ne!(outcome.exit_code, 0, "the isolated action reached the host's loopback");
    // Refused rather than unreachable: the sandbox's own lo is up.
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!accepts(&listener, Instant::now()), "the host's listener got a connection");

    // Sharing the host's network is a platform property, and then the
    // host's loopback is the action's.
    let mut spec = f.spec(&["bash", "-c", &connect]);
    spec.network = true;
    let (outcome, _, stderr) = f.run(&spec);
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert!(accepts(&listener, Instant::now() + Duration::from_secs(10)));
}

#[test]
fn other_processes_can_be_neither_seen_nor_signalled() {
    let f = Fixture::new();
    let me = std::process::id();
    let script =
        format!("ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; kill -9 {me} && exit 10; exit 0");
    let (outcome, stdout, stderr) = f.run(&f.shell(&script));
    assert_eq!(outcome.exit_code, 0, "the action signalled the test process: {stderr}");
    let pids: Vec<u32> = stdout.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert!(pids.contains(&1) && pids.contains(&2), "{pids:?}");
    assert!(pids.iter().all(|p| *p <= 8), "the action saw processes outside its sandbox: {pids:?}");

    let (outcome, stdout, _) = f.run(&f.spec(&["ps", "-e", "-o", "pid=,comm="]));
    assert_eq!(outcome.exit_code, 0);
    let seen: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert_eq!(seen.len(), 2, "ps saw more than init and itself: {seen:?}");
    assert!(seen[0].starts_with("1 ") && seen[1] == "2 ps", "{seen:?}");
}

#[test]
fn exceeding_the_memory_limit_is_an_oom_kill() {
    let f = Fixture::new();
    let mut spec = f.shell("head -c 300M /dev/zero | tail > /dev/null");
    spec.memory_bytes = Some(64 << 20);
    let (outcome, _, _) = f.run(&spec);
    assert!(outcome.oom_killed, "{outcome:?}");
    assert_ne!(outcome.exit_code, 0, "{outcome:?}");
    assert!(!outcome.timed_out);
}

#[test]
fn forking_beyond_the_process_limit_fails() {
    let f = Fixture::new();
    let mut spec = f.shell(
        "n=0; while [ $n -lt 40 ]; do sleep {sleep} & n=$((n+1)); done; \
         echo started; ls /proc | grep -cE '^[0-9]+$'",
    );
    spec.pids_max = Some(16);
    let (outcome, stdout, stderr) = f.run(&spec);
    assert!(stderr.to_lowercase().contains("fork"), "no fork failed: {stdout} {stderr}");
    if let Some(count) = stdout.lines().last().and_then(|l| l.trim().parse::<u32>().ok()) {
        assert!(count <= 16, "{count} processes under a limit of 16");
    }
    assert!(!outcome.timed_out);
}

#[test]
fn a_daemon_left_behind_at_the_timeout_is_killed() {
    let f = Fixture::new();
    let mut spec = f.shell("setsid sleep {sleep} & sleep {sleep}");
    spec.timeout = Duration::from_secs(1);
    let start = Instant::now();
    let (outcome, _, _) = f.run(&spec);
    assert!(outcome.timed_out, "{outcome:?}");
    assert_eq!((outcome.exit_code, outcome.signal), (128 + 15, Some(15)), "SIGTERM reaches the action");
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

#[test]
fn an_action_that_ignores_sigterm_is_killed_after_the_grace() {
    let f = Fixture::new();
    let mut spec = f.shell("trap '' TERM; sleep {sleep}; sleep {sleep}");
    spec.timeout = Duration::from_millis(500);
    spec.kill_grace = Duration::from_millis(500);
    let (outcome, _, _) = f.run(&spec);
    assert!(outcome.timed_out, "{outcome:?}");
    assert_eq!((outcome.exit_code, outcome.signal), (128 + 9, Some(9)));
}

#[test]
fn an_action_that_exits_at_once_leaves_nothing_behind() {
    let f = Fixture::new();
    let (outcome, _, _) = f.run(&f.shell("setsid sleep {sleep} & sleep {sleep} & exit 0"));
    assert_eq!(outcome.exit_code, 0);
    assert!(!outcome.timed_out);
}

/// Copies `/usr/bin/dash` and the libraries `ldd` names into `root`.
fn minimal_root_fs(root: &Path) {
    let copy = |from: &Path| {
        let to = root.join(from.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap();
    };
    copy(Path::new("/usr/bin/dash"));
    let ldd = std::process::Command::new("ldd").arg("/usr/bin/dash").output().unwrap();
    assert!(ldd.status.success(), "ldd /usr/bin/dash failed");
    for line in String::from_utf8(ldd.stdout).unwrap().lines() {
        let path = line.split("=>").last().unwrap().split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            copy(Path::new(path));
        }
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    std::fs::create_dir(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/kiln-root-fs"), "from the root fs\n").unwrap();
    // The sandbox makes its own /proc, /dev and /tmp: these must not win.
    for reserved in ["proc", "dev", "tmp"] {
        std::fs::create_dir(root.join(reserved)).unwrap();
        std::fs::write(root.join(reserved).join("from-root-fs"), "").unwrap();
    }
}

#[test]
fn a_root_fs_replaces_the_host_directories() {
    let mut f = Fixture::new();
    let root = f.dir.path().join("rootfs");
    minimal_root_fs(&root);
    f.config.root_fs = Some(root.clone());
    let script = "read line < /etc/kiln-root-fs; echo \"$line\"; \
                  for p in /usr/bin/env /etc/passwd /proc/from-root-fs /dev/from-root-fs /tmp/from-root-fs; do \
                  [ -e $p ] && echo \"leaked $p\"; done; \
                  echo x > /etc/kiln-root-fs && echo wrote; [ -e /proc/1/status ] && echo proc; exit 0";
    let mut spec = f.spec(&["/bin/dash", "-c", script, &f.marker]);
    spec.environment.clear();
    let (outcome, stdout, stderr) = f.run(&spec);
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert_eq!(stdout, "from the root fs\nproc\n", "{stderr}");
    assert_eq!(std::fs::read_to_string(root.join("etc/kiln-root-fs")).unwrap(), "from the root fs\n");
}

#[test]
fn a_missing_program_or_directory_is_an_exec_error() {
    let f = Fixture::new();
    let err = sandbox::run(&f.config, &f.spec(&["kiln-no-such-program"])).unwrap_err();
    assert!(matches!(&err, SandboxError::Exec(m) if m.contains("not found in PATH")), "{err}");
    let mut spec = f.spec(&["true"]);
    spec.working_directory = "no/such/dir".to_owned();
    let err = sandbox::run(&f.config, &spec).unwrap_err();
    assert!(matches!(&err, SandboxError::Exec(m) if m.contains("no/such/dir")), "{err}");
    f.assert_host_intact(&spec);
}

/// The probe builds a sandbox with the small stage binary, and with
/// `kiln` itself, which a worker re-executes when `kiln-sandbox` is not
/// next to it; a uid that is the worker's own is refused.
#[test]
fn probe_builds_a_sandbox() {
    let f = Fixture::new();
    sandbox::probe(&f.config).unwrap();
    let kiln = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
    assert_eq!(sandbox::stage_binary(&kiln), f.config.kiln_binary, "kiln-sandbox lies next to kiln");
    let alone = f.dir.path().join("kiln");
    std::os::unix::fs::symlink(&kiln, &alone).unwrap();
    assert_eq!(sandbox::stage_binary(&alone), alone, "without kiln-sandbox, kiln runs the stages");
    sandbox::probe(&SandboxConfig { kiln_binary: alone, ..f.config.clone() }).unwrap();
    let mut bad = f.config.clone();
    bad.uid = nix::unistd::geteuid().as_raw();
    assert!(matches!(sandbox::probe(&bad), Err(SandboxError::Invalid(_))));
}

#[test]
fn sandbox_overhead_per_action() {
    let f = Fixture::new();
    let runs = 20;
    let overhead = sandbox::fork_exec_baseline(&f.config, &f.dir.path().join("bench"), runs).unwrap();
    println!(
        "sandbox: {runs} runs of true: plain {:?}, sandboxed {:?}, overhead {:?} per action",
        overhead.plain,
        overhead.sandboxed,
        overhead.per_action()
    );
    // A loose bound for a shared, debug-built test machine; the goal is 5 ms.
    assert!(overhead.per_action() < Duration::from_millis(100), "{overhead:?}");
    assert!(overhead.per_prepared_action() < Duration::from_millis(100), "{overhead:?}");
}

/// An action's view of its cgroups is rooted at its own: no host cgroup
/// path (the worker's, the run's id) shows in `/proc/self/cgroup`.
#[test]
fn an_action_sees_no_host_cgroup_path() {
    let f = Fixture::new();
    let spec = f.shell("cat /proc/self/cgroup");
    let (outcome, stdout, stderr) = f.run(&spec);
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert!(!stdout.is_empty());
    for line in stdout.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or_default();
        assert!(path == "/" || path.is_empty(), "a host cgroup path shows: {line}");
        assert!(!line.contains(&spec.id), "{line}");
    }
}

/// Every call of every denied family fails with `EPERM` inside the
/// sandbox, and the calls an unfiltered sandbox would let succeed (or fail
/// with another error) show the filter at work; `/proc/self/status` names
/// one filter in filter mode.
#[test]
fn each_denied_system_call_family_fails_with_eperm() {
    let f = Fixture::new();
    let mut probes = String::new();
    for (family, calls) in sandbox::DENIED_SYSCALLS {
        for (name, nr) in *calls {
            // Zero arguments; then, for some, arguments the kernel would
            // accept without the filter.
            probes.push_str(&format!("probe({family:?}, {name:?}, {nr}, [])\n"));
            let accepted = match *name {
                "keyctl" => "[0, -3, 0]", // KEYCTL_GET_KEYRING_ID of the session keyring
                "add_key" => "[b'user', b'kiln-probe', b'x', 1, -3]",
                "userfaultfd" => "[1]", // UFFD_USER_MODE_ONLY
                "fsopen" => "[b'tmpfs', 0]",
                "mount" => "[b'none', b'/tmp', b'tmpfs', 0, None]",
                "perf_event_open" => "[None, 0, -1, -1, 0]", // EFAULT without the filter
                "io_uring_setup" => "[1, None]",             // EFAULT without the filter
                _ => continue,
            };
            probes.push_str(&format!("probe({family:?}, {name:?}, {nr}, {accepted})\n"));
        }
    }
    let script = format!(
        "import ctypes\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         libc.syscall.restype = ctypes.c_long\n\
         def arg(a):\n    return ctypes.c_long(a) if isinstance(a, int) else a\n\
         def probe(family, name, nr, args):\n    \
             ctypes.set_errno(0)\n    \
             r = libc.syscall(ctypes.c_long(nr), *[arg(a) for a in args])\n    \
             print(family, name, len(args), r, ctypes.get_errno())\n\
         {probes}"
    );
    std::fs::write(f.exec_root.join("probe.py"), script).unwrap();
    let spec = f.shell("grep -E '^Seccomp(_filters)?:' /proc/self/status; exec python3 probe.py");
    let (outcome, stdout, stderr) = f.run(&spec);
    assert_eq!(outcome.exit_code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("Seccomp:\t2\n"), "the action runs without a filter: {stdout}");
    let mut checked = 0;
    for line in stdout.lines().filter(|l| !l.starts_with("Seccomp")) {
        let fields: Vec<&str> = line.rsplitn(3, ' ').collect();
        assert_eq!(fields[..2], ["1", "-1"], "a denied call did not fail with EPERM: {line}");
        checked += 1;
    }
    let calls: usize = sandbox::DENIED_SYSCALLS.iter().map(|(_, calls)| calls.len()).sum();
    assert_eq!(checked, calls + 7, "{stdout}");
}

/// The worker's session keyring, and the keys it holds, are not the
/// action's: searching the session keyring for the worker's key fails
/// (the filter denies `keyctl`; behind it the action holds a fresh
/// keyring of its own), and `/proc/keys` lists none of the worker's keys.
#[test]
fn an_action_cannot_read_the_workers_session_keyring() {
    use linux_keyutils::{KeyRing, KeyRingIdentifier};
    let f = Fixture::new();
    let session = KeyRing::from_special_id(KeyRingIdentifier::Session, true).unwrap();
    let description = format!("kiln-worker-secret-{}", f.marker);
    let key = session.add_key(&description, b"the worker's secret").unwrap();
    let script = format!(
        "import ctypes, sys\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         KEYCTL_SEARCH = 10\n\
         r = libc.syscall(ctypes.c_long({nr}), ctypes.c_long(KEYCTL_SEARCH), ctypes.c_long(-3), b'user', b'{description}', ctypes.c_long(0))\n\
         print('search', r, ctypes.get_errno())\n",
        nr = nix::libc::SYS_keyctl
    );
    std::fs::write(f.exec_root.join("keys.py"), script).unwrap();
    let spec = f.shell("python3 keys.py; cat /proc/keys");
    let (outcome, stdout, stderr) = f.run(&spec);
    let _ = key.invalidate();
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    // EPERM from the filter; ENOKEY (126) from the fresh keyring alone.
    let search = stdout.lines().next().unwrap_or_default();
    assert!(
        ["search -1 1", "search -1 126"].contains(&search),
        "the action found the worker's key: {stdout}"
    );
    let id = format!("{:08x} ", key.get_id().as_raw_id());
    assert!(!stdout.contains(&description), "the action sees the worker's key: {stdout}");
    assert!(!stdout.lines().any(|l| l.starts_with(&id)), "the action sees the worker's key: {stdout}");
}

/// A sandbox prepared ahead runs the action it was made for, refuses a run
/// it does not fit, and dropped unused leaves no cgroup behind.
#[test]
fn a_prepared_sandbox_runs_its_action_and_an_unused_one_leaves_nothing() {
    let f = Fixture::new();
    let spec = f.shell("cat input.txt; echo prepared");
    let ready = sandbox::prepare(&f.config, &spec).unwrap();
    assert!(f.config.cgroups.run_dirs(&spec.id).iter().all(|d| d.exists()), "its cgroups are made ahead");
    let outcome = sandbox::run_prepared(&f.config, ready, &spec).unwrap();
    f.assert_host_intact(&spec);
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(std::fs::read_to_string(&spec.stdout).unwrap(), format!("{CACHE_CONTENT}prepared\n"));

    let other = f.shell("true");
    let mut ready = sandbox::prepare(&f.config, &other).unwrap();
    assert!(ready.is_alive());
    let mismatched = sandbox::Spec { network: true, ..other.clone() };
    assert!(!ready.fits(&f.config, &mismatched));
    drop(ready);
    f.assert_host_intact(&other);
}
