//! Health and metrics over HTTP for `run` (`[http] listen`):
//!
//! * `/healthz`: 200 while the process and its supervisor answer (a liveness probe).
//! * `/readyz`: 200 when every stream job is streaming with its lag under
//!   `http.ready_max_lag`; 503 otherwise, with one line per job saying why (a sidecar
//!   waiting beside a standby is alive but not ready).
//! * `/metrics`: the Prometheus exposition of every job's state, encoded by
//!   `prometheus-client` from the jobs' `watch` channels at each scrape, so what is scraped
//!   is what the jobs last published: OpenMetrics text when the client asks for it (as
//!   Prometheus does), the classic text format otherwise. Names and meanings:
//!   docs/metrics.md.
//!
//! hyper serves HTTP/1.1 on one task per connection; nothing here blocks a job.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::job::{JobState, PartStates, Phase};

/// What a job is, for its metric names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `postgres stream`.
    PostgresStream,
    /// `redis stream`.
    RedisStream,
    /// Scheduled base backups (and the expire after each).
    PostgresBackup,
    /// Scheduled expire of a Redis repository.
    RedisExpire,
    /// Scheduled verify of a repository.
    Verify,
}

impl JobKind {
    /// The `job` label.
    pub fn label(self) -> &'static str {
        match self {
            JobKind::PostgresStream => "postgres_stream",
            JobKind::RedisStream => "redis_stream",
            JobKind::PostgresBackup => "postgres_backup",
            JobKind::RedisExpire => "redis_expire",
            JobKind::Verify => "verify",
        }
    }

    /// Streams must be streaming for the process to be ready; scheduled jobs need not.
    pub fn is_stream(self) -> bool {
        matches!(self, JobKind::PostgresStream | JobKind::RedisStream)
    }

    /// Whether a job in `state` counts as up: a stream streams; a scheduled job is running
    /// or idle and its last run did not fail.
    fn up(self, state: &JobState) -> bool {
        if self.is_stream() {
            state.phase == Phase::Running
        } else {
            matches!(state.phase, Phase::Running | Phase::Idle) && state.last_error.is_none()
        }
    }
}

/// One job as the endpoint sees it.
#[derive(Debug, Clone)]
pub struct Watched {
    /// What it is.
    pub kind: JobKind,
    /// The repository it writes (URL without secrets), the `repository` label.
    pub repository: String,
    /// Its published state.
    pub state: watch::Receiver<JobState>,
    /// Its parts' states (a whole-cluster Redis stream's shards, label `shard`).
    pub parts: PartStates,
}

#[derive(Debug)]
struct JobsCollector {
    jobs: Vec<Watched>,
}

type Labels = Vec<(&'static str, String)>;

fn labels(w: &Watched) -> Labels {
    vec![
        ("job", w.kind.label().to_owned()),
        ("repository", w.repository.clone()),
    ]
}

/// What one set of samples describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// A job without parts: every series of its kind.
    Whole,
    /// A job with parts (a whole-cluster Redis stream): its own `job_up` and retries only;
    /// the stream series are its parts'.
    Parent,
    /// One part (a shard, label `shard`): the stream series, `job_up` and retries.
    Part,
}

/// One set of samples: labels, the state they show, the job kind, the scope.
type Entry = (Labels, JobState, JobKind, Scope);

/// The entries of every job: one per job, plus one per part labelled `shard`.
fn entries(jobs: &[Watched]) -> Vec<Entry> {
    let mut out = Vec::new();
    for w in jobs {
        let parts = w.parts.states();
        let scope = if parts.is_empty() {
            Scope::Whole
        } else {
            Scope::Parent
        };
        out.push((labels(w), w.state.borrow().clone(), w.kind, scope));
        for (name, state) in parts {
            let mut l = labels(w);
            l.push(("shard", name));
            out.push((l, state, w.kind, Scope::Part));
        }
    }
    out
}

fn unix_seconds(t: chrono::DateTime<chrono::Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Encodes one gauge family; `value` picks each job's value (jobs without one are left out).
fn gauge(
    encoder: &mut DescriptorEncoder,
    jobs: &[Entry],
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: impl Fn(&JobState, JobKind, Scope) -> Option<f64>,
) -> std::fmt::Result {
    let present: Vec<(&Labels, f64)> = jobs
        .iter()
        .filter_map(|(l, s, k, p)| value(s, *k, *p).map(|v| (l, v)))
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(
        name,
        help,
        unit,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (l, v) in present {
        ConstGauge::new(v).encode(family.encode_family(l)?)?;
    }
    Ok(())
}

/// Encodes one counter family (exposed with the `_total` suffix).
fn counter(
    encoder: &mut DescriptorEncoder,
    jobs: &[Entry],
    name: &str,
    help: &str,
    value: impl Fn(&JobState, JobKind, Scope) -> Option<u64>,
) -> std::fmt::Result {
    let present: Vec<(&Labels, u64)> = jobs
        .iter()
        .filter_map(|(l, s, k, p)| value(s, *k, *p).map(|v| (l, v)))
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (l, v) in present {
        ConstCounter::new(v).encode(family.encode_family(l)?)?;
    }
    Ok(())
}

impl Collector for JobsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let jobs = entries(&self.jobs);
        let e = &mut encoder;
        let pg = |k: JobKind| k == JobKind::PostgresStream;
        // A cluster stream's series are its shards' (`shard` label), not the parent's.
        let redis = |k: JobKind, p: Scope| k == JobKind::RedisStream && p != Scope::Parent;
        gauge(
            e,
            &jobs,
            "syncbridge_job_up",
            "1 when the job is doing its work: a stream streaming, a scheduled job whose last run succeeded",
            None,
            |s, k, _| Some(if k.up(s) { 1.0 } else { 0.0 }),
        )?;
        let backup = |k: JobKind| k == JobKind::PostgresBackup;
        gauge(
            e,
            &jobs,
            "syncbridge_backup_last_success_timestamp_seconds",
            "When the last scheduled base backup completed (Unix time)",
            None,
            |s, k, _| backup(k).then_some(unix_seconds(s.last_success_at?)),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_backup_duration_seconds",
            "How long the last successful base backup took, waiting for its WAL included",
            None,
            |s, k, _| backup(k).then_some(s.last_run_duration?.as_secs_f64()),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_first_recoverability_timestamp_seconds",
            "The earliest moment the repository can restore to (the end of its oldest backup or the oldest snapshot), after the last backup and expire",
            None,
            |s, _, _| Some(unix_seconds(s.first_recoverable_at?)),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_verify_last_success_timestamp_seconds",
            "When the last scheduled verify found the repository healthy (Unix time)",
            None,
            |s, k, _| (k == JobKind::Verify).then_some(unix_seconds(s.last_success_at?)),
        )?;
        counter(
            e,
            &jobs,
            "syncbridge_job_failures",
            "Runs of a scheduled job that failed",
            |s, k, _| (!k.is_stream()).then_some(s.failures),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_wal_archived_lsn_bytes",
            "The LSN up to which WAL is durable in the repository, as a byte position",
            None,
            |s, k, _| pg(k).then_some(s.durable_bytes? as f64),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_wal_last_archived_timestamp_seconds",
            "When WAL last became durable in the repository (Unix time)",
            None,
            |s, k, _| pg(k).then_some(unix_seconds(s.durable_at?)),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_wal_lag_seconds",
            "How long the oldest received WAL byte not yet durable has waited",
            None,
            |s, k, _| pg(k).then_some(s.lag?.as_secs_f64()),
        )?;
        counter(
            e,
            &jobs,
            "syncbridge_wal_bytes",
            "WAL bytes made durable by this process",
            |s, k, _| pg(k).then_some(s.durable_bytes_total),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_redis_durable_offset",
            "The replication offset up to which the Redis stream is durable in the repository",
            None,
            |s, k, p| redis(k, p).then_some(s.durable_bytes? as f64),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_redis_last_chunk_timestamp_seconds",
            "When the Redis stream last became durable further (Unix time)",
            None,
            |s, k, p| redis(k, p).then_some(unix_seconds(s.durable_at?)),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_redis_lag_seconds",
            "How long the oldest write of the last stored chunk waited to become durable",
            None,
            |s, k, p| redis(k, p).then_some(s.lag?.as_secs_f64()),
        )?;
        counter(
            e,
            &jobs,
            "syncbridge_redis_bytes",
            "Replication stream bytes made durable by this process",
            |s, k, p| redis(k, p).then_some(s.durable_bytes_total),
        )?;
        gauge(
            e,
            &jobs,
            "syncbridge_slot_retained_bytes",
            "WAL the server has sent past what is durable in the repository: what the stream's replication slot makes the server keep",
            None,
            |s, k, _| pg(k).then_some(s.source_behind_bytes? as f64),
        )?;
        counter(
            e,
            &jobs,
            "syncbridge_upload_errors",
            "Writes to the repository that failed after the store layer's own retries (retried by the stream, or ending an attempt)",
            |s, k, p| (k.is_stream() && p != Scope::Parent).then_some(s.upload_errors),
        )?;
        counter(
            e,
            &jobs,
            "syncbridge_job_retries",
            "Attempts of the job that ended in an error and were retried",
            |s, _, _| Some(s.retries),
        )?;
        Ok(())
    }
}

/// Whether every job is ready, and per job why not. A whole-cluster stream is ready when
/// it and every one of its shards' streams are (one line per shard).
fn readiness(jobs: &[Watched], max_lag: Duration) -> (bool, String) {
    let mut ok = true;
    let mut text = String::new();
    for w in jobs.iter().filter(|w| w.kind.is_stream()) {
        let mut states = vec![(w.kind.label().to_owned(), w.state.borrow().clone())];
        for (name, state) in w.parts.states() {
            states.push((format!("{} shard {name}", w.kind.label()), state));
        }
        for (label, s) in states {
            let lag = s.lag.unwrap_or_default();
            let why = match s.phase {
                Phase::Running if lag <= max_lag => None,
                Phase::Running => Some(format!(
                    "lag {:.1}s is over {:.1}s",
                    lag.as_secs_f64(),
                    max_lag.as_secs_f64()
                )),
                Phase::Waiting => Some(format!(
                    "waiting: {}",
                    s.waiting_for.as_deref().unwrap_or("?")
                )),
                other => Some(format!(
                    "{other:?}{}",
                    s.last_error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
            };
            match why {
                None => text.push_str(&format!("{label}: ready\n")),
                Some(why) => {
                    ok = false;
                    text.push_str(&format!("{label}: not ready: {why}\n"));
                }
            }
        }
    }
    (ok, text)
}

/// Binds `listen` (so a taken port fails `run` before any job starts).
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} (http.listen)"))
}

/// Serves the endpoints until `token` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    jobs: Vec<Watched>,
    ready_max_lag: Duration,
    token: CancellationToken,
) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(JobsCollector { jobs: jobs.clone() }));
    let registry = Arc::new(registry);
    let jobs = Arc::new(jobs);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = token.cancelled() => return,
        };
        let registry = registry.clone();
        let jobs = jobs.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let registry = registry.clone();
            let jobs = jobs.clone();
            async move {
                Ok::<_, std::convert::Infallible>(respond(&req, &registry, &jobs, ready_max_lag))
            }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("http connection: {e}");
            }
        });
    }
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition, for clients that do not
/// ask for OpenMetrics (`curl`, `promtool check metrics`): a counter family's `# HELP` and
/// `# TYPE` lines name its samples (`x_total`, where OpenMetrics says `x`), and the
/// OpenMetrics-only `# UNIT` and `# EOF` lines go. prometheus-client writes only
/// OpenMetrics, and these three rules are the whole difference for gauges and counters.
fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn respond<B>(
    req: &Request<B>,
    registry: &Registry,
    jobs: &[Watched],
    ready_max_lag: Duration,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let (ok, body) = readiness(jobs, ready_max_lag);
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, body)
        }
        "/metrics" => {
            let mut body = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics: {e}\n"),
                );
            }
            // Prometheus asks for OpenMetrics; anyone else gets the classic text format.
            let openmetrics = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            let (body, content_type) = if openmetrics {
                (
                    body,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                (
                    classic_text(&body),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            };
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /healthz, /readyz, /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobStatus;

    fn exposition(jobs: Vec<Watched>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(JobsCollector { jobs }));
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry).unwrap_or_default();
        classic_text(&body)
    }

    #[test]
    fn a_cluster_streams_series_are_its_shards_and_a_single_server_has_no_shard_label() {
        let (cluster, state) = JobStatus::new();
        cluster.running();
        let s01 = cluster.part("s01");
        s01.running();
        s01.durable("1:100", 100, Some(Duration::from_millis(20)));
        s01.durable("1:150", 150, None);
        cluster.part("s02").durable("9:7", 7, None);
        let (single, single_state) = JobStatus::new();
        single.running();
        single.durable("5:1", 1, None);
        let jobs = vec![
            Watched {
                kind: JobKind::RedisStream,
                repository: "file:///c".into(),
                state,
                parts: cluster.parts(),
            },
            Watched {
                kind: JobKind::RedisStream,
                repository: "file:///r".into(),
                state: single_state,
                parts: single.parts(),
            },
        ];
        let text = exposition(jobs.clone());
        let has = |l: &str| text.lines().any(|x| x == l);
        let c = r#"job="redis_stream",repository="file:///c""#;
        let r = r#"job="redis_stream",repository="file:///r""#;
        assert!(
            has(&format!(
                r#"syncbridge_redis_durable_offset{{{c},shard="s01"}} 150.0"#
            )),
            "{text}"
        );
        assert!(
            has(&format!(
                r#"syncbridge_redis_bytes_total{{{c},shard="s01"}} 50"#
            )),
            "{text}"
        );
        assert!(
            has(&format!(
                r#"syncbridge_redis_durable_offset{{{c},shard="s02"}} 7.0"#
            )),
            "{text}"
        );
        assert!(
            has(&format!(r#"syncbridge_job_up{{{c},shard="s01"}} 1.0"#)),
            "{text}"
        );
        assert!(
            has(&format!(r#"syncbridge_job_up{{{c},shard="s02"}} 0.0"#)),
            "{text}"
        );
        assert!(has(&format!(r#"syncbridge_job_up{{{c}}} 1.0"#)), "{text}");
        assert!(
            !text.contains(&format!(r#"syncbridge_redis_bytes_total{{{c}}}"#)),
            "{text}"
        );
        assert!(
            has(&format!(r#"syncbridge_redis_durable_offset{{{r}}} 1.0"#)),
            "{text}"
        );
        assert!(!text.contains(&format!(r#"{r},shard"#)), "{text}");
        // Ready only when every shard is.
        let (ok, why) = readiness(&jobs, Duration::from_secs(30));
        assert!(!ok, "{why}");
        assert!(why.contains("redis_stream shard s01: ready"), "{why}");
        assert!(
            why.contains("redis_stream shard s02: not ready: Starting"),
            "{why}"
        );
        cluster.part("s02").running();
        assert!(readiness(&jobs, Duration::from_secs(30)).0);
    }

    #[test]
    fn classic_text_names_counter_samples_and_drops_openmetrics_lines() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\na_bytes_total{job=\"x\"} 3\n# HELP g A gauge.\n# TYPE g gauge\n# UNIT g seconds\ng 1.5\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{job=\"x\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1.5\n"
        );
    }
}
