//! Counting helpers: latency histograms (µs), labelled tallies, and their report forms.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Highest latency recorded, µs (larger values are clamped).
const MAX_US: u64 = 120_000_000;

pub struct Latency {
    hist: Mutex<Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        let hist = Histogram::new_with_bounds(1, MAX_US, 3)
            .unwrap_or_else(|_| Histogram::new(3).expect("3 significant digits is valid"));
        Latency {
            hist: Mutex::new(hist),
        }
    }

    pub fn record_ns(&self, ns: u64) {
        let us = (ns / 1000).clamp(1, MAX_US);
        if let Ok(mut h) = self.hist.lock() {
            let _ = h.record(us);
        }
    }

    pub fn snapshot(&self) -> Histogram<u64> {
        match self.hist.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

fn ms(us: u64) -> f64 {
    (us as f64) / 1000.0
}

/// p50/p90/p99/p99.9/max in milliseconds.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
    })
}

/// Counts by label (error codes, close codes, …).
#[derive(Default)]
pub struct Tally {
    map: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    pub fn add(&self, key: impl Into<String>, n: u64) {
        if let Ok(mut m) = self.map.lock() {
            *m.entry(key.into()).or_insert(0) += n;
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        match self.map.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// A few example problem descriptions, for the report.
#[derive(Default)]
pub struct Examples {
    list: Mutex<Vec<String>>,
}

impl Examples {
    pub fn push(&self, s: String) {
        if let Ok(mut l) = self.list.lock() {
            if l.len() < 20 {
                l.push(s);
            }
        }
    }

    pub fn snapshot(&self) -> Vec<String> {
        match self.list.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

pub fn tally_line(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".to_owned();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn kb_to_mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}
