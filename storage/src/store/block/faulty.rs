//! A device that fails on purpose, for tests: I/O errors at seeded rates,
//! and power cuts that keep synced writes and lose, keep or tear (by
//! 512-byte sector) each write since the last sync, in any order.
//!
//! Everything it does follows from its seed, so a failing test replays.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::device::{BlockDevice, check_range};

/// Sector size for torn writes: a power cut keeps or loses whole sectors.
const SECTOR_BYTES: usize = 512;

/// How often operations fail, out of 1.0.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub read_error_rate: f64,
    pub write_error_rate: f64,
    pub sync_error_rate: f64,
}

#[derive(Debug)]
struct State {
    /// What survives a power cut for sure.
    durable: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<(u64, Vec<u8>)>,
    /// What reads see: `durable` with `pending` applied.
    view: Vec<u8>,
    rng: StdRng,
    faults: Faults,
    /// Counts of injected failures, for tests to assert on.
    injected: u64,
}

/// An in-memory device with seeded faults.
#[derive(Debug)]
pub struct FaultyDevice {
    state: Mutex<State>,
    len: AtomicU64,
    name: String,
}

fn usize_of(offset: u64) -> usize {
    usize::try_from(offset).unwrap_or(usize::MAX)
}

impl FaultyDevice {
    /// A zeroed device of `len` bytes whose faults follow `seed`.
    pub fn new(len: u64, seed: u64) -> FaultyDevice {
        Self::from_image(vec![0; usize_of(len)], seed, "faulty")
    }

    fn from_image(image: Vec<u8>, seed: u64, name: &str) -> FaultyDevice {
        let len = image.len() as u64;
        FaultyDevice {
            state: Mutex::new(State {
                view: image.clone(),
                durable: image,
                pending: Vec::new(),
                rng: StdRng::seed_from_u64(seed),
                faults: Faults::default(),
                injected: 0,
            }),
            len: AtomicU64::new(len),
            name: format!("{name} device (seed {seed})"),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state().faults = faults;
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> u64 {
        self.state().injected
    }

    /// The device a restart after a power cut now would find: synced
    /// writes, and of each later write nothing, all of it, or some of its
    /// sectors, as the seed decides.
    pub fn power_cut(&self, seed: u64) -> FaultyDevice {
        let state = self.state();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut image = state.durable.clone();
        for (offset, data) in &state.pending {
            let at = usize_of(*offset);
            match rng.random_range(0..3) {
                0 => {}
                1 => image[at..at + data.len()].copy_from_slice(data),
                _ => {
                    for (i, sector) in data.chunks(SECTOR_BYTES).enumerate() {
                        if rng.random_bool(0.5) {
                            let s = at + i * SECTOR_BYTES;
                            image[s..s + sector.len()].copy_from_slice(sector);
                        }
                    }
                }
            }
        }
        Self::from_image(image, seed, "restarted")
    }

    /// The device as it would be after a clean restart (everything written).
    pub fn restart(&self, seed: u64) -> FaultyDevice {
        Self::from_image(self.state().view.clone(), seed, "restarted")
    }

    /// The device after a clean restart, `extra` bytes longer (a grown
    /// volume: what it held is unchanged).
    pub fn grown(&self, seed: u64, extra: u64) -> FaultyDevice {
        let mut image = self.state().view.clone();
        image.resize(image.len() + usize_of(extra), 0);
        Self::from_image(image, seed, "grown")
    }

    /// Flips bits of the byte at `offset`, in every copy (a corrupt disk).
    pub fn corrupt(&self, offset: u64, mask: u8) {
        let mut state = self.state();
        let at = usize_of(offset);
        state.durable[at] ^= mask;
        state.view[at] ^= mask;
    }

    fn fail(state: &mut State, rate: f64, what: &str) -> io::Result<()> {
        if rate > 0.0 && state.rng.random_bool(rate.min(1.0)) {
            state.injected += 1;
            return Err(io::Error::other(format!("injected {what} error")));
        }
        Ok(())
    }
}

impl BlockDevice for FaultyDevice {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len())?;
        let mut state = self.state();
        let rate = state.faults.read_error_rate;
        Self::fail(&mut state, rate, "read")?;
        let at = usize_of(offset);
        buf.copy_from_slice(&state.view[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, data.len(), self.len())?;
        let mut state = self.state();
        let rate = state.faults.write_error_rate;
        Self::fail(&mut state, rate, "write")?;
        let at = usize_of(offset);
        state.view[at..at + data.len()].copy_from_slice(data);
        state.pending.push((offset, data.to_vec()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.state();
        let rate = state.faults.sync_error_rate;
        Self::fail(&mut state, rate, "sync")?;
        for (offset, data) in std::mem::take(&mut state.pending) {
            let at = usize_of(offset);
            state.durable[at..at + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    /// Grows like a file does: the new zeros are there at once (an
    /// allocation), durable or not.
    fn grow(&self, len: u64) -> io::Result<()> {
        let mut state = self.state();
        let rate = state.faults.write_error_rate;
        Self::fail(&mut state, rate, "grow")?;
        if len > self.len() {
            state.durable.resize(usize_of(len), 0);
            state.view.resize(usize_of(len), 0);
            self.len.store(len, Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

    use super::*;

    #[test]
    fn synced_writes_survive_and_later_ones_may_not() {
        let dev = FaultyDevice::new(4096, 1);
        dev.write_at(&[1; 1024], 0).unwrap();
        dev.sync().unwrap();
        dev.write_at(&[2; 1024], 0).unwrap();
        let mut outcomes = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let after = dev.power_cut(seed);
            let mut buf = [0u8; 1024];
            after.read_at(&mut buf, 0).unwrap();
            assert!(buf.iter().all(|b| *b == 1 || *b == 2), "only old or new bytes");
            let sectors: Vec<u8> = buf.chunks(512).map(|s| s[0]).collect();
            outcomes.insert(sectors);
        }
        assert!(outcomes.len() >= 3, "lost, kept and torn writes all happen: {outcomes:?}");
    }

    #[test]
    fn injected_errors_follow_the_seed() {
        let run = |seed| {
            let dev = FaultyDevice::new(4096, seed);
            dev.set_faults(Faults { write_error_rate: 0.5, ..Faults::default() });
            (0..32).map(|i| dev.write_at(&[0; 8], i * 8).is_ok()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert!(run(7).contains(&false) && run(7).contains(&true));
    }
}
