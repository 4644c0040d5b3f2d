//! Unfinished uploads, remembered so that clients can resume them.
//!
//! Bounded by count and by bytes (`partial_uploads_max`,
//! `partial_uploads_bytes_max`); the least recently interrupted upload is
//! forgotten first. Resuming takes the bytes only if the client's offset
//! matches them, so a write at a wrong offset is refused without losing the
//! state another attempt could resume from.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use bytes::Bytes;
use lru::LruCache;

#[derive(Debug)]
pub(super) struct PartialUploads {
    inner: Mutex<Inner>,
    bytes_max: u64,
}

#[derive(Debug)]
struct Inner {
    entries: LruCache<String, Bytes>,
    bytes: u64,
}

impl PartialUploads {
    pub(super) fn new(count_max: usize, bytes_max: u64) -> Self {
        let count = NonZeroUsize::new(count_max).unwrap_or(NonZeroUsize::MIN);
        Self { inner: Mutex::new(Inner { entries: LruCache::new(count), bytes: 0 }), bytes_max }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers `data` as the received prefix of upload `name`.
    pub(super) fn keep(&self, name: String, data: Bytes) {
        let len = data.len() as u64;
        let mut inner = self.inner();
        if let Some(old) = inner.entries.pop(&name) {
            inner.bytes -= old.len() as u64;
        }
        if len == 0 || len > self.bytes_max {
            return;
        }
        while inner.bytes + len > self.bytes_max {
            let Some((_, evicted)) = inner.entries.pop_lru() else { break };
            inner.bytes -= evicted.len() as u64;
        }
        if let Some((_, evicted)) = inner.entries.push(name, data) {
            inner.bytes -= evicted.len() as u64;
        }
        inner.bytes += len;
        debug_assert!(inner.bytes <= self.bytes_max);
    }

    /// How many bytes of upload `name` are remembered.
    pub(super) fn committed(&self, name: &str) -> Option<u64> {
        self.inner().entries.peek(name).map(|b| b.len() as u64)
    }

    /// Takes the remembered bytes of `name` if there are exactly `offset`.
    pub(super) fn take_at(&self, name: &str, offset: u64) -> Option<Bytes> {
        let mut inner = self.inner();
        if inner.entries.peek(name).map(|b| b.len() as u64) != Some(offset) {
            return None;
        }
        let data = inner.entries.pop(name)?;
        inner.bytes -= data.len() as u64;
        Some(data)
    }

    /// Forgets upload `name` (the client restarted it or finished it).
    pub(super) fn forget(&self, name: &str) {
        let mut inner = self.inner();
        if let Some(old) = inner.entries.pop(name) {
            inner.bytes -= old.len() as u64;
        }
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> u64 {
        self.inner().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_bytes_and_count_least_recent_first() {
        let p = PartialUploads::new(3, 100);
        p.keep("a".into(), Bytes::from(vec![0; 40]));
        p.keep("b".into(), Bytes::from(vec![0; 40]));
        p.keep("c".into(), Bytes::from(vec![0; 40]));
        assert_eq!(p.committed("a"), None, "over 100 bytes: the oldest went");
        assert_eq!(p.bytes(), 80);
        p.keep("d".into(), Bytes::from(vec![0; 1]));
        p.keep("e".into(), Bytes::from(vec![0; 1]));
        assert_eq!(p.committed("b"), None, "over 3 entries: the oldest went");
        assert_eq!(p.bytes(), 42);
        p.keep("huge".into(), Bytes::from(vec![0; 101]));
        assert_eq!(p.committed("huge"), None);
        assert_eq!(p.bytes(), 42);
    }

    #[test]
    fn a_wrong_offset_keeps_the_state() {
        let p = PartialUploads::new(4, 1000);
        p.keep("u".into(), Bytes::from_static(b"hello"));
        assert!(p.take_at("u", 3).is_none());
        assert_eq!(p.committed("u"), Some(5));
        assert_eq!(p.take_at("u", 5).unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(p.committed("u"), None);
        assert_eq!(p.bytes(), 0);
    }
}
