//! A byte budget for responses waiting for the network.
//!
//! A client that asks and then stops reading leaves its responses queued in
//! the server: a 4 MiB BatchReadBlobs answer, an 8 MiB GetTree page, a
//! FindMissingBlobs list. Across many streams and connections that is
//! unbounded memory. This tower layer charges each response message to a
//! budget (`responses_in_flight_bytes_max`, a quarter of it per client
//! address) when it is produced, and hands it to the network stack in
//! pieces of [`RESPONSE_PIECE_BYTES`], each leaving the charge as it goes;
//! the network stack asks for the next piece only once it has room, so a
//! stalled client's answer stays charged. A message that cannot be charged
//! within `admission_timeout_ms` ends the call with RESOURCE_EXHAUSTED in
//! its place. Beyond the budget, a stream holds at most two pieces (the one
//! being sent and the next).
//!
//! ByteStream Read is left out: it charges its chunks to the read budget
//! before it produces them (see [`super::bytestream`]).

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use kiln_proto::access::PeerInfo;
use kiln_proto::limits::{Limits, RESPONSE_PIECE_BYTES};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use super::admission::{Budget, BudgetLimits, Charge};

/// Paths whose responses charge their own budget.
const SELF_CHARGING_PATHS: [&str; 1] = ["/google.bytestream.ByteStream/Read"];

/// Tower layer that bounds the bytes of responses waiting for clients.
#[derive(Debug, Clone)]
pub struct ResponseBudgetLayer {
    budget: Arc<Budget>,
}

impl ResponseBudgetLayer {
    pub fn new(limits: &Limits) -> Self {
        let total = limits.responses_in_flight_bytes_max;
        let budget = Budget::new(
            "responses",
            "responses_in_flight_bytes_max",
            BudgetLimits {
                total_bytes_max: total,
                client_bytes_max: (total / 4).max(limits.grpc_message_size_bytes_max as u64),
                waiting_bytes_max: limits.admission_waiting_bytes_max,
                timeout: Duration::from_millis(limits.admission_timeout_ms),
            },
        );
        Self { budget }
    }
}

impl<S> Layer<S> for ResponseBudgetLayer {
    type Service = ResponseBudget<S>;

    fn layer(&self, inner: S) -> ResponseBudget<S> {
        ResponseBudget { inner, budget: self.budget.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct ResponseBudget<S> {
    inner: S,
    budget: Arc<Budget>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for ResponseBudget<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let exempt = SELF_CHARGING_PATHS.contains(&request.uri().path());
        let client = request.extensions().get::<PeerInfo>().and_then(|p| p.remote_addr).map(|a| a.ip());
        let budget = self.budget.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if exempt {
                return Ok(response);
            }
            Ok(response.map(|inner| {
                Body::new(BudgetedBody {
                    inner,
                    budget,
                    client,
                    charge: None,
                    rest: Bytes::new(),
                    waiting: None,
                    failed: false,
                })
            }))
        })
    }
}

/// A response body whose messages are charged when produced and handed to
/// the network stack a piece at a time, each piece leaving the charge as it
/// goes: what the charge does not cover is at most the piece the network
/// stack is sending and the one it holds next.
struct BudgetedBody {
    inner: Body,
    budget: Arc<Budget>,
    client: Option<IpAddr>,
    /// The charge for what is left of the current message.
    charge: Option<Charge>,
    /// What is left of the current message.
    rest: Bytes,
    /// A message waiting for its charge.
    waiting: Option<(Bytes, BoxFuture<kiln_proto::Result<Charge>>)>,
    failed: bool,
}

impl BudgetedBody {
    fn next_piece(&mut self) -> Frame<Bytes> {
        let piece = self.rest.split_to(self.rest.len().min(RESPONSE_PIECE_BYTES));
        if let Some(charge) = &mut self.charge {
            charge.shrink(piece.len() as u64);
        }
        Frame::data(piece)
    }
}

impl http_body::Body for BudgetedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        if !this.rest.is_empty() {
            return Poll::Ready(Some(Ok(this.next_piece())));
        }
        if this.waiting.is_none() {
            this.charge = None;
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) if frame.data_ref().is_some_and(|d| !d.is_empty()) => {
                    let data = frame.into_data().unwrap_or_default();
                    let bytes = data.len() as u64;
                    let budget = this.budget.clone();
                    let client = this.client;
                    let reserve = Box::pin(async move {
                        let mut charge = budget.charge(client);
                        charge.grow(bytes).await.map(|()| charge)
                    });
                    this.waiting = Some((data, reserve));
                }
                other => return Poll::Ready(other),
            }
        }
        let Some((_, reserve)) = this.waiting.as_mut() else { return Poll::Ready(None) };
        let charged = ready!(reserve.as_mut().poll(cx));
        let (data, _) = this.waiting.take().expect("checked above");
        match charged {
            Ok(charge) => {
                this.charge = Some(charge);
                this.rest = data;
                Poll::Ready(Some(Ok(this.next_piece())))
            }
            Err(e) => {
                // End the call with the refusal in place of its message.
                this.failed = true;
                let mut trailers = http::HeaderMap::new();
                match Status::from(e).add_header(&mut trailers) {
                    Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Err(status) => Poll::Ready(Some(Err(status))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || (self.waiting.is_none() && self.rest.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // A refused frame is replaced by trailers: promise nothing.
        SizeHint::default()
    }
}
