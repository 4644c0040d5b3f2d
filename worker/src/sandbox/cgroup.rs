//! The cgroups a run is placed in: found once ([`Cgroups::detect`]), then
//! one directory per run and hierarchy ([`RunCgroup`]).
//!
//! cgroup2 serves every controller enabled for the worker's cgroup; cgroup
//! v1 hierarchies serve the rest (hybrid hosts). Where cgroup2 is mounted,
//! each run also gets a directory there, for `cgroup.kill`. Runs live in a
//! `kiln` directory below the worker's own cgroup in each hierarchy, so the
//! worker's own limits cover its actions; no cgroup that holds processes
//! is ever given controllers for its children (cgroup2's no-internal-
//! processes rule): on a pure cgroup2 host whose worker does not run in the
//! root cgroup, give [`Cgroups::detect_under`] a delegated, empty cgroup.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::SandboxError;
use super::limits::{CPU_PERIOD_US, SANDBOX_PROCESSES};

/// The directory, in each hierarchy, that holds the runs' cgroups.
const RUNS_DIR: &str = "kiln";

/// A resource controller the sandbox limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// `memory`: [`super::Spec::memory_bytes`], and OOM kills.
    Memory,
    /// `pids`: [`super::Spec::pids_max`].
    Pids,
    /// `cpu`: [`super::Spec::cpu_millicores`].
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The cgroup hierarchies runs are placed in.
#[derive(Debug, Clone, Default)]
pub struct Cgroups {
    unified: Option<Unified>,
    /// For each controller cgroup2 does not serve: the v1 directory runs
    /// are created in.
    v1: Vec<(Controller, PathBuf)>,
}

#[derive(Debug, Clone)]
struct Unified {
    /// Runs are created in here.
    base: PathBuf,
    /// Controllers enabled for the runs.
    controllers: Vec<Controller>,
    /// `cgroup.kill` exists (Linux 5.14).
    kill: bool,
}

impl Cgroups {
    /// Finds this process's cgroups from `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`, and enables cgroup2 controllers for the runs
    /// where its own cgroup allows.
    pub fn detect() -> Result<Self, SandboxError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|e| SandboxError::Setup(format!("cannot read {path}: {e}")))
        };
        let found = locate(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?);
        let unified = match &found.unified {
            Some(own) => Some(Unified::prepare(own, own.join(RUNS_DIR))?),
            None => None,
        };
        Ok(Self::assemble(unified, &found.v1))
    }

    /// Like [`Self::detect`], but runs are created in `delegated`, a cgroup2
    /// directory that holds no processes and whose parent enables the
    /// controllers for it (a systemd `Delegate=yes` unit's sub-cgroup).
    pub fn detect_under(delegated: &Path) -> Result<Self, SandboxError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|e| SandboxError::Setup(format!("cannot read {path}: {e}")))
        };
        let found = locate(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?);
        let unified = Unified::prepare(delegated, delegated.to_owned())?;
        Ok(Self::assemble(Some(unified), &found.v1))
    }

    fn assemble(unified: Option<Unified>, v1: &[(Controller, PathBuf)]) -> Self {
        let served = unified.as_ref().map(|u| u.controllers.clone()).unwrap_or_default();
        let v1 =
            v1.iter().filter(|(c, _)| !served.contains(c)).map(|(c, own)| (*c, own.join(RUNS_DIR))).collect();
        Self { unified, v1 }
    }

    /// Controllers no hierarchy serves.
    pub fn missing(&self) -> Vec<Controller> {
        Controller::ALL.into_iter().filter(|c| self.hierarchy(*c).is_none()).collect()
    }

    fn hierarchy(&self, controller: Controller) -> Option<(&Path, bool)> {
        if let Some(u) = &self.unified
            && u.controllers.contains(&controller)
        {
            return Some((&u.base, true));
        }
        self.v1.iter().find(|(c, _)| *c == controller).map(|(_, dir)| (dir.as_path(), false))
    }

    /// The directories a run with this id gets (they exist only while it
    /// runs).
    pub fn run_dirs(&self, id: &str) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.unified.iter().map(|u| u.base.join(id)).collect();
        for (_, base) in &self.v1 {
            let dir = base.join(id);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs
    }

    /// Kills every process of the run `id` from outside it (its thread may
    /// still be setting it up or waiting): `cgroup.kill` where there is
    /// one, else SIGKILL to each pid listed.
    pub fn kill_run(&self, id: &str) {
        for dir in self.run_dirs(id) {
            let kill_file = dir.join("cgroup.kill");
            if kill_file.exists() && std::fs::write(&kill_file, "1").is_ok() {
                continue;
            }
            let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else { continue };
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// One line for logs: which hierarchy serves what.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(u) = &self.unified {
            let names: Vec<&str> = u.controllers.iter().map(|c| c.name()).collect();
            parts.push(format!(
                "cgroup2 {} [{}{}]",
                u.base.display(),
                names.join(" "),
                if u.kill { " +kill" } else { "" }
            ));
        }
        for (c, dir) in &self.v1 {
            parts.push(format!("v1 {c} {}", dir.display()));
        }
        if parts.is_empty() { "no cgroups".to_owned() } else { parts.join(", ") }
    }
}

impl Cgroups {
    /// The directories run cgroups are created in, one per hierarchy.
    pub fn bases(&self) -> Vec<PathBuf> {
        let mut bases: Vec<PathBuf> = self.unified.iter().map(|u| u.base.clone()).collect();
        bases.extend(self.v1.iter().map(|(_, b)| b.clone()));
        bases
    }

    /// Kills whatever is left in the run cgroups whose names start with
    /// `prefix`, and removes them: what a worker that died (SIGKILL, a
    /// crash, a power cut) left behind. Returns how many runs it swept.
    pub fn sweep(&self, prefix: &str, timeout: Duration) -> Result<usize, SandboxError> {
        assert!(!prefix.is_empty(), "an empty prefix would sweep other workers' runs");
        let bases = self.bases();
        let mut names = std::collections::BTreeSet::new();
        for base in &bases {
            for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) && entry.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(name);
                }
            }
        }
        for name in &names {
            let dirs = bases
                .iter()
                .map(|b| b.join(name))
                .filter(|p| p.is_dir())
                .map(|path| RunDir { path, present: true })
                .collect();
            let kill_file =
                self.unified.as_ref().filter(|u| u.kill).map(|u| u.base.join(name).join("cgroup.kill"));
            let mut run = RunCgroup { dirs, kill_file, memory: None, bases: bases.clone(), removed: false };
            run.remove(timeout)?;
        }
        Ok(names.len())
    }
}

impl Unified {
    /// Enables what it can of memory, pids and cpu for `base`'s children:
    /// in `parent`'s `subtree_control` (refused while `parent` holds
    /// processes, unless it is the root) and in `base`'s.
    fn prepare(parent: &Path, base: PathBuf) -> Result<Self, SandboxError> {
        let available = read_words(&parent.join("cgroup.controllers"));
        let mut controllers = Vec::new();
        for c in Controller::ALL {
            if available.iter().any(|w| w == c.name()) && enable(parent, c) {
                controllers.push(c);
            }
        }
        let kill = parent.join("cgroup.kill").exists();
        let unified = Self { base, controllers, kill };
        unified.ensure_base().map_err(|e| {
            SandboxError::Setup(format!("cannot create cgroup {}: {e}", unified.base.display()))
        })?;
        Ok(unified)
    }

    /// Creates `base` (again, after a run removed it) and enables the
    /// controllers for its children.
    fn ensure_base(&self) -> io::Result<()> {
        create_dir(&self.base)?;
        for c in &self.controllers {
            if !enable(&self.base, *c) {
                return Err(io::Error::other(format!(
                    "cannot enable {c} in {}/cgroup.subtree_control",
                    self.base.display()
                )));
            }
        }
        Ok(())
    }
}

fn create_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

fn enable(dir: &Path, c: Controller) -> bool {
    let file = dir.join("cgroup.subtree_control");
    read_words(&file).iter().any(|w| w == c.name()) || std::fs::write(&file, format!("+{c}")).is_ok()
}

fn read_words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().split_whitespace().map(str::to_owned).collect()
}

/// This process's own cgroup directories, from mountinfo and
/// `/proc/self/cgroup`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Located {
    unified: Option<PathBuf>,
    v1: Vec<(Controller, PathBuf)>,
}

fn locate(mountinfo: &str, proc_cgroup: &str) -> Located {
    let mounts = parse_mountinfo(mountinfo);
    let own = parse_proc_cgroup(proc_cgroup);
    let mut found = Located::default();
    if let Some((_, _, path)) = own.iter().find(|(id, controllers, _)| *id == 0 && controllers.is_empty())
        && let Some(dir) = mounts.iter().filter(|m| m.v2).find_map(|m| m.dir_of(path))
    {
        found.unified = Some(dir);
    }
    for c in Controller::ALL {
        let Some((_, _, path)) =
            own.iter().find(|(_, controllers, _)| controllers.iter().any(|n| n == c.name()))
        else {
            continue;
        };
        let dir = mounts
            .iter()
            .filter(|m| !m.v2 && m.super_options.iter().any(|o| o == c.name()))
            .find_map(|m| m.dir_of(path));
        if let Some(dir) = dir {
            found.v1.push((c, dir));
        }
    }
    found
}

#[derive(Debug, PartialEq, Eq)]
struct CgroupMount {
    root: String,
    mount_point: PathBuf,
    v2: bool,
    super_options: Vec<String>,
}

impl CgroupMount {
    /// Where `cgroup` (a path from `/proc/self/cgroup`) is under this mount.
    fn dir_of(&self, cgroup: &str) -> Option<PathBuf> {
        let rest = if self.root == "/" { cgroup } else { cgroup.strip_prefix(self.root.as_str())? };
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        let rest = rest.trim_start_matches('/');
        Some(if rest.is_empty() { self.mount_point.clone() } else { self.mount_point.join(rest) })
    }
}

/// The cgroup and cgroup2 mounts in a `/proc/<pid>/mountinfo`.
fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        if dash < 6 || fields.len() < dash + 4 {
            continue;
        }
        let v2 = match fields[dash + 1] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        mounts.push(CgroupMount {
            root: unescape(fields[3]),
            mount_point: PathBuf::from(unescape(fields[4])),
            v2,
            super_options: fields[dash + 3].split(',').map(str::to_owned).collect(),
        });
    }
    mounts
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
pub(super) fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|o| o.iter().all(|b| (b'0'..=b'7').contains(b)));
        if bytes[i] == b'\\'
            && let Some(code) = octal.and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/proc/<pid>/cgroup`: hierarchy id, controllers, path.
fn parse_proc_cgroup(text: &str) -> Vec<(u32, Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let id = parts.next()?.parse().ok()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers =
                controllers.split(',').filter(|c| !c.is_empty()).map(|c| c.to_owned()).collect();
            Some((id, controllers, path.to_owned()))
        })
        .collect()
}

/// The limits a run's cgroups enforce.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids_max: Option<u64>,
    pub cpu_millicores: Option<u64>,
}

/// One run's cgroup directories; [`Self::remove`] kills what is left in
/// them and removes them.
#[derive(Debug)]
pub(super) struct RunCgroup {
    dirs: Vec<RunDir>,
    kill_file: Option<PathBuf>,
    /// The memory controller's directory, and whether it is cgroup2.
    memory: Option<(PathBuf, bool)>,
    bases: Vec<PathBuf>,
    removed: bool,
}

#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    present: bool,
}

impl RunCgroup {
    /// Creates the run's directories and writes its limits.
    pub fn create(cgroups: &Cgroups, id: &str, limits: Limits) -> Result<Self, SandboxError> {
        let asked = [
            (Controller::Memory, limits.memory_bytes.is_some()),
            (Controller::Pids, limits.pids_max.is_some()),
            (Controller::Cpu, limits.cpu_millicores.is_some()),
        ];
        for (c, wanted) in asked {
            if wanted && cgroups.hierarchy(c).is_none() {
                return Err(SandboxError::Setup(format!(
                    "the action has a {c} limit, but no cgroup hierarchy serves the {c} controller here ({})",
                    cgroups.describe()
                )));
            }
        }
        let mut run =
            Self { dirs: Vec::new(), kill_file: None, memory: None, bases: Vec::new(), removed: false };
        if let Some(u) = &cgroups.unified {
            let dir = run.make(&u.base, id, Some(u))?;
            if u.kill {
                run.kill_file = Some(dir.join("cgroup.kill"));
            }
            for c in &u.controllers {
                run.limit(*c, &dir, true, limits)?;
            }
        }
        for (c, base) in &cgroups.v1 {
            let dir = run.make(base, id, None)?;
            run.limit(*c, &dir, false, limits)?;
        }
        Ok(run)
    }

    /// Creates `base/id`, creating `base` again if a finished run removed
    /// it meanwhile.
    fn make(&mut self, base: &Path, id: &str, unified: Option<&Unified>) -> Result<PathBuf, SandboxError> {
        let dir = base.join(id);
        let fail = |e: io::Error| SandboxError::Setup(format!("cannot create cgroup {}: {e}", dir.display()));
        for _ in 0..8 {
            match unified {
                Some(u) => u.ensure_base().map_err(fail)?,
                None => create_dir(base).map_err(fail)?,
            }
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(SandboxError::Invalid(format!(
                        "cgroup {} already exists: sandbox ids must be unique",
                        dir.display()
                    )));
                }
                Err(e) => return Err(fail(e)),
            }
            self.dirs.push(RunDir { path: dir.clone(), present: true });
            if !self.bases.iter().any(|b| b == base) {
                self.bases.push(base.to_owned());
            }
            // A base removed and made again between the two steps above
            // may lack the controllers: then start over.
            if let Some(u) = unified
                && u.controllers
                    .iter()
                    .any(|c| !read_words(&dir.join("cgroup.controllers")).contains(&c.to_string()))
            {
                let _ = std::fs::remove_dir(&dir);
                self.dirs.pop();
                continue;
            }
            return Ok(dir);
        }
        Err(SandboxError::Setup(format!(
            "cannot create cgroup {}: its parent keeps vanishing",
            dir.display()
        )))
    }

    fn limit(&mut self, c: Controller, dir: &Path, v2: bool, limits: Limits) -> Result<(), SandboxError> {
        let write = |file: &str, value: String| {
            let path = dir.join(file);
            std::fs::write(&path, &value).map_err(|e| {
                SandboxError::Setup(format!("cannot write {value:?} to {}: {e}", path.display()))
            })
        };
        match c {
            Controller::Memory => {
                self.memory = Some((dir.to_owned(), v2));
                if let Some(bytes) = limits.memory_bytes {
                    if v2 {
                        write("memory.max", bytes.to_string())?;
                        if dir.join("memory.swap.max").exists() {
                            write("memory.swap.max", "0".to_owned())?;
                        }
                    } else {
                        write("memory.limit_in_bytes", bytes.to_string())?;
                        if dir.join("memory.memsw.limit_in_bytes").exists() {
                            write("memory.memsw.limit_in_bytes", bytes.to_string())?;
                        }
                    }
                }
            }
            Controller::Pids => {
                if let Some(n) = limits.pids_max {
                    write("pids.max", n.saturating_add(SANDBOX_PROCESSES).to_string())?;
                }
            }
            Controller::Cpu => {
                if let Some(millicores) = limits.cpu_millicores {
                    let quota = millicores.saturating_mul(CPU_PERIOD_US) / 1000;
                    if v2 {
                        write("cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
                    } else {
                        write("cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                        write("cpu.cfs_quota_us", quota.to_string())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` (stage 1, before it starts anything) into every
    /// directory of the run.
    pub fn attach(&self, pid: u32) -> Result<(), SandboxError> {
        for dir in &self.dirs {
            let procs = dir.path.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string()).map_err(|e| {
                SandboxError::Setup(format!("cannot move the sandbox into {}: {e}", procs.display()))
            })?;
        }
        Ok(())
    }

    /// Whether the kernel OOM-killed a process of the run.
    pub fn oom_killed(&self) -> bool {
        let Some((dir, v2)) = &self.memory else { return false };
        let file = if *v2 { "memory.events" } else { "memory.oom_control" };
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        text.lines().any(|line| {
            let mut words = line.split_whitespace();
            words.next() == Some("oom_kill")
                && words.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) > 0
        })
    }

    /// The pids in the run's cgroups (host pid namespace).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in self.dirs.iter().filter(|d| d.present) {
            let text = std::fs::read_to_string(dir.path.join("cgroup.procs")).unwrap_or_default();
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Kills every process of the run: `cgroup.kill` where there is one,
    /// else SIGKILL to each pid listed in the cgroups.
    pub fn kill_all(&self) {
        if let Some(file) = &self.kill_file
            && std::fs::write(file, "1").is_ok()
        {
            return;
        }
        // A pid read here could exit and be reused before the kill; this is
        // the last resort of hosts without cgroup2, after stage 1's death
        // (and with it, through its parent-death signal, init's) took the
        // pid namespace down.
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// Kills what is left and removes the run's directories (and the
    /// `kiln` directories above them once empty), polling until
    /// `timeout`.
    pub fn remove(&mut self, timeout: Duration) -> Result<(), SandboxError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(50);
        loop {
            if !self.pids().is_empty() {
                self.kill_all();
            }
            for dir in self.dirs.iter_mut().filter(|d| d.present) {
                match std::fs::remove_dir(&dir.path) {
                    Ok(()) => dir.present = false,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => dir.present = false,
                    Err(_) => {}
                }
            }
            if self.dirs.iter().all(|d| !d.present) {
                self.removed = true;
                // Fails while other runs use them, as it should.
                for base in &self.bases {
                    let _ = std::fs::remove_dir(base);
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                let left: Vec<String> =
                    self.dirs.iter().filter(|d| d.present).map(|d| d.path.display().to_string()).collect();
                return Err(SandboxError::Cleanup(format!(
                    "cgroups {} still hold processes {:?} {} s after the sandbox was killed",
                    left.join(", "),
                    self.pids(),
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.remove(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
23 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/a
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:5 - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
8:pids:/
4:memory:/process_api/635c
1:cpu:/
0::/
";

    #[test]
    fn hybrid_hosts_use_v1_controllers_and_the_unified_hierarchy() {
        let found = locate(HYBRID_MOUNTINFO, HYBRID_CGROUP);
        assert_eq!(found.unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            found.v1,
            vec![
                (Controller::Memory, PathBuf::from("/sys/fs/cgroup/memory/process_api/635c")),
                (Controller::Pids, PathBuf::from("/sys/fs/cgroup/pids")),
                (Controller::Cpu, PathBuf::from("/sys/fs/cgroup/cpu")),
            ]
        );
        let cgroups = Cgroups::assemble(
            Some(Unified {
                base: PathBuf::from("/sys/fs/cgroup/unified/kiln"),
                controllers: vec![],
                kill: true,
            }),
            &found.v1,
        );
        assert!(cgroups.missing().is_empty());
        assert_eq!(
            cgroups.run_dirs("r1"),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified/kiln/r1"),
                PathBuf::from("/sys/fs/cgroup/memory/process_api/635c/kiln/r1"),
                PathBuf::from("/sys/fs/cgroup/pids/kiln/r1"),
                PathBuf::from("/sys/fs/cgroup/cpu/kiln/r1"),
            ]
        );
    }

    #[test]
    fn pure_v2_hosts_serve_every_controller_from_cgroup2() {
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let found = locate(mountinfo, "0::/system.slice/kiln.service\n");
        assert_eq!(found.unified, Some(PathBuf::from("/sys/fs/cgroup/system.slice/kiln.service")));
        assert!(found.v1.is_empty());
        let served =
            Unified { base: PathBuf::from("/x/kiln"), controllers: Controller::ALL.to_vec(), kill: true };
        let cgroups = Cgroups::assemble(Some(served), &found.v1);
        assert!(cgroups.missing().is_empty());
        assert_eq!(cgroups.run_dirs("a"), vec![PathBuf::from("/x/kiln/a")]);
        let bare = Cgroups::assemble(None, &[]);
        assert_eq!(bare.missing(), Controller::ALL.to_vec());
    }

    #[test]
    fn mounts_of_a_subtree_map_paths_below_their_root() {
        let mountinfo = "40 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n";
        let found = locate(mountinfo, "4:memory:/docker/abc/inner\n");
        assert_eq!(found.v1, vec![(Controller::Memory, PathBuf::from("/sys/fs/cgroup/memory/inner"))]);
        // A cgroup outside the mounted subtree is not reachable through it.
        assert!(locate(mountinfo, "4:memory:/other\n").v1.is_empty());
        assert!(locate(mountinfo, "4:memory:/docker/abcdef\n").v1.is_empty());
    }

    #[test]
    fn mountinfo_escapes_and_optional_fields() {
        let line = "41 31 0:38 / /sys/fs/cgroup/with\\040space rw shared:1 master:2 - cgroup2 none rw\n";
        let mounts = parse_mountinfo(line);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/sys/fs/cgroup/with space"));
        assert!(mounts[0].v2);
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("trailing\\"), "trailing\\");
        assert!(parse_mountinfo("garbage\n1 2 3\n").is_empty());
    }

    #[test]
    fn proc_cgroup_lines() {
        let parsed = parse_proc_cgroup("12:cpu,cpuacct:/a\n0::/b:c\nbad\n");
        assert_eq!(
            parsed,
            vec![
                (12, vec!["cpu".to_owned(), "cpuacct".to_owned()], "/a".to_owned()),
                (0, vec![], "/b:c".to_owned()),
            ]
        );
    }
}
