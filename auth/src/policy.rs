//! Who may do what where: rules from the configuration plus grants carried
//! by tokens.

use kiln_proto::{Code, Error, Result, tenant};
use serde::Deserialize;

use crate::permission::{Permission, Permissions};
use crate::principal::Principal;

/// A token tenant that stands for every tenant (for operators' admin tokens).
pub const ALL_TENANTS: &str = "*";

/// One configured rule: principals matching `principal` hold `permissions`
/// on tenants matching `tenant`. Patterns are literal except for `*`, which
/// matches any run of characters (`ci-*`, `main.*`, `*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub principal: String,
    pub tenant: String,
    pub permissions: Vec<String>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    principal: Glob,
    tenant: Glob,
    permissions: Permissions,
}

/// A pattern where `*` matches any run of characters, split once at
/// configuration time so that matching allocates nothing.
#[derive(Debug, Clone)]
struct Glob {
    /// The literal pieces between the `*`s; one piece means no `*`.
    parts: Vec<String>,
}

impl Glob {
    fn new(pattern: &str) -> Self {
        Self { parts: pattern.split('*').map(str::to_owned).collect() }
    }

    fn matches(&self, text: &str) -> bool {
        let parts = &self.parts;
        let (first, last) = (&parts[0], &parts[parts.len() - 1]);
        if parts.len() == 1 {
            return first == text;
        }
        if !text.starts_with(first.as_str())
            || text.len() < first.len() + last.len()
            || !text.ends_with(last.as_str())
        {
            return false;
        }
        let mut rest = &text[first.len()..text.len() - last.len()];
        for middle in &parts[1..parts.len() - 1] {
            match rest.find(middle.as_str()) {
                Some(i) => rest = &rest[i + middle.len()..],
                None => return false,
            }
        }
        true
    }
}

/// The authorization policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<CompiledRule>,
}

/// Matches `text` against a pattern where `*` matches any run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    Glob::new(pattern).matches(text)
}

impl Policy {
    pub fn new(rules: &[Rule]) -> Result<Self> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Ok(CompiledRule {
                    principal: Glob::new(&r.principal),
                    tenant: Glob::new(&r.tenant),
                    permissions: Permissions::parse(&r.permissions)
                        .map_err(|e| e.context(format!("rule #{i}")))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { rules })
    }

    /// The permissions `principal` holds on `tenant`.
    pub fn permissions(&self, principal: &Principal, tenant_name: &str) -> Permissions {
        if principal.is_unrestricted() {
            return Permissions::all();
        }
        let mut held = Permissions::NONE;
        if let Some(grant) = principal.grant()
            && (grant.tenant == ALL_TENANTS || tenant::is_within(tenant_name, &grant.tenant))
        {
            held = held.union(grant.permissions);
        }
        for rule in &self.rules {
            if rule.principal.matches(principal.name()) && rule.tenant.matches(tenant_name) {
                held = held.union(rule.permissions);
            }
        }
        held
    }

    pub fn allows(&self, principal: &Principal, tenant_name: &str, permission: Permission) -> bool {
        self.permissions(principal, tenant_name).contains(permission)
    }

    /// `Ok` if allowed; otherwise PERMISSION_DENIED naming what is missing.
    pub fn check(&self, principal: &Principal, tenant_name: &str, permission: Permission) -> Result<()> {
        if self.allows(principal, tenant_name, permission) {
            return Ok(());
        }
        tracing::info!(principal = principal.name(), tenant = tenant_name, %permission, "permission denied");
        Err(Error::new(
            Code::PermissionDenied,
            format!(
                "principal {:?} lacks the {permission} permission on instance {tenant_name:?}",
                principal.name()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::{AuthMethod, Grant};

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("ci-*", "ci-runner-1"));
        assert!(!glob_match("ci-*", "dev-1"));
        assert!(glob_match("main.*", "main.dev"));
        assert!(!glob_match("main.*", "main"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-c"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    #[test]
    fn rules_and_grants_combine() {
        let policy = Policy::new(&[
            Rule {
                principal: "ci-*".into(),
                tenant: "main".into(),
                permissions: vec!["read".into(), "write".into()],
            },
            Rule { principal: "*".into(), tenant: "main".into(), permissions: vec!["ac-read".into()] },
        ])
        .unwrap();
        let ci = Principal::new("ci-1", AuthMethod::ClientCertificate, None);
        assert!(policy.allows(&ci, "main", Permission::AcWrite));
        assert!(!policy.allows(&ci, "main.dev", Permission::AcWrite), "rules match tenants literally");
        let dev = Principal::new(
            "alice",
            AuthMethod::Token,
            Some(Grant {
                tenant: "main.dev".into(),
                permissions: Permissions::parse(["read", "write"]).unwrap(),
            }),
        );
        assert!(policy.allows(&dev, "main.dev", Permission::AcWrite));
        assert!(policy.allows(&dev, "main.dev.alice", Permission::CasWrite), "grants cover subtenants");
        assert!(policy.allows(&dev, "main", Permission::AcRead), "from the wildcard rule");
        assert!(!policy.allows(&dev, "main", Permission::AcWrite));
        let err = policy.check(&dev, "other", Permission::CasRead).unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("cas-read"));
    }

    #[test]
    fn bad_rule_is_named() {
        let err = Policy::new(&[Rule {
            principal: "*".into(),
            tenant: "*".into(),
            permissions: vec!["fly".into()],
        }])
        .unwrap_err();
        assert!(err.message().contains("rule #0"));
    }
}
