//! The workloads of `kiln bench`: what each operation sends, and the set-up
//! (uploads, precomputed digests) done before the clock starts.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use kiln_proto::google::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::google::longrunning::operation;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    self, ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, ExecuteRequest, ExecuteResponse,
    FindMissingBlobsRequest, GetActionResultRequest, UpdateActionResultRequest, batch_update_blobs_request,
};
use kiln_proto::resource::{Compressor, ReadResource, WriteResource};
use kiln_proto::{Digest, DigestFunction};
use prost::Message;

use super::BenchOptions;
use crate::client::Connection;

/// Bytes per ByteStream Write message.
const WRITE_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// ByteStream Write of distinct blobs (server verifies every byte).
    BytestreamWrite,
    /// ByteStream Read of a cached blob.
    BytestreamRead,
    /// BatchUpdateBlobs of small blobs.
    BatchUpdate,
    /// BatchReadBlobs of small blobs.
    BatchRead,
    /// FindMissingBlobs, `digests_per_call` digests per call.
    FindMissing,
    /// GetActionResult of a present entry.
    AcGet,
    /// UpdateActionResult of distinct actions.
    AcUpdate,
    /// Execute of distinct no-op actions (`/bin/true`), skipping the cache:
    /// scheduling, sandbox and result handling end to end.
    Execute,
}

impl Workload {
    pub const ALL: [Workload; 8] = [
        Workload::BytestreamWrite,
        Workload::BytestreamRead,
        Workload::BatchUpdate,
        Workload::BatchRead,
        Workload::FindMissing,
        Workload::AcGet,
        Workload::AcUpdate,
        Workload::Execute,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::BytestreamWrite => "bytestream-write",
            Workload::BytestreamRead => "bytestream-read",
            Workload::BatchUpdate => "batch-update",
            Workload::BatchRead => "batch-read",
            Workload::FindMissing => "find-missing",
            Workload::AcGet => "ac-get",
            Workload::AcUpdate => "ac-update",
            Workload::Execute => "execute",
        }
    }

    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }

    fn batch_bytes(options: &BenchOptions) -> u64 {
        options.blob_size_bytes.saturating_mul(options.digests_per_call as u64)
    }

    /// How many operations the run makes.
    pub(super) fn operations(self, options: &BenchOptions) -> u64 {
        match self {
            Workload::BytestreamWrite | Workload::BytestreamRead => {
                options.total_bytes / options.blob_size_bytes.max(1)
            }
            Workload::BatchUpdate | Workload::BatchRead => {
                options.total_bytes / Self::batch_bytes(options).max(1)
            }
            Workload::FindMissing | Workload::AcGet | Workload::AcUpdate | Workload::Execute => {
                options.requests
            }
        }
    }

    /// Bytes of blobs held in memory for the run.
    pub(super) fn setup_bytes(self, options: &BenchOptions) -> u64 {
        match self {
            Workload::BytestreamWrite => self.operations(options).saturating_mul(options.blob_size_bytes),
            Workload::BytestreamRead => options.blob_size_bytes,
            Workload::BatchUpdate | Workload::BatchRead => Self::batch_bytes(options),
            _ => 0,
        }
    }
}

/// Fills `buf` with pseudo-random bytes (xorshift; fast, not for secrets).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// `count` distinct blobs of `size` bytes with their digests.
fn distinct_blobs(count: u64, size: u64, seed: u64) -> Vec<(Digest, Bytes)> {
    let size = usize::try_from(size).expect("bounded by SETUP_BYTES_MAX");
    let mut base = vec![0u8; size];
    fill(&mut base, seed);
    (0..count)
        .map(|i| {
            let mut blob = base.clone();
            let tag = (seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes();
            let n = tag.len().min(blob.len());
            blob[..n].copy_from_slice(&tag[..n]);
            let digest = DigestFunction::Sha256.compute(&blob);
            (digest, Bytes::from(blob))
        })
        .collect()
}

/// What the operations of a run use, prepared before timing starts.
#[derive(Debug)]
pub(super) struct Plan {
    workload: Workload,
    instance: String,
    blobs: Vec<(Digest, Bytes)>,
    digests: Vec<kiln_proto::reapi::Digest>,
    action: Digest,
}

async fn write(c: &Connection, instance: &str, digest: Digest, data: &Bytes) -> Result<u64> {
    let name = WriteResource {
        instance_name: instance.to_owned(),
        upload_id: uuid::Uuid::new_v4().to_string(),
        compressor: Compressor::Identity,
        digest,
    }
    .to_string();
    let chunks = data.len().div_ceil(WRITE_CHUNK_BYTES).max(1);
    let data = data.clone();
    let requests = futures::stream::iter((0..chunks).map(move |i| {
        let start = i * WRITE_CHUNK_BYTES;
        let end = (start + WRITE_CHUNK_BYTES).min(data.len());
        WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: i64::try_from(start).expect("in memory"),
            finish_write: i + 1 == chunks,
            data: data[start..end].to_vec(),
        }
    }));
    let response = c.bytestream().write(requests).await.context("ByteStream Write")?.into_inner();
    if response.committed_size != digest.size_bytes_i64() {
        bail!("committed {} of {} bytes", response.committed_size, digest.size_bytes());
    }
    Ok(digest.size_bytes())
}

impl Plan {
    pub(super) async fn prepare(c: &Connection, options: &BenchOptions) -> Result<Plan> {
        let workload = options.workload;
        let instance = options.instance.clone();
        let mut plan = Plan {
            workload,
            instance: instance.clone(),
            blobs: Vec::new(),
            digests: Vec::new(),
            action: DigestFunction::Sha256.compute(b"kiln bench action"),
        };
        match workload {
            Workload::BytestreamWrite => {
                let seed = rand_seed();
                plan.blobs = distinct_blobs(workload.operations(options), options.blob_size_bytes, seed);
            }
            Workload::BytestreamRead => {
                plan.blobs = distinct_blobs(1, options.blob_size_bytes, rand_seed());
                let (digest, data) = &plan.blobs[0];
                write(c, &instance, *digest, data).await.context("set-up upload")?;
            }
            Workload::BatchUpdate | Workload::BatchRead => {
                plan.blobs =
                    distinct_blobs(options.digests_per_call as u64, options.blob_size_bytes, rand_seed());
                plan.batch_update(c).await.context("set-up upload")?;
            }
            Workload::FindMissing => {
                plan.digests = (0..options.digests_per_call as u64)
                    .map(|i| DigestFunction::Sha256.compute(&i.to_le_bytes()).to_proto())
                    .collect();
            }
            Workload::AcGet => {
                let req = UpdateActionResultRequest {
                    instance_name: instance,
                    action_digest: Some(plan.action.to_proto()),
                    action_result: Some(ActionResult::default()),
                    ..Default::default()
                };
                ActionCacheClient::new(c.channel())
                    .update_action_result(req)
                    .await
                    .context("set-up UpdateActionResult (needs ac-write)")?;
            }
            Workload::AcUpdate => {}
            Workload::Execute => {
                let seed = rand_seed();
                let root = reapi::Directory::default().encode_to_vec();
                let mut blobs = vec![(DigestFunction::Sha256.compute(&root), Bytes::from(root.clone()))];
                let root = DigestFunction::Sha256.compute(&root);
                for i in 0..options.requests {
                    let command = reapi::Command {
                        arguments: vec!["/bin/true".into(), format!("{seed}-{i}")],
                        ..Default::default()
                    }
                    .encode_to_vec();
                    let command_digest = DigestFunction::Sha256.compute(&command);
                    let action = reapi::Action {
                        command_digest: Some(command_digest.to_proto()),
                        input_root_digest: Some(root.to_proto()),
                        ..Default::default()
                    }
                    .encode_to_vec();
                    let action_digest = DigestFunction::Sha256.compute(&action);
                    plan.digests.push(action_digest.to_proto());
                    blobs.push((command_digest, Bytes::from(command)));
                    blobs.push((action_digest, Bytes::from(action)));
                }
                for chunk in blobs.chunks(512) {
                    plan.blobs = chunk.to_vec();
                    plan.batch_update(c).await.context("set-up upload of the actions")?;
                }
                plan.blobs.clear();
            }
        }
        Ok(plan)
    }

    async fn batch_update(&self, c: &Connection) -> Result<u64> {
        let requests = self
            .blobs
            .iter()
            .map(|(d, data)| batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data: data.to_vec(),
                compressor: 0,
            })
            .collect();
        let req =
            BatchUpdateBlobsRequest { instance_name: self.instance.clone(), requests, ..Default::default() };
        let resp = c.cas().batch_update_blobs(req).await.context("BatchUpdateBlobs")?.into_inner();
        if let Some(bad) = resp.responses.iter().find(|r| r.status.as_ref().is_some_and(|s| s.code != 0)) {
            bail!("BatchUpdateBlobs refused a blob: {:?}", bad.status);
        }
        Ok(self.blobs.iter().map(|(d, _)| d.size_bytes()).sum())
    }

    /// Runs operation `op`; returns (payload bytes, items).
    pub(super) async fn run(&self, c: &Connection, op: u64) -> Result<(u64, u64)> {
        match self.workload {
            Workload::BytestreamWrite => {
                let (digest, data) = &self.blobs[usize::try_from(op).expect("bounded")];
                Ok((write(c, &self.instance, *digest, data).await?, 1))
            }
            Workload::BytestreamRead => {
                let digest = self.blobs[0].0;
                let name = ReadResource {
                    instance_name: self.instance.clone(),
                    compressor: Compressor::Identity,
                    digest,
                };
                let req = ReadRequest { resource_name: name.to_string(), read_offset: 0, read_limit: 0 };
                let mut stream = c.bytestream().read(req).await.context("ByteStream Read")?.into_inner();
                let mut received = 0u64;
                while let Some(chunk) = stream.message().await.context("ByteStream Read")? {
                    received += chunk.data.len() as u64;
                }
                if received != digest.size_bytes() {
                    bail!("read {received} of {} bytes", digest.size_bytes());
                }
                Ok((received, 1))
            }
            Workload::BatchUpdate => Ok((self.batch_update(c).await?, self.blobs.len() as u64)),
            Workload::BatchRead => {
                let req = BatchReadBlobsRequest {
                    instance_name: self.instance.clone(),
                    digests: self.blobs.iter().map(|(d, _)| d.to_proto()).collect(),
                    ..Default::default()
                };
                let resp = c.cas().batch_read_blobs(req).await.context("BatchReadBlobs")?.into_inner();
                Ok((resp.responses.iter().map(|r| r.data.len() as u64).sum(), resp.responses.len() as u64))
            }
            Workload::FindMissing => {
                let req = FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: self.digests.clone(),
                    digest_function: 0,
                };
                c.cas().find_missing_blobs(req).await.context("FindMissingBlobs")?;
                Ok((0, self.digests.len() as u64))
            }
            Workload::AcGet => {
                let req = GetActionResultRequest {
                    instance_name: self.instance.clone(),
                    action_digest: Some(self.action.to_proto()),
                    ..Default::default()
                };
                ActionCacheClient::new(c.channel())
                    .get_action_result(req)
                    .await
                    .context("GetActionResult")?;
                Ok((0, 1))
            }
            Workload::Execute => {
                let action = self.digests[usize::try_from(op).expect("bounded")].clone();
                let req = ExecuteRequest {
                    instance_name: self.instance.clone(),
                    action_digest: Some(action),
                    skip_cache_lookup: true,
                    ..Default::default()
                };
                let mut stream =
                    ExecutionClient::new(c.channel()).execute(req).await.context("Execute")?.into_inner();
                while let Some(op) = stream.message().await.context("Execute")? {
                    if !op.done {
                        continue;
                    }
                    let Some(operation::Result::Response(any)) = op.result else {
                        bail!("done without a response")
                    };
                    let response =
                        ExecuteResponse::decode(any.value.as_slice()).context("ExecuteResponse")?;
                    if let Some(s) = response.status.filter(|s| s.code != 0) {
                        bail!("Execute failed: {} {}", s.code, s.message);
                    }
                    let exit = response.result.map_or(-1, |r| r.exit_code);
                    if exit != 0 {
                        bail!("the action exited {exit}");
                    }
                    return Ok((0, 1));
                }
                bail!("the Execute stream ended before the operation was done")
            }
            Workload::AcUpdate => {
                let action = DigestFunction::Sha256.compute(&op.to_le_bytes());
                let req = UpdateActionResultRequest {
                    instance_name: self.instance.clone(),
                    action_digest: Some(action.to_proto()),
                    action_result: Some(ActionResult { exit_code: 0, ..Default::default() }),
                    ..Default::default()
                };
                ActionCacheClient::new(c.channel())
                    .update_action_result(req)
                    .await
                    .context("UpdateActionResult")?;
                Ok((0, 1))
            }
        }
    }
}

fn rand_seed() -> u64 {
    // Distinct blobs per run, so a second run against the same server does
    // not find its uploads already there.
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_distinct_and_sized() {
        let blobs = distinct_blobs(3, 1000, 42);
        assert_eq!(blobs.len(), 3);
        assert!(blobs.iter().all(|(d, b)| b.len() == 1000 && d.size_bytes() == 1000));
        assert_ne!(blobs[0].0, blobs[1].0);
        assert_ne!(blobs[1].0, blobs[2].0);
        for name in ["bytestream-read", "find-missing", "ac-update"] {
            assert_eq!(Workload::from_name(name).unwrap().name(), name);
        }
    }
}
