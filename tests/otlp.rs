//! Traces exported over OTLP/gRPC (`[log] otlp_endpoint`) to a collector
//! (a minimal OTLP trace service in the test): each call's span carries
//! Bazel's request metadata, the principal, the tenant and the status; a
//! sample ratio traces that share of calls; a dead collector neither
//! slows calls nor holds a stop; a malformed endpoint refuses start-up.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Kiln;
use futures::StreamExt;
use kiln_proto::reapi::{GetActionResultRequest, RequestMetadata};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// A span received, with its resource's attributes.
type Received = (Vec<KeyValue>, opentelemetry_proto::tonic::trace::v1::Span);

/// Every span received.
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    /// A collector listening on a loopback port.
    async fn serve() -> (Collector, std::net::SocketAddr) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        (collector, addr)
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (resource.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    })
}

#[tokio::test]
async fn calls_are_exported_with_bazels_metadata_principal_and_tenant() {
    let (collector, addr) = Collector::serve().await;
    let kiln = Kiln::start_with_config(&format!("[log]\notlp_endpoint = \"http://{addr}\"\n"));

    let metadata = RequestMetadata {
        tool_invocation_id: "invocation-42".into(),
        action_id: "action-7".into(),
        target_id: "//app:main".into(),
        action_mnemonic: "CppCompile".into(),
        ..Default::default()
    };
    let digest = kiln_proto::DigestFunction::Sha256.compute(b"no such action").to_proto();
    let mut request = tonic::Request::new(GetActionResultRequest {
        instance_name: "main".into(),
        action_digest: Some(digest),
        ..Default::default()
    });
    request.metadata_mut().insert_bin(
        kiln_proto::transport::REQUEST_METADATA_HEADER,
        tonic::metadata::MetadataValue::from_bytes(&metadata.encode_to_vec()),
    );
    let miss = kiln.ac().await.get_action_result(request).await.unwrap_err();
    assert_eq!(miss.code(), tonic::Code::NotFound);

    let (resource, span) =
        common::eventually(Duration::from_secs(30), "the call's span at the collector", || {
            let found = collector
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|(_, s)| {
                    s.name == "grpc"
                        && attribute(&s.attributes, "method").as_deref() == Some("GetActionResult")
                })
                .cloned();
            async move { found }
        })
        .await;
    let get = |key: &str| attribute(&span.attributes, key).unwrap_or_else(|| panic!("no {key} in {span:?}"));
    assert_eq!(get("service"), "ActionCache");
    assert_eq!(get("code"), "NOT_FOUND");
    assert!(get("invocation").contains("invocation-42"), "{span:?}");
    assert!(
        get("action").contains("action-7") && get("build_target").contains("//app:main"),
        "{:?}",
        span.attributes
    );
    assert!(get("mnemonic").contains("CppCompile"));
    assert!(get("tenant").contains("main"), "{span:?}");
    assert!(!get("principal").is_empty());
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);
    assert_eq!(attribute(&resource, "service.name").as_deref(), Some("kiln"));
}

#[test]
fn a_malformed_endpoint_refuses_start_up() {
    let dir = tempfile::tempdir().unwrap();
    for (endpoint, ratio) in
        [("collector:4317", "1.0"), ("ftp://collector", "1.0"), ("http://collector:4317", "2")]
    {
        let config = dir.path().join("kiln.toml");
        std::fs::write(
            &config,
            format!("[log]\notlp_endpoint = \"{endpoint}\"\notlp_sample_ratio = {ratio}\n"),
        )
        .unwrap();
        let data = dir.path().join("data");
        let (ok, _, err) = common::kiln(&[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]);
        assert!(!ok, "{endpoint} {ratio}");
        assert!(err.contains("[log] otlp_"), "{err}");
    }
}

#[tokio::test]
async fn a_sample_ratio_traces_that_share_of_calls() {
    let (collector, addr) = Collector::serve().await;
    let kiln = Kiln::start_with_config(&format!(
        "[log]\notlp_endpoint = \"http://{addr}\"\notlp_sample_ratio = 0.25\n"
    ));
    let mut ac = kiln.ac().await;
    for i in 0..200u32 {
        let digest = kiln_proto::DigestFunction::Sha256.compute(&i.to_le_bytes()).to_proto();
        let request = GetActionResultRequest { action_digest: Some(digest), ..Default::default() };
        assert_eq!(ac.get_action_result(request).await.unwrap_err().code(), tonic::Code::NotFound);
    }
    let count = || {
        collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| attribute(&s.attributes, "method").as_deref() == Some("GetActionResult"))
            .count()
    };
    common::eventually(Duration::from_secs(30), "a quarter of the calls' spans", || {
        let n = count();
        async move { (n >= 45).then_some(()) }
    })
    .await;
    // One call in four: 50, give or take the other calls the node saw.
    let settled = count();
    assert!((45..=55).contains(&settled), "{settled} spans for 200 calls at 0.25");
}

#[tokio::test]
async fn a_dead_collector_neither_slows_calls_nor_holds_the_stop() {
    // Port 9 (discard) refuses: every export fails.
    let kiln = Kiln::start_with_config("[log]\notlp_endpoint = \"http://127.0.0.1:9\"\n");
    let ac = kiln.ac().await;
    // More spans than the exporter's queue holds (8,192): the rest are
    // dropped, and no call waits for them.
    let calls = futures::stream::iter(0..10_000u32).for_each_concurrent(32, |i| {
        let mut ac = ac.clone();
        async move {
            let digest = kiln_proto::DigestFunction::Sha256.compute(&i.to_le_bytes()).to_proto();
            let request = GetActionResultRequest { action_digest: Some(digest), ..Default::default() };
            assert_eq!(ac.get_action_result(request).await.unwrap_err().code(), tonic::Code::NotFound);
        }
    });
    tokio::time::timeout(Duration::from_secs(60), calls).await.expect("calls are not held by the exporter");
    drop(ac);
    let started = std::time::Instant::now();
    let (status, log) = tokio::task::spawn_blocking(move || kiln.stop()).await.unwrap();
    assert!(status.success(), "{log}");
    assert!(started.elapsed() < Duration::from_secs(15), "the stop took {:?}", started.elapsed());
}
