use super::*;
use object_store::memory::InMemory;

fn store() -> Store {
    Store::new(
        Arc::new(InMemory::new()),
        Path::from("t"),
        Arc::new(Metrics::new()),
    )
}

#[tokio::test]
async fn the_cache_keeps_what_is_in_use_and_forgets_the_rest() {
    let store = store().cache_capacity(50);
    let held = store.create("held".into(), meta()).await.unwrap();
    held_write(&store, &held).await;
    for i in 0..1000 {
        store.create(format!("s{i}"), meta()).await.unwrap();
    }
    // Bounded by the capacity (quick_cache may keep a few more while it settles).
    assert!(store.cached_streams() <= 60, "{}", store.cached_streams());
    // The stream held all along is the one the store still hands out: a write through the
    // store reaches whoever follows the held copy.
    let again = store.open("held").await.unwrap().unwrap();
    assert!(Arc::ptr_eq(&held, &again));
    // An evicted one is loaded again from storage, whole.
    drop((held, again));
    let s0 = store.open("s0").await.unwrap().unwrap();
    assert_eq!(s0.status().length, 0);
    let reloaded = store.open("held").await.unwrap().unwrap();
    assert_eq!(reloaded.status().length, 5);
}

async fn held_write(store: &Store, s: &Stream) {
    store
        .write(s, Some(0), Bytes::from_static(b"hello"), None)
        .await
        .unwrap();
}

#[test]
fn the_tenant_is_the_namespace_where_known_else_the_workflow() {
    let mut m = meta();
    assert_eq!(m.tenant(), format!("workflow/{}", m.context.workflow()));
    m.namespace = Some(m.context.workflow().to_owned());
    // The same name as a namespace is another tenant.
    assert_eq!(m.tenant(), format!("namespace/{}", m.context.workflow()));
}

fn meta() -> StreamMeta {
    StreamMeta {
        context: Context::stream("workflows/w/triggers/t").unwrap(),
        name: "stdout".into(),
        source: Source::Entrypoint,
        entrypoint_absent: None,
        namespace: None,
        pod: None,
    }
}

#[tokio::test]
async fn out_of_order_parts_resend_and_conflict() {
    let s = store();
    let st = s.create("a".into(), meta()).await.unwrap();
    assert_eq!(
        s.write(&st, Some(5), Bytes::from_static(b"world"), None)
            .await
            .unwrap(),
        Written::Stored
    );
    assert_eq!(st.status().length, 0);
    assert_eq!(st.status().pending, vec![Span::new(0, 5)]);
    s.write(&st, Some(0), Bytes::from_static(b"hello"), None)
        .await
        .unwrap();
    assert_eq!(
        s.write(&st, Some(2), Bytes::from_static(b"llowo"), None)
            .await
            .unwrap(),
        Written::Unchanged
    );
    assert!(matches!(
        s.write(&st, Some(2), Bytes::from_static(b"XXXXX"), None)
            .await,
        Err(StoreError::Conflict { .. })
    ));
    s.write(&st, Some(10), Bytes::new(), Some(10))
        .await
        .unwrap();
    let status = st.status();
    assert!(status.complete);
    assert_eq!(
        s.read_all(&st, Span::new(0, 10)).await.unwrap(),
        &b"helloworld"[..]
    );
    assert!(matches!(
        s.write(&st, Some(10), Bytes::from_static(b"!"), None).await,
        Err(StoreError::BeyondFinal { .. })
    ));
}

#[tokio::test]
async fn dropped_ranges_are_skipped_and_survive_reload() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let m = Arc::new(Metrics::new());
    let s = Store::new(os.clone(), Path::from("t"), m.clone());
    let st = s.create("a".into(), meta()).await.unwrap();
    s.write(&st, Some(0), Bytes::from_static(b"abc"), None)
        .await
        .unwrap();
    s.mark_dropped(&st, Span::new(3, 6), DropReason::BufferFull)
        .await
        .unwrap();
    s.write(&st, Some(6), Bytes::from_static(b"ghi"), Some(9))
        .await
        .unwrap();
    assert!(st.status().complete);
    let fresh = Store::new(os, Path::from("t"), m);
    let st2 = fresh.open("a").await.unwrap().unwrap();
    let status = st2.status();
    assert!(status.complete);
    assert_eq!(
        status.dropped,
        vec![DroppedSpan::new(Span::new(3, 6), DropReason::BufferFull)]
    );
    assert_eq!(
        fresh.read_all(&st2, Span::new(0, 9)).await.unwrap(),
        &b"abcghi"[..]
    );
    assert!(fresh.open("missing").await.unwrap().is_none());
}

async fn marker_keys(os: &Arc<dyn ObjectStore>) -> Vec<String> {
    let mut keys: Vec<String> = os
        .list(Some(&Path::from("t")))
        .map_ok(|m| m.location.to_string())
        .try_filter(|k| std::future::ready(k.contains("/dropped/")))
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

#[tokio::test]
async fn reasons_are_in_the_marker_keys_and_outlive_a_merge_and_a_fresh_replica() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let m = Arc::new(Metrics::new());
    let s = Store::new(os.clone(), Path::from("t"), m.clone())
        .segment_size(20)
        .settled_after(Duration::ZERO)
        .merge_above(0);
    let st = s.create("r".into(), meta()).await.unwrap();
    for i in 0..4u64 {
        s.write(&st, Some(i * 5), pattern(i as u8, 5), None)
            .await
            .unwrap();
    }
    s.mark_dropped(&st, Span::new(20, 25), DropReason::KernelLost)
        .await
        .unwrap();
    s.mark_dropped(&st, Span::new(25, 30), DropReason::WriterDied)
        .await
        .unwrap();
    // Known as dropped already: nothing is stored, the first reason stays.
    s.mark_dropped(&st, Span::new(21, 24), DropReason::GaveUp)
        .await
        .unwrap();
    s.write(&st, Some(30), pattern(9, 10), Some(40))
        .await
        .unwrap();
    let want = vec![
        DroppedSpan::new(Span::new(20, 25), DropReason::KernelLost),
        DroppedSpan::new(Span::new(25, 30), DropReason::WriterDied),
    ];
    assert_eq!(st.status().dropped, want);
    assert_eq!(
        marker_keys(&os).await,
        vec![
            format!(
                "t/streams/r/dropped/{}.kernel-lost",
                span_name(Span::new(20, 25))
            ),
            format!(
                "t/streams/r/dropped/{}.writer-died",
                span_name(Span::new(25, 30))
            ),
        ]
    );
    assert!(s.compact(&st).await.unwrap().segments >= 1);
    assert_eq!(marker_keys(&os).await.len(), 2, "a merge leaves markers be");
    let fresh = Store::new(os.clone(), Path::from("t"), m);
    let st2 = fresh.open("r").await.unwrap().unwrap();
    assert_eq!(st2.status().dropped, want);
    // A read gives the neighbours of different reasons as two pieces.
    let dropped: Vec<(Span, DropReason)> = st2
        .plan(Span::new(0, 40))
        .0
        .into_iter()
        .filter_map(|p| match p {
            Piece::Dropped(span, reason) => Some((span, reason)),
            Piece::Data { .. } => None,
        })
        .collect();
    assert_eq!(
        dropped,
        vec![
            (Span::new(20, 25), DropReason::KernelLost),
            (Span::new(25, 30), DropReason::WriterDied),
        ]
    );
}

#[tokio::test]
async fn a_marker_key_without_a_reason_or_with_an_unknown_one_is_unspecified() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let m = Arc::new(Metrics::new());
    let s = Store::new(os.clone(), Path::from("t"), m.clone());
    s.create("o".into(), meta()).await.unwrap();
    // As a version before reasons stored it, and as a later one with a reason unknown here.
    for name in [
        span_name(Span::new(0, 4)),
        format!("{}.eaten-by-a-grue", span_name(Span::new(4, 8))),
    ] {
        let key = Path::from(format!("t/streams/o/dropped/{name}"));
        os.put(&key, PutPayload::new()).await.unwrap();
    }
    let fresh = Store::new(os, Path::from("t"), m);
    let st = fresh.open("o").await.unwrap().unwrap();
    assert_eq!(
        st.status().dropped,
        vec![DroppedSpan::new(Span::new(0, 8), DropReason::Unspecified)]
    );
}

fn pattern(seed: u8, n: usize) -> Bytes {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

async fn part_keys(os: &Arc<dyn ObjectStore>) -> Vec<String> {
    let mut keys: Vec<String> = os
        .list(Some(&Path::from("t")))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.retain(|k| k.contains("/parts/"));
    keys.sort();
    keys
}

#[tokio::test]
async fn long_writes_are_stored_as_bounded_objects() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let s = Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()));
    let st = s.create("a".into(), meta()).await.unwrap();
    let max = MAX_OBJECT_LEN as usize;
    let data = pattern(1, 2 * max + 10);
    assert_eq!(
        s.write(&st, Some(7), data.clone(), None).await.unwrap(),
        Written::Stored
    );
    let keys = part_keys(&os).await;
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys[0].ends_with(&span_name(Span::new(7, 7 + max as u64))));
    assert_eq!(
        s.read_all(&st, Span::new(7, 7 + data.len() as u64))
            .await
            .unwrap(),
        data
    );
    // A fresh process reads the same objects back and knows the re-send.
    let fresh = Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()))
        .writer_window(Duration::from_millis(1));
    let st2 = fresh.open("a").await.unwrap().unwrap();
    assert_eq!(
        fresh
            .write(&st2, Some(7), data.clone(), None)
            .await
            .unwrap(),
        Written::Unchanged
    );
    // Differing bytes in the last object only: nothing of the write is kept.
    let mut other = data.to_vec();
    other.truncate(max + 20);
    other.extend_from_slice(&pattern(2, 2 * max));
    let other = Bytes::from(other);
    assert!(matches!(
        fresh.write(&st2, Some(7), other, None).await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(part_keys(&os).await, keys);
    // A part another replica stored inside the second object, unknown to this one: the check
    // after the puts finds it and every object of the write is removed again.
    let st3 = fresh.create("b".into(), meta()).await.unwrap();
    register_other(&os, "b").await;
    let theirs = Span::new(MAX_OBJECT_LEN + 5, MAX_OBJECT_LEN + 9);
    let key = Path::from(format!("t/streams/b/parts/{}", span_name(theirs)));
    os.put(&key, Bytes::from_static(b"zzzz").into())
        .await
        .unwrap();
    assert!(matches!(
        fresh.write(&st3, Some(0), data.clone(), None).await,
        Err(StoreError::Conflict { .. })
    ));
    let left: Vec<String> = part_keys(&os)
        .await
        .into_iter()
        .filter(|k| k.contains("/b/"))
        .collect();
    assert_eq!(left, vec![key.to_string()]);
}

#[tokio::test]
async fn a_part_longer_than_the_object_bound_is_still_checked() {
    // Parts written before the bound existed (or by an older replica) may be longer; a stream
    // that holds one widens the check after each write to its length.
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let m = Arc::new(Metrics::new());
    let max = MAX_OBJECT_LEN;
    let put_raw = |span: Span, seed: u8| {
        let os = os.clone();
        async move {
            let key = Path::from(format!("t/streams/x/parts/{}", span_name(span)));
            let body = pattern(seed, span.len() as usize);
            os.put(&key, body.into()).await.unwrap();
        }
    };
    put_raw(Span::new(0, max + 100), 1).await;
    let b = Store::new(os.clone(), Path::from("t"), m).writer_window(Duration::from_millis(1));
    let sb = b.create("x".into(), meta()).await.unwrap();
    // Stored by another replica after b listed the stream: b does not know it.
    register_other(&os, "x").await;
    let long = Span::new(max + 200, 2 * max + 300);
    put_raw(long, 3).await;
    let at = 2 * max + 250;
    let theirs = pattern(3, long.len() as usize).slice((at - long.start) as usize..);
    assert!(matches!(
        b.write(&sb, Some(at), Bytes::from(vec![0xff; 10]), None)
            .await,
        Err(StoreError::Conflict { .. })
    ));
    // The check taught b their part: the same bytes are already stored.
    assert_eq!(
        b.write(&sb, Some(at), theirs.slice(..10), None)
            .await
            .unwrap(),
        Written::Unchanged
    );
}

/// Registers a writer of stream `id` other than any store, as another replica does before
/// its parts (see [`Store::write`]).
async fn register_other(os: &Arc<dyn ObjectStore>, id: &str) {
    let key = format!("t/streams/{id}/writers/{:016x}-other", writer_epoch());
    os.put(&Path::from(key), PutPayload::new()).await.unwrap();
}

#[tokio::test]
async fn a_known_part_removed_from_storage_is_written_again() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let m = Arc::new(Metrics::new());
    let a = Store::new(os.clone(), Path::from("t"), m.clone());
    let b = Store::new(os.clone(), Path::from("t"), m);
    let sa = a.create("x".into(), meta()).await.unwrap();
    let sb = b.create("x".into(), meta()).await.unwrap();
    b.write(&sb, Some(0), Bytes::from_static(b"0123456789"), None)
        .await
        .unwrap();
    a.refresh(&sa).await.unwrap();
    // b's part loses a race and is removed; a still has it in its state.
    for k in part_keys(&os).await {
        os.delete(&Path::from(k)).await.unwrap();
    }
    assert_eq!(
        a.write(&sa, Some(2), Bytes::from_static(b"23456"), None)
            .await
            .unwrap(),
        Written::Stored
    );
    assert_eq!(part_keys(&os).await.len(), 1);
    assert_eq!(
        a.read_all(&sa, Span::new(2, 7)).await.unwrap(),
        &b"23456"[..]
    );
}

#[tokio::test]
async fn two_stores_on_one_backend_do_not_diverge() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let m = Arc::new(Metrics::new());
    let window = Duration::from_millis(50);
    let a = Store::new(os.clone(), Path::from("t"), m.clone()).writer_window(window);
    let b = Store::new(os, Path::from("t"), m).writer_window(window);
    let sa = a.create("x".into(), meta()).await.unwrap();
    let sb = b.create("x".into(), meta()).await.unwrap();
    a.write(&sa, Some(0), Bytes::from_static(b"0123456789"), None)
        .await
        .unwrap();
    // b does not know a's part yet; a different overlapping range must still be refused.
    assert!(matches!(
        b.write(&sb, Some(5), Bytes::from_static(b"XXXXXXXXXX"), None)
            .await,
        Err(StoreError::Conflict { .. })
    ));
    b.write(&sb, Some(5), Bytes::from_static(b"56789abcde"), None)
        .await
        .unwrap();
    a.refresh(&sa).await.unwrap();
    assert_eq!(
        a.read_all(&sa, Span::new(0, 15)).await.unwrap(),
        &b"0123456789abcde"[..]
    );
}
#[tokio::test]
async fn a_lone_writer_pays_one_request_per_part() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let m = Arc::new(Metrics::new());
    let s = Store::new(os, Path::from("t"), m.clone());
    let st = s.create("x".into(), meta()).await.unwrap();
    let (puts, lists) = (m.storage_calls("put"), m.storage_calls("list"));
    let n = 200u64;
    for i in 0..n {
        s.write_timed(&st, Some(i * 10), pattern(1, 10), None, Some(1_000 + i))
            .await
            .unwrap();
    }
    let (puts, lists) = (
        m.storage_calls("put") - puts,
        m.storage_calls("list") - lists,
    );
    // The parts, one registration, and one listing of the writers.
    assert_eq!((puts, lists), (n + 1, 1));
    assert_eq!(
        s.read_all(&st, Span::new(0, n * 10)).await.unwrap().len() as u64,
        n * 10
    );
}

/// Replicas over one storage (one slow to store, one slow to list, one quick) write
/// conflicting bytes over overlapping ranges of fresh streams in pairs, the second starting at
/// staggered times, so that one replica registers at every moment of the other's write,
/// including one that a check of the writers before it vouches for. At most one write is acknowledged, and what it acknowledged is
/// what any replica reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_replicas_never_both_acknowledge_conflicting_bytes() {
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let lag = Duration::from_millis(15);
    let slow_put: Arc<dyn ObjectStore> = Arc::new(ThrottledStore::new(
        Arc::clone(&mem),
        ThrottleConfig {
            wait_put_per_call: lag,
            ..ThrottleConfig::default()
        },
    ));
    let slow_list: Arc<dyn ObjectStore> = Arc::new(ThrottledStore::new(
        Arc::clone(&mem),
        ThrottleConfig {
            wait_list_per_call: lag,
            ..ThrottleConfig::default()
        },
    ));
    // Longer than a slow write's two storage calls, so that a check before them vouches for it.
    let window = Duration::from_millis(60);
    let store = |os: &Arc<dyn ObjectStore>| {
        Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new())).writer_window(window)
    };
    let (p, l, q) = (store(&slow_put), store(&slow_list), store(&mem));
    let pairs = [(&p, &q), (&q, &p), (&p, &l), (&l, &p)];
    let rounds = 4 * 16;
    let mut acknowledged = 0;
    for round in 0..rounds {
        let id = format!("r{round}");
        let (first, second) = pairs[round as usize % pairs.len()];
        let s1 = first.create(id.clone(), meta()).await.unwrap();
        let s2 = second.create(id.clone(), meta()).await.unwrap();
        // The first replica has written the stream alone just before: its next write is
        // vouched for by that check, and costs no listing.
        first
            .write(&s1, Some(100), Bytes::from_static(b"z"), None)
            .await
            .unwrap();
        let delay = Duration::from_millis(5 * (round / 4));
        let ours = Bytes::from(vec![b'a'; 10]);
        let theirs = Bytes::from(vec![b'b'; 10]);
        // Every other round over the same span, under other write times: two names, which
        // a conditional create does not tell apart.
        let at = if round % 2 == 0 { 5 } else { 0 };
        let (r1, r2) = tokio::join!(
            first.write_timed(&s1, Some(0), ours.clone(), None, Some(1)),
            async {
                tokio::time::sleep(delay).await;
                second
                    .write_timed(&s2, Some(at), theirs.clone(), None, Some(2))
                    .await
            }
        );
        assert!(
            !(r1.is_ok() && r2.is_ok()),
            "round {round}: both conflicting writes were acknowledged"
        );
        for r in [&r1, &r2] {
            assert!(
                matches!(r, Ok(Written::Stored) | Err(StoreError::Conflict { .. })),
                "round {round}: {r:?}"
            );
        }
        let fresh = store(&mem);
        let st = fresh.open(&id).await.unwrap().unwrap();
        if r1.is_ok() {
            acknowledged += 1;
            assert_eq!(fresh.read_all(&st, Span::new(0, 10)).await.unwrap(), ours);
        }
        if r2.is_ok() {
            acknowledged += 1;
            let span = Span::new(at, at + 10);
            assert_eq!(fresh.read_all(&st, span).await.unwrap(), theirs);
        }
    }
    // Not a test that refuses everything.
    assert!(
        acknowledged >= rounds / 2,
        "{acknowledged} of {rounds} rounds acknowledged a write"
    );
}
#[tokio::test]
async fn reads_planned_before_a_merge_read_the_segment_without_listing() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let m = Arc::new(Metrics::new());
    let s = Store::new(os, Path::from("t"), m.clone())
        .segment_size(1000)
        .settled_after(Duration::ZERO);
    let st = s.create("x".into(), meta()).await.unwrap();
    for i in 0..100u64 {
        s.write(&st, Some(i * 10), pattern(i as u8, 10), None)
            .await
            .unwrap();
    }
    let (planned, _) = st.plan(Span::new(0, 1000));
    assert_eq!(planned.len(), 100);
    assert_eq!(s.compact(&st).await.unwrap().segments, 1);
    let (lists, gets) = (m.storage_calls("list"), m.storage_calls("get"));
    for p in planned {
        let Piece::Data { span, part } = p else {
            panic!("{p:?}")
        };
        let i = span.start / 10;
        assert_eq!(
            s.read_piece(&st, span, &part).await.unwrap(),
            pattern(i as u8, 10)
        );
        assert!(!st.holds(&part), "{part:?} is merged");
    }
    // Each piece is tried where it was, then read from the segment this process merged.
    assert_eq!(m.storage_calls("list") - lists, 0);
    assert_eq!(m.storage_calls("get") - gets, 200);
}
#[tokio::test]
async fn cells_of_few_large_objects_are_left_as_they_are() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let s = Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()))
        .segment_size(100)
        .settled_after(Duration::ZERO);
    let st = s.create("x".into(), meta()).await.unwrap();
    // Cell 0 in four parts, cell 1 in five.
    for (start, len) in [(0, 25), (25, 25), (50, 25), (75, 25)]
        .into_iter()
        .chain((0..5).map(|i| (100 + i * 20, 20)))
    {
        s.write(&st, Some(start), pattern(start as u8, len), None)
            .await
            .unwrap();
    }
    s.declare_final(&st, 200).await.unwrap();
    let done = s.compact(&st).await.unwrap();
    assert_eq!((done.segments, done.removed), (1, 5));
    let keys = part_keys(&os).await;
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(
        keys[4].ends_with(&span_name(Span::new(100, 200))),
        "{keys:?}"
    );
    assert_eq!(s.read_all(&st, Span::new(0, 200)).await.unwrap().len(), 200);
}

fn timed_pattern(i: u64) -> (u64, Bytes, u64) {
    (i * 10, pattern(i as u8, 10), 1_000 + i / 3 * 7)
}

#[tokio::test]
async fn write_times_outlive_the_merge_and_reach_a_fresh_replica() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let s = Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()))
        .segment_size(1000)
        .settled_after(Duration::ZERO);
    let st = s.create("x".into(), meta()).await.unwrap();
    for i in 0..100 {
        let (at, data, ms) = timed_pattern(i);
        s.write_timed(&st, Some(at), data, None, Some(ms))
            .await
            .unwrap();
    }
    let keys = part_keys(&os).await;
    assert!(
        keys[3].ends_with(".1007"),
        "the name carries the time: {keys:?}"
    );
    let before: Vec<(u64, u64)> = st
        .plan(Span::new(0, 1000))
        .0
        .iter()
        .map(|p| match p {
            Piece::Data { span, part } => (span.start, part.written_ms),
            Piece::Dropped(..) => panic!("{p:?}"),
        })
        .collect();
    assert_eq!(s.compact(&st).await.unwrap().segments, 1);
    let keys = part_keys(&os).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].ends_with(&format!("{}.1000", span_name(Span::new(0, 1000)))));

    let m = Arc::new(Metrics::new());
    let fresh = Store::new(os.clone(), Path::from("t"), m.clone());
    let st = fresh.open("x").await.unwrap().unwrap();
    let (pieces, _) = st.plan(Span::new(0, 1000));
    let [Piece::Data { part, .. }] = pieces.as_slice() else {
        panic!("{pieces:?}")
    };
    assert_eq!(part.written_ms, 1000);
    let index = fresh.times(&st, part).await.unwrap();
    // One entry per run of equal times: the parts' own, as before the merge.
    let mut runs = before.clone();
    runs.dedup_by_key(|e| e.1);
    assert_eq!(index.entries, runs);
    for &(offset, ms) in &before {
        assert_eq!(index.at(offset), ms);
    }
    // A read from a time: the index of the one segment holding it.
    let gets = m.storage_calls("get");
    assert_eq!(fresh.offset_since(&st, 1007).await.unwrap(), 30);
    assert_eq!(fresh.offset_since(&st, 1008).await.unwrap(), 60);
    assert_eq!(fresh.offset_since(&st, 0).await.unwrap(), 0);
    assert_eq!(fresh.offset_since(&st, 99_999).await.unwrap(), 1000);
    assert_eq!(m.storage_calls("get") - gets, 3);

    // A segment whose index is gone (a crash before it, from an older version) still has
    // the time of its first byte.
    os.delete(&Path::from(
        "t/streams/x/times/0000000000000000-00000000000003e8",
    ))
    .await
    .unwrap();
    let index = fresh.times(&st, part).await.unwrap();
    assert_eq!(index.entries, vec![(0, 1000)]);
}

#[tokio::test]
async fn the_last_lines_are_found_reading_only_the_tail() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let m = Arc::new(Metrics::new());
    let s = Store::new(os.clone(), Path::from("t"), m.clone())
        .segment_size(1000)
        .settled_after(Duration::ZERO);
    let st = s.create("x".into(), meta()).await.unwrap();
    // 2,000 lines of 10 bytes, in parts of 20 lines, merged into 20 segments.
    let lines: Vec<u8> = (0..2000u32)
        .flat_map(|i| format!("line {i:04}\n").into_bytes())
        .collect();
    for chunk in lines.chunks(200) {
        s.write(&st, None, Bytes::copy_from_slice(chunk), None)
            .await
            .unwrap();
    }
    s.compact(&st).await.unwrap();
    assert_eq!(part_keys(&os).await.len(), 20);
    let gets = m.storage_calls("get");
    assert_eq!(s.offset_of_last_lines(&st, 3).await.unwrap(), 19_970);
    assert_eq!(m.storage_calls("get") - gets, 1, "one segment read");
    assert_eq!(s.offset_of_last_lines(&st, 150).await.unwrap(), 18_500);
    assert_eq!(s.offset_of_last_lines(&st, 0).await.unwrap(), 20_000);
    assert_eq!(s.offset_of_last_lines(&st, 5_000).await.unwrap(), 0);
    // A last line still without its newline is a line.
    s.write(&st, None, Bytes::from_static(b"partial"), None)
        .await
        .unwrap();
    assert_eq!(s.offset_of_last_lines(&st, 1).await.unwrap(), 20_000);
    assert_eq!(s.offset_of_last_lines(&st, 2).await.unwrap(), 19_990);
}

#[tokio::test]
async fn the_same_bytes_under_two_times_are_kept_once() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = || {
        Store::new(os.clone(), Path::from("t"), Arc::new(Metrics::new()))
            .writer_window(Duration::from_millis(20))
    };
    let (a, b) = (store(), store());
    let sa = a.create("x".into(), meta()).await.unwrap();
    let data = Bytes::from_static(b"0123456789");
    a.write_timed(&sa, Some(0), data.clone(), None, Some(1))
        .await
        .unwrap();
    let sb = b.open("x").await.unwrap().unwrap();
    // The second writer does not know the first's part (another replica's, stored after
    // it listed): it finds it when it checks, and withdraws its own copy.
    sb.forget(&[(0, 10)]);
    b.write_timed(&sb, Some(0), data.clone(), None, Some(2))
        .await
        .unwrap();
    let keys = part_keys(&os).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].ends_with(".1"), "{keys:?}");
    assert_eq!(b.read_all(&sb, Span::new(0, 10)).await.unwrap(), data);
    // Other bytes under another time are a conflict.
    let c = store();
    let sc = c.open("x").await.unwrap().unwrap();
    sc.forget(&[(0, 10)]);
    let other = Bytes::from_static(b"9876543210");
    assert!(matches!(
        c.write_timed(&sc, Some(0), other, None, Some(3)).await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(part_keys(&os).await, keys);
}
