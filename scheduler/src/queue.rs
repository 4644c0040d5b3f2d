//! The queue of executions waiting for a worker, fair across invocations.
//!
//! Executions wait in one FIFO per invocation (`tool_invocation_id`). When
//! a worker slot frees, each invocation offers its best waiting execution
//! that the worker can run (lowest priority value, then oldest, among the
//! first few), and the invocation with the lowest score wins:
//! `(running + 1) * 2^(priority / 100)`. Two builds therefore share the
//! slots about evenly whatever their sizes, and a priority 100 lower
//! (more urgent) doubles a build's share.

use std::collections::{HashMap, VecDeque};

use kiln_proto::limits::SCHEDULER_QUEUE_SCAN_MAX;

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

#[derive(Debug, Default)]
pub struct FairQueue {
    waiting: HashMap<String, VecDeque<Entry>>,
    running: HashMap<String, u32>,
    len: usize,
}

fn score(running: u32, priority: i32) -> f64 {
    f64::from(running + 1) * 2f64.powf(f64::from(priority) / 100.0)
}

impl FairQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds an execution at the back of its invocation's queue (or the
    /// front, for a retry after its worker was lost).
    pub fn push(&mut self, invocation: &str, entry: Entry, front: bool) {
        let q = self.waiting.entry(invocation.to_owned()).or_default();
        if front {
            q.push_front(entry);
        } else {
            q.push_back(entry);
        }
        self.len += 1;
    }

    /// Removes a waiting execution; whether it was waiting.
    pub fn remove(&mut self, invocation: &str, id: ExecId) -> bool {
        let Some(q) = self.waiting.get_mut(invocation) else { return false };
        let Some(at) = q.iter().position(|e| e.id == id) else { return false };
        q.remove(at);
        if q.is_empty() {
            self.waiting.remove(invocation);
        }
        self.len -= 1;
        true
    }

    /// Takes the execution a worker should run next, among those
    /// `can_run` accepts.
    pub fn pick(&mut self, mut can_run: impl FnMut(ExecId) -> bool) -> Option<(String, Entry)> {
        let mut best: Option<(f64, i32, u64, &str, usize)> = None;
        for (invocation, q) in &self.waiting {
            let running = self.running.get(invocation).copied().unwrap_or(0);
            let candidate = q
                .iter()
                .take(SCHEDULER_QUEUE_SCAN_MAX)
                .enumerate()
                .filter(|(_, e)| can_run(e.id))
                .min_by_key(|(_, e)| (e.priority, e.seq));
            if let Some((at, e)) = candidate {
                let s = score(running, e.priority);
                let better = match &best {
                    None => true,
                    Some((bs, bp, bseq, ..)) => (s, e.priority, e.seq) < (*bs, *bp, *bseq),
                };
                if better {
                    best = Some((s, e.priority, e.seq, invocation.as_str(), at));
                }
            }
        }
        let (_, _, _, invocation, at) = best?;
        let invocation = invocation.to_owned();
        let q = self.waiting.get_mut(&invocation)?;
        let entry = q.remove(at)?;
        if q.is_empty() {
            self.waiting.remove(&invocation);
        }
        self.len -= 1;
        Some((invocation, entry))
    }

    pub fn started(&mut self, invocation: &str) {
        *self.running.entry(invocation.to_owned()).or_default() += 1;
    }

    pub fn stopped(&mut self, invocation: &str) {
        if let Some(n) = self.running.get_mut(invocation) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(invocation);
            }
        }
    }

    /// Every waiting execution, for sweeps.
    pub fn waiting(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.waiting.iter().flat_map(|(i, q)| q.iter().map(move |e| (i.as_str(), e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(q: &mut FairQueue, invocation: &str, n: u64, first_seq: u64, priority: i32) {
        for i in 0..n {
            q.push(invocation, Entry { id: first_seq + i, priority, seq: first_seq + i }, false);
        }
    }

    /// Runs `slots` executions at a time until `steps` have started;
    /// returns how many each invocation started.
    fn simulate(q: &mut FairQueue, slots: usize, steps: usize) -> HashMap<String, usize> {
        let mut started: HashMap<String, usize> = HashMap::new();
        let mut running: VecDeque<String> = VecDeque::new();
        for _ in 0..steps {
            if running.len() == slots {
                let done = running.pop_front().unwrap();
                q.stopped(&done);
            }
            let (invocation, _) = q.pick(|_| true).expect("work left");
            q.started(&invocation);
            *started.entry(invocation.clone()).or_default() += 1;
            running.push_back(invocation);
        }
        started
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
        q.push("a", Entry { id: 1, priority: 5, seq: 1 }, false);
        q.push("a", Entry { id: 2, priority: -5, seq: 2 }, false);
        assert_eq!(q.pick(|_| true).unwrap().1.id, 2, "the more urgent of one build's actions goes first");
        q.push("a", Entry { id: 3, priority: 5, seq: 3 }, true);
        assert_eq!(q.pick(|_| true).unwrap().1.id, 1, "equal priority: the older");
    }

    #[test]
    fn workers_take_only_what_they_can_run() {
        let mut q = FairQueue::default();
        fill(&mut q, "a", 3, 0, 0);
        assert!(q.pick(|id| id == 7).is_none());
        assert_eq!(q.pick(|id| id == 2).unwrap().1.id, 2);
        assert!(q.remove("a", 0));
        assert!(!q.remove("a", 0));
        assert_eq!(q.len(), 1);
        assert_eq!(q.waiting().count(), 1);
    }
}
