//! Plain HTTP/1.1 to a node's metrics listener, and reading its metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// GET over HTTP/1.1: (status, body).
pub fn get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
    let (status, response) = get_with_headers(addr, path, authorization);
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// GET over HTTP/1.1: (status, the whole response).
pub fn get_with_headers(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, response)
}

/// The sum of the samples of `name` whose labels contain every one of
/// `labels` (`key="value"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}
