//! Basic authentication against an htpasswd file (bcrypt and apr1 hashes),
//! reloaded when the file changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use md5::{Digest as _, Md5};
use subtle::ConstantTimeEq;

use crate::reload::FileWatch;

/// Users and their password hashes.
#[derive(Debug, Default)]
struct Users {
    hashes: HashMap<String, String>,
}

/// An htpasswd file, reloaded on change.
#[derive(Debug)]
pub struct Htpasswd {
    path: PathBuf,
    users: ArcSwap<Users>,
    watch: Mutex<FileWatch>,
}

fn parse(text: &str, path: &Path) -> Users {
    let mut hashes = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            tracing::warn!(file = %path.display(), line = n + 1, "htpasswd line without ':' ignored");
            continue;
        };
        if !(hash.starts_with("$2") || hash.starts_with("$apr1$")) {
            tracing::warn!(file = %path.display(), user, "htpasswd entry ignored: only bcrypt and apr1 hashes are accepted");
            continue;
        }
        hashes.insert(user.to_owned(), hash.to_owned());
    }
    Users { hashes }
}

impl Htpasswd {
    /// Loads the file; it must exist and be readable at start-up.
    pub fn load(path: &Path) -> std::io::Result<Arc<Self>> {
        let watch = FileWatch::new(vec![path.to_owned()]);
        let text = std::fs::read_to_string(path)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            users: ArcSwap::from_pointee(parse(&text, path)),
            watch: Mutex::new(watch),
        }))
    }

    /// Re-reads the file if it changed. A file that cannot be read keeps the
    /// previous users (a rotation in progress must not lock everyone out).
    pub fn reload_if_changed(&self) {
        let changed = self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).changed();
        if !changed {
            return;
        }
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let users = parse(&text, &self.path);
                tracing::info!(file = %self.path.display(), users = users.hashes.len(), "htpasswd reloaded");
                self.users.store(Arc::new(users));
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "htpasswd unreadable; keeping the previous users")
            }
        }
    }

    /// Whether `password` is right for `user`.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let users = self.users.load();
        let Some(hash) = users.hashes.get(user) else {
            // Spend comparable time on unknown users.
            let _ = apr1(password, "kilnsalt");
            return false;
        };
        if let Some(rest) = hash.strip_prefix("$apr1$") {
            let Some((salt, _)) = rest.split_once('$') else { return false };
            return apr1(password, salt).as_bytes().ct_eq(hash.as_bytes()).into();
        }
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Apache's MD5-based `$apr1$` crypt.
pub fn apr1(password: &str, salt: &str) -> String {
    const MAGIC: &str = "$apr1$";
    let pw = password.as_bytes();
    let salt = &salt[..salt.len().min(8)];
    let alternate = Md5::new().chain_update(pw).chain_update(salt).chain_update(pw).finalize();
    let mut ctx = Md5::new().chain_update(pw).chain_update(MAGIC).chain_update(salt);
    let mut left = pw.len();
    while left > 0 {
        let n = left.min(16);
        ctx.update(&alternate[..n]);
        left -= n;
    }
    let mut i = pw.len();
    while i > 0 {
        if i & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(&pw[..1]);
        }
        i >>= 1;
    }
    let mut fin = ctx.finalize();
    for round in 0..1000 {
        let mut c = Md5::new();
        if round & 1 == 1 {
            c.update(pw);
        } else {
            c.update(fin);
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(pw);
        }
        if round & 1 == 1 {
            c.update(fin);
        } else {
            c.update(pw);
        }
        fin = c.finalize();
    }
    let mut out = format!("{MAGIC}{salt}$");
    let mut push = |value: u32, chars: usize| {
        let mut v = value;
        for _ in 0..chars {
            out.push(ITOA64[(v & 0x3f) as usize] as char);
            v >>= 6;
        }
    };
    let f = |i: usize| u32::from(fin[i]);
    for (a, b, c) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        push((f(a) << 16) | (f(b) << 8) | f(c), 4);
    }
    push(f(11), 2);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apr1_matches_openssl() {
        // `openssl passwd -apr1 -salt abcdefgh secret` and a long password.
        assert_eq!(apr1("secret", "abcdefgh"), "$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/");
        assert_eq!(apr1("p@ss word longer than sixteen chars", "x1"), "$apr1$x1$pl5ZsDgasFNUQx7o1ea8j/");
    }

    #[test]
    fn verifies_bcrypt_and_apr1_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let bcrypt_hash = bcrypt::hash("hunter2", 4).unwrap();
        std::fs::write(
            &path,
            format!("alice:{bcrypt_hash}\nbob:$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/\ncarol:{{SHA}}x\n"),
        )
        .unwrap();
        let file = Htpasswd::load(&path).unwrap();
        assert!(file.verify("alice", "hunter2"));
        assert!(!file.verify("alice", "hunter3"));
        assert!(file.verify("bob", "secret"));
        assert!(!file.verify("bob", "Secret"));
        assert!(!file.verify("carol", "x"), "unsupported hashes are refused");
        assert!(!file.verify("nobody", "secret"));
        std::fs::write(&path, "bob:$apr1$x1$pl5ZsDgasFNUQx7o1ea8j/\n").unwrap();
        file.reload_if_changed();
        assert!(!file.verify("alice", "hunter2"), "removed users are gone after reload");
        assert!(file.verify("bob", "p@ss word longer than sixteen chars"));
    }
}
