//! The authentication layer: a tower middleware in front of every gRPC
//! service of a listener.
//!
//! It turns credentials (client certificate, bearer token, basic auth) into a
//! [`Principal`] and puts it into the request's extensions, or answers
//! UNAUTHENTICATED without calling the service. Authorization happens in
//! the services, which know the tenant and the operation (see [`Authorizer`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::Engine as _;
use http::HeaderMap;
use kiln_proto::{Code, Error, Result};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::htpasswd::Htpasswd;
use crate::listener::PeerInfo;
use crate::permission::Permission;
use crate::policy::Policy;
use crate::principal::{AuthMethod, Principal};
use crate::tokens::TokenStore;

/// Paths served without authentication (load balancer health checks).
const PUBLIC_PATH_PREFIXES: [&str; 1] = ["/grpc.health.v1.Health/"];

/// Failures from one address are logged at warning level at these counts.
const FAILURE_LOG_THRESHOLDS: [u64; 4] = [1, 10, 100, 1000];

/// Most addresses tracked for repeated failures.
const FAILURE_ADDRESSES_MAX: usize = 10_000;

/// Turns a request's credentials into a principal.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    /// No authentication configured: everything is allowed.
    pub unrestricted: bool,
    pub tokens: Option<Arc<TokenStore>>,
    pub htpasswd: Option<Arc<Htpasswd>>,
    /// Accept the principal of a verified client certificate.
    pub client_certificates: bool,
    /// Header recorded for attribution, and whether it is required.
    pub identity_header: Option<(http::HeaderName, bool)>,
    failures: Arc<Mutex<HashMap<IpAddr, u64>>>,
}

impl Authenticator {
    pub fn unrestricted() -> Self {
        Self { unrestricted: true, ..Self::default() }
    }

    fn identity(&self, headers: &HeaderMap) -> Result<Option<String>> {
        let Some((name, required)) = &self.identity_header else { return Ok(None) };
        match headers.get(name).and_then(|v| v.to_str().ok()) {
            Some(v) if !v.is_empty() => Ok(Some(v.chars().take(256).collect())),
            _ if *required => {
                Err(Error::new(Code::Unauthenticated, format!("the {name} header is required")))
            }
            _ => Ok(None),
        }
    }

    /// Authenticates one request.
    pub fn authenticate(&self, headers: &HeaderMap, peer: Option<&PeerInfo>) -> Result<Principal> {
        static UNRESTRICTED: std::sync::LazyLock<Principal> =
            std::sync::LazyLock::new(Principal::unrestricted);
        let identity = self.identity(headers)?;
        let principal =
            if self.unrestricted { UNRESTRICTED.clone() } else { self.credentials(headers, peer)? };
        // Most requests carry no identity header: keep the shared principal.
        Ok(match identity {
            Some(identity) => principal.with_identity(Some(identity)),
            None => principal,
        })
    }

    fn credentials(&self, headers: &HeaderMap, peer: Option<&PeerInfo>) -> Result<Principal> {
        let principal = match headers.get(http::header::AUTHORIZATION) {
            Some(value) => self.authenticate_header(value)?,
            None => match peer.and_then(|p| p.client_principal.as_deref()) {
                Some(name) if self.client_certificates => {
                    Principal::new(name, AuthMethod::ClientCertificate, None)
                }
                _ => return Err(Error::new(Code::Unauthenticated, self.what_is_accepted())),
            },
        };
        Ok(principal)
    }

    fn what_is_accepted(&self) -> String {
        let mut ways = Vec::new();
        if self.client_certificates {
            ways.push("a client certificate");
        }
        if self.tokens.is_some() {
            ways.push("an `authorization: Bearer kiln_...` header");
        }
        if self.htpasswd.is_some() {
            ways.push("basic auth");
        }
        format!("credentials required: present {}", ways.join(" or "))
    }

    fn authenticate_header(&self, value: &http::HeaderValue) -> Result<Principal> {
        let value = value
            .to_str()
            .map_err(|_| Error::new(Code::Unauthenticated, "the authorization header is not valid text"))?;
        let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
        match (scheme.to_ascii_lowercase().as_str(), &self.tokens, &self.htpasswd) {
            ("bearer", Some(tokens), _) => tokens.authenticate(credentials.trim()),
            ("basic", _, Some(htpasswd)) => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(credentials.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok())
                    .ok_or_else(|| Error::new(Code::Unauthenticated, "malformed basic auth credentials"))?;
                let (user, password) = decoded
                    .split_once(':')
                    .ok_or_else(|| Error::new(Code::Unauthenticated, "malformed basic auth credentials"))?;
                if htpasswd.verify(user, password) {
                    Ok(Principal::new(user, AuthMethod::Basic, None))
                } else {
                    Err(Error::new(
                        Code::Unauthenticated,
                        format!("wrong user name or password for {user:?}"),
                    ))
                }
            }
            (scheme, _, _) => Err(Error::new(
                Code::Unauthenticated,
                format!(
                    "authorization scheme {scheme:.20} is not accepted here; {}",
                    self.what_is_accepted()
                ),
            )),
        }
    }

    /// Counts a failure and logs it, loudly when one address keeps failing.
    fn record_failure(&self, peer: Option<&PeerInfo>, path: &str, error: &Error) {
        let ip = peer.and_then(|p| p.remote_addr).map(|a| a.ip());
        let count = ip.map_or(1, |ip| {
            let mut failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if failures.len() >= FAILURE_ADDRESSES_MAX && !failures.contains_key(&ip) {
                failures.clear();
            }
            let n = failures.entry(ip).or_insert(0);
            *n += 1;
            *n
        });
        if FAILURE_LOG_THRESHOLDS.contains(&count) {
            tracing::warn!(peer = ?ip, failures = count, path, error = error.message(), "authentication failed");
        } else {
            tracing::debug!(peer = ?ip, failures = count, path, error = error.message(), "authentication failed");
        }
    }
}

/// Checks permissions at the service edge.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    policy: Arc<Policy>,
}

impl Authorizer {
    pub fn new(policy: Policy) -> Self {
        Self { policy: Arc::new(policy) }
    }

    /// Allows everything (tests and unrestricted servers).
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// The request's principal, which the layer put there.
    pub fn principal<T>(request: &tonic::Request<T>) -> Result<Principal> {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| Error::new(Code::Unauthenticated, "request was not authenticated"))
    }

    /// The principal, if it holds `permission` on `tenant`.
    pub fn check<T>(
        &self,
        request: &tonic::Request<T>,
        tenant: &str,
        permission: Permission,
    ) -> Result<Principal> {
        let principal = Self::principal(request)?;
        self.policy.check(&principal, tenant, permission)?;
        Ok(principal)
    }

    /// Like [`Authorizer::check`] for a principal already at hand.
    pub fn require(&self, principal: &Principal, tenant: &str, permission: Permission) -> Result<()> {
        self.policy.check(principal, tenant, permission)
    }

    pub fn allows(&self, principal: &Principal, tenant: &str, permission: Permission) -> bool {
        self.policy.allows(principal, tenant, permission)
    }
}

/// Tower layer that authenticates every request.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Authenticator,
}

impl AuthLayer {
    pub fn new(authenticator: Authenticator) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, authenticator: self.authenticator.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Authenticator,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<std::result::Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if PUBLIC_PATH_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Box::pin(self.inner.call(request));
        }
        let peer = request.extensions().get::<PeerInfo>().cloned();
        match self.authenticator.authenticate(request.headers(), peer.as_ref()) {
            Ok(principal) => {
                if let Some(identity) = principal.identity() {
                    tracing::debug!(principal = principal.name(), identity, path, "request");
                }
                request.extensions_mut().insert(principal);
                // Take the ready service, leave a fresh clone (tower's contract).
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(ready.call(request))
            }
            Err(error) => {
                self.authenticator.record_failure(peer.as_ref(), path, &error);
                let status = tonic::Status::from(error);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
