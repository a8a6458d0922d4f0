//! Client *processes* for the scenarios that kill or freeze a client: this
//! test binary run again as `faults client_process --exact --ignored` with
//! `LEASEHOLD_FAULT_CLIENT` set, holding locks with the real SDK. It reports
//! to a [`Hub`] in the test over one TCP connection on 127.0.0.1, one line
//! per event; its writes go to the test's [`Resource`] through the hub, and
//! it waits for the test's `GO` where a scenario needs a fixed point.
//!
//! Lines from the client: `HELLO name`, `GRANT key fence took_us`,
//! `WRITE key fence` (answered `OK` or `STALE`), `READY`, `HOLDING`,
//! `LOST key fence reason`, `RELEASED key fence bool`, `ERROR text`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold::client::Client;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::checker::{End, History, Resource};
use crate::common::{Output, spawn_tied};

/// The environment variable that turns the ignored `client_process` test
/// into a client.
pub const ENV: &str = "LEASEHOLD_FAULT_CLIENT";

/// Where client processes report.
pub struct Hub {
    pub addr: SocketAddr,
    arrivals: mpsc::UnboundedReceiver<Remote>,
    _task: tokio::task::JoinHandle<()>,
}

/// One connected client process, as the test sees it.
pub struct Remote {
    pub name: String,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    to_client: mpsc::UnboundedSender<String>,
}

impl Hub {
    pub async fn start(history: Arc<History>, resource: Arc<Resource>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
        let addr = listener.local_addr().expect("hub addr");
        let (tx, arrivals) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(serve(stream, history.clone(), resource.clone(), tx.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            arrivals,
            _task: task,
        }
    }

    /// The next client process to say HELLO.
    pub async fn next(&mut self, within: Duration) -> Remote {
        tokio::time::timeout(within, self.arrivals.recv())
            .await
            .expect("a client process connected in time")
            .expect("hub running")
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self._task.abort();
    }
}

impl Remote {
    /// Waits for the next line starting with `prefix` (skipping others)
    /// and returns it with when it arrived.
    pub async fn expect(&mut self, prefix: &str, within: Duration) -> (Instant, String) {
        let end = tokio::time::Instant::now() + within;
        loop {
            let line = tokio::time::timeout_at(end, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("{}: no {prefix:?} line within {within:?}", self.name))
                .unwrap_or_else(|| panic!("{}: disconnected before {prefix:?}", self.name));
            if line.1.starts_with(prefix) {
                return line;
            }
            assert!(
                !line.1.starts_with("ERROR"),
                "{}: {} (waiting for {prefix:?})",
                self.name,
                line.1
            );
        }
    }

    /// Sends one line to the client process.
    pub fn send(&self, line: &str) {
        let _ = self.to_client.send(line.to_string());
    }
}

async fn serve(
    stream: TcpStream,
    history: Arc<History>,
    resource: Arc<Resource>,
    arrivals: mpsc::UnboundedSender<Remote>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Ok(Some(hello)) = lines.next_line().await else {
        return;
    };
    let Some(name) = hello.strip_prefix("HELLO ").map(str::to_string) else {
        return;
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (to_client, mut outbox) = mpsc::unbounded_channel::<String>();
    let _ = arrivals.send(Remote {
        name: name.clone(),
        lines: events_rx,
        to_client: to_client.clone(),
    });
    let writer = tokio::spawn(async move {
        while let Some(line) = outbox.recv().await {
            if write
                .write_all(format!("{line}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    while let Ok(Some(line)) = lines.next_line().await {
        let now = Instant::now();
        let words: Vec<&str> = line.split_whitespace().collect();
        let fence = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
        match (words.first().copied(), words.get(1), fence(2)) {
            (Some("GRANT"), Some(key), Some(f)) => {
                let took = Duration::from_micros(fence(3).unwrap_or(0));
                history.grant(&name, key, f, now.checked_sub(took).unwrap_or(now), now);
            }
            (Some("WRITE"), Some(key), Some(f)) => {
                let ok = resource.write(&name, key, f);
                let _ = to_client.send(if ok { "OK" } else { "STALE" }.into());
            }
            (Some("LOST"), Some(key), Some(f)) => history.end(&name, key, f, now, End::Lost),
            _ => {}
        }
        let _ = events_tx.send((now, line));
    }
    writer.abort();
}

/// What a client process does.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    /// `hold`: take every key, say HOLDING, wait to be killed. `elect`:
    /// run for leadership of the first key (`client.elect`, value = name),
    /// say GRANT with the term and HOLDING, wait to be killed. `pause`:
    /// take the first key, write once, say READY, wait for GO, write
    /// again, then wait (bounded) for `lost()` and try to release.
    pub role: String,
    pub hub: SocketAddr,
    pub endpoints: Vec<String>,
    pub keys: Vec<String>,
    pub ttl: Duration,
    /// `hold` with `Some(n)`: each key is taken as one permit of a
    /// semaphore of `n` (SHARED).
    pub shared: Option<u32>,
}

impl Spec {
    fn encode(&self) -> String {
        format!(
            "name={} role={} hub={} endpoints={} keys={} ttl_ms={} shared={}",
            self.name,
            self.role,
            self.hub,
            self.endpoints.join(","),
            self.keys.join(","),
            self.ttl.as_millis(),
            self.shared.map_or("-".to_string(), |n| n.to_string())
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let field = |name: &str| {
            s.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
        };
        Some(Self {
            name: field("name")?.into(),
            role: field("role")?.into(),
            hub: field("hub")?.parse().ok()?,
            endpoints: field("endpoints")?.split(',').map(String::from).collect(),
            keys: field("keys")?.split(',').map(String::from).collect(),
            ttl: Duration::from_millis(field("ttl_ms")?.parse().ok()?),
            shared: field("shared").and_then(|n| n.parse().ok()),
        })
    }

    /// Starts the client process (SIGKILLed if the test dies).
    pub fn spawn(&self) -> (Child, Output) {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([
            "client_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, self.encode())
        .env("LEASEHOLD_LOG", "warn");
        let mut child = spawn_tied(cmd);
        let output = Output::capture(&mut child);
        (child, output)
    }
}

/// The body of a client process; returns when its role is done.
pub async fn run_client(spec: &str) -> Result<(), String> {
    let spec = Spec::decode(spec).ok_or_else(|| format!("bad {ENV}: {spec}"))?;
    let stream = TcpStream::connect(spec.hub)
        .await
        .map_err(|e| e.to_string())?;
    let (read, mut write) = stream.into_split();
    let mut replies = BufReader::new(read).lines();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let sender = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if write
                .write_all(format!("{line}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let say = |line: String| {
        let _ = tx.send(line);
    };
    say(format!("HELLO {}", spec.name));
    let client = Client::builder()
        .endpoints(spec.endpoints.clone())
        .retry_for(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    if spec.role == "elect" {
        let key = spec.keys.first().ok_or("no key")?;
        let sent = Instant::now();
        let leadership = client
            .elect(key.as_str())
            .value(spec.name.as_str())
            .owner(spec.name.as_str())
            .ttl(spec.ttl)
            .wait(Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
        say(format!(
            "GRANT {key} {} {}",
            leadership.term(),
            sent.elapsed().as_micros()
        ));
        say("HOLDING".into());
        // Killed long before this; a lost leadership says so first.
        if let Ok(reason) = tokio::time::timeout(Duration::from_secs(120), leadership.lost()).await
        {
            say(format!("LOST {key} {} {reason:?}", leadership.term()));
        }
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), sender).await;
        return Ok(());
    }
    let mut guards = Vec::new();
    for key in &spec.keys {
        let sent = Instant::now();
        let mut builder = client
            .lock(key.as_str())
            .ttl(spec.ttl)
            .wait(Duration::from_secs(20))
            .owner(spec.name.as_str());
        if let Some(n) = spec.shared {
            builder = builder.shared(n);
        }
        let guard = builder.await.map_err(|e| e.to_string())?;
        say(format!(
            "GRANT {key} {} {}",
            guard.fencing_token(),
            sent.elapsed().as_micros()
        ));
        guards.push(guard);
        if spec.role == "pause" {
            break;
        }
    }
    match spec.role.as_str() {
        "hold" => {
            say("HOLDING".into());
            // Killed long before this.
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
        "pause" => {
            let guard = guards.pop().ok_or("no lock")?;
            let (key, fence) = (guard.key().to_string(), guard.fencing_token());
            let write = async |replies: &mut tokio::io::Lines<_>| {
                say(format!("WRITE {key} {fence}"));
                read_line(replies).await
            };
            let first = write(&mut replies).await?;
            if first != "OK" {
                return Err(format!("first write answered {first}"));
            }
            say("READY".into());
            // The test freezes this process here, past the TTL, and
            // wakes it; the write that follows was already on its way.
            let go = read_line(&mut replies).await?;
            if go != "GO" {
                return Err(format!("expected GO, got {go}"));
            }
            let late = write(&mut replies).await?;
            say(format!("LATE {late}"));
            match tokio::time::timeout(Duration::from_secs(10), guard.lost()).await {
                Ok(reason) => say(format!("LOST {key} {fence} {reason:?}")),
                Err(_) => say("ERROR lost() did not fire within 10 s".into()),
            }
            let released = guard.release().await.map_err(|e| e.to_string())?;
            say(format!("RELEASED {key} {fence} {released}"));
        }
        other => return Err(format!("unknown role {other}")),
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), sender).await;
    Ok(())
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> Result<String, String> {
    tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .map_err(|_| "no reply from the hub within 60 s".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the hub closed the connection".to_string())
}
