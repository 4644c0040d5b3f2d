//! A plain HTTP/1.1 origin server on a free loopback port, for the
//! Remote Asset API's downloads: `/NAME` serves the file NAME, `/slow/NAME`
//! the same after 300 ms, `/moved/NAME` redirects to `/NAME`, anything
//! else is 404. Counts the requests per path.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Origin {
    pub port: u16,
    hits: Arc<Mutex<HashMap<String, u32>>>,
}

impl Origin {
    pub fn start(files: HashMap<String, Vec<u8>>) -> Origin {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the origin");
        let port = listener.local_addr().expect("its address").port();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let (counted, files) = (hits.clone(), Arc::new(files));
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (files, counted) = (files.clone(), counted.clone());
                std::thread::spawn(move || answer(stream, &files, &counted));
            }
        });
        Origin { port, hits }
    }

    /// `http://127.0.0.1:PORT/`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn hits(&self, path: &str) -> u32 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn answer(
    stream: std::net::TcpStream,
    files: &HashMap<String, Vec<u8>>,
    counted: &Mutex<HashMap<String, u32>>,
) {
    let Ok(reading) = stream.try_clone() else { return };
    let mut reader = BufReader::new(reading);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap_or(0);
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut header = String::new();
    while reader.read_line(&mut header).unwrap_or(0) > 2 {
        header.clear();
    }
    *counted.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
    let head = |status: &str, extra: &str, len: usize| {
        format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    let mut out = stream;
    let (name, slow) = match path.strip_prefix("/slow/") {
        Some(name) => (name, true),
        None => (path.trim_start_matches('/'), false),
    };
    let _ = if let Some(target) = path.strip_prefix("/moved/") {
        out.write_all(head("302 Found", &format!("Location: /{target}\r\n"), 0).as_bytes())
    } else if let Some(body) = files.get(name) {
        if slow {
            std::thread::sleep(Duration::from_millis(300));
        }
        out.write_all(head("200 OK", "", body.len()).as_bytes()).and_then(|()| out.write_all(body))
    } else {
        out.write_all(head("404 Not Found", "", 0).as_bytes())
    };
}
