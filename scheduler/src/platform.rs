//! Platform matching: which workers may run an action.
//!
//! An action asks for properties (from `Action.platform`, else
//! `Command.platform`); a worker offers properties. Each property name
//! matches by a configured rule: `exact` (the default: the worker offers
//! that very value), `minimum` (numeric: the worker offers at least the
//! value, e.g. cores or memory) or `ignore` (any worker will do; the
//! property only informs the action). A property may be asked for more
//! than once (REAPI allows repeated names): every value must be offered.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kiln_proto::reapi;
use kiln_proto::{Error, Result};
use serde::Deserialize;

/// How one property name matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    #[default]
    Exact,
    Minimum,
    Ignore,
}

/// Properties, sorted by name then value, each pair once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Platform(Vec<(String, String)>);

impl Platform {
    pub fn new(mut properties: Vec<(String, String)>) -> Self {
        properties.sort();
        properties.dedup();
        Platform(properties)
    }

    /// The platform of an action: its own, else its command's (REAPI 2.2
    /// deprecates the latter, but Bazel 4 and Pants still send it there).
    #[allow(deprecated)]
    pub fn of(action: &reapi::Action, command: Option<&reapi::Command>) -> Self {
        let from = |p: &reapi::Platform| -> Vec<(String, String)> {
            p.properties.iter().map(|p| (p.name.clone(), p.value.clone())).collect()
        };
        match (&action.platform, command.and_then(|c| c.platform.as_ref())) {
            (Some(p), _) if !p.properties.is_empty() => Platform::new(from(p)),
            (_, Some(p)) => Platform::new(from(p)),
            _ => Platform::default(),
        }
    }

    pub fn properties(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn values_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(empty platform)");
        }
        let parts: Vec<String> = self.0.iter().map(|(n, v)| format!("{n}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// The matching rules, by property name.
#[derive(Debug, Clone, Default)]
pub struct Rules(BTreeMap<String, Rule>);

impl Rules {
    pub fn new(rules: BTreeMap<String, Rule>) -> Self {
        Rules(rules)
    }

    pub fn rule(&self, name: &str) -> Rule {
        self.0.get(name).copied().unwrap_or_default()
    }

    /// Whether a worker offering `offered` may run an action asking `wanted`.
    pub fn satisfies(&self, offered: &Platform, wanted: &Platform) -> bool {
        self.first_unmet(offered, wanted).is_none()
    }

    /// The first property of `wanted` that `offered` does not meet.
    fn first_unmet<'a>(&self, offered: &Platform, wanted: &'a Platform) -> Option<&'a (String, String)> {
        wanted.0.iter().find(|(name, value)| match self.rule(name) {
            Rule::Ignore => false,
            Rule::Exact => !offered.values_of(name).any(|v| v == value),
            Rule::Minimum => match value.parse::<f64>() {
                Ok(need) => !offered.values_of(name).any(|v| v.parse::<f64>().is_ok_and(|have| have >= need)),
                Err(_) => true,
            },
        })
    }

    /// Checks `wanted` is well formed: numeric where the rule is `minimum`.
    pub fn validate(&self, wanted: &Platform) -> Result<()> {
        for (name, value) in wanted.properties() {
            if self.rule(name) == Rule::Minimum && value.parse::<f64>().is_err() {
                return Err(Error::invalid_argument(format!(
                    "platform property {name} is matched as a minimum and needs a number, not {}",
                    kiln_proto::text::quoted(value)
                )));
            }
        }
        Ok(())
    }

    /// Why no worker of `offers` can run `wanted`: the property and the
    /// values on offer, for a FAILED_PRECONDITION message.
    pub fn explain<'a>(
        &self,
        offers: impl Iterator<Item = &'a Platform> + Clone,
        wanted: &Platform,
    ) -> String {
        // The property that the most workers fail on is the one to name.
        let mut counts: BTreeMap<&(String, String), usize> = BTreeMap::new();
        let mut workers = 0;
        for offered in offers.clone() {
            workers += 1;
            if let Some(p) = self.first_unmet(offered, wanted) {
                *counts.entry(p).or_default() += 1;
            }
        }
        if workers == 0 {
            return format!("no worker is registered to run platform {wanted}");
        }
        let Some(((name, value), _)) = counts.into_iter().max_by_key(|(_, c)| *c) else {
            return format!("no worker can run platform {wanted}");
        };
        let mut on_offer: Vec<&str> = offers.flat_map(|o| o.values_of(name)).collect();
        on_offer.sort_unstable();
        on_offer.dedup();
        let mut message = format!("no worker offers platform property {name}={value}");
        if on_offer.is_empty() {
            let _ = write!(message, "; no worker offers {name} at all");
        } else {
            let shown: Vec<&str> = on_offer.iter().take(16).copied().collect();
            let _ = write!(message, "; workers offer {name} = {}", shown.join(", "));
            if on_offer.len() > 16 {
                let _ = write!(message, " and {} more", on_offer.len() - 16);
            }
        }
        let _ = write!(message, " ({} rule; whole platform {wanted})", rule_name(self.rule(name)));
        message
    }
}

fn rule_name(rule: Rule) -> &'static str {
    match rule {
        Rule::Exact => "exact",
        Rule::Minimum => "minimum",
        Rule::Ignore => "ignore",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Platform {
        Platform::new(pairs.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect())
    }

    fn rules() -> Rules {
        Rules::new(
            [("cores".to_owned(), Rule::Minimum), ("label".to_owned(), Rule::Ignore)].into_iter().collect(),
        )
    }

    #[test]
    fn lost_platforms_are_bounded_and_forgotten_oldest_first_and_after_the_grace() {
        let start = tokio::time::Instant::now();
        let grace = std::time::Duration::from_secs(30);
        let mut lost = LostPlatforms::default();
        let max = kiln_proto::limits::LOST_PLATFORMS_MAX;
        for i in 0..=max {
            let at = start + std::time::Duration::from_millis(i as u64);
            lost.record(&p(&[("pool", &i.to_string())]), at);
        }
        assert_eq!(lost.0.len(), max, "past the bound, one is forgotten");
        let now = start + std::time::Duration::from_secs(1);
        assert!(!lost.covers(&rules(), &p(&[("pool", "0")]), now, grace), "the oldest went first");
        assert!(lost.covers(&rules(), &p(&[("pool", &max.to_string())]), now, grace));
        let later = start + grace + std::time::Duration::from_secs(2);
        assert!(!lost.covers(&rules(), &p(&[("pool", &max.to_string())]), later, grace), "past the grace");
    }

    #[test]
    fn exact_minimum_and_ignore() {
        let worker = p(&[("OSFamily", "linux"), ("ISA", "x86-64"), ("cores", "8")]);
        let r = rules();
        assert!(r.satisfies(&worker, &p(&[])), "an empty platform runs anywhere");
        assert!(r.satisfies(&worker, &p(&[("OSFamily", "linux")])));
        assert!(!r.satisfies(&worker, &p(&[("OSFamily", "windows")])));
        assert!(r.satisfies(&worker, &p(&[("cores", "4")])));
        assert!(r.satisfies(&worker, &p(&[("cores", "8")])));
        assert!(!r.satisfies(&worker, &p(&[("cores", "16")])));
        assert!(!r.satisfies(&worker, &p(&[("cores", "many")])));
        assert!(r.satisfies(&worker, &p(&[("label", "anything")])));
        assert!(!r.satisfies(&worker, &p(&[("container-image", "x")])), "an unknown property is exact");
        assert!(r.validate(&p(&[("cores", "many")])).is_err());
    }

    #[test]
    fn repeated_names_need_every_value() {
        let worker = p(&[("tag", "a"), ("tag", "b")]);
        let r = Rules::default();
        assert!(r.satisfies(&worker, &p(&[("tag", "a"), ("tag", "b")])));
        assert!(!r.satisfies(&worker, &p(&[("tag", "a"), ("tag", "c")])));
    }

    #[test]
    #[allow(deprecated)]
    fn action_platform_wins_over_command_platform() {
        let prop = |n: &str, v: &str| reapi::platform::Property { name: n.into(), value: v.into() };
        let action = reapi::Action {
            platform: Some(reapi::Platform { properties: vec![prop("OSFamily", "linux")] }),
            ..Default::default()
        };
        let command = reapi::Command {
            platform: Some(reapi::Platform { properties: vec![prop("OSFamily", "mac")] }),
            ..Default::default()
        };
        assert_eq!(Platform::of(&action, Some(&command)), p(&[("OSFamily", "linux")]));
        assert_eq!(Platform::of(&reapi::Action::default(), Some(&command)), p(&[("OSFamily", "mac")]));
        assert!(Platform::of(&reapi::Action::default(), None).is_empty());
    }

    #[test]
    fn explanations_name_the_property_and_what_is_offered() {
        let workers =
            [p(&[("OSFamily", "linux"), ("cores", "8")]), p(&[("OSFamily", "linux"), ("cores", "4")])];
        let text = rules().explain(workers.iter(), &p(&[("OSFamily", "windows")]));
        assert!(
            text.contains("OSFamily=windows") && text.contains("workers offer OSFamily = linux"),
            "{text}"
        );
        let text = rules().explain(workers.iter(), &p(&[("cores", "32")]));
        assert!(text.contains("cores=32") && text.contains("4, 8") && text.contains("minimum"), "{text}");
        let text = rules().explain([].iter(), &p(&[("OSFamily", "linux")]));
        assert!(text.contains("no worker is registered"), "{text}");
    }
}

/// Platforms of workers lost lately, with when. Until the grace after the
/// loss, an action for such a platform is queued (and waits, as queued
/// actions do, for the worker to come back or the grace to run out) rather
/// than refused: a worker restarting (`kiln serve`'s local worker, a
/// remote worker reconnecting) fails no build submitted meanwhile. At
/// most [`LOST_PLATFORMS_MAX`] platforms, the oldest forgotten first.
///
/// [`LOST_PLATFORMS_MAX`]: kiln_proto::limits::LOST_PLATFORMS_MAX
#[derive(Debug, Default)]
pub struct LostPlatforms(std::collections::HashMap<Platform, tokio::time::Instant>);

impl LostPlatforms {
    pub fn record(&mut self, platform: &Platform, now: tokio::time::Instant) {
        if !self.0.contains_key(platform) && self.0.len() >= kiln_proto::limits::LOST_PLATFORMS_MAX {
            let oldest = self.0.iter().min_by_key(|(_, at)| **at).map(|(p, _)| p.clone());
            if let Some(oldest) = oldest {
                self.0.remove(&oldest);
            }
        }
        self.0.insert(platform.clone(), now);
    }

    /// Whether a worker that could run `wanted` was lost less than `grace`
    /// before `now`.
    pub fn covers(
        &self,
        rules: &Rules,
        wanted: &Platform,
        now: tokio::time::Instant,
        grace: std::time::Duration,
    ) -> bool {
        self.0.iter().any(|(offered, at)| now.duration_since(*at) < grace && rules.satisfies(offered, wanted))
    }
}
