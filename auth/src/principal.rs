//! The authenticated caller of a request.

use std::sync::Arc;

use crate::permission::Permissions;

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No authentication is configured: Kiln serves a loopback address (or
    /// the operator opted out), and every request may do everything.
    Unrestricted,
    ClientCertificate,
    Token,
    Basic,
}

/// Permissions a token carries on a tenant and its subtenants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub tenant: String,
    pub permissions: Permissions,
}

/// Inserted into every request's extensions by the authentication layer.
#[derive(Debug, Clone)]
pub struct Principal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    method: AuthMethod,
    grant: Option<Grant>,
    identity: Option<String>,
}

impl Principal {
    pub fn new(name: &str, method: AuthMethod, grant: Option<Grant>) -> Self {
        Self { inner: Arc::new(Inner { name: name.to_owned(), method, grant, identity: None }) }
    }

    /// The principal of every request when no authentication is configured.
    pub fn unrestricted() -> Self {
        Self::new("anonymous", AuthMethod::Unrestricted, None)
    }

    /// The same principal, with the identity header's value recorded.
    #[must_use]
    pub fn with_identity(self, identity: Option<String>) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                name: inner.name.clone(),
                method: inner.method,
                grant: inner.grant.clone(),
                identity,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn method(&self) -> AuthMethod {
        self.inner.method
    }

    pub fn grant(&self) -> Option<&Grant> {
        self.inner.grant.as_ref()
    }

    /// The value of the configured identity header, for attribution.
    pub fn identity(&self) -> Option<&str> {
        self.inner.identity.as_deref()
    }

    pub fn is_unrestricted(&self) -> bool {
        self.inner.method == AuthMethod::Unrestricted
    }
}
