//! packaging/ checked by the tools its users run (issue 16): the kustomize tree rendered by
//! `kubectl kustomize` and validated by `kubernetes-validate` against the Kubernetes API
//! schemas, the alert rules by `promtool check rules` and `promtool test rules`, the systemd
//! unit by `systemd-analyze verify`, the sidecar's ConfigMap by `run --check`, and the IRSA
//! wiring by the agent's S3 client actually trading a web-identity token for credentials.
//!
//! Every tool comes from `.deps/paths.env` (`make deps`); a missing one fails the test with
//! `run make deps`. Each check also runs once against a deliberately broken input, to show
//! the tool would have caught a mistake. The image itself is tested by `make image-test`
//! (tests/tests/packaging_image.rs).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use syncbridge_tests::paths::{dep_value, repo_root, RUN_MAKE_DEPS};

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A tool named in `.deps/paths.env`, which must be an executable file.
fn tool(key: &str) -> PathBuf {
    let path = PathBuf::from(dep_value(key));
    assert!(
        path.is_file(),
        "{key}={} is not installed: {RUN_MAKE_DEPS}",
        path.display()
    );
    path
}

fn packaging() -> PathBuf {
    repo_root().join("packaging")
}

/// `kubectl kustomize packaging/kubernetes/DIR`.
fn kustomize(dir: &str) -> String {
    let out = Command::new(tool("SB_KUBECTL"))
        .arg("kustomize")
        .arg(packaging().join("kubernetes").join(dir))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The Python of the venv `make deps` made (it has PyYAML, a dependency of
/// kubernetes-validate): only used to turn YAML into JSON, which the tests then read.
fn python() -> PathBuf {
    let kv = tool("SB_KUBERNETES_VALIDATE");
    let py = kv.parent().unwrap().join("python");
    assert!(py.is_file(), "{} is missing: {RUN_MAKE_DEPS}", py.display());
    py
}

/// Every document of a YAML stream, as JSON values.
fn yaml_docs(yaml: &str) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new(python())
        .args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "YAML to JSON: {}", text(&out));
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("not a list: {other}"),
    }
}

fn str_of<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} is not a string in {v}"))
}

fn kind_name(d: &Value) -> String {
    format!("{}/{}", str_of(d, "/kind"), str_of(d, "/metadata/name"))
}

/// The pod spec of a workload (StatefulSet, Job, CronJob), if it is one.
fn pod_spec(d: &Value) -> Option<&Value> {
    match str_of(d, "/kind") {
        "StatefulSet" | "Deployment" | "Job" => d.pointer("/spec/template/spec"),
        "CronJob" => d.pointer("/spec/jobTemplate/spec/template/spec"),
        _ => None,
    }
}

/// `(is init container, container)` of a pod spec.
fn containers(spec: &Value) -> Vec<(bool, &Value)> {
    let mut all = Vec::new();
    for (key, init) in [("initContainers", true), ("containers", false)] {
        if let Some(Value::Array(cs)) = spec.get(key) {
            all.extend(cs.iter().map(|c| (init, c)));
        }
    }
    all
}

fn is_agent(c: &Value) -> bool {
    str_of(c, "/image").contains("syncbridge-agent")
}

fn env_of(c: &Value, name: &str) -> Option<String> {
    c.get("env")?
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

const OVERLAYS: &[&str] = &[
    "base",
    "overlays/irsa",
    "overlays/pitr-restore",
    "overlays/redis-restore",
];
/// Kubernetes versions the manifests are validated for: the oldest they need (native
/// sidecars GA, image volumes) and kubernetes-validate's newest.
const KUBERNETES_VERSIONS: &[&str] = &["1.33.0", "1.37.0"];

fn validate(file: &Path, version: &str) -> Output {
    Command::new(tool("SB_KUBERNETES_VALIDATE"))
        .args(["--strict", "-k", version])
        .arg(file)
        .output()
        .unwrap()
}

/// The rendered kustomize trees pass kubernetes-validate --strict: every built-in
/// resource is reported as passed. The Prometheus Operator's kinds have no schema there
/// (they are checked by promtool and the structure test below); nothing else may be
/// skipped. A typo in a field name fails the same validation.
#[test]
fn kustomize_output_passes_kubernetes_validate() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let rendered = kustomize(overlay);
        let file = dir
            .path()
            .join(format!("{}.yaml", overlay.replace('/', "-")));
        std::fs::write(&file, &rendered).unwrap();
        let docs = yaml_docs(&rendered);
        assert!(docs.len() >= 2, "{overlay}: {rendered}");
        for version in KUBERNETES_VERSIONS {
            let out = validate(&file, version);
            let report = text(&out);
            assert!(out.status.success(), "{overlay} {version}: {report}");
            for d in &docs {
                let kind = str_of(d, "/kind");
                let name = str_of(d, "/metadata/name");
                if str_of(d, "/apiVersion").starts_with("monitoring.coreos.com/") {
                    assert!(
                        matches!(kind, "PodMonitor" | "PrometheusRule"),
                        "{overlay}: unexpected custom resource {kind}"
                    );
                    continue;
                }
                let passed = format!(
                    "passed for resource {}/{name} against version",
                    kind.to_lowercase()
                );
                assert!(
                    report.contains(&passed),
                    "{overlay} {version}: no `{passed}`: {report}"
                );
            }
            for line in report
                .lines()
                .filter(|l| l.contains("Couldn't find schema"))
            {
                assert!(
                    line.contains("kind PodMonitor") || line.contains("kind PrometheusRule"),
                    "{overlay} {version}: a resource was not validated: {line}"
                );
            }
            println!(
                "{overlay}: {} resources valid for Kubernetes {version}",
                docs.len()
            );
        }
    }
    // The checker bites: a misspelt field of the sidecar's securityContext.
    let rendered = kustomize("base");
    assert!(rendered.contains("readOnlyRootFilesystem: true"));
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        rendered.replacen(
            "readOnlyRootFilesystem: true",
            "readOnlyRootFileSystem: true",
            1,
        ),
    )
    .unwrap();
    let out = validate(&broken, KUBERNETES_VERSIONS[1]);
    assert!(
        !out.status.success(),
        "a misspelt field passed: {}",
        text(&out)
    );
}

/// What the issue asks of the manifests, read from the rendered output: every container
/// non-root with a read-only root and no capabilities; the agent as a native sidecar of
/// both StatefulSets with /healthz and /readyz probes and resources; the PodMonitor
/// selecting those pods on the port the ConfigMap listens on; the weekly verify and the
/// monthly restore drill; the PITR Job writing a new claim; and the IRSA overlay giving
/// every agent a projected web-identity token instead of keys.
#[test]
fn manifests_run_the_agent_as_the_issue_describes() {
    let base = yaml_docs(&kustomize("base"));
    let find = |docs: &[Value], kind: &str, name: &str| -> Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind}/{name}"))
            .clone()
    };
    for overlay in OVERLAYS {
        let docs = yaml_docs(&kustomize(overlay));
        for d in &docs {
            let Some(spec) = pod_spec(d) else { continue };
            assert_eq!(
                spec.pointer("/securityContext/seccompProfile/type"),
                Some(&Value::from("RuntimeDefault")),
                "{}",
                kind_name(d)
            );
            for (_, c) in containers(spec) {
                let who = format!("{overlay}: {} container {}", kind_name(d), c["name"]);
                let sc = &c["securityContext"];
                assert_eq!(sc["runAsNonRoot"], true, "{who}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{who}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{who}");
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{who}"
                );
                assert!(c.pointer("/resources/requests/cpu").is_some(), "{who}");
                assert!(c.pointer("/resources/limits/memory").is_some(), "{who}");
                if is_agent(c) {
                    // The agent's command line is one it has.
                    let args: Vec<&str> = c["args"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|a| a.as_str().unwrap())
                        .collect();
                    let line = format!("syncbridge-agent {}", args.join(" "));
                    if let Err(e) = check_agent_command(&line) {
                        panic!("{who}: {e}");
                    }
                }
                let uid = sc["runAsUser"].as_u64().unwrap_or(0);
                assert!(uid > 0, "{who}: runAsUser");
                // Restores run as the database's uid, which must read what they write.
                let restore = str_of(d, "/metadata/name").contains("restore");
                if is_agent(c) && !restore {
                    assert_eq!(uid, 65532, "{who}");
                }
            }
        }
    }

    for sts in ["postgres", "redis"] {
        let d = find(&base, "StatefulSet", sts);
        let spec = pod_spec(&d).unwrap();
        let agents: Vec<(bool, &Value)> = containers(spec)
            .into_iter()
            .filter(|(_, c)| is_agent(c))
            .collect();
        assert_eq!(agents.len(), 1, "{sts}: one agent sidecar");
        let (init, agent) = agents[0];
        assert!(
            init && agent["restartPolicy"] == "Always",
            "{sts}: a native sidecar"
        );
        assert_eq!(
            agent["args"],
            serde_json::json!(["run", "--config", "/etc/syncbridge/agent.toml"]),
            "{sts}"
        );
        assert_eq!(str_of(agent, "/livenessProbe/httpGet/path"), "/healthz");
        assert_eq!(str_of(agent, "/readinessProbe/httpGet/path"), "/readyz");
        assert_eq!(str_of(agent, "/livenessProbe/httpGet/port"), "metrics");
        assert_eq!(
            agent.pointer("/ports/0/name"),
            Some(&Value::from("metrics"))
        );
        let port = agent
            .pointer("/ports/0/containerPort")
            .unwrap()
            .as_u64()
            .unwrap();
        // The config comes from a ConfigMap, its secrets from Secret volumes.
        let volumes = spec["volumes"].as_array().unwrap();
        let volume = |name: &str| -> &Value {
            volumes
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{sts}: no volume {name}"))
        };
        let mounts = agent["volumeMounts"].as_array().unwrap();
        let config_mount = mounts
            .iter()
            .find(|m| m["mountPath"] == "/etc/syncbridge")
            .unwrap();
        let cm_name = str_of(volume(str_of(config_mount, "/name")), "/configMap/name");
        let cm = base
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm_name)
            .unwrap();
        let toml = str_of(cm, "/data/agent.toml");
        assert!(
            toml.contains(&format!("listen = \"0.0.0.0:{port}\"")),
            "{sts}: the ConfigMap listens on the probed port {port}: {toml}"
        );
        let secret_mounts = mounts
            .iter()
            .filter(|m| volume(str_of(m, "/name")).get("secret").is_some())
            .count();
        assert!(
            secret_mounts >= 2,
            "{sts}: database and store secrets as files"
        );
        assert_eq!(
            spec["serviceAccountName"], "syncbridge",
            "{sts}: the ServiceAccount IRSA annotates"
        );
        let pod_labels = d.pointer("/spec/template/metadata/labels").unwrap();
        let pm = find(&base, "PodMonitor", "syncbridge-agent");
        for (k, v) in pm
            .pointer("/spec/selector/matchLabels")
            .unwrap()
            .as_object()
            .unwrap()
        {
            assert_eq!(&pod_labels[k], v, "{sts}: the PodMonitor selects its pods");
        }
        assert_eq!(str_of(&pm, "/spec/podMetricsEndpoints/0/port"), "metrics");
        assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["honorLabels"], true);
    }

    let verify = find(&base, "CronJob", "syncbridge-verify");
    assert_eq!(str_of(&verify, "/spec/schedule"), "0 5 * * 0", "weekly");
    let vspec = pod_spec(&verify).unwrap();
    for (_, c) in containers(vspec) {
        assert!(is_agent(c));
        assert_eq!(c["args"][0], "verify");
    }
    let drill = find(&base, "CronJob", "syncbridge-restore-drill");
    assert_eq!(str_of(&drill, "/spec/schedule"), "0 4 1 * *", "monthly");
    let script = str_of(pod_spec(&drill).unwrap(), "/containers/0/args/0");
    assert!(
        script.contains("syncbridge-agent restore") && script.contains("--start"),
        "{script}"
    );
    assert!(
        pod_spec(&drill).unwrap()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.pointer("/ephemeral/volumeClaimTemplate").is_some()),
        "the drill restores into a scratch volume"
    );

    let pitr = yaml_docs(&kustomize("overlays/pitr-restore"));
    let job = find(&pitr, "Job", "pg-pitr-restore");
    let claim = str_of(
        pod_spec(&job).unwrap().pointer("/volumes/0").unwrap(),
        "/persistentVolumeClaim/claimName",
    );
    find(&pitr, "PersistentVolumeClaim", claim);
    let script = str_of(pod_spec(&job).unwrap(), "/containers/0/args/0");
    assert!(script.contains("--to-time \"$SB_TO_TIME\"") && script.contains("--start"));

    let irsa = yaml_docs(&kustomize("overlays/irsa"));
    let sa = find(&irsa, "ServiceAccount", "syncbridge");
    let role = str_of(&sa, "/metadata/annotations/eks.amazonaws.com~1role-arn");
    assert!(role.starts_with("arn:aws:iam::"), "{role}");
    let mut checked = 0;
    for d in &irsa {
        let Some(spec) = pod_spec(d) else { continue };
        let volumes = spec["volumes"].as_array().unwrap();
        for (_, c) in containers(spec) {
            let uses_store = env_of(c, "SYNCBRIDGE_REPO").is_some()
                || is_agent(c)
                || env_of(c, "AWS_REGION").is_some();
            if !uses_store {
                continue;
            }
            let who = format!("{} container {}", kind_name(d), c["name"]);
            assert_eq!(env_of(c, "AWS_ROLE_ARN").as_deref(), Some(role), "{who}");
            assert!(env_of(c, "AWS_SECRET_ACCESS_KEY_FILE").is_none(), "{who}");
            let token = PathBuf::from(env_of(c, "AWS_WEB_IDENTITY_TOKEN_FILE").unwrap());
            let mount = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| Path::new(str_of(m, "/mountPath")) == token.parent().unwrap())
                .unwrap_or_else(|| panic!("{who}: nothing mounted at the token's directory"));
            let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
            let source = volume
                .pointer("/projected/sources/0/serviceAccountToken")
                .unwrap_or_else(|| panic!("{who}: the token is not a projected SA token"));
            assert_eq!(source["audience"], "sts.amazonaws.com", "{who}");
            assert_eq!(
                source["path"],
                token.file_name().unwrap().to_str().unwrap(),
                "{who}"
            );
            assert!(
                !volumes.iter().any(|v| v.pointer("/secret/secretName")
                    == Some(&Value::from("syncbridge-s3"))),
                "{who}: the static keys are still mounted"
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 5,
        "two sidecars, two verify containers, the restore drill"
    );
}

/// The sidecars' ConfigMap files are valid `run` configurations of this agent
/// (`run --check`; the password files, Secrets in the pod, are stand-ins here).
#[test]
fn the_sidecar_configmaps_pass_run_check() {
    let base = yaml_docs(&kustomize("base"));
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "stand-in\n").unwrap();
    let mut checked = 0;
    for cm in base.iter().filter(|d| d["kind"] == "ConfigMap") {
        let Some(toml) = cm.pointer("/data/agent.toml").and_then(Value::as_str) else {
            continue;
        };
        let file = dir.path().join(format!("{}.toml", checked));
        std::fs::write(&file, toml).unwrap();
        let section = if toml.contains("[postgres]") {
            "postgres"
        } else {
            "redis"
        };
        let out = syncbridge_tests::agent::command(&["SYNCBRIDGE_", "AWS_"])
            .args(["run", "--check", "--config"])
            .arg(&file)
            .arg("--set")
            .arg(format!("{section}.password_file={}", password.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", kind_name(cm), text(&out));
        checked += 1;
    }
    assert_eq!(checked, 2, "the PostgreSQL and the Redis sidecar");
}

/// alerts.yml passes `promtool check rules`, its unit tests (alerts.test.yml, and
/// alerts-long.test.yml for the alerts over days) pass `promtool test rules`
/// (each alert fires on breaking series and stays silent on healthy ones), the
/// PrometheusRule of the manifests holds exactly the same groups, and a changed threshold
/// fails the unit tests.
#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = tool("SB_PROMTOOL");
    let dir = packaging().join("prometheus");
    let run = |args: &[&str], cwd: &Path| {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(cwd)
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    let (ok, report) = run(&["check", "rules", "alerts.yml"], &dir);
    assert!(ok && report.contains("SUCCESS"), "{report}");
    let (ok, report) = run(
        &["test", "rules", "alerts.test.yml", "alerts-long.test.yml"],
        &dir,
    );
    assert!(ok && report.matches("SUCCESS").count() == 2, "{report}");

    // Every alert of alerts.yml is exercised, firing at least once.
    let alerts_text = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests_text = std::fs::read_to_string(dir.join("alerts.test.yml")).unwrap();
    let long_text = std::fs::read_to_string(dir.join("alerts-long.test.yml")).unwrap();
    let rules = &yaml_docs(&alerts_text)[0]["groups"][0]["rules"];
    let mut tests = yaml_docs(&tests_text)[0]["tests"]
        .as_array()
        .unwrap()
        .clone();
    tests.extend(
        yaml_docs(&long_text)[0]["tests"]
            .as_array()
            .unwrap()
            .clone(),
    );
    let mut names = Vec::new();
    for rule in rules.as_array().unwrap() {
        let name = str_of(rule, "/alert");
        let fires =
            tests.iter().any(|t| {
                t["alert_rule_test"].as_array().unwrap().iter().any(|c| {
                    c["alertname"] == name && !c["exp_alerts"].as_array().unwrap().is_empty()
                })
            });
        assert!(fires, "{name} is never shown to fire in alerts.test.yml");
        names.push(name.to_owned());
    }
    for wanted in [
        "SyncBridgeWALBehindRPO",
        "SyncBridgeRedisStreamStale",
        "SyncBridgeBaseBackupMissing",
        "SyncBridgeVerifyFailed",
        "SyncBridgeVerifyNotRun",
        "SyncBridgeSlotRetainingWAL",
        "SyncBridgeUploadErrors",
        "SyncBridgeAgentDown",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} missing");
    }

    // The PrometheusRule is alerts.yml.
    let base = yaml_docs(&kustomize("base"));
    let rule = base.iter().find(|d| d["kind"] == "PrometheusRule").unwrap();
    assert_eq!(
        rule["spec"]["groups"],
        yaml_docs(&alerts_text)[0]["groups"],
        "packaging/kubernetes/base/prometheusrule.yaml differs from alerts.yml: run packaging/prometheus/to-prometheusrule.py"
    );

    // The unit tests bite: the RPO at 10 minutes instead of 5 breaks them.
    let tmp = tempfile::tempdir().unwrap();
    let mutated = alerts_text.replace(
        "syncbridge_wal_lag_seconds{job=\"postgres_stream\"} > 300",
        "syncbridge_wal_lag_seconds{job=\"postgres_stream\"} > 600",
    );
    assert_ne!(mutated, alerts_text);
    std::fs::write(tmp.path().join("alerts.yml"), mutated).unwrap();
    std::fs::write(tmp.path().join("alerts.test.yml"), &tests_text).unwrap();
    let (ok, report) = run(&["test", "rules", "alerts.test.yml"], tmp.path());
    assert!(!ok && report.contains("SyncBridgeWALBehindRPO"), "{report}");
}

/// `systemd-analyze verify` of the unit, in a root holding the system's units and the
/// agent binary at the unit's ExecStart path: no diagnostics at all (the tool exits 0 on
/// mere warnings, so its output is checked too). A misspelt directive is reported.
#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let sa = dep_value("SB_SYSTEMD_ANALYZE");
    assert!(
        !sa.is_empty() && Path::new(&sa).is_file(),
        "systemd-analyze is not installed (package systemd): {RUN_MAKE_DEPS}"
    );
    let unit =
        std::fs::read_to_string(packaging().join("systemd/syncbridge-agent.service")).unwrap();
    for wanted in [
        "ExecStart=/usr/local/bin/syncbridge-agent run --config /etc/syncbridge/agent.toml",
        "Type=exec",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "User=syncbridge",
        "ReadWritePaths=/var/lib/syncbridge",
        "Restart=on-failure",
    ] {
        assert!(
            unit.lines().any(|l| l == wanted),
            "the unit lacks `{wanted}`"
        );
    }
    let verify = |text: &str| -> Output {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
        std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
        std::fs::create_dir_all(r.join("usr/lib/systemd/system")).unwrap();
        std::fs::copy(
            syncbridge_tests::agent::binary(),
            r.join("usr/local/bin/syncbridge-agent"),
        )
        .unwrap();
        for e in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(
                    e.path(),
                    r.join("usr/lib/systemd/system").join(e.file_name()),
                )
                .unwrap();
            }
        }
        std::fs::write(r.join("etc/systemd/system/syncbridge-agent.service"), text).unwrap();
        Command::new(&sa)
            .arg("verify")
            .arg(format!("--root={}", r.display()))
            .arg("syncbridge-agent.service")
            .output()
            .unwrap()
    };
    let out = verify(&unit);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        text(&out)
    );
    println!("systemd-analyze verify: no diagnostics");
    let out = verify(&unit.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown key"),
        "a misspelt directive went unnoticed: {}",
        text(&out)
    );
}

mod irsa {
    //! The agent's S3 client with nothing but a web identity: `AWS_ROLE_ARN` and
    //! `AWS_WEB_IDENTITY_TOKEN_FILE` (what IRSA's webhook, or the irsa overlay, puts in the
    //! pod), no keys. A fake STS endpoint over HTTPS (AWS_ENDPOINT_URL_STS, trusted via
    //! AWS_CA_BUNDLE) answers AssumeRoleWithWebIdentity with SeaweedFS's credentials only
    //! when it receives the role and the token file's contents, so the agent can write to
    //! SeaweedFS only if object_store took that path.

    use super::*;
    use std::sync::{Arc, Mutex};
    use syncbridge_tests::s3::S3Server;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The query parameters of each request the fake STS received.
    type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

    async fn serve_sts(
        listener: tokio::net::TcpListener,
        tls: tokio_rustls::TlsAcceptor,
        token: String,
        role: String,
        keys: (String, String),
        seen: Seen,
    ) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (tls, token, role, keys, seen) = (
                tls.clone(),
                token.clone(),
                role.clone(),
                keys.clone(),
                seen.clone(),
            );
            tokio::spawn(async move {
                let Ok(mut s) = tls.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then a body of Content-Length bytes.
                let body_start = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..body_start]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < body_start + length {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let body = String::from_utf8_lossy(&buf[body_start..]).to_string();
                let parsed = url::Url::parse(&format!("https://sts.invalid{target}")).unwrap();
                let mut params: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                params.extend(
                    url::form_urlencoded::parse(body.as_bytes())
                        .map(|(k, v)| (k.into_owned(), v.into_owned())),
                );
                let get = |k: &str| {
                    params
                        .iter()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let ok = get("Action") == "AssumeRoleWithWebIdentity"
                    && get("RoleArn") == role
                    && get("WebIdentityToken") == token;
                seen.lock().unwrap().push(params.clone());
                let response = if ok {
                    // An empty session token: SeaweedFS 4 checks a token against its own
                    // STS and would refuse any other (a real STS's token goes to real S3).
                    let xml = format!(
                        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey><SessionToken></SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
                        keys.0, keys.1
                    );
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                        xml.len()
                    )
                } else {
                    let xml = "<ErrorResponse><Error><Code>AccessDenied</Code><Message>wrong role or token</Message></Error></ErrorResponse>";
                    format!(
                        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                        xml.len()
                    )
                };
                let _ = s.write_all(response.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    }

    fn acceptor(certs: &syncbridge_tests::tls::TestCerts) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.server_cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&certs.server_key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s3_client_trades_the_web_identity_token_for_credentials() {
        let s3 = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let certs = syncbridge_tests::tls::make_test_certs(dir.path());
        let token = format!("eyJ.web-identity-token-{}", std::process::id());
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, &token).unwrap();
        let role = "arn:aws:iam::111122223333:role/syncbridge-backups".to_owned();
        let seen: Seen = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sts = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let server = tokio::spawn(serve_sts(
            listener,
            acceptor(&certs),
            token.clone(),
            role.clone(),
            (s3.access_key().to_owned(), s3.secret_key().to_owned()),
            seen.clone(),
        ));

        let run = |token_file: PathBuf, prefix: &str| {
            let mut cmd = syncbridge_tests::agent::command(&["SYNCBRIDGE_", "AWS_"]);
            // SeaweedFS's endpoint and region, but no keys of any kind.
            for (k, v) in s3.env() {
                if !k.contains("ACCESS_KEY") {
                    cmd.env(k, v);
                }
            }
            cmd.env("AWS_ROLE_ARN", &role)
                .env("AWS_WEB_IDENTITY_TOKEN_FILE", token_file)
                .env("AWS_ROLE_SESSION_NAME", "syncbridge-agent")
                .env("AWS_ENDPOINT_URL_STS", &sts)
                .env("AWS_CA_BUNDLE", &certs.ca)
                .args(["repo", "init", "--kind", "postgres", "--repo"])
                .arg(s3.repo_url(prefix));
            cmd
        };
        let mut cmd = run(token_file.clone(), "irsa");
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}\nSTS saw: {:?}",
            text(&out),
            seen.lock().unwrap()
        );
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 1, "one AssumeRoleWithWebIdentity: {seen:?}");
            let get = |k: &str| {
                seen[0]
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(get("Action"), Some("AssumeRoleWithWebIdentity"));
            assert_eq!(get("RoleArn"), Some(role.as_str()));
            assert_eq!(get("WebIdentityToken"), Some(token.as_str()));
            assert_eq!(get("RoleSessionName"), Some("syncbridge-agent"));
        }
        // The repository exists in SeaweedFS: written with the credentials STS returned. The
        // marker is a container object (compressed, bound to its key): read it back through
        // the agent with the store's own keys.
        use object_store::ObjectStore;
        let store = s3.object_store();
        store
            .head(&object_store::path::Path::from("irsa/syncbridge-repo"))
            .await
            .unwrap_or_else(|e| panic!("the agent's repository marker is missing: {e}"));
        let mut cat = syncbridge_tests::agent::command(&["SYNCBRIDGE_", "AWS_"]);
        cat.envs(s3.env())
            .args(["repo", "cat", "--repo"])
            .arg(s3.repo_url("irsa"))
            .arg("syncbridge-repo");
        let out = tokio::task::spawn_blocking(move || cat.output().unwrap())
            .await
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("postgres"),
            "{}",
            text(&out)
        );

        // Another token is refused by STS, and then the agent has no way in.
        let other = dir.path().join("other-token");
        std::fs::write(&other, "eyJ.someone-else").unwrap();
        let mut cmd = run(other, "irsa-refused");
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            seen.lock().unwrap().len() >= 2,
            "the second run asked STS too"
        );
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("eyJ.someone-else"),
            "the token is never echoed: {}",
            text(&out)
        );
        server.abort();
    }
}

/// Every `syncbridge-agent` command in docs/operations.md is one the agent has: its
/// sub-command exists (`--help` succeeds) and every `--flag` it uses is in that help.
#[test]
fn operations_md_commands_are_the_agents() {
    let doc = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    let mut commands = Vec::new();
    let mut in_code = false;
    let mut pending = String::new();
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        let line = line.trim();
        if !pending.is_empty() {
            pending.push(' ');
            pending.push_str(line.trim_end_matches('\\'));
            if !line.ends_with('\\') {
                commands.push(std::mem::take(&mut pending));
            }
            continue;
        }
        if line.starts_with("syncbridge-agent ") {
            if line.ends_with('\\') {
                pending = line.trim_end_matches('\\').to_owned();
            } else {
                commands.push(line.to_owned());
            }
        }
    }
    assert!(commands.len() >= 15, "{commands:?}");
    for command in &commands {
        if let Err(e) = check_agent_command(command) {
            panic!("docs/operations.md: {e}");
        }
    }
    // The check bites: an unknown sub-command, one of a group, an unknown flag.
    for bad in [
        "syncbridge-agent frobnicate --repo s3://b/p",
        "syncbridge-agent postgres frobnicate",
        "syncbridge-agent verify --repo s3://b/p --max-staleness 5m",
    ] {
        assert!(check_agent_command(bad).is_err(), "{bad} passed");
    }
    println!("{} commands of docs/operations.md checked", commands.len());
}

/// `Err` when `command` (`syncbridge-agent SUB [SUB] [--flag value]…`) names a sub-command
/// the agent does not have, or a flag its `--help` does not list.
fn check_agent_command(command: &str) -> Result<(), String> {
    let help = |path: &[&str]| -> Option<String> {
        let out = syncbridge_tests::agent::command(&["SYNCBRIDGE_", "AWS_"])
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Comments end the command; quoted values are not flags.
    let command = command.split(" #").next().unwrap_or_default();
    let mut words = Vec::new();
    let mut quoted = false;
    for w in command.split_whitespace().skip(1) {
        if !quoted {
            words.push(w);
        }
        if w.matches('\'').count() % 2 == 1 {
            quoted = !quoted;
        }
    }
    let subs: Vec<&str> = words
        .iter()
        .take_while(|w| !w.starts_with('-'))
        .take(2)
        .copied()
        .collect();
    if subs.is_empty() {
        return Err(format!("`{command}`: no sub-command"));
    }
    let first =
        help(&subs[..1]).ok_or_else(|| format!("`{command}`: no sub-command {}", subs[0]))?;
    let (path, text) = if subs.len() == 2 && first.contains("\nCommands:\n") {
        let t = help(&subs)
            .ok_or_else(|| format!("`{command}`: `{}` has no sub-command {}", subs[0], subs[1]))?;
        (subs.clone(), t)
    } else {
        (subs[..1].to_vec(), first)
    };
    for flag in words.iter().filter(|w| w.starts_with("--")) {
        let flag = flag.split('=').next().unwrap_or_default();
        if !(text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n"))) {
            return Err(format!(
                "`{command}`: `syncbridge-agent {}` has no {flag}",
                path.join(" ")
            ));
        }
    }
    Ok(())
}
