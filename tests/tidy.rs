//! Tidy checks: architecture invariants and documentation freshness,
//! enforced as ordinary tests.

use std::collections::{BTreeMap, BTreeSet};
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

/// The workspace's crates and the workspace crates each depends on directly
/// (normal and build dependencies; dev-dependencies are for tests).
fn crate_graph() -> BTreeMap<String, BTreeSet<String>> {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(root())
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut graph = BTreeMap::new();
    for package in meta["packages"].as_array().unwrap() {
        let deps = package["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].as_str() != Some("dev"))
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect();
        graph.insert(package["name"].as_str().unwrap().to_owned(), deps);
    }
    graph
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
fn store_code_knows_neither_grpc_nor_auth() {
    let mut files = Vec::new();
    rust_files(&root().join("storage/src/store"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // Tests may drive the futures with any runtime; the code may not need one.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for word in ["tonic", "tokio", "kiln_auth", "Authorizer"] {
            assert!(
                !code.contains(word),
                "{} mentions {word}; stores know neither gRPC, a runtime, nor auth",
                file.display()
            );
        }
    }
}

#[test]
fn unsafe_code_lives_in_two_modules() {
    // The io_uring submissions, and the one keyctl(2) call no crate wraps.
    let allowed = ["storage/src/store/block/io.rs", "worker/src/sandbox/keyring.rs", "tests/tidy.rs"];
    let mut files = Vec::new();
    rust_files(root(), &mut files);
    for file in files {
        let rel = file.strip_prefix(root()).unwrap().to_str().unwrap().to_owned();
        if allowed.contains(&rel.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("unsafe ") && !text.contains("unsafe_code"),
            "{rel} uses unsafe code; only {allowed:?} may"
        );
    }
}

/// `Permit::internal` (Kiln's own work on a tenant, on no client's behalf)
/// appears only where no client request is handled: the scheduler's and
/// the log reader's adapters over this process's stores, benchmarks and
/// tests. A service handler gets its permits from the `Authorizer`.
#[test]
fn internal_permits_stay_out_of_handlers() {
    let allowed = [
        "proto/src/access/permit.rs",
        "src/execution.rs",
        "src/serve.rs",
        "src/store_bench.rs",
        "src/exec_bench.rs",
        "benches/hot_paths.rs",
        "scheduler/src/core_tests.rs",
        "tests/tidy.rs",
    ];
    let mut files = Vec::new();
    rust_files(root(), &mut files);
    for file in files {
        let rel = file.strip_prefix(root()).unwrap().to_str().unwrap().to_owned();
        if allowed.contains(&rel.as_str()) || rel.starts_with("tests/") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains("Permit as "), "{rel} renames Permit, which hides its uses from this test");
        for (n, line) in text.lines().enumerate() {
            let internal = line.find("::internal(").is_some_and(|at| line[..at].contains("Permit"));
            assert!(!internal, "{rel}:{}: Permit::internal outside {allowed:?}", n + 1);
        }
    }
}

#[test]
fn crate_graph_keeps_its_layers() {
    let graph = crate_graph();
    let forbidden: [(&str, &[&str], &str); 5] = [
        (
            "kiln-proto",
            &["kiln-storage", "kiln-auth", "kiln-tools", "kiln-scheduler", "kiln-worker"],
            "shared types depend on nothing of Kiln's",
        ),
        (
            "kiln-storage",
            &["kiln-auth", "kiln-tools", "kiln-scheduler", "kiln-worker"],
            "services see access types only, never the auth machinery",
        ),
        (
            "kiln-tools",
            &["kiln-auth", "kiln-storage", "kiln-scheduler", "kiln-worker"],
            "tools talk gRPC only, never server internals",
        ),
        (
            "kiln-worker",
            &["kiln-scheduler", "kiln-storage", "kiln-auth"],
            "the worker speaks only the worker protocol",
        ),
        (
            "kiln-auth",
            &["kiln-storage", "kiln-tools", "kiln-scheduler", "kiln-worker"],
            "auth knows no service",
        ),
    ];
    for (krate, banned, why) in forbidden {
        let deps = graph.get(krate).unwrap_or_else(|| panic!("{krate} is not in the workspace"));
        for b in banned {
            assert!(!deps.contains(*b), "{krate} depends on {b}: {why}");
        }
    }
}

#[test]
fn bounds_live_with_the_limits() {
    let mut files = Vec::new();
    rust_files(root(), &mut files);
    for file in files {
        let rel = file.strip_prefix(root()).unwrap().to_str().unwrap().to_owned();
        // The on-disk format's field widths are the format, not limits.
        let exempt = ["proto/src/limits.rs", "storage/src/store/block/format.rs"];
        if exempt.contains(&rel.as_str()) || rel.starts_with("tests/") || rel.starts_with("benches/") {
            continue;
        }
        for (n, line) in std::fs::read_to_string(&file).unwrap().lines().enumerate() {
            let line = line.trim_start().trim_start_matches("pub ").trim_start_matches("pub(crate) ");
            let Some(rest) = line.strip_prefix("const ") else { continue };
            let name = rest.split(':').next().unwrap().trim();
            assert!(
                !name.ends_with("_MAX") && !name.ends_with("_LIMIT"),
                "{rel}:{}: bound {name} belongs in proto/src/limits.rs (configurable in Limits, or a documented constant)",
                n + 1
            );
        }
    }
}

#[test]
fn every_limit_is_in_the_example_config() {
    let limits = read("proto/src/limits.rs");
    let example = read("docs/kiln.example.toml");
    let body = &limits[limits.find("pub struct Limits {").unwrap()..];
    let body = &body[..body.find("\n}").unwrap()];
    for line in body.lines().skip(1) {
        let Some(field) = line.trim().strip_prefix("pub ") else { continue };
        let name = field.split(':').next().unwrap();
        assert!(example.contains(&format!("{name} = ")), "docs/kiln.example.toml lacks [limits] {name}");
    }
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

/// Every named invariant in ARCHITECTURE.md says how it is kept: by tests
/// it names (which must exist) or by review.
#[test]
fn every_invariant_names_its_check() {
    let architecture = read("ARCHITECTURE.md");
    let section = architecture.split("## Invariants").nth(1).expect("an Invariants section");
    let section = section.split("\n## ").next().unwrap();
    let mut tests = BTreeSet::new();
    let mut files = Vec::new();
    rust_files(root(), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let attribute = line.trim_start();
            if (attribute.starts_with("#[test]") || attribute.starts_with("#[tokio::test"))
                && let Some(f) = lines[i + 1..].iter().find(|l| l.contains("fn "))
            {
                let name = f.split("fn ").nth(1).unwrap().split('(').next().unwrap().trim();
                tests.insert(name.to_owned());
            }
        }
    }
    let bullets: Vec<&str> = section.split("\n- ").skip(1).collect();
    assert!(bullets.len() >= 8, "ARCHITECTURE.md lists {} invariants", bullets.len());
    for bullet in bullets {
        let title = bullet.lines().next().unwrap();
        let flat = bullet.split_whitespace().collect::<Vec<_>>().join(" ");
        let check = flat.split("Checked by:").nth(1).or_else(|| flat.split("Checked by (").nth(1));
        let Some(check) = check else {
            assert!(
                bullet.contains("Rests on review"),
                "invariant {title:?} names no check (\"Checked by: `test`\" or \"Rests on review\")"
            );
            continue;
        };
        let named: Vec<&str> = check.split('`').skip(1).step_by(2).collect();
        assert!(!named.is_empty(), "invariant {title:?} names no test");
        for name in named {
            assert!(tests.contains(name), "invariant {title:?} names test `{name}`, which does not exist");
        }
    }
}

#[test]
fn readme_test_command_is_what_ci_runs() {
    let readme = read("README.md");
    let ci = read(".ci/run");
    assert!(readme.contains("./scripts/test"), "README.md must give the test command");
    assert!(ci.contains("scripts/test"), ".ci/run must run README.md's test command");
}

/// Metric names README's table documents, with its `_rest` shorthands
/// expanded against the full names on the same row.
fn documented_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for row in read("README.md").lines().filter(|l| l.starts_with("| `kiln_")) {
        let first_cell = row.split('|').nth(1).unwrap();
        let ticked: Vec<&str> = first_cell.split('`').skip(1).step_by(2).collect();
        let full: Vec<&str> = ticked.iter().copied().filter(|t| t.starts_with("kiln_")).collect();
        names.extend(full.iter().map(|f| (*f).to_owned()));
        for short in ticked.iter().filter(|t| t.starts_with('_')) {
            for f in &full {
                for (i, _) in f.match_indices('_') {
                    names.insert(format!("{}{short}", &f[..i]));
                }
            }
        }
    }
    names
}

#[test]
fn the_dashboard_and_alerts_use_documented_metrics() {
    let documented = documented_metrics();
    for (file, least) in [("docs/grafana/kiln.json", 20), ("docs/prometheus/alerts.yml", 10)] {
        let text = read(file);
        let mut used = BTreeSet::new();
        for (i, _) in text.match_indices("kiln_") {
            let name: String =
                text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            used.insert(name.strip_suffix("_bucket").map_or(name.clone(), str::to_owned));
        }
        assert!(used.len() >= least, "{file}: {used:?}");
        let unknown: Vec<&String> = used.iter().filter(|n| !documented.contains(*n)).collect();
        assert!(unknown.is_empty(), "{file} uses metrics README does not document: {unknown:?}");
    }
}
