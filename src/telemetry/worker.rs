//! A worker's own figures, read at scrape time: its slots and running
//! actions (recorded as they happen) and its file cache. `kiln serve`
//! reads its local worker's figures from that process's `/metrics`.

use kiln_worker::cache::{CacheStats, FileCache};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// One worker process's (or `kiln serve`'s local worker's) state.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub id: String,
    pub slots: i64,
    pub running: i64,
    pub cache: CacheStats,
    pub cache_capacity_bytes: u64,
    /// Runs by outcome.
    pub runs: Vec<(String, u64)>,
    /// The worker's process, when it is not this one.
    pub process: Option<String>,
}

/// The worker families' prefix in the exposition.
const WORKER_PREFIX: &str = "kiln_worker_";

/// Whether an exposition line (a sample, or a `# HELP`/`# TYPE`/`# UNIT`
/// line) belongs to one of the worker's families.
fn is_worker_line(line: &str) -> bool {
    let name = match line.strip_prefix("# ") {
        Some(rest) => rest.split_whitespace().nth(1).unwrap_or(""),
        None => line,
    };
    name.starts_with(WORKER_PREFIX)
}

/// `own` (this process's exposition) with its worker families replaced by
/// those of `child` (the local worker's), `# EOF` last.
pub fn splice_worker_families(own: &str, child: &str) -> String {
    let mut out = String::with_capacity(own.len() + child.len());
    let mut eof = false;
    for line in own.lines() {
        if line == "# EOF" {
            eof = true;
        } else if !is_worker_line(line) {
            out.push_str(line);
            out.push('\n');
        }
    }
    for line in child.lines().filter(|l| is_worker_line(l)) {
        out.push_str(line);
        out.push('\n');
    }
    if eof {
        out.push_str("# EOF\n");
    }
    out
}

impl WorkerView {
    /// The view of a worker in another process, from its `/metrics` text.
    pub fn from_metrics(id: String, text: &str, process: String) -> WorkerView {
        let samples: Vec<(&str, u64)> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name, value.parse::<u64>().ok()?))
            })
            .collect();
        let get = |name: &str| {
            let full = format!("{WORKER_PREFIX}{name}");
            samples.iter().find(|(n, _)| *n == full).map_or(0, |(_, v)| *v)
        };
        let runs_prefix = format!("{WORKER_PREFIX}runs_total{{outcome=\"");
        let runs = samples
            .iter()
            .filter_map(|(n, v)| Some((n.strip_prefix(&runs_prefix)?.strip_suffix("\"}")?.to_owned(), *v)))
            .filter(|(_, v)| *v > 0)
            .collect();
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        WorkerView {
            id,
            slots: signed(get("slots")),
            running: signed(get("running_actions")),
            cache: CacheStats {
                hits: get("file_cache_hits_total"),
                misses: get("file_cache_misses_total"),
                evictions: get("file_cache_evictions_total"),
                bytes: get("file_cache_bytes"),
                entries: get("file_cache_entries"),
                ..CacheStats::default()
            },
            cache_capacity_bytes: get("file_cache_capacity_bytes"),
            runs,
            process: Some(process),
        }
    }
}

/// Reads a worker for `/metrics` and the status page.
pub struct WorkerCollector {
    id: String,
    cache: FileCache,
}

impl std::fmt::Debug for WorkerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCollector").field("id", &self.id).finish_non_exhaustive()
    }
}

impl WorkerCollector {
    pub fn new(id: String, cache: FileCache) -> Self {
        Self { id, cache }
    }

    pub fn read(&self) -> WorkerView {
        let m = kiln_proto::metrics::global();
        WorkerView {
            id: self.id.clone(),
            slots: m.worker_slots.get(),
            running: m.worker_running.get(),
            cache: self.cache.stats(),
            cache_capacity_bytes: self.cache.capacity_bytes(),
            runs: m.worker_runs_by_outcome().into_iter().map(|(o, n)| (o.to_owned(), n)).collect(),
            process: None,
        }
    }
}

impl Collector for WorkerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let v = self.read();
        let c = &v.cache;
        let gauges: [(&str, &str, u64); 3] = [
            ("worker_file_cache_bytes", "Bytes of input files in the worker's file cache", c.bytes),
            (
                "worker_file_cache_capacity_bytes",
                "Most bytes the worker's file cache keeps ([execution.worker] cache_size_bytes)",
                v.cache_capacity_bytes,
            ),
            ("worker_file_cache_entries", "Files in the worker's file cache", c.entries),
        ];
        for (name, help, value) in gauges {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family)?;
        }
        let counters: [(&str, &str, u64); 3] = [
            ("worker_file_cache_hits", "Input files found in the worker's file cache", c.hits),
            ("worker_file_cache_misses", "Input files the worker fetched from the CAS", c.misses),
            (
                "worker_file_cache_evictions",
                "Files removed from the worker's file cache to stay in bounds",
                c.evictions,
            ),
        ];
        for (name, help, value) in counters {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "# HELP kiln_cas_reads Reads.\n# TYPE kiln_cas_reads counter\nkiln_cas_reads_total 3\n\
        # HELP kiln_worker_slots Slots.\n# TYPE kiln_worker_slots gauge\nkiln_worker_slots 0\n# EOF\n";
    const CHILD: &str = "# HELP kiln_worker_slots Slots.\n# TYPE kiln_worker_slots gauge\nkiln_worker_slots 4\n\
        kiln_worker_running_actions 1\nkiln_worker_runs_total{outcome=\"exited\"} 7\n\
        kiln_worker_runs_total{outcome=\"timed_out\"} 0\nkiln_worker_file_cache_hits_total 5\n\
        # HELP kiln_grpc_x Other.\nkiln_grpc_x_total 9\n# EOF\n";

    #[test]
    fn the_childs_worker_families_replace_this_processs() {
        let spliced = splice_worker_families(OWN, CHILD);
        assert!(spliced.contains("kiln_cas_reads_total 3\n"), "{spliced}");
        assert!(
            spliced.contains("kiln_worker_slots 4\n") && !spliced.contains("kiln_worker_slots 0"),
            "{spliced}"
        );
        assert_eq!(spliced.matches("# TYPE kiln_worker_slots").count(), 1, "{spliced}");
        assert!(
            !spliced.contains("kiln_grpc_x"),
            "only the worker's families come from the child: {spliced}"
        );
        assert!(spliced.ends_with("# EOF\n") && spliced.matches("# EOF").count() == 1, "{spliced}");
    }

    #[test]
    fn a_view_is_read_back_from_the_childs_metrics() {
        let view = WorkerView::from_metrics("local-a".into(), CHILD, "pid 7".into());
        assert_eq!((view.slots, view.running, view.cache.hits), (4, 1, 5));
        assert_eq!(view.runs, vec![("exited".to_owned(), 7)]);
        assert_eq!(view.process.as_deref(), Some("pid 7"));
    }
}
