//! The authentication layer: a tower middleware in front of every gRPC
//! service of a listener.
//!
//! It turns credentials (client certificate, bearer token, basic auth) into a
//! [`Principal`] and puts it into the request's extensions, or answers
//! UNAUTHENTICATED without calling the service. Authorization happens in
//! the services, which know the tenant and the operation (they call
//! [`kiln_proto::access::Authorizer`]).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::HeaderMap;
use kiln_proto::access::{AuthMethod, PeerInfo, PeerTally, Principal};
use kiln_proto::limits::IDENTITY_CHARS_MAX;
use kiln_proto::text::quoted;
use kiln_proto::{Code, Error, Result};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::htpasswd::Htpasswd;
use crate::tls::ReloadingTls;
use crate::tokens::TokenStore;

/// Paths served without authentication (load balancer health checks).
const PUBLIC_PATH_PREFIXES: [&str; 1] = ["/grpc.health.v1.Health/"];

/// Turns a request's credentials into a principal.
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// No authentication configured: everything is allowed.
    pub unrestricted: bool,
    pub tokens: Option<Arc<TokenStore>>,
    pub htpasswd: Option<Arc<Htpasswd>>,
    /// Accept the principal of a verified client certificate, re-checking
    /// the certificate against the current CRLs on every request.
    pub client_certificates: Option<Arc<ReloadingTls>>,
    /// Header recorded for attribution, and whether it is required.
    pub identity_header: Option<(http::HeaderName, bool)>,
    failures: Arc<PeerTally>,
}

impl Authenticator {
    /// Authenticates nobody (configure the fields to change that).
    pub fn new(log_peers_tracked_max: usize) -> Self {
        Self {
            unrestricted: false,
            tokens: None,
            htpasswd: None,
            client_certificates: None,
            identity_header: None,
            failures: Arc::new(PeerTally::new(log_peers_tracked_max)),
        }
    }

    /// Lets every request in as the unrestricted principal.
    pub fn unrestricted() -> Self {
        Self { unrestricted: true, ..Self::new(1) }
    }

    fn identity(&self, headers: &HeaderMap) -> Result<Option<String>> {
        let Some((name, required)) = &self.identity_header else { return Ok(None) };
        match headers.get(name).and_then(|v| v.to_str().ok()) {
            Some(v) if !v.is_empty() => Ok(Some(v.chars().take(IDENTITY_CHARS_MAX).collect())),
            _ if *required => {
                Err(Error::new(Code::Unauthenticated, format!("the {name} header is required")))
            }
            _ => Ok(None),
        }
    }

    /// Authenticates one request.
    pub async fn authenticate(&self, headers: &HeaderMap, peer: Option<&PeerInfo>) -> Result<Principal> {
        static UNRESTRICTED: std::sync::LazyLock<Principal> =
            std::sync::LazyLock::new(Principal::unrestricted);
        let identity = self.identity(headers)?;
        let principal =
            if self.unrestricted { UNRESTRICTED.clone() } else { self.credentials(headers, peer).await? };
        // Most requests carry no identity header: keep the shared principal.
        Ok(match identity {
            Some(identity) => principal.with_identity(Some(identity)),
            None => principal,
        })
    }

    async fn credentials(&self, headers: &HeaderMap, peer: Option<&PeerInfo>) -> Result<Principal> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            return self.authenticate_header(value).await;
        }
        let certificate =
            peer.and_then(|p| Some((p.client_principal.as_deref()?, p.client_certificate.as_ref()?)));
        match (certificate, &self.client_certificates) {
            (Some((name, cert)), Some(tls)) => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                tls.recheck(cert, i64::try_from(now).unwrap_or(i64::MAX))?;
                Ok(Principal::new(name, AuthMethod::ClientCertificate, None))
            }
            _ => Err(Error::new(Code::Unauthenticated, self.what_is_accepted())),
        }
    }

    fn what_is_accepted(&self) -> String {
        let mut ways = Vec::new();
        if self.client_certificates.is_some() {
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

    async fn authenticate_header(&self, value: &http::HeaderValue) -> Result<Principal> {
        let value = value
            .to_str()
            .map_err(|_| Error::new(Code::Unauthenticated, "the authorization header is not valid text"))?;
        let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
        match (scheme.to_ascii_lowercase().as_str(), &self.tokens, &self.htpasswd) {
            ("bearer", Some(tokens), _) => tokens.authenticate(credentials.trim()),
            ("basic", _, Some(htpasswd)) => {
                let malformed = || Error::new(Code::Unauthenticated, "malformed basic auth credentials");
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(credentials.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok())
                    .ok_or_else(malformed)?;
                let (user, password) = decoded.split_once(':').ok_or_else(malformed)?;
                if htpasswd.verify(user, password).await {
                    Ok(Principal::new(user, AuthMethod::Basic, None))
                } else {
                    Err(Error::new(
                        Code::Unauthenticated,
                        format!("wrong user name or password for {}", quoted(user)),
                    ))
                }
            }
            (scheme, _, _) => Err(Error::new(
                Code::Unauthenticated,
                format!(
                    "authorization scheme {} is not accepted here; {}",
                    quoted(scheme),
                    self.what_is_accepted()
                ),
            )),
        }
    }

    /// Counts a failure and logs it, rate-limited per address.
    fn record_failure(&self, peer: Option<&PeerInfo>, path: &str, error: &Error) {
        let ip = peer.and_then(|p| p.remote_addr).map(|a| a.ip());
        let (count, log) = self.failures.count(ip);
        if log {
            tracing::warn!(peer = ?ip, failures = count, path = %quoted(path), error = error.message(), "authentication failed");
        } else {
            tracing::debug!(peer = ?ip, failures = count, path = %quoted(path), error = error.message(), "authentication failed");
        }
    }
}

/// Why authentication failed, from what the request offered: the
/// credentials it carried, by kind.
fn failure_reason(headers: &http::HeaderMap, peer: Option<&PeerInfo>) -> &'static str {
    let scheme = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_ascii_lowercase);
    match scheme.as_deref() {
        Some("bearer") => "bad_token",
        Some("basic") => "bad_password",
        Some(_) => "unknown_scheme",
        None if peer.is_some_and(|p| p.client_certificate.is_some()) => "certificate_not_accepted",
        None => "no_credentials",
    }
}

/// Tower layer that authenticates every request.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(authenticator: Authenticator) -> Self {
        Self { authenticator: Arc::new(authenticator) }
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
    authenticator: Arc<Authenticator>,
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
        // Take the ready service, leave a fresh clone (tower's contract).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        if PUBLIC_PATH_PREFIXES.iter().any(|p| request.uri().path().starts_with(p)) {
            return Box::pin(ready.call(request));
        }
        let authenticator = self.authenticator.clone();
        Box::pin(async move {
            let peer = request.extensions().get::<PeerInfo>().cloned();
            match authenticator.authenticate(request.headers(), peer.as_ref()).await {
                Ok(principal) => {
                    // The call's span (when enabled) names who made it.
                    tracing::Span::current().record("principal", tracing::field::display(&principal));
                    if let Some(identity) = principal.identity() {
                        tracing::debug!(%principal, identity, path = request.uri().path(), "request");
                    }
                    request.extensions_mut().insert(principal);
                    ready.call(request).await
                }
                Err(error) => {
                    let reason = failure_reason(request.headers(), peer.as_ref());
                    let labels = kiln_proto::metrics::ReasonLabels { reason };
                    kiln_proto::metrics::global().auth_failures.get_or_create(&labels).inc();
                    authenticator.record_failure(peer.as_ref(), request.uri().path(), &error);
                    Ok(tonic::Status::from(error).into_http())
                }
            }
        })
    }
}
