//! One thread per slot runs that slot's sandboxes, and makes the next one
//! ahead ([`sandbox::prepare`]) as soon as a run ends, so that the next
//! action finds stage 1 started, in its cgroups and mapped. The thread
//! lives as long as the worker: stage 1's parent-death signal follows the
//! thread that started it, so preparing and running must share one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::sandbox::{self, Outcome, Prepared, SandboxConfig, SandboxError, Spec};

type Reply = tokio::sync::oneshot::Sender<Result<Outcome, SandboxError>>;

struct Job {
    config: SandboxConfig,
    spec: Spec,
    /// Set when the run was abandoned: it must not start.
    cancelled: Arc<AtomicBool>,
    reply: Reply,
}

struct Slot {
    /// One job at a time: a slot runs one action at a time.
    jobs: tokio::sync::mpsc::Sender<Job>,
    /// The id of the sandbox this slot has ready, or is making.
    next_id: Arc<Mutex<Option<String>>>,
}

/// The worker's slots' sandbox threads.
pub struct Slots {
    slots: Vec<Slot>,
    prefix: String,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots").field("slots", &self.slots.len()).finish_non_exhaustive()
    }
}

impl Slots {
    /// `count` slots whose sandboxes' ids start with `prefix` (which a
    /// restarted worker sweeps).
    pub fn new(count: u32, prefix: &str) -> std::io::Result<Slots> {
        let mut slots = Vec::new();
        for n in 0..count {
            let (jobs, mut receiver) = tokio::sync::mpsc::channel(1);
            let next_id = Arc::new(Mutex::new(None));
            let shared = next_id.clone();
            let prefix = format!("{prefix}slot{n}-");
            std::thread::Builder::new()
                .name(format!("kiln-slot-{n}"))
                .spawn(move || serve(&mut receiver, &shared, &prefix))?;
            slots.push(Slot { jobs, next_id });
        }
        Ok(Slots { slots, prefix: prefix.to_owned() })
    }

    /// The id the next run on `slot` is to carry: that of the sandbox the
    /// slot has ready, else a fresh one.
    pub fn next_id(&self, slot: u32) -> String {
        let ready = self.slots.get(slot as usize).and_then(|s| lock(&s.next_id).clone());
        ready.unwrap_or_else(|| fresh_id(&format!("{}slot{slot}-", self.prefix)))
    }

    /// Runs `spec` on `slot`'s thread, in its prepared sandbox when that
    /// fits. Once `cancelled` is set the run does not start; one already
    /// started is for the caller to kill (its cgroups are named by
    /// `spec.id`, and exist before the check).
    pub async fn run(
        &self,
        slot: u32,
        config: SandboxConfig,
        spec: Spec,
        cancelled: Arc<AtomicBool>,
    ) -> Result<Outcome, SandboxError> {
        let gone = || SandboxError::Setup(format!("slot {slot}'s sandbox thread is gone"));
        let s = self.slots.get(slot as usize).ok_or_else(gone)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        s.jobs.send(Job { config, spec, cancelled, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Runs `job` in `ready`, or in a sandbox made now; not at all when it
/// was cancelled by the time its cgroups exist.
fn start(job: &Job, ready: Option<Prepared>) -> Result<Outcome, SandboxError> {
    let prepared = match ready {
        Some(p) => p,
        None => sandbox::prepare(&job.config, &job.spec)?,
    };
    if job.cancelled.load(Ordering::SeqCst) {
        return Err(SandboxError::Setup("the run was abandoned before it started".to_owned()));
    }
    sandbox::run_prepared(&job.config, prepared, &job.spec)
}

fn lock(m: &Mutex<Option<String>>) -> std::sync::MutexGuard<'_, Option<String>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn fresh_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// A slot's thread: runs each job, then makes the next sandbox like the
/// last run's, under the id it announced before answering.
fn serve(jobs: &mut tokio::sync::mpsc::Receiver<Job>, next_id: &Mutex<Option<String>>, prefix: &str) {
    let mut prepared: Option<Prepared> = None;
    let mut template: Option<(SandboxConfig, Spec)> = None;
    loop {
        if prepared.is_none()
            && let Some((config, spec)) = &template
            && let Some(id) = lock(next_id).clone()
        {
            match sandbox::prepare(config, &Spec { id, ..spec.clone() }) {
                Ok(p) => prepared = Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "could not prepare the next sandbox; the next run makes its own");
                    *lock(next_id) = None;
                }
            }
        }
        let Some(job) = jobs.blocking_recv() else { return };
        let ready = prepared
            .take()
            .filter(|p| p.fits(&job.config, &job.spec))
            .and_then(|mut p| p.is_alive().then_some(p));
        // A panic in the sandbox's code fails this run, not the slot.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start(&job, ready)))
            .unwrap_or_else(|_| Err(SandboxError::Setup("the sandbox's code panicked".to_owned())));
        // Announced before the answer, so that the next run asks for it.
        *lock(next_id) = Some(fresh_id(prefix));
        template = Some((job.config, job.spec));
        let _ = job.reply.send(result);
    }
}
