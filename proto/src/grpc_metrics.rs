//! A tower layer that records every gRPC call: requests by service, method
//! and status code, their duration, the body bytes received and sent; and
//! opens a tracing span per call carrying what Bazel's
//! `RequestMetadata` header says (invocation, action, target,
//! mnemonic), so that a request's logs can be found by any of them; the
//! authentication layer adds the principal, the authorizer the tenant.
//!
//! Methods are labelled from the fixed list Kiln serves; any other path is
//! `unknown`, so a client cannot add series.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use crate::metrics::{CallLabels, MethodLabels, code_name, global};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

/// Every method Kiln serves, by service.
const METHODS: &[(&str, &str, &[&str])] = &[
    ("build.bazel.remote.execution.v2.Capabilities", "Capabilities", &["GetCapabilities"]),
    (
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        "ContentAddressableStorage",
        &["FindMissingBlobs", "BatchUpdateBlobs", "BatchReadBlobs", "GetTree"],
    ),
    (
        "build.bazel.remote.execution.v2.ActionCache",
        "ActionCache",
        &["GetActionResult", "UpdateActionResult"],
    ),
    ("build.bazel.remote.execution.v2.Execution", "Execution", &["Execute", "WaitExecution"]),
    ("google.bytestream.ByteStream", "ByteStream", &["Read", "Write", "QueryWriteStatus"]),
    (
        "google.longrunning.Operations",
        "Operations",
        &["GetOperation", "ListOperations", "CancelOperation", "DeleteOperation", "WaitOperation"],
    ),
    ("grpc.health.v1.Health", "Health", &["Check", "Watch"]),
    ("kiln.admin.v1.Tokens", "Tokens", &["CreateToken", "ListTokens", "RotateToken", "RevokeToken"]),
    ("kiln.worker.v1.Workers", "Workers", &["Session"]),
];

const UNKNOWN: MethodLabels = MethodLabels { service: "unknown", method: "unknown" };

/// Where a request path (`/package.Service/Method`) sits in [`METHODS`]:
/// (service, method).
fn method_index(path: &str) -> Option<(usize, usize)> {
    let (service, method) = path.strip_prefix('/').and_then(|p| p.split_once('/'))?;
    let s = METHODS.iter().position(|(full, _, _)| *full == service)?;
    let m = METHODS[s].2.iter().position(|m| *m == method)?;
    Some((s, m))
}

/// One method's series, looked up in their families once per process
/// rather than once per call (a family lookup hashes the labels under a
/// lock). Each is created on first use, so methods never called export
/// nothing.
struct MethodHandles {
    labels: MethodLabels,
    received: OnceLock<Counter>,
    sent: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
    /// By status code; codes outside gRPC's 17 count as UNKNOWN.
    requests: [OnceLock<Counter>; 17],
}

impl MethodHandles {
    fn new(labels: MethodLabels) -> Self {
        Self {
            labels,
            received: OnceLock::new(),
            sent: OnceLock::new(),
            duration: OnceLock::new(),
            requests: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn received(&self) -> &Counter {
        self.received.get_or_init(|| global().grpc_received_bytes.get_or_create(&self.labels).clone())
    }

    fn sent(&self) -> &Counter {
        self.sent.get_or_init(|| global().grpc_sent_bytes.get_or_create(&self.labels).clone())
    }

    fn duration(&self) -> &Histogram {
        self.duration.get_or_init(|| global().grpc_duration.get_or_create(&self.labels).clone())
    }

    fn requests(&self, code: i32) -> &Counter {
        let i = usize::try_from(code).ok().filter(|c| *c < 17).unwrap_or(tonic::Code::Unknown as usize);
        self.requests[i].get_or_init(|| {
            let labels = CallLabels {
                service: self.labels.service,
                method: self.labels.method,
                code: code_name(code),
            };
            global().grpc_requests.get_or_create(&labels).clone()
        })
    }
}

/// The handles of a request path's method (`unknown` for any other path).
fn handles(path: &str) -> &'static MethodHandles {
    static ALL: OnceLock<(Vec<Vec<MethodHandles>>, MethodHandles)> = OnceLock::new();
    let (known, unknown) = ALL.get_or_init(|| {
        let known = METHODS
            .iter()
            .map(|(_, service, methods)| {
                methods.iter().map(|method| MethodHandles::new(MethodLabels { service, method })).collect()
            })
            .collect();
        (known, MethodHandles::new(UNKNOWN))
    });
    method_index(path).map_or(unknown, |(s, m)| &known[s][m])
}

/// Records every call that passes through (unless built disabled:
/// `[metrics] enabled = false`, which the overhead benchmark compares).
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer {
    enabled: bool,
}

impl GrpcMetricsLayer {
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner, enabled: self.enabled }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    enabled: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for GrpcMetrics<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !self.enabled {
            let clone = self.inner.clone();
            let mut ready = std::mem::replace(&mut self.inner, clone);
            return Box::pin(async move { ready.call(request).await });
        }
        let method = handles(request.uri().path());
        let span = request_span(&method.labels, request.headers());
        let totals = &global().totals;
        let request = request.map(|inner| {
            Body::new(Observed { inner, bytes: method.received(), total: &totals.received_bytes, call: None })
        });
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        // Made before the handler runs: a client that leaves while it does
        // drops this future, and the call counts as CANCELLED.
        let mut call = Call { method, started: Instant::now(), span: span.clone(), done: false };
        let call = async move {
            let response = match ready.call(request).await {
                Ok(response) => response,
                Err(e) => {
                    call.finish(tonic::Code::Unknown as i32);
                    return Err(e);
                }
            };
            // Trailers-only: the status is in the headers, and the body is empty.
            if let Some(code) = grpc_status(response.headers()) {
                call.finish(code);
                return Ok(response);
            }
            let (bytes, total) = (method.sent(), &totals.sent_bytes);
            Ok(response.map(|inner| Body::new(Observed { inner, bytes, total, call: Some(call) })))
        };
        // A disabled span (the default) costs nothing to leave out.
        if span.is_disabled() { Box::pin(call) } else { Box::pin(call.instrument(span)) }
    }
}

/// One call in this many gets a span (0: none); see [`sample_spans`].
static SPAN_EVERY: AtomicU64 = AtomicU64::new(1);
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Creates the per-call span for a share of calls only (`ratio`, 0.0 to
/// 1.0, as one call in `round(1 / ratio)`): a span that some layer
/// records (the trace exporter) costs far more than the call's metrics,
/// and sampling at the exporter would not save that cost.
pub fn sample_spans(ratio: f64) {
    // 1 / ratio is at least 1 here, and `as` saturates for tiny ratios.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let every = if ratio > 0.0 { (1.0 / ratio.min(1.0)).round() as u64 } else { 0 };
    SPAN_EVERY.store(every, Ordering::Relaxed);
}

/// The span of one call, with Bazel's request metadata when it sent any.
fn request_span(labels: &MethodLabels, headers: &http::HeaderMap) -> tracing::Span {
    let every = SPAN_EVERY.load(Ordering::Relaxed);
    if every != 1 && (every == 0 || !CALLS.fetch_add(1, Ordering::Relaxed).is_multiple_of(every)) {
        return tracing::Span::none();
    }
    let span = tracing::debug_span!(
        "grpc",
        service = labels.service,
        method = labels.method,
        invocation = tracing::field::Empty,
        action = tracing::field::Empty,
        build_target = tracing::field::Empty,
        mnemonic = tracing::field::Empty,
        principal = tracing::field::Empty,
        tenant = tracing::field::Empty,
        code = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    if let Some(m) = crate::transport::request_metadata(headers) {
        let cut = |s: &str| crate::text::quoted(s).to_string();
        span.record("invocation", cut(&m.tool_invocation_id));
        span.record("action", cut(&m.action_id));
        span.record("build_target", cut(&m.target_id));
        span.record("mnemonic", cut(&m.action_mnemonic));
    }
    span
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    // A constant name: no parsing of the key on every lookup.
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers.get(&GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// One call, counted once when it ends (or is dropped: the client left).
struct Call {
    method: &'static MethodHandles,
    started: Instant,
    span: tracing::Span,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: i32) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        self.method.requests(code).inc();
        global().totals.requests.fetch_add(1, Ordering::Relaxed);
        self.method.duration().observe(elapsed.as_secs_f64());
        // Calls without a span (not sampled, or nobody listening) log
        // nothing either: an event some layer might want costs a dispatch.
        if self.span.is_disabled() {
            return;
        }
        let code = code_name(code);
        self.span.record("code", code);
        self.span.record("duration_ms", elapsed.as_secs_f64() * 1000.0);
        self.span.in_scope(|| {
            tracing::debug!(code, duration_ms = elapsed.as_secs_f64() * 1000.0, "call finished")
        });
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The response body was dropped before its trailers: the client
        // cancelled or the connection broke.
        self.finish(tonic::Code::Cancelled as i32);
    }
}

/// A body whose data bytes are counted as they pass; a response's body
/// also finishes its call (with the status in its trailers).
struct Observed {
    inner: Body,
    bytes: &'static Counter,
    total: &'static AtomicU64,
    call: Option<Call>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let code = match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    self.bytes.inc_by(data.len() as u64);
                    self.total.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                f.trailers_ref().map(|t| grpc_status(t).unwrap_or(tonic::Code::Unknown as i32))
            }
            Some(Err(status)) => Some(status.code() as i32),
            None => Some(tonic::Code::Unknown as i32),
        };
        if let (Some(code), Some(call)) = (code, &mut self.call) {
            call.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_get_their_own_labels() {
        let l = &handles("/build.bazel.remote.execution.v2.ActionCache/GetActionResult").labels;
        assert_eq!((l.service, l.method), ("ActionCache", "GetActionResult"));
        for path in ["/build.bazel.remote.execution.v2.ActionCache/Nope", "/x.Y/Z", "", "/", "//"] {
            let l = &handles(path).labels;
            assert_eq!((l.service, l.method), ("unknown", "unknown"), "{path}");
        }
        for (full, _, methods) in METHODS {
            for m in *methods {
                assert_eq!(handles(&format!("/{full}/{m}")).labels.method, *m);
            }
        }
    }

    /// A handler that never answers.
    #[derive(Clone)]
    struct Pending;

    impl Service<http::Request<Body>> for Pending {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Pending<Result<http::Response<Body>, std::convert::Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            std::future::pending()
        }
    }

    #[test]
    fn calls_left_before_their_answer_count_as_cancelled() {
        let mut service = GrpcMetricsLayer::new(true).layer(Pending);
        let request = http::Request::builder()
            .uri("/google.bytestream.ByteStream/QueryWriteStatus")
            .body(Body::empty())
            .unwrap();
        let mut call = service.call(request);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(call.as_mut().poll(&mut cx).is_pending(), "the handler is still at work");
        drop(call);
        let text = global().encode();
        let line =
            r#"kiln_grpc_requests_total{service="ByteStream",method="QueryWriteStatus",code="CANCELLED"} 1"#;
        assert!(text.contains(line), "{text}");
    }

    #[test]
    fn codes_outside_grpcs_seventeen_count_as_unknown() {
        let method = handles("/grpc.health.v1.Health/Watch");
        method.requests(99).inc();
        method.requests(-1).inc();
        method.requests(tonic::Code::DataLoss as i32).inc();
        let text = global().encode();
        assert!(
            text.contains(r#"kiln_grpc_requests_total{service="Health",method="Watch",code="UNKNOWN"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kiln_grpc_requests_total{service="Health",method="Watch",code="DATA_LOSS"} 1"#)
        );
    }
}
