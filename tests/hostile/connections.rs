//! Floods at the connection level, against the real binary: many streams on
//! one HTTP/2 connection, sockets that never speak, and a server that runs
//! out of file descriptors. Each measures what its limit protects (RSS,
//! open sockets, CPU) and checks that a legitimate client is still served.

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::transport::Channel;

use super::h2raw;
use crate::common::certs::Pki;
use crate::common::*;
use crate::rss_kib;
use leasehold::pb::lock_service_client::LockServiceClient;

/// Streams one connection may have open in these tests.
const STREAMS: u32 = 256;
/// Streams the flood opens on one connection (the reproduction).
const FLOOD_STREAMS: usize = 20_000;
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

async fn describe_ok(endpoint: &str, within: Duration) {
    let call = async {
        let mut c = LockServiceClient::new(
            Channel::from_shared(endpoint.to_string())
                .expect("endpoint")
                .connect()
                .await
                .expect("connect"),
        );
        c.describe(describe("legit/key")).await.expect("describe")
    };
    tokio::time::timeout(within, call)
        .await
        .expect("a legitimate Describe answered in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_open_unbounded_streams() {
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&["--max-concurrent-streams", &STREAMS.to_string()])
    });
    let pid = server.pid();
    let endpoint = server.endpoint();
    let mut c = server_client(&endpoint).await;
    for i in 0..200 {
        let key = format!("warm/{i}");
        let lease = lease_of(c.acquire(acquire(&key, 30_000)).await.unwrap().into_inner());
        c.release(release(&key, &lease.token)).await.unwrap();
    }
    let before = rss_kib(pid);

    // The limit and 64 more, too few refusals for the server to end the
    // connection: the limit holds, and the streams it let in stay open.
    let over = 64;
    let (outcome, open) = h2raw::flood(
        &server.addr,
        HEALTH_WATCH,
        STREAMS as usize + over,
        Duration::from_secs(30),
    )
    .await;
    let during = rss_kib(pid);
    eprintln!(
        "{} Health/Watch streams on one connection: {outcome:?}; server RSS with {} \
         streams open {during} KiB (+{} KiB)",
        STREAMS as usize + over,
        outcome.accepted,
        during.saturating_sub(before)
    );
    assert_eq!(outcome.accepted, STREAMS as usize, "{outcome:?}");
    assert_eq!(outcome.refused, over, "{outcome:?}");
    assert!(outcome.goaway.is_none() && !outcome.closed, "{outcome:?}");
    // Another client is served while the streams are open.
    c.describe(describe("legit/key")).await.expect("describe");
    // Without the limit, 20 000 streams took +201 MiB, about 10 KiB each;
    // the bound leaves room for a shared machine and the allocator.
    assert!(
        during < before + 16 * 1024,
        "RSS grew from {before} KiB to {during} KiB"
    );
    drop(open);

    // The flood: 20 000 Watch streams on one connection, as fast
    // as they can be written, ignoring the server's SETTINGS.
    let started = Instant::now();
    let (flood, flooding) = h2raw::flood(
        &server.addr,
        HEALTH_WATCH,
        FLOOD_STREAMS,
        Duration::from_secs(60),
    )
    .await;
    let after_flood = rss_kib(pid);
    eprintln!(
        "{FLOOD_STREAMS} Health/Watch streams on one connection, in {:?}: {flood:?}; \
         server RSS before {before} KiB, after {after_flood} KiB (+{} KiB)",
        started.elapsed(),
        after_flood.saturating_sub(before)
    );
    assert!(flood.accepted <= STREAMS as usize, "{flood:?}");
    assert!(
        flood.refused > 0 && flood.goaway.is_some() && flood.closed,
        "streams beyond the limit refused, then the connection ended: {flood:?}"
    );
    drop(flooding);
    c.describe(describe("legit/key")).await.expect("describe");
    assert!(
        after_flood < before + 32 * 1024,
        "RSS grew from {before} KiB to {after_flood} KiB"
    );
}

async fn server_client(endpoint: &str) -> LockServiceClient<Channel> {
    LockServiceClient::new(
        Channel::from_shared(endpoint.to_string())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect"),
    )
}

/// Waits until the server closes `socket` (a read returns end of file or
/// an error), at most `within`; returns how long that took, or `None`.
async fn closed_within(mut socket: TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, socket.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {} // the server's SETTINGS (plaintext), then nothing
        }
    }
}

const SILENT_SOCKETS: usize = 300;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens `n` sockets that send nothing and returns, for each, how long the
/// server took to close it (`None`: still open after `within`).
async fn silent_sockets(addr: &str, n: usize, within: Duration) -> Vec<Option<Duration>> {
    let mut sockets = Vec::new();
    for _ in 0..n {
        sockets.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let waits = sockets.into_iter().map(|s| closed_within(s, within));
    futures_util::future::join_all(waits).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    let pki = Pki::new("idle");
    let leaf = pki.server();
    let timeouts = [
        "--handshake-timeout",
        "1s",
        "--idle-timeout",
        "3s",
        "--max-connections",
        "1000",
    ];
    let (plain, tls) = tokio::task::block_in_place(|| {
        let plain = ServerProcess::start(&timeouts);
        let mut args = timeouts.to_vec();
        let (cert, key) = (
            leaf.cert_path.to_str().unwrap(),
            leaf.key_path.to_str().unwrap(),
        );
        args.extend(["--tls-cert", cert, "--tls-key", key]);
        (plain, ServerProcess::start(&args))
    });
    let within = HANDSHAKE_TIMEOUT + Duration::from_secs(9);

    // A probe's Health Watch stream is a call in progress: it keeps its
    // connection however long it lasts.
    let channel = Channel::from_shared(plain.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("first status");

    // A connection that made one call and then went quiet.
    let (outcome, quiet) =
        h2raw::flood(&plain.addr, "/grpc.health.v1.Health/Check", 1, within).await;
    assert_eq!(outcome.accepted, 1, "{outcome:?}");
    let quiet = tokio::spawn(closed_within(quiet, IDLE_TIMEOUT + Duration::from_secs(9)));

    for (name, server) in [("plaintext", &plain), ("TLS", &tls)] {
        let closed = silent_sockets(&server.addr, SILENT_SOCKETS, within).await;
        let open = closed.iter().filter(|c| c.is_none()).count();
        let slowest = closed.iter().flatten().max().copied();
        eprintln!(
            "{name}: {SILENT_SOCKETS} sockets that never sent a byte: {} closed by the \
             server (the last after {slowest:?}), {open} still open after {within:?}",
            SILENT_SOCKETS - open
        );
        assert_eq!(open, 0, "{name}: silent sockets left open");
        let slowest = slowest.expect("some closed");
        assert!(
            slowest >= HANDSHAKE_TIMEOUT / 2,
            "{name}: closed at {slowest:?}"
        );
        // Plus the bound's margin for 300 sockets on a busy machine.
        assert!(
            slowest < HANDSHAKE_TIMEOUT + Duration::from_secs(4),
            "{name}: {slowest:?}"
        );
    }

    let quiet = quiet
        .await
        .unwrap()
        .expect("the quiet connection was closed");
    eprintln!("a connection idle after one call: closed after {quiet:?}");
    assert!(
        quiet >= IDLE_TIMEOUT - Duration::from_millis(200),
        "{quiet:?}"
    );
    assert!(quiet < IDLE_TIMEOUT + Duration::from_secs(4), "{quiet:?}");

    // The Watch stream outlived the idle timeout and is still open.
    let next = tokio::time::timeout(Duration::from_millis(300), watch.message()).await;
    assert!(next.is_err(), "the Watch stream ended: {next:?}");
    describe_ok(&plain.endpoint(), Duration::from_secs(5)).await;
}

/// CPU time (user + system) a process used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

const FD_LIMIT: usize = 64;

/// `leasehold serve ARGS` under `ulimit -n FD_LIMIT`: the process, its pid,
/// its output and its address once it listens.
fn serve_with_fd_limit(args: &[&str]) -> (std::process::Child, u32, Output, String) {
    let mut cmd = Command::new("sh");
    cmd.env("LEASEHOLD_LOG", "info")
        .arg("-c")
        .arg(format!("ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_leasehold"))
        .args(["--log-format", "text", "serve", "--listen", "127.0.0.1:0"])
        .args(args);
    let mut child = spawn_tied(cmd);
    let pid = child.id();
    let output = Output::capture(&mut child);
    let line = output.wait_for("listening", Duration::from_secs(20));
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("addr")
        .to_string();
    (child, pid, output, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once() {
    // The default cap under `ulimit -n 64`: 64 - 32 descriptors.
    let cap = FD_LIMIT - 32;
    let (_child, pid, output, addr) =
        tokio::task::block_in_place(|| serve_with_fd_limit(&["--handshake-timeout", "30s"]));
    let line = output.find("listening").expect("listening");
    assert!(line.contains(&format!("max_connections={cap}")), "{line}");
    let endpoint = format!("http://{addr}");
    let mut legit = server_client(&endpoint).await;
    legit
        .describe(describe("legit/key"))
        .await
        .expect("describe");

    // One legitimate connection and `cap + 8` silent ones: the last 9 are
    // closed at once, long before the handshake timeout.
    let extra = 8;
    let closed = silent_sockets(&addr, cap + extra, Duration::from_secs(3)).await;
    let refused = closed.iter().flatten().count();
    eprintln!(
        "ulimit -n {FD_LIMIT}, default cap {cap}: 1 client and {} silent sockets: {refused} \
         closed within 3 s, {} descriptors open",
        cap + extra,
        open_fds(pid)
    );
    assert_eq!(refused, extra + 1, "{closed:?}");
    assert!(output.find("connection limit reached").is_some());
    assert!(
        output.find("accept failed").is_none(),
        "the cap came before EMFILE"
    );
    legit
        .describe(describe("legit/key"))
        .await
        .expect("describe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_neither_spins_nor_starves() {
    // --max-connections above the descriptor limit, so that accept itself
    // fails with EMFILE: the case the backoff is for.
    let (_child, pid, output, addr) = tokio::task::block_in_place(|| {
        serve_with_fd_limit(&["--handshake-timeout", "3s", "--max-connections", "1000"])
    });
    let endpoint = format!("http://{addr}");
    let mut legit = server_client(&endpoint).await;
    legit
        .describe(describe("legit/key"))
        .await
        .expect("describe");

    // More silent sockets than the server has descriptors left.
    let mut silent = Vec::new();
    for _ in 0..FD_LIMIT + 16 {
        silent.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    tokio::task::block_in_place(|| {
        wait_until(
            "the server to run out of descriptors",
            Duration::from_secs(10),
            || open_fds(pid) >= FD_LIMIT - 1,
        )
    });
    let ticks = cpu_ticks(pid);
    let window = Instant::now();
    let mut answered = 0;
    while window.elapsed() < Duration::from_secs(2) {
        tokio::time::timeout(
            Duration::from_secs(1),
            legit.describe(describe("legit/key")),
        )
        .await
        .expect("the connected client is answered while descriptors are exhausted")
        .expect("describe");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let used = (cpu_ticks(pid) - ticks) as f64 / ticks_per_second() as f64;
    let share = used / window.elapsed().as_secs_f64();
    eprintln!(
        "ulimit -n {FD_LIMIT}, {} silent sockets, {} descriptors open: the server used \
         {:.0} % of a core over {:?} ({answered} Describe calls answered meanwhile)",
        silent.len(),
        open_fds(pid),
        share * 100.0,
        window.elapsed()
    );
    assert!(
        share < 0.25,
        "the server used {:.0} % of a core",
        share * 100.0
    );
    assert!(
        output.find("Too many open files").is_some() || output.find("accept").is_some(),
        "the accept failure is logged"
    );
    // The silent sockets are closed after the handshake timeout, and a new
    // client gets in.
    describe_ok(&endpoint, Duration::from_secs(3 + 8)).await;
    drop(silent);
}

/// Connections the cap allows in the many-connections flood.
const CAP: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_each_holding_a_watch_meet_the_cap() {
    // Each flooding connection holds one anonymous Health Watch: a call in
    // progress, so neither deadline closes it. Only the cap bounds them.
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&["--max-connections", &CAP.to_string()])
    });
    let pid = server.pid();
    let mut legit = server_client(&server.endpoint()).await;
    legit
        .describe(describe("legit/key"))
        .await
        .expect("describe");
    let before = rss_kib(pid);
    let flood = CAP + 100;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..flood {
        let (outcome, socket) =
            h2raw::flood(&server.addr, HEALTH_WATCH, 1, Duration::from_secs(10)).await;
        if outcome.accepted == 1 {
            held.push(socket);
        } else {
            assert!(outcome.closed, "{outcome:?}");
            refused += 1;
        }
    }
    let during = rss_kib(pid);
    let per = during.saturating_sub(before) / held.len().max(1) as u64;
    eprintln!(
        "{flood} connections with one Health Watch each, --max-connections {CAP}: {} held, \
         {refused} closed at once; server RSS {before} -> {during} KiB (+{} KiB, about \
         {per} KiB a connection)",
        held.len(),
        during.saturating_sub(before)
    );
    // The legitimate connection is one of the CAP.
    assert_eq!(held.len(), CAP - 1);
    assert_eq!(refused, flood - (CAP - 1));
    legit
        .describe(describe("legit/key"))
        .await
        .expect("describe");
    assert!(per < 256, "{per} KiB per connection");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_probe_streams_are_bounded_server_wide() {
    // Per connection, 256 streams; over many connections, without a
    // server-wide bound, Health Watch and reflection streams (which need
    // no token) would only be bounded by connections x 256.
    let max = 100;
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&["--max-probe-streams", &max.to_string()])
    });
    let pid = server.pid();
    let before = rss_kib(pid);
    let mut open = Vec::new();
    let (mut accepted, mut ended) = (0, 0);
    for _ in 0..4 {
        let (outcome, socket) =
            h2raw::flood(&server.addr, HEALTH_WATCH, 60, Duration::from_secs(10)).await;
        accepted += outcome.accepted;
        ended += outcome.ended;
        open.push(socket);
    }
    let during = rss_kib(pid);
    eprintln!(
        "240 Health Watch streams over 4 connections, --max-probe-streams {max}: \
         {accepted} open, {ended} refused; server RSS {before} -> {during} KiB"
    );
    assert_eq!(accepted, max);
    assert_eq!(ended, 240 - max);
    // Unary health checks are not counted, and still answered.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(server.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("check");
    let refused = health
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("--max-probe-streams"),
        "{refused:?}"
    );
    // Once the flooding connections are gone, a probe may watch again.
    drop(open);
    let mut watched = false;
    for _ in 0..100 {
        match health
            .watch(tonic_health::pb::HealthCheckRequest::default())
            .await
        {
            Ok(_) => {
                watched = true;
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(watched, "the slots were given back");
}
