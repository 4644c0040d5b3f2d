//! What the scheduler needs of the CAS and the action cache. `kiln serve`
//! gives it the stores of its own process; a scheduler running apart from
//! its storage nodes would give it gRPC clients.

use std::future::Future;

use bytes::Bytes;
use kiln_proto::reapi::ActionResult;
use kiln_proto::{Digest, Result};

pub trait Backend: Send + Sync + 'static {
    /// A whole CAS blob (an Action or a Command), at most `size_max` bytes,
    /// verified; NOT_FOUND when absent.
    fn read_blob(
        &self,
        instance: &str,
        digest: &Digest,
        size_max: u64,
    ) -> impl Future<Output = Result<Bytes>> + Send;

    /// The cached result of an action, if every blob it references is
    /// still in the CAS.
    fn get_action_result(
        &self,
        instance: &str,
        action: &Digest,
    ) -> impl Future<Output = Result<Option<ActionResult>>> + Send;

    /// Caches the result of an action that ran.
    fn put_action_result(
        &self,
        instance: &str,
        action: &Digest,
        result: &ActionResult,
    ) -> impl Future<Output = Result<()>> + Send;
}
