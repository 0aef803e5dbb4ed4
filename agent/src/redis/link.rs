//! The agent's connection to a master, as a replica (Redis `src/replication.c`,
//! `syncWithMaster` is the replica side of the same conversation).
//!
//! Handshake: `AUTH`, `REPLCONF listening-port`, `REPLCONF capa eof capa psync2` (so the
//! master may send diskless payloads and `+CONTINUE <new id>`), `REPLCONF version` (Valkey
//! only: without it a Valkey 9 master sends an RDB 11 payload, in which hash field TTLs
//! cannot be represented; Redis answers "Unrecognized REPLCONF option", which is ignored),
//! then `PSYNC ? -1` or `PSYNC <replid> <offset+1>`.
//!
//! ACL the agent's user needs: `+psync +replconf +sync +ping`, and `+info +cluster|myid
//! +cluster|shards +cluster|nodes` to tell a Redis Cluster node from a single server
//! ([`super::cluster`]), e.g. `ACL SETUSER backup on >secret +psync +replconf +sync +ping
//! +info +cluster|myid +cluster|shards +cluster|nodes`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use wire::redis::command::{CommandDecoder, ReplicatedCommand};
use wire::redis::handshake::{decode_psync_reply, PsyncReply};
use wire::redis::resp::{decode_reply, encode_command, Reply};
use wire::redis::transfer::{RdbTransferDecoder, TransferEvent};
use wire::redis::ReplicationOffset;

use super::source::RedisSource;
use crate::job::JobError;

/// Every failure carries its class, decided here where it is understood (see `crate::job`):
/// an I/O error by its kind; the rest (a refusal, a protocol error) is transient.
type Result<T, E = JobError> = std::result::Result<T, E>;

/// `anyhow::bail!` for this module's error type (an unclassified, transient error).
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(JobError::from(anyhow!($($arg)*)))
    };
}

/// The Valkey version the agent announces: the newest whose RDB format (VALKEY080) the
/// validator knows, so a newer master still sends something the agent can check.
pub const ANNOUNCED_VALKEY_VERSION: &str = "9.0.0";

/// How long to wait for the master to answer a request after the handshake (`PSYNC`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting may take in all: TCP, TLS and the handshake up to `PSYNC`. The same
/// 10 s as PostgreSQL's default `connect_timeout`: a port that accepts TCP and never
/// answers is an error naming the host, not a hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connecting to the master did not finish within [`CONNECT_TIMEOUT`].
#[derive(Debug, thiserror::Error)]
#[error("connecting to Redis at {endpoint}: no answer within {}s (TCP connect, TLS and handshake); is a Redis or Valkey server listening there?", .after.as_secs())]
pub struct ConnectTimedOut {
    /// `host:port`.
    pub endpoint: String,
    /// The limit that passed.
    pub after: Duration,
}

/// Why connecting to a master failed: it did not answer in time (which a caller may take
/// for a wrong address on a first attempt), or anything else, classified.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No answer within [`CONNECT_TIMEOUT`].
    #[error(transparent)]
    TimedOut(#[from] ConnectTimedOut),
    /// Refused, reset, a failed login or handshake.
    #[error(transparent)]
    Failed(#[from] JobError),
}

/// A connection that timed out is unreachable (a failover, a restart).
impl From<ConnectError> for JobError {
    fn from(e: ConnectError) -> JobError {
        match e {
            ConnectError::TimedOut(t) => JobError::unreachable(t),
            ConnectError::Failed(e) => e,
        }
    }
}

/// Silence after which the master is considered gone. Masters PING replicas every
/// `repl-ping-replica-period` (10 s) and send `\n` while preparing a snapshot.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 256 << 10;

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// The write half, shared with the task that sends `REPLCONF ACK`.
#[derive(Clone)]
pub struct AckSender {
    writer: Arc<Mutex<WriteHalf>>,
}

impl AckSender {
    /// Sends `REPLCONF ACK <offset>`.
    pub async fn ack(&self, offset: ReplicationOffset) -> Result<()> {
        let mut buf = BytesMut::new();
        encode_command(
            &mut buf,
            &[b"REPLCONF", b"ACK", offset.to_string().as_bytes()],
        );
        let mut w = self.writer.lock().await;
        w.write_all(&buf)
            .await
            .map_err(|e| JobError::io(e, "sending REPLCONF ACK to the master".into()))?;
        Ok(())
    }
}

/// A replica connection to one master.
pub struct MasterLink {
    reader: ReadHalf,
    writer: AckSender,
    buf: BytesMut,
    endpoint: String,
    /// Bytes read from the socket in total (for throughput reports).
    pub bytes_read: u64,
    /// The test hook's next read time (see [`test_read_delay`]).
    delayed_until: Option<tokio::time::Instant>,
}

impl MasterLink {
    /// Connects and runs the handshake up to (not including) `PSYNC`, all within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(source: &RedisSource) -> Result<MasterLink, ConnectError> {
        let endpoint = source.endpoint();
        match tokio::time::timeout(CONNECT_TIMEOUT, MasterLink::connect_inner(source)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ConnectTimedOut {
                endpoint,
                after: CONNECT_TIMEOUT,
            }
            .into()),
        }
    }

    async fn connect_inner(source: &RedisSource) -> Result<MasterLink> {
        let endpoint = source.endpoint();
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TcpStream::connect((source.host.as_str(), source.port)),
        )
        .await
        .map_err(|_| anyhow!("connecting to Redis at {endpoint}: timed out"))?
        .map_err(|e| JobError::io(e, format!("connecting to Redis at {endpoint}")))?;
        stream.set_nodelay(true).ok();
        let (reader, writer): (ReadHalf, WriteHalf) = if source.tls {
            let config = super::tls::client_config(&source.tls_files)?;
            let name = super::tls::server_name(&source.host)?;
            let tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsConnector::from(config).connect(name, stream),
            )
            .await
            .map_err(|_| anyhow!("TLS handshake with {endpoint}: timed out"))?
            .map_err(|e| JobError::io(e, format!("TLS handshake with {endpoint}")))?;
            let (r, w) = tokio::io::split(tls);
            (Box::new(r), Box::new(w))
        } else {
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        };
        let mut link = MasterLink {
            reader,
            writer: AckSender {
                writer: Arc::new(Mutex::new(writer)),
            },
            buf: BytesMut::with_capacity(READ_SIZE),
            endpoint,
            bytes_read: 0,
            delayed_until: None,
        };
        link.handshake(source).await?;
        Ok(link)
    }

    /// `host:port` of the master.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A handle that sends `REPLCONF ACK` from another task.
    pub fn ack_sender(&self) -> AckSender {
        self.writer.clone()
    }

    async fn send(&mut self, args: &[&[u8]]) -> Result<()> {
        let mut buf = BytesMut::new();
        encode_command(&mut buf, args);
        let mut w = self.writer.writer.lock().await;
        w.write_all(&buf)
            .await
            .map_err(|e| JobError::io(e, format!("writing to the master at {}", self.endpoint)))
    }

    /// Reads more bytes into the buffer; a closed connection or silence is an error.
    async fn fill(&mut self) -> Result<()> {
        self.buf.reserve(READ_SIZE);
        let n = tokio::time::timeout(READ_TIMEOUT, self.reader.read_buf(&mut self.buf))
            .await
            .map_err(|_| {
                anyhow!(
                    "the master at {} sent nothing for {}s",
                    self.endpoint,
                    READ_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| {
                JobError::io(e, format!("reading from the master at {}", self.endpoint))
            })?;
        if n == 0 {
            bail!("the master at {} closed the connection", self.endpoint);
        }
        self.bytes_read += n as u64;
        Ok(())
    }

    async fn request(&mut self, args: &[&[u8]]) -> Result<Reply> {
        self.send(args).await?;
        let fut = async {
            loop {
                if let Some(reply) = decode_reply(&mut self.buf).map_err(|e| anyhow!(e))? {
                    return Ok::<Reply, JobError>(reply);
                }
                self.fill().await?;
            }
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
            .await
            .map_err(|_| {
                JobError::from(anyhow!(
                    "the master at {} did not answer {} within {}s",
                    self.endpoint,
                    String::from_utf8_lossy(args[0]),
                    HANDSHAKE_TIMEOUT.as_secs()
                ))
            })?
    }

    async fn handshake(&mut self, source: &RedisSource) -> Result<()> {
        if let Some(password) = &source.password {
            let reply = match &source.username {
                Some(user) => {
                    self.request(&[b"AUTH", user.as_bytes(), password.as_bytes()])
                        .await?
                }
                None => self.request(&[b"AUTH", password.as_bytes()]).await?,
            };
            if let Reply::Error(e) = reply {
                bail!(
                    "authentication as {} failed at {}: {e}",
                    source.username.as_deref().unwrap_or("the default user"),
                    self.endpoint
                );
            }
        }
        let steps: [&[&[u8]]; 2] = [
            &[b"REPLCONF", b"listening-port", b"0"],
            &[b"REPLCONF", b"capa", b"eof", b"capa", b"psync2"],
        ];
        for step in steps {
            if let Reply::Error(e) = self.request(step).await? {
                bail!(
                    "the master at {} refused `{}`: {e} (the agent's user needs the ACL +psync +replconf +sync +ping {})",
                    self.endpoint,
                    step.iter().map(|a| String::from_utf8_lossy(a)).collect::<Vec<_>>().join(" "),
                    super::cluster::CLUSTER_ACL,
                );
            }
        }
        match self
            .request(&[b"REPLCONF", b"version", ANNOUNCED_VALKEY_VERSION.as_bytes()])
            .await?
        {
            Reply::Error(e) if e.contains("Unrecognized REPLCONF option") => {
                tracing::debug!("master does not take REPLCONF version (Redis): {e}");
            }
            Reply::Error(e) => bail!(
                "the master at {} refused REPLCONF version: {e}",
                self.endpoint
            ),
            _ => {}
        }
        Ok(())
    }

    /// Sends one plain command (before `PSYNC`) and returns its reply, an error reply
    /// included: the caller says what a refusal means.
    pub async fn query(&mut self, args: &[&[u8]]) -> Result<Reply> {
        self.request(args).await
    }

    /// The server's role (`ROLE`, before `PSYNC`): `None` for a master, `Some((host, port))`
    /// of its master for a replica. A server that refuses `ROLE` (an ACL without `+role`) is
    /// an error naming the permission.
    pub async fn master_of(&mut self) -> Result<Option<(String, u16)>> {
        let reply = self.request(&[b"ROLE"]).await?;
        let items = match reply {
            Reply::Array(items) => items,
            Reply::Error(e) => bail!(
                "{} refused ROLE: {e} (to tell a master from a replica, the agent's user needs +role, or set on_replica = \"stream\")",
                self.endpoint
            ),
            other => bail!("{} answered ROLE with {other:?}", self.endpoint),
        };
        let text = |r: Option<&Reply>| match r {
            Some(Reply::Bulk(Some(b))) => Some(String::from_utf8_lossy(b).into_owned()),
            Some(Reply::Simple(s)) => Some(s.clone()),
            _ => None,
        };
        match text(items.first()).as_deref() {
            Some("master") => Ok(None),
            Some("slave") | Some("replica") => {
                let host = text(items.get(1)).context("ROLE: no master host")?;
                let port = match items.get(2) {
                    Some(Reply::Integer(p)) => u16::try_from(*p).ok(),
                    other => text(other).and_then(|t| t.parse().ok()),
                }
                .context("ROLE: no master port")?;
                Ok(Some((host, port)))
            }
            other => bail!("{} answered ROLE with role {other:?}", self.endpoint),
        }
    }

    /// Sends `PSYNC` (`? -1` for a new snapshot, or the id and the first offset wanted)
    /// and reads the answer, skipping keep-alive newlines.
    pub async fn psync(&mut self, resume: Option<(&str, ReplicationOffset)>) -> Result<PsyncReply> {
        let (id, offset) = match resume {
            Some((id, next)) => (id.to_owned(), next.to_string()),
            None => ("?".to_owned(), "-1".to_owned()),
        };
        self.send(&[b"PSYNC", id.as_bytes(), offset.as_bytes()])
            .await?;
        loop {
            match decode_psync_reply(&mut self.buf) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => self.fill().await?,
                Err(e) => {
                    return Err(JobError::from(
                        anyhow!(e).context(format!("PSYNC {id} {offset} at {}", self.endpoint)),
                    ))
                }
            }
        }
    }

    /// The next step of a snapshot transfer (after `+FULLRESYNC`).
    pub async fn next_transfer_event(
        &mut self,
        dec: &mut RdbTransferDecoder,
    ) -> Result<TransferEvent> {
        loop {
            match dec.decode(&mut self.buf) {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => self.fill().await?,
                Err(e) => {
                    return Err(JobError::from(
                        anyhow!(e).context(format!("snapshot transfer from {}", self.endpoint)),
                    ))
                }
            }
        }
    }

    /// The next command of the replication stream.
    pub async fn next_command(&mut self, dec: &mut CommandDecoder) -> Result<ReplicatedCommand> {
        loop {
            match dec.decode(&mut self.buf) {
                Ok(Some(cmd)) => return Ok(cmd),
                Ok(None) => self.fill().await?,
                Err(e) => {
                    return Err(JobError::from(
                        anyhow!(e).context(format!("replication stream from {}", self.endpoint)),
                    ))
                }
            }
        }
    }

    /// Like [`next_command`](Self::next_command) but gives up after `wait` of silence,
    /// so a caller can flush chunks on time while traffic is idle.
    pub async fn next_command_within(
        &mut self,
        dec: &mut CommandDecoder,
        wait: Duration,
    ) -> Result<Option<ReplicatedCommand>> {
        if let Some(cmd) = dec.decode(&mut self.buf).map_err(|e| anyhow!(e))? {
            return Ok(Some(cmd));
        }
        if let Some(delay) = test_read_delay(&self.endpoint) {
            let until = *self
                .delayed_until
                .get_or_insert_with(|| tokio::time::Instant::now() + delay);
            tokio::time::sleep_until(until).await;
            self.delayed_until = None;
        }
        match tokio::time::timeout(wait, self.next_command(dec)).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// Test hook: `SYNCBRIDGE_TEST_REDIS_READ_DELAY=HOST:PORT=MS` makes the replication stream
/// from that master wait MS before each read of new commands, as a stream does while its
/// uploads hold it back (the offset probe is not delayed). Lets the cluster tests show that
/// a restore stays exact when one shard's stream is read late. Not for production use.
fn test_read_delay(endpoint: &str) -> Option<Duration> {
    static HOOK: std::sync::OnceLock<Option<(String, Duration)>> = std::sync::OnceLock::new();
    let hook = HOOK.get_or_init(|| {
        let v = std::env::var("SYNCBRIDGE_TEST_REDIS_READ_DELAY").ok()?;
        let (at, ms) = v.trim().rsplit_once('=')?;
        Some((at.to_owned(), Duration::from_millis(ms.parse().ok()?)))
    });
    hook.as_ref()
        .filter(|(at, _)| at == endpoint)
        .map(|(_, d)| *d)
}
