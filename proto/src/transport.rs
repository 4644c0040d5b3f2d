//! HTTP/2 transport settings shared by every Kiln server and client.
//!
//! Defaults of the HTTP/2 stack suit small RPCs; Kiln moves large blobs, so
//! it raises flow-control windows (no stalls waiting for window updates on
//! a fast link) and the maximum frame size (fewer frames, less per-frame
//! work per byte). Both ends advertise these; each applies to what that end
//! receives. The windows also bound memory: one connection can make a
//! server buffer at most [`CONNECTION_WINDOW_BYTES`] it has not read yet.

use std::time::Duration;

pub use crate::limits::{CONNECTION_WINDOW_BYTES, FRAME_SIZE_BYTES_MAX, STREAM_WINDOW_BYTES};
use crate::limits::{HEADER_LIST_SIZE_BYTES_MAX, Limits};

/// A server builder with Kiln's transport settings and the per-connection
/// stream limit, advertised as SETTINGS_MAX_CONCURRENT_STREAMS.
pub fn server(limits: &Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(FRAME_SIZE_BYTES_MAX))
        .max_concurrent_streams(Some(limits.streams_per_connection_max))
        .http2_max_header_list_size(Some(HEADER_LIST_SIZE_BYTES_MAX))
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// Applies Kiln's transport settings to a client endpoint.
pub fn tune(endpoint: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(FRAME_SIZE_BYTES_MAX))
}

/// The header REAPI clients send their `RequestMetadata` in (gRPC's name
/// for the message's full name with `-bin`; Bazel's `ProtoUtils.keyForProto`).
pub const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// What the client's [`REQUEST_METADATA_HEADER`] says, when it is present
/// and decodes.
pub fn request_metadata(headers: &tonic::codegen::http::HeaderMap) -> Option<crate::reapi::RequestMetadata> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use prost::Message;
    // gRPC binary headers are base64, padded or not.
    const BASE64: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let bytes = BASE64.decode(headers.get(REQUEST_METADATA_HEADER)?.as_bytes()).ok()?;
    crate::reapi::RequestMetadata::decode(bytes.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_metadata_decodes_padded_and_unpadded_headers() {
        use base64::Engine as _;
        use prost::Message;
        let m = crate::reapi::RequestMetadata { tool_invocation_id: "inv-1".into(), ..Default::default() };
        let bytes = m.encode_to_vec();
        for engine in
            [base64::engine::general_purpose::STANDARD, base64::engine::general_purpose::STANDARD_NO_PAD]
        {
            let mut headers = tonic::codegen::http::HeaderMap::new();
            headers.insert(REQUEST_METADATA_HEADER, engine.encode(&bytes).parse().unwrap());
            assert_eq!(request_metadata(&headers).unwrap().tool_invocation_id, "inv-1");
        }
        let mut headers = tonic::codegen::http::HeaderMap::new();
        headers.insert(REQUEST_METADATA_HEADER, "not base64!".parse().unwrap());
        assert!(request_metadata(&headers).is_none());
    }
}
