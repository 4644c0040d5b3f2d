//! `kiln serve`: the composition root. Builds the store tree from the
//! configuration, wires the services and runs the gRPC server until SIGINT
//! or SIGTERM.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_proto::asset::fetch_server::FetchServer;
use kiln_proto::asset::push_server::PushServer;
use kiln_proto::google::bytestream::byte_stream_server::ByteStreamServer;
use kiln_proto::limits::Limits;
use kiln_proto::reapi::action_cache_server::ActionCacheServer;
use kiln_proto::reapi::capabilities_server::CapabilitiesServer;
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use kiln_storage::service::{
    ActionCacheService, AssetService, ByteStreamService, CapabilitiesService, CasService, ResponseBudgetLayer,
};
use kiln_storage::store::completeness_checking::CheckLimits;
use kiln_storage::store::{AcStore, CasStore, CompletenessChecking, EmptyBlob, Verifying};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::execution::StoreBackend;
use crate::storage::Stores;
use kiln_auth::AuthLayer;
use kiln_auth::admin::TokenAdmin;
use kiln_auth::listener::{ListenerOptions, incoming};
use kiln_proto::google::longrunning::operations_server::OperationsServer;
use kiln_proto::grpc_metrics::GrpcMetricsLayer;
use kiln_proto::kiln::admin::tokens_server::TokensServer;
use kiln_proto::kiln::worker::workers_server::WorkersServer;
use kiln_proto::reapi::execution_server::ExecutionServer;
use kiln_scheduler::Scheduler;
use kiln_scheduler::service::ExecutionService;
use kiln_scheduler::workers::WorkerService;

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
    stores: Arc<Stores>,
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
    kiln_proto::metrics::set_tenants(crate::telemetry::label_tenants(&config.metrics, &config.auth.rules));
    let context = ServeContext { config, limits, auth, connections_max, stores: stores.clone() };
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
    let ServeContext { config, limits, auth, connections_max, stores } = context;
    let authorizer = auth.authorizer.clone();
    let cas = Arc::new(EmptyBlob::new(Verifying::new(cas)));
    let check = CheckLimits {
        referenced_blobs_max: limits.referenced_blobs_max,
        tree_fetches_max: limits.output_tree_fetches_max,
        tree_size_bytes_max: limits.output_tree_size_bytes_max,
    };
    // Remote Asset records live in the action-cache store's asset space,
    // beside (not behind) the completeness check of action results.
    let records = Arc::new(ac);
    let ac = Arc::new(CompletenessChecking::new(records.clone(), cas.clone(), check));

    let scheduler = config.execution.enabled.then(|| {
        let backend = StoreBackend {
            cas: cas.clone(),
            ac: ac.clone(),
            result_size_max: limits.action_result_size_bytes_max,
        };
        Scheduler::new(backend, config.execution.scheduler_config())
    });
    let message_max = limits.grpc_message_size_bytes_max;
    let mut capabilities_service = CapabilitiesService::new(limits, authorizer.clone());
    if scheduler.is_some() {
        capabilities_service = capabilities_service.with_execution(kiln_scheduler::execution_capabilities());
    }
    let capabilities = CapabilitiesServer::new(capabilities_service)
        .max_decoding_message_size(message_max)
        .max_encoding_message_size(message_max);
    let execution_services = scheduler.as_ref().map(|s| {
        let service = ExecutionService::new(s.clone(), authorizer.clone());
        (
            ExecutionServer::new(service.clone())
                .max_decoding_message_size(message_max)
                .max_encoding_message_size(message_max),
            OperationsServer::new(service),
        )
    });
    let (execution_server, operations_server) = match execution_services {
        Some((e, o)) => (Some(e), Some(o)),
        None => (None, None),
    };
    let walks = kiln_storage::service::WalkTurns::new(&limits);
    let (cas_service, bytestream) = blob_services(&cas, limits, &authorizer, &walks);
    let ac_service =
        ActionCacheServer::new(ActionCacheService::new(ac, cas.clone(), limits, authorizer.clone()))
            .max_decoding_message_size(message_max)
            .max_encoding_message_size(message_max);

    let origin =
        kiln_storage::service::origin::Origin::new(&config.assets, &config.data_dir.join("downloads"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    if origin.is_some() {
        tracing::info!(allow = ?config.assets.fetch_allow, "the Remote Asset API fetches from origin");
    }
    let assets = AssetService::new(records, cas.clone(), limits, authorizer.clone())
        .with_origin(origin)
        .with_walk_turns(walks);
    let fetch = FetchServer::new(assets.clone())
        .max_decoding_message_size(message_max)
        .max_encoding_message_size(message_max);
    let push =
        PushServer::new(assets).max_decoding_message_size(message_max).max_encoding_message_size(message_max);
    let token_admin =
        auth.tokens.clone().map(|store| TokensServer::new(TokenAdmin::new(store, authorizer.clone())));

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CapabilitiesServer<CapabilitiesService>>().await;
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let _store_health = ServingTask(Some(tokio::spawn(watch_store_health(stores.clone(), health_reporter))));

    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && !config.auth.authenticates() {
        tracing::warn!(%addr, "serving without authentication on a non-loopback address (--insecure-no-auth)");
    }
    let tls = if auth.tls.is_some() { "tls" } else { "plaintext" };
    tracing::info!(%addr, tls, data_dir = %config.data_dir.display(), "kiln serving REAPI");
    let workers = match &scheduler {
        Some(scheduler) => Some(
            start_execution(&config, &limits, &auth, connections_max, scheduler.clone(), cas.clone()).await?,
        ),
        None => None,
    };
    // Tests and scripts read the bound address (useful with port 0) from
    // this line, the first; it comes once the local worker is ready.
    println!("kiln: serving on {addr}");
    if let Some(w) = &workers {
        println!("kiln: workers connect on {}", w.worker_addr);
    }
    let _telemetry = ServingTask(
        crate::telemetry::start(
            &config.metrics,
            telemetry_sources(
                &config,
                addr,
                &auth,
                &stores,
                scheduler.clone(),
                workers.as_ref().and_then(|w| w.worker.clone()),
                cas.clone(),
            ),
        )
        .await?,
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = kiln_proto::transport::server(&limits)
        .layer(GrpcMetricsLayer::new(config.metrics.enabled))
        .layer(AuthLayer::new(auth.authenticator.clone()))
        .layer(ResponseBudgetLayer::new(&limits))
        .add_service(health)
        .add_service(capabilities)
        .add_service(cas_service)
        .add_service(ac_service)
        .add_service(bytestream)
        .add_service(fetch)
        .add_service(push)
        .add_optional_service(execution_server)
        .add_optional_service(operations_server)
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

/// Aborts the worker port and the local worker's socket server when
/// `kiln serve` ends (the local worker's process then ends too).
struct ExecutionTasks {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The local worker's supervisor, when it started.
    worker: Option<Arc<crate::local_worker::LocalWorker>>,
    /// Where the worker port listens.
    worker_addr: std::net::SocketAddr,
}

impl Drop for ExecutionTasks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Aborts a background task when dropped.
/// Reports NOT_SERVING on the health service (overall and for the storage
/// services) while a store cannot sync, logging why once per change; and
/// SERVING again when it can.
async fn watch_store_health(stores: Arc<Stores>, reporter: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    let services = [
        "",
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        "build.bazel.remote.execution.v2.ActionCache",
        "google.bytestream.ByteStream",
    ];
    let mut was: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = stores.unhealthy();
        if now.is_some() == was.is_some() {
            continue;
        }
        let status = match &now {
            Some(why) => {
                tracing::error!(why, "reporting NOT_SERVING: a store cannot make writes durable");
                ServingStatus::NotServing
            }
            None => {
                tracing::info!("the stores sync again; reporting SERVING");
                ServingStatus::Serving
            }
        };
        for service in services {
            reporter.set_service_status(service, status).await;
        }
        was = now;
    }
}

pub struct ServingTask(pub Option<tokio::task::JoinHandle<()>>);

impl Drop for ServingTask {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

/// What the metrics listener reports on: a configuration summary without
/// secrets, the stores, the scheduler, failed actions' logs.
fn telemetry_sources<B, C>(
    config: &Config,
    addr: std::net::SocketAddr,
    auth: &kiln_auth::config::AuthSetup,
    stores: &Arc<Stores>,
    scheduler: Option<Scheduler<B>>,
    local_worker: Option<Arc<crate::local_worker::LocalWorker>>,
    cas: C,
) -> crate::telemetry::Sources
where
    B: kiln_scheduler::Backend,
    C: CasStore + Clone,
{
    let a = &config.auth;
    let mut methods = Vec::new();
    if a.client_ca.is_some() {
        methods.push("client certificates");
    }
    if a.tokens {
        methods.push("bearer tokens");
    }
    if a.htpasswd.is_some() {
        methods.push("basic auth (htpasswd)");
    }
    let execution = if !config.execution.enabled {
        "off".to_owned()
    } else if config.execution.local_worker {
        format!("on, local worker with {} slots", config.execution.local_slots())
    } else {
        "on, remote workers only".to_owned()
    };
    let summary = vec![
        ("listen".to_owned(), format!("{addr} ({})", if a.tls_cert.is_some() { "TLS" } else { "plaintext" })),
        ("data directory".to_owned(), config.data_dir.display().to_string()),
        ("storage".to_owned(), stores.describe()),
        (
            "authentication".to_owned(),
            if methods.is_empty() { "none (loopback only)".to_owned() } else { methods.join(", ") },
        ),
        ("permission rules".to_owned(), a.rules.len().to_string()),
        ("remote execution".to_owned(), execution),
        (
            "trace export".to_owned(),
            if config.log.otlp_endpoint.is_empty() {
                "off".to_owned()
            } else {
                format!(
                    "OTLP to {} ({:.0}% of traces)",
                    config.log.otlp_endpoint,
                    config.log.otlp_sample_ratio * 100.0
                )
            },
        ),
    ];
    let fetch_log: crate::telemetry::FetchLog =
        Arc::new(move |instance: String, digest: kiln_proto::Digest| {
            let cas = cas.clone();
            Box::pin(async move {
                // The listener let only an admin ask.
                let permit =
                    kiln_proto::access::Permit::<kiln_proto::access::rights::CasRead>::internal(&instance);
                let key = kiln_storage::store::CasKey::of(&permit, digest);
                kiln_storage::store::read_all(&cas, &key, kiln_proto::limits::STATUS_LOG_BYTES_MAX).await
            })
        });
    crate::telemetry::Sources {
        started: std::time::Instant::now(),
        summary,
        stores: Some(Arc::new(crate::telemetry::StoreCollector::new(stores.clone()))),
        scheduler: scheduler.map(|s| Arc::new(move || s.snapshot()) as crate::telemetry::SchedulerView),
        fetch_log: Some(fetch_log),
        worker: None,
        local_worker,
        auth: a.authenticates().then(|| (auth.authenticator.clone(), auth.authorizer.clone())),
        history: Arc::default(),
    }
}

/// Serves the worker port and starts the local worker.
async fn start_execution<B, C>(
    config: &Config,
    limits: &Limits,
    auth: &kiln_auth::config::AuthSetup,
    connections_max: usize,
    scheduler: Scheduler<B>,
    cas: C,
) -> Result<ExecutionTasks>
where
    B: kiln_scheduler::Backend,
    C: CasStore + Clone,
{
    let execution = &config.execution;
    let listener = TcpListener::bind(execution.worker_listen)
        .await
        .with_context(|| format!("listen for workers on {}", execution.worker_listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "worker port");
    let workers = WorkersServer::new(WorkerService::new(scheduler.clone(), auth.authorizer.clone()));
    let router = kiln_proto::transport::server(limits)
        .layer(GrpcMetricsLayer::new(config.metrics.enabled))
        .layer(AuthLayer::new(auth.authenticator.clone()))
        .add_service(workers);
    let tls = auth.tls.clone().map(|tls| (tls, auth.principal_from));
    let connections = incoming(listener, ListenerOptions::new(limits, connections_max, tls));
    let mut tasks = vec![tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(connections).await {
            tracing::error!(error = %e, "worker port failed");
        }
    })];
    let mut worker = None;
    if execution.local_worker {
        let (to_server, sockets) = tokio::sync::mpsc::channel(1);
        tasks.push(tokio::spawn(serve_local_worker(
            *limits,
            auth.authorizer.clone(),
            scheduler.clone(),
            cas,
            sockets,
        )));
        let slots = execution.local_slots();
        let id = crate::local_worker::local_id();
        tracing::info!(slots, "local worker starting");
        match crate::local_worker::LocalWorker::start(config, id, slots, to_server) {
            Ok(local) => {
                local.ready(|| scheduler.stats().workers > 0).await;
                worker = Some(local);
            }
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "the local worker cannot start; remote execution needs workers from elsewhere"
            ),
        }
    }
    Ok(ExecutionTasks { tasks, worker, worker_addr: addr })
}

/// Serves the local worker's end of each socket pair: the worker
/// protocol, Capabilities, CAS and ByteStream, as the unrestricted principal (see
/// `local_worker`: holding the socket is the credential).
async fn serve_local_worker<B, C>(
    limits: Limits,
    authorizer: kiln_proto::access::Authorizer,
    scheduler: Scheduler<B>,
    cas: C,
    sockets: tokio::sync::mpsc::Receiver<std::os::unix::net::UnixStream>,
) where
    B: kiln_scheduler::Backend,
    C: CasStore + Clone,
{
    use futures::StreamExt;
    let workers = WorkersServer::new(WorkerService::new(scheduler, authorizer.clone()));
    let walks = kiln_storage::service::WalkTurns::new(&limits);
    let (cas_service, bytestream) = blob_services(&cas, limits, &authorizer, &walks);
    let capabilities = CapabilitiesServer::new(CapabilitiesService::new(limits, authorizer.clone()));
    let router = kiln_proto::transport::server(&limits)
        .layer(AuthLayer::new(kiln_auth::Authenticator::unrestricted()))
        .add_service(capabilities)
        .add_service(workers)
        .add_service(cas_service)
        .add_service(bytestream);
    let connections = tokio_stream::wrappers::ReceiverStream::new(sockets).map(|socket| {
        socket.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(socket)
    });
    if let Err(e) = router.serve_with_incoming(connections).await {
        tracing::error!(error = %e, "the local worker's socket server failed");
    }
}

/// The CAS and ByteStream services over `cas`, with the message sizes
/// the limits allow and GetTree's turns from `walks`: for clients, and for
/// the local worker's socket.
fn blob_services<C: CasStore + Clone>(
    cas: &C,
    limits: Limits,
    authorizer: &kiln_proto::access::Authorizer,
    walks: &kiln_storage::service::WalkTurns,
) -> (ContentAddressableStorageServer<CasService<C>>, ByteStreamServer<ByteStreamService<C>>) {
    let message_max = limits.grpc_message_size_bytes_max;
    let service = CasService::new(cas.clone(), limits, authorizer.clone()).with_walk_turns(walks.clone());
    let cas_service = ContentAddressableStorageServer::new(service)
        .max_decoding_message_size(message_max)
        .max_encoding_message_size(message_max);
    let bytestream = ByteStreamServer::new(ByteStreamService::new(cas.clone(), limits, authorizer.clone()))
        .max_decoding_message_size(message_max)
        .max_encoding_message_size(message_max);
    (cas_service, bytestream)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}
