//! The local content-addressed file cache that input files are hard-linked
//! from.
//!
//! An entry is one file per (digest, executable bit): `entries/NAME`, where
//! NAME is `{function}-{hash}-{size}-{x|r}`, mode 0555 (`x`) or 0444 (`r`),
//! owned by the worker's uid. The two modes are kept apart because a hard
//! link shares the inode, and with it the mode: an input that is executable
//! in one action and not in another needs two inodes. Files reach
//! `entries/` only by `rename` from `tmp/`, after the CAS client verified
//! the bytes and the size and mode were checked, so a name in `entries/`
//! never shows a half-written file.
//!
//! The cache is bounded by bytes, evicting the least recently used entries
//! (eviction is `unlink`). Two things are not counted against the capacity:
//! an entry that was evicted while hard links to it remain in exec roots
//! (the links keep the inode alive until the exec root is removed, but the
//! cache no longer knows the bytes), and copies made when an inode reached
//! the filesystem's link limit. Entries in use ([`PinnedEntry`]) are never
//! evicted; while a materialization holds more than the capacity, the cache
//! exceeds it until the pins are dropped.
//!
//! Concurrent requests for the same missing entry fetch it once
//! (single-flight): the first fetches, the others wait for its outcome and
//! share it, errors included. A fetch whose future is dropped hands the
//! work to one of the waiters.
//!
//! On [`FileCache::open`], existing entries are reused: each must parse as
//! an entry name and be a regular file owned by the worker's uid, with the
//! entry's mode and exactly its digest's size; anything else is removed.
//! Contents are not rehashed (that would read the whole cache at every
//! start); entries are root-owned and read-only, so only root or the disk
//! can change them. `tmp/` is wiped. An exclusive `flock` on `lock` keeps a
//! second worker off the same directory.
//!
//! Linking happens in the worker, outside any sandbox, so that
//! `fs.protected_hardlinks` does not apply; the cache directory is 0700.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_proto::{Code, Digest, DigestFunction, Error, Result};
use lru::LruCache;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::watch;

use crate::cas::CasClient;

/// Mode of a cache entry (and of every hard link to it) for an executable file.
pub const EXECUTABLE_MODE: u32 = 0o555;
/// Mode of a cache entry for a non-executable file.
pub const READ_ONLY_MODE: u32 = 0o444;
/// Mode of the cache directory and its subdirectories: the worker's alone.
const CACHE_DIR_MODE: u32 = 0o700;

/// What identifies an entry: the blob and the executable bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    digest: Digest,
    executable: bool,
}

impl Key {
    fn mode(self) -> u32 {
        if self.executable { EXECUTABLE_MODE } else { READ_ONLY_MODE }
    }

    fn file_name(self) -> String {
        let digest = self.digest;
        let x = if self.executable { 'x' } else { 'r' };
        format!("{}-{}-{}-{x}", digest.function().name(), digest.hash_hex(), digest.size_bytes())
    }

    fn parse(name: &str) -> Option<Key> {
        let mut parts = name.split('-');
        let function = DigestFunction::from_name(parts.next()?)?;
        let hash = parts.next()?;
        let size: i64 = parts.next()?.parse().ok()?;
        let executable = match parts.next()? {
            "x" => true,
            "r" => false,
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        let digest = Digest::parse(Some(function), hash, size).ok()?;
        Some(Key { digest, executable })
    }
}

/// A present entry.
#[derive(Debug)]
struct Entry {
    size_bytes: u64,
    /// Holders of a [`PinnedEntry`]; a pinned entry is never evicted.
    pins: u32,
}

/// What a fetch in flight will report to those waiting for it.
type FetchOutcome = watch::Receiver<Option<Result<()>>>;

#[derive(Debug)]
struct State {
    /// Present entries, least recently used last.
    lru: LruCache<Key, Entry>,
    /// Fetches in flight.
    inflight: HashMap<Key, FetchOutcome>,
    /// Bytes of present entries.
    bytes: u64,
    /// Bytes of present entries that are pinned.
    pinned_bytes: u64,
    hits: u64,
    misses: u64,
    joined: u64,
    evictions: u64,
}

struct Inner {
    dir: PathBuf,
    entries: PathBuf,
    tmp: PathBuf,
    device: u64,
    capacity_bytes: u64,
    state: Mutex<State>,
    link_copies: AtomicU64,
    /// Held for the cache's lifetime: one worker per directory.
    _lock: Flock<File>,
}

/// The local file cache; cheap to clone (all clones share one cache).
#[derive(Clone)]
pub struct FileCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCache")
            .field("dir", &self.inner.dir)
            .field("capacity_bytes", &self.inner.capacity_bytes)
            .finish_non_exhaustive()
    }
}

/// Counters and sizes, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Requests served by an entry that was present.
    pub hits: u64,
    /// Requests that fetched the entry (from the CAS, or by copying the
    /// entry of the other mode).
    pub misses: u64,
    /// Requests that waited for another request's fetch of the same entry.
    pub joined: u64,
    /// Entries removed to stay within the capacity.
    pub evictions: u64,
    /// Links that fell back to a copy because the inode had too many links.
    pub link_copies: u64,
    /// Bytes of present entries.
    pub bytes: u64,
    /// Present entries.
    pub entries: u64,
}

/// How a request for an entry was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The entry was present.
    Hit,
    /// Another request was fetching it; this one waited.
    Joined,
    /// This request fetched it.
    Fetched,
}

/// How [`PinnedEntry::link_to`] placed the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// A hard link to the entry's inode.
    Linked,
    /// A copy, because the inode had reached the filesystem's link limit.
    Copied,
}

fn internal_io(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::internal(format!("file cache: {what} {}: {e}", path.display()))
}

fn join_error(e: &tokio::task::JoinError) -> Error {
    Error::internal(format!("file cache: a blocking task failed: {e}"))
}

impl FileCache {
    /// Opens (creating it if needed) the cache in `dir`, holding at most
    /// `capacity_bytes` of entries. Existing entries are checked and reused
    /// (see the module documentation); when they exceed the capacity, the
    /// oldest (by modification time) are evicted.
    pub fn open(dir: &Path, capacity_bytes: u64) -> Result<FileCache> {
        let entries = dir.join("entries");
        let tmp = dir.join("tmp");
        for d in [dir, &entries, &tmp] {
            fs::create_dir_all(d).map_err(|e| internal_io("cannot create", d, &e))?;
            fs::set_permissions(d, fs::Permissions::from_mode(CACHE_DIR_MODE))
                .map_err(|e| internal_io("cannot set the mode of", d, &e))?;
        }
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| internal_io("cannot open", &lock_path, &e))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            Error::new(
                Code::FailedPrecondition,
                format!("file cache {}: locked by another process ({errno})", dir.display()),
            )
        })?;
        let device = fs::metadata(dir).map_err(|e| internal_io("cannot stat", dir, &e))?.dev();

        // A temporary file is a fetch that never finished.
        crate::remove::remove_tree(&tmp).map_err(|e| internal_io("cannot clear", &tmp, &e))?;
        fs::create_dir(&tmp).map_err(|e| internal_io("cannot create", &tmp, &e))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(CACHE_DIR_MODE))
            .map_err(|e| internal_io("cannot set the mode of", &tmp, &e))?;

        let found = scan_entries(&entries)?;
        let mut state = State {
            lru: LruCache::unbounded(),
            inflight: HashMap::new(),
            bytes: 0,
            pinned_bytes: 0,
            hits: 0,
            misses: 0,
            joined: 0,
            evictions: 0,
        };
        for (key, _) in found {
            state.bytes += key.digest.size_bytes();
            state.lru.push(key, Entry { size_bytes: key.digest.size_bytes(), pins: 0 });
        }
        let inner = Inner {
            dir: dir.to_owned(),
            entries,
            tmp,
            device,
            capacity_bytes,
            state: Mutex::new(state),
            link_copies: AtomicU64::new(0),
            _lock: lock,
        };
        {
            let mut state = inner.lock();
            inner.trim(&mut state);
        }
        Ok(FileCache { inner: Arc::new(inner) })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes
    }

    /// FAILED_PRECONDITION unless `other` (a build root) is on the cache's
    /// filesystem, which hard links need.
    pub fn check_same_filesystem(&self, other: &Path) -> Result<()> {
        let device = fs::metadata(other).map_err(|e| internal_io("cannot stat", other, &e))?.dev();
        if device != self.inner.device {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "file cache {} and {} are on different filesystems; hard links need one",
                    self.inner.dir.display(),
                    other.display()
                ),
            ));
        }
        Ok(())
    }

    pub fn stats(&self) -> CacheStats {
        let state = self.inner.lock();
        CacheStats {
            hits: state.hits,
            misses: state.misses,
            joined: state.joined,
            evictions: state.evictions,
            link_copies: self.inner.link_copies.load(Ordering::Relaxed),
            bytes: state.bytes,
            entries: state.lru.len() as u64,
        }
    }

    /// Whether the entry is present (without touching its recency).
    pub fn contains(&self, digest: &Digest, executable: bool) -> bool {
        self.inner.lock().lru.contains(&Key { digest: *digest, executable })
    }

    /// The path of the entry's file, present or not (for tests and
    /// diagnostics; link through [`PinnedEntry`] instead).
    pub fn entry_path(&self, digest: &Digest, executable: bool) -> PathBuf {
        self.inner.entry_path(Key { digest: *digest, executable })
    }

    /// Ensures the entry exists and hard-links it to `dest` (a copy, owned
    /// by the worker with the same mode, when the inode has too many links).
    pub async fn link_into<C: CasClient>(
        &self,
        cas: &C,
        digest: &Digest,
        executable: bool,
        dest: &Path,
    ) -> Result<()> {
        let entry = self.acquire(cas, digest, executable).await?;
        let dest = dest.to_owned();
        tokio::task::spawn_blocking(move || entry.link_to(&dest).map(|_| ()))
            .await
            .map_err(|e| join_error(&e))?
    }

    /// Ensures the entry exists and pins it until the returned handle is
    /// dropped. NOT_FOUND (naming the digest) when the CAS lacks the blob.
    pub async fn acquire<C: CasClient>(
        &self,
        cas: &C,
        digest: &Digest,
        executable: bool,
    ) -> Result<PinnedEntry> {
        let key = Key { digest: *digest, executable };
        let sender = loop {
            let mut outcome = {
                let mut state = self.inner.lock();
                if let Some(pinned) = self.inner.pin(&mut state, key, Acquired::Hit) {
                    state.hits += 1;
                    return Ok(pinned);
                }
                match state.inflight.get(&key).cloned() {
                    Some(outcome) => {
                        state.joined += 1;
                        outcome
                    }
                    None => {
                        let (sender, receiver) = watch::channel(None);
                        state.inflight.insert(key, receiver);
                        state.misses += 1;
                        break sender;
                    }
                }
            };
            // The fetcher reports its outcome, or drops the sender when its
            // future is dropped; then one of the waiters takes over.
            let failed = match outcome.wait_for(Option::is_some).await {
                Ok(result) => result.as_ref().and_then(|r| r.as_ref().err().cloned()),
                Err(_) => None,
            };
            if let Some(error) = failed {
                return Err(error);
            }
            let pinned = {
                let mut state = self.inner.lock();
                self.inner.pin(&mut state, key, Acquired::Joined)
            };
            if let Some(pinned) = pinned {
                return Ok(pinned);
            }
            // Evicted already, or the fetcher gave up: try again.
        };
        let mut flight = Flight { inner: &self.inner, key, sender: Some(sender) };
        let result = self.fetch(cas, key).await;
        flight.finish(result)
    }

    /// Fetches `key` into a temporary file and renames it into place.
    async fn fetch<C: CasClient>(&self, cas: &C, key: Key) -> Result<()> {
        let tmp = self.inner.tmp.join(uuid::Uuid::new_v4().simple().to_string());
        let cleanup = RemoveOnDrop(Some(tmp.clone()));
        let other = Key { executable: !key.executable, ..key };
        if key.digest.is_empty_blob() {
            // Every CAS holds the empty blob implicitly; nothing to fetch.
            File::create(&tmp).map_err(|e| internal_io("cannot create", &tmp, &e))?;
        } else if let Some(source) = self.inner.try_pin(other) {
            // The other mode's entry has the bytes already.
            let dest = tmp.clone();
            tokio::task::spawn_blocking(move || {
                fs::copy(&source.path, &dest).map_err(|e| internal_io("cannot copy to", &dest, &e))
            })
            .await
            .map_err(|e| join_error(&e))??;
        } else {
            cas.read_to_file(&key.digest, &tmp)
                .await
                .map_err(|e| e.context(format!("fetching {}", key.digest)))?;
        }
        let dest = self.inner.entry_path(key);
        tokio::task::spawn_blocking(move || {
            let meta = fs::symlink_metadata(&tmp).map_err(|e| internal_io("cannot stat", &tmp, &e))?;
            if !meta.is_file() || meta.len() != key.digest.size_bytes() {
                return Err(Error::internal(format!(
                    "file cache: blob {} was written as {} bytes ({:?})",
                    key.digest,
                    meta.len(),
                    meta.file_type()
                )));
            }
            fs::set_permissions(&tmp, fs::Permissions::from_mode(key.mode()))
                .map_err(|e| internal_io("cannot set the mode of", &tmp, &e))?;
            fs::rename(&tmp, &dest).map_err(|e| internal_io("cannot rename into", &dest, &e))?;
            Ok(())
        })
        .await
        .map_err(|e| join_error(&e))??;
        cleanup.disarm();
        Ok(())
    }
}

/// A fetch in flight. Dropped without [`Flight::finish`] (the future was
/// dropped), it withdraws the fetch so that a waiter takes over.
struct Flight<'a> {
    inner: &'a Arc<Inner>,
    key: Key,
    sender: Option<watch::Sender<Option<Result<()>>>>,
}

impl Flight<'_> {
    fn finish(&mut self, result: Result<()>) -> Result<PinnedEntry> {
        let mut state = self.inner.lock();
        state.inflight.remove(&self.key);
        let outcome = match result {
            Ok(()) => {
                let size_bytes = self.key.digest.size_bytes();
                state.lru.push(self.key, Entry { size_bytes, pins: 1 });
                state.bytes += size_bytes;
                state.pinned_bytes += size_bytes;
                self.inner.trim(&mut state);
                Ok(PinnedEntry {
                    inner: Arc::clone(self.inner),
                    key: self.key,
                    path: self.inner.entry_path(self.key),
                    acquired: Acquired::Fetched,
                })
            }
            Err(e) => Err(e),
        };
        drop(state);
        if let Some(sender) = self.sender.take() {
            sender.send_replace(Some(outcome.as_ref().map(|_| ()).map_err(Clone::clone)));
        }
        outcome
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if self.sender.is_some() {
            self.inner.lock().inflight.remove(&self.key);
            // Dropping the sender wakes the waiters.
            self.sender = None;
        }
    }
}

/// Removes a temporary file unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters at worst stale.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn entry_path(&self, key: Key) -> PathBuf {
        self.entries.join(key.file_name())
    }

    fn pin(self: &Arc<Self>, state: &mut State, key: Key, acquired: Acquired) -> Option<PinnedEntry> {
        let entry = state.lru.get_mut(&key)?;
        entry.pins += 1;
        if entry.pins == 1 {
            state.pinned_bytes += entry.size_bytes;
        }
        Some(PinnedEntry { inner: Arc::clone(self), key, path: self.entry_path(key), acquired })
    }

    fn try_pin(self: &Arc<Self>, key: Key) -> Option<PinnedEntry> {
        let mut state = self.lock();
        self.pin(&mut state, key, Acquired::Hit)
    }

    /// Evicts unpinned entries, least recently used first, until the bytes
    /// fit the capacity or only pinned entries remain.
    fn trim(&self, state: &mut State) {
        while state.bytes > self.capacity_bytes && state.bytes > state.pinned_bytes {
            let victim = state.lru.iter().rev().find(|(_, e)| e.pins == 0).map(|(k, _)| *k);
            let Some(key) = victim else { break };
            let Some(entry) = state.lru.pop(&key) else { break };
            state.bytes -= entry.size_bytes;
            state.evictions += 1;
            // Unlinked under the lock, so that a new fetch of the same key
            // cannot rename its file into place first and lose it here.
            let path = self.entry_path(key);
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "file cache: cannot evict entry");
            }
        }
    }
}

/// Reads `entries/` at start-up: the entries to reuse, oldest first.
/// Removes whatever is not a sound entry.
fn scan_entries(entries: &Path) -> Result<Vec<(Key, i64)>> {
    let uid = nix::unistd::geteuid().as_raw();
    let mut found = Vec::new();
    let listing = fs::read_dir(entries).map_err(|e| internal_io("cannot list", entries, &e))?;
    for item in listing {
        let item = item.map_err(|e| internal_io("cannot list", entries, &e))?;
        let path = item.path();
        let key = item.file_name().to_str().and_then(Key::parse);
        let meta = fs::symlink_metadata(&path).map_err(|e| internal_io("cannot stat", &path, &e))?;
        let sound = key.is_some_and(|key| {
            meta.is_file()
                && meta.uid() == uid
                && meta.mode() & 0o7777 == key.mode()
                && meta.len() == key.digest.size_bytes()
        });
        match key {
            Some(key) if sound => found.push((key, meta.mtime())),
            _ => {
                tracing::warn!(path = %path.display(), "file cache: removing an unsound entry");
                let removed = crate::remove::remove_tree(&path);
                removed.map_err(|e| internal_io("cannot remove", &path, &e))?;
            }
        }
    }
    found.sort_by_key(|&(_, mtime)| mtime);
    Ok(found)
}

/// An entry that stays in the cache until this handle is dropped.
pub struct PinnedEntry {
    inner: Arc<Inner>,
    key: Key,
    path: PathBuf,
    acquired: Acquired,
}

impl std::fmt::Debug for PinnedEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedEntry").field("path", &self.path).field("acquired", &self.acquired).finish()
    }
}

impl PinnedEntry {
    /// The entry's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn digest(&self) -> &Digest {
        &self.key.digest
    }

    pub fn executable(&self) -> bool {
        self.key.executable
    }

    /// How the request for this entry was served.
    pub fn acquired(&self) -> Acquired {
        self.acquired
    }

    /// Hard-links the entry to `dest`, which must not exist. When the inode
    /// has reached the filesystem's link limit (EMLINK; 65,000 on ext4),
    /// writes a copy instead, owned by the worker, with the entry's mode.
    /// Blocking: call it from a blocking context.
    pub fn link_to(&self, dest: &Path) -> Result<Placed> {
        self.link_or_copy(dest, true)?.ok_or_else(|| Error::internal("a copy allowed was not made"))
    }

    /// [`PinnedEntry::link_to`], copying past the link limit only when
    /// `may_copy`; `None` when the limit is reached and it may not.
    pub fn link_or_copy(&self, dest: &Path, may_copy: bool) -> Result<Option<Placed>> {
        match fs::hard_link(&self.path, dest) {
            Ok(()) => Ok(Some(Placed::Linked)),
            Err(e) if e.raw_os_error() == Some(Errno::EMLINK as i32) => {
                if !may_copy {
                    return Ok(None);
                }
                self.copy_to(dest)?;
                self.inner.link_copies.fetch_add(1, Ordering::Relaxed);
                Ok(Some(Placed::Copied))
            }
            Err(e) if e.raw_os_error() == Some(Errno::EXDEV as i32) => Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "file cache {} and {} are on different filesystems; hard links need one",
                    self.inner.dir.display(),
                    dest.display()
                ),
            )),
            Err(e) => Err(internal_io("cannot link", dest, &e)),
        }
    }

    fn copy_to(&self, dest: &Path) -> Result<()> {
        let mode = self.key.mode();
        let mut source = File::open(&self.path).map_err(|e| internal_io("cannot open", &self.path, &e))?;
        let mut copy = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(dest)
            .map_err(|e| internal_io("cannot create", dest, &e))?;
        std::io::copy(&mut source, &mut copy).map_err(|e| internal_io("cannot copy to", dest, &e))?;
        // The umask may have taken bits away at creation.
        copy.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| internal_io("cannot set the mode of", dest, &e))?;
        Ok(())
    }
}

impl Drop for PinnedEntry {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(entry) = state.lru.peek_mut(&self.key) {
            entry.pins -= 1;
            if entry.pins == 0 {
                state.pinned_bytes -= entry.size_bytes;
                self.inner.trim(&mut state);
            }
        }
    }
}
