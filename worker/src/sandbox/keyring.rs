//! A fresh session keyring for each run: without it an action would hold
//! the worker's session keyring (what systemd gives every service) and
//! whatever keys an earlier action added to it.
//!
//! The one `unsafe` outside the storage engine: no maintained crate wraps
//! `KEYCTL_JOIN_SESSION_KEYRING`, and the call takes no pointer but NULL.

use nix::libc;

/// Subscribes the calling process to a new, empty, anonymous session
/// keyring; its children inherit it.
pub(super) fn join_fresh_session() -> Result<(), String> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: keyctl(2) with a NULL description reads no memory of this
    // process; it only replaces the calling process's session keyring.
    #[allow(unsafe_code)]
    let id = unsafe {
        libc::syscall(libc::SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, std::ptr::null::<libc::c_char>())
    };
    if id < 0 {
        let error = std::io::Error::last_os_error();
        // A kernel without keyrings has none to share.
        if error.raw_os_error() == Some(libc::ENOSYS) {
            return Ok(());
        }
        return Err(format!("cannot give the sandbox a session keyring of its own: {}", error));
    }
    Ok(())
}
