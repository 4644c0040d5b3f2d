//! Real filesystems and block devices for the storage tests: a tmpfs of a
//! given size and a loop device over a file, each undone when dropped.
//! Both need root; where the machine refuses, the helpers say so and the
//! test returns early.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as mount(8) takes it: "2g", "40m");
    /// `None`, after saying why, where the machine does not allow it.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "kiln-test"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            println!("cannot mount a tmpfs here; this test needs root");
            return None;
        }
        Some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A loop device over a file, detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    pub device: String,
    pub backing: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing`; `None`, after saying why, where the machine has
    /// no loop devices for us.
    pub fn attach(backing: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(backing).output();
        match out {
            Ok(o) if o.status.success() => Some(LoopDevice {
                device: String::from_utf8_lossy(&o.stdout).trim().to_owned(),
                backing: backing.to_owned(),
            }),
            other => {
                println!("no loop device here ({other:?}); this test needs root and /dev/loop-control");
                None
            }
        }
    }

    /// Tells the kernel the backing file changed size.
    pub fn refresh_capacity(&self) {
        assert!(Command::new("losetup").args(["-c", &self.device]).status().unwrap().success());
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}
