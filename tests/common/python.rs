//! Runs the Python client (`clients/python/`) from tests: its stubs are
//! generated once per test binary by the repository's own
//! `clients/python/generate.py`, so they never drift from the proto.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::Receiver;

use super::spawn_tied;

pub const INSTALL_HINT: &str = "the Python client tests need python3 with grpcio and grpcio-tools: \
     python3 -m pip install -r clients/python/requirements.txt (./test.sh installs them)";

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The stubs, generated once per test process into cargo's scratch
/// directory for integration tests (under `target/`, nothing left in
/// /tmp; one directory per process, so concurrent runs never read each
/// other's half-written files).
pub fn python_stubs() -> &'static Path {
    static STUBS: OnceLock<PathBuf> = OnceLock::new();
    STUBS.get_or_init(|| {
        let probe = Command::new("python3")
            .args(["-c", "import grpc, grpc_tools"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}); {INSTALL_HINT}"));
        assert!(
            probe.status.success(),
            "{INSTALL_HINT}\n{}",
            String::from_utf8_lossy(&probe.stderr)
        );
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("python-stubs-{}", std::process::id()));
        let out = Command::new("python3")
            .arg(repo().join("clients/python/generate.py"))
            .arg("--out")
            .arg(&dir)
            .output()
            .expect("run generate.py");
        assert!(
            out.status.success(),
            "generate.py failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dir.join("leasehold/v1/lock_pb2_grpc.py").is_file());
        dir
    })
}

/// `python3` in the repository with the stubs and the client importable.
pub fn python_command() -> Command {
    let mut cmd = Command::new("python3");
    cmd.current_dir(repo())
        .env("LEASEHOLD_PY_STUBS", python_stubs())
        .env("PYTHONPATH", repo().join("clients/python"))
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Runs a Python snippet with the client importable; its stdout lines
/// arrive on the returned channel.
pub fn python(code: &str, args: &[&str]) -> (Child, Receiver<String>) {
    let mut cmd = python_command();
    cmd.args(["-c", code]).args(args).stdout(Stdio::piped());
    let mut child = spawn_tied(cmd);
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}
