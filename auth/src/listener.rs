//! Accepting connections for tonic, plaintext or TLS, with bounds on
//! everything a client could use to exhaust the node.
//!
//! - Open connections are bounded (`connections_max`, kept below the
//!   file-descriptor limit): beyond it, new connections are accepted and
//!   closed at once, so the node always has descriptors left to accept and
//!   shed with, and an overloaded node says so instead of hanging.
//! - Accept errors (a full descriptor table, out of memory) back off
//!   exponentially instead of spinning.
//! - A connection must finish its TLS handshake and send the HTTP/2 preface
//!   within `connection_preface_timeout_ms` of being accepted, or it is
//!   closed; TLS handshakes in progress are bounded too.
//! - Every connection carries [`PeerInfo`] (address, client certificate)
//!   into the extensions of each of its requests.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use kiln_proto::access::{PeerInfo, PeerTally};
use kiln_proto::limits::{ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, Limits};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::crl::describe;
use crate::tls::{PrincipalFrom, ReloadingTls, principal_from_cert};

/// Length of the HTTP/2 client connection preface.
const PREFACE_LEN: u64 = 24;

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection handed to tonic.
#[derive(Debug)]
pub struct Connection {
    io: Io,
    info: PeerInfo,
    /// Closes the connection if the preface has not arrived by then.
    preface_deadline: Option<Pin<Box<Sleep>>>,
    read_bytes: u64,
    /// The connection's slot; freed when tonic drops the connection.
    _slot: OwnedSemaphorePermit,
}

impl Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

macro_rules! on_io {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = &mut this.preface_deadline {
            if this.read_bytes >= PREFACE_LEN {
                this.preface_deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within connection_preface_timeout_ms",
                )));
            }
        }
        let before = buf.filled().len();
        let result = on_io!(this, io => io.poll_read(cx, buf));
        this.read_bytes += (buf.filled().len() - before) as u64;
        result
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        on_io!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, io => io.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_io!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }
}

/// How a listener accepts connections.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    pub connections_max: usize,
    pub preface_timeout: Duration,
    pub tls_handshakes_max: usize,
    pub log_peers_tracked_max: usize,
    /// TLS, and how a client certificate names its principal.
    pub tls: Option<(Arc<ReloadingTls>, PrincipalFrom)>,
}

impl ListenerOptions {
    pub fn new(
        limits: &Limits,
        connections_max: usize,
        tls: Option<(Arc<ReloadingTls>, PrincipalFrom)>,
    ) -> Self {
        Self {
            connections_max,
            preface_timeout: Duration::from_millis(limits.connection_preface_timeout_ms),
            tls_handshakes_max: limits.tls_handshakes_in_flight_max,
            log_peers_tracked_max: limits.log_peers_tracked_max,
            tls,
        }
    }
}

/// Whether an accept error means the process is out of something (and the
/// loop must pause) rather than one connection having failed.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM].contains(&code))
}

/// Accepts connections on `listener` as `options` say; yields them to
/// tonic once they are ready for HTTP/2.
pub fn incoming(listener: TcpListener, options: ListenerOptions) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(options.connections_max));
    let handshakes = Arc::new(Semaphore::new(options.tls_handshakes_max));
    let shed = PeerTally::new(options.log_peers_tracked_max);
    tokio::spawn(async move {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let (tcp, remote_addr) = match listener.accept().await {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    accepted
                }
                Err(e) if is_resource_error(&e) => {
                    let (count, log) = shed.count(None);
                    if log {
                        tracing::error!(error = %e, failures = count, "accept failed; pausing (raise the file-descriptor limit or lower connections_max)");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            };
            if tx.is_closed() {
                return; // The server stopped.
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                let (count, log) = shed.count(Some(remote_addr.ip()));
                if log {
                    tracing::warn!(peer = %remote_addr, shed = count, limit = options.connections_max, "connection limit reached; closing new connections");
                }
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let deadline = Instant::now() + options.preface_timeout;
            let mut info = PeerInfo { remote_addr: Some(remote_addr), ..PeerInfo::default() };
            let Some((tls, principal_from)) = options.tls.clone() else {
                let connection = Connection {
                    io: Io::Plain(tcp),
                    info,
                    preface_deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
                    read_bytes: 0,
                    _slot: slot,
                };
                if tx.send(Ok(connection)).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            let handshakes = handshakes.clone();
            tokio::spawn(async move {
                let handshake = async {
                    let _turn = handshakes.acquire().await.ok()?;
                    tls.acceptor()
                        .accept(tcp)
                        .await
                        .map_err(|e| {
                            tracing::debug!(peer = %remote_addr, error = %e, "TLS handshake refused");
                        })
                        .ok()
                };
                let Ok(Some(io)) = tokio::time::timeout_at(deadline, handshake).await else {
                    tracing::debug!(peer = %remote_addr, "TLS handshake failed or timed out");
                    return;
                };
                if let Some(cert) = io.get_ref().1.peer_certificates().and_then(|certs| certs.first()) {
                    info.client_principal = principal_from_cert(cert, principal_from);
                    info.client_certificate = describe(cert).map(Arc::new);
                }
                let connection = Connection {
                    io: Io::Tls(Box::new(io)),
                    info,
                    preface_deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
                    read_bytes: 0,
                    _slot: slot,
                };
                let _ = tx.send(Ok(connection)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
