//! Accepting connections so that no client can hoard them.
//!
//! Every tenant pod can reach the API, so a connection is a resource one tenant could take from
//! all the others. `axum::serve` accepts without bound and reads a request head for as long as
//! the client takes to send it (hyper's head deadline needs a timer it is not given): one client
//! holding partial requests open exhausts the process's files and silences every writer. Here:
//! - the total of open connections is capped below the open-files limit, and each peer address
//!   gets at most its share; beyond either, the connection is answered at once with one short
//!   refusal (`503` when the service is full, `429` when that peer is, both with `Retry-After`,
//!   which the shipping client honours) and closed, without a request being parsed;
//! - a request head must arrive whole within the head deadline, which also bounds how long a
//!   kept-alive connection may sit idle (hyper starts the deadline as soon as it waits for the
//!   next head); the body's own deadline, which grows with its declared size, is in `routes`.
//!
//! HTTP/1.1 only: the clients (entrypoint, collector, curl) speak it, and its deadlines are the
//! ones hyper enforces; `h2c` would bring per-stream state with limits of its own.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::metrics::{Metrics, ReasonLabels};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

/// Bounds on connections (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one peer address.
    pub max_per_peer: usize,
    /// Time for a request head to arrive whole, and for a kept-alive connection to stay idle.
    pub head_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_per_peer: 1_024,
            head_timeout: Duration::from_secs(10),
        }
    }
}

/// Refusals being written at once: beyond this many, a refused connection is closed without an
/// answer (a flood must not turn into as many tasks and open files).
const MAX_REFUSING: usize = 256;

/// Longest a refusal keeps its connection: enough to send the answer and read what the client
/// had sent (see [`refuse`]).
const REFUSAL_LINGER: Duration = Duration::from_millis(250);

/// Counts open connections, in all and per peer.
#[derive(Debug)]
struct Tracker {
    limits: ConnLimits,
    total: AtomicUsize,
    peers: Mutex<HashMap<IpAddr, usize>>,
    refusing: AtomicUsize,
}

/// One open connection's place in the [`Tracker`], given back when dropped.
struct Slot {
    tracker: Arc<Tracker>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tracker.total.fetch_sub(1, Ordering::AcqRel);
        let mut peers = self.tracker.peers();
        if let Some(n) = peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    Service,
    Peer,
}

impl Tracker {
    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Full> {
        let mut peers = self.peers();
        let mine = peers.entry(peer).or_insert(0);
        if *mine >= self.limits.max_per_peer {
            if *mine == 0 {
                peers.remove(&peer);
            }
            return Err(Full::Peer);
        }
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.limits.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            if *mine == 0 {
                peers.remove(&peer);
            }
            return Err(Full::Service);
        }
        *mine += 1;
        Ok(Slot {
            tracker: Arc::clone(self),
            peer,
        })
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then lets open
/// connections finish their requests (the caller bounds how long).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let tracker = Arc::new(Tracker {
        limits,
        total: AtomicUsize::new(0),
        peers: Mutex::default(),
        refusing: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of files (or another transient error): the listener stays, and a
                    // short pause lets connections close instead of spinning on the error.
                    tracing::warn!(error = %e, "Cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Reap finished connection tasks so the set does not grow with every connection.
        while conns.try_join_next().is_some() {}
        let slot = match tracker.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(full) => {
                refuse(stream, full, &tracker, &metrics);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let metrics = Arc::clone(&metrics);
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _slot = slot;
            metrics.connections_open.inc();
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .keep_alive(true);
            let conn = builder
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = async { drop(stop.wait_for(|stop| *stop).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // Head deadlines, resets and half-sent requests end here; none is ours to fix.
                tracing::debug!(%peer, error = %e, "Connection ended with an error.");
            }
            metrics.connections_open.dec();
        });
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Answers a connection over a limit with one short response and closes it, in a task of its
/// own; past [`MAX_REFUSING`] of those, closes it at once.
fn refuse(stream: TcpStream, full: Full, tracker: &Arc<Tracker>, metrics: &Metrics) {
    let (status, reason) = match full {
        Full::Service => ("503 Service Unavailable", "connections"),
        Full::Peer => ("429 Too Many Requests", "connections_per_peer"),
    };
    metrics
        .connections_refused
        .get_or_create(&ReasonLabels { reason })
        .inc();
    if tracker.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
        tracker.refusing.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let tracker = Arc::clone(tracker);
    tokio::spawn(async move {
        let body = format!(
            "{{\"error\":\"{reason}\",\"message\":\"too many open connections; retry later\"}}"
        );
        let response = format!(
            "HTTP/1.1 {status}\r\nretry-after: 1\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(response.as_bytes()).await?;
            stream.shutdown().await?;
            // Read what the client sent before closing: closing with unread bytes resets the
            // connection, and the client might lose the answer.
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
        tracker.refusing.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Raises this process's soft limit on open files to its hard limit (where the host allows
/// more than the default 1024), and returns the soft limit now in force.
pub fn raise_open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "Cannot raise the open-files limit.");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read the open-files limit.");
            1024
        }
    }
}

/// Connections the service may keep open with `open_files` files in all: a reserve stays for
/// storage (files, object-store sockets), the listeners and the refusals being written.
pub fn fit_connections(wanted: usize, open_files: u64) -> usize {
    let reserve = 256 + MAX_REFUSING as u64;
    let room = usize::try_from(open_files.saturating_sub(reserve)).unwrap_or(usize::MAX);
    wanted.min(room.max(16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(max_connections: usize, max_per_peer: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            limits: ConnLimits {
                max_connections,
                max_per_peer,
                head_timeout: Duration::from_secs(1),
            },
            total: AtomicUsize::new(0),
            peers: Mutex::default(),
            refusing: AtomicUsize::new(0),
        })
    }

    #[test]
    fn a_peer_gets_its_share_and_others_theirs() {
        let t = tracker(10, 2);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let a1 = t.admit(a).unwrap();
        let _a2 = t.admit(a).unwrap();
        assert_eq!(t.admit(a).err(), Some(Full::Peer));
        assert!(t.admit(b).is_ok());
        drop(a1);
        assert!(t.admit(a).is_ok());
    }

    #[test]
    fn the_total_is_capped_and_slots_come_back() {
        let t = tracker(3, 10);
        let slots: Vec<Slot> = (1..=3u8)
            .map(|i| t.admit([127, 0, 0, i].into()).unwrap())
            .collect();
        assert_eq!(t.admit([127, 0, 0, 9].into()).err(), Some(Full::Service));
        // A refused peer leaves no entry behind.
        assert_eq!(t.peers().len(), 3);
        drop(slots);
        assert_eq!(t.total.load(Ordering::Acquire), 0);
        assert!(t.peers().is_empty());
    }

    #[test]
    fn connections_fit_under_the_open_files_limit() {
        assert_eq!(fit_connections(16_384, 1_024), 512);
        assert_eq!(fit_connections(16_384, 1 << 20), 16_384);
        assert_eq!(fit_connections(100, 10), 16);
    }
}
