//! `kiln`: remote cache and remote build execution for Bazel and Buck2.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_proto::{Digest, DigestFunction};
use kiln_tools::cas::Cas;

mod config;
mod serve;

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Remote cache and remote build execution for Bazel and Buck2")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cache (CAS, AC, ByteStream, Capabilities) in one process.
    Serve(ServeArgs),
    /// Print the default configuration file.
    Config,
    /// Move blobs in and out of a CAS.
    Cas {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: CasCommand,
    },
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
}

#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// REAPI endpoint.
    #[arg(long, global = true, env = "KILN_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    remote: String,
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => {
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
            serve::run(config).await
        }
        Command::Config => {
            print!("{}", config::DEFAULT_TOML);
            Ok(())
        }
        Command::Cas { remote, command } => {
            let channel = kiln_tools::client::connect(&remote.remote).await?;
            let cas = Cas::new(channel, &remote.instance, remote.digest_function);
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
    }
}
