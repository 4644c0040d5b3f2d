//! The control channel between the worker and the sandbox's stages: one
//! Unix stream socket, the stages' stdin.
//!
//! Worker to stages: after stage 1's [`Report::Ready`], one byte [`GO`],
//! a [`Go`] frame (the sources stage 1 opens for init's binds, and the
//! files it makes the action's stdout and stderr), and a frame with the
//! [`InitSpec`] for init. Each stage reads exactly its part.
//! Stages to worker: [`Report`] frames. A frame is a little-endian `u32`
//! length and that many bytes of JSON. Reports are small and written with
//! one `write`, so the two stages' reports never interleave.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::limits::{SANDBOX_REPORT_FRAME_BYTES_MAX, SANDBOX_SPEC_FRAME_BYTES_MAX};

/// The worker's go-ahead: stage 1's id maps and cgroups are in place.
pub(super) const GO: u8 = b'G';

/// What a stage tells the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Report {
    /// Stage 1 is in its new user namespace, waiting for its id maps.
    Ready,
    /// Building the sandbox failed; why.
    Failed(String),
    /// The sandbox was built but the action's command could not start.
    CannotExec(String),
    /// The action exited with this code.
    Exited(i32),
    /// A signal killed the action.
    Signaled(i32),
}

/// What init needs to build the sandbox and start the action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct InitSpec {
    /// In order: parents before children, symlinks last.
    pub mounts: Vec<Mount>,
    pub working_directory: String,
    pub arguments: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub network: bool,
    /// Size of `/tmp` and of `/dev/shm`.
    pub tmpfs_size_bytes: u64,
    /// Build the sandbox, start nothing, report exit code 0 ([`super::probe`]).
    pub dry_run: bool,
}

/// A host path stage 1 opens (`O_PATH`) for one of init's binds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SourcePath {
    pub path: PathBuf,
    /// Follow a final symlink (else the path must not be one).
    pub follow: bool,
}

/// Stage 1's part of the go-ahead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Go {
    pub sources: Vec<SourcePath>,
    /// Files the worker made (its own, empty) for the action's stdout and
    /// stderr; the same path for both shares one file.
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

/// One entry of the sandbox's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Mount {
    /// Absolute path inside the sandbox, without `.` or `..`.
    pub path: String,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Source {
    /// Bound read-only from the source at this index; a directory or a
    /// file.
    ReadOnly { fd: usize, dir: bool },
    /// The exec root: bound read-write, no setuid, no devices.
    ReadWrite { fd: usize },
    /// A device node, bound read-write.
    Device { fd: usize },
    /// A symbolic link with this target.
    Symlink { target: String },
}

fn frame(body: &[u8]) -> io::Result<Vec<u8>> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Cuts a message to fit a report frame.
fn cut(message: &str) -> String {
    let room = SANDBOX_REPORT_FRAME_BYTES_MAX / 2;
    if message.len() <= room {
        return message.to_owned();
    }
    let mut end = room;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

/// Sends a report with one write; errors are the worker's to notice (a
/// missing report), so they are ignored here.
pub(super) fn report(mut stream: &UnixStream, report: &Report) {
    let report = match report {
        Report::Failed(m) => Report::Failed(cut(m)),
        Report::CannotExec(m) => Report::CannotExec(cut(m)),
        other => other.clone(),
    };
    if let Ok(body) = serde_json::to_vec(&report)
        && let Ok(bytes) = frame(&body)
    {
        let _ = stream.write_all(&bytes);
    }
}

fn write_frame(mut stream: &UnixStream, value: &impl Serialize) -> io::Result<()> {
    let body = serde_json::to_vec(value).map_err(io::Error::other)?;
    if body.len() > SANDBOX_SPEC_FRAME_BYTES_MAX {
        return Err(io::Error::other(format!(
            "the action's spec is {} bytes; the most is {SANDBOX_SPEC_FRAME_BYTES_MAX}",
            body.len()
        )));
    }
    stream.write_all(&frame(&body)?)
}

fn read_frame<T: for<'de> Deserialize<'de>>(mut stream: &UnixStream, what: &str) -> Result<T, String> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).map_err(|e| format!("cannot read the {what}: {e}"))?;
    let len = usize::try_from(u32::from_le_bytes(header)).unwrap_or(usize::MAX);
    if len > SANDBOX_SPEC_FRAME_BYTES_MAX {
        return Err(format!("the {what} is {len} bytes; the most is {SANDBOX_SPEC_FRAME_BYTES_MAX}"));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(|e| format!("cannot read the {what}: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| format!("cannot parse the {what}: {e}"))
}

/// The worker's side: [`GO`], stage 1's sources, init's spec.
pub(super) fn send_go(stream: &UnixStream, go: &Go, spec: &InitSpec) -> io::Result<()> {
    let mut writer = stream;
    writer.write_all(&[GO])?;
    write_frame(stream, go)?;
    write_frame(stream, spec)
}

/// Stage 1's side: waits for [`GO`] and reads its part.
pub(super) fn wait_go(mut stream: &UnixStream) -> Result<Go, String> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).map_err(|e| format!("the worker went away before its go-ahead: {e}"))?;
    if byte[0] != GO {
        return Err(format!("expected the worker's go-ahead, got byte {}", byte[0]));
    }
    read_frame(stream, "go-ahead")
}

/// Init's side.
pub(super) fn receive_spec(stream: &UnixStream) -> Result<InitSpec, String> {
    read_frame(stream, "sandbox spec")
}

/// What [`ReportReader::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Event {
    Report(Report),
    /// Every stage has closed the channel: they have all exited.
    Closed,
    /// The deadline passed first.
    Deadline,
}

/// The worker's reader of reports, with deadlines.
#[derive(Debug)]
pub(super) struct ReportReader {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl ReportReader {
    pub fn new(stream: UnixStream) -> Self {
        Self { stream, buf: Vec::new() }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn next(&mut self, deadline: Instant) -> io::Result<Event> {
        loop {
            if let Some(report) = self.take()? {
                return Ok(Event::Report(report));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Event::Deadline);
            }
            self.stream.set_read_timeout(Some(deadline - now))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Ok(Event::Closed),
                Ok(0) => return Err(io::Error::other("a sandbox stage exited in the middle of a report")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn take(&mut self) -> io::Result<Option<Report>> {
        let Some(header) = self.buf.first_chunk::<4>() else { return Ok(None) };
        let len = usize::try_from(u32::from_le_bytes(*header)).unwrap_or(usize::MAX);
        if len > SANDBOX_REPORT_FRAME_BYTES_MAX {
            return Err(io::Error::other(format!("a sandbox stage sent a {len}-byte report")));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let report = serde_json::from_slice(&self.buf[4..4 + len])
            .map_err(|e| io::Error::other(format!("a sandbox stage sent an unreadable report: {e}")))?;
        self.buf.drain(..4 + len);
        Ok(Some(report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec() -> InitSpec {
        InitSpec {
            mounts: vec![
                Mount { path: "/usr".to_owned(), source: Source::ReadOnly { fd: 0, dir: true } },
                Mount { path: "/bin".to_owned(), source: Source::Symlink { target: "usr/bin".to_owned() } },
            ],
            working_directory: "a".to_owned(),
            arguments: vec!["true".to_owned()],
            environment: vec![("A".to_owned(), "b".to_owned())],
            network: false,
            tmpfs_size_bytes: 1 << 20,
            dry_run: false,
        }
    }

    #[test]
    fn reports_arrive_whole_and_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        report(&a, &Report::Ready);
        report(&a, &Report::Failed("x".repeat(SANDBOX_REPORT_FRAME_BYTES_MAX * 2)));
        report(&a, &Report::Signaled(9));
        drop(a);
        let mut reader = ReportReader::new(b);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(reader.next(deadline).unwrap(), Event::Report(Report::Ready));
        let Event::Report(Report::Failed(m)) = reader.next(deadline).unwrap() else { panic!("not Failed") };
        assert!(m.len() <= SANDBOX_REPORT_FRAME_BYTES_MAX && m.ends_with("..."));
        assert_eq!(reader.next(deadline).unwrap(), Event::Report(Report::Signaled(9)));
        assert_eq!(reader.next(deadline).unwrap(), Event::Closed);
    }

    #[test]
    fn a_silent_stage_meets_the_deadline() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut reader = ReportReader::new(b);
        let start = Instant::now();
        assert_eq!(reader.next(start + Duration::from_millis(20)).unwrap(), Event::Deadline);
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn oversized_and_garbled_reports_are_errors() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).unwrap();
        let mut reader = ReportReader::new(b);
        assert!(reader.next(Instant::now() + Duration::from_secs(1)).is_err());
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&frame(b"{nope").unwrap()).unwrap();
        let mut reader = ReportReader::new(b);
        assert!(reader.next(Instant::now() + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn go_then_sources_then_spec() {
        let (a, b) = UnixStream::pair().unwrap();
        let go = Go {
            sources: vec![SourcePath { path: PathBuf::from("/usr"), follow: false }],
            stdout: PathBuf::from("/out"),
            stderr: PathBuf::from("/err"),
        };
        send_go(&a, &go, &spec()).unwrap();
        assert_eq!(wait_go(&b).unwrap(), go);
        assert_eq!(receive_spec(&b).unwrap(), spec());
        drop(a);
        assert!(receive_spec(&b).is_err());
    }
}
