//! Two figures about the machine itself, so that the absolute figures of different runs
//! can be compared: how long a random memory read takes, and how fast one core hashes.
//!
//! Machines of one kind differ: on one, a random read took 335-390 ns (three to four times
//! what bare hardware typically takes) while SHA-256 ran at full speed, and the service,
//! the audit logs and the emulated VM, which all chase pointers, ran at a third of the
//! speed they had on another machine of the same kind.

use std::{hint::black_box, time::Instant};

use sha2::{Digest as _, Sha256};

use crate::report::Figure;

/// The pointer chase's working set: far beyond any cache.
const CHASE_BYTES: usize = 256 << 20;
const CHASE_STEPS: usize = 4_000_000;
/// Bytes hashed per round.
const HASH_BYTES: usize = 64 << 20;

/// The machine's figures (a few seconds).
#[must_use]
pub fn figures(smoke: bool) -> Vec<Figure> {
    let rounds = if smoke { 1 } else { 3 };
    let latencies: Vec<f64> = (0..rounds).map(|_| read_latency_ns()).collect();
    let hashing: Vec<f64> = (0..rounds).map(|_| sha256_mb_per_s()).collect();
    vec![
        Figure::from_runs(
            "native.host.memory_read_ns",
            "host: random memory read (pointer chase)",
            "ns",
            &latencies,
        )
        .conditions(format!(
            "one core, a random cycle through {} MiB (beyond every cache), {CHASE_STEPS} \
             dependent reads; what the service's, the audit logs' and the emulator's pointer \
             chasing pays",
            CHASE_BYTES >> 20
        )),
        Figure::from_runs(
            "native.host.sha256_mb_per_s",
            "host: SHA-256, one core",
            "MB/s",
            &hashing,
        )
        .conditions(format!(
            "the sha2 crate (the audit chain's hash) over {} MiB in cache-sized blocks: what \
             the core computes when memory does not hold it back",
            HASH_BYTES >> 20
        )),
    ]
}

/// Nanoseconds per dependent read through a random cycle (Sattolo's shuffle) over
/// [`CHASE_BYTES`].
fn read_latency_ns() -> f64 {
    let slots = CHASE_BYTES / size_of::<usize>();
    let mut next: Vec<usize> = (0..slots).collect();
    // xorshift64*: deterministic, good enough to defeat the prefetchers.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut random = |below: usize| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let value = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        usize::try_from(value % u64::try_from(below).unwrap_or(u64::MAX)).unwrap_or(0)
    };
    for i in (1..slots).rev() {
        let j = random(i);
        next.swap(i, j);
    }
    let started = Instant::now();
    let mut at = 0;
    for _ in 0..CHASE_STEPS {
        at = next[at];
    }
    black_box(at);
    #[expect(clippy::cast_precision_loss, reason = "a step count")]
    let steps = CHASE_STEPS as f64;
    started.elapsed().as_secs_f64() * 1e9 / steps
}

/// Megabytes (10^6) per second through SHA-256, 64 KiB at a time.
fn sha256_mb_per_s() -> f64 {
    let block = vec![0x5a_u8; 64 << 10];
    let started = Instant::now();
    let mut hasher = Sha256::new();
    for _ in 0..HASH_BYTES / block.len() {
        hasher.update(&block);
    }
    black_box(hasher.finalize());
    #[expect(clippy::cast_precision_loss, reason = "a byte count")]
    let bytes = HASH_BYTES as f64;
    bytes / started.elapsed().as_secs_f64() / 1e6
}
