//! Admission: byte budgets for memory that requests hold.
//!
//! A [`Budget`] bounds the bytes held at once by one kind of request
//! (uploads being received, read responses not yet taken by the network).
//! Bytes are charged as they are actually held, never up front for what a
//! request declares it will send, so a client trickling one byte at a time
//! holds one byte, not the size of the blob it announced. On top of the
//! total:
//!
//! - each client address may hold at most its share (`client_bytes_max`),
//!   so a few clients cannot take the whole budget;
//! - a charge waits at most `timeout` for room, then fails with
//!   RESOURCE_EXHAUSTED (which clients retry), so no request waits forever
//!   and two requests holding half each cannot wait on each other forever;
//! - the bytes of messages already received and waiting for room are
//!   bounded too (`waiting_bytes_max`): beyond it, requests are refused at
//!   once instead of piling up in memory.
//!
//! Charging is exact, in bytes: a request that fits the budget is admitted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::{Error, Result};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// A byte budget shared by the requests of one kind.
#[derive(Debug)]
pub struct Budget {
    /// What the bytes are, and the key that sets the limit, for messages.
    what: &'static str,
    key: &'static str,
    total_bytes_max: u64,
    bytes: Arc<Semaphore>,
    client_bytes_max: u64,
    clients: Mutex<HashMap<Option<IpAddr>, u64>>,
    released: Notify,
    waiting_bytes: AtomicU64,
    waiting_bytes_max: u64,
    timeout: Duration,
}

/// Bytes held against a [`Budget`]; returned when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    client: Option<IpAddr>,
    permit: Option<OwnedSemaphorePermit>,
}

/// Settings of a [`Budget`].
#[derive(Debug, Clone, Copy)]
pub struct BudgetLimits {
    pub total_bytes_max: u64,
    pub client_bytes_max: u64,
    pub waiting_bytes_max: u64,
    pub timeout: Duration,
}

fn usize_of(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

impl Budget {
    pub fn new(what: &'static str, key: &'static str, limits: BudgetLimits) -> Arc<Self> {
        let total = limits.total_bytes_max.min(Semaphore::MAX_PERMITS as u64);
        let budget = Arc::new(Self {
            what,
            key,
            total_bytes_max: total,
            bytes: Arc::new(Semaphore::new(usize_of(total))),
            client_bytes_max: limits.client_bytes_max.min(total),
            clients: Mutex::new(HashMap::new()),
            released: Notify::new(),
            waiting_bytes: AtomicU64::new(0),
            waiting_bytes_max: limits.waiting_bytes_max,
            timeout: limits.timeout,
        });
        BudgetCollector::track(&budget);
        budget
    }

    /// An empty charge for `client`, to grow as bytes arrive.
    pub fn charge(self: &Arc<Self>, client: Option<IpAddr>) -> Charge {
        Charge { budget: self.clone(), client, permit: None }
    }

    /// Bytes held now, across all clients.
    pub fn held_bytes(&self) -> u64 {
        self.total_bytes_max - self.bytes.available_permits() as u64
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<Option<IpAddr>, u64>> {
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn busy(&self, detail: &str) -> Error {
        kiln_proto::metrics::global().admission_refusals.inc();
        Error::resource_exhausted(format!(
            "the server is busy: {detail} ({} is {}); retry later",
            self.key, self.total_bytes_max
        ))
    }

    /// Takes `bytes` of `client`'s share, waiting for it until `deadline`.
    async fn take_client_share(
        &self,
        client: Option<IpAddr>,
        bytes: u64,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        loop {
            let notified = self.released.notified();
            {
                let mut clients = self.clients();
                let held = clients.get(&client).copied().unwrap_or(0);
                if held + bytes <= self.client_bytes_max {
                    clients.insert(client, held + bytes);
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.busy(&format!(
                    "this client already holds its share of {} bytes of {}",
                    self.client_bytes_max, self.what
                )));
            }
        }
    }

    fn return_client_share(&self, client: Option<IpAddr>, bytes: u64) {
        let mut clients = self.clients();
        if let Some(held) = clients.get_mut(&client) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                clients.remove(&client);
            }
        }
    }
}

impl Charge {
    /// The client this charge is for.
    pub fn client(&self) -> Option<IpAddr> {
        self.client
    }

    /// Bytes this charge holds.
    pub fn bytes(&self) -> u64 {
        self.permit.as_ref().map_or(0, |p| p.num_permits() as u64)
    }

    /// Holds `bytes` more, waiting for room at most the budget's timeout.
    pub async fn grow(&mut self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let budget = self.budget.clone();
        if bytes > budget.client_bytes_max || self.bytes() + bytes > budget.client_bytes_max {
            return Err(Error::resource_exhausted(format!(
                "one request may hold at most {} bytes of {}",
                budget.client_bytes_max, budget.what
            )));
        }
        // Fast path: room right away, nothing waits.
        let fits_client = {
            let mut clients = budget.clients();
            let held = clients.get(&self.client).copied().unwrap_or(0);
            let fits = held + bytes <= budget.client_bytes_max;
            if fits {
                clients.insert(self.client, held + bytes);
            }
            fits
        };
        if fits_client
            && let Ok(permit) =
                budget.bytes.clone().try_acquire_many_owned(u32::try_from(bytes).unwrap_or(u32::MAX))
        {
            self.add(permit);
            return Ok(());
        }
        // The message is already in memory while it waits: bound those bytes.
        let waiting = budget.waiting_bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
        let result = if waiting > budget.waiting_bytes_max {
            if fits_client {
                budget.return_client_share(self.client, bytes);
            }
            Err(budget.busy(&format!("{waiting} bytes of {} are already waiting for memory", budget.what)))
        } else {
            // On failure, `wait` returns the client share it holds.
            self.wait(bytes, fits_client).await
        };
        budget.waiting_bytes.fetch_sub(bytes, Ordering::SeqCst);
        result
    }

    async fn wait(&mut self, bytes: u64, have_client_share: bool) -> Result<()> {
        kiln_proto::metrics::global().admission_waits.inc();
        let budget = self.budget.clone();
        let deadline = tokio::time::Instant::now() + budget.timeout;
        if !have_client_share {
            budget.take_client_share(self.client, bytes, deadline).await?;
        }
        let acquire = budget.bytes.clone().acquire_many_owned(u32::try_from(bytes).unwrap_or(u32::MAX));
        match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok(permit)) => {
                self.add(permit);
                Ok(())
            }
            Ok(Err(_)) => {
                budget.return_client_share(self.client, bytes);
                Err(Error::new(kiln_proto::Code::Unavailable, "the server is shutting down"))
            }
            Err(_) => {
                budget.return_client_share(self.client, bytes);
                Err(budget.busy(&format!(
                    "waited {:?} for {bytes} bytes of {} while {} were held",
                    budget.timeout,
                    budget.what,
                    budget.held_bytes()
                )))
            }
        }
    }

    fn add(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
    }

    /// Gives back `bytes` of what this charge holds (at most all of it).
    pub fn shrink(&mut self, bytes: u64) {
        let held = self.bytes();
        let bytes = bytes.min(held);
        if bytes == 0 {
            return;
        }
        if bytes == held {
            self.permit = None;
        } else if let Some(permit) = &mut self.permit {
            drop(permit.split(usize_of(bytes)));
        }
        self.budget.return_client_share(self.client, bytes);
        self.budget.released.notify_waiters();
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.shrink(u64::MAX);
    }
}

/// Exports the bytes every live budget holds and has waiting, summed by
/// what they hold (`uploads`, `reads`, `responses`).
#[derive(Debug)]
struct BudgetCollector {
    budgets: Mutex<Vec<std::sync::Weak<Budget>>>,
}

impl BudgetCollector {
    fn track(budget: &Arc<Budget>) {
        static COLLECTOR: std::sync::OnceLock<Arc<BudgetCollector>> = std::sync::OnceLock::new();
        let collector = COLLECTOR.get_or_init(|| {
            let c = Arc::new(BudgetCollector { budgets: Mutex::new(Vec::new()) });
            kiln_proto::metrics::global().add_collector(c.clone());
            c
        });
        let mut budgets = collector.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        budgets.retain(|b| b.strong_count() > 0);
        budgets.push(Arc::downgrade(budget));
    }
}

impl prometheus_client::collector::Collector for BudgetCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let mut sums: std::collections::BTreeMap<&'static str, (u64, u64, u64)> = Default::default();
        for b in self.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            if let Some(b) = b.upgrade() {
                let sum = sums.entry(b.what).or_default();
                sum.0 += b.held_bytes();
                sum.1 += b.waiting_bytes.load(Ordering::Relaxed);
                sum.2 += b.total_bytes_max;
            }
        }
        type Pick = fn(&(u64, u64, u64)) -> u64;
        let families: [(&str, &str, Pick); 3] = [
            ("admission_held_bytes", "Bytes held in memory by uploads, reads and responses in flight", |s| {
                s.0
            }),
            ("admission_waiting_bytes", "Bytes received and waiting for room in the budget", |s| s.1),
            ("admission_budget_bytes", "The memory budgets (configured limits)", |s| s.2),
        ];
        for (name, help, pick) in families {
            let gauge = ConstGauge::new(0i64);
            let mut family = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            for (what, sum) in &sums {
                let labels = [("budget", *what)];
                let value = i64::try_from(pick(sum)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::Code;

    fn budget(total: u64, client: u64, waiting: u64, timeout_ms: u64) -> Arc<Budget> {
        Budget::new(
            "uploads",
            "uploads_in_flight_bytes_max",
            BudgetLimits {
                total_bytes_max: total,
                client_bytes_max: client,
                waiting_bytes_max: waiting,
                timeout: Duration::from_millis(timeout_ms),
            },
        )
    }

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, n]))
    }

    #[tokio::test(start_paused = true)]
    async fn charges_are_exact_and_returned_on_drop() {
        let b = budget(1_000_000, 1_000_000, 1 << 20, 1000);
        let mut c = b.charge(ip(1));
        c.grow(1_000_000).await.unwrap();
        assert_eq!(b.held_bytes(), 1_000_000, "the largest charge that fits is admitted");
        drop(c);
        assert_eq!(b.held_bytes(), 0);
        assert!(b.clients().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_makes_charges_wait_then_fail() {
        let b = budget(100, 100, 1000, 1000);
        let mut hog = b.charge(ip(1));
        hog.grow(100).await.unwrap();
        let mut other = b.charge(ip(2));
        let err = other.grow(1).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.message().contains("uploads_in_flight_bytes_max"), "{}", err.message());
        // Room made while waiting admits the waiter.
        let waiter = tokio::spawn({
            let b = b.clone();
            async move {
                let mut c = b.charge(ip(2));
                c.grow(10).await.map(|()| c.bytes())
            }
        });
        tokio::task::yield_now().await;
        hog.shrink(50);
        assert_eq!(waiter.await.unwrap().unwrap(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn one_client_cannot_take_everything() {
        let b = budget(100, 30, 1000, 1000);
        let mut a1 = b.charge(ip(1));
        a1.grow(30).await.unwrap();
        let mut a2 = b.charge(ip(1));
        assert_eq!(a2.grow(1).await.unwrap_err().code(), Code::ResourceExhausted);
        let mut other = b.charge(ip(2));
        other.grow(30).await.unwrap();
        assert!(b.charge(ip(3)).grow(31).await.is_err(), "above one client's share");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_bytes_are_bounded() {
        let b = budget(10, 10, 15, 60_000);
        let mut hog = b.charge(ip(1));
        hog.grow(10).await.unwrap();
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.charge(ip(2)).grow(10).await }
        });
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        let err = b.charge(ip(3)).grow(10).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO, "refused at once, not after waiting");
        assert!(err.message().contains("already waiting"), "{}", err.message());
        drop(hog);
        first.await.unwrap().unwrap();
    }
}
