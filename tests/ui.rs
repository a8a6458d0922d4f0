//! The web dashboard (`serve --ui`) in a real browser: headless Chromium
//! (Debian's `chromium`) driven by `playwright-core` from
//! `ui/test/dashboard.mjs`, against the real `leasehold serve`, while this
//! test holds and releases locks over gRPC and checks the server's side.
//!
//! - the list shows a held lock with its owner, metadata and fencing token,
//!   counts its TTL down, narrows by prefix, and drops a released lock's row
//!   within 1 s; the lock's page shows its Watch events; force-release
//!   through the page takes the lock (the holder's KeepAlive answers
//!   `alive = false`, the server logs the reason) and the next grant shows
//!   up there as ACQUIRED with a higher fencing token;
//! - with an auth file: no token is told to type one; a token without the
//!   admin grant sees no list and no force-release button, but a lock's page
//!   in its scope; an admin token typed into the same page gets both;
//! - 1 000 locks render in one go (the page's own first-render time is
//!   printed, see documentation/operations.md);
//! - `/ui/` exists only with `--ui`, with its content types, cache headers,
//!   the `/ui` redirect and 404s.
//!
//! The Rust side and the script talk in lines (`ok STEP` from the script,
//! commands on its stdin): real signals, no sleeps. Screenshots go to
//! `target/tmp/ui-screenshots/`. Needs `/usr/bin/chromium` and
//! `ui/test/node_modules` (`./test.sh` installs both); without them the
//! test fails and says what to install.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::{KeepAliveSession, Output, ServerProcess, lease_of};
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::transport::Channel;

fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ui/test")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

fn screenshots(test: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("ui-screenshots")
        .join(test)
}

/// `dashboard.mjs MODE` running against a server: its output lines, and
/// its stdin for commands. Killed on drop.
struct Page {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Output,
}

impl Page {
    #[track_caller]
    fn open(mode: &str, server: &ServerProcess, shots: &str, envs: &[(&str, String)]) -> Self {
        assert!(
            chromium().exists(),
            "no {}: install Debian's chromium (apt-get install chromium; ./test.sh does)",
            chromium().display()
        );
        assert!(
            script_dir().join("node_modules/playwright-core").exists(),
            "ui/test has no node_modules: run `npm ci` there (./test.sh does)"
        );
        // Killed with this test process (PR_SET_PDEATHSIG), so a failed
        // test leaves no browser behind.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--", "node", "dashboard.mjs", mode])
            .current_dir(script_dir())
            .env("LEASEHOLD_URL", server.endpoint())
            .env("SCREENSHOTS", screenshots(shots))
            .env("CHROMIUM", chromium())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("run node (install Node.js 20)");
        let stdin = child.stdin.take();
        let output = Output::capture(&mut child);
        Self {
            child,
            stdin,
            output,
        }
    }

    /// Waits for the script's `ok STEP` line and returns what follows it;
    /// a `fail` line, an exit or `within` passing fails the test with the
    /// script's whole output.
    #[track_caller]
    fn passed(&mut self, step: &str, within: Duration) -> String {
        let needle = format!("ok {step}");
        let end = Instant::now() + within;
        loop {
            let lines = self.output.all();
            if let Some(line) = lines.iter().find(|l| l.starts_with(&needle)) {
                return line[needle.len()..].trim().to_string();
            }
            let failed = lines.iter().any(|l| l.starts_with("fail "));
            let exited = self.child.try_wait().ok().flatten().is_some();
            if failed || exited || Instant::now() > end {
                if exited {
                    self.output.wait_closed(Duration::from_secs(5));
                }
                panic!(
                    "the browser script did not pass {step:?}:\n{}",
                    self.output.all().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn say(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").expect("write to the script");
        stdin.flush().expect("flush");
    }

    /// Waits for the script to exit with success.
    #[track_caller]
    fn finish(mut self) {
        self.stdin = None;
        let status = common::process::wait_exit(&mut self.child, Duration::from_secs(30));
        self.output.wait_closed(Duration::from_secs(5));
        assert!(
            status.success(),
            "the browser script failed:\n{}",
            self.output.all().join("\n")
        );
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
    }
    request
}

async fn take(
    c: &mut LockServiceClient<Channel>,
    token: Option<&str>,
    key: &str,
    ttl_ms: u32,
    owner: &str,
    metadata: &[(&str, &str)],
    mode: pb::LockMode,
) -> pb::Lease {
    let req = pb::AcquireRequest {
        key: key.into(),
        ttl_ms,
        owner: owner.into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        mode: mode as i32,
        shared_limit: if mode == pb::LockMode::Shared { 4 } else { 0 },
        ..Default::default()
    };
    let reply = c
        .acquire(with_token(req, token))
        .await
        .expect("acquire")
        .into_inner();
    lease_of(reply)
}

const HELD: &str = "jobs/nightly-report";
const RELEASED: &str = "cache/warmup";

#[test]
fn dashboard_lists_follows_and_force_releases() {
    let server = ServerProcess::start(&["--ui", "--admin"]);
    let rt = runtime();
    let (mut c, lease, released_lease, mut ka) = rt.block_on(async {
        let mut c = LockServiceClient::connect(server.endpoint())
            .await
            .expect("connect");
        let ex = pb::LockMode::Exclusive;
        let lease = take(
            &mut c,
            None,
            HELD,
            30_000,
            "host-7",
            &[("deploy", "4711"), ("pid", "8120")],
            ex,
        )
        .await;
        // A few more, as an operator would see them.
        take(
            &mut c,
            None,
            "deploy/api",
            120_000,
            "ci-runner-12",
            &[("pipeline", "8812"), ("commit", "3f9c2e1")],
            ex,
        )
        .await;
        take(
            &mut c,
            None,
            "migrations/billing-schema",
            600_000,
            "migrator@db-2",
            &[("version", "2026.11.30-01")],
            ex,
        )
        .await;
        for worker in ["export-worker-a", "export-worker-b"] {
            take(
                &mut c,
                None,
                "reports/monthly-export",
                90_000,
                worker,
                &[],
                pb::LockMode::Shared,
            )
            .await;
        }
        let released = take(
            &mut c,
            None,
            RELEASED,
            45_000,
            "cron@ops-1",
            &[("job", "warm-cache")],
            ex,
        )
        .await;
        // The holder keeps its lock alive on a stream, as a real one would.
        let mut ka = KeepAliveSession::open(&mut c).await.expect("keepalive");
        assert!(ka.renew(HELD, &lease.token, 30_000).await.alive);
        (c, lease, released, ka)
    });

    let mut page = Page::open(
        "admin",
        &server,
        "admin",
        &[
            ("HELD_KEY", HELD.into()),
            ("HELD_FENCE", lease.fencing_token.to_string()),
            ("RELEASE_KEY", RELEASED.into()),
        ],
    );
    page.passed("listed", Duration::from_secs(60));

    // Released now: the page must drop the row within 1 s (the script
    // times that from this command).
    let released_at = Instant::now();
    rt.block_on(async {
        let reply = c
            .release(pb::ReleaseRequest {
                key: RELEASED.into(),
                token: released_lease.token.clone(),
            })
            .await
            .expect("release")
            .into_inner();
        assert!(reply.released);
    });
    page.say("released");
    let gone = page.passed("gone", Duration::from_secs(10));
    eprintln!(
        "row gone {gone} after the command, {:?} after the release",
        released_at.elapsed()
    );

    // Force-released through the page: the holder's stream learns it.
    page.passed("forced", Duration::from_secs(30));
    rt.block_on(async {
        let renewed = ka.renew(HELD, &lease.token, 30_000).await;
        assert!(!renewed.alive, "the holder still believes: {renewed:?}");
    });
    let warn = server.output.wait_for(
        "dashboard test: holder host-7 is gone",
        Duration::from_secs(5),
    );
    assert!(warn.contains("WARN"), "{warn}");
    assert!(
        !warn.contains(&lease.token),
        "lease token in the log: {warn}"
    );

    // The next grant shows up on the page, fenced higher.
    let again = rt.block_on(take(
        &mut c,
        None,
        HELD,
        30_000,
        "host-8",
        &[],
        pb::LockMode::Exclusive,
    ));
    assert!(again.fencing_token > lease.fencing_token);
    page.say("reacquired");
    let acquired = page.passed("acquired", Duration::from_secs(10));
    assert_eq!(acquired, format!("fence={}", again.fencing_token));
    page.finish();
}

const OPS: &str = "ops-dashboard-admin-token-6b5a4f3e";
const USER: &str = "team-a-dashboard-token-0c1d2e3f";

#[test]
fn dashboard_without_admin_grant_shows_no_button() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("auth.toml");
    std::fs::write(
        &file,
        format!(
            "[[tenant]]\nname = \"ops\"\nprefixes = [\"\"]\ntokens = [\"{OPS}\"]\nadmin = true\n\n\
             [[tenant]]\nname = \"team-a\"\nprefixes = [\"team-a/\"]\ntokens = [\"{USER}\"]\n"
        ),
    )
    .expect("write auth file");
    let server = ServerProcess::start(&["--ui", "--auth-file", &file.to_string_lossy()]);
    let rt = runtime();
    let key = "team-a/nightly";
    let _lease = rt.block_on(async {
        let mut c = LockServiceClient::connect(server.endpoint())
            .await
            .expect("connect");
        take(
            &mut c,
            Some(USER),
            key,
            60_000,
            "team-a-worker",
            &[],
            pb::LockMode::Exclusive,
        )
        .await
    });
    let mut page = Page::open(
        "scoped",
        &server,
        "scoped",
        &[
            ("USER_TOKEN", USER.into()),
            ("ADMIN_TOKEN", OPS.into()),
            ("HELD_KEY", key.into()),
        ],
    );
    page.passed("no-token", Duration::from_secs(60));
    page.passed("no-admin", Duration::from_secs(30));
    page.passed("admin", Duration::from_secs(30));
    page.finish();
    let logs = server.output.all().join("\n");
    assert!(
        !logs.contains(USER) && !logs.contains(OPS),
        "a bearer token reached the log"
    );
}

#[test]
fn dashboard_renders_a_thousand_locks_at_once() {
    const LOCKS: usize = 1000;
    let server = ServerProcess::start(&["--ui", "--admin"]);
    let rt = runtime();
    rt.block_on(async {
        let c = LockServiceClient::connect(server.endpoint())
            .await
            .expect("connect");
        let mut tasks = Vec::new();
        for worker in 0..8 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                for i in (worker..LOCKS).step_by(8) {
                    let meta = [("job", "batch"), ("shard", "7")];
                    let owner = format!("worker-{}", i % 37);
                    take(
                        &mut c,
                        None,
                        &format!("load/{i:04}"),
                        300_000,
                        &owner,
                        &meta,
                        pb::LockMode::Exclusive,
                    )
                    .await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("acquirer");
        }
    });
    let mut page = Page::open(
        "thousand",
        &server,
        "thousand",
        &[("LOCKS", LOCKS.to_string())],
    );
    let figures = page.passed("thousand", Duration::from_secs(60));
    page.finish();
    eprintln!("{LOCKS} locks: {figures}");
    let first: u64 = figures
        .split_whitespace()
        .find_map(|w| w.strip_prefix("first_list_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no first_list_ms in {figures:?}"));
    // The page's own clock, from navigation to the list on screen. The
    // bound is wide (a loaded CI machine); it catches a render that went
    // per-row quadratic, not a few milliseconds.
    assert!(first < 5_000, "{LOCKS} locks took {first} ms to show");
}

/// One HTTP/1.1 request; the status line and headers (lower-cased names),
/// and the body.
fn http(addr: &str, method: &str, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, raw[split + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

#[test]
fn ui_is_served_only_with_the_flag() {
    let off = ServerProcess::start(&["--admin"]);
    assert_eq!(http(&off.addr, "GET", "/ui/").0, 404);
    drop(off);

    let on = ServerProcess::start(&["--ui"]);
    let (status, headers, _) = http(&on.addr, "GET", "/ui");
    assert_eq!(status, 308);
    assert_eq!(header(&headers, "location"), "/ui/");
    for (path, media) in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/index.html", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
    ] {
        let (status, headers, body) = http(&on.addr, "GET", path);
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), media, "{path}");
        assert_eq!(header(&headers, "cache-control"), "no-cache", "{path}");
        assert!(!header(&headers, "etag").is_empty(), "{path}");
        assert!(
            header(&headers, "content-security-policy").contains("connect-src 'self'"),
            "{path}"
        );
        assert!(!body.is_empty(), "{path}");
    }
    let (_, _, page) = http(&on.addr, "GET", "/ui/");
    let page = String::from_utf8_lossy(&page);
    // Nothing from anywhere else.
    assert!(!page.contains("http://") && !page.contains("https://"));
    assert_eq!(http(&on.addr, "GET", "/ui/missing.js").0, 404);
    assert_eq!(http(&on.addr, "GET", "/ui/../Cargo.toml").0, 404);
    assert_eq!(http(&on.addr, "POST", "/ui/").0, 405);
    // The Connect routes are untouched beside it.
    assert_eq!(http(&on.addr, "GET", "/healthz").0, 200);
}
