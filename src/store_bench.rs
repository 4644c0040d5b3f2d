//! `kiln bench store`: the block store's engine measured without gRPC, beside
//! the memory store in the same run: filling N blobs, index bytes per blob,
//! restart time to serving (page cache warm and, as root, cold), lookups of
//! 10,000 digests, and what a restart after a halt keeps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::{Digest, DigestFunction};
use kiln_storage::store::block::engine::index_file_bytes;
use kiln_storage::store::block::format::record_len;
use kiln_storage::store::block::{BlockConfig, Engine, IoMode, Kind};
use kiln_storage::store::memory::MemoryCas;
use kiln_storage::store::{CasKey, CasStore, block::BlockCas, put_all, read_all};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct StoreBenchOptions {
    pub blobs: u64,
    pub blob_size: u64,
    pub dir: PathBuf,
    pub io: IoMode,
    pub concurrency: usize,
    pub lookups: usize,
}

/// The key and contents of blob `i`: distinct, cheap to make, and
/// checkable on the way back.
fn blob(i: u64, size: u64) -> (CasKey, Bytes) {
    let data: Vec<u8> = (0..size).map(|j| (i.wrapping_mul(31).wrapping_add(j) & 0xff) as u8).collect();
    (key(i, size), Bytes::from(data))
}

fn key(i: u64, size: u64) -> CasKey {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&i.to_le_bytes());
    hash[8..16].copy_from_slice(&(i ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes());
    let permit = kiln_proto::access::Permit::<kiln_proto::access::rights::CasWrite>::internal("");
    CasKey::of(&permit, Digest::new(DigestFunction::Sha256, hash, size).expect("valid digest"))
}

fn config(o: &StoreBenchOptions) -> BlockConfig {
    // Room for every blob with the eighth the syncer keeps free, and an
    // index sized for exactly that many blobs.
    let record = record_len(o.blob_size);
    let size = (o.blobs * record * 3 / 2 + (64 << 20)).next_multiple_of(4096);
    BlockConfig {
        kind: Kind::Cas,
        data_path: o.dir.join("cas.data"),
        index_path: o.dir.join("cas.index"),
        size_bytes: size,
        size_configured: true,
        block_bytes: 0,
        expected_blob_bytes: (size / o.blobs.max(1)).max(1),
        threads: std::thread::available_parallelism().map_or(1, usize::from),
        io: o.io,
        sync_interval: Duration::from_secs(10),
        pin_threads: true,
        format_device: false,
        reformat: false,
        room_wait: Duration::from_millis(kiln_proto::limits::BLOCK_ROOM_WAIT_MS),
        scrub_bytes_per_second: 0,
        staging_dir: o.dir.join("staging"),
        staging_bytes: 0,
        index_log_min_bytes: kiln_proto::limits::BLOCK_INDEX_LOG_MIN_BYTES,
    }
}

/// Writes blobs `0..n` into `store`, `concurrency` at a time.
/// Writes blobs `0..n`; the time, and how many the store refused for a
/// full index (RESOURCE_EXHAUSTED: the store keeps what it acknowledged
/// and says so rather than forget an older blob).
async fn fill<S: CasStore>(store: &S, n: u64, size: u64, concurrency: usize) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let mut puts = futures::stream::iter(0..n)
        .map(|i| async move {
            let (key, data) = blob(i, size);
            put_all(store, &key, data).await
        })
        .buffer_unordered(concurrency);
    let mut refused = 0;
    while let Some(r) = puts.next().await {
        match r {
            Err(e) if e.code() == kiln_proto::Code::ResourceExhausted => refused += 1,
            other => other?,
        }
    }
    Ok((started.elapsed(), refused))
}

/// Reads `samples` blobs spread over `0..n` back and compares them.
async fn check<S: CasStore>(store: &S, n: u64, size: u64, samples: u64) -> Result<u64> {
    let mut found = 0;
    for s in 0..samples {
        let i = s * n / samples;
        let (key, data) = blob(i, size);
        match read_all(store, &key, size).await {
            Ok(got) => {
                ensure!(got == data, "blob {i} came back with different bytes");
                found += 1;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => bail!("blob {i}: {e}"),
        }
    }
    Ok(found)
}

/// Latencies of `rounds` lookups of `per` digests each (half present).
async fn lookups<S: CasStore>(
    store: &S,
    n: u64,
    size: u64,
    per: usize,
    rounds: usize,
) -> Result<(Duration, Duration)> {
    let mut times = Vec::with_capacity(rounds);
    for r in 0..rounds as u64 {
        let keys: Vec<CasKey> = (0..per as u64)
            .map(|k| {
                let i = (r * 7919 + k * 104_729) % n;
                // Odd ones are absent: past the filled range.
                key(if k % 2 == 0 { i } else { n + i }, size)
            })
            .collect();
        let started = Instant::now();
        let missing = store.find_missing(&keys).await?;
        times.push(started.elapsed());
        ensure!(missing.len() >= per / 2, "absent digests reported present");
    }
    times.sort();
    let at = |per_mille: usize| times[(times.len() * per_mille / 1000).min(times.len() - 1)];
    Ok((at(500), at(990)))
}

/// Opens the store and reads one blob: the time from start to serving.
async fn restart(o: &StoreBenchOptions) -> Result<(Arc<Engine>, BlockCas, Duration)> {
    let started = Instant::now();
    let engine = Engine::open(&config(o))?;
    let cas = BlockCas::new(engine.clone());
    let (key, data) = blob(o.blobs - 1, o.blob_size);
    ensure!(read_all(&cas, &key, o.blob_size).await? == data, "the last blob came back wrong");
    Ok((engine, cas, started.elapsed()))
}

fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

/// The process's peak resident size since the last [`reset_peak_rss`].
fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// A size field of /proc/self/status, in bytes.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

/// Resets the peak resident size (Linux: "5" to /proc/self/clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs the whole measurement; prints as it goes and returns JSON.
#[allow(clippy::print_stdout, clippy::cast_precision_loss)] // A report for people; ratios of counts.
pub async fn run(o: &StoreBenchOptions) -> Result<serde_json::Value> {
    ensure!(o.blobs > 0 && o.blob_size > 0, "--blobs and --blob-size must be positive");
    std::fs::create_dir_all(&o.dir).with_context(|| format!("create {}", o.dir.display()))?;
    let c = config(o);
    println!(
        "block store: {} blobs of {} bytes, data file {} MiB, index file of {} KiB to start (it grows)",
        o.blobs,
        o.blob_size,
        c.size_bytes >> 20,
        index_file_bytes(c.size_bytes, 0, c.expected_blob_bytes)? >> 10
    );

    // A store left by an earlier run is replaced; the restarts below keep it.
    let engine = Engine::open(&BlockConfig { reformat: true, ..c.clone() })?;
    let io_path = engine.io_path;
    let cas = BlockCas::new(engine.clone());
    let (fill_time, refused) = fill(&cas, o.blobs, o.blob_size, o.concurrency).await?;
    if refused > 0 {
        println!("{refused} writes refused: the index was full where their keys had to go");
    }
    let entries = engine.entries() as u64;
    println!(
        "fill ({io_path}): {:.1} s, {:.0} blobs/s; {entries} entries",
        secs(fill_time),
        o.blobs as f64 / secs(fill_time)
    );
    let close_started = Instant::now();
    engine.close()?;
    let close_time = close_started.elapsed();
    drop(cas);
    drop(engine);
    println!("clean close (final sync): {:.2} s", secs(close_time));
    let index_bytes = std::fs::metadata(&c.index_path).map(|m| m.len()).unwrap_or(0);

    let rss_before_open = rss_bytes();
    let (engine, cas, warm) = restart(o).await?;
    let index_rss = rss_bytes().saturating_sub(rss_before_open);
    let after_restart = engine.entries() as u64;
    println!("restart to serving, page cache warm: {:.3} s; {after_restart} entries", secs(warm));
    let engine_slots = engine.index_slots() as u64;
    println!(
        "index in memory: {} slots of 32 bytes ({} allotted), {:.1} bytes per blob held; resident after the restart {:.1} bytes per blob",
        engine_slots,
        engine.slots,
        (engine_slots * 32) as f64 / after_restart.max(1) as f64,
        index_rss as f64 / after_restart.max(1) as f64
    );
    // How much memory the first sync after a restart takes on top of what
    // the store holds.
    let rss_before_sync = rss_bytes();
    reset_peak_rss();
    engine.sync()?;
    let first_sync_extra = peak_rss_bytes().saturating_sub(rss_before_sync);
    println!("first sync after the restart: {} MiB of memory on top", first_sync_extra >> 20);
    let sampled = check(&cas, o.blobs, o.blob_size, 10_000).await?;
    let (p50, p99) = lookups(&cas, o.blobs, o.blob_size, o.lookups, 200).await?;
    println!("find_missing of {} digests (half present): p50 {:?}, p99 {:?}", o.lookups, p50, p99);
    println!("{sampled} of 10000 sampled blobs read back intact");
    // A halt stops the threads without the final sync, as a SIGKILL does.
    engine.halt();
    drop(cas);
    drop(engine);
    let cold = if nix::unistd::geteuid().is_root() {
        kiln_tools::bench::drop_page_cache()?;
        let (engine, cas, cold) = restart(o).await?;
        println!("restart after a halt, page cache cold: {:.3} s", secs(cold));
        engine.close()?;
        drop(cas);
        Some(cold)
    } else {
        println!("restart with a cold page cache: skipped (needs root to drop the page cache)");
        None
    };

    // The memory store beside it, same blobs, same process.
    let rss_before = rss_bytes();
    let memory = MemoryCas::new(u64::MAX / 4, o.blob_size);
    let (memory_fill, _) = fill(&memory, o.blobs, o.blob_size, o.concurrency).await?;
    let memory_rss = rss_bytes().saturating_sub(rss_before);
    let (memory_p50, memory_p99) = lookups(&memory, o.blobs, o.blob_size, o.lookups, 200).await?;
    println!(
        "memory store: fill {:.1} s, {:.0} blobs/s, {:.0} resident bytes per blob; find_missing p50 {:?}, p99 {:?}",
        secs(memory_fill),
        o.blobs as f64 / secs(memory_fill),
        memory_rss as f64 / o.blobs as f64,
        memory_p50,
        memory_p99
    );
    let per_blob = index_bytes as f64 / after_restart.max(1) as f64;
    println!("index file bytes per blob held (checkpoint, log and free regions): {per_blob:.1}");
    Ok(json!({
        "blobs": o.blobs,
        "blob_size": o.blob_size,
        "io": io_path,
        "data_file_bytes": c.size_bytes,
        "index_file_bytes": index_bytes,
        "entries_after_fill": entries,
        "refused_for_a_full_index": refused,
        "entries_after_restart": after_restart,
        "index_file_bytes_per_blob": per_blob,
        "index_memory_bytes_per_blob": (engine_slots * 32) as f64 / after_restart.max(1) as f64,
        "index_resident_bytes_per_blob": index_rss as f64 / after_restart.max(1) as f64,
        "first_sync_after_restart_extra_bytes": first_sync_extra,
        "fill_seconds": secs(fill_time),
        "close_seconds": secs(close_time),
        "restart_warm_seconds": secs(warm),
        "restart_cold_seconds": cold.map(secs),
        "sampled_intact": sampled,
        "find_missing_digests": o.lookups,
        "find_missing_p50_us": p50.as_micros(),
        "find_missing_p99_us": p99.as_micros(),
        "memory_fill_seconds": secs(memory_fill),
        "memory_resident_bytes_per_blob": memory_rss as f64 / o.blobs as f64,
        "memory_find_missing_p50_us": memory_p50.as_micros(),
        "memory_find_missing_p99_us": memory_p99.as_micros(),
    }))
}

/// Removes the store files the bench made.
pub fn clean(dir: &Path) {
    for f in ["cas.data", "cas.index"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}
