//! Removing a tree an action wrote, whatever its shape.
//!
//! `std::fs::remove_dir_all` recurses once per level: an action that nests
//! directories 40,000 deep overflows the stack of the thread that cleans
//! up after it, and with it the whole process. [`remove_tree`] walks down
//! and back up with one open directory at a time: it descends through
//! `openat(O_NOFOLLOW)`, climbs back through `".."` and finds the directory
//! it came from by its inode, so neither the stack, the descriptors nor the
//! memory grow with the depth. Symlinks are removed, never followed.
//! Subdirectories found in one reading of a directory are kept, at most
//! [`PENDING_MAX`] per level, so a wide directory is not re-read for each
//! child.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use kiln_proto::limits::REMOVE_PENDING_NAMES_MAX as PENDING_MAX;

fn open_dir(at: &impl AsFd, name: &CStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    openat(at.as_fd(), name, flags, Mode::empty())
}

/// One level of the walk: the names of subdirectories still to remove.
struct Level {
    pending: Vec<CString>,
}

/// Removes `path` and everything under it, iteratively (see the module
/// documentation). A missing `path` is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no entry", path.display()),
        ));
    };
    let name = CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let parent =
        nix::fcntl::open(parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut current = match open_dir(&parent, &name) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        // A file or a symlink: remove the entry itself.
        Err(Errno::ENOTDIR | Errno::ELOOP) => {
            return Ok(unlinkat(&parent, name.as_c_str(), UnlinkatFlags::NoRemoveDir)?);
        }
        Err(e) => return Err(e.into()),
    };
    let mut levels = vec![Level { pending: Vec::new() }];
    loop {
        let level = levels.last_mut().expect("the walk is never empty here");
        if level.pending.is_empty() {
            level.pending = clear_files(&current)?;
        }
        if let Some(child) = level.pending.pop() {
            match open_dir(&current, &child) {
                Ok(fd) => {
                    current = fd;
                    levels.push(Level { pending: Vec::new() });
                }
                // Gone, or no longer a directory: the next reading sees it.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => {}
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        // `current` is empty: climb to its parent and remove it there.
        levels.pop();
        if levels.is_empty() {
            drop(current);
            return match unlinkat(&parent, name.as_c_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        let inode = fstat(&current)?.st_ino;
        let up = open_dir(&current, c"..")?;
        current = up;
        if let Some(child) = name_of(&current, inode)? {
            match unlinkat(&current, child.as_c_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A listing of the open directory `dir`.
fn list(dir: &OwnedFd) -> nix::Result<Dir> {
    Dir::openat(dir.as_fd(), c".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
}

/// Removes every entry of `dir` that is not a directory; answers the names
/// of (at most [`PENDING_MAX`]) subdirectories that are left. Empty
/// subdirectories are removed on the way.
fn clear_files(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let mut listing = list(dir)?;
    let mut files = Vec::new();
    let mut subdirectories = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            Some(Type::Directory) => true,
            Some(_) => false,
            None => nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|s| s.st_mode & nix::libc::S_IFMT == nix::libc::S_IFDIR),
        };
        if is_dir {
            if subdirectories.len() < PENDING_MAX {
                subdirectories.push(name.to_owned());
            }
        } else {
            files.push(name.to_owned());
        }
        // Removing while listing can skip entries: removed after the listing.
        if files.len() >= PENDING_MAX {
            remove_files(dir, &mut files)?;
        }
    }
    remove_files(dir, &mut files)?;
    // An empty one goes at once; the others are walked into.
    subdirectories.retain(|name| unlinkat(dir, name.as_c_str(), UnlinkatFlags::RemoveDir).is_err());
    Ok(subdirectories)
}

fn remove_files(dir: &OwnedFd, files: &mut Vec<CString>) -> io::Result<()> {
    for name in files.drain(..) {
        match unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The name under which `dir` holds the directory of inode `inode`.
fn name_of(dir: &OwnedFd, inode: u64) -> io::Result<Option<CString>> {
    let mut listing = list(dir)?;
    for entry in listing.iter() {
        let entry = entry?;
        if entry.ino() == inode && entry.file_name() != c"." && entry.file_name() != c".." {
            return Ok(Some(entry.file_name().to_owned()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Nests `depth` directories under `root` by relative steps (the path
    /// is far longer than `PATH_MAX`).
    fn nest(root: &Path, depth: usize) {
        let mut at = nix::fcntl::open(root, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        for i in 0..depth {
            nix::sys::stat::mkdirat(&at, c"d", Mode::from_bits_truncate(0o755)).unwrap();
            if i % 1000 == 0 {
                let f = nix::fcntl::openat(
                    &at,
                    c"f",
                    OFlag::O_CREAT | OFlag::O_WRONLY,
                    Mode::from_bits_truncate(0o644),
                );
                drop(f.unwrap());
            }
            at = open_dir(&at, c"d").unwrap();
        }
    }

    /// 40,000 levels, removed on a thread with a 128 KiB stack: a
    /// recursive removal overflows it; this one never opens more than two
    /// directories at once.
    #[test]
    fn a_tree_deeper_than_any_stack_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("exec");
        std::fs::create_dir(&root).unwrap();
        nest(&root, 40_000);
        let target = root.clone();
        std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || remove_tree(&target))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(!root.exists());
    }

    /// Wide directories, files, empty and full subdirectories, and a
    /// symlink to a directory outside: all removed, the outside untouched.
    #[test]
    fn symlinks_are_removed_not_followed_and_wide_trees_go() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let root = dir.path().join("exec");
        for i in 0..3000 {
            let sub = root.join(format!("s{i}"));
            std::fs::create_dir_all(&sub).unwrap();
            if i % 2 == 0 {
                std::fs::write(sub.join("f"), b"y").unwrap();
                std::fs::create_dir(sub.join("inner")).unwrap();
            }
        }
        symlink(&outside, root.join("link")).unwrap();
        symlink(&outside, root.join("s4").join("link")).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert!(outside.join("keep").exists());
        // A file, a symlink and a missing path.
        std::fs::write(dir.path().join("file"), b"z").unwrap();
        remove_tree(&dir.path().join("file")).unwrap();
        symlink(&outside, dir.path().join("l")).unwrap();
        remove_tree(&dir.path().join("l")).unwrap();
        assert!(outside.exists() && !dir.path().join("l").exists());
        remove_tree(&dir.path().join("never")).unwrap();
    }
}
