//! Init's half of building a root: mounts in the sandbox's own mount
//! namespace, then `pivot_root` into it.
//!
//! The new root is assembled on a tmpfs over [`STAGING`] (in the sandbox's
//! mount namespace only; sources come as descriptors, so hiding the host's
//! `/tmp` hides nothing the sandbox needs), then made read-only.

use std::os::fd::RawFd;
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{chdir, pivot_root};

use super::cgroup::unescape;
use super::protocol::{InitSpec, Source};

/// Where the new root is assembled.
const STAGING: &str = "/tmp";

/// Size of the root tmpfs, which holds only mount points and symlinks.
const ROOT_TMPFS: &str = "mode=0755,size=1m,nr_inodes=4096";

/// Size of `/dev`'s tmpfs, which holds only device mount points and
/// symlinks.
const DEV_TMPFS: &str = "mode=0755,size=64k,nr_inodes=256";

const NONE: Option<&str> = None;

fn staged(path: &str) -> PathBuf {
    Path::new(STAGING).join(path.trim_start_matches('/'))
}

fn fd_path(fds: &[RawFd], index: usize) -> Result<String, String> {
    let fd =
        fds.get(index).ok_or_else(|| format!("the spec names source {index}, which stage 1 did not open"))?;
    Ok(format!("/proc/self/fd/{fd}"))
}

fn mount_tmpfs(target: &Path, flags: MsFlags, options: &str) -> Result<(), String> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(options))
        .map_err(|e| format!("cannot mount a tmpfs on {}: {e}", target.display()))
}

fn bind(source: &str, target: &Path) -> Result<(), String> {
    mount(Some(source), target, NONE, MsFlags::MS_BIND | MsFlags::MS_REC, NONE)
        .map_err(|e| format!("cannot bind {source} on {}: {e}", target.display()))
}

/// Remounts the bind at `target` with `extra` flags, keeping the flags
/// the kernel locks on mounts from the host (a user namespace may not
/// clear them).
fn remount(target: &Path, extra: MsFlags) -> Result<(), String> {
    let current = statvfs(target).map_err(|e| format!("cannot statvfs {}: {e}", target.display()))?.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra;
    for (has, keep) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(has) {
            flags |= keep;
        }
    }
    mount(NONE, target, NONE, flags, NONE).map_err(|e| format!("cannot remount {}: {e}", target.display()))
}

fn make_dir(path: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| format!("cannot create mount point {}: {e}", path.display()))
}

fn make_file(path: &Path) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        make_dir(parent)?;
    }
    if path.symlink_metadata().is_ok() {
        return Ok(());
    }
    std::fs::File::create(path)
        .map(drop)
        .map_err(|e| format!("cannot create mount point {}: {e}", path.display()))
}

/// Every mount at or below one of `targets` (submounts of recursive binds
/// included), from `/proc/self/mountinfo`.
fn mounts_below(targets: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mut found = Vec::new();
    for line in text.lines() {
        let Some(point) = line.split(' ').nth(4) else { continue };
        let point = PathBuf::from(unescape(point));
        if targets.iter().any(|t| point.starts_with(t)) && !found.contains(&point) {
            found.push(point);
        }
    }
    Ok(found)
}

/// Builds the new root under [`STAGING`]; init's mount namespace must be
/// its own (stage 1 unshared it).
pub(super) fn build(spec: &InitSpec, fds: &[RawFd]) -> Result<(), String> {
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)
        .map_err(|e| format!("cannot make the sandbox's mounts private: {e}"))?;
    let root = Path::new(STAGING);
    mount_tmpfs(root, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, ROOT_TMPFS)?;

    let tmpfs_options = |mode: &str| format!("mode={mode},size={}", spec.tmpfs_size_bytes);
    let dev = staged("/dev");
    make_dir(&dev)?;
    mount_tmpfs(&dev, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, DEV_TMPFS)?;
    let tmp = staged("/tmp");
    make_dir(&tmp)?;
    mount_tmpfs(&tmp, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, &tmpfs_options("1777"))?;
    make_dir(&staged("/proc"))?;

    let mut read_only = Vec::new();
    for m in &spec.mounts {
        let target = staged(&m.path);
        match &m.source {
            Source::ReadOnly { fd, dir } => {
                if *dir {
                    make_dir(&target)?
                } else {
                    make_file(&target)?
                }
                bind(&fd_path(fds, *fd)?, &target)?;
                read_only.push(target);
            }
            Source::ReadWrite { fd } => {
                make_dir(&target)?;
                bind(&fd_path(fds, *fd)?, &target)?;
                remount(&target, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
            }
            Source::Device { fd } => {
                make_file(&target)?;
                mount(Some(fd_path(fds, *fd)?.as_str()), &target, NONE, MsFlags::MS_BIND, NONE)
                    .map_err(|e| format!("cannot bind device {}: {e}", m.path))?;
                remount(&target, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
            }
            Source::Symlink { target: to } => {
                if let Some(parent) = target.parent() {
                    make_dir(parent)?;
                }
                symlink(to, &target).map_err(|e| format!("cannot create symlink {}: {e}", m.path))?;
            }
        }
    }
    for point in mounts_below(&read_only)? {
        remount(&point, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
    }

    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, dev.join(name)).map_err(|e| format!("cannot create /dev/{name}: {e}"))?;
    }
    let shm = dev.join("shm");
    make_dir(&shm)?;
    mount_tmpfs(&shm, MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, &tmpfs_options("1777"))?;
    remount(&dev, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;

    let proc = staged("/proc");
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        NONE,
    )
    .map_err(|e| {
        format!(
            "cannot mount a fresh /proc for the sandbox's pid namespace: {e} (a host that masks \
             /proc, such as a container, must let the worker mount proc; the host's /proc is never bound)"
        )
    })?;
    remount(root, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV)
}

/// Makes the new root the process's root and drops the host's.
pub(super) fn enter() -> Result<(), String> {
    chdir(STAGING).map_err(|e| format!("cannot enter the new root: {e}"))?;
    pivot_root(".", ".").map_err(|e| format!("pivot_root into the new root failed: {e}"))?;
    // The old root is now stacked on "."; detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("cannot detach the host's root: {e}"))?;
    chdir("/").map_err(|e| format!("cannot enter the new root: {e}"))
}
