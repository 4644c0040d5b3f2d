//! Connecting to a REAPI endpoint.

use anyhow::{Context, Result, bail};
use tonic::transport::{Channel, Endpoint};

/// Largest gRPC message the tools accept.
pub const MESSAGE_SIZE_BYTES_MAX: usize = 64 << 20;

/// Opens a channel to `remote`, given as `grpc://HOST:PORT` (or `http://`).
pub async fn connect(remote: &str) -> Result<Channel> {
    let uri = if let Some(rest) = remote.strip_prefix("grpc://") {
        format!("http://{rest}")
    } else if remote.starts_with("http://") {
        remote.to_owned()
    } else if remote.starts_with("grpcs://") || remote.starts_with("https://") {
        bail!("{remote}: TLS endpoints are not supported by this client yet; use grpc://")
    } else {
        bail!("{remote}: expected grpc://HOST:PORT")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("invalid remote {remote}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20));
    endpoint.connect().await.with_context(|| format!("cannot connect to {remote}"))
}
