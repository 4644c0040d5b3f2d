//! Connecting to a REAPI endpoint: plaintext or TLS (with an optional client
//! certificate), and credentials attached to every call.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kiln_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Largest gRPC message the tools accept.
pub use kiln_proto::limits::TOOL_MESSAGE_SIZE_BYTES_MAX as MESSAGE_SIZE_BYTES_MAX;

/// How to reach and authenticate to a server.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `grpc://HOST:PORT` or `grpcs://HOST:PORT`.
    pub remote: String,
    /// CA bundle to verify the server with (default: the system's roots).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mTLS (PEM).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Bearer token.
    pub token: Option<String>,
    /// `user:password` for basic auth.
    pub basic: Option<String>,
}

/// Adds the `authorization` header to every call.
#[derive(Debug, Clone, Default)]
pub struct Credentials(Option<AsciiMetadataValue>);

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel with credentials.
pub type AuthChannel = InterceptedService<Channel, Credentials>;

/// An open connection.
#[derive(Debug, Clone)]
pub struct Connection {
    channel: Channel,
    credentials: Credentials,
}

impl Connection {
    pub fn channel(&self) -> AuthChannel {
        InterceptedService::new(self.channel.clone(), self.credentials.clone())
    }

    /// A CAS client whose messages may be as large as Kiln's tools allow.
    pub fn cas(&self) -> ContentAddressableStorageClient<AuthChannel> {
        ContentAddressableStorageClient::new(self.channel())
            .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX)
    }

    /// A ByteStream client, likewise.
    pub fn bytestream(&self) -> ByteStreamClient<AuthChannel> {
        ByteStreamClient::new(self.channel())
            .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX)
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// The `authorization` header value for a bearer token or `user:password`
/// (basic auth), if either is given; both at once are refused.
pub fn authorization(token: Option<&str>, basic: Option<&str>) -> Result<Option<String>> {
    use base64::Engine as _;
    Ok(match (token, basic) {
        (Some(_), Some(_)) => bail!("give a token or basic auth, not both"),
        (Some(token), None) => Some(format!("Bearer {}", token.trim())),
        (None, Some(basic)) => {
            Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(basic)))
        }
        (None, None) => None,
    })
}

/// Opens a connection as `options` say.
pub async fn connect(options: &ClientOptions) -> Result<Connection> {
    let remote = &options.remote;
    let (uri, tls) = if let Some(rest) = remote.strip_prefix("grpc://") {
        (format!("http://{rest}"), false)
    } else if let Some(rest) = remote.strip_prefix("grpcs://") {
        (format!("https://{rest}"), true)
    } else if remote.starts_with("http://") {
        (remote.clone(), false)
    } else if remote.starts_with("https://") {
        (remote.clone(), true)
    } else {
        bail!("{remote}: expected grpc://HOST:PORT or grpcs://HOST:PORT")
    };
    let mut endpoint = kiln_proto::transport::tune(
        Endpoint::from_shared(uri).with_context(|| format!("invalid remote {remote}"))?,
    );
    if tls {
        let mut config = ClientTlsConfig::new();
        config = match &options.tls_ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_native_roots(),
        };
        match (&options.tls_cert, &options.tls_key) {
            (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(read(cert)?, read(key)?)),
            (None, None) => {}
            _ => bail!("--tls-cert and --tls-key go together"),
        }
        endpoint = endpoint.tls_config(config).context("TLS configuration")?;
    } else if options.tls_ca.is_some() || options.tls_cert.is_some() {
        bail!("TLS options need a grpcs:// remote");
    }
    let credentials = match authorization(options.token.as_deref(), options.basic.as_deref())? {
        Some(value) => Credentials(Some(
            MetadataValue::try_from(value).context("credentials are not valid header text")?,
        )),
        None => Credentials(None),
    };
    let channel = endpoint.connect().await.with_context(|| format!("cannot connect to {remote}"))?;
    Ok(Connection { channel, credentials })
}

/// A connection over a stream that is already connected (a Unix socket a
/// parent process handed over), without credentials: whoever holds the
/// socket was let in by its other end. There is no reconnecting: once the
/// stream ends, every call fails with UNAVAILABLE.
pub async fn connect_stream(stream: tokio::net::UnixStream) -> Result<Connection> {
    let once = std::sync::Arc::new(std::sync::Mutex::new(Some(stream)));
    let connector = tower::service_fn(move |_: http::Uri| {
        let stream = once.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        async move {
            stream
                .map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "the socket was closed"))
        }
    });
    // The authority is never resolved: the connector ignores it.
    let endpoint = kiln_proto::transport::tune(Endpoint::from_static("http://parent.invalid"));
    let channel =
        endpoint.connect_with_connector(connector).await.context("connect over the inherited socket")?;
    Ok(Connection { channel, credentials: Credentials(None) })
}
