//! Remote execution in `kiln serve`: the `[execution]` section, the
//! scheduler's view of this process's stores, the local worker's CAS, and
//! starting the scheduler, its worker port and the local worker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use kiln_proto::access::{Permit, rights};
use kiln_proto::kiln::worker::Property;
use kiln_proto::reapi::ActionResult;
use kiln_proto::{Digest, DigestFunction, Error};
use kiln_scheduler::platform::{Rule, Rules};
use kiln_storage::store::{
    AcKey, AcStore, BlobReader, BlobWriter, ByteRange, CasKey, CasStore, put_all, read_all,
};
use kiln_worker::cache::FileCache;
use kiln_worker::cas::CasClient;
use kiln_worker::disk::{DiskLimits, SlotDisks};
use kiln_worker::outputs::OutputLimits;
use kiln_worker::runner::{CasFactory, Runner, RunnerConfig};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

/// The `[execution]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    /// Serve the Execution API.
    pub enabled: bool,
    /// The worker port (never the client port).
    pub worker_listen: SocketAddr,
    /// Run a worker inside `kiln serve`.
    pub local_worker: bool,
    /// The local worker's slots; 0: one per core.
    pub local_worker_slots: usize,
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub unsatisfiable_grace_ms: u64,
    pub queue_timeout_ms: u64,
    pub attempts_max: u32,
    pub heartbeat_interval_ms: u64,
    pub worker_lost_after_ms: u64,
    pub orphan_grace_ms: u64,
    pub operation_retention_ms: u64,
    pub operations_max: usize,
    pub queued_max: usize,
    /// How each platform property matches: "exact" (default), "minimum", "ignore".
    pub platform: BTreeMap<String, Rule>,
    /// `[execution.tenants.NAME]`: a tenant's part of the workers.
    pub tenants: BTreeMap<String, kiln_scheduler::TenantShare>,
    pub worker: WorkerConfig,
}

/// `[execution.worker]`: the local worker, and `kiln worker`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Per-action directories; default DATA_DIR/worker/build.
    pub build_dir: Option<PathBuf>,
    /// The file cache inputs are hard-linked from (same filesystem as
    /// build_dir); default DATA_DIR/worker/cache.
    pub cache_dir: Option<PathBuf>,
    pub cache_size_bytes: u64,
    /// Host uid (and gid) the sandbox of slot i runs as: uid_base + i.
    pub uid_base: u32,
    /// Per action; 0: no limit.
    pub memory_bytes: u64,
    pub pids_max: u64,
    pub cpu_millicores: u64,
    /// Let actions that ask (platform property network=host) use the host network.
    pub allow_host_network: bool,
    /// A root filesystem directory for actions instead of the host's /usr, /bin, /lib.
    pub root_fs: Option<PathBuf>,
    pub kill_grace_ms: u64,
    /// Extra platform properties the worker offers.
    pub properties: BTreeMap<String, String>,
    /// Environment variables every action gets unless its Command sets
    /// them (REAPI lets a worker provide defaults): a standard `PATH`, for
    /// clients that send none (Pants, Buck2).
    pub environment: BTreeMap<String, String>,
    /// Most bytes of one output file or log; most bytes of all an
    /// action's output files; longest the worker spends hashing and
    /// uploading one action's outputs and logs. Past any of them the
    /// action fails with RESOURCE_EXHAUSTED and is not run again.
    pub output_file_bytes_max: u64,
    pub output_bytes_max: u64,
    pub output_collect_secs_max: u64,
    /// Give each slot a filesystem of its own that bounds what its actions
    /// write (bytes and inodes). Off: actions write in `build_dir`,
    /// unbounded.
    pub disk_limits: bool,
    /// Size of each slot's filesystem; 0: the free space beyond the file
    /// cache and a reserve, split between the slots, at most 16 GiB.
    pub disk_bytes: u64,
    /// Files and directories on each slot's filesystem; 0: one per 8 KiB.
    pub disk_inodes: u64,
}

/// The `PATH` actions get when their Command sets none.
pub const DEFAULT_ACTION_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl WorkerConfig {
    /// Refuses variable names and values the kernel cannot pass.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in &self.environment {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                anyhow::bail!(
                    "[execution.worker.environment] {name:?}: a name must be non-empty without '=' or NUL, a value without NUL"
                );
            }
        }
        if self.output_file_bytes_max == 0 || self.output_bytes_max < self.output_file_bytes_max {
            anyhow::bail!(
                "[execution.worker] output_file_bytes_max must be above zero and at most output_bytes_max ({} > {})",
                self.output_file_bytes_max,
                self.output_bytes_max
            );
        }
        if self.output_collect_secs_max == 0 {
            anyhow::bail!("[execution.worker] output_collect_secs_max must be above zero");
        }
        Ok(())
    }

    /// The bounds on collecting each action's outputs.
    pub fn output_limits(&self) -> OutputLimits {
        OutputLimits {
            file_size_bytes_max: self.output_file_bytes_max,
            total_bytes_max: self.output_bytes_max,
            collect_time_max: Duration::from_secs(self.output_collect_secs_max),
            ..OutputLimits::DEFAULT
        }
    }
}

impl ExecutionConfig {
    /// The local worker's slots: `local_worker_slots`, or one per core.
    pub fn local_slots(&self) -> usize {
        match self.local_worker_slots {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            worker_listen: SocketAddr::from(([127, 0, 0, 1], 8981)),
            local_worker: true,
            local_worker_slots: 0,
            default_timeout_ms: 3_600_000,
            max_timeout_ms: 10_800_000,
            unsatisfiable_grace_ms: 30_000,
            queue_timeout_ms: 6 * 3_600_000,
            attempts_max: 3,
            heartbeat_interval_ms: 5_000,
            worker_lost_after_ms: 30_000,
            orphan_grace_ms: 60_000,
            operation_retention_ms: 600_000,
            operations_max: 1_000_000,
            queued_max: 1_000_000,
            platform: BTreeMap::new(),
            tenants: BTreeMap::new(),
            worker: WorkerConfig::default(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            build_dir: None,
            cache_dir: None,
            cache_size_bytes: 4 << 30,
            uid_base: 2_000_000,
            memory_bytes: 0,
            pids_max: 8192,
            cpu_millicores: 0,
            allow_host_network: false,
            root_fs: None,
            kill_grace_ms: 5_000,
            properties: BTreeMap::new(),
            environment: BTreeMap::from([("PATH".to_owned(), DEFAULT_ACTION_PATH.to_owned())]),
            output_file_bytes_max: OutputLimits::DEFAULT.file_size_bytes_max,
            output_bytes_max: OutputLimits::DEFAULT.total_bytes_max,
            output_collect_secs_max: kiln_proto::limits::OUTPUT_COLLECT_SECS_MAX,
            disk_limits: true,
            disk_bytes: 0,
            disk_inodes: 0,
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl ExecutionConfig {
    pub fn validate(&self) -> Result<()> {
        let check =
            |ok: bool, what: &str| if ok { Ok(()) } else { Err(anyhow::anyhow!("[execution] {what}")) };
        check(self.default_timeout_ms > 0, "default_timeout_ms must be positive")?;
        check(
            self.max_timeout_ms >= self.default_timeout_ms,
            "max_timeout_ms must be at least default_timeout_ms",
        )?;
        check(self.attempts_max >= 1, "attempts_max must be at least 1")?;
        check(self.heartbeat_interval_ms >= 100, "heartbeat_interval_ms must be at least 100")?;
        check(
            self.worker_lost_after_ms >= 2 * self.heartbeat_interval_ms,
            "worker_lost_after_ms must be at least twice heartbeat_interval_ms",
        )?;
        check(
            self.operations_max >= 1 && self.queued_max >= 1,
            "operations_max and queued_max must be positive",
        )?;
        for (name, tenant) in &self.tenants {
            if name.is_empty() || name.contains('.') {
                anyhow::bail!(
                    "[execution.tenants.{name:?}] names a tenant: an instance name's first component, not empty and without '.'"
                );
            }
            if !(1..=1000).contains(&tenant.weight) {
                anyhow::bail!("[execution.tenants.{name}] weight must be 1 to 1000, not {}", tenant.weight);
            }
        }
        check(self.worker.uid_base >= 1000, "worker.uid_base must be an unprivileged uid (1000 or more)")?;
        check(self.worker.uid_base.checked_add(65_536).is_some(), "worker.uid_base is too large")?;
        self.worker.validate()
    }

    pub fn scheduler_config(&self) -> kiln_scheduler::Config {
        kiln_scheduler::Config {
            rules: Rules::new({
                let mut rules = self.platform.clone();
                rules.entry(kiln_worker::runner::DISK_PROPERTY.to_owned()).or_insert(Rule::Minimum);
                rules
            }),
            default_timeout: ms(self.default_timeout_ms),
            max_timeout: ms(self.max_timeout_ms),
            unsatisfiable_grace: ms(self.unsatisfiable_grace_ms),
            queue_timeout: ms(self.queue_timeout_ms),
            attempts_max: self.attempts_max,
            heartbeat_interval: ms(self.heartbeat_interval_ms),
            worker_lost_after: ms(self.worker_lost_after_ms),
            orphan_grace: ms(self.orphan_grace_ms),
            operation_retention: ms(self.operation_retention_ms),
            operations_max: self.operations_max,
            queued_max: self.queued_max,
            tenants: self.tenants.iter().map(|(name, share)| (name.clone(), *share)).collect(),
        }
    }
}

/// The instruction set name REAPI platforms use for this machine.
pub fn isa() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        other => other,
    }
}

/// What a worker offers: OSFamily, ISA, cores, the network choices, each
/// action's disk, and the configured extras.
pub fn worker_properties(config: &WorkerConfig, slots: usize, disk: Option<DiskLimits>) -> Vec<Property> {
    let mut props: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(disk) = disk {
        props.entry(kiln_worker::runner::DISK_PROPERTY.into()).or_default().push(disk.bytes.to_string());
    }
    props.entry("OSFamily".into()).or_default().push("linux".into());
    props.entry("ISA".into()).or_default().push(isa().into());
    props.entry("cores".into()).or_default().push(slots.to_string());
    let network = props.entry(kiln_worker::runner::NETWORK_PROPERTY.into()).or_default();
    network.push("none".into());
    if config.allow_host_network {
        network.push("host".into());
    }
    for (name, value) in &config.properties {
        props.insert(name.clone(), vec![value.clone()]);
    }
    props
        .into_iter()
        .flat_map(|(name, values)| {
            values.into_iter().map(move |value| Property { name: name.clone(), value })
        })
        .collect()
}

/// The scheduler's view of this process's stores. The instance it is
/// asked about is one an Execute caller was permitted to execute on
/// ([`kiln_scheduler::ExecuteArgs::new`] takes the permit), so its keys
/// are Kiln's own work on that caller's behalf.
pub struct StoreBackend<C, A> {
    pub cas: C,
    pub ac: A,
    pub result_size_max: usize,
}

impl<C: CasStore, A: AcStore> kiln_scheduler::Backend for StoreBackend<C, A> {
    async fn read_blob(&self, instance: &str, digest: &Digest, size_max: u64) -> kiln_proto::Result<Bytes> {
        let permit = Permit::<rights::CasRead>::internal(instance);
        read_all(&self.cas, &CasKey::of(&permit, *digest), size_max).await
    }

    async fn get_action_result(
        &self,
        instance: &str,
        action: &Digest,
    ) -> kiln_proto::Result<Option<ActionResult>> {
        match self.ac.get(&AcKey::of(&Permit::<rights::AcRead>::internal(instance), *action)).await {
            Ok(bytes) => Ok(ActionResult::decode(bytes.as_ref()).ok()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put_action_result(
        &self,
        instance: &str,
        action: &Digest,
        result: &ActionResult,
    ) -> kiln_proto::Result<()> {
        let encoded = result.encode_to_vec();
        if encoded.len() > self.result_size_max {
            return Err(Error::resource_exhausted(format!(
                "the result is {} bytes encoded; action_result_size_bytes_max is {}",
                encoded.len(),
                self.result_size_max
            )));
        }
        let permit = Permit::<rights::AcWrite>::internal(instance);
        self.ac.put(&AcKey::of(&permit, *action), Bytes::from(encoded)).await
    }
}

/// A worker's CAS in this process's store, for one instance (`kiln bench`
/// runs workers so): the scheduler assigned it an action of that instance.
pub struct StoreCas<C> {
    cas: C,
    instance: String,
}

/// Gives [`StoreCas`] clients.
pub struct StoreCasFactory<C>(pub C);

impl<C: CasStore + Clone> CasFactory for StoreCasFactory<C> {
    type Client = StoreCas<C>;
    fn client(&self, instance: &str, _function: DigestFunction) -> StoreCas<C> {
        StoreCas { cas: self.0.clone(), instance: instance.to_owned() }
    }
}

fn io(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

impl<C: CasStore> StoreCas<C> {
    fn key(&self, digest: &Digest) -> CasKey {
        CasKey::of(&Permit::<rights::CasWrite>::internal(&self.instance), *digest)
    }
}

impl<C: CasStore> CasClient for StoreCas<C> {
    async fn read_to_file(&self, digest: &Digest, path: &Path) -> kiln_proto::Result<()> {
        let mut reader = self.cas.read(&self.key(digest), ByteRange::ALL).await?;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| io("create", path, &e))?;
        while let Some(chunk) = reader.next().await? {
            file.write_all(&chunk).await.map_err(|e| io("write", path, &e))?;
        }
        file.flush().await.map_err(|e| io("write", path, &e))
    }

    async fn read_bytes(&self, digest: &Digest) -> kiln_proto::Result<Bytes> {
        read_all(&self.cas, &self.key(digest), kiln_proto::limits::ACTION_MESSAGE_SIZE_BYTES_MAX).await
    }

    async fn find_missing(&self, digests: &[Digest]) -> kiln_proto::Result<Vec<Digest>> {
        let keys: Vec<CasKey> = digests.iter().map(|d| self.key(d)).collect();
        Ok(self.cas.find_missing(&keys).await?.into_iter().map(|k| k.digest()).collect())
    }

    async fn upload_file(&self, digest: &Digest, path: &Path) -> kiln_proto::Result<()> {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(path).await.map_err(|e| io("open", path, &e))?;
        let mut writer = self.cas.write(&self.key(digest)).await?;
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = file.read(&mut buf).await.map_err(|e| io("read", path, &e))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            writer.write(Bytes::from(buf)).await?;
        }
        writer.commit().await
    }

    async fn upload_bytes(&self, digest: &Digest, data: Bytes) -> kiln_proto::Result<()> {
        put_all(&self.cas, &self.key(digest), data).await
    }
}

/// Where the worker keeps its directories.
pub fn worker_dirs(config: &WorkerConfig, data_dir: &Path) -> (PathBuf, PathBuf) {
    let base = data_dir.join("worker");
    (
        config.build_dir.clone().unwrap_or_else(|| base.join("build")),
        config.cache_dir.clone().unwrap_or_else(|| base.join("cache")),
    )
}

/// Builds a runner: the file cache, the sandbox, the per-action limits.
pub fn runner<F: CasFactory>(
    config: &WorkerConfig,
    data_dir: &Path,
    worker_id: &str,
    slots: usize,
    cas: F,
) -> Result<Runner<F>> {
    let (build_dir, cache_dir) = worker_dirs(config, data_dir);
    std::fs::create_dir_all(&build_dir).with_context(|| format!("create {}", build_dir.display()))?;
    // Absolute, so that the prefix of its runs' cgroups does not depend on
    // the directory the worker was started from.
    let build_dir =
        std::fs::canonicalize(&build_dir).with_context(|| format!("resolve {}", build_dir.display()))?;
    // Leftovers of a previous run are removed at start.
    for entry in std::fs::read_dir(&build_dir)?.flatten() {
        if let Err(e) = kiln_worker::remove::remove_tree(&entry.path()) {
            tracing::warn!(dir = %entry.path().display(), error = %e, "could not remove what an earlier run left");
        }
    }
    let cache = FileCache::open(&cache_dir, config.cache_size_bytes)
        .map_err(|e| anyhow::anyhow!("worker file cache: {}", e.message()))?;
    cache.check_same_filesystem(&build_dir).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let mut sandbox = kiln_worker::sandbox::SandboxConfig::new(
        kiln_worker::sandbox::stage_binary(&std::env::current_exe().context("locate the kiln binary")?),
        config.uid_base,
        config.uid_base,
    )
    .map_err(|e| anyhow::anyhow!("sandbox: {e}"))?;
    sandbox.root_fs.clone_from(&config.root_fs);
    kiln_worker::sandbox::probe(&sandbox).map_err(|e| anyhow::anyhow!("sandbox: {e}"))?;
    // Cgroups of runs a previous worker on this build directory left
    // behind when it died: their processes are killed, their limits freed.
    let swept = sandbox
        .cgroups
        .sweep(&kiln_worker::runner::run_prefix(&build_dir), Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("sandbox: {e}"))?;
    if swept > 0 {
        tracing::warn!(runs = swept, "removed the cgroups of runs a previous worker left behind");
    }
    let disks = slot_disks(config, data_dir, slots)?;
    let nonzero = |v: u64| (v > 0).then_some(v);
    let prefix = kiln_worker::runner::run_prefix(&build_dir);
    let slot_threads =
        kiln_worker::slots::Slots::new(u32::try_from(slots).context("too many slots")?, &prefix)
            .context("start the slots' sandbox threads")?;
    Ok(Runner {
        slots: slot_threads,
        config: RunnerConfig {
            worker_id: worker_id.to_owned(),
            build_dir,
            sandbox,
            uid_base: config.uid_base,
            memory_bytes: nonzero(config.memory_bytes),
            pids_max: nonzero(config.pids_max),
            cpu_millicores: nonzero(config.cpu_millicores),
            allow_host_network: config.allow_host_network,
            kill_grace: ms(config.kill_grace_ms),
            environment: config.environment.clone().into_iter().collect(),
            outputs: config.output_limits(),
            disks,
        },
        cache,
        cas,
    })
}

/// Each slot's filesystem, sized from the configuration and the free space
/// of the worker's filesystem: every slot's disk full at once, with the
/// file cache full, still leaves the reserve free.
fn slot_disks(config: &WorkerConfig, data_dir: &Path, slots: usize) -> Result<Option<Arc<SlotDisks>>> {
    use kiln_proto::limits::{
        ACTION_DISK_BYTES_DEFAULT_MAX, ACTION_DISK_BYTES_MIN, ACTION_DISK_BYTES_PER_INODE,
        WORKER_DISK_RESERVE_BYTES,
    };
    if !config.disk_limits {
        tracing::warn!("[execution.worker] disk_limits is off: an action can fill the worker's disk");
        return Ok(None);
    }
    let dir = data_dir.join("worker").join("disks");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Images of an earlier run count as free: they are made anew.
    for entry in std::fs::read_dir(&dir)?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "img") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let stat = nix::sys::statvfs::statvfs(&dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let free = stat.blocks_available().saturating_mul(stat.fragment_size());
    let slots_u64 = slots.max(1) as u64;
    // What else may fill this filesystem at once: the file cache, and the
    // copies of inputs past the hard-link limit in every slot's exec root.
    let (build_dir, cache_dir) = worker_dirs(config, data_dir);
    let here = |d: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(d).is_ok_and(|m| std::fs::metadata(&dir).is_ok_and(|h| h.dev() == m.dev()))
    };
    let cache = if here(&cache_dir) { config.cache_size_bytes } else { 0 };
    let copies = if here(&build_dir) { slots_u64 * kiln_proto::limits::INPUT_COPIED_BYTES_MAX } else { 0 };
    let budget = free.saturating_sub(cache).saturating_sub(copies).saturating_sub(WORKER_DISK_RESERVE_BYTES);
    let bytes = match config.disk_bytes {
        0 => (budget / slots_u64).min(ACTION_DISK_BYTES_DEFAULT_MAX),
        n => n,
    };
    if bytes < ACTION_DISK_BYTES_MIN || bytes.saturating_mul(slots_u64) > budget {
        anyhow::bail!(
            "[execution.worker] disk_bytes: {slots} slots of {bytes} bytes do not fit: {} has {free} bytes free, \
             of which the file cache ({cache} bytes), copies of inputs ({copies} bytes: 1 GiB per slot) and a \
             reserve of {WORKER_DISK_RESERVE_BYTES} are kept; each slot needs at least {ACTION_DISK_BYTES_MIN}. \
             Lower disk_bytes, cache_size_bytes or the slots, or free space",
            dir.display(),
        );
    }
    let inodes = match config.disk_inodes {
        0 => (bytes / ACTION_DISK_BYTES_PER_INODE).clamp(1024, u64::from(u32::MAX)),
        n => n,
    };
    let slots = u32::try_from(slots).context("too many slots")?;
    let disks = SlotDisks::prepare(&dir, slots, DiskLimits { bytes, inodes })
        .map_err(|e| anyhow::anyhow!("per-action disks ([execution.worker] disk_limits): {e}"))?;
    tracing::info!(slots, bytes, inodes, dir = %dir.display(), "each slot has a disk of its own");
    Ok(Some(Arc::new(disks)))
}
