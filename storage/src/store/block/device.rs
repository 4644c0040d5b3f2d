//! The device seam: where the block store's bytes live.
//!
//! [`BlockDevice`] is a fixed-size array of bytes with positioned reads and
//! writes and a sync. [`FileDevice`] is the real one: one preallocated file
//! or a raw block device. Tests use [`super::faulty::FaultyDevice`], which
//! injects I/O errors, torn writes and power cuts from a seed.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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

    /// The file descriptor, for io_uring; `None` for devices without one.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    /// Where the bytes live, for messages.
    fn describe(&self) -> String;
}

/// A preallocated file or a raw block device.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    len: u64,
}

impl FileDevice {
    /// Opens `path`: a block device as it is, a regular file created (or
    /// grown) to `size_bytes` with every block allocated, so that writes
    /// never find the disk full later.
    pub fn open(path: &Path, size_bytes: u64) -> io::Result<FileDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(path)?;
        let meta = file.metadata()?;
        let len = if meta.file_type().is_block_device() {
            let mut f = &file;
            f.seek(SeekFrom::End(0))?
        } else {
            if meta.len() < size_bytes {
                allocate(&file, size_bytes)?;
            }
            size_bytes
        };
        Ok(FileDevice { file, path: path.to_owned(), len })
    }

    /// Whether `path` names a block device.
    pub fn is_block_device(path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
    }
}

/// Allocates every byte of `file` up to `size_bytes`: `fallocate`, not a
/// sparse file, so the filesystem has the space now.
fn allocate(file: &File, size_bytes: u64) -> io::Result<()> {
    let len = i64::try_from(size_bytes).map_err(|_| io::Error::other("store size does not fit in off_t"))?;
    nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len).map_err(io::Error::from)
}

impl BlockDevice for FileDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, data.len(), self.len)?;
        self.file.write_all_at(data, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
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
