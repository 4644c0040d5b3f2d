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

/// What Bazel's `requestmetadata-bin` header says, when it is present and
/// decodes.
pub fn request_metadata(headers: &tonic::codegen::http::HeaderMap) -> Option<crate::reapi::RequestMetadata> {
    use prost::Message;
    let map = tonic::metadata::MetadataMap::from_headers(headers.clone());
    let bytes = map.get_bin("requestmetadata-bin")?.to_bytes().ok()?;
    crate::reapi::RequestMetadata::decode(bytes.as_ref()).ok()
}
