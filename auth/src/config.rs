//! The `[auth]` section of Kiln's configuration, and building the auth
//! machinery from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::access::Authorizer;
use kiln_proto::limits::Limits;
use kiln_proto::{Error, Result};
use serde::Deserialize;

use crate::htpasswd::Htpasswd;
use crate::layer::Authenticator;
use crate::policy::{Rule, RulePolicy};
use crate::reload::spawn_poller;
use crate::tls::{PrincipalFrom, ReloadingTls, TlsFiles};
use crate::tokens::TokenStore;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Server certificate chain (PEM); with `tls_key`, enables TLS.
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA bundle for client certificates (PEM); enables mTLS.
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation lists for client certificates (PEM).
    pub client_crl: Option<PathBuf>,
    /// Refuse TLS handshakes without a client certificate (default: true
    /// when `client_ca` is set).
    pub client_cert_required: Option<bool>,
    /// Which part of a client certificate names the principal.
    pub principal_from: PrincipalFrom,
    /// Accept bearer tokens created with `kiln token create`.
    pub tokens: bool,
    /// Token file shared by every node; default `DATA_DIR/tokens.json`.
    pub token_file: Option<PathBuf>,
    /// htpasswd file (bcrypt, apr1) for basic auth.
    pub htpasswd: Option<PathBuf>,
    /// Header recorded with every request for attribution.
    pub identity_header: Option<String>,
    /// Refuse requests without `identity_header`.
    pub identity_header_required: bool,
    /// How often certificate, CRL, htpasswd and token files are checked.
    pub reload_interval_ms: u64,
    /// Permission rules.
    pub rules: Vec<Rule>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            client_crl: None,
            client_cert_required: None,
            principal_from: PrincipalFrom::Cn,
            tokens: false,
            token_file: None,
            htpasswd: None,
            identity_header: None,
            identity_header_required: false,
            reload_interval_ms: 1000,
            rules: Vec::new(),
        }
    }
}

/// Everything a listener needs for authentication and authorization.
#[derive(Debug, Clone)]
pub struct AuthSetup {
    pub tls: Option<Arc<ReloadingTls>>,
    pub principal_from: PrincipalFrom,
    pub authenticator: Authenticator,
    pub authorizer: Authorizer,
    pub tokens: Option<Arc<TokenStore>>,
}

impl AuthConfig {
    /// Whether any way of authenticating clients is configured.
    pub fn authenticates(&self) -> bool {
        self.client_ca.is_some() || self.tokens || self.htpasswd.is_some()
    }

    pub fn token_path(&self, data_dir: &Path) -> PathBuf {
        self.token_file.clone().unwrap_or_else(|| data_dir.join("tokens.json"))
    }

    fn tls_files(&self) -> Result<Option<TlsFiles>> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                if self.client_ca.is_some() {
                    return Err(Error::invalid_argument("[auth] client_ca needs tls_cert and tls_key"));
                }
                Ok(None)
            }
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
                client_crl: self.client_crl.clone(),
                client_cert_required: self.client_ca.is_some() && self.client_cert_required.unwrap_or(true),
            })),
            _ => Err(Error::invalid_argument("[auth] tls_cert and tls_key must be given together")),
        }
    }

    /// Checks the section without touching files.
    pub fn validate(&self) -> Result<()> {
        self.tls_files()?;
        if self.client_crl.is_some() && self.client_ca.is_none() {
            return Err(Error::invalid_argument("[auth] client_crl needs client_ca"));
        }
        if !self.rules.is_empty() && !self.authenticates() {
            return Err(Error::invalid_argument(
                "[auth] rules are set but no way to authenticate is: set client_ca, tokens or htpasswd",
            ));
        }
        if self
            .identity_header
            .as_deref()
            .is_some_and(|h| http::HeaderName::from_bytes(h.as_bytes()).is_err())
        {
            return Err(Error::invalid_argument("[auth] identity_header is not a valid header name"));
        }
        if self.reload_interval_ms == 0 || self.reload_interval_ms > 5000 {
            return Err(Error::invalid_argument(
                "[auth] reload_interval_ms must be between 1 and 5000 (revocations must spread within 10 s)",
            ));
        }
        RulePolicy::new(&self.rules).map_err(|e| e.context("[auth]"))?;
        Ok(())
    }

    /// Loads files and starts the reload pollers (needs a Tokio runtime).
    pub fn build(&self, data_dir: &Path, limits: &Limits) -> Result<AuthSetup> {
        self.validate()?;
        let interval = Duration::from_millis(self.reload_interval_ms);
        let tls = match self.tls_files()? {
            Some(files) => {
                let tls = ReloadingTls::load(files).map_err(|e| e.context("[auth] TLS"))?;
                let poll = tls.clone();
                spawn_poller("tls", interval, move || poll.reload_if_changed());
                Some(tls)
            }
            None => None,
        };
        let identity_header = self.identity_header.as_deref().map(|h| {
            (http::HeaderName::from_bytes(h.as_bytes()).expect("validated"), self.identity_header_required)
        });
        if !self.authenticates() {
            let mut authenticator = Authenticator::unrestricted();
            authenticator.identity_header = identity_header;
            return Ok(AuthSetup {
                tls,
                principal_from: self.principal_from,
                authenticator,
                authorizer: Authorizer::allow_all(),
                tokens: None,
            });
        }
        let tokens = if self.tokens {
            let store =
                TokenStore::open(&self.token_path(data_dir)).map_err(|e| e.context("[auth] tokens"))?;
            let poll = store.clone();
            spawn_poller("tokens", interval, move || poll.reload_if_changed());
            Some(store)
        } else {
            None
        };
        let htpasswd = match &self.htpasswd {
            Some(path) => {
                let file = Htpasswd::load(
                    path,
                    limits.password_hashes_in_flight_max,
                    limits.password_cache_entries_max,
                )
                .map_err(|e| e.context("[auth] htpasswd"))?;
                let poll = file.clone();
                spawn_poller("htpasswd", interval, move || poll.reload_if_changed());
                Some(file)
            }
            None => None,
        };
        let mut authenticator = Authenticator::new(limits.log_peers_tracked_max);
        authenticator.tokens = tokens.clone();
        authenticator.htpasswd = htpasswd;
        authenticator.client_certificates = if self.client_ca.is_some() { tls.clone() } else { None };
        authenticator.identity_header = identity_header;
        Ok(AuthSetup {
            tls,
            principal_from: self.principal_from,
            authenticator,
            authorizer: Authorizer::new(RulePolicy::new(&self.rules)?, limits.log_peers_tracked_max),
            tokens,
        })
    }
}
