//! The deployment files, checked statically (no cluster or Docker engine
//! runs here): the Kubernetes manifests parse, the gRPC probes ask the
//! standard health service on the port the server listens on, the Service
//! and PodDisruptionBudget select the Deployment's pods, the termination
//! grace covers the server's shutdown grace, every `LEASEHOLD_*` variable set
//! is one the binary reads; and the Dockerfile is multi-stage and runs as the
//! same non-root user the Deployment asks for.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_norway::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document under deploy/kubernetes, by file.
fn manifests() -> BTreeMap<String, Vec<Value>> {
    let dir = repo().join("deploy/kubernetes");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let docs = serde_norway::Deserializer::from_str(&text)
            .map(|doc| {
                <Value as serde::Deserialize>::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            })
            .filter(|v| !v.is_null())
            .collect();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        files.insert(name, docs);
    }
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// The one object of `kind` (panics if there is not exactly one).
#[track_caller]
fn only<'a>(all: &'a BTreeMap<String, Vec<Value>>, kind: &str) -> &'a Value {
    let found: Vec<&Value> = all
        .values()
        .flatten()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

fn kinds<'a>(all: &'a BTreeMap<String, Vec<Value>>, kind: &'a str) -> Vec<&'a Value> {
    all.values()
        .flatten()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

#[track_caller]
fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

#[track_caller]
fn u64_of(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what}: expected a number, got {v:?}"))
}

/// The leasehold container of the Deployment.
fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    containers
        .iter()
        .find(|c| c["name"].as_str() == Some("leasehold"))
        .expect("a container named leasehold")
}

/// `name -> value` of the container's plain env entries.
fn env_values(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| (str_of(&e["name"], "env name").to_string(), e.clone()))
        .collect()
}

/// The `LEASEHOLD_*` variables the binary reads, from its clap `env = "..."`.
fn known_env_vars() -> Vec<String> {
    let mut vars = Vec::new();
    for file in ["src/cli/mod.rs", "src/cli/serve.rs"] {
        let text = std::fs::read_to_string(repo().join(file)).expect("read cli source");
        for piece in text.split("env = \"").skip(1) {
            if let Some((name, _)) = piece.split_once('"') {
                vars.push(name.to_string());
            }
        }
    }
    assert!(vars.iter().any(|v| v == "LEASEHOLD_LISTEN"), "{vars:?}");
    vars
}

#[test]
fn probes_point_at_the_port_the_server_listens_on() {
    let all = manifests();
    let deployment = only(&all, "Deployment");
    let c = container(deployment);

    let ports = c["ports"].as_sequence().expect("ports");
    let grpc = ports
        .iter()
        .find(|p| p["name"].as_str() == Some("grpc"))
        .expect("a container port named grpc");
    let port = u64_of(&grpc["containerPort"], "containerPort");

    // Where the server listens: LEASEHOLD_LISTEN, or a --listen argument.
    let env = env_values(c);
    let listen = env
        .get("LEASEHOLD_LISTEN")
        .map(|e| str_of(&e["value"], "LEASEHOLD_LISTEN").to_string())
        .expect("LEASEHOLD_LISTEN is set (the default 127.0.0.1 is unreachable in a pod)");
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let listen = args
        .iter()
        .position(|a| *a == "--listen")
        .map(|i| args[i + 1].to_string())
        .unwrap_or(listen);
    let listen: SocketAddr = listen.parse().expect("listen address");
    assert!(
        listen.ip().is_unspecified(),
        "a pod's server must listen on all interfaces: {listen}"
    );
    assert_eq!(
        u64::from(listen.port()),
        port,
        "listen port = containerPort"
    );

    // Native gRPC probes on the standard health service, on that port.
    let ready = &c["readinessProbe"]["grpc"];
    assert_eq!(u64_of(&ready["port"], "readiness port"), port);
    assert_eq!(
        str_of(&ready["service"], "readiness service"),
        "leasehold.v1.LockService"
    );
    let live = &c["livenessProbe"]["grpc"];
    assert_eq!(u64_of(&live["port"], "liveness port"), port);
    assert_eq!(
        live["service"].as_str().unwrap_or(""),
        "",
        "liveness asks the server"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        let p = &c[probe];
        assert!(
            p.get("httpGet").is_none() && p.get("exec").is_none() && p.get("tcpSocket").is_none()
        );
    }
}

#[test]
fn deployment_is_configured_for_a_safe_shutdown_and_runs_as_non_root() {
    let all = manifests();
    let deployment = only(&all, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(deployment);
    let env = env_values(c);

    // Every LEASEHOLD_* variable set is one the binary reads.
    let known = known_env_vars();
    for name in env.keys().filter(|n| n.starts_with("LEASEHOLD_")) {
        assert!(
            known.contains(name),
            "{name} is not a flag of leasehold: {known:?}"
        );
    }
    // The Redis URL (with its password) comes from a Secret.
    let redis = &env["LEASEHOLD_REDIS_URL"]["valueFrom"]["secretKeyRef"];
    assert!(
        redis["name"].is_string() && redis["key"].is_string(),
        "{redis:?}"
    );

    // Kubernetes waits for preStop plus the server's own shutdown grace.
    let grace = env
        .get("LEASEHOLD_SHUTDOWN_GRACE")
        .map(|e| humantime::parse_duration(str_of(&e["value"], "grace")).expect("duration"))
        .unwrap_or(Duration::from_secs(10));
    let pre_stop: Vec<&str> = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .expect("a preStop command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(pre_stop[0], "sleep", "{pre_stop:?}");
    let pre_stop = Duration::from_secs(pre_stop[1].parse().expect("sleep seconds"));
    let termination = Duration::from_secs(u64_of(
        &pod["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    ));
    assert!(
        termination > pre_stop + grace,
        "terminationGracePeriodSeconds {termination:?} must exceed preStop {pre_stop:?} + shutdown grace {grace:?}"
    );

    // Resources and a locked-down security context.
    for r in ["cpu", "memory"] {
        assert!(
            !c["resources"]["requests"][r].is_null(),
            "resources.requests.{r}"
        );
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true));
    let uid = u64_of(&pod["securityContext"]["runAsUser"], "runAsUser");
    assert_ne!(uid, 0);
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"],
        Value::Bool(false)
    );

    // The image's user is the same non-root uid.
    let docker = dockerfile_stages();
    let user = docker
        .last()
        .unwrap()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert_eq!(user.split(':').next().unwrap().trim(), uid.to_string());
}

#[test]
fn service_and_disruption_budget_select_the_pods() {
    let all = manifests();
    let deployment = only(&all, "Deployment");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let replicas = u64_of(&deployment["spec"]["replicas"], "replicas");
    assert!(replicas >= 2, "several servers, so one can stop at a time");
    let port_names: Vec<&str> = container(deployment)["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let matches = |selector: &Value| {
        selector
            .as_mapping()
            .expect("selector")
            .iter()
            .all(|(k, v)| labels.get(k.as_str().unwrap()) == Some(v))
    };

    let services = kinds(&all, "Service");
    assert!(!services.is_empty());
    for service in services {
        assert!(matches(&service["spec"]["selector"]), "{service:?}");
        for port in service["spec"]["ports"].as_sequence().expect("ports") {
            let target = str_of(&port["targetPort"], "targetPort");
            assert!(
                port_names.contains(&target),
                "targetPort {target} is a container port name"
            );
        }
    }

    let pdb = only(&all, "PodDisruptionBudget");
    assert!(matches(&pdb["spec"]["selector"]["matchLabels"]));
    let max_unavailable = pdb["spec"]["maxUnavailable"].as_u64();
    let min_available = pdb["spec"]["minAvailable"].as_u64();
    assert!(
        max_unavailable.is_some_and(|n| n >= 1 && n < replicas)
            || min_available.is_some_and(|n| n >= 1 && n < replicas),
        "the budget lets one pod go at a time and keeps the rest: {pdb:?}"
    );

    // kustomization lists every manifest.
    let kustomization = only(&all, "Kustomization");
    let mut listed: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    listed.sort();
    let mut files: Vec<&str> = all
        .keys()
        .map(String::as_str)
        .filter(|f| *f != "kustomization.yaml")
        .collect();
    files.sort();
    assert_eq!(listed, files);
}

/// The Dockerfile's stages, each as its instruction lines (continuations
/// joined, comments dropped).
fn dockerfile_stages() -> Vec<Vec<String>> {
    let path: PathBuf = repo().join("deploy/Dockerfile");
    let text = std::fs::read_to_string(&path).expect("deploy/Dockerfile");
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<String>> = Vec::new();
    for line in lines {
        if line.starts_with("FROM ") {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push(line);
        }
    }
    stages
}

#[test]
fn dockerfile_is_multi_stage_and_runs_as_non_root() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let builder = stages[0][0].split_whitespace().collect::<Vec<_>>();
    assert!(
        builder[1].starts_with("rust:"),
        "builds with a Rust image: {builder:?}"
    );
    let builder_name = builder.last().unwrap();
    assert!(
        stages[0]
            .iter()
            .any(|l| l.contains("cargo build --release --locked"))
    );

    let runtime = stages.last().unwrap();
    assert!(
        !runtime[0].starts_with("FROM rust:"),
        "the runtime image carries no toolchain"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with(&format!("COPY --from={builder_name} "))),
        "the runtime copies the binary from the builder"
    );
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the runtime stage");
    let uid = user.split(':').next().unwrap().trim();
    assert!(
        uid != "0" && uid != "root" && uid.parse::<u32>().is_ok(),
        "a numeric non-root USER: {user}"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT [\"/usr/local/bin/leasehold\"]"))
    );

    // The port the image listens on is the one it exposes and the one the
    // Deployment probes.
    let listen = runtime
        .iter()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("LEASEHOLD_LISTEN="))
        })
        .expect("ENV LEASEHOLD_LISTEN")
        .parse::<SocketAddr>()
        .expect("listen address");
    let exposed: u16 = runtime
        .iter()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE")
        .trim()
        .parse()
        .expect("port");
    assert_eq!(listen.port(), exposed);
    let all = manifests();
    let c = container(only(&all, "Deployment"));
    let probe_port = u64_of(&c["readinessProbe"]["grpc"]["port"], "probe port");
    assert_eq!(u64::from(exposed), probe_port);
}
