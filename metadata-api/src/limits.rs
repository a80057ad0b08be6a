//! Ingest budgets: bytes per second and bytes in flight, per stream, per tenant and for the whole
//! service. A tenant is a stream's namespace where the API knows it (`--auth kubernetes`), its
//! workflow otherwise (see [`crate::store::StreamMeta::tenant`]). The tenant's sits between the two: one tenant writing at many times
//! its share over many streams meets its own budget long before the service's, which the other
//! tenants then still have.

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
    /// Largest body after `Content-Encoding: gzip` or `zstd` is decoded.
    pub max_decoded: usize,
    /// Bytes per second one stream may append.
    pub stream_rate: u64,
    /// Bytes per second the service accepts in all.
    pub global_rate: u64,
    /// Body bytes one stream may have in flight.
    pub stream_inflight: u64,
    /// Body bytes the service may have in flight.
    pub global_inflight: u64,
    /// Bytes per second, and body bytes in flight, of one tenant's streams together.
    pub tenant_rate: u64,
    pub tenant_inflight: u64,
    /// Slowest upload accepted, bytes per second, and the time any body gets on top of that
    /// (see [`Limits::body_deadline`]).
    pub body_min_rate: u64,
    pub body_grace: Duration,
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
            tenant_rate: 256 << 20,
            tenant_inflight: 128 << 20,
            body_min_rate: 64 << 10,
            body_grace: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// How long a body of `declared` bytes (the largest allowed when undeclared) may take to
    /// arrive: [`Limits::body_grace`] plus its size at [`Limits::body_min_rate`]. A slow upload
    /// of a big part still makes it; a client trickling bytes to hold the connection does not.
    pub fn body_deadline(&self, declared: Option<u64>) -> Duration {
        let bytes = declared.unwrap_or(self.max_body as u64);
        self.body_grace + Duration::from_secs_f64(bytes as f64 / self.body_min_rate.max(1) as f64)
    }
}

/// Which budget refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// The stream's writer came back before the `Retry-After` it was given.
    RetryAfter,
    StreamRate,
    TenantRate,
    GlobalRate,
    StreamInflight,
    TenantInflight,
    GlobalInflight,
}

impl Exhausted {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RetryAfter => "retry_after",
            Self::StreamRate => "stream_rate",
            Self::TenantRate => "tenant_rate",
            Self::TenantInflight => "tenant_inflight",
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
        self.peek(n, rate, now)?;
        self.tokens -= n as f64;
        Ok(())
    }

    /// Whether `n` tokens could be taken now, without taking them: the wait until they can.
    fn peek(&mut self, n: u64, rate: u64, now: Instant) -> Result<(), Duration> {
        let cap = rate as f64;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * cap).min(cap);
        self.at = now;
        let need = (n as f64).min(cap);
        if self.tokens >= need {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - self.tokens) / cap.max(1.0)))
        }
    }

    /// Whether the bucket has refilled by `now`: then it is no different from a new one.
    fn full(&self, rate: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * rate as f64 >= rate as f64
    }

    fn refund(&mut self, n: u64, rate: u64) {
        self.tokens = (self.tokens + n as f64).min(rate as f64);
    }
}

#[derive(Debug, Default)]
struct StreamBudget {
    bucket: Option<Bucket>,
    inflight: u64,
    /// While a `Retry-After` given runs: its end, and how many more requests are let through
    /// to the budget as "already on their way" (see [`ON_THEIR_WAY`]).
    told: Option<Told>,
}

impl StreamBudget {
    /// Nothing in flight, no `Retry-After` running and a full bucket: the entry says nothing a
    /// new one would not, so it can go.
    fn at_rest(&self, rate: u64, now: Instant) -> bool {
        self.inflight == 0
            && self.told.is_none_or(|t| t.until <= now)
            && self.bucket.as_ref().is_none_or(|b| b.full(rate, now))
    }
}

#[derive(Debug, Clone, Copy)]
struct Told {
    until: Instant,
    on_their_way: u32,
}

/// Requests of a stream that may have been on their way before its writer could know it was
/// told to retry later (a shipper has up to 4 in flight): the first this many arriving after a
/// refusal are budgeted as usual; the rest, until the `Retry-After` ends, are refused unread. A
/// count rather than a time, so that a slow network or a busy writer is not taken for an
/// impatient one.
const ON_THEIR_WAY: u32 = 8;

#[derive(Debug, Default)]
struct TenantBudget {
    bucket: Option<Bucket>,
    inflight: u64,
}

impl TenantBudget {
    fn at_rest(&self, rate: u64, now: Instant) -> bool {
        self.inflight == 0 && self.bucket.as_ref().is_none_or(|b| b.full(rate, now))
    }
}

/// A map of budget entries that forgets those at rest once it has doubled since it last did:
/// memory follows the streams and tenants writing now, not every one ever seen, at an amortised
/// constant cost per request.
#[derive(Debug)]
struct Entries<T> {
    map: HashMap<String, T>,
    prune_at: usize,
}

/// Entries kept before the first pruning.
const PRUNE_FROM: usize = 1024;

impl<T: Default> Entries<T> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            prune_at: PRUNE_FROM,
        }
    }

    /// The entry of `key`, created when missing; before creating one, forgets the entries
    /// `at_rest` says may go if the map has grown past its pruning point.
    fn entry(&mut self, key: &str, at_rest: impl Fn(&T) -> bool) -> &mut T {
        if !self.map.contains_key(key) && self.map.len() >= self.prune_at {
            self.map.retain(|_, v| !at_rest(v));
            self.prune_at = (2 * self.map.len()).max(PRUNE_FROM);
        }
        self.map.entry(key.to_owned()).or_default()
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut T> {
        self.map.get_mut(key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Shared budget state.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    global: Mutex<Bucket>,
    global_inflight: AtomicU64,
    streams: Mutex<Entries<StreamBudget>>,
    tenants: Mutex<Entries<TenantBudget>>,
}

/// Holds bytes in flight until dropped.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    stream: String,
    tenant: String,
    bytes: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget
            .global_inflight
            .fetch_sub(self.bytes, Ordering::AcqRel);
        if let Some(t) = self.budget.tenants().get_mut(&self.tenant) {
            t.inflight = t.inflight.saturating_sub(self.bytes);
        }
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
            streams: Mutex::new(Entries::new()),
            tenants: Mutex::new(Entries::new()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, Entries<StreamBudget>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tenants(&self) -> std::sync::MutexGuard<'_, Entries<TenantBudget>> {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses data for `stream` while the `Retry-After` it was last given runs: checked
    /// before anything else of the request, so its body is neither read nor stored.
    pub fn check_retry_after(&self, stream: &str) -> Result<(), Throttled> {
        let now = Instant::now();
        let mut streams = self.streams();
        let Some(told) = streams.get_mut(stream).and_then(|s| s.told.as_mut()) else {
            return Ok(());
        };
        if now >= told.until {
            return Ok(());
        }
        if told.on_their_way > 0 {
            told.on_their_way -= 1;
            return Ok(());
        }
        Err(Throttled {
            budget: Exhausted::RetryAfter,
            retry_after: told.until - now,
        })
    }

    /// Notes that `stream` was told to retry after `t.retry_after` (as the response says it,
    /// whole seconds rounded up).
    fn told(&self, stream: &str, t: Throttled) -> Throttled {
        let wire = Duration::from_secs(crate::error::retry_after_secs(t.retry_after));
        // Only budget refusals come here: one for coming back early (`check_retry_after`)
        // keeps the end already given.
        if let Some(s) = self.streams().get_mut(stream) {
            let now = Instant::now();
            s.told = Some(match s.told {
                // Within a running one: later, but no new allowance.
                Some(told) if now < told.until => Told {
                    until: told.until.max(now + wire),
                    ..told
                },
                _ => Told {
                    until: now + wire,
                    on_their_way: ON_THEIR_WAY,
                },
            });
        }
        t
    }

    /// Reserves `bytes` of in-flight body for `stream` of `tenant`, before the body is read.
    pub fn admit(
        self: &Arc<Self>,
        stream: &str,
        tenant: &str,
        bytes: u64,
    ) -> Result<Permit, Throttled> {
        self.admit_inner(stream, tenant, bytes)
            .map_err(|t| self.told(stream, t))
    }

    fn admit_inner(
        self: &Arc<Self>,
        stream: &str,
        tenant: &str,
        bytes: u64,
    ) -> Result<Permit, Throttled> {
        let l = self.limits;
        // A request larger than a whole budget may pass alone, never beside others.
        let prev = self.global_inflight.fetch_add(bytes, Ordering::AcqRel);
        if prev > 0 && prev + bytes > l.global_inflight {
            self.global_inflight.fetch_sub(bytes, Ordering::AcqRel);
            return Err(retry(Exhausted::GlobalInflight, Duration::from_secs(1)));
        }
        let undo_global = || {
            self.global_inflight.fetch_sub(bytes, Ordering::AcqRel);
        };
        {
            let now = Instant::now();
            let mut tenants = self.tenants();
            let t = tenants.entry(tenant, |t| t.at_rest(l.tenant_rate, now));
            if t.inflight > 0 && t.inflight + bytes > l.tenant_inflight {
                drop(tenants);
                undo_global();
                return Err(retry(Exhausted::TenantInflight, Duration::from_secs(1)));
            }
            t.inflight += bytes;
        }
        let undo_tenant = || {
            if let Some(t) = self.tenants().get_mut(tenant) {
                t.inflight = t.inflight.saturating_sub(bytes);
            }
        };
        let now = Instant::now();
        let mut streams = self.streams();
        let s = streams.entry(stream, |s| s.at_rest(l.stream_rate, now));
        if s.inflight > 0 && s.inflight + bytes > l.stream_inflight {
            drop(streams);
            undo_tenant();
            undo_global();
            return Err(retry(Exhausted::StreamInflight, Duration::from_secs(1)));
        }
        s.inflight += bytes;
        Ok(Permit {
            budget: Arc::clone(self),
            stream: stream.to_owned(),
            tenant: tenant.to_owned(),
            bytes,
        })
    }

    /// Refuses, before its body is read, a request that brings at least `bytes` of log data
    /// (its declared length; 1 for a compressed body) while the stream's, its tenant's or the
    /// service's rate has no room for them: a writer over its rate is answered without the
    /// server reading, decoding and dropping what it sent. [`Budget::charge`] still charges
    /// what the body turns out to hold.
    pub fn precheck(&self, stream: &str, tenant: &str, bytes: u64) -> Result<(), Throttled> {
        self.precheck_inner(stream, tenant, bytes)
            .map_err(|t| self.told(stream, t))
    }

    fn precheck_inner(&self, stream: &str, tenant: &str, bytes: u64) -> Result<(), Throttled> {
        if bytes == 0 {
            return Ok(());
        }
        let l = self.limits;
        let now = Instant::now();
        if let Some(b) = self
            .streams()
            .get_mut(stream)
            .and_then(|s| s.bucket.as_mut())
        {
            b.peek(bytes, l.stream_rate, now)
                .map_err(|w| retry(Exhausted::StreamRate, w))?;
        }
        if let Some(b) = self
            .tenants()
            .get_mut(tenant)
            .and_then(|t| t.bucket.as_mut())
        {
            b.peek(bytes, l.tenant_rate, now)
                .map_err(|w| retry(Exhausted::TenantRate, w))?;
        }
        self.global
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .peek(bytes, l.global_rate, now)
            .map_err(|w| retry(Exhausted::GlobalRate, w))
    }

    /// Charges `bytes` of log data to the stream's, its tenant's and the global rate.
    pub fn charge(&self, stream: &str, tenant: &str, bytes: u64) -> Result<(), Throttled> {
        self.charge_inner(stream, tenant, bytes)
            .map_err(|t| self.told(stream, t))
    }

    fn charge_inner(&self, stream: &str, tenant: &str, bytes: u64) -> Result<(), Throttled> {
        let l = self.limits;
        let now = Instant::now();
        let mut streams = self.streams();
        let s = streams.entry(stream, |s| s.at_rest(l.stream_rate, now));
        let bucket = s
            .bucket
            .get_or_insert_with(|| Bucket::new(l.stream_rate, now));
        bucket
            .take(bytes, l.stream_rate, now)
            .map_err(|w| retry(Exhausted::StreamRate, w))?;
        let mut tenants = self.tenants();
        let t = tenants.entry(tenant, |t| t.at_rest(l.tenant_rate, now));
        let tenant_bucket = t
            .bucket
            .get_or_insert_with(|| Bucket::new(l.tenant_rate, now));
        if let Err(w) = tenant_bucket.take(bytes, l.tenant_rate, now) {
            bucket.refund(bytes, l.stream_rate);
            return Err(retry(Exhausted::TenantRate, w));
        }
        let global =
            self.global
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(bytes, l.global_rate, now);
        if let Err(w) = global {
            bucket.refund(bytes, l.stream_rate);
            tenant_bucket.refund(bytes, l.tenant_rate);
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
    fn data_before_the_retry_after_is_refused_for_what_is_left_of_it() {
        let budget = Budget::new(Limits {
            stream_rate: 100,
            ..Limits::default()
        });
        budget.charge("s", "w", 100).unwrap();
        let told = budget.charge("s", "w", 100).unwrap_err();
        assert_eq!(told.budget, Exhausted::StreamRate);
        // What may have been on its way is let through to the budget.
        for _ in 0..ON_THEIR_WAY {
            assert!(budget.check_retry_after("s").is_ok());
        }
        let early = budget.check_retry_after("s").unwrap_err();
        assert_eq!(early.budget, Exhausted::RetryAfter);
        assert!(early.retry_after <= Duration::from_secs(1), "{early:?}");
        // Other streams are not held back.
        assert!(budget.check_retry_after("other").is_ok());
    }

    #[test]
    fn a_tenant_over_its_rate_leaves_the_others_theirs() {
        let budget = Budget::new(Limits {
            tenant_rate: 100,
            global_rate: 400,
            ..Limits::default()
        });
        // Ten streams of one tenant: the first takes the tenant's second, the rest wait.
        budget.charge("a0", "loud", 100).unwrap();
        for i in 1..10 {
            let t = budget.charge(&format!("a{i}"), "loud", 100).unwrap_err();
            assert_eq!(t.budget, Exhausted::TenantRate);
        }
        // The service has room left, and another tenant gets it.
        budget.charge("b0", "quiet", 100).unwrap();
    }

    #[test]
    fn a_precheck_refuses_what_the_rate_has_no_room_for_and_takes_nothing() {
        let budget = Budget::new(Limits {
            stream_rate: 100,
            ..Limits::default()
        });
        // A stream never charged has a full second of rate.
        budget.precheck("s", "w", 100).unwrap();
        budget.precheck("s", "w", 100).unwrap();
        budget.charge("s", "w", 60).unwrap();
        budget.precheck("s", "w", 40).unwrap();
        let t = budget.precheck("s", "w", 50).unwrap_err();
        assert_eq!(t.budget, Exhausted::StreamRate);
        // Refused before the body, it still tells the writer when to come back.
        for _ in 0..ON_THEIR_WAY {
            assert!(budget.check_retry_after("s").is_ok());
        }
        assert!(budget.check_retry_after("s").is_err());
        // An empty body brings no data: never refused for rate.
        budget.precheck("s", "w", 0).unwrap();
    }

    #[test]
    fn entries_at_rest_are_forgotten_and_the_others_kept() {
        let budget = Budget::new(Limits {
            stream_rate: 1000,
            ..Limits::default()
        });
        // One stream told to come back later, one with bytes in flight.
        budget.charge("told", "w", 1000).unwrap();
        budget.charge("told", "w", 1000).unwrap_err();
        let permit = budget.admit("busy", "w", 10).unwrap();
        // Ten thousand streams written once, each at rest a millisecond later.
        for i in 0..10_000 {
            budget.charge(&format!("s{i}"), "w", 1).unwrap();
            std::thread::sleep(Duration::from_micros(if i % 1000 == 0 { 2000 } else { 0 }));
        }
        let kept = budget.streams().len();
        assert!(kept <= 2 * PRUNE_FROM + 2, "{kept} entries kept");
        for _ in 0..ON_THEIR_WAY {
            budget.check_retry_after("told").unwrap();
        }
        assert_eq!(
            budget.check_retry_after("told").unwrap_err().budget,
            Exhausted::RetryAfter
        );
        assert_eq!(
            budget.streams().get_mut("busy").map(|s| s.inflight),
            Some(10)
        );
        drop(permit);
    }

    #[test]
    fn inflight_is_released() {
        let budget = Budget::new(Limits {
            stream_inflight: 10,
            ..Limits::default()
        });
        let p = budget.admit("s", "w", 8).unwrap();
        assert_eq!(
            budget.admit("s", "w", 8).unwrap_err().budget,
            Exhausted::StreamInflight
        );
        assert!(budget.admit("other", "w", 8).is_ok());
        drop(p);
        assert!(budget.admit("s", "w", 8).is_ok());
    }
}
