//! Bearer tokens: format, hashed storage, expiry and revocation.
//!
//! A token looks like `kiln_` + 40 random alphanumerics + a 6-character
//! checksum (CRC-32 of the random part, base62), so secret scanners can
//! recognise it and typos are caught before any lookup. Kiln stores only the
//! SHA-256 of a token, in a JSON file shared by every node that serves the
//! same tenants. The node that handles a revocation applies it at once;
//! every other node notices the file change within two poll intervals (a
//! change is loaded once it has settled, see [`crate::reload`]). A token
//! file that goes missing, empty or corrupt keeps the last good tokens.
//!
//! A token authenticates as a token principal (`token:NAME`), whose
//! permissions are exactly its grant: configured rules never apply to it.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_proto::limits::PRINCIPAL_LENGTH_MAX;

use arc_swap::ArcSwap;
use kiln_proto::{Code, Error, Result};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use kiln_proto::access::{Grant, Permissions, Principal};

use crate::reload::{FileWatch, resolve, write_atomically};

pub const PREFIX: &str = "kiln_";
const RANDOM_LEN: usize = 40;
const CHECKSUM_LEN: usize = 6;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn checksum(random: &str) -> String {
    let mut v = crc32fast::hash(random.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(v % 62) as usize];
        v /= 62;
    }
    String::from_utf8(out.to_vec()).expect("ascii")
}

/// A new random token.
pub fn generate() -> String {
    let random: String = rand::rng().sample_iter(&Alphanumeric).take(RANDOM_LEN).map(char::from).collect();
    format!("{PREFIX}{random}{}", checksum(&random))
}

/// Checks a token's shape and checksum, without looking it up.
pub fn check_format(token: &str) -> Result<()> {
    let malformed = || {
        Error::new(Code::Unauthenticated, "malformed bearer token: expected kiln_ followed by 46 characters")
    };
    let body = token.strip_prefix(PREFIX).ok_or_else(malformed)?;
    if body.len() != RANDOM_LEN + CHECKSUM_LEN || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(malformed());
    }
    let (random, sum) = body.split_at(RANDOM_LEN);
    if checksum(random) != sum {
        return Err(Error::new(
            Code::Unauthenticated,
            "bearer token checksum mismatch: the token was mistyped or truncated",
        ));
    }
    Ok(())
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The public identifier of a token: a prefix of its hash.
fn id_of(token_hash: &[u8; 32]) -> String {
    hex::encode(&token_hash[..6])
}

/// The time tokens are checked against: the system clock, or a hand-set
/// one in tests.
pub trait Clock: std::fmt::Debug + Send + Sync + 'static {
    fn now_unix_seconds(&self) -> i64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_seconds(&self) -> i64 {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        i64::try_from(secs).unwrap_or(i64::MAX)
    }
}

/// Mode of a token file Kiln creates: it holds hashes only, but nobody else
/// needs to read it.
const TOKEN_FILE_MODE: u32 = 0o600;

/// One stored token (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    pub principal: String,
    pub tenant: String,
    pub permissions: Vec<String>,
    pub created_unix_seconds: i64,
    /// 0: never expires.
    pub expires_unix_seconds: i64,
    pub revoked: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    version: u32,
    tokens: Vec<TokenRecord>,
}

#[derive(Debug, Default)]
struct Index {
    /// Each record with the principal it authenticates as, built once per
    /// load so that a request only clones a reference.
    by_hash: HashMap<[u8; 32], (TokenRecord, Principal)>,
}

fn index(file: &TokenFile) -> Index {
    let mut by_hash = HashMap::new();
    for record in &file.tokens {
        let mut h = [0u8; 32];
        let Ok(perms) = Permissions::parse(&record.permissions) else {
            tracing::warn!(id = record.id, "token with unknown permissions ignored");
            continue;
        };
        if hex::decode_to_slice(&record.sha256, &mut h).is_ok() {
            let grant = Grant { tenant: record.tenant.clone(), permissions: perms };
            let principal = Principal::token(&record.principal, &record.id, grant);
            by_hash.insert(h, (record.clone(), principal));
        } else {
            tracing::warn!(id = record.id, "token with a malformed hash ignored");
        }
    }
    Index { by_hash }
}

/// The token file and an in-memory index of it.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    index: ArcSwap<Index>,
    watch: Mutex<FileWatch>,
    clock: Arc<dyn Clock>,
}

impl TokenStore {
    /// Opens the token file at `path`; a missing file is an empty store
    /// (created on the first write), an empty or corrupt one an error.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        Self::open_with_clock(path, Arc::new(SystemClock))
    }

    /// Like [`TokenStore::open`], checking expiry against `clock`.
    pub fn open_with_clock(path: &Path, clock: Arc<dyn Clock>) -> Result<Arc<Self>> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::internal(format!("create {}: {e}", dir.display())))?;
        }
        let watch = FileWatch::new(vec![path.to_owned()]);
        let file = read_file(path)?.unwrap_or_default();
        Ok(Arc::new(Self {
            path: path.to_owned(),
            index: ArcSwap::from_pointee(index(&file)),
            watch: Mutex::new(watch),
            clock,
        }))
    }

    /// Re-reads the file once another process's change has settled. A file
    /// that went missing, empty or corrupt keeps the last good tokens
    /// (deleting the file is not a way to revoke them: revoke each).
    pub fn reload_if_changed(&self) {
        if !self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).settled_change() {
            return;
        }
        match read_file(&self.path) {
            Ok(Some(file)) => {
                self.index.store(Arc::new(index(&file)));
                tracing::info!(file = %self.path.display(), tokens = file.tokens.len(), "token file reloaded");
            }
            Ok(None) => tracing::error!(
                file = %self.path.display(),
                "token file is missing; keeping the last good tokens (restore the file)"
            ),
            Err(e) => tracing::error!(error = %e, "token file does not load; keeping the last good tokens"),
        }
    }

    /// Authenticates a bearer token.
    pub fn authenticate(&self, token: &str) -> Result<Principal> {
        check_format(token)?;
        let h = hash(token);
        let index = self.index.load();
        let unknown = || Error::new(Code::Unauthenticated, "unknown bearer token");
        let (stored, (record, principal)) = index.by_hash.get_key_value(&h).ok_or_else(unknown)?;
        // The map found it by equality already; compare once more in
        // constant time so no timing path depends on secret-derived bytes.
        if !bool::from(stored.ct_eq(&h)) {
            return Err(unknown());
        }
        if record.revoked {
            return Err(Error::new(
                Code::Unauthenticated,
                format!("bearer token {} has been revoked", record.id),
            ));
        }
        if record.expires_unix_seconds != 0 && record.expires_unix_seconds <= self.clock.now_unix_seconds() {
            return Err(Error::new(Code::Unauthenticated, format!("bearer token {} has expired", record.id)));
        }
        Ok(principal.clone())
    }

    /// All records, newest last.
    pub fn list(&self) -> Vec<TokenRecord> {
        let mut all: Vec<TokenRecord> = self.index.load().by_hash.values().map(|(r, _)| r.clone()).collect();
        all.sort_by(|a, b| (a.created_unix_seconds, &a.id).cmp(&(b.created_unix_seconds, &b.id)));
        all
    }

    /// Creates a token; returns the secret (shown once) and its record.
    pub fn create(
        &self,
        principal: &str,
        tenant: &str,
        permissions: Permissions,
        ttl_seconds: i64,
    ) -> Result<(String, TokenRecord)> {
        if principal.is_empty() || principal.len() > PRINCIPAL_LENGTH_MAX {
            return Err(Error::invalid_argument(format!(
                "principal must be 1 to {PRINCIPAL_LENGTH_MAX} bytes"
            )));
        }
        if principal.chars().any(char::is_control) {
            return Err(Error::invalid_argument("principal must not contain control characters"));
        }
        if tenant != kiln_proto::access::ALL_TENANTS {
            kiln_proto::resource::validate_instance_name(tenant).map_err(|e| e.context("tenant"))?;
        }
        if permissions.is_empty() {
            return Err(Error::invalid_argument("a token needs at least one permission"));
        }
        if ttl_seconds < 0 {
            return Err(Error::invalid_argument("ttl must not be negative"));
        }
        let token = generate();
        let h = hash(&token);
        let created = self.clock.now_unix_seconds();
        let record = TokenRecord {
            id: id_of(&h),
            sha256: hex::encode(h),
            principal: principal.to_owned(),
            tenant: tenant.to_owned(),
            permissions: permissions.names(),
            created_unix_seconds: created,
            expires_unix_seconds: if ttl_seconds == 0 { 0 } else { created.saturating_add(ttl_seconds) },
            revoked: false,
        };
        let stored = record.clone();
        self.update(move |file| {
            file.tokens.push(stored);
            Ok(())
        })?;
        Ok((token, record))
    }

    /// Marks a token revoked; effective at once on this node.
    pub fn revoke(&self, id: &str) -> Result<TokenRecord> {
        let mut found = None;
        self.update(|file| {
            let record = file
                .tokens
                .iter_mut()
                .find(|r| r.id == id)
                .ok_or_else(|| Error::not_found(format!("no token with id {id:?}")))?;
            record.revoked = true;
            found = Some(record.clone());
            Ok(())
        })?;
        Ok(found.expect("set by the update"))
    }

    /// Creates a token with the same principal, tenant, permissions and
    /// lifetime as `id`, then revokes `id`.
    pub fn rotate(&self, id: &str) -> Result<(String, TokenRecord)> {
        let old = self.get(id).ok_or_else(|| Error::not_found(format!("no token with id {id:?}")))?;
        if old.revoked {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!("token {id} is revoked; create a new one instead"),
            ));
        }
        let permissions = Permissions::parse(&old.permissions)?;
        // The record comes from a file an operator may have edited: check
        // the arithmetic rather than trust it.
        let ttl = match old.expires_unix_seconds {
            0 => 0,
            expires => match expires.checked_sub(old.created_unix_seconds) {
                Some(ttl) if ttl > 0 => ttl,
                _ => {
                    return Err(Error::new(
                        Code::FailedPrecondition,
                        format!("token {id} expires before it was created; create a new one instead"),
                    ));
                }
            },
        };
        let created = self.create(&old.principal, &old.tenant, permissions, ttl)?;
        self.revoke(id)?;
        Ok(created)
    }

    pub fn get(&self, id: &str) -> Option<TokenRecord> {
        self.index.load().by_hash.values().find(|(r, _)| r.id == id).map(|(r, _)| r.clone())
    }

    /// Read-modify-write of the file under an exclusive lock, written
    /// atomically through any symlink, then the in-memory index.
    fn update(&self, change: impl FnOnce(&mut TokenFile) -> Result<()>) -> Result<()> {
        let target = resolve(&self.path)?;
        let io = |what: &str, e: std::io::Error| Error::internal(format!("{what} {}: {e}", target.display()));
        // Next to the real file, so that nodes sharing it through links agree.
        let lock_path = target.with_extension("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("create lock for", e))?;
        lock.lock().map_err(|e| io("lock", e))?;
        let mut file = match read_file(&target)? {
            Some(file) => file,
            // A token file that vanished while this node holds tokens is an
            // accident to repair, not a fresh start to write over.
            None if !self.index.load().by_hash.is_empty() => {
                return Err(Error::new(
                    Code::FailedPrecondition,
                    format!(
                        "token file {} is missing; restore it (this node keeps serving the tokens it loaded last)",
                        self.path.display()
                    ),
                ));
            }
            None => TokenFile::default(),
        };
        change(&mut file)?;
        file.version = 1;
        let text = serde_json::to_string_pretty(&file).map_err(|e| Error::internal(e.to_string()))?;
        write_atomically(&target, text.as_bytes(), TOKEN_FILE_MODE)?;
        self.index.store(Arc::new(index(&file)));
        // Our own write is not a change to reload.
        self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).mark_loaded();
        Ok(())
    }
}

/// The token file's content; `None` when it does not exist.
fn read_file(path: &Path) -> Result<Option<TokenFile>> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Err(Error::new(
            Code::FailedPrecondition,
            format!(
                "token file {} is empty; restore it, or delete it to start with no tokens",
                path.display()
            ),
        )),
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            Error::new(Code::FailedPrecondition, format!("token file {} is corrupt: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::internal(format!("read {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::access::Permission;

    #[test]
    fn format_and_checksum() {
        let t = generate();
        assert!(t.starts_with("kiln_") && t.len() == 51, "{t}");
        check_format(&t).unwrap();
        let mut typo = t.clone().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        let err = check_format(&String::from_utf8(typo).unwrap()).unwrap_err();
        assert!(err.message().contains("checksum"));
        assert!(check_format("kiln_short").is_err());
        assert!(check_format("ghp_abc").is_err());
        assert_ne!(generate(), generate());
    }

    /// A clock the test sets by hand.
    #[derive(Debug, Default)]
    struct HandClock(std::sync::atomic::AtomicI64);

    impl Clock for HandClock {
        fn now_unix_seconds(&self) -> i64 {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn settle(store: &TokenStore) {
        // A change is loaded once it has looked the same for a whole poll.
        store.reload_if_changed();
        store.reload_if_changed();
    }

    #[test]
    fn create_authenticate_revoke_expire() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(HandClock::default());
        clock.0.store(1_000_000, std::sync::atomic::Ordering::SeqCst);
        let path = dir.path().join("tokens.json");
        let store = TokenStore::open_with_clock(&path, clock.clone()).unwrap();
        let perms = Permissions::parse(["read"]).unwrap();
        let (token, record) = store.create("alice", "main.dev", perms, 0).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "the secret is never stored");
        let p = store.authenticate(&token).unwrap();
        assert_eq!(p.name(), "alice");
        assert_eq!(p.to_string(), "token:alice");
        assert_eq!(p.token_id(), Some(record.id.as_str()));
        assert!(p.grant().unwrap().permissions.contains(Permission::AcRead));

        // A second node sharing the file sees the revocation after reloading.
        let other = TokenStore::open(&path).unwrap();
        other.authenticate(&token).unwrap();
        store.revoke(&record.id).unwrap();
        let err = store.authenticate(&token).unwrap_err();
        assert!(err.message().contains("revoked"));
        assert!(!err.message().contains(&token), "messages never contain token material");
        settle(&other);
        assert_eq!(other.authenticate(&token).unwrap_err().code(), Code::Unauthenticated);

        let (short, _) = store.create("bob", "main", perms, 60).unwrap();
        store.authenticate(&short).unwrap();
        clock.0.store(1_000_059, std::sync::atomic::Ordering::SeqCst);
        store.authenticate(&short).unwrap();
        clock.0.store(1_000_060, std::sync::atomic::Ordering::SeqCst);
        assert!(store.authenticate(&short).unwrap_err().message().contains("expired"));

        assert_eq!(store.authenticate(&generate()).unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(store.revoke("nope").unwrap_err().code(), Code::NotFound);
        assert!(store.create("", "main", perms, 0).is_err());
        assert!(store.create("a\nb", "main", perms, 0).is_err());
        assert!(store.create("x", "main/blobs", perms, 0).is_err());
        assert_eq!(store.list().len(), 2);
    }

    #[test]
    fn missing_empty_or_corrupt_files_keep_the_last_good_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = TokenStore::open(&path).unwrap();
        let (token, _) = store.create("ci", "main", Permissions::parse(["read"]).unwrap(), 0).unwrap();
        let good = std::fs::read_to_string(&path).unwrap();
        for bad in [Some(""), Some("{\"version\": 1, \"tokens\": ["), None] {
            match bad {
                Some(text) => std::fs::write(&path, text).unwrap(),
                None => std::fs::remove_file(&path).unwrap(),
            }
            settle(&store);
            store.authenticate(&token).unwrap_or_else(|e| panic!("after {bad:?}: {e}"));
            // Writing over a missing or broken file is refused, not a fresh start.
            let err = store.create("x", "main", Permissions::parse(["read"]).unwrap(), 0).unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{bad:?}: {err}");
        }
        std::fs::write(&path, "").unwrap();
        assert!(TokenStore::open(&path).unwrap_err().message().contains("is empty"));
        std::fs::write(&path, &good).unwrap();
        TokenStore::open(&path).unwrap().authenticate(&token).unwrap();
    }

    #[test]
    fn a_symlinked_token_file_stays_a_symlink_with_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let real = shared.join("tokens.json");
        let link = dir.path().join("tokens.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let store = TokenStore::open(&link).unwrap();
        store.create("a", "main", Permissions::parse(["read"]).unwrap(), 0).unwrap();
        assert_eq!(
            std::fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o600,
            "new files are private"
        );
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
        let (token, _) = store.create("b", "main", Permissions::parse(["read"]).unwrap(), 0).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::metadata(&real).unwrap().permissions().mode() & 0o777, 0o640, "the mode is kept");
        // Another node reading through the link sees the new token.
        TokenStore::open(&real).unwrap().authenticate(&token).unwrap();
        let names: Vec<_> = std::fs::read_dir(&shared).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn rotation_checks_the_file_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = TokenStore::open(&path).unwrap();
        let (_, record) = store.create("ci", "main", Permissions::parse(["read"]).unwrap(), 3600).unwrap();
        let mut file: TokenFile = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        file.tokens[0].created_unix_seconds = i64::MIN;
        file.tokens[0].expires_unix_seconds = i64::MAX;
        std::fs::write(&path, serde_json::to_string(&file).unwrap()).unwrap();
        settle(&store);
        let err = store.rotate(&record.id).unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        file.tokens[0].created_unix_seconds = 100;
        file.tokens[0].expires_unix_seconds = 50;
        std::fs::write(&path, serde_json::to_string(&file).unwrap()).unwrap();
        settle(&store);
        assert_eq!(store.rotate(&record.id).unwrap_err().code(), Code::FailedPrecondition);
    }
}
