//! Criterion benches for the storage node's hot paths: hashing and
//! verification, resource-name parsing, and the memory store.
//!
//! Run: `cargo bench --bench hot_paths`. Figures go to docs/BENCHMARKS.md as
//! ratios against the single-core hashing baselines measured in the same run.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::executor::block_on;
use kiln_proto::DigestFunction;
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
            (CasKey::shared(DigestFunction::Sha256.compute(&data)), data)
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
    use kiln_proto::access::{AuthMethod, Authorizer, Caller, Permission, Permissions, Principal};

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
        b.iter(|| authorizer.require(&cert, "t19.dev.alice", Permission::AcWrite).unwrap());
    });
    group.bench_function("authenticate_and_check", |b| {
        b.iter(|| {
            let principal = store.authenticate(&token).unwrap();
            authorizer.require(&Caller { principal, peer: None }, "main.dev", Permission::CasRead).unwrap();
        });
    });
    group.finish();
}

criterion_group!(benches, hashing, resource_names, memory_store, auth);
criterion_main!(benches);
