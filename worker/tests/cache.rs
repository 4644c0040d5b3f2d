//! The local file cache: real files, real hard links, on this machine's disk.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Instant;

use common::{TestCas, WAIT, eventually};
use kiln_proto::Code;
use kiln_worker::cache::{Acquired, FileCache};

fn ino(path: &std::path::Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().ino()
}

#[tokio::test]
async fn links_share_the_entry_inode_and_fetch_once() {
    let work = tempfile::tempdir().unwrap();
    let cache = FileCache::open(&work.path().join("cache"), 1 << 20).unwrap();
    let cas = TestCas::new();
    let digest = cas.put(b"hello, inputs");
    for i in 0..10 {
        cache.link_into(&cas, &digest, false, &work.path().join(format!("f{i}"))).await.unwrap();
    }
    let entry = cache.entry_path(&digest, false);
    let meta = std::fs::metadata(&entry).unwrap();
    assert_eq!(meta.nlink(), 11);
    assert_eq!(meta.mode() & 0o7777, 0o444);
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    for i in 0..10 {
        let path = work.path().join(format!("f{i}"));
        assert_eq!(ino(&path), meta.ino());
        assert_eq!(std::fs::read(&path).unwrap(), b"hello, inputs");
    }
    assert_eq!(cas.reads_of(&digest), 1);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.entries, stats.bytes), (9, 1, 1, 13));
}

#[tokio::test]
async fn executable_and_plain_copies_are_kept_apart() {
    let work = tempfile::tempdir().unwrap();
    let cache = FileCache::open(&work.path().join("cache"), 1 << 20).unwrap();
    let cas = TestCas::new();
    let digest = cas.put(b"#!/bin/sh\necho hi\n");
    let plain = work.path().join("plain");
    let tool = work.path().join("tool");
    cache.link_into(&cas, &digest, false, &plain).await.unwrap();
    cache.link_into(&cas, &digest, true, &tool).await.unwrap();
    assert_ne!(ino(&plain), ino(&tool));
    assert_eq!(std::fs::metadata(&plain).unwrap().mode() & 0o7777, 0o444);
    assert_eq!(std::fs::metadata(&tool).unwrap().mode() & 0o7777, 0o555);
    assert_eq!(std::fs::read(&tool).unwrap(), std::fs::read(&plain).unwrap());
    // The second mode was copied from the first entry, not fetched again.
    assert_eq!(cas.reads_of(&digest), 1);
    assert_eq!(cache.stats().entries, 2);
}

#[tokio::test]
async fn eviction_is_least_recently_used_by_bytes() {
    let work = tempfile::tempdir().unwrap();
    let cache = FileCache::open(&work.path().join("cache"), 100).unwrap();
    let cas = TestCas::new();
    let a = cas.put(&[b'a'; 40]);
    let b = cas.put(&[b'b'; 40]);
    let c = cas.put(&[b'c'; 40]);
    cache.link_into(&cas, &a, false, &work.path().join("a1")).await.unwrap();
    cache.link_into(&cas, &b, false, &work.path().join("b1")).await.unwrap();
    // Using a again makes b the least recently used.
    cache.link_into(&cas, &a, false, &work.path().join("a2")).await.unwrap();
    cache.link_into(&cas, &c, false, &work.path().join("c1")).await.unwrap();
    assert!(cache.contains(&a, false));
    assert!(!cache.contains(&b, false));
    assert!(cache.contains(&c, false));
    assert!(!cache.entry_path(&b, false).exists());
    let stats = cache.stats();
    assert_eq!((stats.bytes, stats.entries, stats.evictions), (80, 2, 1));
    // The link made before the eviction keeps the bytes alive.
    assert_eq!(std::fs::read(work.path().join("b1")).unwrap(), vec![b'b'; 40]);
    // Needed again, b is fetched again (and a, now the oldest, goes).
    cache.link_into(&cas, &b, false, &work.path().join("b2")).await.unwrap();
    assert_eq!(cas.reads_of(&b), 2);
    assert!(!cache.contains(&a, false));
}

#[tokio::test]
async fn pinned_entries_are_not_evicted() {
    let work = tempfile::tempdir().unwrap();
    let cache = FileCache::open(&work.path().join("cache"), 50).unwrap();
    let cas = TestCas::new();
    let a = cas.put(&[b'a'; 40]);
    let b = cas.put(&[b'b'; 40]);
    let pinned_a = cache.acquire(&cas, &a, false).await.unwrap();
    let pinned_b = cache.acquire(&cas, &b, false).await.unwrap();
    // Both pinned: over capacity, nothing evicted.
    assert_eq!(cache.stats().bytes, 80);
    pinned_a.link_to(&work.path().join("a")).unwrap();
    drop(pinned_b);
    // b is unpinned and a is not: b goes although a is older.
    assert!(cache.contains(&a, false));
    assert!(!cache.contains(&b, false));
    drop(pinned_a);
    assert!(cache.contains(&a, false));
    assert_eq!(cache.stats().bytes, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_one_blob_fetch_it_once() {
    let work = Arc::new(tempfile::tempdir().unwrap());
    let cache = FileCache::open(&work.path().join("cache"), 1 << 20).unwrap();
    let cas = Arc::new(TestCas::gated());
    let digest = cas.put(b"shared");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (cache, cas, work) = (cache.clone(), Arc::clone(&cas), Arc::clone(&work));
            tokio::spawn(async move {
                cache.link_into(cas.as_ref(), &digest, false, &work.path().join(format!("f{i}"))).await
            })
        })
        .collect();
    // One fetches (held at the gate), the seven others wait for it.
    eventually(WAIT, "seven requests joining the fetch", || cache.stats().joined == 7).await;
    assert_eq!(cas.reads_of(&digest), 1);
    cas.open_gate();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(cas.reads_of(&digest), 1);
    let entry = ino(&cache.entry_path(&digest, false));
    for i in 0..8 {
        assert_eq!(ino(&work.path().join(format!("f{i}"))), entry);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_fetch_hands_over_to_a_waiter() {
    let work = Arc::new(tempfile::tempdir().unwrap());
    let cache = FileCache::open(&work.path().join("cache"), 1 << 20).unwrap();
    let cas = Arc::new(TestCas::gated());
    let digest = cas.put(b"handed over");
    let first = {
        let (cache, cas, work) = (cache.clone(), Arc::clone(&cas), Arc::clone(&work));
        tokio::spawn(async move {
            cache.link_into(cas.as_ref(), &digest, false, &work.path().join("first")).await
        })
    };
    eventually(WAIT, "the first fetch to start", || cas.reads_of(&digest) == 1).await;
    let second = {
        let (cache, cas, work) = (cache.clone(), Arc::clone(&cas), Arc::clone(&work));
        tokio::spawn(async move {
            cache.link_into(cas.as_ref(), &digest, false, &work.path().join("second")).await
        })
    };
    eventually(WAIT, "the second request to join", || cache.stats().joined == 1).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    // The waiter takes over and fetches itself.
    eventually(WAIT, "the waiter to fetch", || cas.reads_of(&digest) == 2).await;
    cas.open_gate();
    second.await.unwrap().unwrap();
    assert_eq!(std::fs::read(work.path().join("second")).unwrap(), b"handed over");
    // Nothing half-written is left behind.
    assert_eq!(std::fs::read_dir(work.path().join("cache/tmp")).unwrap().count(), 0);
}

#[tokio::test]
async fn a_missing_blob_is_not_found_and_not_cached() {
    let work = tempfile::tempdir().unwrap();
    let cache = FileCache::open(&work.path().join("cache"), 1 << 20).unwrap();
    let cas = TestCas::new();
    let digest = kiln_proto::DigestFunction::Sha256.compute(b"not there yet");
    let error = cache.link_into(&cas, &digest, false, &work.path().join("f")).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(error.message().contains(&digest.hash_hex()), "{error}");
    assert!(!cache.contains(&digest, false));
    assert!(!work.path().join("f").exists());
    cas.put(b"not there yet");
    cache.link_into(&cas, &digest, false, &work.path().join("f")).await.unwrap();
    assert_eq!(std::fs::read(work.path().join("f")).unwrap(), b"not there yet");
}

#[tokio::test]
async fn reopening_reuses_sound_entries_and_drops_the_rest() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cache");
    let cas = TestCas::new();
    let good = cas.put(b"good entry");
    let bad = cas.put(b"bad entry");
    {
        let cache = FileCache::open(&dir, 1 << 20).unwrap();
        cache.link_into(&cas, &good, false, &work.path().join("g")).await.unwrap();
        cache.link_into(&cas, &bad, true, &work.path().join("b")).await.unwrap();
        // A second worker on the same directory is refused.
        assert_eq!(FileCache::open(&dir, 1 << 20).unwrap_err().code(), Code::FailedPrecondition);
    }
    // Truncate one entry, leave a stray file and a half-written fetch.
    let bad_path = dir.join("entries").join(format!("sha256-{}-{}-x", bad.hash_hex(), bad.size_bytes()));
    std::fs::set_permissions(&bad_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&bad_path, b"bad").unwrap();
    std::fs::write(dir.join("entries/garbage"), b"?").unwrap();
    std::fs::write(dir.join("tmp/0123"), b"half").unwrap();

    let cache = FileCache::open(&dir, 1 << 20).unwrap();
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.bytes), (1, 10));
    assert!(!bad_path.exists());
    assert!(!dir.join("entries/garbage").exists());
    assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    cache.link_into(&cas, &good, false, &work.path().join("g2")).await.unwrap();
    assert_eq!(cas.reads_of(&good), 1, "the reused entry is a hit");
    assert_eq!(cache.stats().hits, 1);
    cache.link_into(&cas, &bad, true, &work.path().join("b2")).await.unwrap();
    assert_eq!(std::fs::read(work.path().join("b2")).unwrap(), b"bad entry");
}

#[tokio::test]
async fn other_filesystems_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let cache = FileCache::open(&work.path().join("cache"), 1 << 20).unwrap();
    cache.check_same_filesystem(work.path()).unwrap();
    // /proc is always another filesystem.
    assert_eq!(
        cache.check_same_filesystem(std::path::Path::new("/proc")).unwrap_err().code(),
        Code::FailedPrecondition
    );
}

/// ext4 allows 65,000 links to one inode; the link after that is a copy.
#[tokio::test]
async fn too_many_links_fall_back_to_a_copy() {
    let work = tempfile::tempdir().unwrap();
    let cache = FileCache::open(&work.path().join("cache"), 1 << 20).unwrap();
    let cas = TestCas::new();
    let digest = cas.put(b"popular");
    let links = work.path().join("links");
    std::fs::create_dir(&links).unwrap();
    let entry = cache.acquire(&cas, &digest, false).await.unwrap();
    assert_eq!(entry.acquired(), Acquired::Fetched);
    let start = Instant::now();
    let mut linked = 0u64;
    let limit = 70_000;
    while linked < limit && cache.stats().link_copies == 0 {
        entry.link_to(&links.join(linked.to_string())).unwrap();
        linked += 1;
    }
    println!("{linked} links in {:?}", start.elapsed());
    if cache.stats().link_copies == 0 {
        println!("this filesystem allows more than {limit} links; nothing to check");
        return;
    }
    let copy = links.join((linked - 1).to_string());
    let meta = std::fs::metadata(&copy).unwrap();
    assert_ne!(meta.ino(), ino(entry.path()));
    assert_eq!(meta.nlink(), 1);
    assert_eq!(meta.mode() & 0o7777, 0o444);
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    assert_eq!(std::fs::read(&copy).unwrap(), b"popular");
    // link_into falls back the same way.
    cache.link_into(&cas, &digest, false, &work.path().join("one more")).await.unwrap();
    assert_eq!(cache.stats().link_copies, 2);
    assert_eq!(std::fs::read(work.path().join("one more")).unwrap(), b"popular");
}
