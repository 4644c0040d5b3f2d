//! `kiln serve`: the composition root. Builds the store tree from the
//! configuration, wires the services and runs the gRPC server until SIGINT
//! or SIGTERM.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_proto::google::bytestream::byte_stream_server::ByteStreamServer;
use kiln_proto::limits::Limits;
use kiln_proto::reapi::action_cache_server::ActionCacheServer;
use kiln_proto::reapi::capabilities_server::CapabilitiesServer;
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use kiln_storage::service::{
    ActionCacheService, ByteStreamService, CapabilitiesService, CasService, ResponseBudgetLayer,
};
use kiln_storage::store::completeness_checking::CheckLimits;
use kiln_storage::store::{AcStore, CasStore, CompletenessChecking, EmptyBlob, Verifying};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::storage::Stores;
use kiln_auth::AuthLayer;
use kiln_auth::admin::TokenAdmin;
use kiln_auth::listener::{ListenerOptions, incoming};
use kiln_proto::kiln::admin::tokens_server::TokensServer;

/// Holds the data directory's lock for the life of the server.
struct DataDirLock {
    _file: File,
}

fn lock_data_dir(config: &Config) -> Result<DataDirLock> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("create data directory {}", dir.display()))?;
    let path = dir.join("kiln.lock");
    let file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "data directory {} is in use by another kiln process ({} is locked)",
            dir.display(),
            path.display()
        )
    })?;
    Ok(DataDirLock { _file: file })
}

/// Raises the soft file-descriptor limit to the hard one and returns it:
/// connections are bounded below it (see `connections_max`).
fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "could not raise the file-descriptor limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the file-descriptor limit");
            1024
        }
    }
}

/// What the services need besides the stores.
struct ServeContext {
    config: Config,
    limits: Limits,
    auth: kiln_auth::config::AuthSetup,
    connections_max: usize,
}

pub async fn run(config: Config) -> Result<()> {
    config.validate()?;
    let _lock = lock_data_dir(&config)?;
    let mut limits = config.limits;
    let descriptors = raise_descriptor_limit();
    let connections_max = limits.connections_for(descriptors).map_err(|e| anyhow::anyhow!("[limits] {e}"))?;
    tracing::info!(descriptors, connections_max, "connection capacity");
    let auth =
        config.auth.build(&config.data_dir, &limits).map_err(|e| anyhow::anyhow!("{}", e.message()))?;

    let storage = config.storage.clone();
    let data_dir = config.data_dir.clone();
    let (blob_max, result_max) = (limits.blob_size_bytes_max, limits.action_result_size_bytes_max as u64);
    let stores = tokio::task::spawn_blocking(move || Stores::open(&storage, &data_dir, blob_max, result_max))
        .await
        .context("open the stores")??;
    if stores.blob_size_bytes_max() < limits.blob_size_bytes_max {
        tracing::warn!(
            configured = limits.blob_size_bytes_max,
            fits = stores.blob_size_bytes_max(),
            "blob_size_bytes_max lowered to what the CAS can hold; raise [storage] cas_size_bytes for larger blobs"
        );
        limits.blob_size_bytes_max = stores.blob_size_bytes_max();
    }
    tracing::info!(
        stores = stores.describe(),
        max_cas_blob_size_bytes = limits.blob_size_bytes_max,
        "storage"
    );
    let stores = Arc::new(stores);
    let context = ServeContext { config, limits, auth, connections_max };
    let result = match &*stores {
        Stores::Memory { cas, ac } => serve_stores(context, cas.clone(), ac.clone()).await,
        Stores::Block { cas, ac } => serve_stores(context, cas.clone(), ac.clone()).await,
    };
    let closing = stores.clone();
    tokio::task::spawn_blocking(move || closing.close()).await.context("close the stores")?;
    tracing::info!("kiln stopped");
    result
}

/// Serves the services over `cas` and `ac` until SIGINT or SIGTERM.
async fn serve_stores<C, A>(context: ServeContext, cas: C, ac: A) -> Result<()>
where
    C: CasStore + Clone,
    A: AcStore,
{
    let ServeContext { config, limits, auth, connections_max } = context;
    let authorizer = auth.authorizer.clone();
    let cas = Arc::new(EmptyBlob::new(Verifying::new(cas)));
    let check = CheckLimits {
        referenced_blobs_max: limits.referenced_blobs_max,
        tree_fetches_max: limits.output_tree_fetches_max,
        tree_size_bytes_max: limits.output_tree_size_bytes_max,
    };
    let ac = Arc::new(CompletenessChecking::new(ac, cas.clone(), check));

    let message_max = limits.grpc_message_size_bytes_max;
    let capabilities = CapabilitiesServer::new(CapabilitiesService::new(limits, authorizer.clone()))
        .max_decoding_message_size(message_max)
        .max_encoding_message_size(message_max);
    let cas_service =
        ContentAddressableStorageServer::new(CasService::new(cas.clone(), limits, authorizer.clone()))
            .max_decoding_message_size(message_max)
            .max_encoding_message_size(message_max);
    let ac_service =
        ActionCacheServer::new(ActionCacheService::new(ac, cas.clone(), limits, authorizer.clone()))
            .max_decoding_message_size(message_max)
            .max_encoding_message_size(message_max);
    let bytestream = ByteStreamServer::new(ByteStreamService::new(cas, limits, authorizer.clone()))
        .max_decoding_message_size(message_max)
        .max_encoding_message_size(message_max);

    let token_admin =
        auth.tokens.clone().map(|store| TokensServer::new(TokenAdmin::new(store, authorizer.clone())));

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CapabilitiesServer<CapabilitiesService>>().await;
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;

    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && !config.auth.authenticates() {
        tracing::warn!(%addr, "serving without authentication on a non-loopback address (--insecure-no-auth)");
    }
    let tls = if auth.tls.is_some() { "tls" } else { "plaintext" };
    tracing::info!(%addr, tls, data_dir = %config.data_dir.display(), "kiln serving REAPI");
    // Tests and scripts read the bound address (useful with port 0) from this line.
    println!("kiln: serving on {addr}");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = kiln_proto::transport::server(&limits)
        .layer(AuthLayer::new(auth.authenticator.clone()))
        .layer(ResponseBudgetLayer::new(&limits))
        .add_service(health)
        .add_service(capabilities)
        .add_service(cas_service)
        .add_service(ac_service)
        .add_service(bytestream)
        .add_optional_service(token_admin);
    let stop = async {
        let _ = stop_rx.await;
    };
    let tls = auth.tls.clone().map(|tls| (tls, auth.principal_from));
    let connections = incoming(listener, ListenerOptions::new(&limits, connections_max, tls));
    let server = router.serve_with_incoming_shutdown(connections, stop);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result.context("gRPC server")?,
        () = shutdown_signal() => {
            let _ = stop_tx.send(());
            // In-flight requests get a grace period; idle client connections
            // (Bazel keeps them open) must not hold the process hostage.
            let grace = Duration::from_millis(config.shutdown_grace_ms);
            match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result.context("gRPC server")?,
                Err(_) => tracing::warn!(?grace, "connections still open after the grace period; exiting"),
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}
