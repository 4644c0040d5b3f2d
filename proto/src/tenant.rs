//! Tenants: REAPI instance names read as dotted paths.
//!
//! The instance name `main.dev.alice` names tenant `main.dev.alice`, a
//! subtenant of `main.dev`, itself a subtenant of the base tenant `main`.
//! The CAS is shared within a base tenant; the AC is per tenant, with
//! read-through to ancestors (see the storage services).

/// The base tenant of an instance name: everything before the first `.`.
pub fn base(instance_name: &str) -> &str {
    instance_name.split_once('.').map_or(instance_name, |(base, _)| base)
}

/// The tenant itself and its ancestors, nearest first:
/// `main.dev.alice`, `main.dev`, `main`.
pub fn lineage(instance_name: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(instance_name);
    std::iter::from_fn(move || {
        let current = next?;
        next = current.rfind('.').map(|i| &current[..i]);
        Some(current)
    })
}

/// Whether `tenant` is `ancestor` or lies below it.
pub fn is_within(tenant: &str, ancestor: &str) -> bool {
    tenant == ancestor || tenant.strip_prefix(ancestor).is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_and_lineage() {
        assert_eq!(base("main.dev.alice"), "main");
        assert_eq!(base("main"), "main");
        assert_eq!(base(""), "");
        assert_eq!(base("team/ci.x"), "team/ci");
        assert_eq!(lineage("main.dev.alice").collect::<Vec<_>>(), ["main.dev.alice", "main.dev", "main"]);
        assert_eq!(lineage("").collect::<Vec<_>>(), [""]);
    }

    #[test]
    fn within() {
        assert!(is_within("main.dev", "main"));
        assert!(is_within("main", "main"));
        assert!(!is_within("mainx", "main"));
        assert!(!is_within("main", "main.dev"));
        assert!(!is_within("other", ""));
    }
}
