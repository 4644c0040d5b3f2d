//! Checks on a [`Spec`] and a [`SandboxConfig`] before anything is built.

use std::path::{Component, Path};

use super::limits::{
    CPU_PERIOD_US, SANDBOX_CPU_MILLICORES_MIN, SANDBOX_ID_BYTES_MAX, WORKING_DIRECTORY_BYTES_MAX,
};
use super::{SandboxConfig, SandboxError, Spec};

fn invalid(message: String) -> SandboxError {
    SandboxError::Invalid(message)
}

/// Checks everything about `spec` that can be checked without the host.
pub(super) fn validate(spec: &Spec) -> Result<(), SandboxError> {
    validate_id(&spec.id)?;
    if !spec.exec_root.is_absolute() {
        return Err(invalid(format!("exec root {} is not an absolute path", spec.exec_root.display())));
    }
    validate_working_directory(&spec.working_directory)?;
    let Some(program) = spec.arguments.first() else {
        return Err(invalid("the command has no arguments: arguments[0] names the program".to_owned()));
    };
    if program.is_empty() {
        return Err(invalid("arguments[0] (the program) is empty".to_owned()));
    }
    if let Some(i) = spec.arguments.iter().position(|a| a.contains('\0')) {
        return Err(invalid(format!("arguments[{i}] contains a NUL byte")));
    }
    for (name, value) in &spec.environment {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(invalid(format!("environment variable name {name:?} is empty or holds '=' or NUL")));
        }
        if value.contains('\0') {
            return Err(invalid(format!("environment variable {name} holds a NUL byte")));
        }
    }
    if spec.timeout.is_zero() {
        return Err(invalid("the timeout is zero".to_owned()));
    }
    if spec.memory_bytes == Some(0) {
        return Err(invalid("the memory limit is zero".to_owned()));
    }
    if spec.pids_max == Some(0) {
        return Err(invalid("the process limit is zero".to_owned()));
    }
    if let Some(millicores) = spec.cpu_millicores {
        if millicores < SANDBOX_CPU_MILLICORES_MIN {
            return Err(invalid(format!(
                "the CPU limit is {millicores} millicores; the smallest is {SANDBOX_CPU_MILLICORES_MIN}"
            )));
        }
        if millicores.checked_mul(CPU_PERIOD_US).is_none() {
            return Err(invalid(format!("the CPU limit of {millicores} millicores is too large")));
        }
    }
    Ok(())
}

fn validate_id(id: &str) -> Result<(), SandboxError> {
    if id.is_empty() || id.len() > SANDBOX_ID_BYTES_MAX {
        return Err(invalid(format!("sandbox id {id:?} must be 1 to {SANDBOX_ID_BYTES_MAX} bytes")));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(invalid(format!("sandbox id {id:?} may only hold A-Z, a-z, 0-9, '_' and '-'")));
    }
    Ok(())
}

fn validate_working_directory(dir: &str) -> Result<(), SandboxError> {
    if dir.len() > WORKING_DIRECTORY_BYTES_MAX || dir.contains('\0') {
        return Err(invalid(format!(
            "working directory is longer than {WORKING_DIRECTORY_BYTES_MAX} bytes or holds NUL"
        )));
    }
    for component in Path::new(dir).components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(format!(
                    "working directory {dir:?} is absolute; it must be relative to the exec root"
                )));
            }
            Component::ParentDir => {
                return Err(invalid(format!("working directory {dir:?} holds '..'")));
            }
        }
    }
    Ok(())
}

/// Checks `config` as far as it can be checked without building a sandbox.
pub(super) fn validate_config(config: &SandboxConfig) -> Result<(), SandboxError> {
    let own_uid = nix::unistd::geteuid().as_raw();
    let own_gid = nix::unistd::getegid().as_raw();
    if config.uid == 0 || config.uid == own_uid {
        return Err(invalid(format!(
            "sandbox uid {} is root or the worker's own uid; use an unprivileged uid used by nothing else",
            config.uid
        )));
    }
    if config.gid == 0 || config.gid == own_gid {
        return Err(invalid(format!(
            "sandbox gid {} is root's or the worker's own group; use an unprivileged gid used by nothing else",
            config.gid
        )));
    }
    if !config.kiln_binary.is_file() {
        return Err(invalid(format!("kiln binary {} is not a file", config.kiln_binary.display())));
    }
    Ok(())
}

/// An absolute path without `.`, `..` or a trailing root: what a host
/// directory and a mount point inside the sandbox must be.
pub(super) fn is_plain_absolute(path: &Path) -> bool {
    let mut components = path.components();
    components.next() == Some(Component::RootDir)
        && path.components().count() > 1
        && components.all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn spec() -> Spec {
        Spec {
            id: "run-1_a".to_owned(),
            exec_root: PathBuf::from("/var/kiln/exec/1"),
            working_directory: "pkg/sub".to_owned(),
            arguments: vec!["sh".to_owned(), "-c".to_owned(), "true".to_owned()],
            environment: vec![("PATH".to_owned(), "/bin".to_owned())],
            stdout: PathBuf::from("/var/kiln/out/1"),
            stderr: PathBuf::from("/var/kiln/err/1"),
            timeout: Duration::from_secs(1),
            kill_grace: Duration::from_secs(1),
            memory_bytes: Some(1 << 20),
            pids_max: Some(4),
            cpu_millicores: Some(1000),
            network: false,
        }
    }

    #[test]
    fn a_plain_spec_is_valid() {
        validate(&spec()).unwrap();
        validate(&Spec { working_directory: String::new(), ..spec() }).unwrap();
        validate(&Spec { working_directory: "./a/./b".to_owned(), ..spec() }).unwrap();
    }

    #[test]
    fn ids_are_bounded_names() {
        for bad in ["", "a/b", "..", "a b", "ü", &"x".repeat(SANDBOX_ID_BYTES_MAX + 1)] {
            let err = validate(&Spec { id: bad.to_owned(), ..spec() }).unwrap_err();
            assert!(matches!(err, SandboxError::Invalid(_)), "{bad:?}: {err}");
        }
        validate(&Spec { id: "x".repeat(SANDBOX_ID_BYTES_MAX), ..spec() }).unwrap();
    }

    #[test]
    fn working_directory_stays_inside_the_exec_root() {
        for bad in ["/etc", "..", "a/../../b", "a/..", "a\0b"] {
            let err = validate(&Spec { working_directory: bad.to_owned(), ..spec() }).unwrap_err();
            assert!(err.to_string().contains("working directory"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn commands_and_limits_are_checked() {
        assert!(validate(&Spec { arguments: vec![], ..spec() }).is_err());
        assert!(validate(&Spec { arguments: vec![String::new()], ..spec() }).is_err());
        assert!(validate(&Spec { arguments: vec!["a\0".to_owned()], ..spec() }).is_err());
        assert!(validate(&Spec { environment: vec![("A=B".to_owned(), String::new())], ..spec() }).is_err());
        assert!(validate(&Spec { environment: vec![(String::new(), String::new())], ..spec() }).is_err());
        assert!(validate(&Spec { exec_root: PathBuf::from("rel"), ..spec() }).is_err());
        assert!(validate(&Spec { timeout: Duration::ZERO, ..spec() }).is_err());
        assert!(validate(&Spec { memory_bytes: Some(0), ..spec() }).is_err());
        assert!(validate(&Spec { pids_max: Some(0), ..spec() }).is_err());
        assert!(validate(&Spec { cpu_millicores: Some(SANDBOX_CPU_MILLICORES_MIN - 1), ..spec() }).is_err());
        assert!(validate(&Spec { cpu_millicores: Some(u64::MAX), ..spec() }).is_err());
    }

    #[test]
    fn plain_absolute_paths() {
        assert!(is_plain_absolute(Path::new("/usr")));
        assert!(is_plain_absolute(Path::new("/etc/ld.so.conf.d")));
        for bad in ["/", "usr", "/usr/../etc", "./usr", ""] {
            assert!(!is_plain_absolute(Path::new(bad)), "{bad}");
        }
    }
}
