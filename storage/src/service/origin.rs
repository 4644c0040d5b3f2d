//! Fetching from origin for the Remote Asset API (Bazel's
//! `--experimental_remote_downloader`): when no pushed asset matches a
//! FetchBlob, Kiln downloads the URL itself, into the CAS, once for the
//! whole farm.
//!
//! Off by default. When on, only URLs under a configured prefix are
//! fetched, every hop of a redirect chain included, and a name that
//! resolves only to loopback, link-local, private or otherwise special
//! addresses (or such an address written in the URL) is refused unless
//! the operator allows private addresses: the cache must not become a way
//! into the network it sits in. Each download is bounded in bytes, time
//! and redirects, goes to a temporary file under `DATA_DIR/downloads`
//! (at most `fetches_max` at once, so at most `fetches_max` ×
//! `fetch_bytes_max` bytes of disk), is verified against `checksum.sri`
//! when the request has one, and identical downloads in flight are merged.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use kiln_proto::{Code, Digest, DigestFunction, Error, Result};
use serde::Deserialize;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

/// The `[assets]` section: fetching from origin.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// Download what no pushed asset matches.
    pub fetch_from_origin: bool,
    /// URL prefixes Kiln may download from (`https://github.com/`); every
    /// hop of a redirect chain must match one.
    pub fetch_allow: Vec<String>,
    /// Allow loopback, link-local and private addresses.
    pub fetch_private_addresses: bool,
    /// Largest download.
    pub fetch_bytes_max: u64,
    /// Longest download, redirects included.
    pub fetch_timeout_ms: u64,
    pub fetch_redirects_max: usize,
    /// Downloads at once; more wait their turn within their own timeout.
    pub fetches_max: usize,
}

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            fetch_from_origin: false,
            fetch_allow: Vec::new(),
            fetch_private_addresses: false,
            fetch_bytes_max: 1 << 30,
            fetch_timeout_ms: 300_000,
            fetch_redirects_max: 5,
            fetches_max: 8,
        }
    }
}

impl OriginConfig {
    /// The message names the key to change.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.fetch_from_origin {
            return Ok(());
        }
        if self.fetch_allow.is_empty() {
            return Err(
                "[assets] fetch_from_origin is on but fetch_allow names no URL prefix to download from"
                    .into(),
            );
        }
        for prefix in &self.fetch_allow {
            let ok = reqwest::Url::parse(prefix)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(format!(
                    "[assets] fetch_allow {prefix:?} is not an http:// or https:// URL prefix"
                ));
            }
        }
        if self.fetch_bytes_max == 0 || self.fetch_timeout_ms == 0 {
            return Err("[assets] fetch_bytes_max and fetch_timeout_ms must be above zero".into());
        }
        if !(1..=1024).contains(&self.fetches_max) || self.fetch_redirects_max > 20 {
            return Err("[assets] fetches_max must be 1 to 1024 and fetch_redirects_max at most 20".into());
        }
        Ok(())
    }
}

/// Whether `ip` is an ordinary public address.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (18..20).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first == 0x2001 && v6.segments()[1] == 0x0db8))
        }
    }
}

/// Resolves names to public addresses only (unless private ones are
/// allowed), so that no redirect or DNS answer leads inside.
#[derive(Debug, Clone, Copy)]
struct Guard {
    private_ok: bool,
}

impl reqwest::dns::Resolve for Guard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let private_ok = self.private_ok;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                found.into_iter().filter(|a| private_ok || is_public(a.ip())).collect();
            if allowed.is_empty() {
                let why = format!("{host} resolves to no public address ([assets] fetch_private_addresses)");
                return Err(why.into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why `url` may not be fetched, if it may not.
fn refusal(config: &OriginConfig, url: &reqwest::Url) -> Option<String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Some(format!("{url} is not an http:// or https:// URL"));
    }
    if !config.fetch_allow.iter().any(|prefix| url.as_str().starts_with(prefix.as_str())) {
        return Some(format!("{url} is under no [assets] fetch_allow prefix"));
    }
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    };
    match literal {
        Some(ip) if !config.fetch_private_addresses && !is_public(ip) => {
            Some(format!("{url} names a private or local address ([assets] fetch_private_addresses)"))
        }
        _ => None,
    }
}

/// A `checksum.sri` value: the digests it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sri(Vec<(String, Vec<u8>)>);

impl Sri {
    /// Parses `sha256-BASE64` entries (sha384 and sha512 too), space
    /// separated; INVALID_ARGUMENT when none is usable.
    pub fn parse(text: &str) -> Result<Sri> {
        let entries: Vec<(String, Vec<u8>)> = text
            .split_whitespace()
            .filter_map(|entry| {
                let (algorithm, value) = entry.split_once('-')?;
                let value = value.split('?').next().unwrap_or(value);
                let bytes = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
                matches!(algorithm, "sha256" | "sha384" | "sha512").then(|| (algorithm.to_owned(), bytes))
            })
            .collect();
        if entries.is_empty() {
            return Err(Error::invalid_argument(format!(
                "checksum.sri {} names no sha256, sha384 or sha512 digest",
                kiln_proto::text::quoted(text)
            )));
        }
        Ok(Sri(entries))
    }
}

/// Hashes a download as it arrives: the CAS digest and the SRI ones.
struct Hashes {
    cas: kiln_proto::Hasher,
    sha256: sha2::Sha256,
    sha384: sha2::Sha384,
    sha512: sha2::Sha512,
}

impl Hashes {
    fn new(function: DigestFunction) -> Self {
        Hashes {
            cas: function.hasher(),
            sha256: sha2::Sha256::new(),
            sha384: sha2::Sha384::new(),
            sha512: sha2::Sha512::new(),
        }
    }

    fn update(&mut self, data: &[u8]) {
        self.cas.update(data);
        self.sha256.update(data);
        self.sha384.update(data);
        self.sha512.update(data);
    }

    /// Checks `sri`, then gives the CAS digest.
    fn finish(self, size: u64, sri: Option<&Sri>, url: &str) -> Result<Digest> {
        let actual = [
            ("sha256", self.sha256.finalize().to_vec()),
            ("sha384", self.sha384.finalize().to_vec()),
            ("sha512", self.sha512.finalize().to_vec()),
        ];
        if let Some(sri) = sri {
            let matches =
                sri.0.iter().any(|(alg, want)| actual.iter().any(|(a, got)| a == alg && got == want));
            if !matches {
                let got = base64::engine::general_purpose::STANDARD.encode(&actual[0].1);
                return Err(Error::new(
                    Code::Aborted,
                    format!("{url} served content with sha256-{got}, which checksum.sri does not name"),
                ));
            }
        }
        self.cas.into_digest(size)
    }
}

/// A finished download: its file and digest.
#[derive(Debug)]
pub struct Downloaded {
    pub file: tempfile::TempPath,
    pub digest: Digest,
}

type Merged = Shared<BoxFuture<'static, std::result::Result<Digest, Error>>>;

/// The downloader. Cheap to share.
pub struct Origin {
    config: OriginConfig,
    client: reqwest::Client,
    turns: Arc<tokio::sync::Semaphore>,
    dir: PathBuf,
    in_flight: Arc<Mutex<HashMap<String, Merged>>>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Origin {
    /// A downloader writing under `dir` (emptied first); `None` when
    /// fetching from origin is off.
    pub fn new(config: &OriginConfig, dir: &Path) -> std::result::Result<Option<Arc<Origin>>, String> {
        if !config.fetch_from_origin {
            return Ok(None);
        }
        config.validate()?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // Every download at once, each at its largest, must fit.
        let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
        let free = stat.blocks_available().saturating_mul(stat.fragment_size());
        let most = config.fetch_bytes_max.saturating_mul(config.fetches_max as u64);
        if most > free {
            return Err(format!(
                "[assets] fetches_max ({}) downloads of fetch_bytes_max ({}) bytes need {most} bytes, but {} has \
                 {free} free: lower one of them",
                config.fetches_max,
                config.fetch_bytes_max,
                dir.display()
            ));
        }
        let policy_config = config.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > policy_config.fetch_redirects_max {
                let why = format!("more than {} redirects", policy_config.fetch_redirects_max);
                return attempt.error(why);
            }
            match refusal(&policy_config, attempt.url()) {
                Some(why) => attempt.error(format!("redirected: {why}")),
                None => attempt.follow(),
            }
        });
        let client = reqwest::Client::builder()
            .redirect(policy)
            .dns_resolver(Arc::new(Guard { private_ok: config.fetch_private_addresses }))
            .timeout(Duration::from_millis(config.fetch_timeout_ms))
            .connect_timeout(Duration::from_secs(30))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("the HTTP client: {e}"))?;
        Ok(Some(Arc::new(Origin {
            config: config.clone(),
            client,
            turns: Arc::new(tokio::sync::Semaphore::new(config.fetches_max)),
            dir: dir.to_owned(),
            in_flight: Arc::default(),
        })))
    }

    /// Why `url` may not be fetched, if it may not.
    pub fn refuses(&self, url: &str) -> Option<String> {
        match reqwest::Url::parse(url) {
            Ok(parsed) => refusal(&self.config, &parsed),
            Err(e) => Some(format!("{} is not a URL: {e}", kiln_proto::text::quoted(url))),
        }
    }

    /// Downloads `url` and hands the file to `store` (which puts it into
    /// the CAS); identical calls (same `merge_key`) in flight share one
    /// download. The digest stored.
    ///
    /// The download runs as a task of its own, bounded by the timeout: a
    /// caller that goes away neither cancels it for the others nor leaves
    /// it half done, and the task itself takes its entry out of the table
    /// when it ends, so no entry outlives its work.
    pub async fn fetch<F>(
        &self,
        merge_key: String,
        url: String,
        sri: Option<Sri>,
        function: DigestFunction,
        store: F,
    ) -> Result<Digest>
    where
        F: FnOnce(Downloaded) -> BoxFuture<'static, Result<()>> + Send + 'static,
    {
        let merged = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(existing) = in_flight.get(&merge_key) {
                existing.clone()
            } else {
                let download = self.download(url, sri, function);
                let (table, key) = (self.in_flight.clone(), merge_key.clone());
                let task = tokio::spawn(async move {
                    let result = async {
                        let downloaded = download.await?;
                        let digest = downloaded.digest;
                        store(downloaded).await?;
                        Ok(digest)
                    }
                    .await;
                    table.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
                    result
                });
                let work: BoxFuture<'static, Result<Digest>> = Box::pin(async move {
                    task.await
                        .unwrap_or_else(|e| Err(Error::internal(format!("a download's task failed: {e}"))))
                });
                let shared = work.shared();
                in_flight.insert(merge_key, shared.clone());
                shared
            }
        };
        merged.await
    }

    /// One download into a temporary file (a future that owns what it needs).
    fn download(
        &self,
        url: String,
        sri: Option<Sri>,
        function: DigestFunction,
    ) -> BoxFuture<'static, Result<Downloaded>> {
        let (client, turns, dir) = (self.client.clone(), self.turns.clone(), self.dir.clone());
        let (bytes_max, timeout) =
            (self.config.fetch_bytes_max, Duration::from_millis(self.config.fetch_timeout_ms));
        Box::pin(async move {
            let work = async {
                let _turn = turns
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::new(Code::Unavailable, "the server is stopping"))?;
                download(&client, &url, &dir, bytes_max, sri.as_ref(), function).await
            };
            tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| {
                Err(Error::new(Code::DeadlineExceeded, format!("{url} did not download within {timeout:?}")))
            })
        })
    }
}

async fn download(
    client: &reqwest::Client,
    url: &str,
    dir: &Path,
    bytes_max: u64,
    sri: Option<&Sri>,
    function: DigestFunction,
) -> Result<Downloaded> {
    let failed = |e: reqwest::Error| {
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        let mut text = String::new();
        while let Some(s) = source {
            text = s.to_string();
            source = s.source();
        }
        Error::new(Code::Unavailable, format!("downloading {url} failed: {e} ({text})"))
    };
    let mut response = client.get(url).send().await.map_err(failed)?;
    let status = response.status();
    if !status.is_success() {
        let code = if status == reqwest::StatusCode::NOT_FOUND { Code::NotFound } else { Code::Unavailable };
        return Err(Error::new(code, format!("{url} answered HTTP {status}")));
    }
    if response.content_length().is_some_and(|n| n > bytes_max) {
        return Err(too_large(url, bytes_max));
    }
    let io = |e: std::io::Error| Error::internal(format!("a download's temporary file: {e}"));
    let temp = tempfile::Builder::new().prefix("fetch-").tempfile_in(dir).map_err(io)?;
    let (file, path) = temp.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut hashes = Hashes::new(function);
    let mut size = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        size += chunk.len() as u64;
        if size > bytes_max {
            return Err(too_large(url, bytes_max));
        }
        hashes.update(&chunk);
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    let digest = hashes.finish(size, sri, url)?;
    Ok(Downloaded { file: path, digest })
}

fn too_large(url: &str, bytes_max: u64) -> Error {
    Error::resource_exhausted(format!("{url} is larger than [assets] fetch_bytes_max ({bytes_max} bytes)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "140.82.112.3", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn urls_outside_the_allow_list_or_inside_the_network_are_refused() {
        let config = OriginConfig {
            fetch_from_origin: true,
            fetch_allow: vec!["https://github.com/".into(), "http://10.0.0.5/".into()],
            ..OriginConfig::default()
        };
        let refused = |u: &str| refusal(&config, &reqwest::Url::parse(u).unwrap());
        assert_eq!(refused("https://github.com/x/y.tar.gz"), None);
        assert!(refused("https://github.com.evil.example/x").is_some());
        assert!(refused("https://gitlab.com/x").is_some());
        assert!(refused("ftp://github.com/x").is_some());
        assert!(refused("http://10.0.0.5/x").unwrap().contains("fetch_private_addresses"));
        let open = OriginConfig { fetch_private_addresses: true, ..config };
        assert_eq!(refusal(&open, &reqwest::Url::parse("http://10.0.0.5/x").unwrap()), None);
    }

    #[test]
    fn sri_values_parse_and_verify() {
        let data = b"hello";
        let sha = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data));
        let sri = Sri::parse(&format!("sha1-xxx sha256-{sha}")).unwrap();
        let mut h = Hashes::new(DigestFunction::Sha256);
        h.update(data);
        assert_eq!(h.finish(5, Some(&sri), "u").unwrap(), DigestFunction::Sha256.compute(data));
        let mut h = Hashes::new(DigestFunction::Sha256);
        h.update(b"other");
        assert_eq!(h.finish(5, Some(&sri), "u").unwrap_err().code(), Code::Aborted);
        assert_eq!(Sri::parse("md5-abc").unwrap_err().code(), Code::InvalidArgument);
    }

    #[test]
    fn configurations_that_cannot_work_are_refused_naming_the_key() {
        let on = OriginConfig { fetch_from_origin: true, ..OriginConfig::default() };
        assert!(on.validate().unwrap_err().contains("fetch_allow"));
        let bad = OriginConfig { fetch_allow: vec!["github.com".into()], ..on.clone() };
        assert!(bad.validate().unwrap_err().contains("fetch_allow"));
        let zero = OriginConfig { fetch_allow: vec!["https://x/".into()], fetches_max: 0, ..on };
        assert!(zero.validate().unwrap_err().contains("fetches_max"));
    }
}
