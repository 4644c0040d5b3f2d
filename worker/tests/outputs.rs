//! Collecting outputs from a hostile action's exec root.

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use common::TestCas;
use kiln_proto::reapi::{ActionResult, Command, Directory, Tree};
use kiln_proto::{Code, Digest, DigestFunction};
use kiln_worker::cache::FileCache;
use kiln_worker::inputs::materialize;
use kiln_worker::outputs::{OutputLimits, collect, collect_with_limits, upload_log};
use prost::Message;

fn write(path: &Path, data: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[allow(deprecated)]
fn legacy(files: &[&str], directories: &[&str]) -> Command {
    Command {
        output_files: files.iter().map(|s| (*s).to_owned()).collect(),
        output_directories: directories.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn digest_of(d: &Option<kiln_proto::reapi::Digest>, function: DigestFunction) -> Digest {
    Digest::from_proto(Some(function), d.as_ref().unwrap()).unwrap()
}

#[tokio::test]
async fn files_and_executables_are_uploaded_once() {
    let exec = tempfile::tempdir().unwrap();
    write(&exec.path().join("out/a.txt"), b"plain output", 0o644);
    write(&exec.path().join("out/tool"), b"#!/bin/sh\n", 0o755);
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    write(&exec.path().join("out/big.bin"), &big, 0o600);
    let cas = TestCas::new();
    let command = legacy(&["out/a.txt", "out/big.bin", "out/missing", "out/tool"], &[]);
    // Small inline bounds: big.bin is uploaded through /proc/self/fd.
    let limits = OutputLimits { inline_file_bytes_max: 64, ..OutputLimits::DEFAULT };
    let collected =
        collect_with_limits(&cas, DigestFunction::Sha256, exec.path(), &command, &limits, limits.deadline())
            .await
            .unwrap();
    let files: Vec<(&str, bool)> =
        collected.output_files.iter().map(|f| (f.path.as_str(), f.is_executable)).collect();
    assert_eq!(files, [("out/a.txt", false), ("out/big.bin", false), ("out/tool", true)]);
    for f in &collected.output_files {
        let digest = digest_of(&f.digest, DigestFunction::Sha256);
        assert_eq!(cas.get(&digest).unwrap(), std::fs::read(exec.path().join(&f.path)).unwrap());
    }
    assert_eq!(collected.stats.uploaded_blobs, 3);
    assert_eq!(collected.stats.uploaded_bytes, 12 + 10 + 100_000);

    // Everything is in the CAS now: nothing is uploaded again.
    let again = collect(&cas, DigestFunction::Sha256, exec.path(), &command).await.unwrap();
    assert_eq!(again.stats.uploaded_blobs, 0);
    assert_eq!(cas.uploads().len(), 3);

    let mut result = ActionResult::default();
    again.apply_to(&mut result);
    assert_eq!(result.output_files.len(), 3);
}

#[tokio::test]
async fn output_directories_are_trees_that_round_trip() {
    for function in [DigestFunction::Sha256, DigestFunction::Blake3] {
        let work = tempfile::tempdir().unwrap();
        let exec = work.path().join("exec");
        let gen_dir = exec.join("wd/gen");
        write(&gen_dir.join("top.txt"), b"top", 0o644);
        write(&gen_dir.join("bin/tool"), b"#!/bin/sh\n", 0o755);
        write(&gen_dir.join("same1/x"), b"twin", 0o644);
        write(&gen_dir.join("same2/x"), b"twin", 0o644);
        std::fs::create_dir_all(gen_dir.join("empty")).unwrap();
        write(&gen_dir.join("deep/er/est/leaf"), b"leaf", 0o644);
        symlink("top.txt", gen_dir.join("alias")).unwrap();
        let cas = TestCas::new();
        let mut command = legacy(&[], &["gen"]);
        command.working_directory = "wd".to_owned();
        let collected = collect(&cas, function, &exec, &command).await.unwrap();
        assert_eq!(collected.output_directories.len(), 1);
        let out = &collected.output_directories[0];
        assert_eq!(out.path, "gen");
        assert!(out.is_topologically_sorted);

        let tree_bytes = cas.get(&digest_of(&out.tree_digest, function)).unwrap();
        let tree = Tree::decode(tree_bytes.as_slice()).unwrap();
        let root = tree.root.clone().unwrap();
        let root_digest = digest_of(&out.root_directory_digest, function);
        assert_eq!(root_digest, function.compute(&root.encode_to_vec()));
        let names: Vec<&str> = root.directories.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["bin", "deep", "empty", "same1", "same2"]);
        assert_eq!(root.files[0].name, "top.txt");
        assert_eq!(root.symlinks[0].target, "top.txt");
        // same1 and same2 are one Directory, stored once; parents come first.
        assert_eq!(root.directories[3].digest, root.directories[4].digest);
        assert_eq!(tree.children.len(), 6, "bin, deep, er, est, empty, same");
        let position = |d: &Directory| tree.children.iter().position(|c| c == d).unwrap();
        let child = |parent: &Directory, name: &str| -> Directory {
            let node = parent.directories.iter().find(|d| d.name == name).unwrap();
            let digest = digest_of(&node.digest, function);
            Directory::decode(cas.get(&digest).unwrap().as_slice()).unwrap()
        };
        let deep = child(&root, "deep");
        let er = child(&deep, "er");
        assert!(position(&deep) < position(&er));

        // Materializing root_directory_digest gives back the same tree.
        let cache = FileCache::open(&work.path().join("cache"), 1 << 20).unwrap();
        let copy = work.path().join("copy");
        materialize(&cache, &cas, function, &root_digest, &copy, None).await.unwrap();
        for file in ["top.txt", "bin/tool", "same1/x", "same2/x", "deep/er/est/leaf", "alias"] {
            assert_eq!(
                std::fs::read(copy.join(file)).unwrap(),
                std::fs::read(gen_dir.join(file)).unwrap(),
                "{file}"
            );
        }
        assert!(copy.join("empty").is_dir());
        assert_eq!(std::fs::metadata(copy.join("bin/tool")).unwrap().permissions().mode() & 0o777, 0o555);
        assert_eq!(std::fs::read_link(copy.join("alias")).unwrap(), Path::new("top.txt"));
    }
}

#[tokio::test]
async fn output_paths_fill_files_directories_and_symlinks() {
    let exec = tempfile::tempdir().unwrap();
    write(&exec.path().join("f"), b"file", 0o644);
    write(&exec.path().join("d/inner"), b"inner", 0o644);
    symlink("d/inner", exec.path().join("l")).unwrap();
    let command = Command {
        output_paths: vec!["absent".to_owned(), "d".to_owned(), "f".to_owned(), "l".to_owned()],
        ..legacy(&["ignored"], &["ignored too"])
    };
    let collected = collect(&TestCas::new(), DigestFunction::Sha256, exec.path(), &command).await.unwrap();
    assert_eq!(collected.output_files.len(), 1);
    assert_eq!(collected.output_directories.len(), 1);
    assert_eq!(collected.output_symlinks.len(), 1);
    assert_eq!(collected.output_symlinks[0].target, "d/inner");
    assert!(collected.output_file_symlinks.is_empty() && collected.output_directory_symlinks.is_empty());
}

#[tokio::test]
async fn symlinks_are_reported_and_never_followed() {
    let exec = tempfile::tempdir().unwrap();
    let secret_dir = tempfile::tempdir().unwrap();
    let secret_path = secret_dir.path().join("secret");
    let secret = b"the worker must never upload this".to_vec();
    write(&secret_path, &secret, 0o600);
    std::fs::create_dir(exec.path().join("out")).unwrap();
    symlink("/etc/shadow", exec.path().join("out/shadow")).unwrap();
    symlink(&secret_path, exec.path().join("out/secret")).unwrap();
    write(&exec.path().join("d/ok"), b"ok", 0o644);
    symlink(&secret_path, exec.path().join("d/link")).unwrap();
    symlink(secret_dir.path(), exec.path().join("d/dirlink")).unwrap();
    symlink("/etc", exec.path().join("etc")).unwrap();
    let cas = TestCas::new();
    let command = legacy(&["out/secret", "out/shadow"], &["d", "etc"]);
    let collected = collect(&cas, DigestFunction::Sha256, exec.path(), &command).await.unwrap();
    let targets: Vec<(&str, &str)> =
        collected.output_file_symlinks.iter().map(|s| (s.path.as_str(), s.target.as_str())).collect();
    assert_eq!(targets, [("out/secret", secret_path.to_str().unwrap()), ("out/shadow", "/etc/shadow")]);
    assert_eq!(collected.output_directory_symlinks[0].target, "/etc");
    assert!(collected.output_files.is_empty());
    let tree = Tree::decode(
        cas.get(&digest_of(&collected.output_directories[0].tree_digest, DigestFunction::Sha256))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let root = tree.root.unwrap();
    let symlinks: Vec<&str> = root.symlinks.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(symlinks, ["dirlink", "link"]);
    assert!(root.directories.is_empty());
    assert!(!cas.holds_bytes(&secret));
    assert!(!cas.holds_bytes(&std::fs::read("/etc/shadow").unwrap()));
}

#[tokio::test]
async fn a_symlink_on_the_path_is_refused_not_followed() {
    let exec = tempfile::tempdir().unwrap();
    symlink("/etc", exec.path().join("out")).unwrap();
    let cas = TestCas::new();
    for command in [
        legacy(&["out/passwd"], &[]),
        legacy(&[], &["out/ssl"]),
        Command { output_paths: vec!["out/passwd".to_owned()], ..Default::default() },
    ] {
        let error = collect(&cas, DigestFunction::Sha256, exec.path(), &command).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error}");
        assert!(error.message().contains("symlink"), "{error}");
    }
    assert!(cas.uploads().is_empty());
    assert!(!cas.holds_bytes(&std::fs::read("/etc/passwd").unwrap()));
    // A plain file on the path just means the output is absent.
    write(&exec.path().join("file"), b"x", 0o644);
    let collected =
        collect(&cas, DigestFunction::Sha256, exec.path(), &legacy(&["file/below"], &[])).await.unwrap();
    assert!(collected.output_files.is_empty());
}

#[tokio::test]
async fn fifos_are_refused_without_hanging() {
    let exec = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(exec.path().join("d")).unwrap();
    nix::unistd::mkfifo(&exec.path().join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    nix::unistd::mkfifo(&exec.path().join("d/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644))
        .unwrap();
    let cas = TestCas::new();
    let deadline = Duration::from_secs(10);
    for command in [
        legacy(&["fifo"], &[]),
        legacy(&[], &["d"]),
        Command { output_paths: vec!["fifo".to_owned()], ..Default::default() },
    ] {
        let error =
            tokio::time::timeout(deadline, collect(&cas, DigestFunction::Sha256, exec.path(), &command))
                .await
                .expect("collecting a fifo must not hang")
                .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error}");
        assert!(error.message().contains("fifo"), "{error}");
    }
}

#[tokio::test]
async fn wrong_types_are_failed_precondition() {
    let exec = tempfile::tempdir().unwrap();
    write(&exec.path().join("file"), b"x", 0o644);
    std::fs::create_dir(exec.path().join("dir")).unwrap();
    let cas = TestCas::new();
    for command in [legacy(&["dir"], &[]), legacy(&[], &["file"])] {
        let error = collect(&cas, DigestFunction::Sha256, exec.path(), &command).await.unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    }
    // The working directory itself may be an output directory, not an output file.
    let whole = collect(&cas, DigestFunction::Sha256, exec.path(), &legacy(&[], &[""])).await.unwrap();
    assert_eq!(whole.output_directories.len(), 1);
    let error = collect(&cas, DigestFunction::Sha256, exec.path(), &legacy(&[""], &[])).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    for bad in ["/etc/passwd", "../x", "a//b"] {
        let error =
            collect(&cas, DigestFunction::Sha256, exec.path(), &legacy(&[bad], &[])).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{bad}");
    }
}

#[tokio::test]
async fn sizes_counts_and_depth_are_bounded() {
    let exec = tempfile::tempdir().unwrap();
    write(&exec.path().join("big"), &[7u8; 2000], 0o644);
    // d/a/b/c is three levels below d.
    write(&exec.path().join("d/a/b/c/leaf"), b"deep", 0o644);
    for i in 0..10 {
        write(&exec.path().join(format!("many/{i}")), b"m", 0o644);
    }
    let cas = TestCas::new();
    let limits =
        OutputLimits { file_size_bytes_max: 1000, entries_max: 8, depth_max: 2, ..OutputLimits::DEFAULT };
    for (command, what) in [
        (legacy(&["big"], &[]), "bytes"),
        (legacy(&[], &["many"]), "entries"),
        (legacy(&[], &["d"]), "levels"),
    ] {
        let error = collect_with_limits(
            &cas,
            DigestFunction::Sha256,
            exec.path(),
            &command,
            &limits,
            limits.deadline(),
        )
        .await
        .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error}");
        assert!(error.message().contains(what), "{error}");
    }
    assert!(cas.uploads().is_empty());
    let total = OutputLimits { total_bytes_max: 2001, ..OutputLimits::DEFAULT };
    let error = collect_with_limits(
        &cas,
        DigestFunction::Sha256,
        exec.path(),
        &legacy(&["big", "d/a/b/c/leaf"], &[]),
        &total,
        total.deadline(),
    )
    .await
    .unwrap_err();
    assert!(error.message().contains("more than 2001 bytes"), "{error}");
}

/// [`upload_log`] with the default limits.
async fn log(cas: &TestCas, function: DigestFunction, path: &std::path::Path) -> kiln_proto::Result<Digest> {
    let limits = OutputLimits::DEFAULT;
    upload_log(cas, function, path, &limits, limits.deadline()).await
}

/// Hashing and uploading stop at the collection's deadline with
/// RESOURCE_EXHAUSTED (not retried): an 8 GiB sparse output, which takes
/// seconds to hash, ends within a fraction of that under a 50 ms bound, and
/// so does its log.
#[tokio::test]
async fn a_collection_past_its_time_bound_stops_with_resource_exhausted() {
    let exec = tempfile::tempdir().unwrap();
    let sparse = std::fs::File::create(exec.path().join("sparse")).unwrap();
    sparse.set_len(8 << 30).unwrap();
    let cas = TestCas::new();
    let limits = OutputLimits { collect_time_max: Duration::from_millis(50), ..OutputLimits::DEFAULT };
    let start = std::time::Instant::now();
    let error = collect_with_limits(
        &cas,
        DigestFunction::Sha256,
        exec.path(),
        &legacy(&["sparse"], &[]),
        &limits,
        limits.deadline(),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
    assert!(error.message().contains("0.05 s") && error.message().contains("\"sparse\""), "{error}");
    assert!(start.elapsed() < Duration::from_secs(2), "hashing went on: {:?}", start.elapsed());
    let start = std::time::Instant::now();
    let error =
        upload_log(&cas, DigestFunction::Sha256, &exec.path().join("sparse"), &limits, limits.deadline())
            .await
            .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
    assert!(start.elapsed() < Duration::from_secs(2), "hashing went on: {:?}", start.elapsed());
    assert!(cas.uploads().is_empty());
}

#[tokio::test]
async fn hard_linked_secrets_are_refused() {
    use std::os::unix::fs::MetadataExt;
    let work = tempfile::tempdir().unwrap();
    let exec = work.path().join("exec");
    std::fs::create_dir(&exec).unwrap();
    std::os::unix::fs::chown(&exec, Some(1234), Some(1234)).unwrap();
    // A root-only file the action could not read, hard-linked into its tree.
    let secret = work.path().join("secret");
    write(&secret, b"root only", 0o600);
    std::fs::hard_link(&secret, exec.join("stolen")).unwrap();
    // The action's own unreadable-by-others file is fine.
    write(&exec.join("mine"), b"private but mine", 0o600);
    std::os::unix::fs::chown(exec.join("mine"), Some(1234), Some(1234)).unwrap();
    assert_eq!(std::fs::metadata(exec.join("stolen")).unwrap().uid(), 0);
    let cas = TestCas::new();
    let error = collect(&cas, DigestFunction::Sha256, &exec, &legacy(&["stolen"], &[])).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    assert!(!cas.holds_bytes(b"root only"));
    let ok = collect(&cas, DigestFunction::Sha256, &exec, &legacy(&["mine"], &[])).await.unwrap();
    assert_eq!(ok.output_files.len(), 1);
}

#[tokio::test]
async fn logs_are_uploaded_when_missing() {
    let work = tempfile::tempdir().unwrap();
    let small = work.path().join("stdout");
    std::fs::write(&small, b"hello from the action\n").unwrap();
    let large = work.path().join("stderr");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&large, &bytes).unwrap();
    let empty = work.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let cas = TestCas::new();
    let d1 = log(&cas, DigestFunction::Blake3, &small).await.unwrap();
    assert_eq!(d1, DigestFunction::Blake3.compute(b"hello from the action\n"));
    let d2 = log(&cas, DigestFunction::Sha256, &large).await.unwrap();
    assert_eq!(cas.get(&d2).unwrap(), bytes);
    assert_eq!(log(&cas, DigestFunction::Sha256, &empty).await.unwrap(), DigestFunction::Sha256.empty());
    assert_eq!(cas.uploads(), [d1, d2]);
    log(&cas, DigestFunction::Blake3, &small).await.unwrap();
    assert_eq!(cas.uploads().len(), 2, "present blobs are not uploaded again");
    // A log that is a symlink is not followed.
    symlink("/etc/passwd", work.path().join("sneaky")).unwrap();
    assert!(log(&cas, DigestFunction::Sha256, &work.path().join("sneaky")).await.is_err());
}

/// An output directory is read without recursion: 800 levels are
/// collected on a thread with a 128 KiB stack, the Tree holding every
/// level once.
#[test]
fn deep_output_directories_are_read_without_recursion() {
    let exec = tempfile::tempdir().unwrap();
    let mut path = exec.path().join("out");
    for _ in 0..800 {
        path.push("d");
    }
    write(&path.join("leaf"), b"at the bottom", 0o644);
    let root = exec.path().to_owned();
    let (collected, cas) = std::thread::Builder::new()
        .stack_size(128 << 10)
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let cas = TestCas::new();
            let limits = OutputLimits { depth_max: 1000, ..OutputLimits::DEFAULT };
            let command = legacy(&[], &["out"]);
            let collected = runtime.block_on(collect_with_limits(
                &cas,
                DigestFunction::Sha256,
                &root,
                &command,
                &limits,
                limits.deadline(),
            ));
            (collected.unwrap(), cas)
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(collected.output_directories.len(), 1);
    let tree = Tree::decode(
        cas.get(&digest_of(&collected.output_directories[0].tree_digest, DigestFunction::Sha256))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert_eq!(tree.children.len(), 800, "every level once");
    assert_eq!(tree.children.last().unwrap().files[0].name, "leaf");
}
