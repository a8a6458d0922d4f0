//! Processes that `leasehold bench --spawn` starts on free loopback ports:
//! redis-server, Leasehold servers and the gRPC floor. Each is killed when
//! its handle drops.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A child process the bench started, and the address it listens on.
pub struct Spawned {
    child: Child,
    /// Its process id, for /proc readings.
    pub pid: u32,
    /// `127.0.0.1:port`.
    pub addr: String,
    /// A directory of its own, removed when it is killed.
    pub cleanup: Option<std::path::PathBuf>,
}

impl Spawned {
    /// `http://addr`, for gRPC clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILLs it now.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
        if let Some(dir) = self.cleanup.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A port nothing listens on now.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Starts `cmd`, waits (bounded) for output lines containing each of
/// `needles` in turn on stdout or stderr, keeps draining both, and returns
/// the process and the line of the first needle.
async fn start(mut cmd: Command, needles: &[&str], what: &str) -> Result<(Child, String), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let out = child
        .stdout
        .take()
        .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    let err = child
        .stderr
        .take()
        .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    for reader in [out, err].into_iter().flatten() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        let mut first = None;
        let mut next = needles.iter().peekable();
        while let Some(line) = rx.recv().await {
            if next.peek().is_some_and(|needle| line.contains(*needle)) {
                next.next();
                first.get_or_insert(line);
                if next.peek().is_none() {
                    return first;
                }
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => {
            // Keep reading so the child never blocks on a full pipe.
            tokio::spawn(async move { while rx.recv().await.is_some() {} });
            Ok((child, line))
        }
        _ => Err(format!(
            "{what} did not start (no {needles:?} lines within 20 s)"
        )),
    }
}

/// Starts `cmd` and waits (bounded) for its `needles` lines; its address
/// is the caller's to fill in.
pub async fn process(cmd: Command, needles: &[&str], what: &str) -> Result<Spawned, String> {
    let (child, _) = start(cmd, needles, what).await?;
    let pid = child.id().unwrap_or(0);
    Ok(Spawned {
        child,
        pid,
        addr: String::new(),
        cleanup: None,
    })
}

/// A non-persistent redis-server on a free port.
pub async fn redis_server() -> Result<Spawned, String> {
    redis(&[], "Ready to accept connections", "redis-server").await
}

/// A replica of the redis-server at `primary`, once in sync.
pub async fn redis_replica(primary: &str) -> Result<Spawned, String> {
    let (host, port) = primary
        .rsplit_once(':')
        .ok_or_else(|| format!("not host:port: {primary}"))?;
    redis(
        &["--replicaof", host, port],
        "MASTER <-> REPLICA sync: Finished with success",
        "a redis-server replica",
    )
    .await
}

async fn redis(extra: &[&str], ready: &str, what: &str) -> Result<Spawned, String> {
    let port = free_port()?;
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
        "",
        // Replicas sync at once instead of 5 s after they attach.
        "--repl-diskless-sync-delay",
        "0",
        // Nothing read from or written to the working directory.
        "--repl-diskless-load",
        "swapdb",
        "--dbfilename",
        &format!("leasehold-bench-{port}.rdb"),
    ])
    .args(extra);
    let (child, _) = start(cmd, &[ready], what).await?;
    let pid = child.id().unwrap_or(0);
    Ok(Spawned {
        child,
        pid,
        addr: format!("127.0.0.1:{port}"),
        cleanup: None,
    })
}

fn addr_of(line: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .map(|a| a.trim_matches('"').to_string())
}

/// This binary with `args`, listening on 127.0.0.1:0; waits for its
/// `listening addr=...` line and then the other `ready` lines.
async fn this_binary(args: &[String], ready: &[&str], what: &str) -> Result<Spawned, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("LEASEHOLD_LOG", "info")
        .env("LEASEHOLD_LOG_FORMAT", "text");
    let mut needles = vec!["listening"];
    needles.extend_from_slice(ready);
    let (child, line) = start(cmd, &needles, what).await?;
    let addr = addr_of(&line).ok_or_else(|| format!("no address in {line:?}"))?;
    let pid = child.id().unwrap_or(0);
    Ok(Spawned {
        child,
        pid,
        addr,
        cleanup: None,
    })
}

/// A Leasehold server on the memory store (`redis_url = None`) or Redis.
pub async fn leasehold(redis_url: Option<&str>, extra: &[String]) -> Result<Spawned, String> {
    let mut args: Vec<String> = vec!["serve".into(), "--listen".into(), "127.0.0.1:0".into()];
    if let Some(url) = redis_url {
        args.push("--redis-url".into());
        args.push(url.into());
    }
    args.extend(extra.iter().cloned());
    // Ready as the tests mean it: listening, and its store answers.
    this_binary(&args, &["store reachable: SERVING"], "leasehold serve").await
}

/// The gRPC floor server.
pub async fn floor() -> Result<Spawned, String> {
    this_binary(
        &[
            "bench-floor".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        &[],
        "the floor server",
    )
    .await
}

/// A process that holds `key` over a KeepAlive stream until killed.
pub async fn crash_holder(endpoint: &str, key: &str) -> Result<Spawned, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench-crash-holder", "--endpoint", endpoint, "--key", key]);
    process(cmd, &["HOLDING"], "the crash holder").await
}
