//! Criterion benches for the storage node's hot paths: hashing and
//! verification, resource-name parsing, and the memory store.
//!
//! Run: `cargo bench --bench hot_paths`. Figures go to docs/BENCHMARKS.md as
//! ratios against the single-core hashing baselines measured in the same run.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::executor::block_on;
use kiln_proto::DigestFunction;
use kiln_proto::access::{Permit, rights};
use kiln_proto::resource::{ReadResource, WriteResource};
use kiln_storage::store::{CasKey, CasStore, EmptyBlob, MemoryCas, Verifying, put_all, read_all};

fn hashing(c: &mut Criterion) {
    let mut group = c.benchmark_group("digest");
    for size in [4usize << 10, 1 << 20] {
        let data = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        for f in DigestFunction::ALL {
            group.bench_with_input(BenchmarkId::new(format!("compute/{f}"), size), &data, |b, d| {
                b.iter(|| f.compute(d));
            });
            let digest = f.compute(&data);
            group.bench_with_input(BenchmarkId::new(format!("verify/{f}"), size), &data, |b, d| {
                b.iter(|| digest.verify(d).unwrap());
            });
        }
    }
    group.finish();
}

fn resource_names(c: &mut Criterion) {
    let hash = DigestFunction::Sha256.compute(b"x").hash_hex();
    let read = format!("team/ci/blobs/{hash}/123456");
    let write =
        format!("team/ci/uploads/5b2f0c1e-9a7d-4c55-a1e0-1f0b6a9e8d11/compressed-blobs/zstd/{hash}/123456");
    let mut group = c.benchmark_group("resource_name");
    group.bench_function("parse_read", |b| b.iter(|| ReadResource::parse(&read).unwrap()));
    group.bench_function("parse_write", |b| b.iter(|| WriteResource::parse(&write).unwrap()));
    group.finish();
}

fn memory_store(c: &mut Criterion) {
    let store = EmptyBlob::new(Verifying::new(MemoryCas::new(1 << 30, 1 << 20)));
    let blobs: Vec<(CasKey, Bytes)> = (0..10_000u32)
        .map(|i| {
            let data = Bytes::from(i.to_le_bytes().repeat(256));
            (
                CasKey::of(&Permit::<rights::CasWrite>::internal(""), DigestFunction::Sha256.compute(&data)),
                data,
            )
        })
        .collect();
    for (k, d) in &blobs {
        block_on(put_all(&store, k, d.clone())).unwrap();
    }
    let keys: Vec<CasKey> = blobs.iter().map(|(k, _)| k.clone()).collect();
    let mut group = c.benchmark_group("memory_store");
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("find_missing_10k_present", |b| {
        b.iter(|| assert!(block_on(store.find_missing(&keys)).unwrap().is_empty()));
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("get_1k_blob", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % keys.len();
            block_on(read_all(&store, &keys[i], 1 << 20)).unwrap()
        });
    });
    group.throughput(Throughput::Bytes(1024));
    group.bench_function("put_verified_1k_blob", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % blobs.len();
            block_on(put_all(&store, &blobs[i].0, blobs[i].1.clone())).unwrap();
        });
    });
    group.finish();
}

fn auth(c: &mut Criterion) {
    use kiln_auth::policy::{Rule, RulePolicy};
    use kiln_auth::tokens::TokenStore;
    use kiln_proto::access::{AuthMethod, Authorizer, Caller, Permissions, Principal};

    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::open(&dir.path().join("tokens.json")).unwrap();
    let perms = Permissions::parse(["read", "write"]).unwrap();
    // A realistic store: many tokens, one presented.
    for i in 0..1000 {
        store.create(&format!("user-{i}"), "main", perms, 0).unwrap();
    }
    let (token, _) = store.create("ci", "main.dev", perms, 0).unwrap();
    let rules: Vec<Rule> = (0..20)
        .map(|i| Rule {
            principal: format!("team-{i}-*"),
            tenant: format!("t{i}.*"),
            permissions: vec!["read".into(), "write".into()],
        })
        .collect();
    let authorizer = Authorizer::new(RulePolicy::new(&rules).unwrap(), 100);
    // A certificate principal matched by the last rule, on a subtenant
    // three levels down: every rule is tried against every ancestor.
    let cert =
        Caller { principal: Principal::new("team-19-ci", AuthMethod::ClientCertificate, None), peer: None };
    let mut group = c.benchmark_group("auth");
    group.bench_function("token_authenticate", |b| b.iter(|| store.authenticate(&token).unwrap()));
    group.bench_function("policy_check_20_rules", |b| {
        b.iter(|| authorizer.permit_for::<rights::AcWrite>(&cert, "t19.dev.alice").unwrap());
    });
    group.bench_function("authenticate_and_check", |b| {
        b.iter(|| {
            let principal = store.authenticate(&token).unwrap();
            authorizer.permit_for::<rights::CasRead>(&Caller { principal, peer: None }, "main.dev").unwrap();
        });
    });
    group.finish();
}

/// A service that reads the request and answers with one small message
/// and an OK status in the trailers, like a unary gRPC handler.
#[derive(Clone)]
struct Unary;

impl tower::Service<http::Request<tonic::body::Body>> for Unary {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        use http_body_util::BodyExt;
        Box::pin(async move {
            let _ = request.into_body().collect().await;
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = vec![
                Ok::<_, tonic::Status>(http_body::Frame::data(bytes::Bytes::from_static(&[0; 64]))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            Ok(http::Response::new(tonic::body::Body::new(body)))
        })
    }
}

/// What the metrics layer adds to one call: request and response bodies
/// read through it, counted, timed and labelled (`off`: the layer passes
/// calls through, as with `[metrics] enabled = false`).
fn grpc_metrics_layer(c: &mut Criterion) {
    use http_body_util::BodyExt;
    use tower::{Layer, Service};
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut group = c.benchmark_group("grpc_metrics_layer");
    for (name, enabled) in [("off", false), ("on", true)] {
        let mut service = kiln_proto::grpc_metrics::GrpcMetricsLayer::new(enabled).layer(Unary);
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let body = http_body_util::Full::new(bytes::Bytes::from_static(&[1; 64]));
                    let request = http::Request::builder()
                        .uri("/build.bazel.remote.execution.v2.ActionCache/GetActionResult")
                        .body(tonic::body::Body::new(body.map_err(|e| match e {})))
                        .unwrap();
                    let response = service.call(request).await.unwrap();
                    response.into_body().collect().await.unwrap()
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, hashing, resource_names, memory_store, auth, grpc_metrics_layer);
criterion_main!(benches);
