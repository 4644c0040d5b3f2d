//! The queue of executions waiting for a worker, fair across tenants,
//! then across principals within a tenant, then across invocations.
//!
//! Executions wait in one FIFO per lane: a principal's invocation
//! (`tool_invocation_id`) in a tenant. When a worker slot frees, each lane
//! offers its best waiting execution that the worker can run (lowest
//! priority value, then oldest, among the first few). The tenant with the
//! fewest running executions per weight wins; within it, the principal
//! with the fewest running; within that, the invocation with the lowest
//! score `(running + 1) * 2^(priority / 100)`. Tenants therefore share the
//! slots by weight however many builds each runs and whatever priorities
//! they ask for; within a tenant, principals share its slots about evenly
//! however many builds each starts; a principal's builds share its part
//! about evenly whatever their sizes, and a priority 100 lower (more
//! urgent) doubles a build's share.

use std::collections::{HashMap, VecDeque};

use kiln_proto::limits::SCHEDULER_QUEUE_SCAN_MAX;
use serde::Deserialize;

/// An execution's handle in the scheduler.
pub type ExecId = u64;

/// What the queue needs to know of a waiting execution.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub id: ExecId,
    pub priority: i32,
    /// Arrival order, for ties.
    pub seq: u64,
}

/// Whose share an execution counts against: its tenant's, then its
/// principal's within the tenant, then its invocation's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Lane {
    pub tenant: String,
    pub principal: String,
    pub invocation: String,
}

impl Lane {
    pub fn new(tenant: &str, principal: &str, invocation: &str) -> Lane {
        Lane { tenant: tenant.to_owned(), principal: principal.to_owned(), invocation: invocation.to_owned() }
    }
}

/// A tenant's part of the slots (`[execution.tenants.NAME]`): `weight`
/// shares against the others' (1 when not configured), and at most
/// `slots_max` running at once (0: no cap; its executions wait, within the
/// queue timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantShare {
    pub weight: u32,
    pub slots_max: u32,
}

impl TenantShare {
    /// Whether `running` executions fill the cap.
    fn full(&self, running: u32) -> bool {
        self.slots_max > 0 && running >= self.slots_max
    }
}

impl Default for TenantShare {
    fn default() -> Self {
        TenantShare { weight: 1, slots_max: 0 }
    }
}

#[derive(Debug, Default)]
pub struct FairQueue {
    waiting: HashMap<Lane, VecDeque<Entry>>,
    running: HashMap<Lane, u32>,
    tenants_running: HashMap<String, u32>,
    /// Running executions per principal, per tenant.
    principals_running: HashMap<String, HashMap<String, u32>>,
    shares: HashMap<String, TenantShare>,
    /// A tenant came off its cap since [`FairQueue::take_uncapped`] was
    /// last asked: its waiting executions may fit any worker's free slot.
    uncapped: bool,
    len: usize,
}

/// How a lane's offer compares, lowest first: its tenant's running
/// executions per share, its principal's running executions, its
/// invocation's score, the priority, the arrival.
type Rank = (f64, u32, f64, i32, u64);

fn score(running: u32, priority: i32) -> f64 {
    f64::from(running + 1) * 2f64.powf(f64::from(priority) / 100.0)
}

impl FairQueue {
    /// A queue sharing slots between tenants by `shares`.
    pub fn with_shares(shares: HashMap<String, TenantShare>) -> FairQueue {
        FairQueue { shares, ..FairQueue::default() }
    }

    /// `tenant`'s running executions and share.
    fn tenant(&self, tenant: &str) -> (u32, TenantShare) {
        (
            self.tenants_running.get(tenant).copied().unwrap_or(0),
            self.shares.get(tenant).copied().unwrap_or_default(),
        )
    }

    /// Whether `tenant` runs as many executions as its cap allows.
    pub fn at_cap(&self, tenant: &str) -> bool {
        let (running, share) = self.tenant(tenant);
        share.full(running)
    }

    /// Whether a tenant came off its cap since the last call.
    pub fn take_uncapped(&mut self) -> bool {
        std::mem::take(&mut self.uncapped)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds an execution at the back of its invocation's queue (or the
    /// front, for a retry after its worker was lost).
    pub fn push(&mut self, lane: &Lane, entry: Entry, front: bool) {
        let q = self.waiting.entry(lane.clone()).or_default();
        if front {
            q.push_front(entry);
        } else {
            q.push_back(entry);
        }
        self.len += 1;
    }

    /// Removes a waiting execution; whether it was waiting.
    pub fn remove(&mut self, lane: &Lane, id: ExecId) -> bool {
        let Some(q) = self.waiting.get_mut(lane) else { return false };
        let Some(at) = q.iter().position(|e| e.id == id) else { return false };
        q.remove(at);
        if q.is_empty() {
            self.waiting.remove(lane);
        }
        self.len -= 1;
        true
    }

    /// Takes the execution a worker should run next, among those
    /// `can_run` accepts.
    pub fn pick(&mut self, mut can_run: impl FnMut(ExecId) -> bool) -> Option<(Lane, Entry)> {
        let mut best: Option<(Rank, &Lane, usize)> = None;
        for (lane, q) in &self.waiting {
            let (tenant, share) = self.tenant(&lane.tenant);
            if share.full(tenant) {
                continue;
            }
            let candidate = q
                .iter()
                .take(SCHEDULER_QUEUE_SCAN_MAX)
                .enumerate()
                .filter(|(_, e)| can_run(e.id))
                .min_by_key(|(_, e)| (e.priority, e.seq));
            let Some((at, e)) = candidate else { continue };
            let running = self.running.get(lane).copied().unwrap_or(0);
            let tenant_score = f64::from(tenant + 1) / f64::from(share.weight.max(1));
            let principal = self.principal_running(lane);
            let rank = (tenant_score, principal, score(running, e.priority), e.priority, e.seq);
            if best.as_ref().is_none_or(|(b, ..)| rank < *b) {
                best = Some((rank, lane, at));
            }
        }
        let (_, lane, at) = best?;
        let lane = lane.clone();
        let q = self.waiting.get_mut(&lane)?;
        let entry = q.remove(at)?;
        if q.is_empty() {
            self.waiting.remove(&lane);
        }
        self.len -= 1;
        Some((lane, entry))
    }

    fn principal_running(&self, lane: &Lane) -> u32 {
        self.principals_running.get(&lane.tenant).and_then(|p| p.get(&lane.principal)).copied().unwrap_or(0)
    }

    pub fn started(&mut self, lane: &Lane) {
        let principals = self.principals_running.entry(lane.tenant.clone()).or_default();
        *principals.entry(lane.principal.clone()).or_default() += 1;
        *self.running.entry(lane.clone()).or_default() += 1;
        *self.tenants_running.entry(lane.tenant.clone()).or_default() += 1;
    }

    pub fn stopped(&mut self, lane: &Lane) {
        let Some(n) = self.running.get_mut(lane) else { return };
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.running.remove(lane);
        }
        if let Some(principals) = self.principals_running.get_mut(&lane.tenant) {
            if let Some(p) = principals.get_mut(&lane.principal) {
                *p = p.saturating_sub(1);
                if *p == 0 {
                    principals.remove(&lane.principal);
                }
            }
            if principals.is_empty() {
                self.principals_running.remove(&lane.tenant);
            }
        }
        let was_full = self.at_cap(&lane.tenant);
        if let Some(t) = self.tenants_running.get_mut(&lane.tenant) {
            *t = t.saturating_sub(1);
            if *t == 0 {
                self.tenants_running.remove(&lane.tenant);
            }
        }
        self.uncapped |= was_full;
    }

    /// Every waiting execution, for sweeps.
    pub fn waiting(&self) -> impl Iterator<Item = (&Lane, &Entry)> {
        self.waiting.iter().flat_map(|(lane, q)| q.iter().map(move |e| (lane, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lane `invocation` of principal "p" in the tenant "t".
    fn lane(invocation: &str) -> Lane {
        Lane::new("t", "p", invocation)
    }

    fn fill_lane(q: &mut FairQueue, lane: &Lane, n: u64, first_seq: u64, priority: i32) {
        for i in 0..n {
            q.push(lane, Entry { id: first_seq + i, priority, seq: first_seq + i }, false);
        }
    }

    fn fill(q: &mut FairQueue, invocation: &str, n: u64, first_seq: u64, priority: i32) {
        fill_lane(q, &lane(invocation), n, first_seq, priority);
    }

    /// Runs `slots` executions at a time until `steps` have started;
    /// returns how many each lane started.
    fn simulate_lanes(q: &mut FairQueue, slots: usize, steps: usize) -> HashMap<Lane, usize> {
        let mut started: HashMap<Lane, usize> = HashMap::new();
        let mut running: VecDeque<Lane> = VecDeque::new();
        for _ in 0..steps {
            if running.len() == slots {
                let done = running.pop_front().unwrap();
                q.stopped(&done);
            }
            let (lane, _) = q.pick(|_| true).expect("work left");
            q.started(&lane);
            *started.entry(lane.clone()).or_default() += 1;
            running.push_back(lane);
        }
        started
    }

    /// [`simulate_lanes`] by invocation name.
    fn simulate(q: &mut FairQueue, slots: usize, steps: usize) -> HashMap<String, usize> {
        simulate_lanes(q, slots, steps).into_iter().map(|(lane, n)| (lane.invocation, n)).collect()
    }

    #[test]
    fn a_tenant_with_many_urgent_builds_takes_no_more_than_its_share() {
        let mut q = FairQueue::default();
        // Tenant "a": fifty builds at the most urgent priority there is.
        let urgent = *kiln_proto::limits::EXECUTION_PRIORITY_RANGE.start();
        for b in 0..50u64 {
            fill_lane(&mut q, &Lane::new("a", "p", &format!("build-{b}")), 100, b * 1000, urgent);
        }
        // Tenant "b": one build at the default priority.
        fill_lane(&mut q, &Lane::new("b", "p", "only"), 1000, 100_000, 0);
        let started = simulate_lanes(&mut q, 10, 1000);
        let by_tenant =
            |t: &str| started.iter().filter(|(l, _)| l.tenant == t).map(|(_, n)| n).sum::<usize>();
        let (a, b) = (by_tenant("a"), by_tenant("b"));
        assert!((450..=550).contains(&b), "tenants share the slots evenly: a {a}, b {b}");
    }

    /// Starts of tenant "a" (with `share`) against tenant "b", both with
    /// plenty waiting, in `steps` starts on `slots` slots.
    fn starts_of_a(share: TenantShare, slots: usize, steps: usize) -> (usize, usize) {
        let mut q = FairQueue::with_shares(HashMap::from([("a".to_owned(), share)]));
        fill_lane(&mut q, &Lane::new("a", "p", "x"), 2000, 0, 0);
        fill_lane(&mut q, &Lane::new("b", "p", "y"), 2000, 10_000, 0);
        let started = simulate_lanes(&mut q, slots, steps);
        let a = started.iter().filter(|(l, _)| l.tenant == "a").map(|(_, n)| n).sum::<usize>();
        (a, steps - a)
    }

    #[test]
    fn tenants_share_by_weight_within_their_caps() {
        let share = |weight, slots_max| TenantShare { weight, slots_max };
        let (a, b) = starts_of_a(share(3, 0), 8, 1000);
        assert!((700..=800).contains(&a), "weight 3 against 1: a {a}, b {b}");
        // A cap holds whatever the weight: "a" never runs more than 2.
        let (a, b) = starts_of_a(share(100, 2), 8, 800);
        assert!((150..=250).contains(&a), "2 slots of 8: a {a}, b {b}");
        // With only the capped tenant waiting, a slot stays free.
        let mut q = FairQueue::with_shares(HashMap::from([("a".to_owned(), share(1, 1))]));
        fill_lane(&mut q, &Lane::new("a", "p", "x"), 3, 0, 0);
        let (lane, _) = q.pick(|_| true).unwrap();
        q.started(&lane);
        assert!(q.pick(|_| true).is_none(), "the cap is reached");
        assert!(!q.take_uncapped());
        q.stopped(&lane);
        assert!(q.take_uncapped() && !q.take_uncapped(), "coming off the cap is told once");
        assert!(q.pick(|_| true).is_some());
    }

    /// Within a tenant, a principal running twenty builds at once shares
    /// the tenant's slots evenly with one running a single build.
    #[test]
    fn principals_share_their_tenants_slots_evenly() {
        let mut q = FairQueue::default();
        for b in 0..20u64 {
            fill_lane(&mut q, &Lane::new("t", "ci", &format!("build-{b}")), 100, b * 1000, 0);
        }
        fill_lane(&mut q, &Lane::new("t", "alice", "one"), 1000, 100_000, 0);
        let started = simulate_lanes(&mut q, 8, 800);
        let alice = started.iter().filter(|(l, _)| l.principal == "alice").map(|(_, n)| n).sum::<usize>();
        assert!((360..=440).contains(&alice), "principals share evenly: alice {alice} of 800");
    }

    #[test]
    fn a_huge_build_does_not_starve_a_small_one() {
        let mut q = FairQueue::default();
        fill(&mut q, "huge", 10_000, 0, 0);
        fill(&mut q, "small", 100, 20_000, 0);
        let started = simulate(&mut q, 8, 200);
        let (huge, small) = (started["huge"], started["small"]);
        assert!(small >= 90 && huge >= 90, "slots are shared about evenly: huge {huge}, small {small}");
    }

    #[test]
    fn priority_buys_a_larger_share_and_order_within_an_invocation() {
        let mut q = FairQueue::default();
        fill(&mut q, "urgent", 1000, 0, -100);
        fill(&mut q, "normal", 1000, 5000, 0);
        let started = simulate(&mut q, 12, 600);
        let ratio = started["urgent"] as f64 / started["normal"] as f64;
        assert!((1.6..2.5).contains(&ratio), "a priority 100 lower doubles the share: {started:?}");

        let mut q = FairQueue::default();
        q.push(&lane("a"), Entry { id: 1, priority: 5, seq: 1 }, false);
        q.push(&lane("a"), Entry { id: 2, priority: -5, seq: 2 }, false);
        assert_eq!(q.pick(|_| true).unwrap().1.id, 2, "the more urgent of one build's actions goes first");
        q.push(&lane("a"), Entry { id: 3, priority: 5, seq: 3 }, true);
        assert_eq!(q.pick(|_| true).unwrap().1.id, 1, "equal priority: the older");
    }

    #[test]
    fn workers_take_only_what_they_can_run() {
        let mut q = FairQueue::default();
        fill(&mut q, "a", 3, 0, 0);
        assert!(q.pick(|id| id == 7).is_none());
        assert_eq!(q.pick(|id| id == 2).unwrap().1.id, 2);
        assert!(q.remove(&lane("a"), 0));
        assert!(!q.remove(&lane("a"), 0));
        assert_eq!(q.len(), 1);
        assert_eq!(q.waiting().count(), 1);
    }
}
