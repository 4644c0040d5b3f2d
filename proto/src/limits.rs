//! Every bound Kiln enforces, in one place.
//!
//! [`Limits`] holds the configurable ones (the `[limits]` section, each key
//! documented in README.md and `docs/kiln.example.toml`), checked against
//! each other at start-up by [`Limits::validate`]. The constants below it are
//! fixed by the protocol or by safety, and documented here. A tidy test keeps
//! bounds from being declared anywhere else.

use serde::Deserialize;

/// Longest instance name accepted, in bytes.
pub const INSTANCE_NAME_LENGTH_MAX: usize = 1024;
/// Longest ByteStream resource name accepted, in bytes.
pub const RESOURCE_NAME_LENGTH_MAX: usize = 4096;
/// Longest gRPC status message Kiln sends, in bytes (clients cap the
/// `grpc-message` header at 8 KiB; stay well below).
pub const MESSAGE_LENGTH_MAX: usize = 1024;
/// Most characters of client-supplied text quoted in a message or log line.
pub const QUOTED_CHARS_MAX: usize = 64;
/// Longest principal name (certificate name, user, token principal).
pub const PRINCIPAL_LENGTH_MAX: usize = 256;
/// Most characters of the identity header recorded per request.
pub const IDENTITY_CHARS_MAX: usize = 256;
/// Per-stream HTTP/2 flow-control window: the most bytes a peer may send on
/// one stream before Kiln reads them.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// Per-connection HTTP/2 flow-control window: the most unread bytes one
/// connection can make Kiln buffer, across all its streams.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// Largest HTTP/2 frame accepted.
pub const FRAME_SIZE_BYTES_MAX: u32 = 4 << 20;
/// Largest HTTP/2 header list accepted (gRPC metadata).
pub const HEADER_LIST_SIZE_BYTES_MAX: u32 = 64 << 10;
/// Block store: most index partitions (each a hash table one storage
/// thread owns, which grows on its own and is written to a checkpoint
/// whole, so its size bounds the memory a checkpoint takes at a time).
pub const BLOCK_PARTITIONS_MAX: u64 = 256;
/// Block store: an index partition grows (doubling) to at most this many
/// times the slots `expected_blob_bytes` allots it; past that, the oldest
/// blocks are evicted early, as a full ring evicts (bounds index memory
/// whatever the blobs' sizes).
pub const BLOCK_INDEX_GROWTH_MAX: u64 = 16;
/// Block store: the index log is folded into a new checkpoint once it is
/// longer than the checkpoint and at least this long, so a restart reads
/// at most about twice the entries held.
pub const BLOCK_INDEX_LOG_MIN_BYTES: u64 = 1 << 20;
/// Block store: requests queued per storage thread before callers wait.
pub const BLOCK_QUEUE_DEPTH: usize = 1024;
/// Block store: requests one storage thread takes into a batch.
pub const BLOCK_BATCH_REQUESTS_MAX: usize = 64;
/// Block store: io_uring entries per storage thread (I/O in flight at once).
pub const BLOCK_RING_ENTRIES: u32 = 256;
/// Block store: index slots probed from a key's bucket.
pub const BLOCK_INDEX_PROBES: usize = 16;
/// Block store: blobs up to this size are written in one request.
pub const BLOCK_SMALL_BLOB_BYTES: u64 = 64 << 10;
/// Block store: the smallest upload staging area (room for one client's
/// 1 MiB chunk: each client may hold half).
pub const BLOCK_STAGING_BYTES_MIN: u64 = 2 << 20;
/// Block store: threads doing the staging area's file I/O, and the
/// operations that may wait for them.
pub const BLOCK_STAGING_THREADS: usize = 4;
pub const BLOCK_STAGING_QUEUE_DEPTH: usize = 1024;
/// Block store: times a staged upload is copied into the ring, should the
/// ring pass the space it is copied into each time.
pub const BLOCK_STAGED_COPY_ATTEMPTS: u32 = 3;
/// Block store: blobs waiting to be copied forward, per storage thread;
/// past it (or past the backlog in bytes the ring allows) an old blob that
/// FindMissingBlobs asks about is reported missing, never silently left to
/// be evicted.
pub const BLOCK_REFRESH_QUEUE_MAX: usize = 65_536;
/// Block store: bytes a copy forward moves per step.
pub const BLOCK_REFRESH_STEP_BYTES: u64 = 1 << 20;
/// Longest a write waits for room in the ring (a sync that frees space);
/// then it fails with UNAVAILABLE instead of waiting on a store whose
/// syncs keep failing.
pub const BLOCK_ROOM_WAIT_MS: u64 = 20_000;
/// Block store: index entries a storage thread keeps between syncs (to
/// undo them if the data device fails its sync); each multiple of this
/// asks the syncer for a sync at once, so the list (40 bytes an entry, 80
/// MiB at this size) stays near it whatever the write rate. Syncing more
/// often than this costs more than the memory: a sync writes every index
/// page changed since the last one.
pub const BLOCK_UNSYNCED_ENTRIES_SOFT_MAX: usize = 2 << 20;
/// Block store: bytes of index entries a storage thread hands the syncer
/// per round of a sync (at least one partition's when it writes a
/// checkpoint): a checkpoint holds this much of the index in memory at a
/// time, not all of it.
pub const BLOCK_PERSIST_BYTES_MAX: usize = 4 << 20;
/// Block store: most index slots the scrub looks at per tick and storage
/// thread (a nearly empty table costs little to walk).
pub const BLOCK_SCRUB_SLOTS_PER_TICK_MAX: usize = 65_536;
/// How often waiting writes are checked against their deadline (and the
/// scrub spends the time since on its budget).
pub const BLOCK_TICK_MS: u64 = 250;
/// Most bytes a store hands out in one chunk of a read.
pub const STORE_CHUNK_BYTES: u64 = 1 << 20;
/// Blobs of one BatchUpdateBlobs or BatchReadBlobs call handed to the store
/// at once (the call's bytes are bounded by `batch_total_size_bytes_max`).
pub const BATCH_BLOBS_IN_FLIGHT: usize = 64;
/// Scheduler: largest Action or Command message it reads.
pub const ACTION_MESSAGE_SIZE_BYTES_MAX: u64 = 16 << 20;
/// Scheduler: how often it looks for lost workers, stuck, orphaned and
/// unsatisfiable executions, and old operations.
pub const SCHEDULER_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Scheduler: waiting executions of one invocation it considers when a
/// slot frees.
pub const SCHEDULER_QUEUE_SCAN_MAX: usize = 64;
/// Scheduler: time past an action's timeout before a worker that has not
/// reported it is presumed stuck and the action requeued.
pub const EXECUTION_REPORT_GRACE: std::time::Duration = std::time::Duration::from_secs(60);
/// Execute and WaitExecution streams send the operation at least this
/// often (Bazel's keepalive gives each call a 60 s deadline).
pub const OPERATION_UPDATE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);
/// `kiln serve`'s local worker process: the pause before starting it again
/// after it ended, doubled after each that lived under
/// [`LOCAL_WORKER_HEALTHY_RUN`], at most the max.
pub const LOCAL_WORKER_RESTART_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_secs(1);
pub const LOCAL_WORKER_RESTART_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// A local worker process that lived this long resets the pause.
pub const LOCAL_WORKER_HEALTHY_RUN: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest `kiln serve` waits at start for its local worker to register
/// before it serves anyway.
pub const LOCAL_WORKER_READY_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// A scrape of `kiln serve` reads at most this much of its local worker's
/// `/metrics`, within the timeout.
pub const LOCAL_WORKER_METRICS_BYTES_MAX: usize = 1 << 20;
pub const LOCAL_WORKER_METRICS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Remote Asset API: most URIs, and most qualifiers, in one request; the
/// longest URI, and the longest qualifier (name and value together).
pub const ASSET_URIS_MAX: usize = 64;
pub const ASSET_QUALIFIERS_MAX: usize = 64;
pub const ASSET_URI_BYTES_MAX: usize = 8192;
pub const ASSET_QUALIFIER_BYTES_MAX: usize = 8192;
/// Remote Asset API: most blobs and directories one asset may reference
/// besides its own content.
pub const ASSET_REFERENCES_MAX: usize = 10_000;
/// Scheduler: distinct platforms of lost workers it remembers (so that
/// an action for one waits for the worker to come back).
pub const LOST_PLATFORMS_MAX: usize = 1024;
/// Scheduler: messages queued to one worker session.
pub const WORKER_SESSION_QUEUE: usize = 1024;
/// Most operations one ListOperations page returns.
pub const OPERATIONS_PAGE_MAX: usize = 1000;

// The metrics listener and status page.

/// Connections the metrics listener serves at once; more wait in the
/// kernel's backlog.
pub const METRICS_CONNECTIONS_MAX: usize = 64;
/// Longest wait for an HTTP request's headers on the metrics listener.
pub const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest a metrics listener connection lives, however busy: a client
/// that stops reading a response gives its slot back by then (scrapers
/// simply reconnect).
pub const METRICS_CONNECTION_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(120);
/// Spans waiting for the OTLP exporter; beyond it new spans are dropped
/// (a slow collector costs traces, never memory).
pub const OTLP_QUEUED_SPANS_MAX: usize = 8192;
/// Failed-action logs the status page reads from the CAS at once (each up
/// to [`STATUS_LOG_BYTES_MAX`] in memory); more wait their turn.
pub const STATUS_LOG_FETCHES_MAX: usize = 4;
/// Largest failed-action log the status page serves, in bytes.
pub const STATUS_LOG_BYTES_MAX: u64 = 16 << 20;
/// Largest status summary `kiln status` accepts, in bytes.
pub const STATUS_SUMMARY_BYTES_MAX: usize = 4 << 20;
/// Execution priorities a client may ask for (advertised in Capabilities;
/// others are INVALID_ARGUMENT): the fair queue weighs a build by
/// `2^(priority / 100)`, so this bounds one build's advantage to 2^10.
pub const EXECUTION_PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;
/// Failed executions the scheduler keeps for the status page.
pub const RECENT_FAILURES_MAX: usize = 50;
/// Executions in progress a status snapshot lists.
pub const SNAPSHOT_EXECUTING_MAX: usize = 1000;
/// Invocations the status page lists in the queue (the most queued
/// first); the rest are summed in one row.
pub const SNAPSHOT_INVOCATIONS_MAX: usize = 100;

// The worker and its sandbox.

/// Longest sandbox run id, in bytes: it names a directory in every cgroup
/// hierarchy.
pub const SANDBOX_ID_BYTES_MAX: usize = 128;

/// Longest working directory of an action, in bytes.
pub const WORKING_DIRECTORY_BYTES_MAX: usize = 4096;

/// Largest spec the worker sends to the sandbox's init (argv, environment
/// and the mount plan, as JSON), in bytes.
pub const SANDBOX_SPEC_FRAME_BYTES_MAX: usize = 64 << 20;

/// Largest report a sandbox stage sends back, in bytes; error messages are
/// cut to fit.
pub const SANDBOX_REPORT_FRAME_BYTES_MAX: usize = 64 << 10;

/// Most mounts (bound directories, files and devices) one sandbox gets;
/// stage 1 holds a descriptor for each until init has bound them.
pub const SANDBOX_MOUNTS_MAX: usize = 200;

/// Smallest CPU limit of a sandbox: the kernel's smallest quota is 1 ms per
/// 100 ms period.
pub const SANDBOX_CPU_MILLICORES_MIN: u64 = 10;

/// How long the worker waits, after killing a sandbox, for its processes
/// to be gone and its cgroups removed.
pub const SANDBOX_CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest a sandbox made ahead of its action may take to get ready.
pub const SANDBOX_PREPARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a killed sandbox may take to report before the worker stops
/// reading from it.
pub const SANDBOX_KILL_REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An action's input tree: most files, directories and symlinks (every
/// occurrence: a Directory reached twice counts twice), deepest nesting,
/// and most bytes of files in all.
pub const INPUT_FILES_MAX: u64 = 1_000_000;
pub const INPUT_DIRECTORIES_MAX: u64 = 100_000;
pub const INPUT_SYMLINKS_MAX: u64 = 100_000;
pub const INPUT_DEPTH_MAX: usize = 128;
pub const INPUT_TOTAL_BYTES_MAX: u64 = 64 << 30;
/// Walking a directory tree (GetTree, an action's input root): most
/// directories read at once, and most bytes of them by their digests'
/// sizes (a larger directory is read alone).
pub const TREE_READ_BATCH_DIRECTORIES_MAX: usize = 32;
pub const TREE_READ_BATCH_BYTES_MAX: u64 = 8 << 20;
/// Digests per FindMissingBlobs call a client sends (about 1 MiB of
/// request); longer lists are sent in several calls.
pub const FIND_MISSING_BATCH: usize = 10_000;
/// Most bytes of an action's inputs written as copies: a blob linked more
/// often than the filesystem allows (65,000 links on ext4) is copied, so a
/// small blob named many times would otherwise write up to
/// [`INPUT_TOTAL_BYTES_MAX`] per action.
pub const INPUT_COPIED_BYTES_MAX: u64 = 1 << 30;

/// An action's outputs: largest file (and log), most bytes of all files,
/// most entries (files, directories and symlinks), deepest nesting inside
/// an output directory.
pub const OUTPUT_FILE_BYTES_MAX: u64 = 16 << 30;
pub const OUTPUT_TOTAL_BYTES_MAX: u64 = 64 << 30;
pub const OUTPUT_ENTRIES_MAX: u64 = 1_000_000;
pub const OUTPUT_DEPTH_MAX: usize = 128;
/// One action's disk (its slot's filesystem) when `[execution.worker]
/// disk_bytes` is left to the worker: the free space left after the file
/// cache and the reserve, split between the slots, at most this much.
pub const ACTION_DISK_BYTES_DEFAULT_MAX: u64 = 16 << 30;
/// The smallest disk a slot may have.
pub const ACTION_DISK_BYTES_MIN: u64 = 64 << 20;
/// Bytes per inode of a slot's filesystem when `disk_inodes` is left to
/// the worker: twice ext4's default density, since build outputs are many
/// small files and directories (each inode takes 256 bytes of the disk).
pub const ACTION_DISK_BYTES_PER_INODE: u64 = 8 << 10;
/// Free space of the worker's filesystem no slot's disk may count on.
pub const WORKER_DISK_RESERVE_BYTES: u64 = 1 << 30;
/// Longest the worker spends collecting one action's outputs and logs
/// (hashing and uploading them) after the action ended.
pub const OUTPUT_COLLECT_SECS_MAX: u64 = 600;
/// Removing a tree an action wrote: subdirectory names kept per level from
/// one reading of a directory (a wider directory is read again when they
/// are done), so memory stays bounded whatever the tree's shape.
pub const REMOVE_PENDING_NAMES_MAX: usize = 1024;

/// Output files up to this size are kept in memory between hashing and
/// upload, up to the second figure per collection.
pub const OUTPUT_INLINE_FILE_BYTES_MAX: u64 = 1 << 20;
pub const OUTPUT_INLINE_TOTAL_BYTES_MAX: u64 = 64 << 20;
/// Responses are handed to the HTTP/2 stack in pieces of this size, so that
/// what a stalled client leaves queued beyond the response budget is at
/// most two pieces per stream.
pub const RESPONSE_PIECE_BYTES: usize = 256 << 10;
/// File descriptors kept free of connections (data files, logs, reloads).
pub const FILE_DESCRIPTORS_RESERVED: u64 = 256;
/// Connections allowed when the descriptor limit is unknown or huge.
pub const CONNECTIONS_DEFAULT_MAX: usize = 65_536;
/// First and longest pause of the accept loop after a failed accept (out
/// of descriptors or memory), doubling in between.
pub const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(5);
pub const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);
/// The largest size a digest can name: the wire's `size_bytes` is an `int64`.
pub const DIGEST_SIZE_BYTES_MAX: u64 = i64::MAX as u64;
/// Largest gRPC message Kiln's own tools (CLI, load generator, null
/// server) accept or send.
pub const TOOL_MESSAGE_SIZE_BYTES_MAX: usize = 64 << 20;
/// Most operations one `kiln bench` run records latencies for.
pub const BENCH_OPERATIONS_MAX: u64 = 10_000_000;
/// Most bytes of blobs one `kiln bench` run holds in memory to upload.
pub const BENCH_SETUP_BYTES_MAX: u64 = 4 << 30;

/// The configurable limits. Units are last in the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest single gRPC message accepted or sent.
    pub grpc_message_size_bytes_max: usize,
    /// Largest total of blob sizes in one BatchUpdateBlobs or BatchReadBlobs
    /// call; advertised in Capabilities as `max_batch_total_size_bytes`.
    pub batch_total_size_bytes_max: u64,
    /// Most digests in one FindMissingBlobs or Batch* call.
    pub batch_digests_max: usize,
    /// Largest blob the CAS accepts; advertised as `max_cas_blob_size_bytes`.
    pub blob_size_bytes_max: u64,
    /// Largest serialized ActionResult the AC accepts.
    pub action_result_size_bytes_max: usize,
    /// Most bytes inlined into one GetActionResult response.
    pub inline_size_bytes_max: u64,
    /// Most blobs one GetActionResult checks in the CAS, counting every file
    /// inside its output trees; a result referencing more is treated as absent.
    pub referenced_blobs_max: usize,
    /// Largest output tree GetActionResult reads to check; a result with a
    /// larger one is treated as absent.
    pub output_tree_size_bytes_max: u64,
    /// Most output trees one GetActionResult fetches at once.
    pub output_tree_fetches_max: usize,
    /// Largest chunk of data in one ByteStream Read response.
    pub read_chunk_size_bytes: usize,
    /// Most bytes of ByteStream Read responses prepared and not yet taken
    /// by the network, across all clients; further reads wait.
    pub reads_in_flight_bytes_max: u64,
    /// Most bytes of other responses (BatchReadBlobs, GetTree pages,
    /// FindMissingBlobs ...) produced and not yet taken by the network,
    /// across all clients (a quarter of it per client address).
    pub responses_in_flight_bytes_max: u64,
    /// Most directories returned in one GetTree page.
    pub tree_page_size_max: usize,
    /// Most directories GetTree walks for one request.
    pub tree_directories_max: usize,
    /// Most GetTree walks running at once; further requests wait.
    pub tree_walks_max: usize,
    /// Most bytes of uploads held in memory at once: each message (and each
    /// decompressed chunk of it) from its arrival until the store has taken
    /// it; further data waits.
    pub uploads_in_flight_bytes_max: u64,
    /// Most bytes of uploads in flight from one client address.
    pub upload_client_bytes_max: u64,
    /// Longest a request waits for memory (uploads, reads, GetTree) before it
    /// is refused with RESOURCE_EXHAUSTED.
    pub admission_timeout_ms: u64,
    /// Most bytes of received messages waiting for memory at once; beyond
    /// it, requests are refused at once with RESOURCE_EXHAUSTED.
    pub admission_waiting_bytes_max: u64,
    /// Most unfinished uploads remembered for resumption.
    pub partial_uploads_max: usize,
    /// Most bytes of unfinished uploads remembered for resumption; the least
    /// recently interrupted are forgotten first.
    pub partial_uploads_bytes_max: u64,
    /// Longest wait for the next message of an upload before it is dropped
    /// (and kept for resumption).
    pub upload_idle_timeout_ms: u64,
    /// Most open client connections; unset: 3/4 of the file-descriptor
    /// limit less a reserve. Connections beyond it are closed at once.
    pub connections_max: Option<usize>,
    /// HTTP/2 streams (concurrent calls) per connection, advertised as
    /// SETTINGS_MAX_CONCURRENT_STREAMS; further streams are refused.
    pub streams_per_connection_max: u32,
    /// Longest a new connection may take to complete its TLS handshake and
    /// send the HTTP/2 preface before it is closed.
    pub connection_preface_timeout_ms: u64,
    /// Most TLS handshakes in progress at once.
    pub tls_handshakes_in_flight_max: usize,
    /// Most client addresses tracked for rate-limited logging of
    /// authentication failures and denials.
    pub log_peers_tracked_max: usize,
    /// Most password hashes (bcrypt, apr1) computed at once; further basic
    /// auth requests wait.
    pub password_hashes_in_flight_max: usize,
    /// Most verified basic-auth credentials remembered (dropped when the
    /// htpasswd file changes).
    pub password_cache_entries_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            grpc_message_size_bytes_max: 16 << 20,
            batch_total_size_bytes_max: 4 << 20,
            batch_digests_max: 65_536,
            blob_size_bytes_max: 1 << 30,
            action_result_size_bytes_max: 1 << 20,
            inline_size_bytes_max: 1 << 20,
            referenced_blobs_max: 1 << 20,
            output_tree_size_bytes_max: 64 << 20,
            output_tree_fetches_max: 16,
            read_chunk_size_bytes: 1 << 20,
            reads_in_flight_bytes_max: 1 << 30,
            responses_in_flight_bytes_max: 1 << 30,
            tree_page_size_max: 10_000,
            tree_directories_max: 1_000_000,
            tree_walks_max: 64,
            uploads_in_flight_bytes_max: 1 << 30,
            upload_client_bytes_max: 256 << 20,
            admission_timeout_ms: 10_000,
            admission_waiting_bytes_max: 256 << 20,
            partial_uploads_max: 64,
            partial_uploads_bytes_max: 512 << 20,
            upload_idle_timeout_ms: 60_000,
            connections_max: None,
            streams_per_connection_max: 256,
            connection_preface_timeout_ms: 10_000,
            tls_handshakes_in_flight_max: 1024,
            log_peers_tracked_max: 10_000,
            password_hashes_in_flight_max: 4,
            password_cache_entries_max: 10_000,
        }
    }
}

impl Limits {
    /// Checks that the limits are consistent with each other; the message
    /// names the offending keys.
    pub fn validate(&self) -> Result<(), String> {
        let positive: [(&str, u64); 20] = [
            ("output_tree_size_bytes_max", self.output_tree_size_bytes_max),
            ("grpc_message_size_bytes_max", self.grpc_message_size_bytes_max as u64),
            ("batch_digests_max", self.batch_digests_max as u64),
            ("blob_size_bytes_max", self.blob_size_bytes_max),
            ("action_result_size_bytes_max", self.action_result_size_bytes_max as u64),
            ("referenced_blobs_max", self.referenced_blobs_max as u64),
            ("output_tree_fetches_max", self.output_tree_fetches_max as u64),
            ("reads_in_flight_bytes_max", self.reads_in_flight_bytes_max),
            ("tree_page_size_max", self.tree_page_size_max as u64),
            ("tree_directories_max", self.tree_directories_max as u64),
            ("tree_walks_max", self.tree_walks_max as u64),
            ("admission_timeout_ms", self.admission_timeout_ms),
            ("partial_uploads_bytes_max", self.partial_uploads_bytes_max),
            ("upload_idle_timeout_ms", self.upload_idle_timeout_ms),
            ("streams_per_connection_max", u64::from(self.streams_per_connection_max)),
            ("connection_preface_timeout_ms", self.connection_preface_timeout_ms),
            ("tls_handshakes_in_flight_max", self.tls_handshakes_in_flight_max as u64),
            ("log_peers_tracked_max", self.log_peers_tracked_max as u64),
            ("password_hashes_in_flight_max", self.password_hashes_in_flight_max as u64),
            ("password_cache_entries_max", self.password_cache_entries_max as u64),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key} must be positive"));
        }
        // A batch request carries its blobs plus roughly 100 bytes of framing
        // per digest; keep a quarter of the message for that.
        let room = (self.grpc_message_size_bytes_max as u64) / 4 * 3;
        if self.batch_total_size_bytes_max == 0 || self.batch_total_size_bytes_max > room {
            return Err(format!(
                "batch_total_size_bytes_max ({}) must be between 1 and 3/4 of grpc_message_size_bytes_max ({})",
                self.batch_total_size_bytes_max, self.grpc_message_size_bytes_max
            ));
        }
        if self.read_chunk_size_bytes == 0
            || self.read_chunk_size_bytes > self.grpc_message_size_bytes_max / 2
        {
            return Err(
                "read_chunk_size_bytes must be between 1 and half of grpc_message_size_bytes_max".into()
            );
        }
        if self.reads_in_flight_bytes_max < self.read_chunk_size_bytes as u64 {
            return Err("reads_in_flight_bytes_max must be at least read_chunk_size_bytes".into());
        }
        if self.responses_in_flight_bytes_max < self.grpc_message_size_bytes_max as u64 {
            return Err("responses_in_flight_bytes_max must be at least grpc_message_size_bytes_max".into());
        }
        if self.inline_size_bytes_max > room {
            return Err("inline_size_bytes_max must be at most 3/4 of grpc_message_size_bytes_max".into());
        }
        // An upload holds a message, and a decompressed chunk of it, in
        // memory until the store takes them.
        if self.upload_client_bytes_max < self.grpc_message_size_bytes_max as u64 + (1 << 20) {
            return Err(
                "upload_client_bytes_max must be at least grpc_message_size_bytes_max plus 1 MiB (one message and a decompressed chunk)"
                    .into(),
            );
        }
        if self.uploads_in_flight_bytes_max < self.upload_client_bytes_max {
            return Err("uploads_in_flight_bytes_max must be at least upload_client_bytes_max".into());
        }
        // A message waiting for admission is already in memory.
        if self.admission_waiting_bytes_max < self.grpc_message_size_bytes_max as u64 {
            return Err(
                "admission_waiting_bytes_max must be at least grpc_message_size_bytes_max (one message)"
                    .into(),
            );
        }
        if self.connections_max == Some(0) {
            return Err("connections_max must be positive (or unset for automatic)".into());
        }
        if self.connection_preface_timeout_ms > 10_000 {
            return Err("connection_preface_timeout_ms must be at most 10000".into());
        }
        Ok(())
    }

    /// The connection bound for a process allowed `descriptors` open files.
    pub fn connections_for(&self, descriptors: u64) -> Result<usize, String> {
        let room = descriptors.saturating_sub(FILE_DESCRIPTORS_RESERVED);
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        match self.connections_max {
            Some(n) if n > room => Err(format!(
                "connections_max ({n}) exceeds the {descriptors} file descriptors this process may open \
                 less {FILE_DESCRIPTORS_RESERVED} reserved; raise the limit (ulimit -n, LimitNOFILE) or lower it"
            )),
            Some(n) => Ok(n),
            None if room == 0 => Err(format!(
                "only {descriptors} file descriptors may be opened; Kiln needs more than {FILE_DESCRIPTORS_RESERVED}"
            )),
            None => Ok((room / 4 * 3).clamp(1, CONNECTIONS_DEFAULT_MAX)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_consistent() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn inconsistent_limits_name_their_keys() {
        let cases = [
            (
                Limits { batch_total_size_bytes_max: 16 << 20, ..Limits::default() },
                "batch_total_size_bytes_max",
            ),
            (Limits { tree_walks_max: 0, ..Limits::default() }, "tree_walks_max"),
            (Limits { upload_client_bytes_max: 1 << 20, ..Limits::default() }, "upload_client_bytes_max"),
            (Limits { admission_waiting_bytes_max: 1, ..Limits::default() }, "admission_waiting_bytes_max"),
            (Limits { connection_preface_timeout_ms: 60_000, ..Limits::default() }, "preface"),
        ];
        for (limits, key) in cases {
            assert!(limits.validate().unwrap_err().contains(key), "{key}");
        }
        // Upload budgets of one message (and a decompressed chunk) are valid,
        // whatever the largest blob: uploads stream into the store.
        let tight = Limits {
            upload_client_bytes_max: (17 << 20),
            uploads_in_flight_bytes_max: (17 << 20),
            ..Limits::default()
        };
        tight.validate().unwrap();
    }

    #[test]
    fn connections_stay_below_the_descriptor_limit() {
        let auto = Limits::default();
        assert_eq!(auto.connections_for(4096).unwrap(), (4096 - 256) / 4 * 3);
        assert_eq!(auto.connections_for(u64::MAX).unwrap(), CONNECTIONS_DEFAULT_MAX);
        assert!(auto.connections_for(100).is_err());
        let fixed = Limits { connections_max: Some(5000), ..Limits::default() };
        assert!(fixed.connections_for(4096).unwrap_err().contains("connections_max"));
        assert_eq!(fixed.connections_for(1 << 20).unwrap(), 5000);
    }
}
