//! Running a batch of reads and writes: through io_uring where the kernel
//! allows it, else with positioned reads and writes.
//!
//! A storage thread collects the I/O of every request it picked up and runs
//! it as one batch: with io_uring the whole batch is in flight at once (one
//! system call for all of it), and the fallback runs the same operations
//! one after another. Container runtimes' default seccomp profiles forbid
//! io_uring; then (or when configured so) the fallback is used, and which
//! path runs is logged at start.
//!
//! This is the one module with `unsafe` code: io_uring reads into and
//! writes from memory the kernel uses after the submission call returns.
//! The safety argument is local: the buffers belong to `ops`, which this
//! function borrows mutably until every submitted operation has completed.

use kiln_proto::limits::BLOCK_RING_ENTRIES as RING_ENTRIES;
use std::io;

use bytes::Bytes;
use io_uring::{IoUring, opcode, types};

use super::device::BlockDevice;

/// One I/O of a batch; `at` is a device offset.
#[derive(Debug)]
pub enum Io {
    Read { at: u64, buf: Vec<u8> },
    Write { at: u64, data: Bytes },
}

impl Io {
    pub fn read(at: u64, len: u64) -> Io {
        Io::Read { at, buf: vec![0; usize::try_from(len).unwrap_or(0)] }
    }

    /// The bytes a read brought in.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Io::Read { buf, .. } => Bytes::from(buf),
            Io::Write { data, .. } => data,
        }
    }

    fn len(&self) -> usize {
        match self {
            Io::Read { buf, .. } => buf.len(),
            Io::Write { data, .. } => data.len(),
        }
    }
}

/// How I/O reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoMode {
    /// io_uring if the kernel allows it, else positioned reads and writes.
    Auto,
    /// io_uring or fail.
    IoUring,
    /// Positioned reads and writes (pread/pwrite).
    Pread,
}

/// A thread's I/O path.
pub struct IoEngine {
    uring: Option<IoUring>,
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path())
    }
}

impl IoEngine {
    pub fn new(mode: IoMode) -> io::Result<IoEngine> {
        match mode {
            IoMode::Pread => Ok(IoEngine { uring: None }),
            IoMode::IoUring => Ok(IoEngine { uring: Some(IoUring::new(RING_ENTRIES)?) }),
            IoMode::Auto => Ok(IoEngine { uring: IoUring::new(RING_ENTRIES).ok() }),
        }
    }

    /// Which path this engine takes, for logs and metrics.
    pub fn path(&self) -> &'static str {
        if self.uring.is_some() { "io_uring" } else { "pread/pwrite" }
    }

    /// Runs `ops` against `dev`; `results[i]` says how `ops[i]` went.
    pub fn run(&mut self, dev: &dyn BlockDevice, ops: &mut [Io]) -> Vec<io::Result<()>> {
        match (&mut self.uring, dev.raw_fd()) {
            (Some(ring), Some(fd)) => ops
                .chunks_mut(RING_ENTRIES as usize)
                .flat_map(|chunk| run_uring(ring, fd, dev, chunk))
                .collect(),
            _ => ops.iter_mut().map(|op| run_plain(dev, op)).collect(),
        }
    }

    /// Makes completed writes durable.
    pub fn sync(&mut self, dev: &dyn BlockDevice) -> io::Result<()> {
        let (Some(ring), Some(fd)) = (&mut self.uring, dev.raw_fd()) else { return dev.sync() };
        let entry = opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build().user_data(0);
        // SAFETY: an fsync entry refers to no memory of ours.
        #[allow(unsafe_code)]
        let pushed = unsafe { ring.submission().push(&entry) };
        if pushed.is_err() {
            return dev.sync();
        }
        ring.submit_and_wait(1)?;
        let cqe = ring.completion().next().ok_or_else(|| io::Error::other("io_uring lost an fsync"))?;
        if cqe.result() < 0 { Err(io::Error::from_raw_os_error(-cqe.result())) } else { Ok(()) }
    }
}

fn run_plain(dev: &dyn BlockDevice, op: &mut Io) -> io::Result<()> {
    match op {
        Io::Read { at, buf } => dev.read_at(buf, *at),
        Io::Write { at, data } => dev.write_at(data, *at),
    }
}

/// Runs at most `RING_ENTRIES` operations through `ring`, all in flight at once.
fn run_uring(ring: &mut IoUring, fd: i32, dev: &dyn BlockDevice, ops: &mut [Io]) -> Vec<io::Result<()>> {
    let mut results: Vec<Option<io::Result<()>>> = (0..ops.len()).map(|_| None).collect();
    let mut submitted = 0usize;
    for (i, op) in ops.iter_mut().enumerate() {
        if let Err(e) = super::device::check_range(op_at(op), op.len(), dev.len()) {
            results[i] = Some(Err(e));
            continue;
        }
        let Ok(len) = u32::try_from(op.len()) else {
            results[i] = Some(run_plain(dev, op));
            continue;
        };
        let entry = match op {
            Io::Read { at, buf } => {
                opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len).offset(*at).build()
            }
            Io::Write { at, data } => {
                opcode::Write::new(types::Fd(fd), data.as_ptr(), len).offset(*at).build()
            }
        }
        .user_data(i as u64);
        // SAFETY: the entry points into `ops[i]`'s buffer, which `ops` (a
        // mutable borrow held until this function returns) keeps alive and
        // unmoved; every submitted entry is reaped below before returning.
        #[allow(unsafe_code)]
        let pushed = unsafe { ring.submission().push(&entry) };
        if pushed.is_err() {
            results[i] = Some(run_plain(dev, op));
            continue;
        }
        submitted += 1;
    }
    let mut completed = 0usize;
    while completed < submitted {
        if let Err(e) = ring.submit_and_wait(submitted - completed) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The kernel holds our buffers: we may not return while it does.
            // Wait for completions one at a time until all are back.
            tracing::error!(error = %e, "io_uring submission failed; waiting for what is in flight");
        }
        for cqe in ring.completion() {
            let i = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
            let Some(op) = ops.get_mut(i) else { continue };
            completed += 1;
            let res = cqe.result();
            results[i] = Some(if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                finish_short(dev, op, usize::try_from(res).unwrap_or(0))
            });
        }
    }
    results.into_iter().map(|r| r.unwrap_or_else(|| Err(io::Error::other("operation not run")))).collect()
}

fn op_at(op: &Io) -> u64 {
    match op {
        Io::Read { at, .. } | Io::Write { at, .. } => *at,
    }
}

/// Completes a short read or write (rare: signals, end of device) with
/// positioned I/O for the rest.
fn finish_short(dev: &dyn BlockDevice, op: &mut Io, done: usize) -> io::Result<()> {
    match op {
        Io::Read { at, buf } if done < buf.len() => dev.read_at(&mut buf[done..], *at + done as u64),
        Io::Write { at, data } if done < data.len() => dev.write_at(&data[done..], *at + done as u64),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

    use super::*;
    use crate::store::block::device::FileDevice;

    fn round_trip(mode: IoMode) {
        let Ok(mut engine) = IoEngine::new(mode) else {
            // io_uring refused here (seccomp): the fallback covers this machine.
            assert_eq!(mode, IoMode::IoUring);
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::open(&dir.path().join("d"), 4 << 20).unwrap();
        let mut writes: Vec<Io> = (0..300u64)
            .map(|i| Io::Write { at: i * 4096, data: Bytes::from(vec![(i % 251) as u8; 4096]) })
            .collect();
        assert!(engine.run(&dev, &mut writes).iter().all(Result::is_ok), "{}", engine.path());
        engine.sync(&dev).unwrap();
        let mut reads: Vec<Io> = (0..300u64).map(|i| Io::read(i * 4096 + 100, 16)).collect();
        reads.push(Io::read((4 << 20) - 8, 16));
        let results = engine.run(&dev, &mut reads);
        assert!(results[..300].iter().all(Result::is_ok));
        assert!(results[300].is_err(), "past the end is an error");
        for (i, op) in reads.into_iter().take(300).enumerate() {
            assert!(op.into_bytes().iter().all(|b| *b == (i % 251) as u8));
        }
    }

    #[test]
    fn io_uring_and_the_fallback_agree() {
        round_trip(IoMode::Pread);
        round_trip(IoMode::IoUring);
        round_trip(IoMode::Auto);
    }
}
