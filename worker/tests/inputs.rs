//! Materializing input roots: real trees, real links, a verifying CAS.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use common::{TestCas, WAIT, dir, directory, eventually, file, symlink};
use kiln_proto::reapi::{Command, Directory};
use kiln_proto::{Code, Digest, DigestFunction};
use kiln_worker::cache::FileCache;
use kiln_worker::inputs::{
    InputLimits, MaterializeError, materialize, materialize_with_limits, prepare_outputs,
};

struct Setup {
    work: tempfile::TempDir,
    cache: FileCache,
    cas: TestCas,
}

fn setup() -> Setup {
    let work = tempfile::tempdir().unwrap();
    let cache = FileCache::open(&work.path().join("cache"), 1 << 30).unwrap();
    Setup { work, cache, cas: TestCas::new() }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn ino(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().ino()
}

#[tokio::test]
async fn materializes_a_nested_tree_with_executables_and_symlinks() {
    for function in [DigestFunction::Sha256, DigestFunction::Blake3] {
        let s = setup();
        let a = s.cas.put_with(function, b"alpha\n");
        let b = s.cas.put_with(function, b"beta\n");
        let tool = s.cas.put_with(function, b"#!/bin/sh\nexit 0\n");
        let empty = function.empty();
        let deep = s.cas.put_directory(function, &directory(vec![file("a.txt", &a, false)], vec![], vec![]));
        let sub = s.cas.put_directory(
            function,
            &directory(
                vec![file("b.txt", &b, false)],
                vec![dir("deep", &deep)],
                vec![symlink("up", "../a.txt")],
            ),
        );
        let root = s.cas.put_directory(
            function,
            &directory(
                vec![file("a.txt", &a, false), file("empty", &empty, false), file("run.sh", &tool, true)],
                vec![dir("sub", &sub)],
                vec![symlink("link", "sub/b.txt")],
            ),
        );
        let exec_root = s.work.path().join("exec1");
        let stats =
            materialize(&s.cache, &s.cas, function, &root, &exec_root, Some((1234, 5678))).await.unwrap();
        assert_eq!((stats.files, stats.directories, stats.symlinks, stats.bytes), (5, 2, 2, 6 + 5 + 17 + 6));
        assert_eq!((stats.cache_hits, stats.cache_misses), (0, 4));

        let read = |p: &str| std::fs::read(exec_root.join(p)).unwrap();
        assert_eq!(read("a.txt"), b"alpha\n");
        assert_eq!(read("sub/b.txt"), b"beta\n");
        assert_eq!(read("sub/deep/a.txt"), b"alpha\n");
        assert_eq!(read("empty"), b"");
        assert_eq!(read("link"), b"beta\n");
        assert_eq!(read("sub/up"), b"alpha\n");
        assert_eq!(std::fs::read_link(exec_root.join("sub/up")).unwrap(), Path::new("../a.txt"));
        assert_eq!(mode(&exec_root.join("a.txt")), 0o444);
        assert_eq!(mode(&exec_root.join("run.sh")), 0o555);
        for d in ["", "sub", "sub/deep"] {
            let meta = std::fs::metadata(exec_root.join(d)).unwrap();
            assert_eq!((meta.mode() & 0o7777, meta.uid(), meta.gid()), (0o755, 1234, 5678), "{d:?}");
        }
        // Files stay the cache's: root-owned, one inode per (blob, mode).
        assert_eq!(std::fs::metadata(exec_root.join("a.txt")).unwrap().uid(), 0);
        assert_eq!(ino(&exec_root.join("a.txt")), ino(&exec_root.join("sub/deep/a.txt")));
        assert_eq!(ino(&exec_root.join("a.txt")), ino(&s.cache.entry_path(&a, false)));
        assert_eq!(s.cas.total_reads(), 3, "the empty blob is never fetched");

        // A second exec root is all cache hits.
        let again =
            materialize(&s.cache, &s.cas, function, &root, &s.work.path().join("exec2"), None).await.unwrap();
        assert_eq!((again.cache_hits, again.cache_misses), (4, 0));
        assert_eq!(s.cas.total_reads(), 3);
        assert_eq!(ino(&s.work.path().join("exec2/run.sh")), ino(&exec_root.join("run.sh")));
    }
}

#[tokio::test]
async fn one_blob_linked_many_times_shares_the_cache_inode() {
    let s = setup();
    let blob = s.cas.put(b"same everywhere");
    let files: Vec<_> = (0..50).map(|i| file(&format!("f{i:02}"), &blob, false)).collect();
    let root = s.cas.put_directory(DigestFunction::Sha256, &directory(files, vec![], vec![]));
    let exec_root = s.work.path().join("exec");
    let stats = materialize(&s.cache, &s.cas, DigestFunction::Sha256, &root, &exec_root, None).await.unwrap();
    assert_eq!((stats.files, stats.cache_misses), (50, 1));
    let entry = std::fs::metadata(s.cache.entry_path(&blob, false)).unwrap();
    assert_eq!(entry.nlink(), 51);
    for i in 0..50 {
        assert_eq!(ino(&exec_root.join(format!("f{i:02}"))), entry.ino());
    }
    assert_eq!(s.cas.reads_of(&blob), 1);
}

#[tokio::test]
async fn invalid_trees_are_refused() {
    let s = setup();
    let f = s.cas.put(b"x");
    let g = s.cas.put(b"y");
    let empty_dir = s.cas.put_directory(DigestFunction::Sha256, &Directory::default());
    let one_level =
        s.cas.put_directory(DigestFunction::Sha256, &directory(vec![], vec![dir("e", &empty_dir)], vec![]));
    let two_levels =
        s.cas.put_directory(DigestFunction::Sha256, &directory(vec![], vec![dir("d", &one_level)], vec![]));
    let mut no_digest = file("nodigest", &f, false);
    no_digest.digest = None;
    let cases: Vec<(&str, Directory)> = vec![
        ("out of order", directory(vec![file("b", &f, false), file("a", &g, false)], vec![], vec![])),
        ("twice", directory(vec![file("a", &f, false), file("a", &g, false)], vec![], vec![])),
        ("file and directory", directory(vec![file("a", &f, false)], vec![dir("a", &empty_dir)], vec![])),
        ("file and symlink", directory(vec![file("a", &f, false)], vec![], vec![symlink("a", "b")])),
        ("slash", directory(vec![file("a/b", &f, false)], vec![], vec![])),
        ("dot", directory(vec![], vec![dir(".", &empty_dir)], vec![])),
        ("dot dot", directory(vec![], vec![dir("..", &empty_dir)], vec![])),
        ("empty name", directory(vec![file("", &f, false)], vec![], vec![])),
        ("NUL", directory(vec![file("a\0b", &f, false)], vec![], vec![])),
        ("long name", directory(vec![file(&"n".repeat(256), &f, false)], vec![], vec![])),
        ("no digest", directory(vec![no_digest], vec![], vec![])),
        ("absolute symlink", directory(vec![], vec![], vec![symlink("l", "/etc/passwd")])),
        ("escaping symlink", directory(vec![], vec![], vec![symlink("l", "../outside")])),
        ("inner dot dot symlink", directory(vec![], vec![], vec![symlink("l", "a/../../b")])),
        ("empty symlink", directory(vec![], vec![], vec![symlink("l", "")])),
        ("too deep", directory(vec![], vec![dir("d", &two_levels)], vec![])),
        (
            "too many files",
            directory((0..4).map(|i| file(&format!("f{i}"), &f, false)).collect(), vec![], vec![]),
        ),
        (
            "too many bytes",
            directory(
                vec![file("big", &Digest::new(DigestFunction::Sha256, *f.hash(), 1 << 20).unwrap(), false)],
                vec![],
                vec![],
            ),
        ),
    ];
    let limits = InputLimits { depth_max: 2, files_max: 3, total_bytes_max: 1000, ..InputLimits::DEFAULT };
    for (name, tree) in cases {
        let root = s.cas.put_directory(DigestFunction::Sha256, &tree);
        let exec_root = s.work.path().join("exec");
        let error = materialize_with_limits(
            &s.cache,
            &s.cas,
            DigestFunction::Sha256,
            &root,
            &exec_root,
            None,
            &limits,
        )
        .await
        .unwrap_err();
        let MaterializeError::Failed(error) = error else { panic!("{name}: {error:?}") };
        assert_eq!(error.code(), Code::InvalidArgument, "{name}: {error}");
        println!("{name}: {error}");
        assert!(!exec_root.exists(), "{name}: nothing is created for an invalid tree");
    }
    // The same limits accept a tree exactly at them.
    let nested = s.cas.put_directory(
        DigestFunction::Sha256,
        &directory(
            (0..3).map(|i| file(&format!("f{i}"), &f, false)).collect(),
            vec![dir("d", &one_level)],
            vec![symlink("l", "d/e")],
        ),
    );
    materialize_with_limits(
        &s.cache,
        &s.cas,
        DigestFunction::Sha256,
        &nested,
        &s.work.path().join("ok"),
        None,
        &limits,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn missing_inputs_are_reported_all_at_once() {
    let s = setup();
    let present = s.cas.put(b"present");
    let gone: Vec<Digest> =
        (0..3).map(|i| DigestFunction::Sha256.compute(format!("gone {i}").as_bytes())).collect();
    let lost_dir = DigestFunction::Sha256.compute(b"not a directory anyone uploaded");
    let sub = s
        .cas
        .put_directory(DigestFunction::Sha256, &directory(vec![file("g2", &gone[2], true)], vec![], vec![]));
    let root = s.cas.put_directory(
        DigestFunction::Sha256,
        &directory(
            vec![file("g0", &gone[0], false), file("g1", &gone[1], false), file("p", &present, false)],
            vec![dir("lost", &lost_dir), dir("sub", &sub)],
            vec![],
        ),
    );
    let exec_root = s.work.path().join("exec");
    let error =
        materialize(&s.cache, &s.cas, DigestFunction::Sha256, &root, &exec_root, None).await.unwrap_err();
    let mut missing = error.missing_digests().to_vec();
    missing.sort();
    let mut expected = vec![gone[0], gone[1], gone[2], lost_dir];
    expected.sort();
    assert_eq!(missing, expected);
    let as_error = kiln_proto::Error::from(error);
    assert_eq!(as_error.code(), Code::NotFound);
    assert!(as_error.message().starts_with("4 input blobs are missing"), "{as_error}");
    assert!(as_error.message().contains(&gone[0].hash_hex()));
    assert!(!exec_root.exists());
    assert_eq!(s.cas.total_reads(), 0, "nothing is fetched when something is missing");

    // A missing root is missing too.
    let absent_root = DigestFunction::Sha256.compute(b"no root");
    let error = materialize(&s.cache, &s.cas, DigestFunction::Sha256, &absent_root, &exec_root, None)
        .await
        .unwrap_err();
    assert_eq!(error.missing_digests(), &[absent_root]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_materializations_fetch_each_blob_once() {
    let work = Arc::new(tempfile::tempdir().unwrap());
    let cache = FileCache::open(&work.path().join("cache"), 1 << 30).unwrap();
    let cas = Arc::new(TestCas::gated());
    let shared: Vec<Digest> = (0..5).map(|i| cas.put(format!("shared {i}").as_bytes())).collect();
    let tasks: Vec<_> = (0..6)
        .map(|t| {
            let own = cas.put(format!("own {t}").as_bytes());
            let mut files: Vec<_> =
                shared.iter().enumerate().map(|(i, d)| file(&format!("s{i}"), d, false)).collect();
            files.push(file("x", &own, false));
            let inner = cas.put_directory(DigestFunction::Sha256, &directory(files.clone(), vec![], vec![]));
            let root = cas
                .put_directory(DigestFunction::Sha256, &directory(files, vec![dir("inner", &inner)], vec![]));
            let (cache, cas, work) = (cache.clone(), Arc::clone(&cas), Arc::clone(&work));
            tokio::spawn(async move {
                let exec_root = work.path().join(format!("exec{t}"));
                materialize(&cache, cas.as_ref(), DigestFunction::Sha256, &root, &exec_root, None).await
            })
        })
        .collect();
    // Each shared blob: one fetch held at the gate, five joined.
    eventually(WAIT, "every task waiting on the shared fetches", || cache.stats().joined == 25).await;
    cas.open_gate();
    let mut misses = 0;
    for task in tasks {
        let stats = task.await.unwrap().unwrap();
        assert_eq!(stats.cache_hits + stats.cache_misses, 6);
        misses += stats.cache_misses;
    }
    assert_eq!(misses, 11, "5 shared blobs and 6 own ones");
    for d in &shared {
        assert_eq!(cas.reads_of(d), 1, "{d}");
    }
    assert_eq!(cas.total_reads(), 11);
    let entry = ino(&cache.entry_path(&shared[0], false));
    for t in 0..6 {
        assert_eq!(ino(&work.path().join(format!("exec{t}/inner/s0"))), entry);
    }
}

#[tokio::test]
#[allow(deprecated)]
async fn output_parents_are_created_and_never_through_symlinks() {
    let work = tempfile::tempdir().unwrap();
    let exec_root = work.path().join("exec");
    std::fs::create_dir_all(exec_root.join("wd/in")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), exec_root.join("wd/link")).unwrap();
    let command = Command {
        working_directory: "wd".to_owned(),
        output_files: vec!["out/a/b.txt".to_owned(), "../top/c.txt".to_owned(), "in/d.txt".to_owned()],
        output_directories: vec!["gen/dir".to_owned()],
        ..Default::default()
    };
    prepare_outputs(&exec_root, "wd", &command, Some((4321, 8765))).unwrap();
    for d in ["wd/out", "wd/out/a", "top", "wd/gen"] {
        let meta = std::fs::symlink_metadata(exec_root.join(d)).unwrap();
        assert!(meta.is_dir(), "{d}");
        assert_eq!((meta.mode() & 0o7777, meta.uid(), meta.gid()), (0o755, 4321, 8765), "{d}");
    }
    assert!(
        !exec_root.join("wd/gen/dir").exists(),
        "output directories themselves are the action's to create"
    );
    assert!(!exec_root.join("wd/out/a/b.txt").exists());
    // Existing input directories keep their owner.
    assert_eq!(std::fs::metadata(exec_root.join("wd/in")).unwrap().uid(), 0);

    // With output_paths, only those count.
    let paths = Command { output_paths: vec!["p/q".to_owned()], ..command.clone() };
    prepare_outputs(&exec_root, "", &paths, None).unwrap();
    assert!(exec_root.join("p").is_dir());

    for bad in ["/abs/x", "../../escape", "link/x/y", "a//b", "trailing/"] {
        let command = Command { output_files: vec![bad.to_owned()], ..Default::default() };
        let error = prepare_outputs(&exec_root, "wd", &command, None).unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{bad}: {error}");
    }
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing was created through the symlink"
    );
}

/// A client's encoding that prost does not reproduce (here an unknown
/// field) is still found, by the digest its parent names.
#[tokio::test]
async fn directories_prost_would_encode_differently_are_found() {
    use prost::Message;
    let s = setup();
    let blob = s.cas.put(b"in a foreign directory");
    let mut foreign = directory(vec![file("f", &blob, false)], vec![], vec![]).encode_to_vec();
    foreign.extend_from_slice(&[120, 1]); // field 15, varint 1: unknown to the REAPI
    let foreign = s.cas.put(&foreign);
    let root =
        s.cas.put_directory(DigestFunction::Sha256, &directory(vec![], vec![dir("sub", &foreign)], vec![]));
    let exec_root = s.work.path().join("exec");
    materialize(&s.cache, &s.cas, DigestFunction::Sha256, &root, &exec_root, None).await.unwrap();
    assert_eq!(std::fs::read(exec_root.join("sub/f")).unwrap(), b"in a foreign directory");
}

#[tokio::test]
async fn a_tree_with_too_many_directories_is_refused_without_being_fetched_whole() {
    let s = setup();
    let leaves: Vec<Digest> = (0..200)
        .map(|i| {
            let f = s.cas.put(format!("leaf {i}").as_bytes());
            s.cas
                .put_directory(DigestFunction::Sha256, &directory(vec![file("f", &f, false)], vec![], vec![]))
        })
        .collect();
    let children = leaves.iter().enumerate().map(|(i, d)| dir(&format!("d{i}"), d)).collect();
    let root = s.cas.put_directory(DigestFunction::Sha256, &directory(vec![], children, vec![]));
    let limits = InputLimits { directories_max: 10, ..InputLimits::DEFAULT };
    let exec_root = s.work.path().join("exec");
    let error =
        materialize_with_limits(&s.cache, &s.cas, DigestFunction::Sha256, &root, &exec_root, None, &limits)
            .await
            .unwrap_err();
    let MaterializeError::Failed(error) = error else { panic!("{error:?}") };
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    assert!(error.message().contains("directories"), "{error}");
    assert!(s.cas.tree_returned() <= 12, "the CAS client stopped early: {}", s.cas.tree_returned());
}

/// A blob named more often than the filesystem can link it is copied, but
/// only up to the action's budget of copied bytes: past it, RESOURCE_EXHAUSTED
/// naming the blob, and nothing more written.
#[tokio::test]
async fn copies_past_the_link_limit_stop_at_the_budget() {
    let s = setup();
    let data = vec![7u8; 4096];
    let blob = s.cas.put(&data);
    // 66,000 names: past ext4's 65,000 links; at most 10 copies allowed.
    let files: Vec<_> = (0..66_000).map(|i| file(&format!("f{i:05}"), &blob, false)).collect();
    let root = s.cas.put_directory(DigestFunction::Sha256, &directory(files, vec![], vec![]));
    let limits = InputLimits { copied_bytes_max: 10 * 4096, ..InputLimits::DEFAULT };
    let exec_root = s.work.path().join("exec");
    let result =
        materialize_with_limits(&s.cache, &s.cas, DigestFunction::Sha256, &root, &exec_root, None, &limits)
            .await;
    if s.cache.stats().link_copies == 0 && result.is_ok() {
        println!("this filesystem allows more than 66,000 links; nothing to check");
        return;
    }
    let Err(MaterializeError::Failed(error)) = result else { panic!("{result:?}") };
    assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
    assert!(error.message().contains(&blob.to_string()) && error.message().contains("40960"), "{error}");
    assert_eq!(s.cache.stats().link_copies, 10, "copies past the budget");
}
