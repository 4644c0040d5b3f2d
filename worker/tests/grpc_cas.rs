//! The worker's gRPC CAS is the tools' verifying client: against a server
//! that answers with the wrong bytes (the null server streams zeros), a
//! blob, a file and a tree are all DATA_LOSS naming the digest, and no
//! wrong byte reaches the caller.

use kiln_proto::reapi::Directory;
use kiln_proto::{Code, DigestFunction};
use kiln_worker::cas::CasClient;
use kiln_worker::grpc_cas::GrpcCas;
use prost::Message;

#[tokio::test]
async fn a_cas_answering_other_bytes_is_data_loss_for_blobs_files_and_trees() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kiln_tools::bench::null_server::serve(listener, async {
        let _ = stopped.await;
    }));
    let options =
        kiln_tools::client::ClientOptions { remote: format!("grpc://{addr}"), ..Default::default() };
    let connection = kiln_tools::client::connect(&options).await.unwrap();
    let cas = GrpcCas::new(connection, "", DigestFunction::Sha256);

    let blob = DigestFunction::Sha256.compute(b"an input file");
    let error = cas.read_bytes(&blob).await.unwrap_err();
    assert_eq!((error.code(), error.message().contains(&blob.hash_hex())), (Code::DataLoss, true), "{error}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fetched");
    let error = cas.read_to_file(&blob, &path).await.unwrap_err();
    assert_eq!(error.code(), Code::DataLoss, "{error}");
    assert!(!path.exists(), "no wrong byte is left for the file cache");

    let root = Directory { files: vec![Default::default()], ..Default::default() };
    let root = DigestFunction::Sha256.compute(&root.encode_to_vec());
    let error = cas.get_tree(&root, 10).await.unwrap_err();
    assert_eq!((error.code(), error.message().contains(&root.hash_hex())), (Code::DataLoss, true), "{error}");
    // The empty directory is the empty blob: nothing to read, nothing wrong.
    let empty = DigestFunction::Sha256.empty();
    assert_eq!(cas.get_tree(&empty, 10).await.unwrap().directories, vec![(empty, Directory::default())]);
}
