//! Connection and HTTP/2 abuse against a real `kiln serve`: silent
//! connections, connection floods, stream floods, rapid resets,
//! CONTINUATION floods, oversized headers and flow-control overruns. After
//! each, the node still serves everyone else.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::calls::{find_missing, opts};
use common::h2raw::{
    CANCEL, CONTINUATION, DATA, END_HEADERS, END_STREAM, FLOW_CONTROL_ERROR, GOAWAY, HEADERS, REFUSED_STREAM,
    RST_STREAM, RawH2, grpc_request, header_block,
};
use common::{Kiln, eventually};
use kiln_tools::client::connect;

const FIND_MISSING: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
const WAIT: Duration = Duration::from_secs(60);

/// The node answers an ordinary client.
async fn still_serves(kiln: &Kiln) {
    eventually(WAIT, "the node to serve a normal client", || async {
        let conn = connect(&opts(kiln.remote())).await.ok()?;
        find_missing(&conn, "main").await.ok()
    })
    .await;
}

/// Whether the server closes `tcp` (EOF or reset) within `within`.
fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    tcp.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_preface_timeout() {
    let kiln = Kiln::start_with_config("[limits]\nconnection_preface_timeout_ms = 500\n");
    let mut silent = TcpStream::connect(kiln.addr).unwrap();
    let mut partial = TcpStream::connect(kiln.addr).unwrap();
    std::io::Write::write_all(&mut partial, b"PRI * HTTP/2.0\r\n").unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut silent, WAIT), "a connection that never spoke stayed open");
    assert!(closed_within(&mut partial, WAIT), "a connection that sent half a preface stayed open");
    assert!(started.elapsed() >= Duration::from_millis(400), "closed before the timeout");
    still_serves(&kiln).await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_shed() {
    let kiln = Kiln::start_with_config("[limits]\nconnections_max = 8\n");
    let idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(kiln.addr).unwrap()).collect();
    // The 9th is accepted and closed at once, not left hanging.
    let shed = eventually(WAIT, "the ninth connection to be shed", || async {
        let mut ninth = TcpStream::connect(kiln.addr).unwrap();
        closed_within(&mut ninth, Duration::from_secs(2)).then_some(())
    })
    .await;
    let () = shed;
    eventually(WAIT, "the limit to be logged", || async {
        kiln.log_contains("connection limit reached").then_some(())
    })
    .await;
    drop(idle);
    still_serves(&kiln).await;
}

#[test]
fn the_descriptor_limit_is_raised_and_bounds_connections() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("prlimit")
        .args([
            "--nofile=1024:4096",
            common::KILN,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--worker-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("KILN_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux)");
    let mut child = out;
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + WAIT;
    let capacity = loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0 && Instant::now() < deadline, "no capacity line");
        if line.contains("connection capacity") {
            break line.clone();
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(capacity.contains("descriptors") && capacity.contains("4096"), "{capacity}");
    assert!(capacity.contains(&format!("{}", (4096 - 256) / 4 * 3)), "{capacity}");
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused() {
    let kiln = Kiln::start();
    let mut h2 = RawH2::connect(kiln.addr);
    let settings = h2.handshake();
    assert!(settings.contains(&(0x3, 256)), "SETTINGS_MAX_CONCURRENT_STREAMS is not 256: {settings:?}");
    // Open 300 calls that never send their body: the server must refuse
    // those beyond 256 rather than hold them all.
    let block = grpc_request(FIND_MISSING);
    for i in 0..300u32 {
        h2.send(HEADERS, END_HEADERS, 1 + 2 * i, &block).unwrap();
    }
    let mut refused = 0;
    let ended = h2.read_until(|f| {
        if f.kind == RST_STREAM && f.error_code() == Some(REFUSED_STREAM) {
            refused += 1;
        }
        refused >= 44
    });
    assert!(!ended, "the connection ended instead of refusing streams");
    assert_eq!(refused, 44);
    still_serves(&kiln).await;
}

#[tokio::test]
async fn rapid_resets_are_cut_off() {
    let kiln = Kiln::start();
    let mut h2 = RawH2::connect(kiln.addr);
    h2.handshake();
    let block = grpc_request(FIND_MISSING);
    let mut sent = 0u32;
    for i in 0..20_000u32 {
        let id = 1 + 2 * i;
        if h2.send(HEADERS, END_HEADERS, id, &block).is_err()
            || h2.send(RST_STREAM, 0, id, &CANCEL.to_be_bytes()).is_err()
        {
            break;
        }
        sent += 1;
    }
    let mut goaway = false;
    let ended = h2.read_until(|f| {
        goaway |= f.kind == GOAWAY;
        false
    });
    assert!(ended && (goaway || sent < 20_000), "20,000 open-and-reset streams were all accepted");
    still_serves(&kiln).await;
}

#[tokio::test]
async fn continuation_floods_are_cut_off() {
    let kiln = Kiln::start();
    let mut h2 = RawH2::connect(kiln.addr);
    h2.handshake();
    let start = header_block(&[(":method", "POST"), (":scheme", "http"), (":path", FIND_MISSING)]);
    h2.send(HEADERS, 0, 1, &start).unwrap();
    // Endless CONTINUATION frames full of header fields, never END_HEADERS.
    let junk = header_block(&[("x-junk", &"j".repeat(16_000))]);
    let mut sent_bytes = 0usize;
    while sent_bytes < (256 << 20) && h2.send(CONTINUATION, 0, 1, &junk).is_ok() {
        sent_bytes += junk.len();
    }
    let ended = h2.read_until(|_| false);
    assert!(ended, "the connection stayed open");
    assert!(sent_bytes < (64 << 20), "the server swallowed {sent_bytes} bytes of one header block");
    still_serves(&kiln).await;
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let kiln = Kiln::start();
    let mut h2 = RawH2::connect(kiln.addr);
    h2.handshake();
    let mut block = grpc_request(FIND_MISSING);
    block.extend(header_block(&[("x-huge", &"h".repeat(200_000))]));
    let (first, rest) = block.split_at(16_000);
    h2.send(HEADERS, END_STREAM, 1, first).unwrap();
    let mut chunks = rest.chunks(16_000).peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() { END_HEADERS } else { 0 };
        if h2.send(CONTINUATION, flags, 1, chunk).is_err() {
            break;
        }
    }
    let mut served = false;
    h2.read_until(|f| {
        served |= f.kind == DATA && f.stream == 1;
        f.kind == RST_STREAM || f.kind == GOAWAY || served
    });
    assert!(!served, "a request with 200 KB of headers was served");
    still_serves(&kiln).await;
}

#[tokio::test]
async fn flow_control_overruns_are_refused() {
    // Until the client acknowledges the server's SETTINGS, a stream's window
    // is HTTP/2's default 65,535 bytes: one 100 KB DATA frame overruns it.
    let kiln = Kiln::start();
    let mut h2 = RawH2::connect(kiln.addr);
    h2.send(HEADERS, END_HEADERS, 1, &grpc_request(FIND_MISSING)).unwrap();
    h2.send(DATA, 0, 1, &vec![0u8; 100_000]).unwrap();
    let mut flow_error = false;
    h2.read_until(|f| {
        flow_error |= matches!(f.kind, RST_STREAM | GOAWAY) && f.error_code() == Some(FLOW_CONTROL_ERROR);
        flow_error
    });
    assert!(flow_error, "the overrun was not refused with FLOW_CONTROL_ERROR");
    still_serves(&kiln).await;
}
