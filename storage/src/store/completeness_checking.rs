//! Hides action results whose outputs are no longer in the CAS.
//!
//! A client that gets an action result must be able to download every blob it
//! references, or "builds without the bytes" fail much later. This decorator
//! wraps the AC: on `get` it decodes the `ActionResult`, checks its output
//! files, stdout/stderr and output directory trees (and every file inside the
//! trees) against the CAS, and reports `NotFound` if anything is missing. The
//! CAS's `find_missing` extends the lifetime of everything it finds, so a hit
//! keeps its outputs alive.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kiln_proto::reapi::{ActionResult, Tree};
use kiln_proto::{Digest, DigestFunction, Error, Result};
use prost::Message;

use super::{AcKey, AcStore, CasKey, CasStore, Scope, read_all};

/// Bounds on the work one check does.
#[derive(Debug, Clone, Copy)]
pub struct CheckLimits {
    /// Most blobs one check may look up, over all outputs and tree files.
    pub referenced_blobs_max: usize,
    /// Most output trees fetched at once.
    pub tree_fetches_max: usize,
    /// Largest output tree read; a result with a larger one is a miss.
    pub tree_size_bytes_max: u64,
}

#[derive(Debug, Clone)]
pub struct CompletenessChecking<A, C> {
    action_cache: A,
    cas: C,
    limits: CheckLimits,
}

impl<A, C> CompletenessChecking<A, C> {
    pub fn new(action_cache: A, cas: C, limits: CheckLimits) -> Self {
        let limits = CheckLimits { tree_fetches_max: limits.tree_fetches_max.max(1), ..limits };
        Self { action_cache, cas, limits }
    }
}

/// Keys gathered for one check, bounded in total.
struct Referenced {
    scope: Scope,
    function: DigestFunction,
    count: usize,
    max: usize,
}

impl Referenced {
    fn add<'a>(
        &mut self,
        digests: impl Iterator<Item = &'a kiln_proto::reapi::Digest>,
        out: &mut Vec<CasKey>,
    ) -> Result<()> {
        for d in digests {
            self.count += 1;
            if self.count > self.max {
                return Err(Error::not_found(format!(
                    "action result references more than {} blobs (referenced_blobs_max)",
                    self.max
                )));
            }
            let digest =
                Digest::from_proto(Some(self.function), d).map_err(|e| Error::not_found(e.message()))?;
            out.push(CasKey::new(self.scope.clone(), digest));
        }
        Ok(())
    }
}

async fn fetch<'a, C: CasStore>(cas: &'a C, key: &'a CasKey, size_max: u64) -> (&'a CasKey, Result<Bytes>) {
    (key, read_all(cas, key, size_max).await)
}

impl<A: AcStore, C: CasStore> CompletenessChecking<A, C> {
    /// `Ok` if every blob the result references is in the CAS; `NotFound`
    /// if one is missing; other errors keep their codes.
    async fn check(&self, key: &AcKey, data: &Bytes) -> Result<()> {
        let result = ActionResult::decode(data.as_ref()).map_err(|e| {
            tracing::error!(action = %key, error = %e, "stored action result does not decode; treating it as absent");
            Error::not_found(format!("stored action result is unreadable: {e}"))
        })?;
        // Outputs live in the CAS of the action's base tenant.
        let mut refs = Referenced {
            scope: Scope::cas_of(key.instance.as_str()),
            function: key.action.function(),
            count: 0,
            max: self.limits.referenced_blobs_max,
        };
        let mut keys = Vec::new();
        refs.add(result.output_files.iter().filter_map(|f| f.digest.as_ref()), &mut keys)?;
        refs.add(result.stdout_digest.iter().chain(result.stderr_digest.iter()), &mut keys)?;
        refs.add(
            result.output_directories.iter().filter_map(|d| d.root_directory_digest.as_ref()),
            &mut keys,
        )?;
        let mut trees = Vec::new();
        refs.add(result.output_directories.iter().filter_map(|d| d.tree_digest.as_ref()), &mut trees)?;
        keys.extend(trees.iter().cloned());
        let missing = self.cas.find_missing(&keys).await?;
        if let Some(first) = missing.first() {
            return Err(Error::not_found(format!(
                "action result references {} blob(s) missing from the CAS, e.g. {first}",
                missing.len()
            )));
        }
        // Fetch the trees concurrently, at most `tree_fetches_max` at once.
        let mut pending = FuturesUnordered::new();
        let mut queued = trees.iter();
        let mut files = Vec::new();
        loop {
            while pending.len() < self.limits.tree_fetches_max {
                let Some(tree_key) = queued.next() else { break };
                pending.push(fetch(&self.cas, tree_key, self.limits.tree_size_bytes_max));
            }
            let Some((tree_key, tree)) = pending.next().await else { break };
            let tree = match tree {
                Ok(tree) => tree,
                // Too large to check within the bound: treat the result as absent.
                Err(e) if e.code() == kiln_proto::Code::ResourceExhausted => {
                    return Err(Error::not_found(format!("output tree {tree_key}: {}", e.message())));
                }
                Err(e) => return Err(e),
            };
            let tree = Tree::decode(tree.as_ref())
                .map_err(|e| Error::not_found(format!("output tree {tree_key} is unreadable: {e}")))?;
            for dir in tree.root.iter().chain(tree.children.iter()) {
                refs.add(dir.files.iter().filter_map(|f| f.digest.as_ref()), &mut files)?;
            }
        }
        let missing = self.cas.find_missing(&files).await?;
        if let Some(first) = missing.first() {
            return Err(Error::not_found(format!(
                "action result's output directories reference {} file(s) missing from the CAS, e.g. {first}",
                missing.len()
            )));
        }
        Ok(())
    }
}

impl<A: AcStore, C: CasStore> AcStore for CompletenessChecking<A, C> {
    async fn get(&self, key: &AcKey) -> Result<Bytes> {
        let data = self.action_cache.get(key).await?;
        match self.check(key, &data).await {
            Ok(()) => Ok(data),
            Err(e) if e.is_not_found() => {
                tracing::debug!(%key, error = %e, "hiding incomplete action result");
                Err(Error::not_found(format!("{key} is incomplete: {}", e.message())))
            }
            // The CAS could not answer (unavailable, data loss ...): say so,
            // rather than pretend the result is absent.
            Err(e) => Err(e.context(format!("checking {key}"))),
        }
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        self.action_cache.put(key, value).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BlobReader, BlobWriter, ByteRange, EmptyBlob, MemoryAc, MemoryCas, put_all};
    use kiln_proto::Code;
    use kiln_proto::reapi::{Directory, FileNode, OutputDirectory, OutputFile};

    const LIMITS: CheckLimits =
        CheckLimits { referenced_blobs_max: 1000, tree_fetches_max: 4, tree_size_bytes_max: 1 << 20 };

    async fn put_cas(cas: &impl CasStore, data: &[u8]) -> Digest {
        let d = DigestFunction::Sha256.compute(data);
        put_all(cas, &CasKey::in_instance("main", d), Bytes::copy_from_slice(data)).await.unwrap();
        d
    }

    fn tree_of(files: &[Digest]) -> Tree {
        Tree {
            root: Some(Directory {
                files: files
                    .iter()
                    .enumerate()
                    .map(|(i, d)| FileNode {
                        name: format!("f{i}"),
                        digest: Some(d.to_proto()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            children: vec![],
        }
    }

    fn action(name: &[u8]) -> AcKey {
        AcKey::new("main", DigestFunction::Sha256.compute(name))
    }

    #[tokio::test]
    async fn hides_results_with_missing_outputs() {
        let cas = EmptyBlob::new(MemoryCas::new(1 << 20, 1 << 10));
        let ac = CompletenessChecking::new(MemoryAc::new(1 << 20, 1 << 10), cas.clone(), LIMITS);
        let file = put_cas(&cas, b"output").await;
        let inner = put_cas(&cas, b"in tree").await;
        let tree = put_cas(&cas, &tree_of(&[inner]).encode_to_vec()).await;
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(file.to_proto()),
                ..Default::default()
            }],
            output_directories: vec![OutputDirectory {
                path: "dir".into(),
                tree_digest: Some(tree.to_proto()),
                ..Default::default()
            }],
            stdout_digest: Some(DigestFunction::Sha256.empty().to_proto()),
            ..Default::default()
        };
        ac.put(&action(b"action"), Bytes::from(result.encode_to_vec())).await.unwrap();
        ac.get(&action(b"action")).await.unwrap();

        // A result whose tree references a file that is gone is hidden.
        let gone = DigestFunction::Sha256.compute(b"never uploaded");
        let tree2 = put_cas(&cas, &tree_of(&[gone]).encode_to_vec()).await;
        let mut bad = result.clone();
        bad.output_directories[0].tree_digest = Some(tree2.to_proto());
        ac.put(&action(b"action2"), Bytes::from(bad.encode_to_vec())).await.unwrap();
        let err = ac.get(&action(b"action2")).await.unwrap_err();
        assert!(err.is_not_found());
        assert!(err.message().contains("missing from the CAS"), "{}", err.message());

        // So is one whose output file is gone.
        let mut bad = result;
        bad.output_files[0].digest = Some(gone.to_proto());
        ac.put(&action(b"action2"), Bytes::from(bad.encode_to_vec())).await.unwrap();
        assert!(ac.get(&action(b"action2")).await.unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn garbage_is_not_served() {
        let ac = CompletenessChecking::new(
            MemoryAc::new(1 << 20, 1 << 10),
            MemoryCas::new(1 << 20, 1 << 10),
            LIMITS,
        );
        ac.put(&action(b"a"), Bytes::from_static(b"\xff\xff\xff")).await.unwrap();
        assert!(ac.get(&action(b"a")).await.unwrap_err().is_not_found());
    }

    /// A CAS that fails every call, as a broken backend would.
    #[derive(Debug, Clone)]
    struct Failing(Code);

    #[derive(Debug)]
    struct Nothing;

    impl BlobReader for Nothing {
        fn len(&self) -> u64 {
            0
        }
        async fn next(&mut self) -> Result<Option<Bytes>> {
            Ok(None)
        }
        fn report_corrupt(&mut self, _: &str) {}
    }

    impl BlobWriter for Nothing {
        fn written(&self) -> u64 {
            0
        }
        async fn write(&mut self, _: Bytes) -> Result<()> {
            Ok(())
        }
        async fn commit(self) -> Result<()> {
            Ok(())
        }
    }

    impl CasStore for Failing {
        type Reader = Nothing;
        type Writer = Nothing;
        async fn read(&self, _: &CasKey, _: ByteRange) -> Result<Nothing> {
            Err(Error::new(self.0, "backend down"))
        }
        async fn write_from(&self, _: &CasKey, _: crate::store::Client) -> Result<Nothing> {
            Err(Error::new(self.0, "backend down"))
        }
        async fn find_missing(&self, _: &[CasKey]) -> Result<Vec<CasKey>> {
            Err(Error::new(self.0, "backend down"))
        }
    }

    fn result_with(files: usize) -> ActionResult {
        ActionResult {
            output_files: (0..files)
                .map(|i| OutputFile {
                    path: format!("f{i}"),
                    digest: Some(DigestFunction::Sha256.compute(format!("{i}").as_bytes()).to_proto()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn cas_errors_keep_their_codes() {
        for code in [Code::Unavailable, Code::DataLoss, Code::Internal] {
            let ac = CompletenessChecking::new(MemoryAc::new(1 << 20, 1 << 10), Failing(code), LIMITS);
            ac.put(&action(b"a"), Bytes::from(result_with(1).encode_to_vec())).await.unwrap();
            assert_eq!(ac.get(&action(b"a")).await.unwrap_err().code(), code);
        }
    }

    #[tokio::test]
    async fn the_bound_counts_every_list_together() {
        let cas = MemoryCas::new(1 << 20, 1 << 10);
        let mut digests = Vec::new();
        for i in 0..6 {
            digests.push(put_cas(&cas, format!("{i}").as_bytes()).await);
        }
        // A tree with 3 files, referenced next to 3 output files: 7 blobs in all.
        let tree = put_cas(&cas, &tree_of(&digests[3..]).encode_to_vec()).await;
        let mut result = result_with(3);
        result.output_directories.push(OutputDirectory {
            path: "d".into(),
            tree_digest: Some(tree.to_proto()),
            ..Default::default()
        });
        let encoded = Bytes::from(result.encode_to_vec());
        let tight = CompletenessChecking::new(
            MemoryAc::new(1 << 20, 1 << 10),
            cas.clone(),
            CheckLimits { referenced_blobs_max: 6, ..LIMITS },
        );
        tight.put(&action(b"a"), encoded.clone()).await.unwrap();
        let err = tight.get(&action(b"a")).await.unwrap_err();
        assert!(err.is_not_found() && err.message().contains("referenced_blobs_max"), "{}", err.message());
        let enough = CompletenessChecking::new(
            MemoryAc::new(1 << 20, 1 << 10),
            cas.clone(),
            CheckLimits { referenced_blobs_max: 7, ..LIMITS },
        );
        enough.put(&action(b"a"), encoded.clone()).await.unwrap();
        enough.get(&action(b"a")).await.unwrap();
        // A tree too large to check counts as absent.
        let small = CompletenessChecking::new(
            MemoryAc::new(1 << 20, 1 << 10),
            cas,
            CheckLimits { tree_size_bytes_max: 8, ..LIMITS },
        );
        small.put(&action(b"a"), encoded).await.unwrap();
        assert!(small.get(&action(b"a")).await.unwrap_err().is_not_found());
    }
}
