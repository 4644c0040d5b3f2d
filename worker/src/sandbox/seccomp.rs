//! The action's system call filter: what no build step needs and what
//! widens the kernel's attack surface, in the spirit of Docker's default
//! profile. Init installs it last, after `no_new_privs`, so it binds the
//! action and everything the action starts; a denied call fails with
//! `EPERM`. A process of another architecture than the worker's (a 32-bit
//! x86 binary on x86-64) is killed: its call numbers are not the ones the
//! filter names.

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// The denied calls, by family, as the README's sandbox section lists
/// them.
pub const DENIED_SYSCALLS: &[(&str, &[(&str, i64)])] = &[
    (
        "keyring",
        &[
            ("keyctl", libc::SYS_keyctl),
            ("add_key", libc::SYS_add_key),
            ("request_key", libc::SYS_request_key),
        ],
    ),
    ("bpf", &[("bpf", libc::SYS_bpf)]),
    ("perf", &[("perf_event_open", libc::SYS_perf_event_open)]),
    ("userfaultfd", &[("userfaultfd", libc::SYS_userfaultfd)]),
    ("kexec", &[("kexec_load", libc::SYS_kexec_load), ("kexec_file_load", libc::SYS_kexec_file_load)]),
    ("file handles", &[("open_by_handle_at", libc::SYS_open_by_handle_at)]),
    (
        "mounts",
        &[
            ("mount", libc::SYS_mount),
            ("umount2", libc::SYS_umount2),
            ("pivot_root", libc::SYS_pivot_root),
            ("open_tree", libc::SYS_open_tree),
            ("move_mount", libc::SYS_move_mount),
            ("fsopen", libc::SYS_fsopen),
            ("fsconfig", libc::SYS_fsconfig),
            ("fsmount", libc::SYS_fsmount),
            ("fspick", libc::SYS_fspick),
            ("mount_setattr", libc::SYS_mount_setattr),
        ],
    ),
    (
        "kernel modules",
        &[
            ("init_module", libc::SYS_init_module),
            ("finit_module", libc::SYS_finit_module),
            ("delete_module", libc::SYS_delete_module),
        ],
    ),
    (
        "io_uring",
        &[
            ("io_uring_setup", libc::SYS_io_uring_setup),
            ("io_uring_enter", libc::SYS_io_uring_enter),
            ("io_uring_register", libc::SYS_io_uring_register),
        ],
    ),
    (
        "host administration",
        &[
            ("reboot", libc::SYS_reboot),
            ("swapon", libc::SYS_swapon),
            ("swapoff", libc::SYS_swapoff),
            ("acct", libc::SYS_acct),
            ("settimeofday", libc::SYS_settimeofday),
            ("clock_settime", libc::SYS_clock_settime),
            ("clock_adjtime", libc::SYS_clock_adjtime),
            ("adjtimex", libc::SYS_adjtimex),
            ("syslog", libc::SYS_syslog),
            ("quotactl", libc::SYS_quotactl),
            ("quotactl_fd", libc::SYS_quotactl_fd),
            ("vhangup", libc::SYS_vhangup),
            ("lookup_dcookie", libc::SYS_lookup_dcookie),
        ],
    ),
];

/// x86-64's flag for x32 call numbers, which the same architecture tag
/// carries: each denied call is denied under that number too.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// The compiled filter for the worker's own architecture.
pub(super) fn program() -> Result<BpfProgram, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("no system call filter for {}: {e}", std::env::consts::ARCH))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, calls) in DENIED_SYSCALLS {
        for (_, nr) in *calls {
            rules.insert(*nr, Vec::new());
            #[cfg(target_arch = "x86_64")]
            rules.insert(*nr | X32_SYSCALL_BIT, Vec::new());
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        arch,
    )
    .map_err(|e| format!("cannot build the system call filter: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| format!("cannot compile the system call filter: {e}"))
}

/// Installs the filter on the calling thread; what it starts inherits it.
/// `no_new_privs` must be set.
pub(super) fn install(program: &BpfProgram) -> Result<(), String> {
    seccompiler::apply_filter(program).map_err(|e| format!("cannot install the system call filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_names_each_call_once() {
        let program = program().unwrap();
        assert!(!program.is_empty());
        let mut seen = std::collections::HashSet::new();
        for (_, calls) in DENIED_SYSCALLS {
            for (name, nr) in *calls {
                assert!(seen.insert(*nr), "{name} is listed twice");
            }
        }
    }
}
