//! `ActionCache`: GetActionResult and UpdateActionResult, isolated per
//! instance name.

use std::collections::HashSet;

use bytes::Bytes;
use kiln_proto::reapi::action_cache_server::ActionCache;
use kiln_proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use kiln_proto::{Digest, DigestFunction, Error};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::limits::Limits;
use crate::store::{BlobStore, Key, Scope};
use kiln_auth::{Authorizer, Permission};

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
        Digest::from_required(Some(function), digest, &format!("output {what:?}"))?;
    }
    for (what, digest) in logs {
        if let Some(d) = digest {
            Digest::from_proto(Some(function), d).map_err(|e| e.context(what))?;
        }
    }
    Ok(())
}

impl<A: BlobStore, C: BlobStore> ActionCacheService<A, C> {
    /// Moves inlined contents sent by a client into the CAS, so stored
    /// results stay small and uniform.
    async fn outline(
        &self,
        instance: &str,
        function: DigestFunction,
        result: &mut ActionResult,
    ) -> Result<(), Error> {
        for (raw, digest) in [
            (&mut result.stdout_raw, &mut result.stdout_digest),
            (&mut result.stderr_raw, &mut result.stderr_digest),
        ] {
            if !raw.is_empty() {
                let data = Bytes::from(std::mem::take(raw));
                let d = function.compute(&data);
                self.cas.put(&Key::cas_in(instance, d), data.into()).await?;
                *digest = Some(d.to_proto());
            }
        }
        for file in &mut result.output_files {
            if !file.contents.is_empty() {
                let data = Bytes::from(std::mem::take(&mut file.contents));
                let d = function.compute(&data);
                if file.digest.as_ref().is_some_and(|given| *given != d.to_proto()) {
                    return Err(Error::invalid_argument(format!(
                        "output {:?}: inlined contents do not match its digest",
                        file.path
                    )));
                }
                self.cas.put(&Key::cas_in(instance, d), data.into()).await?;
                file.digest = Some(d.to_proto());
            }
        }
        Ok(())
    }

    /// Inlines what the client asked for, within the inline budget.
    async fn inline(
        &self,
        instance: &str,
        function: DigestFunction,
        req: &GetActionResultRequest,
        result: &mut ActionResult,
    ) {
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
            let Ok(data) = self.cas.get(&Key::cas_in(instance, digest)).await else { continue };
            match slot {
                0 => result.stdout_raw = data.to_vec(),
                1 => result.stderr_raw = data.to_vec(),
                n => result.output_files[n - 2].contents = data.to_vec(),
            }
        }
    }
}

#[tonic::async_trait]
impl<A: BlobStore, C: BlobStore> ActionCache for ActionCacheService<A, C> {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let principal = self.auth.check(&request, &request.get_ref().instance_name, Permission::AcRead)?;
        let req = request.into_inner();
        super::instance(&req.instance_name)?;
        let function = super::digest_function(req.digest_function)?;
        let action = Digest::from_required(function, req.action_digest.as_ref(), "action_digest")?;
        // The tenant's own result first, then its ancestors' (a developer on
        // `main.dev` reads what CI wrote to `main`), where the principal may
        // read them.
        let mut miss = None;
        for tenant in kiln_proto::tenant::lineage(&req.instance_name) {
            if tenant != req.instance_name && !self.auth.allows(&principal, tenant, Permission::AcRead) {
                continue;
            }
            let key = Key::new(Scope::new(tenant), action);
            let data = match self.ac.get(&key).await {
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
            self.inline(&req.instance_name, action.function(), &req, &mut result).await;
            return Ok(Response::new(result));
        }
        Err(miss.map_or_else(
            || {
                Status::not_found(format!(
                    "no action result for {action} in instance {:?}",
                    req.instance_name
                ))
            },
            Status::from,
        ))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let principal = self.auth.check(&request, &request.get_ref().instance_name, Permission::AcWrite)?;
        let req = request.into_inner();
        super::instance(&req.instance_name)?;
        let function = super::digest_function(req.digest_function)?;
        let action = Digest::from_required(function, req.action_digest.as_ref(), "action_digest")?;
        let Some(mut result) = req.action_result else {
            return Err(Status::invalid_argument("action_result is required"));
        };
        let returned = result.clone();
        let inlined = !result.stdout_raw.is_empty()
            || !result.stderr_raw.is_empty()
            || result.output_files.iter().any(|f| !f.contents.is_empty());
        if inlined {
            self.auth.require(&principal, &req.instance_name, Permission::CasWrite)?;
        }
        self.outline(&req.instance_name, action.function(), &mut result).await?;
        check_digests(action.function(), &result)?;
        let encoded = result.encode_to_vec();
        if encoded.len() > self.limits.action_result_size_bytes_max {
            return Err(Status::invalid_argument(format!(
                "action result is {} bytes encoded; at most {} are accepted",
                encoded.len(),
                self.limits.action_result_size_bytes_max
            )));
        }
        let key = Key::new(Scope::new(&req.instance_name), action);
        self.ac.put(&key, Bytes::from(encoded).into()).await?;
        tracing::debug!(action = %key, "action result stored");
        Ok(Response::new(returned))
    }
}
