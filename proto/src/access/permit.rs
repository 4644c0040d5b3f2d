//! Permits: what an authorization check gives back.
//!
//! A [`Permit<R>`] proves that a caller holds the right `R` (a type per
//! permission, in [`rights`]) on one tenant. Only [`Authorizer`] makes
//! permits for callers, after the check; the keys the stores accept (a CAS
//! key, an action-cache key) are built from a permit for their tenant and a
//! right of their kind, so a handler that forgets to authorize does not
//! compile. Kiln's own work on a tenant (the scheduler reading an action it
//! was asked to run, the completeness check, a worker) uses
//! [`Permit::internal`], which the tidy test confines to named files.
//!
//! [`Authorizer`]: super::Authorizer

use std::marker::PhantomData;

use super::{Caller, Permission, Principal};

mod sealed {
    pub trait Sealed {}
}

/// A permission as a type.
pub trait Right: sealed::Sealed + Send + Sync + 'static {
    const PERMISSION: Permission;
}

/// The rights a CAS key may be built with.
pub trait CasRight: Right {}

/// The rights an action-cache key may be built with.
pub trait AcRight: Right {}

/// The rights an asset key (Remote Asset API) may be built with: reading
/// an asset needs what reading the CAS needs, pushing one what writing the
/// action cache needs (both map a name to content others will trust).
pub trait AssetRight: Right {}

/// One type per permission.
pub mod rights {
    use super::{AcRight, AssetRight, CasRight, Permission, Right, sealed};

    macro_rules! rights {
        ($($name:ident),* $(,)?) => {$(
            #[doc = concat!("The right `Permission::", stringify!($name), "` names.")]
            #[derive(Debug, Clone, Copy)]
            pub struct $name;
            impl sealed::Sealed for $name {}
            impl Right for $name {
                const PERMISSION: Permission = Permission::$name;
            }
        )*};
    }

    rights!(CasRead, CasWrite, AcRead, AcWrite, Execute, Admin, Worker, Urgent);

    impl CasRight for CasRead {}
    impl CasRight for CasWrite {}
    impl AcRight for AcRead {}
    impl AcRight for AcWrite {}
    impl AssetRight for CasRead {}
    impl AssetRight for AcWrite {}
}

/// Proof that a caller holds `R` on a tenant.
#[derive(Debug, Clone)]
pub struct Permit<R> {
    tenant: String,
    caller: Caller,
    right: PhantomData<fn() -> R>,
}

impl<R: Right> Permit<R> {
    /// Made by the [`Authorizer`](super::Authorizer) once the check passed.
    pub(super) fn granted(caller: Caller, tenant: &str) -> Self {
        Permit { tenant: tenant.to_owned(), caller, right: PhantomData }
    }

    /// For Kiln's own work on `tenant`, on no client's behalf: never in a
    /// service handler (the tidy test `internal_permits_stay_out_of_handlers`
    /// lists where it may appear).
    pub fn internal(tenant: &str) -> Self {
        Self::granted(Caller { principal: Principal::unrestricted(), peer: None }, tenant)
    }

    /// The instance name the right holds on.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    pub fn principal(&self) -> &Principal {
        &self.caller.principal
    }
}
