//! Permissions a principal holds on a tenant.

use std::fmt;

use crate::error::{Error, Result};
use serde::Deserialize;

/// One permission. `read` and `write` in configuration and on the command
/// line stand for the CAS and AC pairs, `all` for every permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    CasRead,
    CasWrite,
    AcRead,
    AcWrite,
    Execute,
    Admin,
    /// Connect to the scheduler's worker port as a worker.
    Worker,
    /// Ask for execution priorities below 0 (more urgent than the
    /// default); without it they are clamped to 0.
    Urgent,
}

impl Permission {
    pub const ALL: [Permission; 8] = [
        Permission::CasRead,
        Permission::CasWrite,
        Permission::AcRead,
        Permission::AcWrite,
        Permission::Execute,
        Permission::Admin,
        Permission::Worker,
        Permission::Urgent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Permission::CasRead => "cas-read",
            Permission::CasWrite => "cas-write",
            Permission::AcRead => "ac-read",
            Permission::AcWrite => "ac-write",
            Permission::Execute => "execute",
            Permission::Admin => "admin",
            Permission::Worker => "worker",
            Permission::Urgent => "urgent",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    pub const NONE: Permissions = Permissions(0);

    pub fn all() -> Self {
        Permission::ALL.into_iter().collect()
    }

    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    pub fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The permissions in `self` that `other` lacks.
    pub fn without(self, other: Permissions) -> Permissions {
        Permissions(self.0 & !other.0)
    }

    /// Whether every permission in `self` is also in `other`.
    pub fn is_subset(self, other: Permissions) -> bool {
        self.without(other).is_empty()
    }

    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.into_iter().filter(move |p| self.contains(*p))
    }

    /// Parses names such as `read`, `write`, `cas-read`, `admin`.
    pub fn parse<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut set = Permissions::NONE;
        for name in names {
            let name = name.as_ref().trim();
            let add: &[Permission] = match name {
                "all" => &Permission::ALL,
                "read" => &[Permission::CasRead, Permission::AcRead],
                "write" => &[Permission::CasWrite, Permission::AcWrite],
                "cas-read" => &[Permission::CasRead],
                "cas-write" => &[Permission::CasWrite],
                "ac-read" => &[Permission::AcRead],
                "ac-write" => &[Permission::AcWrite],
                "execute" => &[Permission::Execute],
                "admin" => &[Permission::Admin],
                "worker" => &[Permission::Worker],
                "urgent" => &[Permission::Urgent],
                other => {
                    return Err(Error::invalid_argument(format!(
                        "unknown permission {}; use read, write, cas-read, cas-write, ac-read, ac-write, execute, admin, worker, urgent or all",
                        crate::text::quoted(other)
                    )));
                }
            };
            set = set.union(add.iter().copied().collect());
        }
        Ok(set)
    }

    pub fn names(self) -> Vec<String> {
        self.iter().map(|p| p.name().to_owned()).collect()
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        Permissions(iter.into_iter().fold(0, |acc, p| acc | p.bit()))
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorthands_and_names() {
        let p = Permissions::parse(["read", "ac-write"]).unwrap();
        assert!(p.contains(Permission::CasRead) && p.contains(Permission::AcRead));
        assert!(p.contains(Permission::AcWrite) && !p.contains(Permission::CasWrite));
        assert_eq!(p.to_string(), "cas-read,ac-read,ac-write");
        assert_eq!(Permissions::parse(p.names()).unwrap(), p);
        assert!(Permissions::parse(["root"]).unwrap_err().message().contains("unknown permission"));
        assert_eq!(Permissions::all().iter().count(), 8);
        assert!(Permissions::parse(["worker"]).unwrap().contains(Permission::Worker));
        assert_eq!(Permissions::parse(["all"]).unwrap(), Permissions::all());
        let read = Permissions::parse(["read"]).unwrap();
        assert!(read.is_subset(p) && !p.is_subset(read));
        assert_eq!(p.without(read).to_string(), "ac-write");
    }
}
