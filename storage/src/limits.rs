//! Every bound the storage node enforces, in one place.

use serde::Deserialize;

/// Limits on what a client may send or ask for. Units are last in the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest single gRPC message accepted or sent.
    pub grpc_message_size_bytes_max: usize,
    /// Largest total of blob sizes in one BatchUpdateBlobs or BatchReadBlobs
    /// call; advertised in Capabilities as `max_batch_total_size_bytes`.
    pub batch_total_size_bytes_max: u64,
    /// Most digests in one FindMissingBlobs or Batch* call.
    pub batch_digests_max: usize,
    /// Largest blob the CAS accepts; advertised as `max_cas_blob_size_bytes`.
    pub blob_size_bytes_max: u64,
    /// Largest serialized ActionResult the AC accepts.
    pub action_result_size_bytes_max: usize,
    /// Most bytes inlined into one GetActionResult response.
    pub inline_size_bytes_max: u64,
    /// Largest chunk of data in one ByteStream Read response.
    pub read_chunk_size_bytes: usize,
    /// Most directories returned in one GetTree page.
    pub tree_page_size_max: usize,
    /// Most directories GetTree walks for one request.
    pub tree_directories_max: usize,
    /// Most unfinished uploads remembered for resumption.
    pub partial_uploads_max: usize,
    /// Most bytes of uploads being received at once; further uploads wait.
    pub uploads_in_flight_bytes_max: u64,
    /// Longest wait for the next message of an upload before it is dropped
    /// (and kept for resumption), so a stalled client cannot hold its share
    /// of `uploads_in_flight_bytes_max` forever.
    pub upload_idle_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            grpc_message_size_bytes_max: 16 << 20,
            batch_total_size_bytes_max: 4 << 20,
            batch_digests_max: 65_536,
            blob_size_bytes_max: 1 << 30,
            action_result_size_bytes_max: 1 << 20,
            inline_size_bytes_max: 1 << 20,
            read_chunk_size_bytes: 1 << 20,
            tree_page_size_max: 10_000,
            tree_directories_max: 1_000_000,
            partial_uploads_max: 64,
            uploads_in_flight_bytes_max: 2 << 30,
            upload_idle_timeout_ms: 60_000,
        }
    }
}

impl Limits {
    /// Checks that the limits are consistent with each other; returns a
    /// message naming the offending keys.
    pub fn validate(&self) -> Result<(), String> {
        // A batch request carries its blobs plus roughly 100 bytes of framing
        // per digest; keep a quarter of the message for that.
        let room = (self.grpc_message_size_bytes_max as u64) / 4 * 3;
        if self.batch_total_size_bytes_max == 0 || self.batch_total_size_bytes_max > room {
            return Err(format!(
                "batch_total_size_bytes_max ({}) must be between 1 and 3/4 of grpc_message_size_bytes_max ({})",
                self.batch_total_size_bytes_max, self.grpc_message_size_bytes_max
            ));
        }
        if self.read_chunk_size_bytes == 0
            || self.read_chunk_size_bytes > self.grpc_message_size_bytes_max / 2
        {
            return Err(
                "read_chunk_size_bytes must be between 1 and half of grpc_message_size_bytes_max".into()
            );
        }
        if self.inline_size_bytes_max > room {
            return Err("inline_size_bytes_max must be at most 3/4 of grpc_message_size_bytes_max".into());
        }
        if self.upload_idle_timeout_ms == 0 {
            return Err("upload_idle_timeout_ms must be positive".into());
        }
        if self.uploads_in_flight_bytes_max < self.blob_size_bytes_max {
            return Err("uploads_in_flight_bytes_max must be at least blob_size_bytes_max".into());
        }
        if self.blob_size_bytes_max == 0 || self.batch_digests_max == 0 || self.tree_page_size_max == 0 {
            return Err(
                "blob_size_bytes_max, batch_digests_max and tree_page_size_max must be positive".into()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_consistent() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn batch_larger_than_message_is_rejected() {
        let limits = Limits { batch_total_size_bytes_max: 16 << 20, ..Limits::default() };
        assert!(limits.validate().unwrap_err().contains("batch_total_size_bytes_max"));
    }
}
