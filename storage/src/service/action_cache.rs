//! `ActionCache`: GetActionResult and UpdateActionResult, isolated per
//! instance name.

use std::collections::HashSet;

use bytes::Bytes;
use kiln_proto::access::{Authorizer, Permit, rights};
use kiln_proto::limits::Limits;
use kiln_proto::reapi::action_cache_server::ActionCache;
use kiln_proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use kiln_proto::text::quoted;
use kiln_proto::{Digest, DigestFunction, Error};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::store::{AcKey, AcStore, CasKey, CasStore, put_all, read_all};

#[derive(Debug, Clone)]
pub struct ActionCacheService<A, C> {
    ac: A,
    cas: C,
    limits: Limits,
    auth: Authorizer,
}

impl<A, C> ActionCacheService<A, C> {
    /// `ac` should be wrapped in [`CompletenessChecking`](crate::store::CompletenessChecking)
    /// so that results with missing outputs are never served.
    pub fn new(ac: A, cas: C, limits: Limits, auth: Authorizer) -> Self {
        Self { ac, cas, limits, auth }
    }
}

/// Every digest an action result references, validated.
fn check_digests(function: DigestFunction, result: &ActionResult) -> Result<(), Error> {
    let files = result.output_files.iter().map(|f| (f.path.as_str(), f.digest.as_ref()));
    let dirs = result.output_directories.iter().map(|d| (d.path.as_str(), d.tree_digest.as_ref()));
    let logs =
        [("stdout_digest", result.stdout_digest.as_ref()), ("stderr_digest", result.stderr_digest.as_ref())];
    for (what, digest) in files.chain(dirs) {
        Digest::from_required(Some(function), digest, &format!("output {}", quoted(what)))?;
    }
    for (what, digest) in logs {
        if let Some(d) = digest {
            Digest::from_proto(Some(function), d).map_err(|e| e.context(what))?;
        }
    }
    Ok(())
}

/// Inlined contents a client sent, to be stored in the CAS.
type Outlined = Vec<(Digest, Bytes)>;

/// Moves inlined contents out of `result` into blobs for the CAS, checking
/// each against the digest the client gave, if any. Stores nothing: the
/// caller validates the whole result before anything is written.
fn outline(function: DigestFunction, result: &mut ActionResult) -> Result<Outlined, Error> {
    let mut blobs = Vec::new();
    let mut take = |what: &str, raw: &mut Vec<u8>, digest: &mut Option<kiln_proto::reapi::Digest>| {
        if raw.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::take(raw));
        let d = function.compute(&data);
        if digest.as_ref().is_some_and(|given| *given != d.to_proto()) {
            return Err(Error::invalid_argument(format!("{what}: inlined contents do not match its digest")));
        }
        *digest = Some(d.to_proto());
        blobs.push((d, data));
        Ok(())
    };
    take("stdout_raw", &mut result.stdout_raw, &mut result.stdout_digest)?;
    take("stderr_raw", &mut result.stderr_raw, &mut result.stderr_digest)?;
    for file in &mut result.output_files {
        let what = format!("output {}", quoted(&file.path));
        take(&what, &mut file.contents, &mut file.digest)?;
    }
    Ok(blobs)
}

impl<A: AcStore, C: CasStore> ActionCacheService<A, C> {
    /// Inlines what the client asked for, within the inline budget, if the
    /// caller may read the CAS; otherwise the digests alone answer.
    async fn inline(
        &self,
        permit: &Permit<rights::AcRead>,
        function: DigestFunction,
        req: &GetActionResultRequest,
        result: &mut ActionResult,
    ) {
        let wants = req.inline_stdout || req.inline_stderr || !req.inline_output_files.is_empty();
        if !wants {
            return;
        }
        let Some(cas) = self.auth.try_extend::<rights::CasRead, _>(permit, permit.tenant()) else { return };
        let mut budget = self.limits.inline_size_bytes_max;
        let mut take = |digest: &Option<kiln_proto::reapi::Digest>| -> Option<Digest> {
            let d = Digest::from_proto(Some(function), digest.as_ref()?).ok()?;
            (d.size_bytes() <= budget).then(|| {
                budget -= d.size_bytes();
                d
            })
        };
        let mut wanted = Vec::new();
        if req.inline_stdout {
            wanted.push((0usize, take(&result.stdout_digest)));
        }
        if req.inline_stderr {
            wanted.push((1, take(&result.stderr_digest)));
        }
        let paths: HashSet<&str> = req.inline_output_files.iter().map(String::as_str).collect();
        for (i, file) in result.output_files.iter().enumerate() {
            if paths.contains(file.path.as_str()) {
                wanted.push((2 + i, take(&file.digest)));
            }
        }
        for (slot, digest) in wanted {
            let Some(digest) = digest else { continue };
            // A blob that vanished since the completeness check is simply not
            // inlined; the client then fetches it and gets NOT_FOUND itself.
            let key = CasKey::of(&cas, digest);
            let Ok(data) = read_all(&self.cas, &key, digest.size_bytes()).await else { continue };
            match slot {
                0 => result.stdout_raw = data.to_vec(),
                1 => result.stderr_raw = data.to_vec(),
                n => result.output_files[n - 2].contents = data.to_vec(),
            }
        }
    }
}

#[tonic::async_trait]
impl<A: AcStore, C: CasStore> ActionCache for ActionCacheService<A, C> {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let permit = self.auth.permit::<rights::AcRead, _>(&request, &request.get_ref().instance_name)?;
        let req = request.into_inner();
        super::instance(&req.instance_name)?;
        let function = super::digest_function(req.digest_function)?;
        let action = Digest::from_required(function, req.action_digest.as_ref(), "action_digest")?;
        // The tenant's own result first, then its ancestors' (a developer on
        // `main.dev` reads what CI wrote to `main`), where the principal may
        // read them.
        let mut miss = None;
        for tenant in kiln_proto::tenant::lineage(&req.instance_name) {
            let here = if tenant == req.instance_name {
                permit.clone()
            } else {
                let Some(there) = self.auth.try_extend::<rights::AcRead, _>(&permit, tenant) else {
                    continue;
                };
                there
            };
            let data = match self.ac.get(&AcKey::of(&here, action)).await {
                Ok(data) => data,
                Err(e) if e.is_not_found() => {
                    miss.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mut result = ActionResult::decode(data.as_ref()).map_err(|e| {
                Status::internal(format!("stored action result for {action} is unreadable: {e}"))
            })?;
            self.inline(&permit, action.function(), &req, &mut result).await;
            lookup(&req.instance_name, "hit");
            return Ok(Response::new(result));
        }
        lookup(&req.instance_name, "miss");
        Err(miss.map_or_else(
            || {
                Status::not_found(format!(
                    "no action result for {action} in instance {}",
                    quoted(&req.instance_name)
                ))
            },
            Status::from,
        ))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let permit = self.auth.permit::<rights::AcWrite, _>(&request, &request.get_ref().instance_name)?;
        let req = request.into_inner();
        super::instance(&req.instance_name)?;
        let function = super::digest_function(req.digest_function)?;
        let action = Digest::from_required(function, req.action_digest.as_ref(), "action_digest")?;
        let Some(mut result) = req.action_result else {
            return Err(Status::invalid_argument("action_result is required"));
        };
        let returned = result.clone();
        // Validate everything before storing anything: a refused update
        // leaves no blob behind.
        let blobs = outline(action.function(), &mut result)?;
        check_digests(action.function(), &result)?;
        let encoded = result.encode_to_vec();
        if encoded.len() > self.limits.action_result_size_bytes_max {
            return Err(Status::invalid_argument(format!(
                "action result is {} bytes encoded; at most {} are accepted",
                encoded.len(),
                self.limits.action_result_size_bytes_max
            )));
        }
        if !blobs.is_empty() {
            let cas = self.auth.extend::<rights::CasWrite, _>(&permit, &req.instance_name)?;
            for (digest, data) in blobs {
                put_all(&self.cas, &CasKey::of(&cas, digest), data).await?;
            }
        }
        let key = AcKey::of(&permit, action);
        self.ac.put(&key, Bytes::from(encoded)).await?;
        tracing::debug!(action = %key, "action result stored");
        Ok(Response::new(returned))
    }
}

/// Counts a GetActionResult answer for the dashboards' hit ratio.
fn lookup(instance_name: &str, result: &'static str) {
    let labels = kiln_proto::metrics::LookupLabels {
        tenant: kiln_proto::metrics::tenant_label(instance_name),
        result,
    };
    let metrics = kiln_proto::metrics::global();
    metrics.ac_lookups.get_or_create(&labels).inc();
    let total = if result == "hit" { &metrics.totals.ac_hits } else { &metrics.totals.ac_misses };
    total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}
