//! Streaming secret redaction, shared by both capture paths (the entrypoint and the collector), so
//! that they store the same bytes at the same offsets.
//!
//! # What is replaced
//!
//! Every maximal run of bytes covered by an occurrence of any secret value becomes one [`MASK`]
//! (`***`). Occurrences may overlap or touch (values `abcd` and `cdef` in `abcdef` give `***`):
//! no byte of any occurrence survives, which a leftmost-first or leftmost-longest replacement
//! would not promise (`***ef`). Values shorter than [`MIN_VALUE_LEN`] are not redacted: `true`,
//! `80` or `x` would mangle every log line while protecting nothing. Values longer than
//! [`MAX_VALUE_LEN`] are not matched whole (the stream would have to be held back that far);
//! their lines still are.
//!
//! A multi-line value (a PEM key, a kubeconfig) is matched whole and also line by line (each line
//! without its `\r`, when long enough): a program that prints the key line by line, or a value
//! with a trailing newline (`kubectl create secret --from-file`) printed inside a sentence, is
//! still redacted. A line common to many keys (`-----BEGIN PRIVATE KEY-----`) is redacted too:
//! harmless, and a sign that a key was printed.
//!
//! # Streaming
//!
//! A [`Redactor`] is fed a stream in chunks. Its total output is a function of its total input
//! alone, however the input is chunked and whenever [`Redactor::flush_idle`] is called: a byte is
//! emitted only once no later input can change whether it is covered. After a chunk it holds back
//! the last `max_value_len - 1` bytes at most (an occurrence covering an earlier byte has been
//! seen whole by then). [`Redactor::flush_idle`] (the writer went idle) emits everything but a
//! tail that is still a proper prefix of some value: only bytes that could be the start of a
//! secret wait for more input, never ordinary output. [`Redactor::finish`] ends the stream and
//! emits everything.
//!
//! # Offsets
//!
//! Redaction changes lengths, so a writer ships the redacted stream at redacted offsets
//! ([`Redactor::emitted`]). Both paths redact the same input with the same values, so their
//! redacted streams are equal byte for byte. A writer that loses raw bytes (the collector when the
//! kernel's ring buffer is full) calls [`Redactor::gap`]: the held tail that could be the start of
//! a value is given up with the gap (reported as dropped, never shipped), and the raw gap is
//! counted as that many redacted bytes. Offsets after the gap agree with the other path unless a
//! value occurred within or across the gap, which that path replaced by `***`; the bytes after
//! the gap that end a value begun in it cannot be recognised and are shipped.
#![forbid(unsafe_code)]

use std::{ffi::OsStr, os::unix::ffi::OsStrExt, sync::Arc};

use aho_corasick::{AhoCorasick, MatchKind};

/// What a run of secret bytes becomes.
pub const MASK: &[u8] = b"***";
/// Shorter values are not redacted.
pub const MIN_VALUE_LEN: usize = 4;
/// Longer values are matched by their lines only.
pub const MAX_VALUE_LEN: usize = 64 << 10;
/// The environment variable naming the variables that hold secret values: a comma-separated list
/// of names and `PREFIX*` entries (see [`EnvSelector`]). The operator's webhook sets it.
pub const ENV_LIST: &str = contract::env::REDACT_ENV;

/// Why redaction cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build a matcher for {values} secret values")]
    Build {
        values: usize,
        #[source]
        source: aho_corasick::BuildError,
    },
}

/// The secret values of one workload, ready to match.
#[derive(Debug, Clone)]
pub struct Secrets {
    /// `None` when there is nothing to redact.
    matcher: Option<Matcher>,
    /// Sorted and deduplicated: a proper-prefix lookup is a binary search.
    values: Vec<Box<[u8]>>,
    /// Whether some value starts with this byte.
    first: Box<[bool; 256]>,
    max_len: usize,
}

impl Secrets {
    /// Nothing to redact.
    pub fn none() -> Self {
        Self {
            matcher: None,
            values: Vec::new(),
            first: Box::new([false; 256]),
            max_len: 0,
        }
    }

    /// The matchable forms of `values` (see the crate docs: too short or too long ones left out,
    /// multi-line ones also by line).
    pub fn new<I, V>(values: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = V>,
        V: AsRef<[u8]>,
    {
        let mut set: Vec<Box<[u8]>> = Vec::new();
        let mut add = |v: &[u8]| {
            if (MIN_VALUE_LEN..=MAX_VALUE_LEN).contains(&v.len()) {
                set.push(v.into());
            }
        };
        for v in values {
            let v = v.as_ref();
            add(v);
            if v.contains(&b'\n') {
                for line in v.split(|&b| b == b'\n') {
                    add(line.strip_suffix(b"\r").unwrap_or(line));
                }
            }
        }
        set.sort_unstable();
        set.dedup();
        if set.is_empty() {
            return Ok(Self::none());
        }
        let build = |kind, values: &[Box<[u8]>]| {
            AhoCorasick::builder()
                .match_kind(kind)
                .build(values)
                .map_err(|source| Error::Build {
                    values: set.len(),
                    source,
                })
        };
        let matcher = Matcher {
            scans: set
                .chunks(SCAN_GROUP)
                .map(|group| build(MatchKind::LeftmostFirst, group))
                .collect::<Result<_, _>>()?,
            all: build(MatchKind::Standard, &set)?,
        };
        let mut first = Box::new([false; 256]);
        for v in &set {
            first[usize::from(v[0])] = true;
        }
        Ok(Self {
            matcher: Some(matcher),
            max_len: set.iter().map(|v| v.len()).max().unwrap_or(0),
            values: set,
            first,
        })
    }

    /// The values named by `RELAY_REDACT_ENV` in an environment.
    pub fn from_vars<'a>(
        vars: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, Error> {
        Self::from_vars_with(vars, &EnvSelector::default())
    }

    /// The values named by `RELAY_REDACT_ENV` in an environment, or by `extra`.
    pub fn from_vars_with<'a>(
        vars: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        extra: &EnvSelector,
    ) -> Result<Self, Error> {
        let vars: Vec<(&[u8], &[u8])> = vars.into_iter().collect();
        let mut list = vars
            .iter()
            .find(|(k, _)| *k == ENV_LIST.as_bytes())
            .map(|(_, v)| EnvSelector::parse(&String::from_utf8_lossy(v)))
            .unwrap_or_default();
        list.names.extend_from_slice(&extra.names);
        list.prefixes.extend_from_slice(&extra.prefixes);
        if list.is_empty() {
            return Ok(Self::none());
        }
        Self::new(
            vars.iter()
                .filter(|(k, _)| list.matches(k))
                .map(|(_, v)| *v),
        )
    }

    /// The values named by `RELAY_REDACT_ENV` in this process's environment.
    pub fn from_process_env() -> Result<Self, Error> {
        let vars: Vec<_> = std::env::vars_os().collect();
        Self::from_vars(
            vars.iter()
                .map(|(k, v)| (OsStr::as_bytes(k), OsStr::as_bytes(v))),
        )
    }

    /// The values named by `RELAY_REDACT_ENV` in the contents of a `/proc/PID/environ` file
    /// (`KEY=VALUE` entries ended by NUL bytes).
    pub fn from_environ(environ: &[u8]) -> Result<Self, Error> {
        Self::from_environ_with(environ, &EnvSelector::default())
    }

    /// As [`Secrets::from_environ`], with the variables `extra` selects too.
    pub fn from_environ_with(environ: &[u8], extra: &EnvSelector) -> Result<Self, Error> {
        Self::from_vars_with(environ_vars(environ), extra)
    }

    /// Number of matchable forms (values and lines of values).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Whether `tail` is a proper prefix of some value: the start of a secret that more input may
    /// complete.
    fn may_continue(&self, tail: &[u8]) -> bool {
        let Some(&b) = tail.first() else {
            return false;
        };
        if !self.first[usize::from(b)] {
            return false;
        }
        // The values starting with `tail` follow one another from the first value >= tail;
        // `tail` itself, if it is a value, comes first among them.
        let at = self.values.partition_point(|v| &v[..] < tail);
        self.values[at..]
            .iter()
            .take(2)
            .any(|v| v.len() > tail.len() && v.starts_with(tail))
    }
}

/// Finds every occurrence, overlapping ones included. An overlapping search cannot skip ahead
/// (a few hundred MB/s on log text); a leftmost-first one can (its prefilter, SIMD when there are
/// few values), and every occurrence it does not report starts inside one it reports: the search
/// from a position reports the occurrence starting first, so one it passes over starts before
/// that occurrence's end. So the overlapping search runs only from each reported occurrence's
/// start to a value's reach past its end. The SIMD prefilter serves a few dozen values: more are
/// scanned for in groups, each of which finds its values' occurrences this way.
#[derive(Debug, Clone)]
struct Matcher {
    scans: Vec<AhoCorasick>,
    all: AhoCorasick,
}

/// Values per leftmost-first scan.
const SCAN_GROUP: usize = 50;

impl Matcher {
    /// Appends the occurrences in `hay` to `out`, shifted by `shift`; `reach` is the longest
    /// value's length less one.
    fn find(&self, hay: &[u8], reach: usize, shift: usize, out: &mut Vec<(usize, usize)>) {
        let before = out.len();
        for scan in &self.scans {
            for m in scan.find_iter(hay) {
                let window = &hay[m.start()..hay.len().min(m.end() + reach)];
                out.extend(
                    self.all
                        .find_overlapping_iter(window)
                        .filter(|o| o.start() < m.len())
                        .map(|o| (shift + m.start() + o.start(), shift + m.start() + o.end())),
                );
            }
        }
        if self.scans.len() > 1 {
            // Windows of different groups may overlap.
            let mut found = out.split_off(before);
            found.sort_unstable();
            found.dedup();
            out.extend(found);
        }
    }
}

/// Which environment variables hold secret values, from a `RELAY_REDACT_ENV` list: `NAME` is one
/// variable (an `env` entry from a `secretKeyRef`), `PREFIX*` every variable whose name starts
/// with `PREFIX` (an `envFrom` `secretRef` with a prefix). Blank entries and a bare `*` are
/// ignored: the latter would make every variable a secret (`PATH`, `HOME`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvSelector {
    names: Vec<String>,
    prefixes: Vec<String>,
}

impl EnvSelector {
    pub fn parse(list: &str) -> Self {
        let mut s = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.strip_suffix('*') {
                Some("") => {}
                Some(prefix) => s.prefixes.push(prefix.to_owned()),
                None => s.names.push(entry.to_owned()),
            }
        }
        s
    }

    pub fn matches(&self, name: &[u8]) -> bool {
        self.names.iter().any(|n| n.as_bytes() == name)
            || self.prefixes.iter().any(|p| name.starts_with(p.as_bytes()))
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.prefixes.is_empty()
    }
}

/// Where the bytes held back may be emitted up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// Up to `max_len - 1` bytes before the end: more input follows at once.
    Chunk,
    /// Up to the first byte that may start a value more input completes.
    Idle,
    /// Everything: no more input.
    End,
}

/// Redacts one stream (see the crate docs). Output goes to a sink called with consecutive pieces.
#[derive(Debug)]
pub struct Redactor {
    secrets: Arc<Secrets>,
    /// Input not emitted yet.
    carry: Vec<u8>,
    /// Bytes at the start of `carry` covered by occurrences that began before it.
    covered: usize,
    /// Whether the last byte emitted was covered (a run continuing into `carry` adds no mask).
    in_run: bool,
    /// Occurrences found in the current round, as spans of `carry` followed by the chunk.
    found: Vec<(usize, usize)>,
    /// `carry` and the start of a chunk, to find occurrences that straddle them.
    junction: Vec<u8>,
    consumed: u64,
    emitted: u64,
}

impl Redactor {
    pub fn new(secrets: Arc<Secrets>) -> Self {
        Self {
            secrets,
            carry: Vec::new(),
            covered: 0,
            in_run: false,
            found: Vec::new(),
            junction: Vec::new(),
            consumed: 0,
            emitted: 0,
        }
    }

    /// Whether there is anything to redact (else every call passes its input straight through).
    pub fn is_active(&self) -> bool {
        self.secrets.matcher.is_some()
    }

    /// Raw bytes fed so far (including those given up by [`Redactor::gap`]).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Redacted bytes emitted so far: the offset of the next one.
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// Raw bytes held back.
    pub fn held(&self) -> usize {
        self.carry.len()
    }

    /// Takes the next bytes of the stream; emits what is settled.
    pub fn feed(&mut self, data: &[u8], emit: impl FnMut(&[u8])) {
        self.consumed += data.len() as u64;
        self.round(data, Until::Chunk, emit);
    }

    /// The writer has nothing more for now: emits everything that cannot be the start of a
    /// value, so output is not delayed by the hold-back.
    pub fn flush_idle(&mut self, emit: impl FnMut(&[u8])) {
        self.round(&[], Until::Idle, emit);
    }

    /// End of the stream: emits everything held.
    pub fn finish(&mut self, emit: impl FnMut(&[u8])) {
        self.round(&[], Until::End, emit);
        self.covered = 0;
        self.in_run = false;
    }

    /// Raw input is missing from here on (`raw` bytes lost before they reached the writer).
    /// Emits what is settled; returns the redacted length of the gap: `raw` plus the held tail
    /// that could be the start of a value, which is given up rather than shipped.
    pub fn gap(&mut self, raw: u64, emit: impl FnMut(&[u8])) -> u64 {
        self.round(&[], Until::Idle, emit);
        let tail = self.carry.len() as u64;
        self.carry.clear();
        self.covered = 0;
        self.in_run = false;
        self.consumed += raw;
        self.emitted += tail + raw;
        tail + raw
    }

    fn round(&mut self, chunk: &[u8], until: Until, mut emit: impl FnMut(&[u8])) {
        let Some(matcher) = self.secrets.matcher.as_ref() else {
            if !chunk.is_empty() {
                self.emitted += chunk.len() as u64;
                emit(chunk);
            }
            return;
        };
        let max_len = self.secrets.max_len;
        let c = self.carry.len();
        let n = c + chunk.len();
        // Occurrences: those beginning in the carry (found in the carry and as much of the
        // chunk as a value can reach), then those within the chunk.
        self.found.clear();
        // A chunk no longer than the reach is searched within the junction only.
        let short = chunk.len() < max_len;
        if c > 0 {
            self.junction.clear();
            self.junction.extend_from_slice(&self.carry);
            self.junction
                .extend_from_slice(&chunk[..chunk.len().min(max_len - 1)]);
            matcher.find(&self.junction, max_len - 1, 0, &mut self.found);
            if !short {
                self.found.retain(|(s, _)| *s < c);
            }
        }
        if !(chunk.is_empty() || short && c > 0) {
            matcher.find(chunk, max_len - 1, c, &mut self.found);
        }
        let bound = match until {
            Until::Chunk => n.saturating_sub(max_len - 1),
            Until::End => n,
            Until::Idle => (0..c)
                .find(|&s| self.secrets.may_continue(&self.carry[s..]))
                .unwrap_or(c),
        };
        self.found.sort_unstable();

        // `None` emits the mask; `Some((a, b))` the input between those positions.
        let (carry, emitted) = (&self.carry, &mut self.emitted);
        let mut put = |range: Option<(usize, usize)>| match range {
            None => {
                *emitted += MASK.len() as u64;
                emit(MASK);
            }
            Some((a, b)) => {
                if a < c {
                    let p = &carry[a..b.min(c)];
                    *emitted += p.len() as u64;
                    emit(p);
                }
                if b > c {
                    let p = &chunk[a.max(c) - c..b - c];
                    *emitted += p.len() as u64;
                    emit(p);
                }
            }
        };
        let found = &self.found;
        let mut cover_end = self.covered;
        let mut next = 0;
        let mut at = 0;
        while at < bound {
            while let Some(&(_, e)) = found.get(next).filter(|(s, _)| *s <= at) {
                cover_end = cover_end.max(e);
                next += 1;
            }
            if cover_end > at {
                if !self.in_run {
                    put(None);
                    self.in_run = true;
                }
                at = cover_end.min(bound);
            } else {
                self.in_run = false;
                let to = found.get(next).map_or(bound, |&(s, _)| s.min(bound));
                put(Some((at, to)));
                at = to;
            }
        }
        for &(_, e) in found[next..].iter().take_while(|(s, _)| *s < bound) {
            cover_end = cover_end.max(e);
        }
        self.covered = cover_end.saturating_sub(bound);
        if bound >= c {
            self.carry.clear();
            self.carry.extend_from_slice(&chunk[bound - c..]);
        } else {
            self.carry.drain(..bound);
            self.carry.extend_from_slice(chunk);
        }
    }
}

/// The `(name, value)` pairs of a `/proc/PID/environ` file (`KEY=VALUE` entries ended by NUL
/// bytes); entries without `=` are skipped.
pub fn environ_vars(environ: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
    environ.split(|&b| b == 0).filter_map(|entry| {
        let eq = entry.iter().position(|&b| b == b'=')?;
        Some((&entry[..eq], &entry[eq + 1..]))
    })
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    /// The specification, on the whole input at once: every maximal run of covered bytes becomes
    /// one mask.
    fn reference(secrets: &Secrets, input: &[u8]) -> Vec<u8> {
        let mut covered = vec![false; input.len()];
        for v in &secrets.values {
            for s in 0..input.len() {
                if input[s..].starts_with(v) {
                    covered[s..s + v.len()].iter_mut().for_each(|c| *c = true);
                }
            }
        }
        let mut out = Vec::new();
        for (i, &b) in input.iter().enumerate() {
            if !covered[i] {
                out.push(b);
            } else if i == 0 || !covered[i - 1] {
                out.extend_from_slice(MASK);
            }
        }
        out
    }

    fn secrets(values: &[&str]) -> Arc<Secrets> {
        Arc::new(Secrets::new(values).unwrap())
    }

    /// Feeds `input` in chunks ending at `cuts`, flushing as if idle after those in `idle`.
    fn redact(secrets: &Arc<Secrets>, input: &[u8], cuts: &[usize], idle: &[usize]) -> Vec<u8> {
        let mut r = Redactor::new(secrets.clone());
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&input.len()]) {
            r.feed(&input[from..to], |b| out.extend_from_slice(b));
            if idle.contains(&to) {
                r.flush_idle(|b| out.extend_from_slice(b));
            }
            from = to;
        }
        r.finish(|b| out.extend_from_slice(b));
        assert_eq!(r.emitted(), out.len() as u64);
        assert_eq!(r.consumed(), input.len() as u64);
        out
    }

    fn whole(secrets: &Arc<Secrets>, input: &str) -> String {
        String::from_utf8(redact(secrets, input.as_bytes(), &[], &[])).unwrap()
    }

    #[test]
    fn values_are_masked_whole_repeated_overlapping_and_nested() {
        let s = secrets(&["hunter2", "abcd", "cdef", "pass", "password123", "xy"]);
        assert_eq!(whole(&s, "pw=hunter2\n"), "pw=***\n");
        assert_eq!(whole(&s, "hunter2hunter2 hunter2"), "*** ***");
        assert_eq!(whole(&s, "abcdef"), "***", "overlapping values");
        assert_eq!(whole(&s, "abcd-cdef"), "***-***");
        assert_eq!(
            whole(&s, "password1234"),
            "***4",
            "a value that is a prefix of another"
        );
        assert_eq!(whole(&s, "passwor"), "***wor");
        assert_eq!(
            whole(&s, "xy is short"),
            "xy is short",
            "too short to redact"
        );
        assert_eq!(whole(&s, "hunter"), "hunter");
        assert_eq!(whole(&s, ""), "");
    }

    #[test]
    fn multi_line_values_match_whole_and_by_line() {
        let key =
            "-----BEGIN KEY-----\r\nMIIEvQIBADANBg\r\nkqhkiG9w0BAQEF\r\n-----END KEY-----\r\n";
        let s = secrets(&[key, "token\n"]);
        assert_eq!(whole(&s, &format!("key: {key}done")), "key: ***done");
        assert_eq!(whole(&s, "line MIIEvQIBADANBg here"), "line *** here");
        assert_eq!(whole(&s, "the token is here"), "the *** is here");
    }

    #[test]
    fn nothing_to_redact_passes_through() {
        let s = secrets(&["ab", ""]);
        assert!(s.is_empty());
        let mut r = Redactor::new(s);
        assert!(!r.is_active());
        let mut out = Vec::new();
        r.feed(b"hello", |b| out.extend_from_slice(b));
        assert_eq!((out.as_slice(), r.held()), (&b"hello"[..], 0));
    }

    #[test]
    fn any_chunking_and_idle_flushing_gives_the_same_output() {
        let mut rng = StdRng::seed_from_u64(7);
        let alphabet = b"abcx\n";
        for round in 0..3000 {
            let values: Vec<String> = (0..rng.random_range(1..5))
                .map(|_| {
                    let len = rng.random_range(MIN_VALUE_LEN..9);
                    (0..len)
                        .map(|_| alphabet[rng.random_range(0..3)] as char)
                        .collect()
                })
                .collect();
            let s = Arc::new(Secrets::new(&values).unwrap());
            let len = rng.random_range(0..200);
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let want = reference(&s, &input);
            for _ in 0..5 {
                let mut cuts: Vec<usize> = (0..rng.random_range(0..20))
                    .map(|_| rng.random_range(0..=len))
                    .collect();
                cuts.sort_unstable();
                let idle: Vec<usize> = cuts.iter().copied().filter(|_| rng.random()).collect();
                let got = redact(&s, &input, &cuts, &idle);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want),
                    "round {round}: values {values:?}, input {:?}, cuts {cuts:?}, idle {idle:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }

    #[test]
    fn many_values_are_found_in_groups() {
        let mut rng = StdRng::seed_from_u64(3);
        let alphabet = b"abcd";
        let values: Vec<Vec<u8>> = (0..3 * SCAN_GROUP)
            .map(|_| {
                (0..rng.random_range(MIN_VALUE_LEN..8))
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect()
            })
            .collect();
        let s = Arc::new(Secrets::new(&values).unwrap());
        assert!(s.matcher.as_ref().unwrap().scans.len() > 1);
        for _ in 0..50 {
            let input: Vec<u8> = (0..rng.random_range(0..300))
                .map(|_| b"abcdx"[rng.random_range(0..5)])
                .collect();
            let cuts: Vec<usize> = {
                let mut c: Vec<usize> = (0..5).map(|_| rng.random_range(0..=input.len())).collect();
                c.sort_unstable();
                c
            };
            assert_eq!(redact(&s, &input, &cuts, &cuts), reference(&s, &input));
        }
    }

    #[test]
    fn an_idle_flush_holds_only_what_may_start_a_value() {
        let s = secrets(&["secret-value"]);
        let mut r = Redactor::new(s);
        let mut out = Vec::new();
        r.feed(b"log line\nsecret-", |b| out.extend_from_slice(b));
        r.flush_idle(|b| out.extend_from_slice(b));
        assert_eq!(out, b"log line\n");
        assert_eq!(r.held(), "secret-".len());
        r.feed(b"valve\n", |b| out.extend_from_slice(b));
        r.flush_idle(|b| out.extend_from_slice(b));
        assert_eq!(out, b"log line\nsecret-valve\n", "not a value after all");
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn a_gap_gives_up_a_possible_value_start() {
        let s = secrets(&["secret-value"]);
        let mut r = Redactor::new(s);
        let mut out = Vec::new();
        r.feed(b"a secret-value b secr", |b| out.extend_from_slice(b));
        let dropped = r.gap(10, |b| out.extend_from_slice(b));
        assert_eq!(out, b"a *** b ");
        assert_eq!(dropped, 4 + 10, "the held `secr` goes with the gap");
        r.feed(b"after", |b| out.extend_from_slice(b));
        r.finish(|b| out.extend_from_slice(b));
        assert_eq!(out, b"a *** b after");
        assert_eq!(r.emitted(), out.len() as u64 + dropped);
        assert_eq!(r.consumed(), 21 + 10 + 5);
    }

    #[test]
    fn env_lists_select_names_and_prefixes() {
        let sel = EnvSelector::parse(" DB_PASSWORD, API_*,,*");
        assert!(sel.matches(b"DB_PASSWORD"));
        assert!(sel.matches(b"API_TOKEN"));
        assert!(!sel.matches(b"DB_PASSWORD2"));
        assert!(!sel.matches(b"PATH"), "a bare * selects nothing");
        let environ = b"PATH=/usr/bin\0RELAY_REDACT_ENV=DB_PASSWORD,API_*\0DB_PASSWORD=hunter22\0API_KEY=k=v=1\0HOME=/root\0";
        let s = Arc::new(Secrets::from_environ(environ).unwrap());
        assert_eq!(s.len(), 2);
        assert_eq!(whole(&s, "hunter22 k=v=1 /usr/bin"), "*** *** /usr/bin");
        assert!(
            Secrets::from_environ(b"DB_PASSWORD=hunter22\0")
                .unwrap()
                .is_empty()
        );
    }
}
