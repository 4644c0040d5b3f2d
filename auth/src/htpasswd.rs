//! Basic authentication against an htpasswd file (bcrypt and apr1 hashes),
//! reloaded when the file changes.
//!
//! Bazel sends its credentials with every call, and one bcrypt check costs
//! tens of milliseconds, so a successful check is remembered, keyed by the
//! user and a keyed hash of the password (never the password itself), until
//! the file changes. Hashes are computed on the blocking pool, at most
//! `password_hashes_in_flight_max` at once, so they never stall the async
//! threads. An unknown user costs what a known one costs: the same hash is
//! computed against a stand-in entry.
//!
//! The file must parse as a whole: a malformed, truncated or unsupported
//! entry refuses the file, and a reload keeps the last good users (see
//! [`crate::reload`]).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use kiln_proto::text::quoted;
use kiln_proto::{Error, Result};
use lru::LruCache;
use md5::{Digest as _, Md5};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::reload::{FileWatch, read_nonempty};

const BCRYPT_ALPHABET: &[u8] = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// One user's stored hash.
#[derive(Debug, Clone)]
enum Hash {
    Bcrypt(String),
    /// The salt (1 to 8 bytes) and the whole `$apr1$salt$hash` string.
    Apr1 {
        salt: Vec<u8>,
        full: String,
    },
}

fn parse_hash(hash: &str) -> std::result::Result<Hash, &'static str> {
    if let Some(rest) = hash.strip_prefix("$apr1$") {
        let (salt, digest) = rest.split_once('$').ok_or("apr1 hash without a salt")?;
        if salt.is_empty()
            || salt.len() > 8
            || digest.len() != 22
            || !digest.bytes().all(|b| ITOA64.contains(&b))
        {
            return Err("malformed or truncated apr1 hash");
        }
        return Ok(Hash::Apr1 { salt: salt.as_bytes().to_vec(), full: hash.to_owned() });
    }
    let bcrypt = ["$2a$", "$2b$", "$2y$", "$2x$"].iter().any(|p| hash.starts_with(p));
    if bcrypt {
        let b = hash.as_bytes();
        let cost_ok = b.len() == 60 && b[4].is_ascii_digit() && b[5].is_ascii_digit() && b[6] == b'$';
        if !cost_ok || !b[7..].iter().all(|c| BCRYPT_ALPHABET.contains(c)) {
            return Err("malformed or truncated bcrypt hash");
        }
        return Ok(Hash::Bcrypt(hash.to_owned()));
    }
    Err("unsupported hash (use htpasswd -B for bcrypt or -m for apr1)")
}

/// Users and their hashes, plus the remembered successful checks (dropped
/// with this value when the file changes).
#[derive(Debug)]
struct Users {
    hashes: HashMap<String, Hash>,
    /// What an unknown user is checked against: the costliest kind of entry
    /// in the file.
    stand_in: Hash,
    verified: Mutex<LruCache<[u8; 32], ()>>,
}

fn parse(text: &str, cache_entries_max: NonZeroUsize) -> std::result::Result<Users, String> {
    let mut hashes = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line.split_once(':').ok_or_else(|| format!("line {n} has no ':'"))?;
        if user.is_empty() || user.len() > kiln_proto::limits::PRINCIPAL_LENGTH_MAX {
            return Err(format!("line {n}: the user name must be 1 to 256 bytes"));
        }
        let hash = parse_hash(hash).map_err(|e| format!("line {n} (user {}): {e}", quoted(user)))?;
        if hashes.insert(user.to_owned(), hash).is_some() {
            return Err(format!("line {n}: user {} appears twice", quoted(user)));
        }
    }
    if hashes.is_empty() {
        return Err("no users".into());
    }
    let bcrypt_cost = hashes
        .values()
        .filter_map(|h| match h {
            Hash::Bcrypt(s) => s.get(4..6).and_then(|c| c.parse::<u32>().ok()),
            Hash::Apr1 { .. } => None,
        })
        .max();
    let stand_in = match bcrypt_cost {
        // A well-formed hash nobody's password matches, at the file's cost.
        Some(cost) => Hash::Bcrypt(format!("$2b${cost:02}${}", "K".repeat(53))),
        None => Hash::Apr1 { salt: b"kilnsalt".to_vec(), full: String::new() },
    };
    Ok(Users { hashes, stand_in, verified: Mutex::new(LruCache::new(cache_entries_max)) })
}

/// An htpasswd file, reloaded on change.
#[derive(Debug)]
pub struct Htpasswd {
    path: PathBuf,
    users: ArcSwap<Users>,
    watch: Mutex<FileWatch>,
    hashing: Semaphore,
    /// Keys the remembered checks, so they say nothing about passwords
    /// outside this process.
    cache_key: [u8; 32],
    cache_entries_max: NonZeroUsize,
    /// Hashes computed, and the most ever computed at once.
    hashes_computed: AtomicU64,
    hashing_now: Arc<AtomicU64>,
    hashing_peak: Arc<AtomicU64>,
}

impl Htpasswd {
    /// Loads the file; it must exist and parse at start-up.
    pub fn load(path: &Path, hashes_in_flight_max: usize, cache_entries_max: usize) -> Result<Arc<Self>> {
        let watch = FileWatch::new(vec![path.to_owned()]);
        let cache_entries_max = NonZeroUsize::new(cache_entries_max).unwrap_or(NonZeroUsize::MIN);
        let users = Self::read(path, cache_entries_max)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            users: ArcSwap::from_pointee(users),
            watch: Mutex::new(watch),
            hashing: Semaphore::new(hashes_in_flight_max.max(1)),
            cache_key: rand::random(),
            cache_entries_max,
            hashes_computed: AtomicU64::new(0),
            hashing_now: Arc::new(AtomicU64::new(0)),
            hashing_peak: Arc::new(AtomicU64::new(0)),
        }))
    }

    fn read(path: &Path, cache_entries_max: NonZeroUsize) -> Result<Users> {
        let data = read_nonempty(path, "htpasswd file")?;
        let text = String::from_utf8(data)
            .map_err(|_| Error::invalid_argument(format!("htpasswd file {} is not UTF-8", path.display())))?;
        parse(&text, cache_entries_max)
            .map_err(|e| Error::invalid_argument(format!("htpasswd file {}: {e}", path.display())))
    }

    /// Re-reads the file once a change has settled; a file that is missing,
    /// empty or does not parse keeps the previous users.
    pub fn reload_if_changed(&self) {
        if !self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).settled_change() {
            return;
        }
        match Self::read(&self.path, self.cache_entries_max) {
            Ok(users) => {
                tracing::info!(file = %self.path.display(), users = users.hashes.len(), "htpasswd reloaded");
                self.users.store(Arc::new(users));
            }
            Err(e) => {
                tracing::error!(error = %e, "htpasswd file changed but does not load; keeping the last good users")
            }
        }
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Whether `password` is right for `user`.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let users = self.users.load_full();
        let key = self.cache_key(user, password);
        if users.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key).is_some() {
            return true;
        }
        let (hash, known) = match users.hashes.get(user) {
            Some(h) => (h.clone(), true),
            None => (users.stand_in.clone(), false),
        };
        let Ok(_permit) = self.hashing.acquire().await else { return false };
        self.hashes_computed.fetch_add(1, Ordering::Relaxed);
        let password = password.to_owned();
        let (now, peak) = (self.hashing_now.clone(), self.hashing_peak.clone());
        let matched = tokio::task::spawn_blocking(move || {
            let running = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(running, Ordering::SeqCst);
            let matched = check(&hash, &password);
            now.fetch_sub(1, Ordering::SeqCst);
            matched
        })
        .await
        .unwrap_or(false);
        if matched && known {
            users.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner).put(key, ());
        }
        matched && known
    }
}

fn check(hash: &Hash, password: &str) -> bool {
    match hash {
        Hash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
        Hash::Apr1 { salt, full } => apr1(password.as_bytes(), salt).as_bytes().ct_eq(full.as_bytes()).into(),
    }
}

const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Apache's MD5-based `$apr1$` crypt; the salt is its first 8 bytes.
pub fn apr1(password: &[u8], salt: &[u8]) -> String {
    const MAGIC: &str = "$apr1$";
    let pw = password;
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
    let mut out = format!("{MAGIC}{}$", String::from_utf8_lossy(salt));
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

    const BOB: &str = "bob:$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/";

    #[test]
    fn apr1_matches_openssl() {
        // `openssl passwd -apr1 -salt abcdefgh secret` and a long password.
        assert_eq!(apr1(b"secret", b"abcdefgh"), "$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/");
        assert_eq!(apr1(b"p@ss word longer than sixteen chars", b"x1"), "$apr1$x1$pl5ZsDgasFNUQx7o1ea8j/");
    }

    #[test]
    fn multibyte_salts_do_not_panic() {
        // A salt whose 8th byte falls inside a character.
        let salt = "abcdefgé".as_bytes();
        let _ = apr1(b"pw", salt);
        let users = parse("u:$apr1$abcdefgé$h9FWgUz3n9YxylKLlR5SQ/\n", NonZeroUsize::MIN);
        assert!(users.is_err(), "salts are at most 8 bytes");
        let users = parse("u:$apr1$abcé$h9FWgUz3n9YxylKLlR5SQ/\n", NonZeroUsize::MIN).unwrap();
        assert!(!check(&users.hashes["u"], "pw"));
    }

    #[tokio::test]
    async fn verifies_bcrypt_and_apr1_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let bcrypt_hash = bcrypt::hash("hunter2", 4).unwrap();
        std::fs::write(&path, format!("alice:{bcrypt_hash}\n{BOB}\n")).unwrap();
        let file = Htpasswd::load(&path, 2, 100).unwrap();
        assert!(file.verify("alice", "hunter2").await);
        assert!(file.verify("alice", "hunter2").await, "remembered");
        assert!(!file.verify("alice", "hunter3").await);
        assert!(file.verify("bob", "secret").await);
        assert!(!file.verify("bob", "Secret").await);
        assert!(!file.verify("nobody", "secret").await);
        std::fs::write(&path, "bob:$apr1$x1$pl5ZsDgasFNUQx7o1ea8j/\n").unwrap();
        file.reload_if_changed();
        file.reload_if_changed();
        assert!(!file.verify("alice", "hunter2").await, "removed users are gone, remembered checks too");
        assert!(file.verify("bob", "p@ss word longer than sixteen chars").await);
    }

    fn bcrypt_file(users: &[(&str, &str)], cost: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let text: String =
            users.iter().map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, cost).unwrap())).collect();
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn slow_hashes_run_off_the_async_threads() {
        let (_dir, path) = bcrypt_file(&[("alice", "pw")], 10);
        let file = Htpasswd::load(&path, 1, 10).unwrap();
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    ticks.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
            }
        });
        assert!(file.verify("alice", "pw").await);
        // On one thread, the ticker ran while bcrypt did: it was elsewhere.
        assert!(ticks.load(Ordering::SeqCst) > 10, "the async thread was blocked by bcrypt");
        ticker.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hashing_is_bounded_and_unknown_users_cost_a_hash() {
        let (_dir, path) = bcrypt_file(&[("alice", "pw")], 6);
        let file = Htpasswd::load(&path, 2, 10).unwrap();
        let tries: Vec<_> = (0..12)
            .map(|i| {
                let file = file.clone();
                tokio::spawn(async move {
                    file.verify(if i % 2 == 0 { "mallory" } else { "alice" }, "wrong").await
                })
            })
            .collect();
        for t in tries {
            assert!(!t.await.unwrap());
        }
        assert_eq!(file.hashes_computed.load(Ordering::SeqCst), 12, "every check, known user or not, hashed");
        assert!(file.hashing_peak.load(Ordering::SeqCst) <= 2, "more hashes at once than allowed");
        // A success is remembered; failures are not.
        assert!(file.verify("alice", "pw").await);
        assert!(file.verify("alice", "pw").await);
        assert_eq!(file.hashes_computed.load(Ordering::SeqCst), 13);
    }

    #[test]
    fn malformed_files_are_refused_whole() {
        let cases = [
            ("", "no users"),
            ("alice\n", "no ':'"),
            ("carol:{SHA}x\n", "unsupported"),
            ("dave:$2b$04$abc\n", "truncated bcrypt"),
            ("erin:$apr1$abcdefgh$h9FWgUz3\n", "truncated apr1"),
            (&format!("{BOB}\n{BOB}\n"), "twice"),
        ];
        for (text, needle) in cases {
            let err = parse(text, NonZeroUsize::MIN).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[tokio::test]
    async fn bad_reloads_keep_the_last_good_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, format!("{BOB}\n")).unwrap();
        let file = Htpasswd::load(&path, 1, 10).unwrap();
        for bad in ["", "bob:$apr1$abcdefgh$h9FW", "garbage"] {
            std::fs::write(&path, bad).unwrap();
            file.reload_if_changed();
            file.reload_if_changed();
            assert!(file.verify("bob", "secret").await, "after {bad:?}");
        }
        std::fs::remove_file(&path).unwrap();
        file.reload_if_changed();
        file.reload_if_changed();
        assert!(file.verify("bob", "secret").await, "after deletion");
        assert!(Htpasswd::load(&path, 1, 10).is_err(), "a missing file is refused at start-up");
    }
}
