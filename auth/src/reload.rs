//! Files an operator edits: noticing changes, and writing them safely.
//!
//! One rule for every file Kiln reloads (certificates, keys, CA bundles,
//! CRLs, htpasswd, tokens):
//!
//! - A change is acted on only once the file has looked the same for a whole
//!   poll interval, so a file caught mid-rewrite is not loaded.
//! - A file that is then missing, empty or unparseable never replaces the
//!   last good content: Kiln keeps serving with what it had and logs an
//!   error naming the file, and tries again when the file changes.
//! - Kiln's own writes (the token file) go to a unique temporary file in
//!   the target's directory, are synced, and renamed over the target. A
//!   symlinked file is written through the link (the link stays, so nodes
//!   sharing the file through it see the change), and the file keeps its
//!   mode and, where permitted, its owner.
//!
//! Polling works the same on every filesystem, including network mounts
//! shared by several nodes; a change in size, modification time or inode
//! (cert-manager and Kubernetes replace files through symlink swaps) counts.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_proto::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified_ns: i128,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    // `metadata` follows symlinks, so a swapped link target counts as a change.
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: meta.len(),
        modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        inode: meta.ino(),
    })
}

/// A set of files and what they looked like when last loaded.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    loaded: Vec<Option<Stamp>>,
    /// What the files looked like at the previous poll, while they differ
    /// from what was loaded.
    pending: Option<Vec<Option<Stamp>>>,
}

impl FileWatch {
    /// Watches `paths`, taking their current state as loaded.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let loaded = paths.iter().map(|p| stamp(p)).collect();
        Self { paths, loaded, pending: None }
    }

    /// Whether the files changed since they were last loaded and have stayed
    /// unchanged since the previous poll. After `true`, the caller loads the
    /// files and the current state counts as loaded, whatever the outcome.
    pub fn settled_change(&mut self) -> bool {
        let now: Vec<Option<Stamp>> = self.paths.iter().map(|p| stamp(p)).collect();
        if now == self.loaded {
            self.pending = None;
            return false;
        }
        if self.pending.as_ref() == Some(&now) {
            self.pending = None;
            self.loaded = now;
            return true;
        }
        self.pending = Some(now);
        false
    }

    /// Takes the files' current state as loaded (after Kiln's own write).
    pub fn mark_loaded(&mut self) {
        self.loaded = self.paths.iter().map(|p| stamp(p)).collect();
        self.pending = None;
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

/// Reads a file Kiln reloads; a missing or empty file is an error naming it.
pub fn read_nonempty(path: &Path, what: &str) -> Result<Vec<u8>> {
    let data = std::fs::read(path)
        .map_err(|e| Error::invalid_argument(format!("{what} {}: {e}", path.display())))?;
    if data.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::invalid_argument(format!("{what} {} is empty", path.display())));
    }
    Ok(data)
}

/// The file a path names, through any symlinks; the path itself when it
/// does not exist yet. A symlink to a file not created yet resolves to that
/// file, so the first write through a link creates the link's target.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let mut current = path.to_owned();
    // Links followed by hand; the kernel's limit on a chain of links.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&current) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(Error::internal(format!("{}: {e}", current.display()))),
            Ok(meta) if !meta.file_type().is_symlink() => {
                return std::fs::canonicalize(&current)
                    .map_err(|e| Error::internal(format!("{}: cannot resolve: {e}", current.display())));
            }
            Ok(_) => {
                let target = std::fs::read_link(&current)
                    .map_err(|e| Error::internal(format!("{}: {e}", current.display())))?;
                current = match current.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
        }
    }
    Err(Error::internal(format!("{}: too many levels of symbolic links", path.display())))
}

/// Replaces the file at `path` with `data` atomically (see the module
/// documentation); a new file gets `new_mode`.
pub fn write_atomically(path: &Path, data: &[u8], new_mode: u32) -> Result<()> {
    let target = resolve(path)?;
    let io = |what: &str, e: std::io::Error| Error::internal(format!("{what} {}: {e}", target.display()));
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let existing = std::fs::metadata(&target).ok();
    let name = target.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| io("create a temporary file next to", e))?;
    let mode = existing.as_ref().map_or(new_mode, |m| m.permissions().mode() & 0o7777);
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| io("set mode of", e))?;
    if let Some(meta) = &existing
        && let Err(e) = std::os::unix::fs::fchown(tmp.as_file(), Some(meta.uid()), Some(meta.gid()))
    {
        // Only root may give files away; others keep their own ownership.
        tracing::debug!(file = %target.display(), error = %e, "could not keep the file's owner");
    }
    tmp.write_all(data).map_err(|e| io("write", e))?;
    tmp.as_file().sync_all().map_err(|e| io("sync", e))?;
    tmp.persist(&target).map_err(|e| io("replace", e.error))?;
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io("sync the directory of", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_acted_on_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a").unwrap();
        let mut watch = FileWatch::new(vec![path.clone()]);
        assert!(!watch.settled_change());
        std::fs::write(&path, "bb").unwrap();
        assert!(!watch.settled_change(), "first sight of a change waits a poll");
        std::fs::write(&path, "ccc").unwrap();
        assert!(!watch.settled_change(), "still changing");
        assert!(watch.settled_change(), "unchanged for a whole poll");
        assert!(!watch.settled_change());
        let other = dir.path().join("g");
        std::fs::write(&other, "dddd").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(!watch.settled_change());
        assert!(watch.settled_change(), "a file replaced by rename has a new inode");
        std::fs::remove_file(&path).unwrap();
        assert!(!watch.settled_change());
        assert!(watch.settled_change(), "deletion is a change too (the loader keeps the old content)");
    }

    #[test]
    fn empty_and_missing_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        assert!(read_nonempty(&path, "CRL").unwrap_err().message().contains("crl.pem"));
        std::fs::write(&path, "\n  \n").unwrap();
        assert!(read_nonempty(&path, "CRL").unwrap_err().message().contains("is empty"));
    }

    #[test]
    fn atomic_writes_keep_symlinks_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("shared").join("tokens.json");
        std::fs::create_dir(real.parent().unwrap()).unwrap();
        std::fs::write(&real, "old").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("tokens.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_atomically(&link, b"new", 0o600).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&real).unwrap().permissions().mode() & 0o777, 0o640);
        let fresh = dir.path().join("fresh.json");
        write_atomically(&fresh, b"x", 0o600).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o600);
        // No temporary file is left behind, and a planted fixed name is never followed.
        let planted = dir.path().join("shared").join("tokens.tmp");
        std::os::unix::fs::symlink(dir.path().join("victim"), &planted).unwrap();
        write_atomically(&link, b"again", 0o600).unwrap();
        assert!(!dir.path().join("victim").exists());
        let names: Vec<_> =
            std::fs::read_dir(real.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A link to a file in a directory that does not exist cannot be written.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere/x"), &dangling).unwrap();
        assert!(write_atomically(&dangling, b"x", 0o600).is_err());
        // A link to a file not created yet is written through.
        let ahead = dir.path().join("ahead");
        std::os::unix::fs::symlink(dir.path().join("later.json"), &ahead).unwrap();
        write_atomically(&ahead, b"first", 0o600).unwrap();
        assert!(std::fs::symlink_metadata(&ahead).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(dir.path().join("later.json")).unwrap(), b"first");
    }
}
