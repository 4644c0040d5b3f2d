//! Unfinished uploads, remembered so that clients can resume them.
//!
//! What is remembered is the store's open writer: the bytes received so far
//! are in the store already (in memory or on disk), uncommitted. Bounded by
//! count and by bytes written (`partial_uploads_max`,
//! `partial_uploads_bytes_max`); the least recently interrupted upload is
//! forgotten first, and a forgotten writer gives its space back. Resuming
//! takes the writer only if the client's offset matches it, so a write at a
//! wrong offset is refused without losing the state another attempt could
//! resume from.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

use crate::store::BlobWriter;

#[derive(Debug)]
pub(super) struct PartialUploads<W> {
    inner: Mutex<Inner<W>>,
    bytes_max: u64,
}

#[derive(Debug)]
struct Inner<W> {
    entries: LruCache<String, W>,
    bytes: u64,
}

impl<W: BlobWriter> PartialUploads<W> {
    pub(super) fn new(count_max: usize, bytes_max: u64) -> Self {
        let count = NonZeroUsize::new(count_max).unwrap_or(NonZeroUsize::MIN);
        Self { inner: Mutex::new(Inner { entries: LruCache::new(count), bytes: 0 }), bytes_max }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner<W>> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers `writer` as the interrupted upload `name`.
    pub(super) fn keep(&self, name: String, writer: W) {
        let len = writer.written();
        // Dropped outside the lock: a writer may give space back on drop.
        let mut dropped = Vec::new();
        {
            let mut inner = self.inner();
            if let Some(old) = inner.entries.pop(&name) {
                inner.bytes -= old.written();
                dropped.push(old);
            }
            if len == 0 || len > self.bytes_max {
                dropped.push(writer);
            } else {
                while inner.bytes + len > self.bytes_max {
                    let Some((_, evicted)) = inner.entries.pop_lru() else { break };
                    inner.bytes -= evicted.written();
                    dropped.push(evicted);
                }
                if let Some((_, evicted)) = inner.entries.push(name, writer) {
                    inner.bytes -= evicted.written();
                    dropped.push(evicted);
                }
                inner.bytes += len;
                debug_assert!(inner.bytes <= self.bytes_max);
            }
        }
        drop(dropped);
    }

    /// How many bytes of upload `name` are remembered.
    pub(super) fn committed(&self, name: &str) -> Option<u64> {
        self.inner().entries.peek(name).map(BlobWriter::written)
    }

    /// Takes the writer of `name` if it has written exactly `offset` bytes.
    pub(super) fn take_at(&self, name: &str, offset: u64) -> Option<W> {
        let mut inner = self.inner();
        if inner.entries.peek(name).map(BlobWriter::written) != Some(offset) {
            return None;
        }
        let writer = inner.entries.pop(name)?;
        inner.bytes -= writer.written();
        Some(writer)
    }

    /// Forgets upload `name` (the client restarted it or finished it).
    pub(super) fn forget(&self, name: &str) {
        let old = {
            let mut inner = self.inner();
            let old = inner.entries.pop(name);
            if let Some(old) = &old {
                inner.bytes -= old.written();
            }
            old
        };
        drop(old);
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> u64 {
        self.inner().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A writer that only counts.
    #[derive(Debug)]
    struct Counted(u64);

    impl BlobWriter for Counted {
        fn written(&self) -> u64 {
            self.0
        }
        async fn write(&mut self, chunk: Bytes) -> kiln_proto::Result<()> {
            self.0 += chunk.len() as u64;
            Ok(())
        }
        async fn commit(self) -> kiln_proto::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bounded_by_bytes_and_count_least_recent_first() {
        let p = PartialUploads::new(3, 100);
        p.keep("a".into(), Counted(40));
        p.keep("b".into(), Counted(40));
        p.keep("c".into(), Counted(40));
        assert_eq!(p.committed("a"), None, "over 100 bytes: the oldest went");
        assert_eq!(p.bytes(), 80);
        p.keep("d".into(), Counted(1));
        p.keep("e".into(), Counted(1));
        assert_eq!(p.committed("b"), None, "over 3 entries: the oldest went");
        assert_eq!(p.bytes(), 42);
        p.keep("huge".into(), Counted(101));
        assert_eq!(p.committed("huge"), None);
        assert_eq!(p.bytes(), 42);
    }

    #[test]
    fn a_wrong_offset_keeps_the_state() {
        let p = PartialUploads::new(4, 1000);
        p.keep("u".into(), Counted(5));
        assert!(p.take_at("u", 3).is_none());
        assert_eq!(p.committed("u"), Some(5));
        assert_eq!(p.take_at("u", 5).unwrap().0, 5);
        assert_eq!(p.committed("u"), None);
        assert_eq!(p.bytes(), 0);
    }
}
