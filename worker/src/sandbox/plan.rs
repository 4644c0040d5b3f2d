//! The worker's half of building a root: what goes where. Stage 1 opens
//! the sources in the sandbox's mount namespace (a bind's source must be
//! in the namespace it is bound in) before it gives up the worker's uid,
//! so the sandbox's unprivileged uid never has to look a host path up.

use std::path::{Component, Path};

use super::limits::SANDBOX_MOUNTS_MAX;
use super::protocol::{Mount, Source, SourcePath};
use super::spec::is_plain_absolute;
use super::{EXEC_ROOT, SandboxConfig, SandboxError};

/// Paths the sandbox builds itself; nothing from the host may take them.
const RESERVED: &[&str] = &["/kiln", "/proc", "/dev", "/tmp", "/sys"];

/// Device nodes bound from the host into the sandbox's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// Mounts and their sources (indexed by the mounts).
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub mounts: Vec<Mount>,
    pub sources: Vec<SourcePath>,
}

impl Plan {
    /// Adds a source; `follow`: a final symlink is followed (else opened
    /// itself, which a bind refuses).
    fn source(&mut self, path: &Path, follow: bool) -> usize {
        self.sources.push(SourcePath { path: path.to_owned(), follow });
        self.sources.len() - 1
    }

    /// A host path at `target` inside the sandbox, read-only; symlinks are
    /// recreated, missing paths skipped.
    fn host(&mut self, host: &Path, target: String) -> Result<(), SandboxError> {
        let meta = match host.symlink_metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(SandboxError::Setup(format!("cannot inspect {}: {e}", host.display()))),
        };
        let source = if meta.file_type().is_symlink() {
            let link = std::fs::read_link(host)
                .map_err(|e| SandboxError::Setup(format!("cannot read symlink {}: {e}", host.display())))?;
            let target = link.to_str().ok_or_else(|| {
                SandboxError::Invalid(format!(
                    "symlink {} points to a path that is not UTF-8",
                    host.display()
                ))
            })?;
            Source::Symlink { target: target.to_owned() }
        } else if meta.is_dir() || meta.is_file() {
            Source::ReadOnly { fd: self.source(host, false), dir: meta.is_dir() }
        } else {
            return Err(SandboxError::Invalid(format!(
                "{} is neither a directory, a file nor a symlink",
                host.display()
            )));
        };
        self.mounts.push(Mount { path: target, source });
        Ok(())
    }
}

/// The path's components joined with `/`, rooted: the one spelling of a
/// mount point.
fn spelled(path: &Path) -> Result<String, SandboxError> {
    let mut out = String::new();
    for c in path.components() {
        if let Component::Normal(name) = c {
            out.push('/');
            out.push_str(
                name.to_str()
                    .ok_or_else(|| SandboxError::Invalid(format!("path {} is not UTF-8", path.display())))?,
            );
        }
    }
    Ok(out)
}

fn is_reserved(path: &str) -> bool {
    RESERVED.iter().any(|r| path == *r || path.strip_prefix(r).is_some_and(|rest| rest.starts_with('/')))
}

/// What init mounts for one run.
pub(super) fn plan(config: &SandboxConfig, exec_root: &Path) -> Result<Plan, SandboxError> {
    let mut plan = Plan::default();
    match &config.root_fs {
        Some(root) => {
            let entries = std::fs::read_dir(root).map_err(|e| {
                SandboxError::Setup(format!("cannot read root file system {}: {e}", root.display()))
            })?;
            for entry in entries {
                let entry = entry.map_err(|e| {
                    SandboxError::Setup(format!("cannot read root file system {}: {e}", root.display()))
                })?;
                let name = entry.file_name();
                let target = spelled(Path::new("/").join(&name).as_path())?;
                if !is_reserved(&target) {
                    plan.host(&entry.path(), target)?;
                }
            }
        }
        None => {
            for dir in &config.host_dirs {
                if !is_plain_absolute(dir) {
                    return Err(SandboxError::Invalid(format!(
                        "host directory {} is not an absolute path without '.' and '..', or is /",
                        dir.display()
                    )));
                }
                let target = spelled(dir)?;
                if is_reserved(&target) {
                    return Err(SandboxError::Invalid(format!(
                        "host directory {target} would cover a path the sandbox makes itself ({})",
                        RESERVED.join(" ")
                    )));
                }
                plan.host(dir, target)?;
            }
        }
    }
    if !exec_root.is_dir() {
        return Err(SandboxError::Setup(format!("exec root {} is not a directory", exec_root.display())));
    }
    let fd = plan.source(exec_root, true);
    plan.mounts.push(Mount { path: EXEC_ROOT.to_owned(), source: Source::ReadWrite { fd } });
    for device in DEVICES {
        let host = Path::new("/dev").join(device);
        let fd = plan.source(&host, true);
        plan.mounts.push(Mount { path: format!("/dev/{device}"), source: Source::Device { fd } });
    }
    order(&mut plan.mounts)?;
    if plan.sources.len() > SANDBOX_MOUNTS_MAX {
        return Err(SandboxError::Invalid(format!(
            "the sandbox would get {} mounts; the most is {SANDBOX_MOUNTS_MAX}",
            plan.sources.len()
        )));
    }
    Ok(plan)
}

/// Binds parents before children, symlinks last; refuses duplicates and
/// anything below a symlink (which could lead outside the new root).
fn order(mounts: &mut [Mount]) -> Result<(), SandboxError> {
    mounts.sort_by(|a, b| {
        let link = |m: &Mount| matches!(m.source, Source::Symlink { .. });
        (link(a), a.path.split('/').count(), &a.path).cmp(&(link(b), b.path.split('/').count(), &b.path))
    });
    let below =
        |path: &str, parent: &str| path.strip_prefix(parent).is_some_and(|rest| rest.starts_with('/'));
    for (i, m) in mounts.iter().enumerate() {
        if mounts[i + 1..].iter().any(|other| other.path == m.path) {
            return Err(SandboxError::Invalid(format!("{} is mounted twice in the sandbox", m.path)));
        }
        if let Some(link) = mounts
            .iter()
            .find(|link| matches!(link.source, Source::Symlink { .. }) && below(&m.path, &link.path))
        {
            return Err(SandboxError::Invalid(format!("{} lies below symlink {}", m.path, link.path)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(path: &str) -> Mount {
        Mount { path: path.to_owned(), source: Source::ReadOnly { fd: 0, dir: true } }
    }

    fn link(path: &str) -> Mount {
        Mount { path: path.to_owned(), source: Source::Symlink { target: "usr/bin".to_owned() } }
    }

    #[test]
    fn parents_come_first_and_symlinks_last() {
        let mut mounts =
            vec![link("/bin"), bind("/etc/ld.so.conf.d"), bind("/usr"), bind("/etc/alternatives")];
        order(&mut mounts).unwrap();
        let paths: Vec<&str> = mounts.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, ["/usr", "/etc/alternatives", "/etc/ld.so.conf.d", "/bin"]);
    }

    #[test]
    fn nothing_below_a_symlink_and_nothing_twice() {
        assert!(order(&mut [link("/lib"), bind("/lib/x86_64")]).is_err());
        assert!(order(&mut [bind("/usr"), bind("/usr")]).is_err());
        order(&mut [link("/lib"), bind("/lib64")]).unwrap();
    }

    #[test]
    fn reserved_paths() {
        assert!(is_reserved("/proc"));
        assert!(is_reserved("/dev/null"));
        assert!(is_reserved("/kiln/exec"));
        assert!(!is_reserved("/devices"));
        assert!(!is_reserved("/usr"));
    }

    #[test]
    fn spelled_paths_are_normal() {
        assert_eq!(spelled(Path::new("/usr/./lib/")).unwrap(), "/usr/lib");
        assert_eq!(spelled(Path::new("/etc")).unwrap(), "/etc");
    }
}
