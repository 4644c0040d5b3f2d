//! The staging area: where the block store keeps an upload's bytes until
//! the upload is complete.
//!
//! A record in the ring is contiguous, so an upload's space can only be
//! taken whole. Taken at the first chunk, space for an upload that never
//! finishes makes the ring evict live blobs for bytes that never came (40
//! uploads that declare 60 MiB, send 70 KB and hang up would empty a
//! 256 MiB store). So uploads larger than a small blob are received into an
//! unnamed file here and copied into the ring at commit, into space of
//! exactly their size: **the ring advances only by bytes received, and only
//! for complete uploads.**
//!
//! The area is bounded in all ([`Staging::bytes_max`]) and per client
//! (half of it), charged by bytes actually received, never by what an
//! upload declares. A charge that does not fit is refused at once with
//! RESOURCE_EXHAUSTED (clients retry). An upload that is dropped or
//! forgotten gives its bytes back at once; the files have no name, so a
//! crash leaves nothing behind.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kiln_proto::limits::{
    BLOCK_STAGING_BYTES_MIN as STAGING_BYTES_MIN, BLOCK_STAGING_QUEUE_DEPTH as STAGING_QUEUE_DEPTH,
    BLOCK_STAGING_THREADS as STAGING_THREADS,
};
use kiln_proto::{Code, Error, Result};

use crate::store::Client;

/// How large a staging area is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagingSize {
    /// This, or half the free space where the area is, if less.
    Automatic(u64),
    /// What the operator set.
    Configured(u64),
}

/// The staging area of one store.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    bytes_max: u64,
    client_bytes_max: u64,
    held: Mutex<Held>,
    /// File I/O runs on the area's own threads, never on the caller's.
    jobs: async_channel::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, Default)]
struct Held {
    total: u64,
    clients: HashMap<Client, u64>,
}

impl Staging {
    /// A staging area in `dir` of at most `size` bytes, half of it per
    /// client. Checks that an unnamed file can be made there, so that a
    /// wrong directory stops the start rather than every large upload. An
    /// automatic size is also held to half the free space there, so that
    /// uploads in progress cannot fill the disk; a configured one larger
    /// than the free space is kept, with a warning.
    pub fn open(dir: &Path, size: StagingSize) -> Result<Arc<Staging>> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::new(
                Code::FailedPrecondition,
                format!("cannot create the upload staging directory {}: {e}", dir.display()),
            )
        })?;
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(u64::MAX);
        let bytes_max = match size {
            StagingSize::Automatic(bytes) => bytes.min(free / 2).max(STAGING_BYTES_MIN),
            StagingSize::Configured(bytes) => {
                if bytes > free {
                    tracing::warn!(
                        dir = %dir.display(),
                        upload_staging_bytes = bytes,
                        free_bytes = free,
                        "upload_staging_bytes is more than the free space there: uploads in progress may fill the disk (they then fail with RESOURCE_EXHAUSTED)"
                    );
                }
                bytes
            }
        };
        tracing::info!(dir = %dir.display(), bytes_max, "upload staging area");
        tempfile::tempfile_in(dir).map_err(|e| {
            Error::new(
                Code::FailedPrecondition,
                format!("cannot make files in the upload staging directory {}: {e}", dir.display()),
            )
        })?;
        let (jobs, queue) = async_channel::bounded::<Job>(STAGING_QUEUE_DEPTH);
        for i in 0..STAGING_THREADS {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("kiln-staging-{i}"))
                // Ends when the area is dropped (the queue closes).
                .spawn(move || {
                    while let Ok(job) = queue.recv_blocking() {
                        // A job that panicked drops its reply (the caller
                        // sees an error); the thread goes on.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
                .map_err(|e| Error::internal(format!("start a staging thread: {e}")))?;
        }
        Ok(Arc::new(Staging {
            dir: dir.to_path_buf(),
            bytes_max,
            client_bytes_max: bytes_max / 2,
            held: Mutex::new(Held::default()),
            jobs,
        }))
    }

    /// Runs blocking file I/O on the area's threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.send(job).await.map_err(|_| std::io::Error::other("the staging threads stopped"))?;
        rx.await.map_err(|_| std::io::Error::other("a staging thread stopped"))?
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// The most one client may hold, and so the largest blob it can send.
    pub fn client_bytes_max(&self) -> u64 {
        self.client_bytes_max
    }

    /// Bytes held by uploads in progress.
    pub fn held(&self) -> u64 {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn charge(&self, client: Client, bytes: u64) -> Result<()> {
        let mut held = self.lock();
        let mine = held.clients.get(&client).copied().unwrap_or(0);
        if held.total + bytes > self.bytes_max || mine + bytes > self.client_bytes_max {
            let total = held.total;
            drop(held);
            kiln_proto::metrics::global().store_staging_refusals.inc();
            return Err(Error::resource_exhausted(format!(
                "the store's upload staging area is full: uploads in progress hold {total} of {} bytes, \
                 this client {mine} of its {} bytes; retry later, or raise [storage] upload_staging_bytes",
                self.bytes_max, self.client_bytes_max
            )));
        }
        held.total += bytes;
        *held.clients.entry(client).or_insert(0) += bytes;
        drop(held);
        kiln_proto::metrics::global().store_staged_bytes.inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
        Ok(())
    }

    fn release(&self, client: Client, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut held = self.lock();
        assert!(held.total >= bytes, "staging releases more than it holds");
        held.total -= bytes;
        if let Some(mine) = held.clients.get_mut(&client) {
            *mine -= bytes.min(*mine);
            if *mine == 0 {
                held.clients.remove(&client);
            }
        }
        drop(held);
        kiln_proto::metrics::global().store_staged_bytes.dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// One upload's bytes in the staging area; gives them back when dropped.
#[derive(Debug)]
pub struct StagedFile {
    staging: Arc<Staging>,
    client: Client,
    /// Made at the first byte.
    file: Option<Arc<File>>,
    len: u64,
    /// Charged for an append in progress: given back with the rest if the
    /// append is cancelled (its caller dropped mid-write).
    appending: u64,
}

impl StagedFile {
    pub fn new(staging: Arc<Staging>, client: Client) -> StagedFile {
        StagedFile { staging, client, file: None, len: 0, appending: 0 }
    }

    /// Bytes staged so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data`; on an error nothing of it counts. After a cancelled
    /// append the file is refused: its write may still land.
    pub async fn append(&mut self, data: Bytes) -> Result<()> {
        if self.appending > 0 {
            return Err(Error::new(
                Code::Unavailable,
                "an earlier write to this upload was interrupted; upload it again from the start",
            ));
        }
        let n = data.len() as u64;
        self.staging.charge(self.client, n)?;
        self.appending = n;
        let result = self.write_at(data).await;
        self.appending = 0;
        match result {
            Ok(()) => {
                self.len += n;
                Ok(())
            }
            Err(e) => {
                self.staging.release(self.client, n);
                Err(e)
            }
        }
    }

    async fn write_at(&mut self, data: Bytes) -> Result<()> {
        let file = match &self.file {
            Some(file) => file.clone(),
            None => {
                let dir = self.staging.dir.clone();
                let file = self
                    .staging
                    .blocking(move || tempfile::tempfile_in(&dir))
                    .await
                    .map_err(|e| self.error(&e))?;
                let file = Arc::new(file);
                self.file = Some(file.clone());
                file
            }
        };
        let at = self.len;
        self.staging.blocking(move || file.write_all_at(&data, at)).await.map_err(|e| self.error(&e))
    }

    /// Reads `len` bytes at `at` (within what was staged).
    pub async fn read(&self, at: u64, len: usize) -> Result<Bytes> {
        assert!(at + len as u64 <= self.len, "reading past the staged bytes");
        let Some(file) = self.file.clone() else { return Ok(Bytes::new()) };
        self.staging
            .blocking(move || {
                let mut buf = vec![0; len];
                file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
            })
            .await
            .map_err(|e| self.error(&e))
    }

    fn error(&self, e: &std::io::Error) -> Error {
        let dir = self.staging.dir.display();
        if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
            Error::resource_exhausted(format!("no space left to stage the upload in {dir}: {e}; retry later"))
        } else {
            Error::new(Code::Unavailable, format!("staging the upload in {dir} failed: {e}"))
        }
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        self.staging.release(self.client, self.len + self.appending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    /// An append whose caller gives up mid-write (a client that hangs up)
    /// leaves no charge behind, and the upload cannot go on from a file its
    /// cancelled write may still change.
    #[test]
    fn a_cancelled_append_gives_its_bytes_back() {
        use std::future::Future;
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(dir.path(), StagingSize::Configured(1 << 20)).unwrap();
        let mut file = StagedFile::new(staging.clone(), None);
        {
            let append = file.append(Bytes::from(vec![1; 1000]));
            futures::pin_mut!(append);
            let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
            // Charged, the write handed to a staging thread: then dropped.
            assert!(append.as_mut().poll(&mut cx).is_pending());
            assert_eq!(staging.held(), 1000);
        }
        let err = block_on(file.append(Bytes::from(vec![2; 500]))).unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert_eq!((file.len(), staging.held()), (0, 1000));
        drop(file);
        assert_eq!(staging.held(), 0, "a cancelled append kept its charge");
    }

    #[test]
    fn bytes_are_charged_as_received_and_given_back_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(&dir.path().join("staging"), StagingSize::Configured(1000)).unwrap();
        let a: Client = Some("10.0.0.1".parse().unwrap());
        let b: Client = Some("10.0.0.2".parse().unwrap());
        let mut first = StagedFile::new(staging.clone(), a);
        block_on(first.append(Bytes::from(vec![7; 300]))).unwrap();
        block_on(first.append(Bytes::from(vec![8; 200]))).unwrap();
        assert_eq!(staging.held(), 500);
        // Past its share (500): refused, and nothing counts.
        let err = block_on(first.append(Bytes::from(vec![9; 1]))).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.message().contains("upload_staging_bytes"), "{}", err.message());
        assert_eq!((first.len(), staging.held()), (500, 500));
        // Another client still has its share.
        let mut second = StagedFile::new(staging.clone(), b);
        block_on(second.append(Bytes::from(vec![1; 500]))).unwrap();
        assert_eq!(block_on(first.read(250, 100)).unwrap()[..], [[7u8; 50], [8u8; 50]].concat()[..]);
        drop(first);
        assert_eq!(staging.held(), 500);
        drop(second);
        assert_eq!(staging.held(), 0);
    }

    /// An automatic size never exceeds half the free space, nor goes under
    /// the minimum; a configured one is what was configured.
    #[test]
    fn an_automatic_size_leaves_the_disk_room() {
        let dir = tempfile::tempdir().unwrap();
        let free = nix::sys::statvfs::statvfs(dir.path())
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap();
        let huge = Staging::open(dir.path(), StagingSize::Automatic(u64::MAX / 4)).unwrap();
        assert!(huge.bytes_max() <= free / 2 + (64 << 20), "{} of {free} free", huge.bytes_max());
        let tiny = Staging::open(dir.path(), StagingSize::Automatic(1)).unwrap();
        assert_eq!(tiny.bytes_max(), STAGING_BYTES_MIN);
        let set = Staging::open(dir.path(), StagingSize::Configured(u64::MAX / 4)).unwrap();
        assert_eq!(set.bytes_max(), u64::MAX / 4);
    }

    #[test]
    fn a_directory_that_cannot_hold_files_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = Staging::open(&file, StagingSize::Configured(1 << 20)).unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("staging directory"), "{}", err.message());
    }
}
