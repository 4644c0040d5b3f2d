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
//! This is one of two modules with `unsafe` code: io_uring reads into and
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

/// An io_uring with one aligned arena of buffers registered with the
/// kernel, for I/O that bypasses the page cache (`O_DIRECT` wants aligned
/// memory, offsets and lengths): `kiln bench io` measures it against
/// buffered I/O.
pub struct FixedIo {
    // Dropped first: closing the ring unregisters the arena before it is freed.
    ring: IoUring,
    arena: Vec<u8>,
    start: usize,
    slot_bytes: usize,
    slots: usize,
}

impl std::fmt::Debug for FixedIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedIo").field("slots", &self.slots).field("slot_bytes", &self.slot_bytes).finish()
    }
}

/// One operation on a slot of a [`FixedIo`]'s arena.
#[derive(Debug, Clone, Copy)]
pub struct FixedOp {
    pub slot: usize,
    pub at: u64,
    pub write: bool,
}

/// Alignment of the arena and of every slot: a page, which satisfies any
/// device's logical block size.
const FIXED_ALIGN: usize = 4096;

impl FixedIo {
    /// `slots` buffers of `slot_bytes` (a multiple of 4096) each.
    pub fn new(slots: usize, slot_bytes: usize) -> io::Result<FixedIo> {
        if slots == 0
            || slots > RING_ENTRIES as usize
            || slot_bytes == 0
            || !slot_bytes.is_multiple_of(FIXED_ALIGN)
        {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "slots must be 1 to 256 whole pages"));
        }
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut arena = vec![0u8; slots * slot_bytes + FIXED_ALIGN];
        let start = arena.as_ptr().align_offset(FIXED_ALIGN);
        let iovec = libc::iovec { iov_base: arena[start..].as_mut_ptr().cast(), iov_len: slots * slot_bytes };
        // SAFETY: the iovec covers memory of `arena`, whose heap buffer
        // never moves or shrinks and outlives the ring (dropped first).
        #[allow(unsafe_code)]
        unsafe {
            ring.submitter().register_buffers(&[iovec])?;
        }
        Ok(FixedIo { ring, arena, start, slot_bytes, slots })
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The buffer of slot `i`.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        assert!(i < self.slots, "no slot {i}");
        let from = self.start + i * self.slot_bytes;
        &mut self.arena[from..from + self.slot_bytes]
    }

    /// Runs `ops` on `fd`, all in flight at once; the first error, if any.
    pub fn run(&mut self, fd: i32, ops: &[FixedOp]) -> io::Result<()> {
        assert!(ops.len() <= RING_ENTRIES as usize, "at most one ring of operations");
        let len = u32::try_from(self.slot_bytes).map_err(io::Error::other)?;
        let mut submitted = 0;
        for (i, op) in ops.iter().enumerate() {
            assert!(op.slot < self.slots, "no slot {}", op.slot);
            let ptr = self.arena[self.start + op.slot * self.slot_bytes..].as_mut_ptr();
            let entry = if op.write {
                opcode::WriteFixed::new(types::Fd(fd), ptr, len, 0).offset(op.at).build()
            } else {
                opcode::ReadFixed::new(types::Fd(fd), ptr, len, 0).offset(op.at).build()
            }
            .user_data(i as u64);
            // SAFETY: the entry points into the registered arena, which
            // `self` (borrowed mutably until every entry is reaped below)
            // keeps alive.
            #[allow(unsafe_code)]
            let pushed = unsafe { self.ring.submission().push(&entry) };
            pushed.map_err(|_| io::Error::other("the submission queue is full"))?;
            submitted += 1;
        }
        let mut completed = 0;
        let mut first_error = None;
        while completed < submitted {
            match self.ring.submit_and_wait(submitted - completed) {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                    tracing::error!(error = %e, "io_uring submission failed; waiting for what is in flight");
                }
                _ => {}
            }
            for cqe in self.ring.completion() {
                completed += 1;
                let res = cqe.result();
                if res < 0 {
                    first_error.get_or_insert(io::Error::from_raw_os_error(-res));
                } else if res.cast_unsigned() != len {
                    first_error.get_or_insert(io::Error::other("a short read or write"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
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

    /// Registered, aligned buffers write and read back, bypassing the page
    /// cache where the filesystem allows it.
    #[test]
    fn fixed_buffers_round_trip() {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let Ok(mut io) = FixedIo::new(4, 8192) else { return }; // io_uring refused here
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let open = |flags| std::fs::OpenOptions::new().read(true).write(true).custom_flags(flags).open(&path);
        // tmpfs refuses O_DIRECT: then buffered.
        let file = open(libc::O_DIRECT).or_else(|_| open(0)).unwrap();
        for slot in 0..4 {
            io.slot_mut(slot).fill(slot as u8 + 1);
        }
        let writes: Vec<FixedOp> =
            (0..4).map(|slot| FixedOp { slot, at: slot as u64 * 8192, write: true }).collect();
        io.run(file.as_raw_fd(), &writes).unwrap();
        for slot in 0..4 {
            io.slot_mut(slot).fill(0);
        }
        let reads: Vec<FixedOp> =
            (0..4).map(|slot| FixedOp { slot: 3 - slot, at: slot as u64 * 8192, write: false }).collect();
        io.run(file.as_raw_fd(), &reads).unwrap();
        for slot in 0..4 {
            assert!(io.slot_mut(3 - slot).iter().all(|b| *b == slot as u8 + 1));
        }
        assert!(FixedIo::new(4, 1000).is_err(), "unaligned slots are refused");
    }

    #[test]
    fn io_uring_and_the_fallback_agree() {
        round_trip(IoMode::Pread);
        round_trip(IoMode::IoUring);
        round_trip(IoMode::Auto);
    }
}
