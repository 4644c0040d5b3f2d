//! `kiln serve` configuration: a TOML file, overridden by flags.
//!
//! Every key is documented in README.md ("Configuration"); `kiln config`
//! prints the defaults as a file to start from.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kiln_auth::config::AuthConfig;
use kiln_proto::limits::Limits;

use crate::execution::ExecutionConfig;
use crate::storage::StorageConfig;
use crate::telemetry::{LogConfig, MetricsConfig};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Directory for Kiln's state.
    pub data_dir: PathBuf,
    /// Allow listening on a non-loopback address without authentication.
    pub insecure_no_auth: bool,
    /// How long in-flight requests may run after SIGINT/SIGTERM.
    pub shutdown_grace_ms: u64,
    pub storage: StorageConfig,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub execution: ExecutionConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    /// The Remote Asset API's fetching from origin.
    pub assets: kiln_storage::service::origin::OriginConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8980)),
            data_dir: PathBuf::from("kiln-data"),
            insecure_no_auth: false,
            shutdown_grace_ms: 5000,
            storage: StorageConfig::default(),
            limits: Limits::default(),
            auth: AuthConfig::default(),
            execution: ExecutionConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            assets: kiln_storage::service::origin::OriginConfig::default(),
        }
    }
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Checks the whole configuration; the message names the offending key.
    pub fn validate(&self) -> Result<()> {
        self.limits.validate().map_err(|e| anyhow::anyhow!("[limits] {e}"))?;
        self.storage.validate(self.limits.blob_size_bytes_max)?;
        self.auth.validate().map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        self.execution.validate()?;
        self.assets.validate().map_err(|e| anyhow::anyhow!(e))?;
        if self.execution.enabled
            && !self.execution.worker_listen.ip().is_loopback()
            && !self.auth.authenticates()
            && !self.insecure_no_auth
        {
            bail!(
                "[execution] worker_listen {} is not loopback and no authentication is configured; workers \
                 must authenticate (client certificates or tokens with the worker permission)",
                self.execution.worker_listen
            );
        }
        if !self.listen.ip().is_loopback() && !self.auth.authenticates() && !self.insecure_no_auth {
            bail!(
                "listen address {} is not loopback and no authentication is configured ([auth] client_ca, \
                 tokens or htpasswd); pass --insecure-no-auth (or insecure_no_auth = true) to serve it anyway",
                self.listen
            );
        }
        if self.metrics.enabled
            && !self.metrics.listen.ip().is_loopback()
            && !self.auth.authenticates()
            && !self.insecure_no_auth
        {
            bail!(
                "[metrics] listen {} is not loopback and no authentication is configured: the status page                  and failed actions' logs (read from the CAS) would be open to the network; configure [auth]                  (they then need admin; /metrics stays open to scrapers) or pass --insecure-no-auth",
                self.metrics.listen
            );
        }
        Ok(())
    }
}

/// The default configuration as a commented TOML file.
pub const DEFAULT_TOML: &str = include_str!("../docs/kiln.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_to_the_defaults() {
        let parsed: Config = toml::from_str(DEFAULT_TOML).unwrap();
        let default = Config::default();
        assert_eq!(parsed.listen, default.listen);
        assert_eq!(parsed.data_dir, default.data_dir);
        assert_eq!(parsed.limits, default.limits);
        assert_eq!(parsed.shutdown_grace_ms, default.shutdown_grace_ms);
        assert!(!parsed.auth.authenticates());
        assert_eq!(parsed.auth.reload_interval_ms, default.auth.reload_interval_ms);
        assert_eq!(parsed.storage.cas_memory_bytes, default.storage.cas_memory_bytes);
        assert_eq!(parsed.storage.ac_memory_bytes, default.storage.ac_memory_bytes);
        assert_eq!(parsed.storage.backend, default.storage.backend);
        assert_eq!(parsed.storage.sync_interval_ms, default.storage.sync_interval_ms);
        assert_eq!(parsed.storage.io, default.storage.io);
        assert_eq!(parsed.execution.worker_listen, default.execution.worker_listen);
        assert_eq!(parsed.execution.default_timeout_ms, default.execution.default_timeout_ms);
        assert_eq!(parsed.execution.worker.uid_base, default.execution.worker.uid_base);
        parsed.validate().unwrap();
    }

    /// Storage settings out of range are refused with the key to change.
    #[test]
    fn storage_settings_out_of_range_are_refused() {
        for (toml, key) in [
            ("[storage]\nupload_staging_bytes = 1000", "upload_staging_bytes"),
            ("[storage]\nsync_interval_ms = 0", "sync_interval_ms"),
            ("[storage]\ncas_size_bytes = 1000", "cas_size_bytes"),
        ] {
            let parsed: Config = toml::from_str(toml).unwrap();
            let refused = parsed.validate().unwrap_err().to_string();
            assert!(refused.contains(key), "{toml}: {refused}");
        }
        let fine: Config = toml::from_str("[storage]\nupload_staging_bytes = 4194304").unwrap();
        fine.validate().unwrap();
        assert_eq!(fine.storage.upload_staging_bytes, 4 << 20);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>("listn = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn public_address_needs_explicit_opt_in() {
        let mut c = Config { listen: "0.0.0.0:8980".parse().unwrap(), ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("--insecure-no-auth"));
        c.insecure_no_auth = true;
        c.validate().unwrap();
        let mut c = Config::default();
        c.metrics.listen = "0.0.0.0:9980".parse().unwrap();
        let refused = c.validate().unwrap_err().to_string();
        assert!(refused.contains("[metrics] listen") && refused.contains("--insecure-no-auth"), "{refused}");
        c.insecure_no_auth = true;
        c.validate().unwrap();
    }
}
