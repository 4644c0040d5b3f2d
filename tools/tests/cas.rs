//! The verifying CAS client against a server that answers with the wrong
//! bytes (the null server streams zeros for any read and commits whatever
//! an upload sends): a read that does not match its digest is DATA_LOSS
//! naming the digest and leaves nothing behind, and an upload the server
//! commits short is an error.

use bytes::Bytes;
use kiln_proto::{Code, Digest, DigestFunction};
use kiln_tools::cas::Cas;
use kiln_tools::client::{ClientOptions, connect};
use tokio::sync::oneshot;

/// A client of a null server that runs until the sender is dropped.
async fn null_cas() -> (Cas, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(kiln_tools::bench::null_server::serve(listener, async {
        let _ = stopped.await;
    }));
    let options = ClientOptions { remote: format!("grpc://{addr}"), ..Default::default() };
    (Cas::new(connect(&options).await.unwrap(), "", DigestFunction::Sha256), stop)
}

#[tokio::test]
async fn reads_of_other_bytes_are_data_loss_and_leave_nothing_behind() {
    let (cas, _server) = null_cas().await;
    let zeros = DigestFunction::Sha256.compute(&[0u8; 3000]);
    assert_eq!(cas.read_bytes(&zeros).await.unwrap(), vec![0u8; 3000], "zeros are right for this one");

    let digest = DigestFunction::Sha256.compute(b"anything but zeros");
    let error = cas.read_bytes(&digest).await.unwrap_err();
    assert_eq!(error.code(), Code::DataLoss, "{error}");
    assert!(error.message().contains(&digest.hash_hex()), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let error = cas.read_to_file(&digest, &path).await.unwrap_err();
    assert_eq!(error.code(), Code::DataLoss, "{error}");
    assert!(!path.exists(), "the wrong bytes are not left where the blob was asked for");
    cas.read_to_file(&zeros, &path).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 3000]);

    let out = dir.path().join("out");
    std::fs::write(&out, b"before").unwrap();
    let error = cas.get_to_file(&digest, &out).await.unwrap_err();
    assert!(format!("{error:#}").contains("DataLoss"), "{error:#}");
    assert_eq!(std::fs::read(&out).unwrap(), b"before", "a failed download leaves the old file alone");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "and no partial file");
}

#[tokio::test]
async fn an_upload_committed_short_is_an_error() {
    let (cas, _server) = null_cas().await;
    let data = Bytes::from_static(b"0123456789");
    let right = DigestFunction::Sha256.compute(&data);
    // A digest that says 100 bytes, for 10: the server commits the 10.
    let long = Digest::new(DigestFunction::Sha256, *right.hash(), 100).unwrap();
    let error = cas.upload_bytes(&long, data.clone()).await.unwrap_err();
    assert!(error.message().contains("committed 10 bytes"), "{error}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ten");
    std::fs::write(&path, &data).unwrap();
    let error = cas.upload_file(&long, &path).await.unwrap_err();
    assert!(error.message().contains("committed 10 bytes"), "{error}");
    // Whole, they pass.
    cas.upload_bytes(&right, data).await.unwrap();
    cas.upload_file(&right, &path).await.unwrap();
}

#[tokio::test]
async fn missing_is_asked_in_bounded_calls_and_keeps_the_order() {
    let (cas, _server) = null_cas().await;
    let digests: Vec<Digest> =
        (0..25_000).map(|i| DigestFunction::Sha256.compute(format!("{i}").as_bytes())).collect();
    // The null server reports every digest missing.
    assert_eq!(cas.missing(&digests).await.unwrap(), digests);
    let mixed = [digests[0], DigestFunction::Blake3.compute(b"x")];
    assert_eq!(cas.missing(&mixed).await.unwrap_err().code(), Code::InvalidArgument);
}
