//! A worker that died leaves its runs' cgroups (and perhaps processes in
//! them) behind; the next worker on the same build directory sweeps them,
//! and only them. Needs root (it creates cgroups).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_worker::runner::run_prefix;
use kiln_worker::sandbox::Cgroups;

/// Creates the run cgroup `name` in every hierarchy, holding `pid`.
fn leftover(bases: &[PathBuf], name: &str, pid: Option<u32>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for base in bases {
        std::fs::create_dir_all(base).unwrap();
        let dir = base.join(name);
        std::fs::create_dir(&dir).unwrap();
        if let Some(pid) = pid {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        }
        dirs.push(dir);
    }
    dirs
}

#[test]
fn a_restarted_worker_kills_and_removes_only_its_own_leftover_runs() {
    assert!(nix::unistd::geteuid().is_root(), "creating cgroups needs root");
    let cgroups = Cgroups::detect().expect("cgroups");
    let bases = cgroups.bases();
    assert!(!bases.is_empty(), "no cgroup hierarchy found: {cgroups:?}");

    let ours = run_prefix(&std::env::temp_dir().join(format!("build-{}", std::process::id())));
    let theirs = run_prefix(&std::env::temp_dir().join(format!("other-{}", std::process::id())));
    let mut orphan = Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().unwrap();
    let mut neighbour = Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().unwrap();
    let our_dirs = leftover(&bases, &format!("{ours}op1-abc"), Some(orphan.id()));
    let empty_dirs = leftover(&bases, &format!("{ours}op2-def"), None);
    let their_dirs = leftover(&bases, &format!("{theirs}op3-123"), Some(neighbour.id()));

    let swept = cgroups.sweep(&ours, Duration::from_secs(10)).expect("sweep");
    assert_eq!(swept, 2, "both of our leftover runs, and nothing else");
    let status = orphan.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the process left in our run was killed"
    );
    for dir in our_dirs.iter().chain(&empty_dirs) {
        assert!(!dir.exists(), "{} was removed", dir.display());
    }
    for dir in &their_dirs {
        assert!(dir.exists(), "another worker's run {} was left alone", dir.display());
    }
    assert!(neighbour.try_wait().unwrap().is_none(), "another worker's process still runs");

    // The other worker's own sweep, at its restart.
    assert_eq!(cgroups.sweep(&theirs, Duration::from_secs(10)).unwrap(), 1);
    assert!(neighbour.wait().is_ok());
    assert!(their_dirs.iter().all(|d| !d.exists()));
}
