//! Who is calling and what they may do: the value types every service and
//! tool shares, and the [`Authorizer`] services call.
//!
//! The server's machinery (TLS, tokens, htpasswd, rules) lives in
//! `kiln-auth` and plugs in through the [`Policy`] trait, so services and
//! tools depend on these types only.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Code, Error, Result};
use crate::text::quoted;

mod permission;
mod permit;
mod principal;

pub use permission::{Permission, Permissions};
pub use permit::{AcRight, AssetRight, CasRight, Permit, Right, rights};
pub use principal::{AuthMethod, ClientCertificate, Grant, PeerInfo, Principal};

/// A token tenant that stands for every tenant (for operators' admin tokens).
pub const ALL_TENANTS: &str = "*";

/// Decides what a principal may do on a tenant.
pub trait Policy: fmt::Debug + Send + Sync + 'static {
    /// The permissions `principal` holds on `tenant`. Must be monotone: what
    /// is held on a tenant is held on each of its subtenants.
    fn permissions(&self, principal: &Principal, tenant: &str) -> Permissions;

    /// The permissions `principal` holds on every tenant there is.
    fn permissions_everywhere(&self, principal: &Principal) -> Permissions;
}

/// Allows everything: servers without authentication, and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Policy for AllowAll {
    fn permissions(&self, _: &Principal, _: &str) -> Permissions {
        Permissions::all()
    }

    fn permissions_everywhere(&self, _: &Principal) -> Permissions {
        Permissions::all()
    }
}

/// The caller of one request: its principal and address.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub peer: Option<IpAddr>,
}

/// Counts events per client address to keep repeated ones out of the logs:
/// an address's 1st, 10th, 100th and 1000th event in a ten-minute window
/// are logged, then every 10,000th.
#[derive(Debug)]
pub struct PeerTally {
    counts: Mutex<HashMap<Option<IpAddr>, (u64, Instant)>>,
    peers_max: usize,
}

const TALLY_WINDOW: Duration = Duration::from_secs(600);

impl PeerTally {
    pub fn new(peers_max: usize) -> Self {
        Self { counts: Mutex::new(HashMap::new()), peers_max: peers_max.max(1) }
    }

    /// Counts one event from `peer`; returns the count in the current window
    /// and whether this one should be logged.
    pub fn count(&self, peer: Option<IpAddr>) -> (u64, bool) {
        let now = Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.len() >= self.peers_max && !counts.contains_key(&peer) {
            counts.retain(|_, (_, start)| now.duration_since(*start) < TALLY_WINDOW);
            if counts.len() >= self.peers_max {
                counts.clear();
            }
        }
        let entry = counts.entry(peer).or_insert((0, now));
        if now.duration_since(entry.1) >= TALLY_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        let n = entry.0;
        (n, matches!(n, 1 | 10 | 100 | 1000) || n.is_multiple_of(10_000))
    }
}

/// What services call to authorize an operation on a tenant.
#[derive(Clone)]
pub struct Authorizer {
    policy: Arc<dyn Policy>,
    denials: Arc<PeerTally>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl Default for Authorizer {
    fn default() -> Self {
        Self::allow_all()
    }
}

impl Authorizer {
    pub fn new(policy: impl Policy, peers_tracked_max: usize) -> Self {
        Self { policy: Arc::new(policy), denials: Arc::new(PeerTally::new(peers_tracked_max)) }
    }

    /// Allows everything (unrestricted servers and tests).
    pub fn allow_all() -> Self {
        Self::new(AllowAll, 1)
    }

    /// The request's principal (which the authentication layer put there)
    /// and its address.
    pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| Error::new(Code::Unauthenticated, "request was not authenticated"))?;
        let peer = request.extensions().get::<PeerInfo>().and_then(|p| p.remote_addr).map(|a| a.ip());
        Ok(Caller { principal, peer })
    }

    /// A permit for the request's caller to use `R` on `tenant`; otherwise
    /// PERMISSION_DENIED naming what is missing, logged (rate-limited per
    /// address).
    pub fn permit<R: Right, T>(&self, request: &tonic::Request<T>, tenant: &str) -> Result<Permit<R>> {
        let caller = Self::caller(request)?;
        self.require(&caller, tenant, R::PERMISSION)?;
        Ok(Permit::granted(caller, tenant))
    }

    /// A permit for `caller` (of a request already taken apart, such as a
    /// stream whose first message names the tenant) to use `R` on `tenant`.
    pub fn permit_for<R: Right>(&self, caller: &Caller, tenant: &str) -> Result<Permit<R>> {
        self.require(caller, tenant, R::PERMISSION)?;
        Ok(Permit::granted(caller.clone(), tenant))
    }

    /// A permit for the caller of `permit` to use `R` on `tenant` (another
    /// right, or another tenant); refused as [`Authorizer::permit`] is.
    pub fn extend<R: Right, Q: Right>(&self, permit: &Permit<Q>, tenant: &str) -> Result<Permit<R>> {
        self.require(permit.caller(), tenant, R::PERMISSION)?;
        Ok(Permit::granted(permit.caller().clone(), tenant))
    }

    /// Like [`Authorizer::extend`], but quietly `None` when the caller lacks
    /// it (a lookup that skips what the caller may not see is no refusal).
    pub fn try_extend<R: Right, Q: Right>(&self, permit: &Permit<Q>, tenant: &str) -> Option<Permit<R>> {
        self.allows(permit.principal(), tenant, R::PERMISSION)
            .then(|| Permit::granted(permit.caller().clone(), tenant))
    }

    /// Whether the request's caller holds `permission` somewhere it is
    /// asked about, without a permit (listings, status pages).
    pub fn allows(&self, principal: &Principal, tenant: &str, permission: Permission) -> bool {
        self.permissions(principal, tenant).contains(permission)
    }

    /// `Ok` if `caller` holds `permission` on `tenant`; otherwise
    /// PERMISSION_DENIED naming what is missing, logged (rate-limited per
    /// address).
    fn require(&self, caller: &Caller, tenant: &str, permission: Permission) -> Result<()> {
        // The call's span (when enabled) names the tenant it acts on.
        tracing::Span::current().record("tenant", tracing::field::display(quoted(tenant)));
        if self.allows(&caller.principal, tenant, permission) {
            return Ok(());
        }
        let labels = crate::metrics::ReasonLabels { reason: "permission_denied" };
        crate::metrics::global().auth_failures.get_or_create(&labels).inc();
        let (count, log) = self.denials.count(caller.peer);
        if log {
            tracing::info!(
                principal = %caller.principal,
                peer = ?caller.peer,
                tenant = %quoted(tenant),
                %permission,
                denials = count,
                "permission denied"
            );
        }
        Err(Error::new(
            Code::PermissionDenied,
            format!(
                "principal {} lacks the {permission} permission on instance {}",
                caller.principal,
                quoted(tenant)
            ),
        ))
    }

    /// Everything `principal` holds on `tenant`.
    pub fn permissions(&self, principal: &Principal, tenant: &str) -> Permissions {
        if principal.is_unrestricted() {
            return Permissions::all();
        }
        self.policy.permissions(principal, tenant)
    }

    /// Everything `principal` holds on every tenant.
    pub fn permissions_everywhere(&self, principal: &Principal) -> Permissions {
        if principal.is_unrestricted() {
            return Permissions::all();
        }
        self.policy.permissions_everywhere(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_logs_the_first_and_then_orders_of_magnitude() {
        let tally = PeerTally::new(2);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let logged: Vec<u64> =
            (0..20_000).map(|_| tally.count(a)).filter(|(_, l)| *l).map(|(n, _)| n).collect();
        assert_eq!(logged, [1, 10, 100, 1000, 10_000, 20_000]);
        // A flood of new addresses does not grow the map past its bound.
        for i in 0..1000u32 {
            tally.count(Some(IpAddr::from(i.to_be_bytes())));
        }
        assert!(tally.counts.lock().unwrap().len() <= 2);
    }

    #[test]
    fn denials_name_the_principal_and_bound_the_tenant() {
        #[derive(Debug)]
        struct Nothing;
        impl Policy for Nothing {
            fn permissions(&self, _: &Principal, _: &str) -> Permissions {
                Permissions::NONE
            }
            fn permissions_everywhere(&self, _: &Principal) -> Permissions {
                Permissions::NONE
            }
        }
        let auth = Authorizer::new(Nothing, 10);
        let caller =
            Caller { principal: Principal::new("ci", AuthMethod::ClientCertificate, None), peer: None };
        let request = |principal: Principal| {
            let mut request = tonic::Request::new(());
            request.extensions_mut().insert(principal);
            request
        };
        let ci = request(caller.principal.clone());
        let err = auth.permit::<rights::AcRead, _>(&ci, &"x".repeat(200_000)).unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("cert:ci") && err.message().contains("ac-read"), "{}", err.message());
        assert!(err.message().len() < 300, "{} bytes", err.message().len());
        let permit = auth.permit::<rights::Admin, _>(&request(Principal::unrestricted()), "main").unwrap();
        assert_eq!(permit.tenant(), "main");
        assert!(auth.try_extend::<rights::CasRead, _>(&permit, "other").is_some());
    }
}
