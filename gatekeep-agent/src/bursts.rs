//! Repeated identical events, aggregated into one audit record per burst with a count.
//!
//! A burst of one key opens with its first event and closes once nothing new came for
//! [`BURST_QUIET`], or after [`BURST_MAX`] if it goes on (then the next event opens a new
//! one), so a flood writes a bounded number of records and a lone event is recorded about a
//! second later. Self-protection refusals (issue 18, counted by the kernel) and the kernel's
//! policy denials (events) both go through it.

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, SystemTime},
};

/// Nothing new for this long closes a burst.
pub const BURST_QUIET: Duration = Duration::from_secs(1);
/// A burst that goes on is recorded at least this often.
pub const BURST_MAX: Duration = Duration::from_mins(1);

/// The events of one key in one burst: the first one's details (`value`) and how many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Burst<K, V> {
    pub key: K,
    pub value: V,
    pub count: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
}

/// The open bursts, per key.
#[derive(Debug)]
pub struct Bursts<K, V> {
    open: HashMap<K, Burst<K, V>>,
}

impl<K, V> Default for Bursts<K, V> {
    fn default() -> Self {
        Self {
            open: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Ord + Clone, V> Bursts<K, V> {
    /// `count` more events of `key` at `now`; `value` describes the burst if this opens it.
    pub fn add(&mut self, key: K, count: u64, now: SystemTime, value: impl FnOnce() -> V) {
        if count == 0 {
            return;
        }
        self.open
            .entry(key)
            .and_modify(|burst| {
                burst.count += count;
                burst.last_seen = now;
            })
            .or_insert_with_key(|key| Burst {
                key: key.clone(),
                value: value(),
                count,
                first_seen: now,
                last_seen: now,
            });
    }

    /// Counts `count` more events of `key` at `now` if its burst is open (then the event
    /// needs no description of its own); `false` if none is.
    pub fn add_if_open(&mut self, key: &K, count: u64, now: SystemTime) -> bool {
        let Some(burst) = self.open.get_mut(key) else {
            return false;
        };
        burst.count += count;
        burst.last_seen = now;
        true
    }

    /// The bursts that ended by `now` (quiet for [`BURST_QUIET`], or running for
    /// [`BURST_MAX`]), oldest first.
    pub fn close(&mut self, now: SystemTime) -> Vec<Burst<K, V>> {
        let ended: Vec<K> = self
            .open
            .iter()
            .filter(|(_, burst)| {
                let quiet = now.duration_since(burst.last_seen).unwrap_or_default();
                let length = now.duration_since(burst.first_seen).unwrap_or_default();
                quiet >= BURST_QUIET || length >= BURST_MAX
            })
            .map(|(key, _)| key.clone())
            .collect();
        let mut closed: Vec<Burst<K, V>> = ended
            .iter()
            .filter_map(|key| self.open.remove(key))
            .collect();
        closed.sort_by(|a, b| (a.first_seen, &a.key).cmp(&(b.first_seen, &b.key)));
        closed
    }

    /// Every burst still open (at shutdown), oldest first.
    pub fn drain(&mut self) -> Vec<Burst<K, V>> {
        let mut all: Vec<Burst<K, V>> = self.open.drain().map(|(_, burst)| burst).collect();
        all.sort_by(|a, b| (a.first_seen, &a.key).cmp(&(b.first_seen, &b.key)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_events_are_one_burst_until_it_goes_quiet() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let ms = |ms| t0 + Duration::from_millis(ms);
        let mut bursts: Bursts<&str, u32> = Bursts::default();
        for i in 0..1_000 {
            bursts.add("a", 1, ms(i), || 7);
        }
        bursts.add("b", 1, ms(500), || 8);
        assert!(bursts.add_if_open(&"a", 1, ms(999)));
        assert!(!bursts.add_if_open(&"c", 1, ms(999)));
        assert!(bursts.close(ms(1_200)).is_empty(), "both still busy");
        let closed = bursts.close(ms(1_600));
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (closed[0].key, closed[0].value, closed[0].count),
            ("b", 8, 1)
        );
        let closed = bursts.close(ms(2_000));
        assert_eq!(
            (closed[0].key, closed[0].value, closed[0].count),
            ("a", 7, 1_001)
        );
        assert_eq!(
            (closed[0].first_seen, closed[0].last_seen),
            (ms(0), ms(999))
        );
        assert!(bursts.drain().is_empty());
    }
}
