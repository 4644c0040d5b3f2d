//! Single-core hashing throughput: the baseline for upload verification.

use std::time::Instant;

use kiln_proto::DigestFunction;

/// Bytes per second for hashing a `size_bytes` buffer on this thread, best
/// of `rounds`.
pub fn throughput(function: DigestFunction, size_bytes: usize, rounds: usize) -> f64 {
    let data = vec![0xa5u8; size_bytes];
    let mut best = f64::MAX;
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        std::hint::black_box(function.compute(std::hint::black_box(&data)));
        best = best.min(started.elapsed().as_secs_f64());
    }
    size_bytes as f64 / best
}
