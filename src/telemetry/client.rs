//! `kiln status`: fetches a node's status summary (`/status.txt` on its
//! metrics listener) and prints it. `kiln serve` reads its local worker's
//! `/metrics` the same way.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

const TIMEOUT: Duration = Duration::from_secs(10);

/// GETs `http://ADDR/status.txt`, with `authorization` when given.
pub async fn fetch_status(addr: &str, authorization: Option<String>) -> Result<String> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let limit = kiln_proto::limits::STATUS_SUMMARY_BYTES_MAX;
    get(addr, "/status.txt", authorization, limit, TIMEOUT).await
}

/// GETs `http://ADDR/PATH`: at most `limit` bytes of body, within
/// `timeout`; an answer other than 2xx is an error carrying its text.
pub async fn get(
    addr: &str,
    path: &str,
    authorization: Option<String>,
    limit: usize,
    timeout: Duration,
) -> Result<String> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect to {addr}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        let mut request = http::Request::get(path).header(http::header::HOST, addr);
        if let Some(value) = authorization {
            request = request.header(http::header::AUTHORIZATION, value);
        }
        let response = sender.send_request(request.body(Empty::<Bytes>::new())?).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("read {path}: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            bail!("{addr} answered {status}: {}", text.trim());
        }
        Ok(text)
    };
    tokio::time::timeout(timeout, work)
        .await
        .with_context(|| format!("{addr} did not answer within {timeout:?}"))?
}
