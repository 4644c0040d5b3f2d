//! Who may do what where: rules from the configuration for certificate and
//! basic-auth principals, and grants carried by tokens.
//!
//! Semantics (README "Securing Kiln" documents them for operators):
//!
//! - A rule or grant on a tenant covers the tenant and every subtenant:
//!   `tenant = "main"` applies to `main.dev.alice` as well. So what a
//!   principal holds on a tenant it holds on every subtenant, which is what
//!   lets a token's creator be checked on the token's tenant alone.
//! - Rules apply to certificate and basic-auth principals only. A rule's
//!   principal pattern may be narrowed to one kind with `cert:` or `user:`.
//! - A token's permissions are exactly its grant. Rules never apply to
//!   tokens, whatever their principal name, so a tenant admin cannot mint a
//!   token that borrows rules written for someone else.

use kiln_proto::access::{ALL_TENANTS, AuthMethod, Permissions, Policy, Principal};
use kiln_proto::{Error, Result, tenant};
use serde::Deserialize;

/// One configured rule: principals matching `principal` hold `permissions`
/// on tenants matching `tenant` and on their subtenants. Patterns are
/// literal except for `*`, which matches any run of characters (`ci-*`,
/// `main.*`, `*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub principal: String,
    pub tenant: String,
    pub permissions: Vec<String>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    /// Only principals of this kind, if the pattern said so.
    method: Option<AuthMethod>,
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

    /// Whether the pattern matches every text (it is made of `*`s only).
    fn matches_everything(&self) -> bool {
        self.parts.len() > 1 && self.parts.iter().all(String::is_empty)
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

/// Matches `text` against a pattern where `*` matches any run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    Glob::new(pattern).matches(text)
}

/// The authorization policy: configured rules plus token grants.
#[derive(Debug, Clone, Default)]
pub struct RulePolicy {
    rules: Vec<CompiledRule>,
}

impl RulePolicy {
    pub fn new(rules: &[Rule]) -> Result<Self> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (method, principal) = if let Some(rest) = r.principal.strip_prefix("cert:") {
                    (Some(AuthMethod::ClientCertificate), rest)
                } else if let Some(rest) = r.principal.strip_prefix("user:") {
                    (Some(AuthMethod::Basic), rest)
                } else if r.principal.starts_with("token:") {
                    return Err(Error::invalid_argument(format!(
                        "rule #{i}: rules never apply to tokens (a token's permissions are its grant); \
                         use `kiln token create --tenant ... --perm ...` instead"
                    )));
                } else {
                    (None, r.principal.as_str())
                };
                Ok(CompiledRule {
                    method,
                    principal: Glob::new(principal),
                    tenant: Glob::new(&r.tenant),
                    permissions: Permissions::parse(&r.permissions)
                        .map_err(|e| e.context(format!("rule #{i}")))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { rules })
    }

    fn applicable<'a>(&'a self, principal: &'a Principal) -> impl Iterator<Item = &'a CompiledRule> + 'a {
        let ruled = matches!(principal.method(), AuthMethod::ClientCertificate | AuthMethod::Basic);
        self.rules.iter().filter(move |rule| {
            ruled
                && rule.method.is_none_or(|m| m == principal.method())
                && rule.principal.matches(principal.name())
        })
    }
}

impl Policy for RulePolicy {
    fn permissions(&self, principal: &Principal, tenant_name: &str) -> Permissions {
        let mut held = Permissions::NONE;
        if let Some(grant) = principal.grant()
            && (grant.tenant == ALL_TENANTS || tenant::is_within(tenant_name, &grant.tenant))
        {
            held = held.union(grant.permissions);
        }
        for rule in self.applicable(principal) {
            if tenant::lineage(tenant_name).any(|t| rule.tenant.matches(t)) {
                held = held.union(rule.permissions);
            }
        }
        held
    }

    fn permissions_everywhere(&self, principal: &Principal) -> Permissions {
        let mut held = Permissions::NONE;
        if let Some(grant) = principal.grant()
            && grant.tenant == ALL_TENANTS
        {
            held = held.union(grant.permissions);
        }
        for rule in self.applicable(principal) {
            if rule.tenant.matches_everything() {
                held = held.union(rule.permissions);
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::access::{Grant, Permission};

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
        assert!(Glob::new("**").matches_everything() && !Glob::new("a*").matches_everything());
    }

    fn rule(principal: &str, tenant: &str, permissions: &[&str]) -> Rule {
        Rule {
            principal: principal.into(),
            tenant: tenant.into(),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    #[test]
    fn rules_cover_subtenants_and_grants_combine() {
        let policy =
            RulePolicy::new(&[rule("ci-*", "main", &["read", "write"]), rule("*", "main", &["ac-read"])])
                .unwrap();
        let ci = Principal::new("ci-1", AuthMethod::ClientCertificate, None);
        assert!(policy.permissions(&ci, "main").contains(Permission::AcWrite));
        assert!(
            policy.permissions(&ci, "main.dev.x").contains(Permission::AcWrite),
            "rules cover subtenants"
        );
        assert!(!policy.permissions(&ci, "mainx").contains(Permission::AcRead));
        assert!(policy.permissions(&ci, "other").is_empty());
        let alice = Principal::new("alice", AuthMethod::Basic, None);
        assert!(policy.permissions(&alice, "main.dev.alice").contains(Permission::AcRead));
        assert!(!policy.permissions(&alice, "main.dev.alice").contains(Permission::CasRead));
    }

    #[test]
    fn tokens_hold_their_grant_and_nothing_else() {
        let policy = RulePolicy::new(&[rule("*", "*", &["read"]), rule("ci", "other", &["write"])]).unwrap();
        let grant =
            Grant { tenant: "main.dev".into(), permissions: Permissions::parse(["read", "write"]).unwrap() };
        let token = Principal::token("ci", "0123", grant);
        assert!(policy.permissions(&token, "main.dev").contains(Permission::AcWrite));
        assert!(
            policy.permissions(&token, "main.dev.alice").contains(Permission::CasWrite),
            "grants cover subtenants"
        );
        assert!(policy.permissions(&token, "main").is_empty(), "no rule applies to a token");
        assert!(policy.permissions(&token, "other").is_empty(), "not even one naming its principal");
        assert!(policy.permissions_everywhere(&token).is_empty());
        let everywhere =
            Principal::token("ops", "1", Grant { tenant: "*".into(), permissions: Permissions::all() });
        assert_eq!(policy.permissions_everywhere(&everywhere), Permissions::all());
    }

    #[test]
    fn method_prefixes_narrow_rules() {
        let policy =
            RulePolicy::new(&[rule("cert:ci", "main", &["write"]), rule("*", "*", &["read"])]).unwrap();
        let cert = Principal::new("ci", AuthMethod::ClientCertificate, None);
        let user = Principal::new("ci", AuthMethod::Basic, None);
        assert!(policy.permissions(&cert, "main").contains(Permission::AcWrite));
        assert!(!policy.permissions(&user, "main").contains(Permission::AcWrite));
        assert_eq!(policy.permissions_everywhere(&user), Permissions::parse(["read"]).unwrap());
        let err = RulePolicy::new(&[rule("token:ci", "main", &["read"])]).unwrap_err();
        assert!(err.message().contains("never apply to tokens"), "{}", err.message());
    }

    #[test]
    fn bad_rule_is_named() {
        let err = RulePolicy::new(&[rule("*", "*", &["fly"])]).unwrap_err();
        assert!(err.message().contains("rule #0"));
    }
}
