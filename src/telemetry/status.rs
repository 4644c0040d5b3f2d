//! The status page (HTML, no script) and its text form (`kiln status`),
//! rendered from one [`Page`]; and the recent history they show.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_scheduler::Snapshot;

use super::stores::StoreView;
use super::worker::WorkerView;

/// How often the history takes a sample, and how many it keeps (15
/// minutes).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
const SAMPLES: usize = 90;

/// Counters at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub at: u64,
    pub requests: u64,
    pub ac_hits: u64,
    pub ac_misses: u64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
}

impl Sample {
    pub fn now() -> Sample {
        let t = &kiln_proto::metrics::global().totals;
        Sample {
            at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            requests: t.requests.load(Ordering::Relaxed),
            ac_hits: t.ac_hits.load(Ordering::Relaxed),
            ac_misses: t.ac_misses.load(Ordering::Relaxed),
            received_bytes: t.received_bytes.load(Ordering::Relaxed),
            sent_bytes: t.sent_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The last 15 minutes of samples.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    pub fn record(&self) {
        let mut s = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.len() == SAMPLES {
            s.pop_front();
        }
        s.push_back(Sample::now());
    }

    /// Per-minute (or shorter, at the start) windows, newest first.
    fn windows(&self) -> Vec<(Sample, Sample)> {
        let mut samples: Vec<Sample> =
            self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().copied().collect();
        samples.push(Sample::now());
        let mut out = Vec::new();
        let mut end = samples.len() - 1;
        while end > 0 && out.len() < 15 {
            let start = end.saturating_sub(6);
            out.push((samples[start], samples[end]));
            end = start;
        }
        out
    }
}

/// Everything one rendering shows.
pub struct Page<'a> {
    pub version: &'static str,
    pub uptime: Duration,
    pub summary: &'a [(String, String)],
    pub history: &'a History,
    /// None on a worker process.
    pub stores: Option<Vec<StoreView>>,
    pub scheduler: Option<Snapshot>,
    pub worker: Option<WorkerView>,
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn ratio(hits: u64, misses: u64) -> String {
    if hits + misses == 0 {
        "–".to_owned()
    } else {
        format!("{:.1}%", 100.0 * hits as f64 / (hits + misses) as f64)
    }
}

fn ago(at: SystemTime) -> String {
    let secs = SystemTime::now().duration_since(at).map_or(0, |d| d.as_secs());
    format!("{secs} s ago")
}

/// A table: the header row, then rows of cells (already escaped).
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    out.push_str("<table><tr>");
    for h in header {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(out, "<tr><td colspan=\"{}\">none</td></tr>", header.len());
    }
    out.push_str("</table>\n");
}

/// One section's rows, for both renderings (cells unescaped).
struct Section {
    id: &'static str,
    title: &'static str,
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    /// Per row, links for the HTML form: (cell index, href).
    links: Vec<Vec<(usize, String)>>,
}

fn sections(page: &Page<'_>) -> Vec<Section> {
    let mut out = Vec::new();
    let summary = page.summary.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
    out.push(plain("configuration", "Configuration", vec!["setting", "value"], summary));

    if let Some(stores) = &page.stores {
        server_sections(page, stores, &mut out);
    }
    match &page.scheduler {
        Some(s) => scheduler_sections(s, &mut out),
        None if page.stores.is_some() => {
            out.push(plain("queue", "Queue", vec!["state"], vec![vec!["remote execution is off".into()]]));
        }
        None => {}
    }
    if let Some(w) = &page.worker {
        out.push(worker_section(w));
    }
    out
}

fn plain(
    id: &'static str,
    title: &'static str,
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
) -> Section {
    let links = vec![Vec::new(); rows.len()];
    Section { id, title, header, rows, links }
}

/// Traffic, stores and their health: what a node with a CAS shows.
fn server_sections(page: &Page<'_>, stores: &[StoreView], out: &mut Vec<Section>) {
    let now = Sample::now();
    let mut traffic = vec![vec![
        "since start".to_owned(),
        now.requests.to_string(),
        ratio(now.ac_hits, now.ac_misses),
        format!("{} / {}", now.ac_hits, now.ac_hits + now.ac_misses),
        mib(now.received_bytes),
        mib(now.sent_bytes),
    ]];
    for (a, b) in page.history.windows() {
        let secs = b.at.saturating_sub(a.at).max(1);
        let (hits, misses) = (b.ac_hits - a.ac_hits, b.ac_misses - a.ac_misses);
        traffic.push(vec![
            format!("last {} s, ending {} s ago", secs, now.at.saturating_sub(b.at)),
            format!("{:.1}/s", (b.requests - a.requests) as f64 / secs as f64),
            ratio(hits, misses),
            format!("{hits} / {}", hits + misses),
            format!("{}/s", mib((b.received_bytes - a.received_bytes) / secs)),
            format!("{}/s", mib((b.sent_bytes - a.sent_bytes) / secs)),
        ]);
    }
    let header = vec!["window", "requests", "AC hit ratio", "AC hits / lookups", "received", "sent"];
    out.push(plain("cache", "Cache and traffic", header, traffic));

    let rows = stores
        .iter()
        .map(|v| {
            let fill = if v.capacity_bytes > 0 { v.used_bytes as f64 / v.capacity_bytes as f64 } else { 0.0 };
            vec![
                v.store.to_uppercase(),
                format!("{} ({})", v.backend, v.io_path),
                format!("{} of {} ({:.1}%)", mib(v.used_bytes), mib(v.capacity_bytes), fill * 100.0),
                v.entries.to_string(),
                mib(v.evicted_bytes),
                v.epoch_age_seconds.map_or_else(|| "–".to_owned(), |a| format!("{a:.1} s ago")),
                format!("{} ok, {} failed", v.syncs, v.sync_failures),
            ]
        })
        .collect();
    let header = vec!["store", "backend", "fill", "entries", "evicted", "last sync", "syncs"];
    out.push(plain("stores", "Stores", header, rows));
    let data_loss = kiln_proto::metrics::global().data_loss.get();
    out.push(plain(
        "health",
        "Health",
        vec!["check", "value"],
        std::iter::once(vec!["damaged records found (DATA_LOSS)".into(), data_loss.to_string()])
            .chain(stores.iter().map(|v| {
                vec![
                    format!("{} writes durable", v.store.to_uppercase()),
                    v.unhealthy.as_ref().map_or_else(|| "yes".to_owned(), |why| format!("NO: {why}")),
                ]
            }))
            .chain(stores.iter().filter_map(|v| {
                let (held, max) = v.staging?;
                Some(vec![
                    format!("{} uploads in progress (staging area)", v.store.to_uppercase()),
                    format!("{} of {}", mib(held), mib(max)),
                ])
            }))
            .collect(),
    ));
}

/// The queue, executions, workers and recent failures.
fn scheduler_sections(s: &Snapshot, out: &mut Vec<Section>) {
    let queue = s
        .queued_by_platform
        .iter()
        .map(|(p, n)| vec!["platform".to_owned(), p.clone(), n.to_string()])
        .chain(s.queued_by_invocation.iter().map(|(i, n)| {
            vec![
                "invocation".to_owned(),
                if i.is_empty() { "(none)".into() } else { i.clone() },
                n.to_string(),
            ]
        }))
        .collect();
    out.push(plain("queue", "Queue", vec!["by", "name", "queued"], queue));
    let executing = s
        .executing
        .iter()
        .map(|e| {
            vec![
                e.execution.clone(),
                e.action.clone(),
                e.instance.clone(),
                e.invocation.clone(),
                e.worker.clone(),
                e.attempt.to_string(),
                format!("{:.1} s", e.running_for.as_secs_f64()),
            ]
        })
        .collect();
    let header = vec!["execution", "action", "instance", "invocation", "worker", "attempt", "running for"];
    out.push(plain("executing", "Executing", header, executing));
    let workers = s
        .workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.platform.clone(),
                format!("{} of {} busy", w.running, w.slots),
                format!("{:.1} s ago", w.silent_for.as_secs_f64()),
            ]
        })
        .collect();
    out.push(plain("workers", "Workers", vec!["worker", "properties", "slots", "last heard"], workers));
    let mut rows = Vec::new();
    let mut links = Vec::new();
    for f in &s.failures {
        let log = |d: &Option<kiln_proto::Digest>| {
            d.map(|d| format!("/logs/{}/{}/{}", d.hash_hex(), d.size_bytes(), path_segment(&f.instance)))
        };
        let (stdout, stderr) = (log(&f.stdout), log(&f.stderr));
        rows.push(vec![
            ago(f.at),
            f.action.clone(),
            f.worker.clone(),
            f.exit_code.map_or_else(|| "–".into(), |c| c.to_string()),
            f.code.to_owned(),
            f.message.clone(),
            stdout.clone().unwrap_or_else(|| "–".into()),
            stderr.clone().unwrap_or_else(|| "–".into()),
        ]);
        links.push([(6, stdout), (7, stderr)].into_iter().filter_map(|(i, l)| Some((i, l?))).collect());
    }
    let header = vec!["when", "action", "worker", "exit code", "status", "message", "stdout", "stderr"];
    out.push(Section { id: "failures", title: "Recent failed actions", header, rows, links });
}

/// This process's worker: slots, file cache, runs by outcome.
fn worker_section(w: &WorkerView) -> Section {
    let c = &w.cache;
    let fill = if w.cache_capacity_bytes > 0 { c.bytes as f64 / w.cache_capacity_bytes as f64 } else { 0.0 };
    let runs = &w.runs;
    let runs = if runs.is_empty() {
        "none yet".to_owned()
    } else {
        runs.iter().map(|(o, n)| format!("{o} {n}")).collect::<Vec<_>>().join(", ")
    };
    let rows = vec![
        vec!["worker".into(), w.id.clone()],
        vec!["slots".into(), format!("{} of {} busy", w.running, w.slots)],
        vec![
            "file cache".into(),
            format!(
                "{} of {} ({:.1}%), {} files",
                mib(c.bytes),
                mib(w.cache_capacity_bytes),
                fill * 100.0,
                c.entries
            ),
        ],
        vec![
            "file cache hits".into(),
            format!(
                "{} ({} of {} files; {} evicted)",
                ratio(c.hits, c.misses),
                c.hits,
                c.hits + c.misses,
                c.evictions
            ),
        ],
        vec!["runs".into(), runs],
    ];
    let mut rows = rows;
    if let Some(process) = &w.process {
        rows.insert(1, vec!["process".into(), process.clone()]);
    }
    plain("worker", "Worker", vec!["", "value"], rows)
}

/// The page as HTML: server-rendered, no script, readable in a text browser.
pub fn html(page: &Page<'_>) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Kiln status</title>\
         <meta http-equiv=\"refresh\" content=\"10\">\
         <style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}\
         th,td{border:1px solid #bbb;padding:3px 8px;text-align:left;font-size:14px}th{background:#eee}\
         h2{margin-bottom:.3em}</style></head><body>\n",
    );
    let _ = writeln!(
        out,
        "<h1>Kiln status</h1><p>version {} · up {} · <a href=\"/metrics\">metrics</a></p>",
        esc(page.version),
        uptime(page.uptime)
    );
    for section in sections(page) {
        let _ = writeln!(out, "<h2 id=\"{}\">{}</h2>", section.id, esc(section.title));
        let rows: Vec<Vec<String>> = section
            .rows
            .iter()
            .zip(&section.links)
            .map(|(row, links)| {
                row.iter()
                    .enumerate()
                    .map(|(i, cell)| match links.iter().find(|(at, _)| *at == i) {
                        Some((_, href)) => format!(
                            "<a href=\"{}\">{}</a>",
                            esc(href),
                            if i == 6 { "stdout" } else { "stderr" }
                        ),
                        None => esc(cell),
                    })
                    .collect()
            })
            .collect();
        table(&mut out, &section.header, &rows);
    }
    out.push_str("</body></html>\n");
    out
}

/// The page as text, for `kiln status`.
pub fn text(page: &Page<'_>) -> String {
    let mut out = format!("Kiln {} · up {}\n", page.version, uptime(page.uptime));
    for section in sections(page) {
        let _ = write!(out, "\n== {}\n", section.title);
        let mut widths: Vec<usize> = section.header.iter().map(|h| h.chars().count()).collect();
        for row in &section.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count().min(60));
            }
        }
        let line = |cells: Vec<String>| {
            let mut l = String::new();
            for (cell, w) in cells.iter().zip(&widths) {
                let cell: String = cell.chars().take(60).collect();
                let _ = write!(l, "{cell:<w$}  ");
            }
            l.trim_end().to_owned() + "\n"
        };
        out.push_str(&line(section.header.iter().map(|h| (*h).to_owned()).collect()));
        if section.rows.is_empty() {
            out.push_str("(none)\n");
        }
        for row in &section.rows {
            out.push_str(&line(row.clone()));
        }
    }
    out
}

/// An instance name as a URL path tail: `/` kept (instance names have
/// segments), everything else but unreserved characters percent-encoded.
fn path_segment(instance: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'/').remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(instance, KEEP).to_string()
}

fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_links_carry_any_instance_name_intact() {
        for instance in ["", "main", "main/dev.alice", "a b?c#d%e\"<f>", "ünïcode/ok"] {
            let link = path_segment(instance);
            assert!(link.bytes().all(|b| b.is_ascii_graphic() && !b"?#\"<> ".contains(&b)), "{link}");
            let back = percent_encoding::percent_decode_str(&link).decode_utf8().unwrap();
            assert_eq!(back, instance);
        }
        assert_eq!(path_segment("main/dev.alice"), "main/dev.alice");
    }
}
