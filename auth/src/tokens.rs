//! Bearer tokens: format, hashed storage, expiry and revocation.
//!
//! A token looks like `kiln_` + 40 random alphanumerics + a 6-character
//! checksum (CRC-32 of the random part, base62), so secret scanners can
//! recognise it and typos are caught before any lookup. Kiln stores only the
//! SHA-256 of a token, in a JSON file shared by every node that serves the
//! same tenants. The node that handles a revocation applies it at once;
//! every other node notices the file change within its poll interval.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use kiln_proto::{Code, Error, Result};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::permission::Permissions;
use crate::principal::{AuthMethod, Grant, Principal};
use crate::reload::FileWatch;

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

fn now_unix() -> i64 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX)
}

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
            let principal = Principal::new(&record.principal, AuthMethod::Token, Some(grant));
            by_hash.insert(h, (record.clone(), principal));
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
}

impl TokenStore {
    /// Opens (or creates) the token file at `path`.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::internal(format!("create {}: {e}", dir.display())))?;
        }
        let watch = FileWatch::new(vec![path.to_owned()]);
        let file = read_file(path)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            index: ArcSwap::from_pointee(index(&file)),
            watch: Mutex::new(watch),
        }))
    }

    /// Re-reads the file if another process changed it.
    pub fn reload_if_changed(&self) {
        let changed = self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).changed();
        if changed {
            match read_file(&self.path) {
                Ok(file) => {
                    self.index.store(Arc::new(index(&file)));
                    tracing::info!(file = %self.path.display(), tokens = file.tokens.len(), "token file reloaded");
                }
                Err(e) => tracing::error!(error = %e, "token file unreadable; keeping the previous tokens"),
            }
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
        if record.expires_unix_seconds != 0 && record.expires_unix_seconds <= now_unix() {
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
        if principal.is_empty() || principal.len() > 256 {
            return Err(Error::invalid_argument("principal must be 1 to 256 characters"));
        }
        if tenant != crate::policy::ALL_TENANTS {
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
        let created = now_unix();
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
        let ttl = if old.expires_unix_seconds == 0 {
            0
        } else {
            old.expires_unix_seconds - old.created_unix_seconds
        };
        let created = self.create(&old.principal, &old.tenant, permissions, ttl)?;
        self.revoke(id)?;
        Ok(created)
    }

    pub fn get(&self, id: &str) -> Option<TokenRecord> {
        self.index.load().by_hash.values().find(|(r, _)| r.id == id).map(|(r, _)| r.clone())
    }

    /// Read-modify-write of the file under an exclusive lock, then an atomic
    /// rename, then the in-memory index.
    fn update(&self, change: impl FnOnce(&mut TokenFile) -> Result<()>) -> Result<()> {
        let io =
            |what: &str, e: std::io::Error| Error::internal(format!("{what} {}: {e}", self.path.display()));
        let lock_path = self.path.with_extension("lock");
        let lock = File::create(&lock_path).map_err(|e| io("create lock for", e))?;
        lock.lock().map_err(|e| io("lock", e))?;
        let mut file = read_file(&self.path)?;
        change(&mut file)?;
        file.version = 1;
        let tmp = self.path.with_extension("tmp");
        let text = serde_json::to_string_pretty(&file).map_err(|e| Error::internal(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(|e| io("write", e))?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io("sync", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("replace", e))?;
        self.index.store(Arc::new(index(&file)));
        // Our own write is not a change to reload.
        self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).changed();
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<TokenFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| Error::internal(format!("token file {} is corrupt: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
        Err(e) => Err(Error::internal(format!("read {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::permission::Permission;

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

    #[test]
    fn create_authenticate_revoke_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&dir.path().join("tokens.json")).unwrap();
        let perms = Permissions::parse(["read"]).unwrap();
        let (token, record) = store.create("alice", "main.dev", perms, 0).unwrap();
        let text = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
        assert!(!text.contains(&token), "the secret is never stored");
        let p = store.authenticate(&token).unwrap();
        assert_eq!(p.name(), "alice");
        assert!(p.grant().unwrap().permissions.contains(Permission::AcRead));

        // A second node sharing the file sees the revocation after reloading.
        let other = TokenStore::open(&dir.path().join("tokens.json")).unwrap();
        other.authenticate(&token).unwrap();
        store.revoke(&record.id).unwrap();
        let err = store.authenticate(&token).unwrap_err();
        assert!(err.message().contains("revoked"));
        assert!(!err.message().contains(&token), "messages never contain token material");
        other.reload_if_changed();
        assert_eq!(other.authenticate(&token).unwrap_err().code(), Code::Unauthenticated);

        let (short, _) = store.create("bob", "main", perms, 1).unwrap();
        store.authenticate(&short).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert!(store.authenticate(&short).unwrap_err().message().contains("expired"));

        assert_eq!(store.authenticate(&generate()).unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(store.revoke("nope").unwrap_err().code(), Code::NotFound);
        assert!(store.create("", "main", perms, 0).is_err());
        assert!(store.create("x", "main/blobs", perms, 0).is_err());
        assert_eq!(store.list().len(), 2);
    }
}
