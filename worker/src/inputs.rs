//! Materializing an action's input root in its exec root.
//!
//! [`materialize`] fetches the tree, validates every directory, asks the
//! action's own CAS in bulk which file blobs it lacks, whether cached here
//! or not, since the cache is shared by every tenant (reporting all of
//! them at once as [`MaterializeError::MissingInputs`]), fetches the rest into the
//! [`FileCache`] with bounded concurrency, and then, on a blocking thread,
//! creates the directories, hard-links the files and creates the symlinks.
//! It runs before the action, into an exec root that is absent or empty and
//! that no process of an action can touch, so plain path operations are
//! safe there.
//!
//! Input symlinks are created as given, never followed by the worker. Their
//! targets must be relative, and may only climb (`..`) at their start and
//! no higher than the exec root: `../../lib/x` is accepted two levels down,
//! `a/../b` and `/etc/passwd` are refused. With `..` only at the start,
//! each climb leaves a real directory the worker created (never a
//! symlink), so a target that stays inside lexically stays inside on disk,
//! even through chains of symlinks.
//!
//! [`prepare_outputs`] creates the parents of the Command's outputs.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_proto::reapi::{Command, Directory};
use kiln_proto::text::quoted;
use kiln_proto::{Digest, DigestFunction, Error, Result};
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fchmod, mkdirat};
use nix::unistd::{Gid, Uid, fchown};

use crate::cache::{Acquired, FileCache, PinnedEntry, Placed};
use crate::cas::CasClient;
use crate::outputs::resolve_output_path;

/// Files fetched into the cache at once by one materialization.
pub const INPUT_FETCH_CONCURRENCY: usize = 32;
/// Digests per `find_missing` call (about 1 MiB of request).
pub use kiln_proto::limits::FIND_MISSING_BATCH;
/// Mode of every directory the worker creates in an exec root.
pub const DIRECTORY_MODE: u32 = 0o755;
/// Linux's longest file name (NAME_MAX), in bytes.
pub const LINUX_NAME_BYTES: usize = 255;
/// Linux's longest path (PATH_MAX, with its terminating NUL), in bytes.
pub const LINUX_PATH_BYTES: usize = 4096;

/// Bounds on one input tree. These move to `proto/src/limits.rs` with the
/// rest of the worker's configuration; [`InputLimits::DEFAULT`] documents
/// the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Most files (every occurrence: a Directory reached twice counts twice).
    pub files_max: u64,
    /// Most directories, the root excluded (occurrences, as for files).
    pub directories_max: u64,
    /// Most symlinks (occurrences).
    pub symlinks_max: u64,
    /// Deepest directory nesting below the root.
    pub depth_max: usize,
    /// Most bytes of files in all (occurrences).
    pub total_bytes_max: u64,
    /// Most bytes written as copies, for blobs past the filesystem's
    /// hard-link limit.
    pub copied_bytes_max: u64,
}

impl InputLimits {
    /// One million files, 100,000 directories and symlinks each, 128
    /// levels, 64 GiB, of which 1 GiB copies.
    pub const DEFAULT: InputLimits = InputLimits {
        files_max: kiln_proto::limits::INPUT_FILES_MAX,
        directories_max: kiln_proto::limits::INPUT_DIRECTORIES_MAX,
        symlinks_max: kiln_proto::limits::INPUT_SYMLINKS_MAX,
        depth_max: kiln_proto::limits::INPUT_DEPTH_MAX,
        total_bytes_max: kiln_proto::limits::INPUT_TOTAL_BYTES_MAX,
        copied_bytes_max: kiln_proto::limits::INPUT_COPIED_BYTES_MAX,
    };
}

impl Default for InputLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What one materialization did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InputStats {
    pub files: u64,
    /// Directories created, the root excluded.
    pub directories: u64,
    pub symlinks: u64,
    /// Bytes of all files (each occurrence).
    pub bytes: u64,
    /// Distinct (digest, executable) entries found in the cache (present,
    /// or fetched meanwhile by another request).
    pub cache_hits: u64,
    /// Distinct entries this materialization fetched.
    pub cache_misses: u64,
    pub duration: Duration,
}

/// Why a materialization failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaterializeError {
    /// Blobs the CAS lacks: every missing file and Directory found, each
    /// once. The runner turns these into a FAILED_PRECONDITION with one
    /// MISSING violation per digest.
    MissingInputs(Vec<Digest>),
    /// Anything else, with its code.
    Failed(Error),
}

impl MaterializeError {
    /// The missing digests (empty for other failures).
    pub fn missing_digests(&self) -> &[Digest] {
        match self {
            MaterializeError::MissingInputs(digests) => digests,
            MaterializeError::Failed(_) => &[],
        }
    }

    /// The error as a [`kiln_proto::Error`]: NOT_FOUND naming the missing
    /// digests (the first few; the message is bounded), or the failure.
    pub fn to_error(&self) -> Error {
        match self {
            MaterializeError::MissingInputs(digests) => {
                const NAMED: usize = 8;
                let mut names: Vec<String> = digests.iter().take(NAMED).map(ToString::to_string).collect();
                if digests.len() > NAMED {
                    names.push(format!("and {} more", digests.len() - NAMED));
                }
                Error::not_found(format!(
                    "{} input blobs are missing from the CAS: {}",
                    digests.len(),
                    names.join(", ")
                ))
            }
            MaterializeError::Failed(error) => error.clone(),
        }
    }
}

impl fmt::Display for MaterializeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_error(), f)
    }
}

impl std::error::Error for MaterializeError {}

impl From<Error> for MaterializeError {
    fn from(error: Error) -> Self {
        MaterializeError::Failed(error)
    }
}

impl From<MaterializeError> for Error {
    fn from(error: MaterializeError) -> Self {
        match error {
            MaterializeError::Failed(error) => error,
            missing @ MaterializeError::MissingInputs(_) => missing.to_error(),
        }
    }
}

/// [`materialize_with_limits`] with [`InputLimits::DEFAULT`].
pub async fn materialize<C: CasClient>(
    cache: &FileCache,
    cas: &C,
    function: DigestFunction,
    root: &Digest,
    exec_root: &Path,
    dir_owner: Option<(u32, u32)>,
) -> Result<InputStats, MaterializeError> {
    materialize_with_limits(cache, cas, function, root, exec_root, dir_owner, &InputLimits::DEFAULT).await
}

/// Materializes the input root `root` into `exec_root` (created if absent,
/// and empty otherwise). Directories get mode 0755 and, with `dir_owner`
/// (uid, gid), that owner, so that the action can create outputs in them;
/// files are hard links to the cache's root-owned entries (0444, or 0555
/// when executable); symlinks are created as given after validation.
pub async fn materialize_with_limits<C: CasClient>(
    cache: &FileCache,
    cas: &C,
    function: DigestFunction,
    root: &Digest,
    exec_root: &Path,
    dir_owner: Option<(u32, u32)>,
    limits: &InputLimits,
) -> Result<InputStats, MaterializeError> {
    let start = Instant::now();
    let index = fetch_tree(cas, root, limits).await?;
    let exec_root_bytes = exec_root.as_os_str().len();
    let plan = Plan::build(function, root, &index, limits, exec_root_bytes)?;
    drop(index);

    // Every distinct entry, and every blob, cached or not: the cache is
    // shared by every tenant of this worker, so a file is used only if the
    // action's own CAS holds it. A hit in the cache saves the download,
    // never this check (else one tenant could read another's file by
    // naming its digest, and tell a cached file from an absent one).
    let keys: Vec<(Digest, bool)> =
        plan.files.iter().map(|f| (f.digest, f.executable)).collect::<HashSet<_>>().into_iter().collect();
    let to_check: Vec<Digest> = keys
        .iter()
        .map(|&(digest, _)| digest)
        .collect::<HashSet<_>>()
        .into_iter()
        .filter(|d| !d.is_empty_blob())
        .collect();
    let mut missing = plan.missing_directories.clone();
    for batch in to_check.chunks(FIND_MISSING_BATCH) {
        missing.extend(cas.find_missing(batch).await?);
    }
    if !missing.is_empty() {
        return Err(MaterializeError::MissingInputs(missing));
    }

    // Fetch what is missing locally and pin everything until it is linked.
    let mut pinned: HashMap<(Digest, bool), PinnedEntry> = HashMap::with_capacity(keys.len());
    let mut stats = InputStats::default();
    {
        let mut acquisitions = futures::stream::iter(keys)
            .map(|(digest, executable)| async move {
                (digest, executable, cache.acquire(cas, &digest, executable).await)
            })
            .buffer_unordered(INPUT_FETCH_CONCURRENCY);
        while let Some((digest, executable, result)) = acquisitions.next().await {
            match result {
                Ok(entry) => {
                    match entry.acquired() {
                        Acquired::Fetched => stats.cache_misses += 1,
                        Acquired::Hit | Acquired::Joined => stats.cache_hits += 1,
                    }
                    pinned.insert((digest, executable), entry);
                }
                // Gone from the CAS since it said otherwise: keep collecting.
                Err(e) if e.is_not_found() => missing.push(digest),
                Err(e) => return Err(e.into()),
            }
        }
    }
    if !missing.is_empty() {
        missing.sort_unstable();
        missing.dedup();
        return Err(MaterializeError::MissingInputs(missing));
    }

    stats.files = plan.files.len() as u64;
    stats.directories = plan.directories.len() as u64;
    stats.symlinks = plan.symlinks.len() as u64;
    stats.bytes = plan.bytes;
    let exec_root = exec_root.to_owned();
    let copy_budget = limits.copied_bytes_max;
    tokio::task::spawn_blocking(move || plan.create(&exec_root, &pinned, dir_owner, copy_budget))
        .await
        .map_err(|e| Error::internal(format!("materializing inputs: a blocking task failed: {e}")))??;
    stats.duration = start.elapsed();
    Ok(stats)
}

/// Every Directory of the tree, by the digest it was read by (so that an
/// encoding prost would not reproduce, such as one with unknown fields, is
/// found too). The tree is walked by the one rule of [`kiln_proto::tree`]:
/// a directory the CAS lacks is absent from the index, and [`Plan::build`]
/// reports it as a missing input with the files.
async fn fetch_tree<C: CasClient>(
    cas: &C,
    root: &Digest,
    limits: &InputLimits,
) -> Result<HashMap<Digest, Directory>, MaterializeError> {
    // The root and `directories_max` distinct directories below it: the
    // walk stops past that, without holding the rest, and it is refused.
    let tree = cas
        .get_tree(root, limits.directories_max.saturating_add(1))
        .await
        .map_err(|e| e.context(format!("input root {root}")))?;
    if tree.exceeded {
        return Err(too_many(root, "directories", limits.directories_max).into());
    }
    Ok(tree.directories.into_iter().collect())
}

fn too_many(root: &Digest, what: &str, max: u64) -> Error {
    Error::invalid_argument(format!("input root {root} has more than {max} {what}"))
}

/// A file to link: where, and which entry.
#[derive(Debug)]
struct PlannedFile {
    path: String,
    digest: Digest,
    executable: bool,
}

/// The validated tree, flattened: relative paths (joined with '/'), parents
/// before children.
#[derive(Debug, Default)]
struct Plan {
    directories: Vec<String>,
    files: Vec<PlannedFile>,
    symlinks: Vec<(String, String)>,
    bytes: u64,
    missing_directories: Vec<Digest>,
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() { name.to_owned() } else { format!("{parent}/{name}") }
}

fn shown(path: &str) -> String {
    if path.is_empty() { "the root directory".to_owned() } else { format!("directory {}", quoted(path)) }
}

impl Plan {
    fn build(
        function: DigestFunction,
        root: &Digest,
        index: &HashMap<Digest, Directory>,
        limits: &InputLimits,
        exec_root_bytes: usize,
    ) -> Result<Plan, MaterializeError> {
        let mut plan = Plan::default();
        if !index.contains_key(root) {
            return Err(MaterializeError::MissingInputs(vec![*root]));
        }
        let mut missing = HashSet::new();
        let mut stack: Vec<(Digest, String, usize)> = vec![(*root, String::new(), 0)];
        while let Some((digest, path, depth)) = stack.pop() {
            let Some(directory) = index.get(&digest) else {
                if missing.insert(digest) {
                    plan.missing_directories.push(digest);
                }
                continue;
            };
            let invalid = |message: String| -> MaterializeError {
                Error::invalid_argument(format!("input root {root}: {}: {message}", shown(&path))).into()
            };
            check_names(directory).map_err(&invalid)?;
            let child_path = |name: &str| -> Result<String, MaterializeError> {
                let child = join(&path, name);
                if exec_root_bytes + 1 + child.len() >= LINUX_PATH_BYTES {
                    return Err(invalid(format!("path of {} is too long for Linux", quoted(name))));
                }
                Ok(child)
            };
            for file in &directory.files {
                let digest = Digest::from_required(Some(function), file.digest.as_ref(), "digest")
                    .map_err(|e| invalid(format!("file {}: {}", quoted(&file.name), e.message())))?;
                plan.bytes = plan.bytes.saturating_add(digest.size_bytes());
                if plan.bytes > limits.total_bytes_max {
                    return Err(too_many(root, "bytes of files", limits.total_bytes_max).into());
                }
                if plan.files.len() as u64 >= limits.files_max {
                    return Err(too_many(root, "files", limits.files_max).into());
                }
                plan.files.push(PlannedFile {
                    path: child_path(&file.name)?,
                    digest,
                    executable: file.is_executable,
                });
            }
            for symlink in &directory.symlinks {
                let parent_depth = if path.is_empty() { 0 } else { path.split('/').count() };
                check_symlink_target(&symlink.target, parent_depth)
                    .map_err(|m| invalid(format!("symlink {}: {m}", quoted(&symlink.name))))?;
                if plan.symlinks.len() as u64 >= limits.symlinks_max {
                    return Err(too_many(root, "symlinks", limits.symlinks_max).into());
                }
                plan.symlinks.push((child_path(&symlink.name)?, symlink.target.clone()));
            }
            for child in &directory.directories {
                let child_digest = Digest::from_required(Some(function), child.digest.as_ref(), "digest")
                    .map_err(|e| invalid(format!("directory {}: {}", quoted(&child.name), e.message())))?;
                if depth + 1 > limits.depth_max {
                    return Err(invalid(format!("nested more than {} levels deep", limits.depth_max)));
                }
                if plan.directories.len() as u64 >= limits.directories_max {
                    return Err(too_many(root, "directories", limits.directories_max).into());
                }
                let sub = child_path(&child.name)?;
                plan.directories.push(sub.clone());
                stack.push((child_digest, sub, depth + 1));
            }
        }
        Ok(plan)
    }

    /// Creates the tree under `exec_root`, writing at most `copy_budget`
    /// bytes of copies for blobs past the hard-link limit. Blocking.
    fn create(
        &self,
        exec_root: &Path,
        pinned: &HashMap<(Digest, bool), PinnedEntry>,
        dir_owner: Option<(u32, u32)>,
        copy_budget: u64,
    ) -> Result<()> {
        let io = |what: &str, path: &Path, e: std::io::Error| {
            Error::internal(format!("materializing inputs: cannot {what} {}: {e}", path.display()))
        };
        let make_dir = |path: &Path, existing_ok: bool| -> Result<()> {
            match fs::create_dir(path) {
                Ok(()) => {}
                Err(e) if existing_ok && e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("create directory", path, e)),
            }
            fs::set_permissions(path, fs::Permissions::from_mode(DIRECTORY_MODE))
                .map_err(|e| io("set the mode of", path, e))?;
            if let Some((uid, gid)) = dir_owner {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| io("chown", path, e))?;
            }
            Ok(())
        };
        if let Some(parent) = exec_root.parent() {
            fs::create_dir_all(parent).map_err(|e| io("create directory", parent, e))?;
        }
        make_dir(exec_root, true)?;
        for directory in &self.directories {
            make_dir(&exec_root.join(directory), false)?;
        }
        let mut copied = 0u64;
        for file in &self.files {
            let entry = pinned.get(&(file.digest, file.executable)).ok_or_else(|| {
                Error::internal(format!("materializing inputs: no cache entry for {}", file.digest))
            })?;
            let size = file.digest.size_bytes();
            let may_copy = copied.saturating_add(size) <= copy_budget;
            match entry.link_or_copy(&exec_root.join(&file.path), may_copy)? {
                Some(Placed::Linked) => {}
                Some(Placed::Copied) => copied += size,
                None => {
                    return Err(Error::resource_exhausted(format!(
                        "input blob {} is named more often than the filesystem can link it, and copying it would pass the {copy_budget} bytes of copies an action may have; name it fewer times",
                        file.digest
                    )));
                }
            }
        }
        for (path, target) in &self.symlinks {
            let path = exec_root.join(path);
            std::os::unix::fs::symlink(target, &path).map_err(|e| io("create symlink", &path, e))?;
        }
        Ok(())
    }
}

/// Checks one name of a Directory's child.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty name".to_owned());
    }
    if name == "." || name == ".." {
        return Err(format!("the name {} is not allowed", quoted(name)));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(format!("the name {} contains '/' or NUL", quoted(name)));
    }
    if name.len() > LINUX_NAME_BYTES {
        return Err(format!("the name {} is longer than {LINUX_NAME_BYTES} bytes", quoted(name)));
    }
    Ok(())
}

/// Checks that every name is valid, that each list is sorted (strictly, by
/// UTF-8 bytes) and that names are unique across the three lists.
fn check_names(directory: &Directory) -> Result<(), String> {
    fn sorted<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> Result<(), String> {
        let mut previous: Option<&str> = None;
        for name in names {
            check_name(name)?;
            if let Some(previous) = previous
                && previous >= name
            {
                let why = if previous == name { "twice" } else { "out of order" };
                return Err(format!("{what} {} is listed {why}", quoted(name)));
            }
            previous = Some(name);
        }
        Ok(())
    }
    sorted("file", directory.files.iter().map(|f| f.name.as_str()))?;
    sorted("directory", directory.directories.iter().map(|d| d.name.as_str()))?;
    sorted("symlink", directory.symlinks.iter().map(|s| s.name.as_str()))?;
    let mut seen = HashSet::new();
    let names = directory.files.iter().map(|f| &f.name).chain(directory.directories.iter().map(|d| &d.name));
    for name in names.chain(directory.symlinks.iter().map(|s| &s.name)) {
        if !seen.insert(name) {
            return Err(format!("the name {} is used twice", quoted(name)));
        }
    }
    Ok(())
}

/// Checks an input symlink's target (see the module documentation): relative,
/// `..` only at its start and no more of them than `parent_depth`, the depth
/// of the directory holding the symlink below the exec root.
fn check_symlink_target(target: &str, parent_depth: usize) -> Result<(), String> {
    if target.is_empty() {
        return Err("the target is empty".to_owned());
    }
    if target.len() >= LINUX_PATH_BYTES || target.contains('\0') {
        return Err(format!("the target {} is too long or contains NUL", quoted(target)));
    }
    if target.starts_with('/') {
        return Err(format!("the target {} is absolute; only relative targets are allowed", quoted(target)));
    }
    let mut climbs = 0;
    let mut descended = false;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." if descended => {
                return Err(format!(
                    "the target {} has '..' after a name; '..' is allowed only at its start",
                    quoted(target)
                ));
            }
            ".." => climbs += 1,
            _ => descended = true,
        }
    }
    if climbs > parent_depth {
        return Err(format!("the target {} points outside the input root", quoted(target)));
    }
    Ok(())
}

/// Creates the parent directories of the Command's outputs (those of
/// `output_paths` when it is set, else those of `output_files` and
/// `output_directories`) and the working directory, relative to
/// `exec_root`, mode 0755 and owned by `dir_owner` when given. Existing
/// directories are kept; a path that runs through a symlink or a file is
/// refused (INVALID_ARGUMENT), never followed. Paths that are absolute or
/// climb out of the exec root are refused. Blocking (a few system calls per
/// output).
#[allow(deprecated)] // output_files and output_directories: Bazel 4 uses them
pub fn prepare_outputs(
    exec_root: &Path,
    working_directory: &str,
    command: &Command,
    dir_owner: Option<(u32, u32)>,
) -> Result<()> {
    let root =
        nix::fcntl::open(exec_root, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| Error::internal(format!("cannot open exec root {}: {e}", exec_root.display())))?;
    let paths: Vec<&String> = if command.output_paths.is_empty() {
        command.output_files.iter().chain(&command.output_directories).collect()
    } else {
        command.output_paths.iter().collect()
    };
    let mut done: HashSet<Vec<String>> = HashSet::new();
    let working = resolve_output_path(working_directory, "")?;
    create_directories(&root, &working, dir_owner, working_directory)?;
    for path in paths {
        let mut components = resolve_output_path(working_directory, path)?;
        if components.pop().is_none() {
            continue;
        }
        if done.insert(components.clone()) {
            create_directories(&root, &components, dir_owner, path)?;
        }
    }
    Ok(())
}

/// Creates `components` below `root` one at a time, never following a
/// symlink.
fn create_directories(
    root: &OwnedFd,
    components: &[String],
    dir_owner: Option<(u32, u32)>,
    shown: &str,
) -> Result<()> {
    let mut current: Option<OwnedFd> = None;
    for component in components {
        let parent = current.as_ref().unwrap_or(root);
        let created =
            match mkdirat(parent.as_fd(), component.as_str(), Mode::from_bits_truncate(DIRECTORY_MODE)) {
                Ok(()) => true,
                Err(Errno::EEXIST) => false,
                Err(e) => {
                    return Err(Error::internal(format!(
                        "output path {}: cannot create {}: {e}",
                        quoted(shown),
                        quoted(component)
                    )));
                }
            };
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let child =
            openat(parent.as_fd(), component.as_str(), flags, Mode::empty()).map_err(|e| match e {
                Errno::ELOOP | Errno::ENOTDIR => Error::invalid_argument(format!(
                    "output path {}: {} is a symlink or a file, not a directory",
                    quoted(shown),
                    quoted(component)
                )),
                e => Error::internal(format!(
                    "output path {}: cannot open {}: {e}",
                    quoted(shown),
                    quoted(component)
                )),
            })?;
        if created {
            fchmod(child.as_fd(), Mode::from_bits_truncate(DIRECTORY_MODE))
                .map_err(|e| Error::internal(format!("output path {}: cannot chmod: {e}", quoted(shown))))?;
            if let Some((uid, gid)) = dir_owner {
                fchown(child.as_fd(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|e| {
                    Error::internal(format!("output path {}: cannot chown: {e}", quoted(shown)))
                })?;
            }
        }
        current = Some(child);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets_stay_inside() {
        assert!(check_symlink_target("a/b", 0).is_ok());
        assert!(check_symlink_target("../x", 1).is_ok());
        assert!(check_symlink_target("./../x/./y", 1).is_ok());
        assert!(check_symlink_target("../../x", 1).is_err());
        assert!(check_symlink_target("..", 0).is_err());
        assert!(check_symlink_target("a/../b", 3).is_err());
        assert!(check_symlink_target("/etc/passwd", 3).is_err());
        assert!(check_symlink_target("", 3).is_err());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"n".repeat(256)).is_err());
        assert!(check_name("ok.txt").is_ok());
    }
}
