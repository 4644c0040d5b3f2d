//! Tidy checks: architecture invariants and documentation freshness,
//! enforced as ordinary tests.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if path.is_dir() && name != "target" && !name.starts_with('.') {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

#[test]
fn files_stay_small() {
    let mut files = Vec::new();
    rust_files(root(), &mut files);
    for file in files {
        let lines = std::fs::read_to_string(&file).unwrap().lines().count();
        assert!(lines <= 900, "{} has {lines} lines; split it by responsibility", file.display());
    }
}

#[test]
fn only_service_modules_know_tonic() {
    let mut files = Vec::new();
    rust_files(&root().join("storage/src/store"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains("tonic"), "{} mentions tonic; stores must not know gRPC", file.display());
    }
}

#[test]
fn worker_never_depends_on_scheduler() {
    let manifest = read("worker/Cargo.toml");
    assert!(!manifest.contains("kiln-scheduler"), "the worker speaks only the worker protocol");
}

#[test]
fn every_config_key_is_documented_in_readme() {
    let readme = read("README.md");
    let example = read("docs/kiln.example.toml");
    for line in example.lines() {
        // Keys set in the example, and keys shown commented out (`# key = value`).
        let line = line.trim().trim_start_matches("# ");
        let Some((key, _)) = line.split_once(" = ") else { continue };
        if !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            continue;
        }
        assert!(readme.contains(&format!("`{key}`")), "README.md does not document config key `{key}`");
    }
}

#[test]
fn architecture_maps_every_crate() {
    let architecture = read("ARCHITECTURE.md");
    for dir in ["proto/", "storage/", "scheduler/", "worker/", "auth/", "tools/", "benches/", "tests/"] {
        assert!(architecture.contains(&format!("`{dir}")), "ARCHITECTURE.md has no code map entry for {dir}");
    }
}

#[test]
fn readme_test_command_is_what_ci_runs() {
    let readme = read("README.md");
    let ci = read(".ci/run");
    assert!(readme.contains("./scripts/test"), "README.md must give the test command");
    assert!(ci.contains("scripts/test"), ".ci/run must run README.md's test command");
}
