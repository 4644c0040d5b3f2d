//! The device seam: where the block store's bytes live.
//!
//! [`BlockDevice`] is a fixed-size array of bytes with positioned reads and
//! writes and a sync. [`FileDevice`] is the real one: one preallocated file
//! or a raw block device. Tests use [`super::faulty::FaultyDevice`], which
//! injects I/O errors, torn writes and power cuts from a seed.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};

use nix::fcntl::{Flock, FlockArg};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Positioned I/O on a fixed-size device.
pub trait BlockDevice: std::fmt::Debug + Send + Sync + 'static {
    /// Size in bytes.
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from `offset`; a short read (past the end, a truncated
    /// file) is an error, never a partial result.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;

    /// Makes the device at least `len` bytes long, the new bytes allocated
    /// and zero (a growing index file); devices of a fixed size refuse.
    fn grow(&self, len: u64) -> io::Result<()> {
        if len <= self.len() {
            return Ok(());
        }
        Err(io::Error::new(io::ErrorKind::Unsupported, format!("{} cannot grow", self.describe())))
    }

    /// The file descriptor, for io_uring; `None` for devices without one.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    /// Where the bytes live, for messages.
    fn describe(&self) -> String;
}

/// A preallocated file or a raw block device, held under an exclusive
/// lock for as long as it is open.
#[derive(Debug)]
pub struct FileDevice {
    file: Flock<File>,
    path: PathBuf,
    len: AtomicU64,
    block_device: bool,
}

impl FileDevice {
    /// Opens `path`: a block device as it is, a regular file created (or
    /// grown) to `size_bytes` with every block allocated, so that writes
    /// never find the disk full later.
    pub fn open(path: &Path, size_bytes: u64) -> io::Result<FileDevice> {
        let mut dev = Self::open_locked(path)?;
        if !dev.block_device {
            dev.allocate(size_bytes.max(dev.len()))?;
            *dev.len.get_mut() = size_bytes;
        }
        Ok(dev)
    }

    /// Opens `path` as it is (a regular file is created empty if missing),
    /// locked: a second process (or a second open in this one) is refused
    /// with a message naming the holder. A block device is also opened with
    /// `O_EXCL`, which the kernel refuses while anything else holds it so
    /// (a mounted filesystem, another exclusive opener).
    pub fn open_locked(path: &Path) -> io::Result<FileDevice> {
        let block_device = Self::is_block_device(path);
        let mut flags = nix::libc::O_CLOEXEC;
        if block_device {
            flags |= nix::libc::O_EXCL;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!block_device)
            .truncate(false)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| {
                if block_device && e.raw_os_error() == Some(nix::libc::EBUSY) {
                    io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!(
                            "{} is in use (mounted, or opened exclusively by another process)",
                            path.display()
                        ),
                    )
                } else {
                    e
                }
            })?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "{} is locked by {}; two Kiln processes must not share a store file: give each its own paths",
                        path.display(),
                        lock_holder(&file)
                    ),
                ));
            }
            Err((_, e)) => return Err(io::Error::from(e)),
        };
        let meta = file.metadata()?;
        let len = if block_device {
            let mut f: &File = &file;
            f.seek(SeekFrom::End(0))?
        } else {
            meta.len()
        };
        Ok(FileDevice { file, path: path.to_owned(), len: AtomicU64::new(len), block_device })
    }

    /// Whether `path` names a block device.
    pub fn is_block_device(path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
    }

    /// Whether this is a raw block device (not a regular file).
    pub fn block_device(&self) -> bool {
        self.block_device
    }

    /// Bytes the filesystem has allocated to a regular file (holes not
    /// counted); a block device's length.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        if self.block_device {
            return Ok(self.len());
        }
        Ok(self.file.metadata()?.blocks().saturating_mul(512))
    }

    /// Makes a regular file `size_bytes` long with every block allocated,
    /// filling any holes (their bytes read as zeros, as before); the data
    /// already there is kept.
    pub fn allocate(&mut self, size_bytes: u64) -> io::Result<()> {
        if self.block_device {
            return Ok(());
        }
        allocate(&self.file, size_bytes)?;
        let len = self.len.get_mut();
        *len = (*len).max(size_bytes);
        Ok(())
    }

    /// Names the file by its new path after a rename.
    pub fn renamed(&mut self, path: &Path) {
        path.clone_into(&mut self.path);
    }

    /// Uses only the first `len` bytes (a store smaller than its file).
    pub fn limit(&mut self, len: u64) {
        let now = self.len.get_mut();
        *now = (*now).min(len);
    }
}

/// Allocates every byte of `file` up to `size_bytes`: `fallocate`, not a
/// sparse file, so the filesystem has the space now.
fn allocate(file: &File, size_bytes: u64) -> io::Result<()> {
    let len = i64::try_from(size_bytes).map_err(|_| io::Error::other("store size does not fit in off_t"))?;
    nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len).map_err(io::Error::from)
}

/// Who holds the lock on `file`, from /proc/locks: "process 123 (kiln)",
/// or "another process" when it cannot be told.
fn lock_holder(file: &File) -> String {
    let Ok(meta) = file.metadata() else { return "another process".into() };
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        if fields.len() >= 6 && fields[1] == "FLOCK" && fields[5] == wanted {
            let pid = fields[4];
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            return match comm.trim() {
                "" => format!("process {pid}"),
                name => format!("process {pid} ({name})"),
            };
        }
    }
    "another process".into()
}

impl BlockDevice for FileDevice {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, data.len(), self.len())?;
        self.file.write_all_at(data, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// A regular file is allocated to `len` (the disk may be full: then an
    /// error, and nothing changes); a block device cannot grow.
    fn grow(&self, len: u64) -> io::Result<()> {
        if len <= self.len() {
            return Ok(());
        }
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} is a block device and cannot grow", self.path.display()),
            ));
        }
        allocate(&self.file, len)?;
        self.len.fetch_max(len, Ordering::AcqRel);
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Refuses I/O outside the device.
pub fn check_range(offset: u64, len: usize, device_len: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= device_len => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("I/O at {offset}+{len} is outside the device ({device_len} bytes)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

    use super::*;

    #[test]
    fn files_are_allocated_not_sparse_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let dev = FileDevice::open(&path, 8 << 20).unwrap();
        assert_eq!(dev.len(), 8 << 20);
        let meta = std::fs::metadata(&path).unwrap();
        assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 >= 8 << 20, "the file is sparse");
        dev.write_at(b"kiln", 100).unwrap();
        let mut buf = [0u8; 4];
        dev.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"kiln");
        assert!(dev.read_at(&mut buf, (8 << 20) - 2).is_err());
        assert!(dev.write_at(b"x", 8 << 20).is_err());
        dev.sync().unwrap();
        assert!(dev.raw_fd().is_some());
    }

    #[test]
    fn a_truncated_file_gives_errors_not_signals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let dev = FileDevice::open(&path, 1 << 20).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
        let mut buf = [0u8; 16];
        let err = dev.read_at(&mut buf, 8192).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
