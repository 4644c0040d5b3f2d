//! Collecting and uploading what an action produced.
//!
//! The action is hostile, and the worker reads its outputs as root. So the
//! worker never follows a symlink the action could have made:
//!
//! - Paths are walked one component at a time from the exec root: each
//!   node is opened with `O_PATH | O_NOFOLLOW` (which opens nothing: no
//!   fifo blocks, no device sees an open), its type read with `fstat` on
//!   that descriptor, and only then is it reopened for reading: directories
//!   through `openat(fd, ".")`, regular files through `/proc/self/fd/N`,
//!   which reopens that very inode. A node swapped after the check is never
//!   the one read.
//! - A symlink is reported as a symlink with its target text; a symlink in
//!   the middle of an output path (`out -> /etc` with `out/passwd`) is
//!   refused (INVALID_ARGUMENT), never followed.
//! - Fifos, sockets and devices are refused (INVALID_ARGUMENT), as are
//!   names that are not UTF-8 (a Directory cannot carry them).
//! - A regular file owned by someone other than the exec root's owner (the
//!   action's uid when the exec root was materialized with one) that is
//!   not readable by others is refused: the action may have hard-linked a
//!   secret it could not read itself.
//! - Sizes, entry counts and depth are bounded ([`OutputLimits`]).
//!
//! Files are hashed as they are read (one pass); files up to a bound are
//! kept in memory for the upload, larger ones are reopened the same way at
//! upload time (checking it is the same inode) and uploaded from
//! `/proc/self/fd/N`. Only blobs the CAS reports missing are uploaded.
//!
//! Which fields are filled follows REAPI v2: with `output_paths` (v2.1),
//! `output_files`, `output_directories` and `output_symlinks`; with
//! `output_files` and `output_directories` (Bazel 4), `output_files`,
//! `output_directories`, `output_file_symlinks` and
//! `output_directory_symlinks`. A listed output file that is a directory,
//! or a listed output directory that is a file, is FAILED_PRECONDITION, as
//! REAPI says; missing outputs are absent. Output directories are uploaded
//! as a `Tree` (children deduplicated, in topological order, so
//! `is_topologically_sorted` is set) and, for `root_directory_digest`, as
//! every Directory message as well.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use kiln_proto::reapi::{
    ActionResult, Command, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile, OutputSymlink,
    SymlinkNode, Tree,
};
use kiln_proto::text::quoted;
use kiln_proto::{Code, Digest, DigestFunction, Error, Result};
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, readlinkat};
use nix::sys::stat::Mode;
use prost::Message;

use crate::cas::CasClient;
use crate::inputs::{FIND_MISSING_BATCH, LINUX_NAME_BYTES};

/// Blobs uploaded at once by one collection.
pub const OUTPUT_UPLOAD_CONCURRENCY: usize = 16;
/// Bytes read from a file per system call while hashing.
const READ_CHUNK_BYTES: usize = 256 << 10;

/// Bounds on what one action may produce. These move to
/// `proto/src/limits.rs` with the rest of the worker's configuration;
/// [`OutputLimits::DEFAULT`] documents the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Largest output file (and log), in bytes.
    pub file_size_bytes_max: u64,
    /// Most bytes of all output files together.
    pub total_bytes_max: u64,
    /// Most files, directories and symlinks in all outputs together.
    pub entries_max: u64,
    /// Deepest nesting inside an output directory.
    pub depth_max: usize,
    /// Files up to this size are kept in memory between hashing and upload.
    pub inline_file_bytes_max: u64,
    /// Most bytes kept in memory that way by one collection.
    pub inline_total_bytes_max: u64,
    /// Longest a collection (hashing and uploading the outputs and logs)
    /// may take.
    pub collect_time_max: Duration,
}

impl OutputLimits {
    /// 16 GiB per file, 64 GiB in all, one million entries, 128 levels;
    /// files up to 1 MiB, 64 MiB in all, kept in memory; ten minutes.
    pub const DEFAULT: OutputLimits = OutputLimits {
        file_size_bytes_max: kiln_proto::limits::OUTPUT_FILE_BYTES_MAX,
        total_bytes_max: kiln_proto::limits::OUTPUT_TOTAL_BYTES_MAX,
        entries_max: kiln_proto::limits::OUTPUT_ENTRIES_MAX,
        depth_max: kiln_proto::limits::OUTPUT_DEPTH_MAX,
        inline_file_bytes_max: kiln_proto::limits::OUTPUT_INLINE_FILE_BYTES_MAX,
        inline_total_bytes_max: kiln_proto::limits::OUTPUT_INLINE_TOTAL_BYTES_MAX,
        collect_time_max: Duration::from_secs(kiln_proto::limits::OUTPUT_COLLECT_SECS_MAX),
    };

    /// When a collection starting now must be done.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.collect_time_max
    }
}

impl Default for OutputLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What one collection found and uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutputStats {
    /// Files seen, inside output directories too.
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Bytes of the files seen.
    pub bytes: u64,
    /// Blobs the CAS lacked and that were uploaded (files, Trees, Directories).
    pub uploaded_blobs: u64,
    pub uploaded_bytes: u64,
    pub duration: Duration,
}

/// The output fields of an ActionResult.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollectedOutputs {
    pub output_files: Vec<OutputFile>,
    pub output_directories: Vec<OutputDirectory>,
    pub output_file_symlinks: Vec<OutputSymlink>,
    pub output_directory_symlinks: Vec<OutputSymlink>,
    pub output_symlinks: Vec<OutputSymlink>,
    pub stats: OutputStats,
}

impl CollectedOutputs {
    /// Moves the output fields into `result`.
    #[allow(deprecated)] // the v2.0 symlink fields: Bazel 4 reads them
    pub fn apply_to(self, result: &mut ActionResult) {
        result.output_files = self.output_files;
        result.output_directories = self.output_directories;
        result.output_file_symlinks = self.output_file_symlinks;
        result.output_directory_symlinks = self.output_directory_symlinks;
        result.output_symlinks = self.output_symlinks;
    }
}

/// The components of output `path` (relative to `working_directory`, which
/// is relative to the exec root) relative to the exec root. `.` is skipped
/// and `..` climbs, but never above the exec root; absolute paths, trailing
/// slashes, empty components and NUL are refused (INVALID_ARGUMENT). The
/// empty path is the working directory itself.
pub fn resolve_output_path(working_directory: &str, path: &str) -> Result<Vec<String>> {
    let mut components: Vec<String> = Vec::new();
    for (what, text) in [("working directory", working_directory), ("output path", path)] {
        if text.is_empty() {
            continue;
        }
        let invalid = |why: &str| Error::invalid_argument(format!("{what} {}: {why}", quoted(text)));
        if text.starts_with('/') || text.ends_with('/') {
            return Err(invalid("must be relative, without a leading or trailing slash"));
        }
        if text.contains('\0') {
            return Err(invalid("contains NUL"));
        }
        for component in text.split('/') {
            match component {
                "" => return Err(invalid("has an empty component")),
                "." => {}
                ".." => {
                    if components.pop().is_none() {
                        return Err(invalid("climbs out of the exec root"));
                    }
                }
                name if name.len() > LINUX_NAME_BYTES => {
                    return Err(invalid("has a component that is too long"));
                }
                name => components.push(name.to_owned()),
            }
        }
    }
    Ok(components)
}

/// [`collect_with_limits`] with [`OutputLimits::DEFAULT`].
pub async fn collect<C: CasClient>(
    cas: &C,
    function: DigestFunction,
    exec_root: &Path,
    command: &Command,
) -> Result<CollectedOutputs> {
    let limits = OutputLimits::DEFAULT;
    collect_with_limits(cas, function, exec_root, command, &limits, limits.deadline()).await
}

/// Collects the outputs `command` names from `exec_root` after the action
/// exited, uploads the blobs the CAS lacks, and returns the ActionResult's
/// output fields. Past `deadline` (see [`OutputLimits::deadline`]) it stops
/// with RESOURCE_EXHAUSTED: another attempt would take as long.
pub async fn collect_with_limits<C: CasClient>(
    cas: &C,
    function: DigestFunction,
    exec_root: &Path,
    command: &Command,
    limits: &OutputLimits,
    deadline: Instant,
) -> Result<CollectedOutputs> {
    let start = Instant::now();
    check_proc()?;
    let root = exec_root.to_owned();
    let command = command.clone();
    let limits = *limits;
    let (mut collected, blobs) = tokio::task::spawn_blocking(move || {
        let mut scanner = Scanner::open(function, &root, &limits, deadline)?;
        let collected = scanner.scan(&command)?;
        Ok::<_, Error>((collected, scanner.blobs))
    })
    .await
    .map_err(|e| Error::internal(format!("collecting outputs: a blocking task failed: {e}")))??;
    let (uploaded_blobs, uploaded_bytes) =
        tokio::time::timeout_at(deadline.into(), upload_missing(cas, exec_root, &blobs))
            .await
            .map_err(|_| over_time(&limits, "uploading the outputs"))??;
    collected.stats.uploaded_blobs = uploaded_blobs;
    collected.stats.uploaded_bytes = uploaded_bytes;
    collected.stats.duration = start.elapsed();
    Ok(collected)
}

/// Uploads the log at `path` (the action's stdout or stderr, as the worker
/// captured it) if the CAS lacks it, and returns its digest. The file
/// itself must be a regular file, not a symlink; its size is bounded by
/// `limits`, the time it takes by `deadline`.
pub async fn upload_log<C: CasClient>(
    cas: &C,
    function: DigestFunction,
    path: &Path,
    limits: &OutputLimits,
    deadline: Instant,
) -> Result<Digest> {
    let limits = *limits;
    tokio::time::timeout_at(deadline.into(), upload_log_by(cas, function, path, limits, deadline))
        .await
        .map_err(|_| over_time(&limits, "uploading a log"))?
}

async fn upload_log_by<C: CasClient>(
    cas: &C,
    function: DigestFunction,
    path: &Path,
    limits: OutputLimits,
    deadline: Instant,
) -> Result<Digest> {
    check_proc()?;
    let owned = path.to_owned();
    let (digest, bytes, handle) = tokio::task::spawn_blocking(move || {
        let shown = owned.display().to_string();
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let handle = nix::fcntl::open(&owned, flags, Mode::empty())
            .map_err(|e| Error::internal(format!("log {shown}: cannot open: {e}")))?;
        let handle = File::from(handle);
        let meta = metadata(&handle, &shown)?;
        if !meta.file_type().is_file() {
            return Err(Error::invalid_argument(format!("log {shown} is not a regular file")));
        }
        if meta.size() > limits.file_size_bytes_max {
            return Err(too_large(&shown, meta.size(), limits.file_size_bytes_max));
        }
        let keep = meta.size() <= limits.inline_file_bytes_max;
        let (digest, bytes) = hash_file(function, &handle, &meta, keep, &shown, (&limits, deadline))?;
        Ok((digest, bytes, handle))
    })
    .await
    .map_err(|e| Error::internal(format!("uploading a log: a blocking task failed: {e}")))??;
    if digest.is_empty_blob() || cas.find_missing(&[digest]).await?.is_empty() {
        return Ok(digest);
    }
    match bytes {
        Some(bytes) => cas.upload_bytes(&digest, bytes).await?,
        // The inode hashed, whatever happened to the name since.
        None => cas.upload_file(&digest, &proc_fd_path(&handle)).await?,
    }
    drop(handle);
    Ok(digest)
}

/// The path that reopens `handle`'s inode (a magic link, not followed by name).
fn proc_fd_path(handle: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

fn check_proc() -> Result<()> {
    if Path::new("/proc/self/fd").is_dir() {
        Ok(())
    } else {
        Err(Error::internal(
            "collecting outputs needs /proc mounted (files are reopened through /proc/self/fd)",
        ))
    }
}

/// Where the bytes of a blob to upload are.
#[derive(Debug)]
enum Source {
    Inline(Bytes),
    /// A file in the exec root: its path components and identity.
    File {
        components: Vec<String>,
        device: u64,
        inode: u64,
    },
}

/// Uploads the blobs the CAS lacks; returns how many and their bytes.
async fn upload_missing<C: CasClient>(
    cas: &C,
    exec_root: &Path,
    blobs: &HashMap<Digest, Source>,
) -> Result<(u64, u64)> {
    let digests: Vec<Digest> = blobs.keys().copied().filter(|d| !d.is_empty_blob()).collect();
    let mut missing = Vec::new();
    for batch in digests.chunks(FIND_MISSING_BATCH) {
        missing.extend(cas.find_missing(batch).await?);
    }
    let bytes = missing.iter().map(Digest::size_bytes).sum();
    let count = missing.len() as u64;
    futures::stream::iter(missing)
        .map(|digest| async move {
            let source = blobs.get(&digest).ok_or_else(|| {
                Error::internal(format!("collecting outputs: the CAS reported {digest}, never asked"))
            })?;
            upload_one(cas, exec_root, digest, source).await
        })
        .buffer_unordered(OUTPUT_UPLOAD_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok((count, bytes))
}

async fn upload_one<C: CasClient>(cas: &C, exec_root: &Path, digest: Digest, source: &Source) -> Result<()> {
    let handle = match source {
        Source::Inline(bytes) => return cas.upload_bytes(&digest, bytes.clone()).await,
        Source::File { components, device, inode } => {
            let shown = components.join("/");
            let root = open_directory(exec_root)?;
            let (last, parents) = components
                .split_last()
                .ok_or_else(|| Error::internal("collecting outputs: a file without a path"))?;
            let parent = walk(root, parents, &shown)?.ok_or_else(|| {
                Error::internal(format!("output {}: vanished before its upload", quoted(&shown)))
            })?;
            let (handle, meta) = open_node(&parent, last, &shown)?.ok_or_else(|| {
                Error::internal(format!("output {}: vanished before its upload", quoted(&shown)))
            })?;
            if meta.dev() != *device || meta.ino() != *inode || meta.size() != digest.size_bytes() {
                return Err(Error::internal(format!("output {}: changed before its upload", quoted(&shown))));
            }
            handle
        }
    };
    // The CAS client opens this path: the inode checked above, whatever
    // happened to the names since. The handle stays open until it is done.
    let result = cas.upload_file(&digest, &proc_fd_path(&handle)).await;
    drop(handle);
    result
}

/// What the Command asked for, per path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requested {
    File,
    Directory,
    /// An `output_paths` entry: either.
    Path,
}

/// The kind of a node, read without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular,
    Directory,
    Symlink,
    Special(&'static str),
}

fn kind_of(meta: &Metadata) -> Kind {
    let t = meta.file_type();
    if t.is_file() {
        Kind::Regular
    } else if t.is_dir() {
        Kind::Directory
    } else if t.is_symlink() {
        Kind::Symlink
    } else if t.is_fifo() {
        Kind::Special("a fifo")
    } else if t.is_socket() {
        Kind::Special("a socket")
    } else if t.is_block_device() || t.is_char_device() {
        Kind::Special("a device")
    } else {
        Kind::Special("of an unknown type")
    }
}

fn metadata(handle: &File, shown: &str) -> Result<Metadata> {
    handle.metadata().map_err(|e| Error::internal(format!("output {}: cannot stat: {e}", quoted(shown))))
}

/// A collection that ran past its deadline, while doing `what`.
fn over_time(limits: &OutputLimits, what: &str) -> Error {
    Error::resource_exhausted(format!(
        "collecting the action's outputs took longer than the {} s a collection may take ({what}); \
         produce fewer or smaller outputs",
        limits.collect_time_max.as_secs_f64()
    ))
}

fn too_large(shown: &str, size: u64, max: u64) -> Error {
    Error::invalid_argument(format!("output {}: {size} bytes, more than the {max} allowed", quoted(shown)))
}

fn refused(shown: &str, why: &str) -> Error {
    Error::invalid_argument(format!("output {}: {why}", quoted(shown)))
}

fn open_directory(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::internal(format!("cannot open exec root {}: {e}", path.display())))
}

/// Opens `name` in `dir` without following or opening it (`O_PATH |
/// O_NOFOLLOW`); `None` when absent.
fn open_node(dir: &impl AsFd, name: &str, shown: &str) -> Result<Option<(File, Metadata)>> {
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match openat(dir.as_fd(), name, flags, Mode::empty()) {
        Ok(fd) => {
            let handle = File::from(fd);
            let meta = metadata(&handle, shown)?;
            Ok(Some((handle, meta)))
        }
        Err(Errno::ENOENT | Errno::ENOTDIR) => Ok(None),
        Err(e) => {
            Err(Error::internal(format!("output {}: cannot open {}: {e}", quoted(shown), quoted(name))))
        }
    }
}

/// Opens a directory node (an `O_PATH` handle checked to be a directory)
/// for reading. `"."` names the directory itself: nothing to follow.
fn reopen_directory(handle: &File, shown: &str) -> Result<OwnedFd> {
    openat(handle.as_fd(), ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::internal(format!("output {}: cannot open directory: {e}", quoted(shown))))
}

/// Walks `components` from `root`, never following a symlink: `None` when a
/// component is absent or not a directory; a symlink is refused.
fn walk(root: OwnedFd, components: &[String], shown: &str) -> Result<Option<OwnedFd>> {
    let mut current = root;
    for component in components {
        let Some((handle, meta)) = open_node(&current, component, shown)? else { return Ok(None) };
        match kind_of(&meta) {
            Kind::Directory => current = reopen_directory(&handle, shown)?,
            Kind::Symlink => {
                return Err(refused(
                    shown,
                    &format!(
                        "{} on its path is a symlink; symlinks on output paths are not followed",
                        quoted(component)
                    ),
                ));
            }
            Kind::Regular | Kind::Special(_) => return Ok(None),
        }
    }
    Ok(Some(current))
}

/// Hashes `handle`'s file (an `O_PATH` handle to a regular file, whose
/// metadata is `meta`) in one pass, keeping the bytes when `keep`; fails
/// once `until`'s deadline has passed.
fn hash_file(
    function: DigestFunction,
    handle: &File,
    meta: &Metadata,
    keep: bool,
    shown: &str,
    until: (&OutputLimits, Instant),
) -> Result<(Digest, Option<Bytes>)> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let mut file = File::from(
        nix::fcntl::open(&proc_fd_path(handle), flags, Mode::empty())
            .map_err(|e| Error::internal(format!("output {}: cannot open: {e}", quoted(shown))))?,
    );
    let size = meta.size();
    let mut hasher = function.hasher();
    let mut kept = if keep { Vec::with_capacity(usize::try_from(size).unwrap_or(0)) } else { Vec::new() };
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    let mut read_bytes: u64 = 0;
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| Error::internal(format!("output {}: cannot read: {e}", quoted(shown))))?;
        if n == 0 {
            break;
        }
        if Instant::now() > until.1 {
            return Err(over_time(until.0, &format!("hashing {}", quoted(shown))));
        }
        read_bytes += n as u64;
        if read_bytes > size {
            break;
        }
        hasher.update(&buffer[..n]);
        if keep {
            kept.extend_from_slice(&buffer[..n]);
        }
    }
    if read_bytes != size {
        return Err(Error::internal(format!("output {}: changed while it was read", quoted(shown))));
    }
    let digest = hasher.into_digest(size)?;
    Ok((digest, keep.then(|| Bytes::from(kept))))
}

/// The blocking part of a collection: walks and hashes the outputs.
struct Scanner<'a> {
    function: DigestFunction,
    limits: &'a OutputLimits,
    deadline: Instant,
    exec_root: &'a Path,
    /// The exec root's owner: the action's uid when it was given one.
    action_uid: u32,
    blobs: HashMap<Digest, Source>,
    /// Digests of files with several links, by (device, inode, size, mtime).
    inodes: HashMap<(u64, u64, u64, i64, i64), Digest>,
    entries: u64,
    inline_bytes: u64,
    stats: OutputStats,
}

impl<'a> Scanner<'a> {
    fn open(
        function: DigestFunction,
        exec_root: &'a Path,
        limits: &'a OutputLimits,
        deadline: Instant,
    ) -> Result<Self> {
        let root = File::from(open_directory(exec_root)?);
        let action_uid = metadata(&root, "")?.uid();
        Ok(Scanner {
            function,
            limits,
            deadline,
            exec_root,
            action_uid,
            blobs: HashMap::new(),
            inodes: HashMap::new(),
            entries: 0,
            inline_bytes: 0,
            stats: OutputStats::default(),
        })
    }

    #[allow(deprecated)] // output_files and output_directories: Bazel 4 uses them
    fn scan(&mut self, command: &Command) -> Result<CollectedOutputs> {
        let mut requested: Vec<(&String, Requested)> = Vec::new();
        if command.output_paths.is_empty() {
            requested.extend(command.output_files.iter().map(|p| (p, Requested::File)));
            requested.extend(command.output_directories.iter().map(|p| (p, Requested::Directory)));
        } else {
            requested.extend(command.output_paths.iter().map(|p| (p, Requested::Path)));
        }
        let mut out = CollectedOutputs::default();
        for (path, requested) in requested {
            self.scan_output(command, path, requested, &mut out)?;
        }
        out.stats = self.stats;
        Ok(out)
    }

    fn scan_output(
        &mut self,
        command: &Command,
        path: &str,
        requested: Requested,
        out: &mut CollectedOutputs,
    ) -> Result<()> {
        let components = resolve_output_path(&command.working_directory, path)?;
        let root = open_directory(self.exec_root)?;
        let (handle, meta) = match components.split_last() {
            Some((last, parents)) => {
                let Some(parent) = walk(root, parents, path)? else { return Ok(()) };
                let Some(node) = open_node(&parent, last, path)? else { return Ok(()) };
                node
            }
            None if requested == Requested::File => {
                return Err(refused(path, "an output file cannot be the working directory itself"));
            }
            None => {
                let handle = File::from(root);
                let meta = metadata(&handle, path)?;
                (handle, meta)
            }
        };
        let wrong_type = |what: &str| {
            Error::new(Code::FailedPrecondition, format!("output {} was listed as {what}", quoted(path)))
        };
        match (kind_of(&meta), requested) {
            (Kind::Regular, Requested::Directory) => return Err(wrong_type("a directory, but is a file")),
            (Kind::Directory, Requested::File) => return Err(wrong_type("a file, but is a directory")),
            (Kind::Special(what), _) => {
                return Err(refused(
                    path,
                    &format!("is {what}; outputs can be files, directories and symlinks"),
                ));
            }
            (Kind::Regular, _) => {
                let (digest, is_executable) = self.file(&handle, &meta, &components, path)?;
                out.output_files.push(OutputFile {
                    path: path.to_owned(),
                    digest: Some(digest.to_proto()),
                    is_executable,
                    ..Default::default()
                });
            }
            (Kind::Symlink, _) => {
                let target = self.symlink(&handle, path)?;
                let symlink = OutputSymlink { path: path.to_owned(), target, node_properties: None };
                match requested {
                    Requested::File => out.output_file_symlinks.push(symlink),
                    Requested::Directory => out.output_directory_symlinks.push(symlink),
                    Requested::Path => out.output_symlinks.push(symlink),
                }
            }
            (Kind::Directory, _) => {
                let fd = reopen_directory(&handle, path)?;
                let mut tree = HashMap::new();
                let mut components = components;
                let (root, root_digest) = self.directory(fd, &mut components, &mut tree)?;
                let tree = build_tree(self.function, root, &tree);
                let encoded = tree.encode_to_vec();
                let tree_digest = self.function.compute(&encoded);
                self.blobs.entry(tree_digest).or_insert(Source::Inline(Bytes::from(encoded)));
                out.output_directories.push(OutputDirectory {
                    path: path.to_owned(),
                    tree_digest: Some(tree_digest.to_proto()),
                    is_topologically_sorted: true,
                    root_directory_digest: Some(root_digest.to_proto()),
                });
            }
        }
        Ok(())
    }

    fn count_entry(&mut self, shown: &str) -> Result<()> {
        self.entries += 1;
        if self.entries > self.limits.entries_max {
            return Err(refused(
                shown,
                &format!("the outputs hold more than {} entries", self.limits.entries_max),
            ));
        }
        Ok(())
    }

    /// Hashes a regular file and records where its bytes are.
    fn file(
        &mut self,
        handle: &File,
        meta: &Metadata,
        components: &[String],
        shown: &str,
    ) -> Result<(Digest, bool)> {
        self.count_entry(shown)?;
        self.stats.files += 1;
        if meta.uid() != self.action_uid && meta.mode() & 0o004 == 0 {
            return Err(refused(shown, "is not the action's and not readable by others; not read"));
        }
        let size = meta.size();
        if size > self.limits.file_size_bytes_max {
            return Err(too_large(shown, size, self.limits.file_size_bytes_max));
        }
        self.stats.bytes = self.stats.bytes.saturating_add(size);
        if self.stats.bytes > self.limits.total_bytes_max {
            return Err(refused(
                shown,
                &format!("the outputs hold more than {} bytes", self.limits.total_bytes_max),
            ));
        }
        let is_executable = meta.mode() & 0o111 != 0;
        let identity = (meta.dev(), meta.ino(), size, meta.mtime(), meta.mtime_nsec());
        if meta.nlink() > 1
            && let Some(digest) = self.inodes.get(&identity)
        {
            return Ok((*digest, is_executable));
        }
        let keep = size <= self.limits.inline_file_bytes_max
            && self.inline_bytes + size <= self.limits.inline_total_bytes_max;
        let (digest, bytes) =
            hash_file(self.function, handle, meta, keep, shown, (self.limits, self.deadline))?;
        if meta.nlink() > 1 {
            self.inodes.insert(identity, digest);
        }
        if !self.blobs.contains_key(&digest) {
            let source = match bytes {
                Some(bytes) => {
                    self.inline_bytes += size;
                    Source::Inline(bytes)
                }
                None => {
                    Source::File { components: components.to_vec(), device: meta.dev(), inode: meta.ino() }
                }
            };
            self.blobs.insert(digest, source);
        }
        Ok((digest, is_executable))
    }

    /// A symlink's target text (never followed).
    fn symlink(&mut self, handle: &File, shown: &str) -> Result<String> {
        self.count_entry(shown)?;
        self.stats.symlinks += 1;
        let target = readlinkat(handle.as_fd(), "").map_err(|e| {
            Error::internal(format!("output {}: cannot read the symlink: {e}", quoted(shown)))
        })?;
        target.into_string().map_err(|_| refused(shown, "is a symlink whose target is not UTF-8"))
    }

    /// Reads a directory and everything below it, without recursion (one
    /// level of an explicit stack per directory being read, at most
    /// `depth_max` deep), adding every Directory to `tree`. `components` is
    /// the directory's path from the exec root; it is as given on return.
    fn directory(
        &mut self,
        fd: OwnedFd,
        components: &mut Vec<String>,
        tree: &mut HashMap<Digest, Directory>,
    ) -> Result<(Directory, Digest)> {
        let base = components.len();
        let mut stack = vec![self.level(fd, components)?];
        loop {
            let level = stack.last_mut().expect("the walk holds the level it reads");
            let Some(name) = level.names.pop() else {
                let done = stack.pop().expect("the walk holds the level it reads");
                let (directory, digest) = self.seal(done.directory, tree);
                let Some(parent) = stack.last_mut() else {
                    components.truncate(base);
                    return Ok((directory, digest));
                };
                let name = components.pop().unwrap_or_default();
                parent.directory.directories.push(DirectoryNode { name, digest: Some(digest.to_proto()) });
                continue;
            };
            components.push(name.clone());
            let child_shown = components.join("/");
            let Some((handle, meta)) = open_node(&level.dir, &name, &child_shown)? else {
                components.pop();
                continue;
            };
            match kind_of(&meta) {
                Kind::Regular => {
                    let (digest, is_executable) = self.file(&handle, &meta, components, &child_shown)?;
                    level.directory.files.push(FileNode {
                        name,
                        digest: Some(digest.to_proto()),
                        is_executable,
                        node_properties: None,
                    });
                }
                Kind::Directory => {
                    if stack.len() > self.limits.depth_max {
                        return Err(refused(
                            &child_shown,
                            &format!("nested more than {} levels deep", self.limits.depth_max),
                        ));
                    }
                    let fd = reopen_directory(&handle, &child_shown)?;
                    let next = self.level(fd, components)?;
                    // The name stays in `components` until the child is sealed.
                    stack.push(next);
                    continue;
                }
                Kind::Symlink => {
                    let target = self.symlink(&handle, &child_shown)?;
                    level.directory.symlinks.push(SymlinkNode { name, target, node_properties: None });
                }
                Kind::Special(what) => {
                    return Err(refused(
                        &child_shown,
                        &format!("is {what}; outputs can be files, directories and symlinks"),
                    ));
                }
            }
            components.pop();
        }
    }

    /// Opens one directory of the walk: its entries' names, in order.
    fn level(&mut self, fd: OwnedFd, components: &[String]) -> Result<Level> {
        let shown = components.join("/");
        self.count_entry(&shown)?;
        self.stats.directories += 1;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| {
            Error::internal(format!("output {}: cannot read the directory: {e}", quoted(&shown)))
        })?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| {
                Error::internal(format!("output {}: cannot read the directory: {e}", quoted(&shown)))
            })?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let Ok(name) = std::str::from_utf8(name) else {
                return Err(refused(&shown, "holds a name that is not UTF-8"));
            };
            if (names.len() as u64).saturating_add(self.entries) >= self.limits.entries_max {
                return Err(refused(
                    &shown,
                    &format!("the outputs hold more than {} entries", self.limits.entries_max),
                ));
            }
            names.push(name.to_owned());
        }
        // Taken from the end: in order.
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok(Level { dir, names, directory: Directory::default() })
    }

    /// A directory read whole: encoded, recorded, its digest.
    fn seal(&mut self, directory: Directory, tree: &mut HashMap<Digest, Directory>) -> (Directory, Digest) {
        let encoded = directory.encode_to_vec();
        let digest = self.function.compute(&encoded);
        self.blobs.entry(digest).or_insert(Source::Inline(Bytes::from(encoded)));
        tree.insert(digest, directory.clone());
        (directory, digest)
    }
}

/// One directory being read by [`Scanner::directory`]: the names still to
/// visit (last first) and the Directory built so far.
struct Level {
    dir: nix::dir::Dir,
    names: Vec<String>,
    directory: Directory,
}

/// The Tree of `root`: its children each once, parents before children.
fn build_tree(function: DigestFunction, root: Directory, directories: &HashMap<Digest, Directory>) -> Tree {
    let mut children = Vec::new();
    let mut seen = HashSet::new();
    let mut queue: VecDeque<&Directory> = VecDeque::from([&root]);
    while let Some(directory) = queue.pop_front() {
        for node in &directory.directories {
            // Every node was written by `Scanner::directory`, from a digest in the map.
            let Some(digest) = node.digest.as_ref().and_then(|d| Digest::from_proto(Some(function), d).ok())
            else {
                continue;
            };
            let Some(child) = directories.get(&digest) else { continue };
            if seen.insert(digest) {
                children.push(child.clone());
                queue.push_back(child);
            }
        }
    }
    drop(queue);
    Tree { root: Some(root), children }
}
