//! `kiln bench io`: buffered I/O against `O_DIRECT` (aligned buffers
//! registered with io_uring) on the same files or devices, in the same run:
//! sequential 1 MiB writes then `fdatasync` (how the ring is written),
//! random 64 KiB reads of what was just written (hot: the page cache may
//! have it), and the same reads after the caches were dropped (cold).

use std::fs::{File, OpenOptions};
use std::io::Seek;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use kiln_storage::store::block::io::{FixedIo, FixedOp};
use rand::{Rng, SeedableRng};
use serde_json::json;

const WRITE_BYTES: usize = 1 << 20;
const READ_BYTES: usize = 64 << 10;
const DEPTH: usize = 32;

#[derive(Debug, Clone)]
pub struct IoBenchOptions {
    pub paths: Vec<PathBuf>,
    /// Bytes written (and read from) per path and mode.
    pub bytes: u64,
    pub reads: usize,
}

fn open(path: &Path, direct: bool, bytes: u64) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    if direct {
        options.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
    }
    let file = options.open(path).with_context(|| format!("open {}", path.display()))?;
    if file.metadata()?.file_type().is_file() {
        // Allocated up front, as the store's file is: neither mode pays
        // for allocation.
        let len = i64::try_from(bytes)?;
        nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, len)
            .with_context(|| format!("allocate {}", path.display()))?;
    } else {
        let len = (&file).seek(std::io::SeekFrom::End(0))?;
        ensure!(len >= bytes, "{} holds fewer than --bytes ({bytes}) bytes", path.display());
    }
    Ok(file)
}

/// Drops what the page cache holds of `file` (and, as root, every clean
/// page: a loop device's backing file is cached too).
fn drop_caches(file: &File) {
    let _ = file.sync_all();
    let _ = nix::fcntl::posix_fadvise(file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    // Refused without root: then the file's own pages are what was dropped.
    let _ = kiln_tools::bench::drop_page_cache();
}

fn write_pass(io: &mut FixedIo, file: &File, bytes: u64) -> Result<f64> {
    for slot in 0..DEPTH {
        io.slot_mut(slot).fill(u8::try_from(slot).unwrap_or(0) | 1);
    }
    let started = Instant::now();
    let mut at = 0u64;
    while at < bytes {
        let ops: Vec<FixedOp> = (0..DEPTH)
            .map(|slot| FixedOp { slot, at: at + (slot * WRITE_BYTES) as u64, write: true })
            .filter(|op| op.at + WRITE_BYTES as u64 <= bytes)
            .collect();
        ensure!(!ops.is_empty(), "nothing to write");
        io.run(file.as_raw_fd(), &ops)?;
        at += (ops.len() * WRITE_BYTES) as u64;
    }
    file.sync_data()?;
    Ok(bytes as f64 / started.elapsed().as_secs_f64() / 1e9)
}

fn read_pass(io: &mut FixedIo, file: &File, bytes: u64, reads: usize, seed: u64) -> Result<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pages = bytes / READ_BYTES as u64;
    let started = Instant::now();
    let mut done = 0;
    while done < reads {
        let n = DEPTH.min(reads - done);
        let ops: Vec<FixedOp> = (0..n)
            .map(|slot| FixedOp { slot, at: rng.random_range(0..pages) * READ_BYTES as u64, write: false })
            .collect();
        io.run(file.as_raw_fd(), &ops)?;
        done += n;
    }
    Ok(reads as f64 / started.elapsed().as_secs_f64())
}

/// Measures one path in both modes.
fn measure(path: &Path, o: &IoBenchOptions) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for (mode, direct) in [("buffered", false), ("direct", true)] {
        let file = open(path, direct, o.bytes)?;
        let mut writer = FixedIo::new(DEPTH, WRITE_BYTES)?;
        let write_gbps = write_pass(&mut writer, &file, o.bytes)?;
        let mut reader = FixedIo::new(DEPTH, READ_BYTES)?;
        let hot = read_pass(&mut reader, &file, o.bytes, o.reads, 1)?;
        drop_caches(&file);
        let cold = read_pass(&mut reader, &file, o.bytes, o.reads, 2)?;
        #[allow(clippy::print_stdout)]
        {
            println!(
                "{} {mode}: write {write_gbps:.3} GB/s; 64 KiB reads hot {hot:.0}/s, cold {cold:.0}/s",
                path.display()
            );
        }
        out.insert(
            mode.into(),
            json!({ "write_gb_per_s": write_gbps, "hot_reads_per_s": hot, "cold_reads_per_s": cold }),
        );
    }
    let ratio = |mode: &str, key: &str| -> f64 {
        out["direct"][key].as_f64().unwrap_or(0.0) / out[mode][key].as_f64().unwrap_or(1.0)
    };
    let ratios = json!({
        "write_direct_vs_buffered": ratio("buffered", "write_gb_per_s"),
        "hot_reads_direct_vs_buffered": ratio("buffered", "hot_reads_per_s"),
        "cold_reads_direct_vs_buffered": ratio("buffered", "cold_reads_per_s"),
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{} direct / buffered: {ratios}", path.display());
    }
    out.insert("ratios".into(), ratios);
    Ok(serde_json::Value::Object(out))
}

pub fn run(o: &IoBenchOptions) -> Result<serde_json::Value> {
    ensure!(o.bytes >= (DEPTH * WRITE_BYTES) as u64, "--bytes must be at least 32 MiB");
    let mut results = serde_json::Map::new();
    for path in &o.paths {
        results.insert(path.display().to_string(), measure(path, o)?);
    }
    Ok(serde_json::Value::Object(results))
}
