//! HTTP/2 transport settings shared by every Kiln server and client.
//!
//! Defaults of the HTTP/2 stack suit small RPCs; Kiln moves large blobs, so
//! it raises flow-control windows (no stalls waiting for window updates on
//! a fast link) and the maximum frame size (fewer frames, less per-frame
//! work per byte). Both ends advertise these; each applies to what that end
//! receives.

use std::time::Duration;

/// Per-stream flow-control window.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
/// Per-connection flow-control window.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Largest HTTP/2 frame accepted.
pub const FRAME_SIZE_BYTES_MAX: u32 = 4 << 20;

/// A server builder with Kiln's transport settings.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(FRAME_SIZE_BYTES_MAX))
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
