//! Ingest budgets: bytes per second and bytes in flight, per stream and for the whole service.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Limits on requests and ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body on the wire.
    pub max_body: usize,
    /// Largest body after `Content-Encoding: gzip` is decoded.
    pub max_decoded: usize,
    /// Bytes per second one stream may append.
    pub stream_rate: u64,
    /// Bytes per second the service accepts in all.
    pub global_rate: u64,
    /// Body bytes one stream may have in flight.
    pub stream_inflight: u64,
    /// Body bytes the service may have in flight.
    pub global_inflight: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: 16 << 20,
            max_decoded: 64 << 20,
            stream_rate: 64 << 20,
            global_rate: 1 << 30,
            stream_inflight: 64 << 20,
            global_inflight: 512 << 20,
        }
    }
}

/// Which budget refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    StreamRate,
    GlobalRate,
    StreamInflight,
    GlobalInflight,
}

impl Exhausted {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StreamRate => "stream_rate",
            Self::GlobalRate => "global_rate",
            Self::StreamInflight => "stream_inflight",
            Self::GlobalInflight => "global_inflight",
        }
    }
}

/// A refusal with the delay after which a retry may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub budget: Exhausted,
    pub retry_after: Duration,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Self {
        Self {
            tokens: rate as f64,
            at: now,
        }
    }

    /// Takes `n` tokens; capacity is one second of `rate`. A request larger than the capacity
    /// passes when the bucket is full, leaving it in debt.
    fn take(&mut self, n: u64, rate: u64, now: Instant) -> Result<(), Duration> {
        let cap = rate as f64;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * cap).min(cap);
        self.at = now;
        let need = (n as f64).min(cap);
        if self.tokens >= need {
            self.tokens -= n as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - self.tokens) / cap.max(1.0)))
        }
    }

    fn refund(&mut self, n: u64, rate: u64) {
        self.tokens = (self.tokens + n as f64).min(rate as f64);
    }
}

#[derive(Debug, Default)]
struct StreamBudget {
    bucket: Option<Bucket>,
    inflight: u64,
}

/// Shared budget state.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    global: Mutex<Bucket>,
    global_inflight: AtomicU64,
    streams: Mutex<HashMap<String, StreamBudget>>,
}

/// Holds bytes in flight until dropped.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    stream: String,
    bytes: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget
            .global_inflight
            .fetch_sub(self.bytes, Ordering::AcqRel);
        let mut streams = self.budget.streams();
        if let Some(s) = streams.get_mut(&self.stream) {
            s.inflight = s.inflight.saturating_sub(self.bytes);
        }
    }
}

fn retry(budget: Exhausted, wait: Duration) -> Throttled {
    Throttled {
        budget,
        retry_after: wait.max(Duration::from_secs(1)),
    }
}

impl Budget {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            global: Mutex::new(Bucket::new(limits.global_rate, Instant::now())),
            global_inflight: AtomicU64::new(0),
            streams: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, StreamBudget>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `bytes` of in-flight body for `stream`, before the body is read.
    pub fn admit(self: &Arc<Self>, stream: &str, bytes: u64) -> Result<Permit, Throttled> {
        let l = self.limits;
        // A request larger than a whole budget may pass alone, never beside others.
        let prev = self.global_inflight.fetch_add(bytes, Ordering::AcqRel);
        if prev > 0 && prev + bytes > l.global_inflight {
            self.global_inflight.fetch_sub(bytes, Ordering::AcqRel);
            return Err(retry(Exhausted::GlobalInflight, Duration::from_secs(1)));
        }
        let mut streams = self.streams();
        if streams.len() > 100_000 {
            // Forget idle streams rather than grow without bound.
            streams.retain(|_, s| s.inflight > 0);
        }
        let s = streams.entry(stream.to_owned()).or_default();
        if s.inflight > 0 && s.inflight + bytes > l.stream_inflight {
            drop(streams);
            self.global_inflight.fetch_sub(bytes, Ordering::AcqRel);
            return Err(retry(Exhausted::StreamInflight, Duration::from_secs(1)));
        }
        s.inflight += bytes;
        Ok(Permit {
            budget: Arc::clone(self),
            stream: stream.to_owned(),
            bytes,
        })
    }

    /// Charges `bytes` of log data to the stream's and the global rate.
    pub fn charge(&self, stream: &str, bytes: u64) -> Result<(), Throttled> {
        let l = self.limits;
        let now = Instant::now();
        let mut streams = self.streams();
        let s = streams.entry(stream.to_owned()).or_default();
        let bucket = s
            .bucket
            .get_or_insert_with(|| Bucket::new(l.stream_rate, now));
        bucket
            .take(bytes, l.stream_rate, now)
            .map_err(|w| retry(Exhausted::StreamRate, w))?;
        let global =
            self.global
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(bytes, l.global_rate, now);
        if let Err(w) = global {
            bucket.refund(bytes, l.stream_rate);
            return Err(retry(Exhausted::GlobalRate, w));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_refuses_then_recovers() {
        let mut b = Bucket::new(100, Instant::now());
        let t0 = Instant::now();
        assert!(b.take(100, 100, t0).is_ok());
        let wait = b.take(50, 100, t0).unwrap_err();
        assert!(wait > Duration::from_millis(400), "{wait:?}");
        assert!(b.take(50, 100, t0 + Duration::from_millis(600)).is_ok());
    }

    #[test]
    fn oversized_request_passes_alone_when_full() {
        let mut b = Bucket::new(100, Instant::now());
        let t0 = Instant::now();
        assert!(b.take(1000, 100, t0).is_ok());
        assert!(b.take(1, 100, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn inflight_is_released() {
        let budget = Budget::new(Limits {
            stream_inflight: 10,
            ..Limits::default()
        });
        let p = budget.admit("s", 8).unwrap();
        assert_eq!(
            budget.admit("s", 8).unwrap_err().budget,
            Exhausted::StreamInflight
        );
        assert!(budget.admit("other", 8).is_ok());
        drop(p);
        assert!(budget.admit("s", 8).is_ok());
    }
}
