//! Noticing that files changed on disk, for live reloading.
//!
//! Certificates, CRLs, htpasswd and token files are polled: a change in
//! size, modification time or inode (cert-manager and Kubernetes replace
//! files through symlink swaps) triggers a reload. Polling works the same on
//! every filesystem, including network mounts shared by several nodes.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

/// Default interval between checks; revocations reach every node within
/// a few of these.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified_ns: i128,
    inode: u64,
}

/// A set of files and what they looked like when last loaded.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    stamps: Vec<Option<Stamp>>,
}

fn stamp(path: &PathBuf) -> Option<Stamp> {
    // `metadata` follows symlinks, so a swapped link target counts as a change.
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: meta.len(),
        modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        inode: meta.ino(),
    })
}

impl FileWatch {
    /// Watches `paths`, taking their current state as loaded.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let stamps = paths.iter().map(stamp).collect();
        Self { paths, stamps }
    }

    /// Makes the next [`FileWatch::changed`] report a change.
    pub fn forget(&mut self) {
        self.stamps.iter_mut().for_each(|s| *s = None);
        if self.stamps.is_empty() {
            return;
        }
        // A missing file also stamps as None; force a difference.
        self.stamps.push(None);
    }

    /// Whether any file changed since the last call (or since `new`).
    pub fn changed(&mut self) -> bool {
        let now: Vec<Option<Stamp>> = self.paths.iter().map(stamp).collect();
        if now == self.stamps {
            return false;
        }
        self.stamps = now;
        true
    }
}

/// Runs `reload` every `interval` on the current runtime, for the life of
/// the process.
pub fn spawn_poller(name: &'static str, interval: Duration, mut reload: impl FnMut() + Send + 'static) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            reload();
            tracing::trace!(watcher = name, "checked for changes");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_rewrites_and_replacements() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a").unwrap();
        let mut watch = FileWatch::new(vec![path.clone()]);
        assert!(!watch.changed());
        std::fs::write(&path, "bb").unwrap();
        assert!(watch.changed());
        assert!(!watch.changed());
        let other = dir.path().join("g");
        std::fs::write(&other, "cc").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(watch.changed(), "a file replaced by rename has a new inode");
        std::fs::remove_file(&path).unwrap();
        assert!(watch.changed());
    }
}
