//! Read/write lock: readers (SHARED, no limit) on two servers over one
//! Redis hold in turns that overlap, so that some reader always holds the
//! lock, while a writer on each server takes it (exclusive) again and
//! again. Checked: no reader believes it holds beside a believed writer,
//! no two writers at once, fencing tokens in grant order, and every
//! writer's wait is shorter than one reader TTL — without the server's
//! writer preference across servers the readers would starve the writers.

use super::*;

const READER_TTL: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_writers_are_not_starved_by_readers() {
    let _serial = SERIAL.lock().await;
    let run_for = if full() {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(4)
    };
    let seed = mode_seed();
    let url = cluster_url();
    let prefix = unique_prefix();
    let a = serve(&url, &prefix, &[]);
    let b = serve(&url, &prefix, &[]);
    let history = Arc::new(History::new());
    let key = "rw/table".to_string();
    let reader = ModeLoad {
        key: key.clone(),
        shared: Some(0),
        ttl: READER_TTL,
        wait: Duration::from_secs(10),
        hold_ms: (150, 400),
        pause_ms: (0, 20),
    };
    let writer = ModeLoad {
        shared: None,
        hold_ms: (20, 60),
        pause_ms: (100, 300),
        ..reader.clone()
    };
    let stop = CancellationToken::new();
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let client = sdk(&endpoints_alternating(w, &a, &b), Duration::from_secs(10)).await;
        let (name, load, into) = if w < 6 {
            (format!("reader-{w}"), reader.clone(), &mut readers)
        } else {
            (format!("writer-{w}"), writer.clone(), &mut writers)
        };
        into.push(tokio::spawn(mode_worker(
            name,
            client,
            load,
            seed.wrapping_add(w),
            history.clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(run_for).await;
    stop.cancel();
    let reader_waits = mode_waits(readers).await;
    let writer_waits = mode_waits(writers).await;

    let now = Instant::now();
    let windows = history.grants_of(&key);
    let (read, write): (Vec<Window>, Vec<Window>) = windows
        .iter()
        .cloned()
        .partition(|w| w.client.starts_with("reader"));
    let end = |w: &Window| w.end.map_or(now, |(at, _)| at);
    let mut beside = Vec::new();
    for wr in &write {
        for rd in &read {
            if rd.start < end(wr) && wr.start < end(rd) {
                beside.push(format!(
                    "{} (fence {}) believed it read while {} (fence {}) wrote",
                    rd.client, rd.fence, wr.client, wr.fence
                ));
            }
        }
    }
    assert!(beside.is_empty(), "{beside:#?}");
    let (writers_at_once, _) = most_at_once(&write, now);
    assert!(writers_at_once <= 1, "{writers_at_once} writers at once");
    let (readers_at_once, _) = most_at_once(&read, now);
    assert!(
        readers_at_once >= 2,
        "readers never overlapped: the run checked nothing"
    );
    // Writers that asked while a reader held: those the stream of readers
    // could have starved.
    let behind = write
        .iter()
        .filter(|w| read.iter().any(|r| r.start <= w.sent && w.sent < end(r)))
        .count();
    assert!(
        behind >= 2,
        "only {behind} writer(s) asked while a reader held"
    );
    let bad = fence_order_violations(&windows);
    assert!(bad.is_empty(), "{bad:?}");
    assert!(writer_waits.len() >= 4, "too few writes: {writer_waits:?}");
    let longest = writer_waits.last().copied().unwrap_or_default();
    assert!(
        longest < READER_TTL,
        "a writer waited {longest:?}, more than one reader TTL ({READER_TTL:?})"
    );
    eprintln!(
        "read/write (seed {seed}), {run_for:?}: 6 readers and 2 writers on two servers; {} reads (most at once {readers_at_once}), {} writes ({behind} asked while readers held); writer wait p50 {:?}, max {longest:?} (reader TTL {READER_TTL:?}); reader wait max {:?}",
        read.len(),
        write.len(),
        writer_waits
            .get(writer_waits.len() / 2)
            .copied()
            .unwrap_or_default(),
        reader_waits.last().copied().unwrap_or_default(),
    );
}
