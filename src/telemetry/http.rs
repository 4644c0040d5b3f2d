//! The metrics listener: plain HTTP/1.1 (hyper), a bounded number of
//! connections, a deadline on request headers and on each connection's
//! whole life, a bounded number of log reads at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use kiln_proto::access::{PeerInfo, Permission};
use tokio::net::TcpListener;

use super::Sources;
use super::status::{self, Page};

use kiln_proto::limits::{
    METRICS_CONNECTION_TIME_MAX, METRICS_CONNECTIONS_MAX, METRICS_HEADER_TIMEOUT, STATUS_LOG_FETCHES_MAX,
};

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, sources: Arc<Sources>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(handle(req, &sources, peer).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_TIME_MAX, connection).await;
            drop(permit);
        });
    }
}

/// Every response's body.
type Body = BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    reply_with(status, content_type, Full::new(body.into()).boxed())
}

fn reply_with(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_str(content_type).unwrap_or(TEXT));
    r.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

const TEXT: http::HeaderValue = http::HeaderValue::from_static("text/plain");

/// A log, sent in pieces while it holds its turn: the bytes stay in
/// memory until the last piece is taken, so the turn lasts as long.
struct HeldLog {
    data: Bytes,
    _turn: tokio::sync::SemaphorePermit<'static>,
}

impl http_body::Body for HeldLog {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        const PIECE: usize = 64 << 10;
        if self.data.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.data.len().min(PIECE);
        let piece = self.data.split_to(n);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.len() as u64)
    }
}

async fn handle(req: Request<Incoming>, sources: &Sources, peer: SocketAddr) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET and HEAD\n");
        r.headers_mut().insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path().to_owned();
    if path == "/metrics" {
        let mut text =
            tokio::task::spawn_blocking(|| kiln_proto::metrics::global().encode()).await.unwrap_or_default();
        if let Some(local) = &sources.local_worker
            && let Some(child) = local.metrics().await
        {
            text = super::worker::splice_worker_families(&text, &child);
        }
        return reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text);
    }
    if path == "/" {
        let mut r = reply(StatusCode::FOUND, "text/plain", "see /status\n");
        r.headers_mut().insert(header::LOCATION, http::HeaderValue::from_static("/status"));
        return r;
    }
    if !(path == "/status" || path == "/status.txt" || path.starts_with("/logs/")) {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /status or /metrics\n");
    }
    if let Some(refusal) = check_admin(req.headers(), sources, peer).await {
        return refusal;
    }
    if let Some(rest) = path.strip_prefix("/logs/") {
        return log(rest, sources).await;
    }
    let views = match sources.stores.clone() {
        Some(stores) => Some(tokio::task::spawn_blocking(move || stores.read()).await.unwrap_or_default()),
        None => None,
    };
    let page = Page {
        version: env!("CARGO_PKG_VERSION"),
        uptime: sources.started.elapsed(),
        summary: &sources.summary,
        history: &sources.history,
        stores: views,
        scheduler: sources.scheduler.as_ref().map(|s| s()),
        worker: match (&sources.worker, &sources.local_worker) {
            (Some(w), _) => Some(w.read()),
            (None, Some(local)) => Some(local.view().await),
            (None, None) => None,
        },
    };
    if path == "/status.txt" {
        reply(StatusCode::OK, "text/plain; charset=utf-8", status::text(&page))
    } else {
        reply(StatusCode::OK, "text/html; charset=utf-8", status::html(&page))
    }
}

/// None when the visitor may see the page: no authentication configured,
/// or a principal holding `admin` everywhere.
async fn check_admin(
    headers: &http::HeaderMap,
    sources: &Sources,
    peer: SocketAddr,
) -> Option<Response<Body>> {
    let (authenticator, authorizer) = sources.auth.as_ref()?;
    let info = PeerInfo { remote_addr: Some(peer), client_principal: None, client_certificate: None };
    match authenticator.authenticate(headers, Some(&info)).await {
        Ok(principal) if authorizer.permissions_everywhere(&principal).contains(Permission::Admin) => None,
        Ok(principal) => Some(reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            format!("{principal} lacks the admin permission on every tenant, which the status page needs\n"),
        )),
        Err(e) => {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                format!("the status page needs the admin permission: {}\n", e.message()),
            );
            // Browsers ask for a user name and password on Basic; with no
            // htpasswd file that prompt could never succeed, so they get
            // Bearer and show the message instead.
            let scheme = if authenticator.htpasswd.is_some() {
                "Basic realm=\"kiln\""
            } else {
                "Bearer realm=\"kiln\""
            };
            r.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static(scheme));
            Some(r)
        }
    }
}

/// `/logs/HASH/SIZE/INSTANCE`: a log of a failed action.
async fn log(rest: &str, sources: &Sources) -> Response<Body> {
    let mut parts = rest.splitn(3, '/');
    let (Some(hash), Some(size), instance) = (parts.next(), parts.next(), parts.next().unwrap_or("")) else {
        return reply(StatusCode::NOT_FOUND, "text/plain", "use /logs/HASH/SIZE/INSTANCE\n");
    };
    let Ok(instance) = percent_encoding::percent_decode_str(instance).decode_utf8() else {
        return reply(StatusCode::BAD_REQUEST, "text/plain", "the instance name is not UTF-8\n");
    };
    let digest = match size
        .parse()
        .map_err(|_| ())
        .and_then(|s| kiln_proto::Digest::parse(None, hash, s).map_err(|_| ()))
    {
        Ok(d) => d,
        Err(()) => return reply(StatusCode::BAD_REQUEST, "text/plain", "not a digest\n"),
    };
    static FETCHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(STATUS_LOG_FETCHES_MAX);
    let Ok(turn) = FETCHES.acquire().await else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n");
    };
    let Some(fetch_log) = &sources.fetch_log else {
        return reply(StatusCode::NOT_FOUND, "text/plain", "this node keeps no logs\n");
    };
    match fetch_log(instance.into_owned(), digest).await {
        Ok(data) => {
            reply_with(StatusCode::OK, "text/plain; charset=utf-8", HeldLog { data, _turn: turn }.boxed())
        }
        Err(e) => {
            let (status, hint) = match e.code() {
                kiln_proto::Code::NotFound => (StatusCode::NOT_FOUND, ""),
                kiln_proto::Code::ResourceExhausted => {
                    (StatusCode::PAYLOAD_TOO_LARGE, "; fetch it with `kiln cas get`")
                }
                kiln_proto::Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, ""),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, ""),
            };
            reply(status, "text/plain", format!("{}{hint}\n", e.message()))
        }
    }
}
