//! `kiln`: remote cache and remote build execution for Bazel and Buck2.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_proto::{Digest, DigestFunction};
use kiln_tools::cas::Cas;
use kiln_tools::token;

mod config;
mod exec_bench;
mod execution;
mod io_bench;
mod local_worker;
mod serve;
mod storage;
mod store_bench;
mod telemetry;
mod token_file;
mod worker_cmd;

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Remote cache and remote build execution for Bazel and Buck2")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cache (CAS, AC, ByteStream, Capabilities), the scheduler and
    /// a local worker in one process.
    Serve(ServeArgs),
    /// `kiln serve` without the local worker: storage and the scheduler,
    /// for workers on other machines (`kiln worker`).
    Scheduler(ServeArgs),
    /// Run actions for a scheduler, in sandboxes, with a local file cache.
    Worker(worker_cmd::WorkerArgs),
    /// Print a node's status summary: stores, cache traffic, queue,
    /// workers, recent failures (its metrics listener's /status.txt).
    Status {
        /// The node's metrics listener ([metrics] listen).
        #[arg(long, default_value = "127.0.0.1:9980")]
        metrics: String,
        /// Bearer token holding the admin permission (when the node
        /// authenticates).
        #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// USER:PASSWORD for basic auth instead of a token.
        #[arg(long, env = "KILN_BASIC_AUTH", hide_env_values = true)]
        basic_auth: Option<String>,
    },
    /// Print the default configuration file.
    Config,
    /// Move blobs in and out of a CAS.
    Cas {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: CasCommand,
    },
    /// Generate load against a REAPI endpoint and report throughput and latency.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Serve REAPI calls that do no work (benchmark baseline).
    #[command(hide = true)]
    NullServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Create, list, rotate and revoke bearer tokens.
    Token {
        #[command(flatten)]
        remote: ConnectArgs,
        /// Operate on this token file directly instead of a server's admin
        /// API (to create the first admin token).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Run one workload against an endpoint.
    Run {
        #[command(flatten)]
        remote: ConnectArgs,
        /// bytestream-write, bytestream-read, batch-update, batch-read, find-missing, ac-get, ac-update.
        #[arg(value_parser = parse_workload)]
        workload: kiln_tools::bench::Workload,
        /// REAPI instance name.
        #[arg(long, default_value = "")]
        instance: String,
        /// Operations in total (find-missing, ac-get, ac-update).
        #[arg(long, default_value_t = 100_000)]
        requests: u64,
        /// Bytes in total (bytestream and batch workloads), e.g. 1073741824.
        #[arg(long = "total-bytes", default_value_t = 1 << 30)]
        total_bytes: u64,
        /// Blob size in bytes.
        #[arg(long = "blob-size", default_value_t = 64 << 20)]
        blob_size: u64,
        /// Operations in flight at once (streams, for ByteStream).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// HTTP/2 connections shared by the workers.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Digests per FindMissingBlobs call, blobs per batch.
        #[arg(long, default_value_t = 1000)]
        digests: usize,
        /// Drop the page cache after the set-up, so reads come from the disk (needs root).
        #[arg(long)]
        cold: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// All workloads against Kiln and the null server, with baselines, ratios and floors.
    Suite {
        /// Short runs (CI).
        #[arg(long)]
        quick: bool,
        /// TOML file of ratio floors; fail when a ratio is below its floor.
        #[arg(long)]
        floors: Option<PathBuf>,
        /// Also run every workload against this REAPI endpoint (e.g. BuildGrid).
        #[arg(long)]
        peer: Option<String>,
        /// Instance name to use on the peer.
        #[arg(long, default_value = "")]
        peer_instance: String,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// No-op actions through the scheduler with in-process workers:
    /// actions per second and dispatch latency.
    Scheduler {
        #[arg(long, default_value_t = 50_000)]
        actions: usize,
        #[arg(long, default_value_t = 16)]
        workers: usize,
        #[arg(long, default_value_t = 8)]
        slots: u32,
        /// Execute calls in flight.
        #[arg(long, default_value_t = 512)]
        in_flight: usize,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// `/bin/true` in the sandbox against a plain fork and exec (needs root).
    Sandbox {
        #[arg(long, default_value_t = 50)]
        runs: u32,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Materializing an input tree of many files from the worker's file cache.
    Inputs {
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Buffered I/O against O_DIRECT with registered buffers, on the same
    /// files or devices in one run: writes, hot and cold reads.
    Io {
        /// A file (created and allocated) or a block device, e.g. a loop
        /// device; repeat to measure several in one run. Its bytes are
        /// overwritten.
        #[arg(long, required = true)]
        path: Vec<PathBuf>,
        /// Bytes written and read per path and mode.
        #[arg(long, default_value_t = 512 << 20)]
        bytes: u64,
        /// Random 64 KiB reads per pass.
        #[arg(long, default_value_t = 20_000)]
        reads: usize,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// The block store's engine without gRPC, beside the memory store:
    /// fill, index bytes per blob, restart time, lookups.
    Store {
        /// Blobs to fill the store with.
        #[arg(long, default_value_t = 10_000_000)]
        blobs: u64,
        /// Bytes per blob.
        #[arg(long = "blob-size", default_value_t = 64)]
        blob_size: u64,
        /// Directory for the store's files (removed afterwards).
        #[arg(long, default_value = "kiln-bench-store")]
        dir: PathBuf,
        /// auto, io-uring or pread.
        #[arg(long, default_value = "auto", value_parser = parse_io)]
        io: kiln_storage::store::block::IoMode,
        /// Writes in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Digests per find_missing call.
        #[arg(long, default_value_t = 10_000)]
        lookups: usize,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
}

fn write_json(path: Option<PathBuf>, value: &serde_json::Value) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(&path, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn parse_io(s: &str) -> Result<kiln_storage::store::block::IoMode, String> {
    use kiln_storage::store::block::IoMode;
    match s {
        "auto" => Ok(IoMode::Auto),
        "io-uring" => Ok(IoMode::IoUring),
        "pread" => Ok(IoMode::Pread),
        _ => Err(format!("unknown I/O path {s:?}; use auto, io-uring or pread")),
    }
}

fn parse_workload(s: &str) -> Result<kiln_tools::bench::Workload, String> {
    kiln_tools::bench::Workload::from_name(s).ok_or_else(|| {
        let all: Vec<_> = kiln_tools::bench::Workload::ALL.iter().map(|w| w.name()).collect();
        format!("unknown workload {s:?}; use one of {}", all.join(", "))
    })
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token; prints it once on standard output.
    Create {
        #[arg(long)]
        principal: String,
        /// Tenant (instance name) the token is for, subtenants included.
        #[arg(long, default_value = "")]
        tenant: String,
        /// Comma-separated: read, write, cas-read, cas-write, ac-read, ac-write, execute, admin, worker, urgent (priorities below 0), all.
        #[arg(long = "perm", value_delimiter = ',', required = true)]
        permissions: Vec<String>,
        /// Lifetime such as 365d, 12h, or never.
        #[arg(long, default_value = "365d")]
        expires: String,
    },
    /// List tokens (of the tenants you administer).
    List,
    /// Replace a token with a new one with the same grant; the old one stops working.
    Rotate { id: String },
    /// Revoke a token at once.
    Revoke { id: String },
}

#[derive(Debug, clap::Args)]
struct ConnectArgs {
    /// Server endpoint: grpc://HOST:PORT, or grpcs://HOST:PORT for TLS.
    #[arg(long, global = true, env = "KILN_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    remote: String,
    /// CA bundle (PEM) to verify a grpcs:// server with [default: system roots].
    #[arg(long, global = true, env = "KILN_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS.
    #[arg(long, global = true, env = "KILN_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, global = true, env = "KILN_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Bearer token.
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Basic auth as USER:PASSWORD.
    #[arg(long, global = true, env = "KILN_BASIC_AUTH", hide_env_values = true)]
    basic_auth: Option<String>,
}

impl ConnectArgs {
    fn options(&self) -> kiln_tools::client::ClientOptions {
        kiln_tools::client::ClientOptions {
            remote: self.remote.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            token: self.token.clone(),
            basic: self.basic_auth.clone(),
        }
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file (see `kiln config`).
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8980].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Directory for Kiln's state [default: ./kiln-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve on a non-loopback address without authentication.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Bytes of the CAS data file ([storage] cas_size_bytes).
    #[arg(long)]
    cas_size: Option<u64>,
    /// Discard the CAS and the action cache and start them empty: once, on
    /// purpose (a store keeps its size and block size otherwise, and a
    /// store that cannot be read is refused, never silently replaced).
    #[arg(long)]
    reformat_stores: bool,
    /// Address of the worker port ([execution] worker_listen).
    #[arg(long)]
    worker_listen: Option<std::net::SocketAddr>,
    /// Address of the metrics listener and status page ([metrics] listen).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct RemoteArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// REAPI instance name.
    #[arg(long, global = true, default_value = "")]
    instance: String,
    /// Digest function for uploads.
    #[arg(long, global = true, default_value = "sha256", value_parser = parse_function)]
    digest_function: DigestFunction,
}

#[derive(Debug, Subcommand)]
enum CasCommand {
    /// Upload files; prints one digest per file.
    Put {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Download a blob into a file, verifying it.
    Get { digest: String, out: PathBuf },
    /// Print the digests the CAS does not hold.
    Missing {
        #[arg(required = true)]
        digests: Vec<String>,
    },
}

fn parse_function(s: &str) -> Result<DigestFunction, String> {
    DigestFunction::from_name(s).ok_or_else(|| format!("unknown digest function {s:?}: use sha256 or blake3"))
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse::<Digest>().map_err(|e| anyhow::anyhow!("{}", e.message()))
}

/// The `[log]` section of the configuration file (read again, with
/// errors reported, when the command loads it), its format overridden by
/// `KILN_LOG_FORMAT` (`text` or `json`).
fn log_config(cli: &Cli) -> telemetry::LogConfig {
    #[derive(serde::Deserialize)]
    struct LogOnly {
        #[serde(default)]
        log: telemetry::LogConfig,
    }
    let path = match &cli.command {
        Command::Serve(a) | Command::Scheduler(a) => a.config.as_ref(),
        Command::Worker(a) => a.config.as_ref(),
        _ => None,
    };
    let mut config = path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| toml::from_str::<LogOnly>(&t).ok())
        .map(|l| l.log)
        .unwrap_or_default();
    if let Ok(v) = std::env::var("KILN_LOG_FORMAT") {
        config.format = if v.eq_ignore_ascii_case("json") {
            telemetry::LogFormat::Json
        } else {
            telemetry::LogFormat::Text
        };
    }
    config
}

fn main() -> Result<()> {
    // The sandbox re-executes this binary as its stages; they must run
    // single-threaded, before anything else starts.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = kiln_worker::sandbox::dispatch_stage(&args) {
        std::process::exit(code);
    }
    let cli = Cli::parse();
    // Before any thread starts: a worker mounts each run's exec root and
    // its slots' disks, and those mounts die with this process's namespace.
    // (`kiln serve`'s local worker is a `kiln worker` process.)
    let private_mounts = match &cli.command {
        Command::Worker(_) if nix::unistd::geteuid().is_root() => {
            Some(kiln_worker::disk::enter_private_mount_namespace())
        }
        _ => None,
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start runtime")?;
    let _logging = {
        let _inside = runtime.enter();
        telemetry::init_logging(&log_config(&cli))?
    };
    if let Some(Err(e)) = private_mounts {
        tracing::warn!(error = %e, "the worker shares the host's mount namespace");
    }
    runtime.block_on(run(cli))
}

/// `kiln serve` and `kiln scheduler` (no local worker).
async fn serve_command(args: ServeArgs, local_worker: bool) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => config::Config::load(path)?,
        None => config::Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    config.insecure_no_auth |= args.insecure_no_auth;
    if let Some(size) = args.cas_size {
        config.storage.cas_size_bytes = size;
    }
    if let Some(addr) = args.metrics_listen {
        config.metrics.listen = addr;
    }
    config.storage.reformat = args.reformat_stores;
    if let Some(addr) = args.worker_listen {
        config.execution.worker_listen = addr;
    }
    if !local_worker {
        config.execution.local_worker = false;
    }
    serve::run(config).await
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Worker(args) => worker_cmd::run(args).await,
        Command::Status { metrics, token, basic_auth } => {
            let authorization = kiln_tools::client::authorization(token.as_deref(), basic_auth.as_deref())?;
            let text = telemetry::client::fetch_status(&metrics, authorization).await?;
            #[allow(clippy::print_stdout)]
            {
                print!("{text}");
            }
            Ok(())
        }
        Command::Scheduler(args) => serve_command(args, false).await,
        Command::Serve(args) => serve_command(args, true).await,
        Command::Config => {
            print!("{}", config::DEFAULT_TOML);
            Ok(())
        }
        Command::Cas { remote, command } => {
            let connection = kiln_tools::client::connect(&remote.connect.options()).await?;
            let cas = Cas::new(connection, &remote.instance, remote.digest_function);
            match command {
                CasCommand::Put { files } => {
                    for file in files {
                        let (digest, uploaded) = cas.put_file(&file).await?;
                        let note = if uploaded { "uploaded" } else { "already present" };
                        println!("{digest}\t{}\t{note}", file.display());
                    }
                }
                CasCommand::Get { digest, out } => {
                    let digest = parse_digest(&digest)?;
                    cas.get_to_file(&digest, &out).await?;
                }
                CasCommand::Missing { digests } => {
                    let digests = digests.iter().map(|d| parse_digest(d)).collect::<Result<Vec<_>>>()?;
                    for d in cas.missing(&digests).await? {
                        println!("{d}");
                    }
                }
            }
            Ok(())
        }
        Command::Bench { command } => bench(command).await,
        Command::NullServer { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("kiln: serving on {}", listener.local_addr()?);
            kiln_tools::bench::null_server::serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            Ok(())
        }
        Command::Token { remote, token_file, command } => match token_file {
            Some(path) => token_file::run(&path, command),
            None => {
                let c = kiln_tools::client::connect(&remote.options()).await?;
                match command {
                    TokenCommand::Create { principal, tenant, permissions, expires } => {
                        let ttl = token::parse_duration(&expires)?;
                        print_created(&token::create(&c, &principal, &tenant, &permissions, ttl).await?);
                    }
                    TokenCommand::List => {
                        for t in token::list(&c).await? {
                            println!("{}", token::describe(&t));
                        }
                    }
                    TokenCommand::Rotate { id } => print_created(&token::rotate(&c, &id).await?),
                    TokenCommand::Revoke { id } => {
                        println!("{}", token::describe(&token::revoke(&c, &id).await?))
                    }
                }
                Ok(())
            }
        },
    }
}

async fn bench(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Run {
            remote,
            workload,
            instance,
            requests,
            total_bytes,
            blob_size,
            concurrency,
            connections,
            digests,
            cold,
            json,
        } => {
            let options = kiln_tools::bench::BenchOptions {
                workload,
                instance,
                requests,
                total_bytes,
                blob_size_bytes: blob_size,
                concurrency,
                connections,
                digests_per_call: digests,
                cold,
            };
            let report = kiln_tools::bench::run(&remote.options(), &options).await?;
            println!("{}", if json { report.to_json().to_string() } else { report.to_text() });
            Ok(())
        }
        BenchCommand::Suite { quick, floors, peer, peer_instance, json_out } => {
            let options = kiln_tools::bench::suite::SuiteOptions {
                kiln: std::env::current_exe().context("locate the kiln binary")?,
                quick,
                floors,
                peer,
                peer_instance,
            };
            let result = kiln_tools::bench::suite::run_suite(&options).await?;
            if let Some(path) = json_out {
                std::fs::write(&path, serde_json::to_string_pretty(&result.to_json())?)
                    .with_context(|| format!("write {}", path.display()))?;
            }
            kiln_tools::bench::suite::check(&result)
        }
        BenchCommand::Scheduler { actions, workers, slots, in_flight, json_out } => {
            write_json(json_out, &exec_bench::scheduler(actions, workers, slots, in_flight).await?)
        }
        BenchCommand::Sandbox { runs, json_out } => {
            let value = tokio::task::spawn_blocking(move || exec_bench::sandbox(runs)).await??;
            write_json(json_out, &value)
        }
        BenchCommand::Inputs { files, json_out } => write_json(json_out, &exec_bench::inputs(files).await?),
        BenchCommand::Io { path, bytes, reads, json_out } => {
            let options = io_bench::IoBenchOptions { paths: path, bytes, reads };
            let value = tokio::task::spawn_blocking(move || io_bench::run(&options)).await??;
            write_json(json_out, &value)
        }
        BenchCommand::Store { blobs, blob_size, dir, io, concurrency, lookups, json_out } => {
            let options = store_bench::StoreBenchOptions {
                blobs,
                blob_size,
                dir: dir.clone(),
                io,
                concurrency,
                lookups,
            };
            let result = store_bench::run(&options).await;
            store_bench::clean(&dir);
            let result = result?;
            if let Some(path) = json_out {
                std::fs::write(&path, serde_json::to_string_pretty(&result)?)
                    .with_context(|| format!("write {}", path.display()))?;
            }
            Ok(())
        }
    }
}

/// The secret goes to standard output alone, the description to standard
/// error, so `TOKEN=$(kiln token create ...)` captures just the token.
pub(crate) fn print_created(created: &kiln_proto::kiln::admin::CreateTokenResponse) {
    println!("{}", created.token);
    if let Some(info) = &created.info {
        let line = token::describe(info);
        // Standard error is the right stream for this note; see above.
        #[allow(clippy::print_stderr)]
        {
            eprintln!("created {line}\nstore the token now: Kiln keeps only its hash");
        }
    }
}
