//! The authenticated caller of a request, and what the connection told us
//! about it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use super::permission::Permissions;

/// How a principal proved who it is.
///
/// The method is part of the principal's identity: a token's principal
/// named `ci` is not the certificate principal `ci`, and configured rules
/// never apply to tokens (see [`Principal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// No authentication is configured: Kiln serves a loopback address (or
    /// the operator opted out), and every request may do everything.
    Unrestricted,
    ClientCertificate,
    Token,
    Basic,
}

impl AuthMethod {
    /// The namespace prefix shown before principal names: `cert:ci-7`,
    /// `user:alice`, `token:ci`.
    pub fn prefix(self) -> &'static str {
        match self {
            AuthMethod::Unrestricted => "",
            AuthMethod::ClientCertificate => "cert:",
            AuthMethod::Token => "token:",
            AuthMethod::Basic => "user:",
        }
    }
}

/// Permissions a token carries on a tenant and its subtenants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub tenant: String,
    pub permissions: Permissions,
}

/// Inserted into every request's extensions by the authentication layer.
///
/// Certificate and basic-auth principals get their permissions from the
/// configured rules. A token principal's permissions are exactly its
/// [`Grant`]: rules are written for names an operator controls, and a
/// tenant admin who mints a token must not be able to borrow them by
/// choosing a matching name.
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
    /// The token's id, for tokens.
    token_id: Option<String>,
}

impl Principal {
    pub fn new(name: &str, method: AuthMethod, grant: Option<Grant>) -> Self {
        Self {
            inner: Arc::new(Inner { name: name.to_owned(), method, grant, identity: None, token_id: None }),
        }
    }

    /// A token's principal: its grant is all it may do.
    pub fn token(name: &str, id: &str, grant: Grant) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                method: AuthMethod::Token,
                grant: Some(grant),
                identity: None,
                token_id: Some(id.to_owned()),
            }),
        }
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
                token_id: inner.token_id.clone(),
            }),
        }
    }

    /// The name without its namespace (see [`Principal`]'s `Display`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn method(&self) -> AuthMethod {
        self.inner.method
    }

    pub fn grant(&self) -> Option<&Grant> {
        self.inner.grant.as_ref()
    }

    /// The id of the token this principal authenticated with.
    pub fn token_id(&self) -> Option<&str> {
        self.inner.token_id.as_deref()
    }

    /// The value of the configured identity header, for attribution.
    pub fn identity(&self) -> Option<&str> {
        self.inner.identity.as_deref()
    }

    pub fn is_unrestricted(&self) -> bool {
        self.inner.method == AuthMethod::Unrestricted
    }
}

/// `cert:NAME`, `user:NAME`, `token:NAME` or `anonymous`; names are quoted
/// and bounded when they contain anything unusual.
impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.inner.name;
        let plain = name.len() <= 64
            && !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@+=/".contains(&b));
        f.write_str(self.inner.method.prefix())?;
        if plain { f.write_str(name) } else { write!(f, "{}", crate::text::quoted(name)) }
    }
}

/// What the connection told us about the peer; in every request's
/// extensions (Kiln's listeners attach it to each connection).
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The principal named by a verified client certificate.
    pub client_principal: Option<String>,
    /// The verified client certificate, to re-check revocation and expiry
    /// on every request of a long-lived connection.
    pub client_certificate: Option<Arc<ClientCertificate>>,
}

/// What Kiln keeps of a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// DER of the issuer's distinguished name.
    pub issuer: Vec<u8>,
    /// The serial number's bytes, without leading zeros.
    pub serial: Vec<u8>,
    /// End of validity, in seconds since the Unix epoch.
    pub not_after_unix_seconds: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_namespace() {
        assert_eq!(Principal::new("ci-7", AuthMethod::ClientCertificate, None).to_string(), "cert:ci-7");
        assert_eq!(Principal::new("alice", AuthMethod::Basic, None).to_string(), "user:alice");
        let grant = Grant { tenant: "main".into(), permissions: Permissions::NONE };
        assert_eq!(Principal::token("ci", "abc", grant).to_string(), "token:ci");
        assert_eq!(Principal::unrestricted().to_string(), "anonymous");
        let odd = Principal::new(&"x\n".repeat(1000), AuthMethod::Basic, None).to_string();
        assert!(odd.starts_with("user:\"x\\n") && odd.len() < 300, "{odd}");
    }
}
