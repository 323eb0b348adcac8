//! The deployment files under deploy/ (Kubernetes manifests, Compose stack, Dockerfile, systemd
//! unit): every YAML document parses, every file they mount or build from exists in the repo,
//! names they refer to (ConfigMaps, Secrets, volumes, ports) are defined, the pgmux configs
//! they carry pass `pgmux --check`, and ports and paths follow the conventions of
//! config/pgmux.toml: clients on 6432, /metrics, /health and /ready on 9930, the config at
//! /etc/pgmux/pgmux.toml. Docker and Kubernetes are not available here; this is the check.

use serde::Deserialize;
use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const PG_PORT: u64 = 6432;
const METRICS_PORT: u64 = 9930;
const CONFIG_PATH: &str = "/etc/pgmux/pgmux.toml";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v:?}"))
}

/// `a.b.c` lookup; Null when absent.
fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, key)
}

/// One key, which may itself contain dots (`pgmux.toml`, `prometheus.io/port`).
fn key<'a>(v: &'a Value, k: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    v.get(k).unwrap_or(&NULL)
}

fn key_str<'a>(v: &'a Value, k: &str) -> &'a str {
    key(v, k)
        .as_str()
        .unwrap_or_else(|| panic!("{k} is not a string in {v:?}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn must_exist(rel: &str) {
    let rel = rel.trim_start_matches("./");
    assert!(repo().join(rel).exists(), "{rel} is referenced but missing");
}

/// Normalises `a/./b/../c` without touching the file system.
fn normalise(p: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c.as_os_str().to_str().unwrap() {
            "." => {}
            ".." => {
                out.pop();
            }
            other => out.push(other.to_string()),
        }
    }
    out.join("/")
}

/// `pgmux --check` on a config text.
fn check_config(name: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgmux.toml");
    std::fs::write(&path, text).unwrap();
    let (ok, err) = pgmux_check(&path);
    assert!(ok, "{name}: pgmux --check failed:\n{err}\n{text}");
}

fn pgmux_check(path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .arg("--config")
        .arg(path)
        .arg("--check")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The ports, paths and addresses every containerised pgmux config must agree on.
fn check_conventions(name: &str, text: &str, listen_addr: &str) {
    let t: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let g = t["pgmux"].as_table().expect("[pgmux]");
    assert_eq!(
        g["listen_port"].as_integer(),
        Some(PG_PORT as i64),
        "{name}"
    );
    assert_eq!(g["listen_addr"].as_str(), Some(listen_addr), "{name}");
    assert_eq!(
        g["metrics_listen_port"].as_integer(),
        Some(METRICS_PORT as i64),
        "{name}"
    );
    // probes and scrapes come from outside the container
    assert_eq!(g["metrics_listen_addr"].as_str(), Some("0.0.0.0"), "{name}");
}

#[test]
fn example_config_keeps_the_ports_the_deploy_files_assume() {
    let t: toml::Table = toml::from_str(&read("config/pgmux.toml")).unwrap();
    assert_eq!(t["pgmux"]["listen_port"].as_integer(), Some(PG_PORT as i64));
    if let Some(p) = t["pgmux"].get("metrics_listen_port") {
        assert_eq!(p.as_integer(), Some(METRICS_PORT as i64));
    }
}

struct Manifests {
    docs: Vec<Value>,
}

impl Manifests {
    fn load(rel: &str) -> Manifests {
        let docs = docs(rel);
        for d in &docs {
            for key in ["apiVersion", "kind", "metadata.name"] {
                assert!(get(d, key).is_string(), "{rel}: a document lacks {key}");
            }
        }
        Manifests { docs }
    }

    fn find(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| s(d, "kind") == kind && s(d, "metadata.name") == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| s(d, "kind") == kind).collect()
    }

    /// A Secret's key, from data or stringData.
    fn secret_has(&self, name: &str, k: &str) -> bool {
        let sec = self.find("Secret", name);
        !key(get(sec, "stringData"), k).is_null() || !key(get(sec, "data"), k).is_null()
    }

    /// The pgmux config the init container builds: the ConfigMap's pgmux.toml followed by the
    /// Secret's users.toml.
    fn rendered_config(&self, pod: &Value) -> String {
        let volumes = seq(get(pod, "volumes"));
        let source = |kind: &str| {
            volumes
                .iter()
                .find_map(|v| get(v, kind).as_mapping().map(|_| get(v, kind)))
                .unwrap_or_else(|| panic!("no {kind} volume"))
        };
        let cm = self.find("ConfigMap", s(source("configMap"), "name"));
        let sec_name = s(source("secret"), "secretName");
        let sec = self.find("Secret", sec_name);
        format!(
            "{}{}",
            key_str(get(cm, "data"), "pgmux.toml"),
            key_str(get(sec, "stringData"), "users.toml")
        )
    }
}

/// Checks one pod template: volumes and mounts agree, ConfigMaps and Secrets exist, the pgmux
/// container has the conventional ports, probes and config path. Returns the pgmux container.
fn check_pod<'a>(m: &Manifests, pod: &'a Value, sidecar: bool) -> &'a Value {
    let volumes: BTreeSet<&str> = seq(get(pod, "volumes"))
        .iter()
        .map(|v| s(v, "name"))
        .collect();
    for v in seq(get(pod, "volumes")) {
        if let Some(name) = get(v, "configMap.name").as_str() {
            m.find("ConfigMap", name);
        }
        if let Some(name) = get(v, "secret.secretName").as_str() {
            for item in seq(get(v, "secret.items")) {
                assert!(m.secret_has(name, s(item, "key")), "{name} lacks its item");
            }
        }
    }
    let inits = seq(get(pod, "initContainers"));
    let mains = seq(get(pod, "containers"));
    for c in inits.iter().chain(mains) {
        for mount in seq(get(c, "volumeMounts")) {
            assert!(
                volumes.contains(s(mount, "name")),
                "mount {} has no volume",
                s(mount, "name")
            );
        }
        for env in seq(get(c, "env")) {
            let r = get(env, "valueFrom.secretKeyRef");
            if r.is_mapping() {
                assert!(m.secret_has(s(r, "name"), s(r, "key")));
            }
        }
    }
    let pgmux = inits
        .iter()
        .chain(mains)
        .find(|c| s(c, "name") == "pgmux")
        .expect("a container named pgmux");
    if sidecar {
        assert!(
            inits.iter().any(|c| s(c, "name") == "pgmux"),
            "the sidecar is an init container"
        );
        assert_eq!(s(pgmux, "restartPolicy"), "Always", "native sidecar");
        let app = &mains[0];
        let env = |k: &str| {
            seq(get(app, "env"))
                .iter()
                .find(|e| s(e, "name") == k)
                .map(|e| get(e, "value").as_str().unwrap_or("").to_string())
        };
        assert_eq!(env("PGHOST").as_deref(), Some("127.0.0.1"));
        assert_eq!(env("PGPORT"), Some(PG_PORT.to_string()));
    }
    // ports by name
    let port = |name: &str| {
        seq(get(pgmux, "ports"))
            .iter()
            .find(|p| s(p, "name") == name)
            .and_then(|p| get(p, "containerPort").as_u64())
            .unwrap_or_else(|| panic!("no port named {name}"))
    };
    assert_eq!(port("postgres"), PG_PORT);
    assert_eq!(port("metrics"), METRICS_PORT);
    let resolve = |p: &Value| match p {
        Value::String(name) => port(name),
        other => other.as_u64().expect("a port"),
    };
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/health")] {
        let h = get(pgmux, &format!("{probe}.httpGet"));
        assert_eq!(s(h, "path"), path, "{probe}");
        assert_eq!(resolve(get(h, "port")), METRICS_PORT, "{probe}");
    }
    assert!(
        get(pgmux, "lifecycle.preStop.exec.command").is_sequence(),
        "preStop hook"
    );
    let args: Vec<&str> = seq(get(pgmux, "args"))
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["--config", CONFIG_PATH]);
    let mounted = seq(get(pgmux, "volumeMounts"))
        .iter()
        .any(|v| s(v, "mountPath") == Path::new(CONFIG_PATH).parent().unwrap().to_str().unwrap());
    assert!(mounted, "pgmux sees its config at {CONFIG_PATH}");
    // the init container renders the file pgmux reads, and checks it
    let render = inits
        .iter()
        .find(|c| s(c, "name") == "pgmux-config")
        .expect("an init container rendering the config");
    let script: Vec<&str> = seq(get(render, "command"))
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let script = script.join(" ");
    assert!(script.contains(&format!("> {CONFIG_PATH}")), "{script}");
    assert!(script.contains("--check"), "{script}");
    pgmux
}

fn check_annotations(template: &Value) {
    let a = get(template, "metadata.annotations");
    assert_eq!(key_str(a, "prometheus.io/scrape"), "true");
    assert_eq!(key_str(a, "prometheus.io/port"), METRICS_PORT.to_string());
    assert_eq!(key_str(a, "prometheus.io/path"), "/metrics");
}

fn grace_covers_shutdown_timeout(pod: &Value, config: &str) {
    let t: toml::Table = toml::from_str(config).unwrap();
    let shutdown = t["pgmux"]
        .get("shutdown_timeout")
        .and_then(|v| v.as_float())
        .unwrap_or(30.0);
    let grace = get(pod, "terminationGracePeriodSeconds")
        .as_u64()
        .expect("terminationGracePeriodSeconds") as f64;
    assert!(
        grace > shutdown,
        "grace {grace} s <= shutdown_timeout {shutdown} s"
    );
}

#[test]
fn kubernetes_sidecar_manifest() {
    let m = Manifests::load("deploy/kubernetes/sidecar.yaml");
    let dep = m.find("Deployment", "app");
    let template = get(dep, "spec.template");
    let labels = get(template, "metadata.labels");
    for (k, v) in get(dep, "spec.selector.matchLabels").as_mapping().unwrap() {
        assert_eq!(labels.get(k), Some(v), "selector matches the pod labels");
    }
    check_annotations(template);
    let pod = get(template, "spec");
    check_pod(&m, pod, true);
    let config = m.rendered_config(pod);
    check_conventions("sidecar", &config, "127.0.0.1");
    grace_covers_shutdown_timeout(pod, &config);
    check_config("sidecar", &config);
}

#[test]
fn kubernetes_pooler_manifest() {
    let m = Manifests::load("deploy/kubernetes/pooler.yaml");
    let dep = m.find("Deployment", "pgmux-pooler");
    let template = get(dep, "spec.template");
    let labels = get(template, "metadata.labels");
    let selector = get(dep, "spec.selector.matchLabels");
    for (k, v) in selector.as_mapping().unwrap() {
        assert_eq!(labels.get(k), Some(v));
    }
    check_annotations(template);
    let pod = get(template, "spec");
    let pgmux = check_pod(&m, pod, false);
    let config = m.rendered_config(pod);
    check_conventions("pooler", &config, "0.0.0.0");
    grace_covers_shutdown_timeout(pod, &config);
    check_config("pooler", &config);

    let svc = m.find("Service", "pgmux-pooler");
    for (k, v) in get(svc, "spec.selector").as_mapping().unwrap() {
        assert_eq!(labels.get(k), Some(v), "the Service selects the pods");
    }
    let names: BTreeSet<&str> = seq(get(pgmux, "ports"))
        .iter()
        .map(|p| s(p, "name"))
        .collect();
    let svc_ports = seq(get(svc, "spec.ports"));
    assert!(svc_ports
        .iter()
        .any(|p| get(p, "port").as_u64() == Some(PG_PORT)));
    for p in svc_ports {
        let target = get(p, "targetPort");
        match target.as_str() {
            Some(name) => assert!(names.contains(name), "targetPort {name}"),
            None => assert!(target.as_u64().is_some()),
        }
    }
    let pdbs = m.of_kind("PodDisruptionBudget");
    assert_eq!(pdbs.len(), 1);
    assert_eq!(get(pdbs[0], "spec.selector.matchLabels"), selector);
    assert!(
        get(dep, "spec.replicas").as_u64().unwrap() > 1,
        "a shared pooler needs more than one pod to survive a disruption"
    );
    assert_eq!(
        get(dep, "spec.strategy.rollingUpdate.maxUnavailable").as_u64(),
        Some(0)
    );
}

#[test]
fn compose_stack() {
    let rel = "deploy/compose/docker-compose.yml";
    let d = docs(rel);
    assert_eq!(d.len(), 1);
    let c = &d[0];
    let base = Path::new("deploy/compose");
    let services = get(c, "services").as_mapping().expect("services");
    for name in ["primary", "replica", "pgmux", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "service {name}");
    }
    let named_volumes = get(c, "volumes");
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        for v in seq(get(svc, "volumes")) {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            if src.starts_with('.') || src.starts_with('/') {
                must_exist(&normalise(&base.join(src)));
            } else {
                assert!(named_volumes.get(src).is_some(), "{name}: volume {src}");
            }
        }
        for dep in get(svc, "depends_on")
            .as_mapping()
            .map(|m| m.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_else(|| seq(get(svc, "depends_on")).to_vec())
        {
            assert!(services.contains_key(&dep), "{name} depends on {dep:?}");
        }
    }
    let pgmux = get(c, "services.pgmux");
    let context = base.join(s(pgmux, "build.context"));
    let dockerfile = normalise(&context.join(s(pgmux, "build.dockerfile")));
    assert_eq!(dockerfile, "deploy/docker/Dockerfile");
    let ports: Vec<&str> = seq(get(pgmux, "ports"))
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for p in [PG_PORT, METRICS_PORT] {
        assert!(
            ports.iter().any(|x| x.ends_with(&format!(":{p}"))),
            "pgmux publishes {p}"
        );
    }
    let mount = seq(get(pgmux, "volumes"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .find(|v| v.contains(CONFIG_PATH))
        .expect("the config is mounted at /etc/pgmux/pgmux.toml");
    let config_rel = normalise(&base.join(mount.split(':').next().unwrap()));
    let config = read(&config_rel);
    check_conventions(&config_rel, &config, "0.0.0.0");
    check_config(&config_rel, &config);
    // the database host is the primary service
    let t: toml::Table = toml::from_str(&config).unwrap();
    let db = &t["databases"].as_array().unwrap()[0];
    assert_eq!(db["host"].as_str(), Some("primary"));

    let prom = &docs("deploy/compose/prometheus.yml")[0];
    let targets: Vec<&str> = seq(get(&seq(get(prom, "scrape_configs"))[0], "static_configs"))
        .iter()
        .flat_map(|sc| seq(get(sc, "targets")))
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(targets, [format!("pgmux:{METRICS_PORT}")]);
    for f in [
        "deploy/compose/grafana/datasources.yml",
        "deploy/compose/grafana/dashboards.yml",
    ] {
        assert_eq!(get(&docs(f)[0], "apiVersion").as_u64(), Some(1), "{f}");
    }
    let dash = repo().join("deploy/grafana/pgmux.json");
    if dash.exists() {
        let v: serde_json::Value =
            serde_json::from_str(&read("deploy/grafana/pgmux.json")).unwrap();
        assert!(v.get("panels").is_some(), "a Grafana dashboard");
    }
}

#[test]
fn dockerfile() {
    let text = read("deploy/docker/Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    assert!(
        lines.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    assert!(has("EXPOSE 6432 9930"));
    let user = lines.iter().find(|l| l.starts_with("USER ")).expect("USER");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    let health = text
        .split("HEALTHCHECK")
        .nth(1)
        .expect("HEALTHCHECK")
        .split("\nSTOPSIGNAL")
        .next()
        .unwrap();
    assert!(
        health.contains("127.0.0.1/9930") && health.contains("GET /health"),
        "{health}"
    );
    assert!(text.contains(&format!("\"--config\", \"{CONFIG_PATH}\"")));
    // every COPY from the build context exists
    for l in &lines {
        if let Some(rest) = l.strip_prefix("COPY ") {
            if rest.starts_with("--from") {
                continue;
            }
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                must_exist(src);
            }
        }
    }
}

#[test]
fn systemd_unit() {
    let text = read("deploy/systemd/pgmux.service");
    let mut section = String::new();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        keys.push((section.clone(), k.to_string(), v.to_string()));
    }
    let val = |sec: &str, k: &str| {
        keys.iter()
            .find(|(s, key, _)| s == sec && key == k)
            .map(|(_, _, v)| v.as_str())
            .unwrap_or_else(|| panic!("{sec} {k} missing"))
    };
    assert_eq!(
        val("[Unit]", "Description"),
        "pgmux PostgreSQL connection pooler"
    );
    assert!(val("[Unit]", "After").contains("network-online.target"));
    assert_eq!(
        val("[Service]", "ExecStart"),
        format!("/usr/local/bin/pgmux --config {CONFIG_PATH}")
    );
    assert_eq!(val("[Service]", "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(val("[Service]", "Restart"), "on-failure");
    assert_eq!(val("[Service]", "LimitNOFILE"), "65536");
    assert_eq!(val("[Service]", "KillSignal"), "SIGTERM");
    assert_ne!(val("[Service]", "User"), "root");
    let stop: f64 = val("[Service]", "TimeoutStopSec").parse().unwrap();
    let t: toml::Table = toml::from_str(&read("config/pgmux.toml")).unwrap();
    let shutdown = t["pgmux"]["shutdown_timeout"].as_float().unwrap();
    assert!(
        stop > shutdown,
        "TimeoutStopSec {stop} <= shutdown_timeout {shutdown}"
    );
    assert_eq!(val("[Install]", "WantedBy"), "multi-user.target");
}
