//! Disk is a resource like memory: each slot of a worker has a filesystem
//! of its own (an ext4 image on a loop device, sized by the configuration),
//! and an action writes only there.
//!
//! The exec root an action sees is an overlay: its lower layer is the
//! input tree the worker built of hard links to the file cache (which must
//! stay on the cache's filesystem, and is read-only to the action), its
//! upper layer a directory on the slot's filesystem. Everything the action
//! writes, its stdout and stderr included, lands on the slot's filesystem,
//! whose size and inode count the kernel enforces; when the action filled
//! it, the run ends with RESOURCE_EXHAUSTED. The images are sparse and
//! mounted with `discard`, so what an action deleted, or what the worker
//! removed after it, goes back to the host's disk.
//!
//! The overlay is mounted with its layers named through `/proc/self/fd`,
//! so the action's `/proc/self/mountinfo` shows no host path. The mounts
//! live in the worker's own mount namespace
//! ([`enter_private_mount_namespace`], called before any thread starts):
//! when the worker dies, the kernel unmounts them and frees the loop
//! devices.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

/// Whether this process runs in a mount namespace of its own.
static PRIVATE_MOUNTS: AtomicBool = AtomicBool::new(false);

/// Moves this process into a mount namespace of its own whose mounts the
/// host's still reach (slave propagation). Must run before the process
/// starts a thread: the kernel refuses to unshare a shared filesystem
/// context.
pub fn enter_private_mount_namespace() -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("cannot create a mount namespace: {e}"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SLAVE | MsFlags::MS_REC, None::<&str>)
        .map_err(|e| format!("cannot make the mounts of the worker's namespace its own: {e}"))?;
    PRIVATE_MOUNTS.store(true, Ordering::Relaxed);
    Ok(())
}

/// One action's share of the disk: bytes and inodes of its slot's
/// filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    pub bytes: u64,
    pub inodes: u64,
}

/// The slots' filesystems, mounted under one directory.
#[derive(Debug)]
pub struct SlotDisks {
    dir: PathBuf,
    limits: DiskLimits,
    slots: u32,
}

impl SlotDisks {
    /// Makes a fresh, empty filesystem for each of `slots` slots under
    /// `dir` (whatever an earlier worker left there is replaced) and
    /// mounts it. Needs root, `mkfs.ext4` and loop devices.
    pub fn prepare(dir: &Path, slots: u32, limits: DiskLimits) -> Result<SlotDisks, String> {
        if !PRIVATE_MOUNTS.load(Ordering::Relaxed) {
            return Err(
                "per-action disks need the worker in a mount namespace of its own, which it could not \
                        create (is it root?)"
                    .to_owned(),
            );
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let disks = SlotDisks { dir: dir.to_owned(), limits, slots };
        for slot in 0..slots {
            disks.make(slot)?;
        }
        Ok(disks)
    }

    pub fn limits(&self) -> DiskLimits {
        self.limits
    }

    fn mount_point(&self, slot: u32) -> PathBuf {
        self.dir.join(format!("slot-{slot}"))
    }

    fn make(&self, slot: u32) -> Result<(), String> {
        let image = self.dir.join(format!("slot-{slot}.img"));
        let target = self.mount_point(slot);
        // A mount of this namespace's own (a worker restarted in place);
        // an earlier process's died with its namespace.
        let _ = umount2(&target, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&image);
        let file = File::create(&image).map_err(|e| format!("cannot create {}: {e}", image.display()))?;
        file.set_len(self.limits.bytes).map_err(|e| format!("cannot size {}: {e}", image.display()))?;
        drop(file);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-N"])
            .arg(self.limits.inodes.to_string())
            .args(["-E", "lazy_itable_init=1,nodiscard,root_owner=0:0"])
            .arg(&image))?;
        std::fs::create_dir_all(&target).map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,discard,nosuid,nodev,noatime"])
            .arg(&image)
            .arg(&target))
    }

    /// Mounts the exec root of run `run` on `slot` at `merged`: the inputs
    /// at `lower`, what the action writes on the slot's filesystem.
    pub fn mount(&self, slot: u32, run: &str, lower: &Path, merged: &Path) -> Result<RunDisk, String> {
        if slot >= self.slots {
            return Err(format!("slot {slot} has no disk ({} slots)", self.slots));
        }
        let slot_root = self.mount_point(slot);
        clear_leftovers(&slot_root)?;
        let scratch = slot_root.join(run);
        let (upper, work) = (scratch.join("upper"), scratch.join("work"));
        for d in [upper.as_path(), work.as_path(), merged] {
            std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        let open = |p: &Path| File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()));
        let (l, u, w) = (open(lower)?, open(&upper)?, open(&work)?);
        // The overlay's root takes its owner and mode from the upper layer.
        let meta = l.metadata().map_err(|e| format!("cannot stat {}: {e}", lower.display()))?;
        std::os::unix::fs::fchown(&u, Some(meta.uid()), Some(meta.gid()))
            .and_then(|()| u.set_permissions(meta.permissions()))
            .map_err(|e| format!("cannot give {} the exec root's owner: {e}", upper.display()))?;
        let options = format!(
            "lowerdir=/proc/self/fd/{},upperdir=/proc/self/fd/{},workdir=/proc/self/fd/{}",
            l.as_raw_fd(),
            u.as_raw_fd(),
            w.as_raw_fd()
        );
        mount(
            Some("overlay"),
            merged,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| format!("cannot mount the exec root's overlay on {}: {e}", merged.display()))?;
        Ok(RunDisk { merged: merged.to_owned(), scratch, slot_root, limits: self.limits, mounted: true })
    }
}

/// Removes what an earlier run on this slot left (one that was abandoned
/// before it could clear its disk): each run starts with the whole disk.
fn clear_leftovers(slot_root: &Path) -> Result<(), String> {
    let entries =
        std::fs::read_dir(slot_root).map_err(|e| format!("cannot read {}: {e}", slot_root.display()))?;
    for entry in entries.flatten() {
        if entry.file_name() != "lost+found" {
            crate::remove::remove_tree(&entry.path())
                .map_err(|e| format!("cannot clear {}: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

impl Drop for SlotDisks {
    fn drop(&mut self) {
        for slot in 0..self.slots {
            let _ = umount2(&self.mount_point(slot), MntFlags::MNT_DETACH);
        }
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let output = command.output().map_err(|e| format!("cannot run {shown}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!(
        "{shown} failed ({}): {}",
        output.status,
        stderr.trim().chars().take(500).collect::<String>()
    ))
}

/// One run's exec root mount and scratch space: [`RunDisk::clear`]
/// unmounts and empties it; dropped, it is unmounted, and the next run on
/// the slot empties it.
#[derive(Debug)]
pub struct RunDisk {
    merged: PathBuf,
    scratch: PathBuf,
    slot_root: PathBuf,
    limits: DiskLimits,
    mounted: bool,
}

/// Free space below which a slot's filesystem counts as filled.
const FULL_BELOW_BYTES: u64 = 1 << 20;
const FULL_BELOW_INODES: u64 = 16;

impl RunDisk {
    /// Where the run's log `name` (stdout, stderr) is written: on the
    /// slot's filesystem, within its bounds.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.scratch.join(name)
    }

    /// Why the action's disk counts as filled, if it does.
    pub fn exhausted(&self) -> Option<String> {
        let stat = nix::sys::statvfs::statvfs(&self.slot_root).ok()?;
        let free_bytes = stat.blocks_available().saturating_mul(stat.fragment_size());
        let free_inodes = stat.files_available();
        (free_bytes < FULL_BELOW_BYTES || free_inodes < FULL_BELOW_INODES).then(|| {
            format!(
                "the action filled its disk ({} bytes and {} files and directories, [execution.worker] disk_bytes \
                 and disk_inodes): it wrote more than this worker gives one action",
                self.limits.bytes, self.limits.inodes
            )
        })
    }
}

impl RunDisk {
    /// Unmounts the exec root and empties the slot's disk for the next
    /// run; what an abandoned run skips, the next run on the slot does.
    pub async fn clear(mut self) {
        self.unmount();
        let scratch = self.scratch.clone();
        let removed = tokio::task::spawn_blocking(move || crate::remove::remove_tree(&scratch)).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(dir = %self.scratch.display(), error = %e, "could not clear a slot's disk");
        }
    }

    fn unmount(&mut self) {
        if std::mem::take(&mut self.mounted)
            && let Err(e) = umount2(&self.merged, MntFlags::MNT_DETACH)
        {
            tracing::warn!(dir = %self.merged.display(), error = %e, "could not unmount an exec root");
        }
    }
}

impl Drop for RunDisk {
    fn drop(&mut self) {
        self.unmount();
    }
}
