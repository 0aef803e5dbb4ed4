//! A PostgreSQL connection for replication: startup, authentication (SCRAM-SHA-256, MD5,
//! cleartext), simple queries and CopyBoth/CopyOut streaming, over TCP, TLS or a Unix socket.
//!
//! Frontend messages are encoded and backend messages decoded with `postgres-protocol`; each
//! backend frame is first cut with `wire::pg::frame::next_frame`, which refuses oversized
//! lengths before anything is allocated. Messages `postgres-protocol` does not know
//! (CopyBothResponse) and the hot path (CopyData) are handled directly.
//! Protocol reference: PostgreSQL docs, "Frontend/Backend Protocol" (Message Flow, Message
//! Formats) and "Streaming Replication Protocol".

use std::collections::{HashMap, VecDeque};
use std::fmt;

use anyhow::{anyhow, Context};
use bytes::{BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};

use super::channel_binding;
use super::conninfo::{
    ChannelBinding as ChannelBindingPolicy, ConnInfo, Host, SslMode, TargetSessionAttrs,
};
use super::tls;
use crate::job::{ErrorClass, JobError};
use wire::pg::frame::{next_frame, DEFAULT_MAX_FRAME_BODY};
use wire::pg::{Lsn, ResultCollector};

/// Every failure carries its class, decided here where it is understood (see `crate::job`):
/// a server error by its SQLSTATE, an I/O error by its kind.
type Result<T, E = JobError> = std::result::Result<T, E>;

/// `anyhow::bail!` for this module's error type (an unclassified, transient error).
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(JobError::from(anyhow!($($arg)*)))
    };
}

/// Anything we can speak the protocol over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the startup packet asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectMode {
    /// `replication=true`: a physical walsender (IDENTIFY_SYSTEM, START_REPLICATION, BASE_BACKUP).
    Physical,
    /// A normal backend for SQL.
    Sql,
}

/// An `ErrorResponse` from the server, with the fields operators need.
#[derive(Debug, Clone, Default)]
pub struct PgServerError {
    /// `ERROR`, `FATAL`, `PANIC`.
    pub severity: String,
    /// SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// `DETAIL`.
    pub detail: Option<String>,
    /// `HINT`.
    pub hint: Option<String>,
}

impl fmt::Display for PgServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server {}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PgServerError {}

impl PgServerError {
    fn from_fields(mut fields: ErrorFields<'_>) -> PgServerError {
        let mut e = PgServerError::default();
        while let Ok(Some(f)) = fields.next() {
            let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'V' => e.severity = v,
                b'S' if e.severity.is_empty() => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                b'H' => e.hint = Some(v),
                _ => {}
            }
        }
        e
    }

    /// What the error means for a job that retries: the server is starting up or shutting
    /// down (57P01..57P03) or the slot is in use by another process (55006): wait; a wrong
    /// password, a login pg_hba.conf refuses, a missing privilege, or a server that cannot
    /// stream (wal_level, 55000): fatal; anything else transient.
    pub fn class(&self) -> ErrorClass {
        match self.code.as_str() {
            c if c.starts_with("57P") || c == "55006" => ErrorClass::WaitingForServer,
            "28P01" | "28000" | "42501" | "55000" => ErrorClass::Fatal,
            _ => ErrorClass::Transient,
        }
    }

    /// What an operator should do about it, for the errors a backup agent meets most.
    pub fn advice(&self, user: &str) -> Option<String> {
        let m = self.message.as_str();
        match self.code.as_str() {
            "28P01" => Some(format!("wrong password for role {user:?}: check PGPASSWORD, the password file or the connection string")),
            "28000" if m.contains("pg_hba.conf") => Some(format!(
                "pg_hba.conf does not allow this connection: add e.g. `host replication {user} <agent address>/32 scram-sha-256` and reload"
            )),
            "42501" if m.contains("WAL sender") || m.contains("replication role") => Some(format!(
                "role {user:?} lacks the REPLICATION attribute: run `ALTER ROLE {user} REPLICATION;` as a superuser"
            )),
            "55006" => Some("the replication slot is in use by another connection: is another agent or standby streaming from it? Stop it or use --slot with another name".to_string()),
            "53300" if m.contains("max_wal_senders") => Some(
                "the server accepts no more WAL senders: raise max_wal_senders (it must be > 0, which needs wal_level=replica or logical) and restart PostgreSQL".to_string(),
            ),
            "55000" if m.contains("wal_level") => Some(
                "wal_level is too low for streaming: set wal_level = replica in postgresql.conf and restart PostgreSQL".to_string(),
            ),
            _ => None,
        }
    }
}

pub use wire::pg::results::QueryResult;

/// A message while in copy mode.
#[derive(Debug)]
pub enum CopyMessage {
    /// A CopyData payload.
    Data(Bytes),
    /// The server ended its side of the copy.
    Done,
}

/// What [`PgConnection::recv_wal`] received.
#[derive(Debug)]
pub enum WalRecv {
    /// An XLogData message begins: its `len` bytes of WAL, starting at `start`, follow as
    /// [`WalRecv::Data`].
    Header {
        start: Lsn,
        server_end: Lsn,
        len: usize,
    },
    /// This many more bytes of the current XLogData message were appended to the buffer.
    Data(usize),
    /// Any other CopyData payload (a keepalive) or the end of the copy.
    Other(CopyMessage),
}

/// CopyData header (tag, length) and XLogData header (`w`, start, end, send time).
const XLOG_DATA_HEADER: usize = 5 + 1 + 8 + 8 + 8;

/// After an XLogData message smaller than this, the next header is read together with
/// whatever follows it (up to [`READ_AHEAD`] bytes), and the WAL in it is copied out of the
/// receive buffer. A busy OLTP server sends a message per commit flush, a few KiB each
/// (pgbench: 6.6 KiB on average), where reading header and WAL separately took two or three
/// `recv` calls per message (measured: 101,200 for 277 MiB of pgbench WAL) and a syscall
/// costs more than copying a few KiB that are still in the cache. Full messages (128 KiB,
/// a server sending as fast as it can) keep the direct read into the segment buffer, the
/// only copy of their bytes.
const READ_AHEAD_BELOW: usize = 16 << 10;

/// Most bytes read past an XLogData header at once (see [`READ_AHEAD_BELOW`]).
const READ_AHEAD: usize = 64 << 10;

enum Backend {
    CopyData(Bytes),
    /// A message of a result set (see `ResultCollector::takes`): type byte and body.
    Result(u8, Bytes),
    CopyDone,
    CopyBothResponse,
    CopyOutResponse,
    Other(Message),
}

/// Caps the bytes a query's results may buffer (replication command results are tiny).
const MAX_RESULT_BYTES: usize = wire::pg::results::DEFAULT_MAX_RESULT_BYTES;

/// Every server of a multi-host source answered, none of the kind `target_session_attrs`
/// asks for: during a failover, until the standby is promoted, so worth waiting out.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoSuitableServer(pub String);

/// An open, authenticated connection.
pub struct PgConnection {
    reader: ReadHalf<Box<dyn Io>>,
    writer: WriteHalf<Box<dyn Io>>,
    rbuf: BytesMut,
    /// WAL bytes of the XLogData message being received that `recv_wal` has not yet
    /// delivered.
    wal_rest: usize,
    /// The last XLogData message was small: read past the next header (see [`READ_AHEAD`]).
    read_ahead: bool,
    /// How long to let small messages gather in the socket before waiting for them
    /// ([`PgConnection::coalesce_reads`]); zero reads each as it comes.
    coalesce: std::time::Duration,
    /// The end of the nap in progress (kept across a cancelled `recv_wal`).
    nap_until: Option<tokio::time::Instant>,
    /// A second handle of the TCP socket, to raise its receive low-water mark while a nap
    /// lasts (see `rcvlowat`); None for Unix sockets, kernels before Linux 4.18, and after
    /// raising it failed once.
    lowat: Option<std::os::fd::OwnedFd>,
    /// Lowering the mark again failed: reads could wait for 64 KiB, so the connection is
    /// given up (the stream reconnects) rather than trusted.
    lowat_stuck: std::sync::atomic::AtomicBool,
    /// Earlier receive blocks, used again once their slices are gone.
    blocks: RecvBlocks,
    wbuf: BytesMut,
    params: HashMap<String, String>,
    user: String,
    endpoint: String,
    /// The server of the source this connection reached (single-server).
    server: ConnInfo,
    /// Whether the connection is TLS.
    tls: bool,
    /// `tls-server-end-point` data of the server's certificate (TLS only, when computable).
    end_point: Option<Vec<u8>>,
    /// Whether the login was bound to this TLS connection (SCRAM-SHA-256-PLUS).
    bound: bool,
}

impl fmt::Debug for PgConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnection")
            .field("endpoint", &self.endpoint)
            .field("user", &self.user)
            .finish()
    }
}

impl PgConnection {
    /// Connects, negotiates TLS per `sslmode`, starts up and authenticates. A multi-host
    /// source is tried server by server, like libpq, until one accepts the connection and
    /// is of the kind `target_session_attrs` asks for.
    pub async fn connect(
        info: &ConnInfo,
        mode: ConnectMode,
        default_app_name: &str,
    ) -> Result<PgConnection> {
        let servers = info.servers();
        let attrs = info.target_session_attrs;
        if servers.len() == 1 && attrs == TargetSessionAttrs::Any {
            return PgConnection::connect_one(info, mode, default_app_name).await;
        }
        // prefer-standby: a first pass for standbys only, then anything.
        let passes: &[TargetSessionAttrs] = match attrs {
            TargetSessionAttrs::PreferStandby => {
                &[TargetSessionAttrs::Standby, TargetSessionAttrs::Any]
            }
            other => &[other][..],
        };
        let mut refused = Vec::new();
        let mut last_error = None;
        for &want in passes {
            for server in &servers {
                match PgConnection::connect_one(server, mode, default_app_name).await {
                    Ok(conn) => match conn.unsuitable_for(want) {
                        None => return Ok(conn),
                        Some(why) => {
                            refused.push(format!("{}: {why}", server.describe()));
                            conn.close().await;
                        }
                    },
                    Err(e) => {
                        refused.push(format!("{}: {e:#}", server.describe()));
                        last_error = Some(e);
                    }
                }
            }
        }
        let summary = format!(
            "no server of the source was usable (target_session_attrs={}): {}",
            attrs.as_str(),
            refused.join("; ")
        );
        // Keep the last connection error's type (retry vs fatal decisions depend on it).
        Err(match last_error {
            Some(e) => e.context(summary),
            None => JobError::waiting(NoSuitableServer(summary)),
        })
    }

    /// Why this server is not what `want` asks for, or `None` when it is.
    fn unsuitable_for(&self, want: TargetSessionAttrs) -> Option<String> {
        let on = |name: &str| self.parameter(name).map(|v| v == "on");
        let (Some(standby), Some(read_only)) =
            (on("in_hot_standby"), on("default_transaction_read_only"))
        else {
            return (want != TargetSessionAttrs::Any).then(|| {
                "did not report in_hot_standby/default_transaction_read_only (PostgreSQL 14 or later is needed for target_session_attrs)".to_string()
            });
        };
        let ok = match want {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !standby && !read_only,
            TargetSessionAttrs::ReadOnly => standby || read_only,
            TargetSessionAttrs::Primary => !standby,
            TargetSessionAttrs::Standby => standby,
        };
        (!ok).then(|| {
            format!(
                "is {} (in_hot_standby={}, default_transaction_read_only={}), not {}",
                if standby { "a standby" } else { "a primary" },
                if standby { "on" } else { "off" },
                if read_only { "on" } else { "off" },
                want.as_str()
            )
        })
    }

    /// A connection over `stream` to `info`'s server, before the startup exchange
    /// (plaintext; `connect_inner` records TLS). `lowat` is a second handle of the TCP
    /// socket for read coalescing (see `rcvlowat`).
    fn over(
        stream: Box<dyn Io>,
        lowat: Option<std::os::fd::OwnedFd>,
        info: &ConnInfo,
        endpoint: String,
    ) -> PgConnection {
        let (reader, writer) = tokio::io::split(stream);
        PgConnection {
            reader,
            writer,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wal_rest: 0,
            read_ahead: false,
            coalesce: std::time::Duration::ZERO,
            nap_until: None,
            lowat,
            lowat_stuck: Default::default(),
            blocks: RecvBlocks::default(),
            wbuf: BytesMut::new(),
            params: HashMap::new(),
            user: info.user.clone(),
            endpoint,
            server: info.clone(),
            tls: false,
            end_point: None,
            bound: false,
        }
    }

    async fn connect_one(
        info: &ConnInfo,
        mode: ConnectMode,
        default_app_name: &str,
    ) -> Result<PgConnection> {
        let endpoint = info.describe();
        let fut = PgConnection::connect_inner(info, mode, default_app_name);
        match info.connect_timeout {
            Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| {
                anyhow!("connecting to {endpoint}: timed out after {}s", t.as_secs())
            })?,
            None => fut.await,
        }
    }

    async fn connect_inner(
        info: &ConnInfo,
        mode: ConnectMode,
        default_app_name: &str,
    ) -> Result<PgConnection> {
        let endpoint = info.describe();
        let mut tls_on = false;
        let mut end_point = None;
        let mut lowat = None;
        let stream: Box<dyn Io> = match &info.host {
            Host::Socket(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", info.port));
                Box::new(
                    UnixStream::connect(&path).await.map_err(|e| {
                        JobError::io(e, format!("connecting to {}", path.display()))
                    })?,
                )
            }
            Host::Tcp(host) => {
                let mut tcp = TcpStream::connect((host.as_str(), info.port))
                    .await
                    .map_err(|e| JobError::io(e, format!("connecting to {endpoint}")))?;
                tcp.set_nodelay(true).ok();
                if super::rcvlowat::usable() {
                    lowat = std::os::fd::AsFd::as_fd(&tcp).try_clone_to_owned().ok();
                }
                match tls::client_config(info)? {
                    None => Box::new(tcp),
                    Some(config) => {
                        let mut req = BytesMut::new();
                        frontend::ssl_request(&mut req);
                        tcp.write_all(&req).await.map_err(|e| {
                            JobError::io(e, format!("sending SSLRequest to {endpoint}"))
                        })?;
                        let answer = tcp.read_u8().await.map_err(|e| {
                            JobError::io(e, format!("reading SSLRequest answer from {endpoint}"))
                        })?;
                        match answer {
                            b'S' => {
                                let connector = tokio_rustls::TlsConnector::from(config);
                                let tls = connector
                                    .connect(tls::server_name(host)?, tcp)
                                    .await
                                    .map_err(|e| JobError::io(e, format!("TLS handshake with {endpoint} (sslmode={:?})", info.sslmode)))?;
                                tls_on = true;
                                end_point = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| channel_binding::tls_server_end_point(c));
                                Box::new(tls)
                            }
                            b'N' if info.sslmode == SslMode::Prefer => Box::new(tcp),
                            b'N' => bail!("{endpoint} does not accept TLS but sslmode={:?} requires it: enable ssl on the server or lower sslmode", info.sslmode),
                            other => bail!("{endpoint} answered the SSLRequest with {other:#04x}: is this a PostgreSQL server?"),
                        }
                    }
                }
            }
        };
        let mut conn = PgConnection::over(stream, lowat, info, endpoint);
        conn.tls = tls_on;
        conn.end_point = end_point;
        let app = info
            .application_name
            .clone()
            .unwrap_or_else(|| default_app_name.to_string());
        let mut params: Vec<(&str, &str)> = vec![
            ("user", info.user.as_str()),
            ("application_name", app.as_str()),
        ];
        match mode {
            ConnectMode::Physical => params.push(("replication", "true")),
            ConnectMode::Sql => params.push(("database", info.dbname.as_str())),
        }
        frontend::startup_message(params.iter().copied(), &mut conn.wbuf)
            .context("encoding startup message")?;
        conn.flush().await?;
        conn.authenticate(info).await?;
        Ok(conn)
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<()> {
        let need_password = || {
            info.password.clone().with_context(|| {
                format!("{} asks for a password for role {:?} and none was given: set it in the connection string, PGPASSWORD or ~/.pgpass", info.describe(), info.user)
            })
        };
        let require_binding = info.channel_binding == ChannelBindingPolicy::Require;
        let unbound = |what: &str| {
            JobError::from(anyhow!(
                "{}: channel_binding=require, but the server {what}: connect over TLS (sslmode=require or stricter) to a role that logs in with scram-sha-256, or relax channel_binding",
                info.describe()
            ))
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.recv().await? {
                Backend::Other(Message::AuthenticationOk) => {
                    if require_binding && !self.bound {
                        return Err(unbound("accepted the login without SCRAM channel binding"));
                    }
                    break;
                }
                Backend::Other(Message::AuthenticationCleartextPassword) if require_binding => {
                    return Err(unbound("asks for a plain password"));
                }
                Backend::Other(Message::AuthenticationMd5Password(_)) if require_binding => {
                    return Err(unbound("asks for an MD5 password"));
                }
                Backend::Other(Message::AuthenticationCleartextPassword) => {
                    let pw = need_password()?;
                    frontend::password_message(pw.as_bytes(), &mut self.wbuf)
                        .map_err(anyhow::Error::new)?;
                    self.flush().await?;
                }
                Backend::Other(Message::AuthenticationMd5Password(body)) => {
                    let pw = need_password()?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        info.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                        .map_err(anyhow::Error::new)?;
                    self.flush().await?;
                }
                Backend::Other(Message::AuthenticationSasl(body)) => {
                    let mut mechanisms = body.mechanisms();
                    let (mut has_scram, mut has_plus) = (false, false);
                    while let Some(m) = mechanisms.next().map_err(anyhow::Error::new)? {
                        has_scram |= m == SCRAM_SHA_256;
                        has_plus |= m == SCRAM_SHA_256_PLUS;
                    }
                    let want_binding = info.channel_binding != ChannelBindingPolicy::Disable;
                    let binding = match (&self.end_point, want_binding && has_plus) {
                        (Some(hash), true) => Some(hash.clone()),
                        _ => None,
                    };
                    if require_binding && binding.is_none() {
                        return Err(unbound(if !self.tls {
                            "connection is not TLS"
                        } else if !has_plus {
                            "does not offer SCRAM-SHA-256-PLUS"
                        } else {
                            "certificate's signature algorithm names no hash for tls-server-end-point"
                        }));
                    }
                    if binding.is_none() && !has_scram {
                        bail!(
                            "{} offers no SASL mechanism we support (need SCRAM-SHA-256)",
                            self.endpoint
                        );
                    }
                    let pw = need_password()?;
                    // RFC 5802 gs2 flag: "p" binds; "y" says we could have bound but the
                    // server did not offer it (a server that did offer it then detects a
                    // downgrade); "n" says we cannot.
                    let (mechanism, cb) = match binding {
                        Some(hash) => (
                            SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(hash),
                        ),
                        None if want_binding && self.end_point.is_some() && !has_plus => {
                            (SCRAM_SHA_256, ChannelBinding::unrequested())
                        }
                        None => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                    };
                    self.bound = mechanism == SCRAM_SHA_256_PLUS;
                    let s = ScramSha256::new(pw.as_bytes(), cb);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.wbuf)
                        .map_err(anyhow::Error::new)?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Backend::Other(Message::AuthenticationSaslContinue(body)) => {
                    let s = scram.as_mut().context("SASL continue without SASL start")?;
                    s.update(body.data()).context("SCRAM exchange")?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)
                        .map_err(anyhow::Error::new)?;
                    self.flush().await?;
                }
                Backend::Other(Message::AuthenticationSaslFinal(body)) => {
                    let s = scram.as_mut().context("SASL final without SASL start")?;
                    s.finish(body.data()).context("SCRAM server signature does not verify: the server may not know the password")?;
                }
                Backend::Other(Message::ErrorResponse(body)) => {
                    return Err(self.server_error(PgServerError::from_fields(body.fields())))
                }
                Backend::Other(
                    Message::AuthenticationGss
                    | Message::AuthenticationSspi
                    | Message::AuthenticationKerberosV5
                    | Message::AuthenticationScmCredential,
                ) => {
                    bail!("{} requires an authentication method we do not support (GSS/SSPI/Kerberos); use scram-sha-256 or md5 in pg_hba.conf", self.endpoint)
                }
                _ => bail!(
                    "{}: unexpected message during authentication",
                    self.endpoint
                ),
            }
        }
        loop {
            match self.recv().await? {
                Backend::Other(Message::ReadyForQuery(_)) => return Ok(()),
                Backend::Other(Message::BackendKeyData(_)) => {}
                Backend::Other(Message::ErrorResponse(body)) => {
                    return Err(self.server_error(PgServerError::from_fields(body.fields())))
                }
                _ => bail!("{}: unexpected message after authentication", self.endpoint),
            }
        }
    }

    /// A server's error, with advice, classified by its SQLSTATE.
    fn server_error(&self, e: PgServerError) -> JobError {
        let advice = e.advice(&self.user);
        let class = e.class();
        let err = anyhow::Error::new(e);
        JobError::new(
            class,
            match advice {
                Some(a) => err.context(format!("{}: {a}", self.endpoint)),
                None => err.context(self.endpoint.clone()),
            },
        )
    }

    /// A server parameter reported at startup (`server_version`, `server_version_num`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// The server's major version (`server_version_num / 10000`).
    pub fn server_major(&self) -> Result<u32> {
        if let Some(num) = self
            .parameter("server_version_num")
            .and_then(|v| v.parse::<u32>().ok())
        {
            return Ok(num / 10000);
        }
        let v = self
            .parameter("server_version")
            .context("server did not report server_version")?;
        Ok(v.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("cannot read server_version {v:?}"))?)
    }

    /// How the connection is protected, for `postgres check`: TLS or not, and whether the
    /// login was bound to the TLS connection.
    pub fn security(&self) -> &'static str {
        match (self.tls, self.bound) {
            (false, _) => "no TLS",
            (true, false) => "TLS, login not channel-bound",
            (true, true) => "TLS, SCRAM channel binding (tls-server-end-point)",
        }
    }

    /// The server this connection reached, as a single-server source: a second connection
    /// to the same server (of a multi-host source) uses it.
    pub fn server(&self) -> &ConnInfo {
        &self.server
    }

    /// `host:port` of the server, for messages.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn flush(&mut self) -> Result<()> {
        self.writer
            .write_all(&self.wbuf)
            .await
            .map_err(|e| JobError::io(e, format!("writing to {}", self.endpoint)))?;
        self.writer
            .flush()
            .await
            .map_err(|e| JobError::io(e, format!("writing to {}", self.endpoint)))?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads the next message; cancel-safe (partial input stays buffered).
    async fn recv(&mut self) -> Result<Backend> {
        loop {
            if let Some(mut frame) = next_frame(&mut self.rbuf, DEFAULT_MAX_FRAME_BODY)
                .with_context(|| format!("reading from {}", self.endpoint))?
            {
                match frame[0] {
                    b'd' => return Ok(Backend::CopyData(frame.split_off(5).freeze())),
                    b'c' => return Ok(Backend::CopyDone),
                    b'W' => return Ok(Backend::CopyBothResponse),
                    b'H' => return Ok(Backend::CopyOutResponse),
                    tag if ResultCollector::takes(tag) => {
                        return Ok(Backend::Result(tag, frame.split_off(5).freeze()))
                    }
                    _ => {}
                }
                let msg = Message::parse(&mut frame)
                    .with_context(|| format!("malformed message from {}", self.endpoint))?
                    .context("incomplete message after framing")?;
                match msg {
                    Message::NoticeResponse(body) => {
                        let n = PgServerError::from_fields(body.fields());
                        tracing::info!(server = %self.endpoint, "server notice: {}", n.message);
                    }
                    Message::ParameterStatus(body) => {
                        if let (Ok(k), Ok(v)) = (body.name(), body.value()) {
                            self.params.insert(k.to_string(), v.to_string());
                        }
                    }
                    other => return Ok(Backend::Other(other)),
                }
                continue;
            }
            reserve_for_next_read(&mut self.rbuf, &mut self.blocks);
            let n = self
                .reader
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| JobError::io(e, format!("reading from {}", self.endpoint)))?;
            if n == 0 {
                // An I/O error underneath, so callers see a dropped connection (a server
                // shutting down or restarting) as the transient failure it is.
                let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                let what = if self.rbuf.is_empty() {
                    "closed the connection"
                } else {
                    "closed the connection in the middle of a message"
                };
                return Err(JobError::io(eof, format!("{} {what}", self.endpoint)));
            }
        }
    }

    /// IDENTIFY_SYSTEM: which cluster, timeline and WAL position the server is at.
    pub async fn identify_system(&mut self) -> Result<wire::pg::commands::IdentifySystem> {
        let results = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = results
            .first()
            .and_then(|r| r.row(0))
            .context("IDENTIFY_SYSTEM returned no row")?;
        Ok(wire::pg::commands::IdentifySystem::from_row(&row).map_err(anyhow::Error::new)?)
    }

    /// `SHOW wal_segment_size`: never assumed to be 16 MiB.
    pub async fn wal_segment_size(&mut self) -> Result<wire::pg::WalSegmentSize> {
        let text = self
            .simple_query("SHOW wal_segment_size")
            .await?
            .first()
            .context("SHOW wal_segment_size returned nothing")?
            .single_text()
            .map_err(anyhow::Error::new)?;
        Ok(wire::pg::WalSegmentSize::from_setting(&text).map_err(anyhow::Error::new)?)
    }

    /// Runs a simple query and returns every result set; a server error becomes an error
    /// with advice for the common cases.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<QueryResult>> {
        frontend::query(sql, &mut self.wbuf).map_err(anyhow::Error::new)?;
        self.flush().await?;
        self.collect_results().await
    }

    /// Reads result sets until ReadyForQuery.
    pub async fn collect_results(&mut self) -> Result<Vec<QueryResult>> {
        Ok(self.collect(false).await?.0)
    }

    /// The one result collector: result sets until ReadyForQuery (`false`) or, when
    /// `stop_at_copy_out`, until a CopyOutResponse (`true`). `MAX_RESULT_BYTES` bounds
    /// what it buffers either way (`wire::pg::ResultCollector`). A server error is returned
    /// once the server is ready again, so the connection stays usable.
    async fn collect(&mut self, stop_at_copy_out: bool) -> Result<(Vec<QueryResult>, bool)> {
        let mut collector = ResultCollector::new(MAX_RESULT_BYTES);
        let mut error: Option<PgServerError> = None;
        loop {
            match self.recv().await? {
                Backend::Result(tag, body) => collector
                    .feed(tag, body)
                    .with_context(|| format!("query result from {}", self.endpoint))?,
                Backend::CopyOutResponse if stop_at_copy_out && error.is_none() => {
                    return Ok((collector.finish(), true))
                }
                Backend::Other(Message::ErrorResponse(body)) => {
                    error = Some(PgServerError::from_fields(body.fields()))
                }
                Backend::Other(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(self.server_error(e)),
                        None => Ok((collector.finish(), false)),
                    };
                }
                Backend::CopyBothResponse | Backend::CopyOutResponse => {
                    bail!("{}: unexpected COPY in a query result", self.endpoint)
                }
                _ => bail!("{}: unexpected message in a query result", self.endpoint),
            }
        }
    }

    /// Sends a command that switches to CopyBoth (`START_REPLICATION`); returns once the
    /// server confirmed, or with the server's error (slot in use, WAL removed, …).
    pub async fn start_copy_both(&mut self, sql: &str) -> Result<()> {
        frontend::query(sql, &mut self.wbuf).map_err(anyhow::Error::new)?;
        self.flush().await?;
        loop {
            match self.recv().await? {
                Backend::CopyBothResponse => return Ok(()),
                Backend::Other(Message::ErrorResponse(body)) => {
                    let e = PgServerError::from_fields(body.fields());
                    // drain to ReadyForQuery so the connection stays usable
                    loop {
                        if let Backend::Other(Message::ReadyForQuery(_)) = self.recv().await? {
                            break;
                        }
                    }
                    return Err(self.server_error(e));
                }
                Backend::Result(..) => {}
                _ => bail!(
                    "{}: unexpected message waiting for CopyBothResponse",
                    self.endpoint
                ),
            }
        }
    }

    /// Sends a command whose result contains CopyOut streams (`BASE_BACKUP`) and returns the
    /// result sets received before the first CopyOut (or all of them if none came).
    pub async fn start_copy_out(&mut self, sql: &str) -> Result<(Vec<QueryResult>, bool)> {
        frontend::query(sql, &mut self.wbuf).map_err(anyhow::Error::new)?;
        self.flush().await?;
        self.results_until_copy_out().await
    }

    /// Reads result sets until a CopyOutResponse (`true`) or ReadyForQuery (`false`).
    pub async fn results_until_copy_out(&mut self) -> Result<(Vec<QueryResult>, bool)> {
        self.collect(true).await
    }

    /// Next message while copying; cancel-safe.
    pub async fn recv_copy(&mut self) -> Result<CopyMessage> {
        match self.recv().await? {
            Backend::CopyData(d) => Ok(CopyMessage::Data(d)),
            Backend::CopyDone | Backend::Result(b'C', _) => Ok(CopyMessage::Done),
            Backend::Other(Message::ErrorResponse(body)) => {
                Err(self.server_error(PgServerError::from_fields(body.fields())))
            }
            _ => bail!("{}: unexpected message during COPY", self.endpoint),
        }
    }

    /// While the server sends small XLogData messages (one per commit flush: an OLTP
    /// load), wait up to `nap` whenever a read finds nothing waiting, before waiting for the
    /// socket to be readable, so the messages of that time are read in one wake-up instead
    /// of one wake-up each. A server flushing 1,400 times a second costs a receiver about as
    /// much CPU in wake-ups as everything else together (measured: pgbench, 11 MiB/s of WAL,
    /// the agent and `pg_receivewal` alike). During the nap the TCP socket's receive
    /// low-water mark is raised to [`READ_AHEAD`] (Linux 4.18+, `rcvlowat`), so arrivals do
    /// not wake the thread; the nap ends early once that much is waiting, and the mark is
    /// lowered however it ends. WAL then reaches the caller up to `nap` (plus the timer's
    /// millisecond) later than it reached the socket: callers that promise a bound on that
    /// (`--max-lag`) count it, and synchronous streaming, where a commit waits for the
    /// flush, leaves this at zero. While messages of 16 KiB and more arrive (a server
    /// sending as fast as it can) there are no naps; only the first of them after a small
    /// one can wait for one.
    pub fn coalesce_reads(&mut self, nap: std::time::Duration) {
        self.coalesce = nap;
    }

    /// WAL bytes of the current XLogData message still to come from [`recv_wal`]: while
    /// not zero, its caller must offer room for them.
    ///
    /// [`recv_wal`]: Self::recv_wal
    pub fn wal_pending(&self) -> usize {
        self.wal_rest
    }

    /// Next event while streaming WAL (`START_REPLICATION`); cancel-safe (a nap's end and
    /// everything read are kept; the low-water mark is lowered). The WAL of an XLogData
    /// message is appended to `dest`, at most `room` bytes at a time (`room` must not exceed
    /// `dest`'s spare capacity, and must be at least 1 while
    /// [`wal_pending`](Self::wal_pending) is not zero). After a message of 16 KiB or more
    /// the next header is read on its own (30 bytes) and its WAL straight from the socket
    /// into `dest`: the kernel's copy is the only one, where receiving whole messages into a
    /// buffer first needs a second copy to make the WAL of consecutive messages contiguous.
    /// After a smaller one the header is read with up to [`READ_AHEAD`] bytes after it and
    /// the WAL copied out of the receive buffer, with naps between reads when
    /// [`coalesce_reads`](Self::coalesce_reads) asks for them. Other messages take the
    /// ordinary path.
    pub async fn recv_wal(&mut self, dest: &mut BytesMut, room: usize) -> Result<WalRecv> {
        use bytes::Buf;
        loop {
            if self.lowat_stuck.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(JobError::io(
                    std::io::Error::other("could not lower SO_RCVLOWAT after a nap"),
                    format!("reading from {}", self.endpoint),
                ));
            }
            if self.wal_rest > 0 {
                let want = self.wal_rest.min(room).min(dest.capacity() - dest.len());
                if want == 0 {
                    return Err(anyhow!("internal: no room for the WAL being received").into());
                }
                let n = if self.rbuf.is_empty() {
                    let mut into = (&mut *dest).limit(want);
                    let n =
                        self.reader.read_buf(&mut into).await.map_err(|e| {
                            JobError::io(e, format!("reading from {}", self.endpoint))
                        })?;
                    if n == 0 {
                        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                        return Err(JobError::io(
                            eof,
                            format!(
                                "{} closed the connection in the middle of a message",
                                self.endpoint
                            ),
                        ));
                    }
                    n
                } else {
                    let n = want.min(self.rbuf.len());
                    dest.extend_from_slice(&self.rbuf[..n]);
                    self.rbuf.advance(n);
                    n
                };
                self.wal_rest -= n;
                return Ok(WalRecv::Data(n));
            }
            let b = &self.rbuf;
            let xlog = b.len() >= 6 && b[0] == b'd' && b[5] == b'w';
            if xlog && b.len() >= XLOG_DATA_HEADER {
                let be64 = |at: usize| {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&b[at..at + 8]);
                    u64::from_be_bytes(v)
                };
                let body = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
                if !(XLOG_DATA_HEADER - 1..=DEFAULT_MAX_FRAME_BODY).contains(&body) {
                    return Err(anyhow!(
                        "malformed XLogData from {}: message length {body}",
                        self.endpoint
                    )
                    .into());
                }
                let (start, server_end) = (Lsn(be64(6)), Lsn(be64(14)));
                self.rbuf.advance(XLOG_DATA_HEADER);
                self.wal_rest = body + 1 - XLOG_DATA_HEADER;
                self.read_ahead = self.wal_rest < READ_AHEAD_BELOW;
                return Ok(WalRecv::Header {
                    start,
                    server_end,
                    len: self.wal_rest,
                });
            }
            if !xlog && (b.len() >= 6 || (!b.is_empty() && b[0] != b'd')) {
                return Ok(WalRecv::Other(self.recv_copy().await?));
            }
            // Only the rest of the header, so the WAL after it is read into `dest`; or,
            // after a small message, the header and what follows (see READ_AHEAD_BELOW).
            let want = if self.read_ahead {
                READ_AHEAD
            } else {
                XLOG_DATA_HEADER - self.rbuf.len()
            };
            if self.rbuf.capacity() - self.rbuf.len() < want && !self.rbuf.try_reclaim(want) {
                // A fresh allocation, not one of the receive blocks: not kept for reuse
                // when the connection moves on from it (`RecvBlocks::retire`).
                self.rbuf.reserve(want);
                self.blocks.current = 0;
            }
            if self.read_ahead && !self.coalesce.is_zero() {
                let ready = {
                    use futures::FutureExt;
                    let mut into = (&mut self.rbuf).limit(want);
                    // Unconstrained: a spent cooperative budget must not pass for an empty
                    // socket.
                    tokio::task::unconstrained(self.reader.read_buf(&mut into)).now_or_never()
                };
                match ready {
                    // EOF: the read below reports it.
                    Some(Ok(0)) => {}
                    Some(Ok(_)) => {
                        self.nap_until = None;
                        continue;
                    }
                    Some(Err(e)) => {
                        return Err(JobError::io(e, format!("reading from {}", self.endpoint)))
                    }
                    None => {
                        // Nothing waiting: let the next messages gather (see
                        // `coalesce_reads`). The nap's end is kept until bytes arrive, so a
                        // call cancelled during or after it does not nap again.
                        let coalesce = self.coalesce;
                        let until = *self
                            .nap_until
                            .get_or_insert_with(|| tokio::time::Instant::now() + coalesce);
                        if until > tokio::time::Instant::now() {
                            if let Some(fd) = &self.lowat {
                                if let Err(e) = super::rcvlowat::set(fd, READ_AHEAD) {
                                    tracing::warn!(
                                        "SO_RCVLOWAT not set ({e}): small WAL messages wake the stream as they arrive"
                                    );
                                    self.lowat = None;
                                }
                            }
                            // Lowers the mark again however the nap ends.
                            let mark = self.lowat.as_ref().map(|socket| RaisedLowWater {
                                socket,
                                stuck: &self.lowat_stuck,
                            });
                            if mark.is_some() {
                                // Arrivals no longer wake us; READ_AHEAD bytes waiting make
                                // the socket readable and end the nap early.
                                let mut into = (&mut self.rbuf).limit(want);
                                tokio::select! {
                                    r = self.reader.read_buf(&mut into) => match r {
                                        Ok(0) => {}
                                        Ok(_) => {
                                            self.nap_until = None;
                                            continue;
                                        }
                                        Err(e) => {
                                            return Err(JobError::io(
                                                e,
                                                format!("reading from {}", self.endpoint),
                                            ))
                                        }
                                    },
                                    () = tokio::time::sleep_until(until) => {}
                                }
                            } else {
                                // Without the mark a read would end the nap at the first
                                // arrival: only the timer.
                                tokio::time::sleep_until(until).await;
                            }
                            drop(mark);
                        }
                    }
                }
            }
            let mut into = (&mut self.rbuf).limit(want);
            let n = self
                .reader
                .read_buf(&mut into)
                .await
                .map_err(|e| JobError::io(e, format!("reading from {}", self.endpoint)))?;
            if n == 0 {
                let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                return Err(JobError::io(
                    eof,
                    format!("{} closed the connection", self.endpoint),
                ));
            }
            self.nap_until = None;
        }
    }

    /// Sends one CopyData message.
    pub async fn send_copy_data(&mut self, payload: &[u8]) -> Result<()> {
        self.wbuf.reserve(5 + payload.len());
        self.wbuf.put_u8(b'd');
        self.wbuf.put_u32(4 + payload.len() as u32);
        self.wbuf.put_slice(payload);
        self.flush().await
    }

    /// Ends our side of CopyBoth.
    pub async fn send_copy_done(&mut self) -> Result<()> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await
    }

    /// Sends Terminate and closes (best effort).
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.writer.shutdown().await;
    }
}

/// Lowers the socket's receive low-water mark (raised to [`READ_AHEAD`] for a nap, see
/// `rcvlowat`) when dropped, which makes the kernel report data already waiting. If
/// lowering fails, `stuck` is set and the connection refuses further reads.
struct RaisedLowWater<'a> {
    socket: &'a std::os::fd::OwnedFd,
    stuck: &'a std::sync::atomic::AtomicBool,
}

impl Drop for RaisedLowWater<'_> {
    fn drop(&mut self) {
        if let Err(e) = super::rcvlowat::set(self.socket, 1) {
            tracing::error!("could not lower SO_RCVLOWAT after a nap ({e}): reconnecting");
            self.stuck.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Receive buffers are allocated this large: frames (128 KiB XLogData messages) are split
/// off them without copying and live on as slices until their WAL is stored.
const READ_BLOCK: usize = 1 << 20;

/// Receive blocks kept for reuse: more than the WAL a stream holds with 16 MiB segments
/// (the open segment, its partial upload and `--max-inflight` segment uploads, each
/// possibly retrying) in 1 MiB blocks. Keeping a handle costs nothing while the block is
/// in use, and a free block is always reused before a new one is allocated, so this never
/// holds more memory than was in use at once.
const MAX_RETIRED_BLOCKS: usize = 192;

/// Receive blocks the connection has moved on from. Their bytes live on as slices (WAL
/// waiting to be stored); once every slice of a block is gone, the block is read into
/// again. A fresh allocation instead costs a page fault and the kernel zeroing every page
/// before the socket data is copied in (measured: 8-10% of the stream's CPU). This never
/// holds more blocks than were in use at once.
#[derive(Default)]
struct RecvBlocks {
    retired: VecDeque<BytesMut>,
    /// Size of the block in use, when it came from `take`.
    current: usize,
}

impl RecvBlocks {
    /// A block with room for `cap` bytes: a retired one no slice refers to any more, or
    /// a new one.
    fn take(&mut self, cap: usize) -> BytesMut {
        let free = self.retired.iter_mut().position(|b| b.try_reclaim(cap));
        let b = match free.and_then(|i| self.retired.remove(i)) {
            Some(b) => b,
            None => BytesMut::with_capacity(cap),
        };
        self.current = b.capacity();
        b
    }

    /// Keeps `block` (emptied; its slices keep their bytes), of `size` bytes, for reuse;
    /// not one made for an unusually large message, nor the first, small buffer.
    fn retire(&mut self, mut block: BytesMut, size: usize) {
        if !(READ_BLOCK..=2 * READ_BLOCK).contains(&size) {
            return;
        }
        block.clear();
        self.retired.push_back(block);
        if self.retired.len() > MAX_RETIRED_BLOCKS {
            self.retired.pop_front();
        }
    }
}

/// Makes room for the rest of the frame being received (its length is in its header) plus
/// more, in one block. Without this, `read_buf` on a full buffer grows it by a few bytes
/// at a time, copying the partial frame again on each growth (measured: 6% of the
/// stream's CPU in memmove). The partial frame moves to a block from `blocks`.
fn reserve_for_next_read(buf: &mut BytesMut, blocks: &mut RecvBlocks) {
    let frame_rest = if buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
        // `next_frame` already refused a length over the cap; stay within it regardless.
        len.min(DEFAULT_MAX_FRAME_BODY + 5)
            .saturating_sub(buf.len())
    } else {
        0
    };
    let spare = buf.capacity() - buf.len();
    if spare >= frame_rest.max(16 << 10) {
        return;
    }
    let additional = frame_rest.max(READ_BLOCK - buf.len().min(READ_BLOCK / 2));
    // Nothing refers to the current block any more (e.g. only queries so far): reuse it.
    if buf.try_reclaim(additional) {
        return;
    }
    let old_size = blocks.current;
    let mut next = blocks.take(buf.len() + additional);
    next.extend_from_slice(buf);
    let old = std::mem::replace(buf, next);
    blocks.retire(old, old_size);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_errors_are_classified_by_sqlstate() {
        let e = |code: &str| PgServerError {
            code: code.into(),
            ..PgServerError::default()
        };
        for code in ["57P01", "57P02", "57P03", "55006"] {
            assert_eq!(e(code).class(), ErrorClass::WaitingForServer, "{code}");
        }
        for code in ["28P01", "28000", "42501", "55000"] {
            assert_eq!(e(code).class(), ErrorClass::Fatal, "{code}");
        }
        for code in ["53300", "58P01", "XX000"] {
            assert_eq!(e(code).class(), ErrorClass::Transient, "{code}");
        }
    }

    /// Fills the rest of `buf`'s block with a frame and leaves 5 bytes of the next one.
    fn fill_block(buf: &mut BytesMut) -> Bytes {
        let n = buf.capacity() - buf.len() - 5;
        buf.extend_from_slice(&vec![7u8; n]);
        let frame = buf.split().freeze();
        buf.extend_from_slice(&[b'd', 0, 0, 0, 104]);
        frame
    }

    #[test]
    fn receive_blocks_are_reused_once_their_slices_are_gone() {
        let mut blocks = RecvBlocks::default();
        let mut buf = BytesMut::new();
        reserve_for_next_read(&mut buf, &mut blocks);
        let first = buf.as_ptr();
        let held = fill_block(&mut buf);
        // The frame still refers to the first block: the partial frame moves to a new one.
        reserve_for_next_read(&mut buf, &mut blocks);
        assert_ne!(buf.as_ptr(), first);
        assert_eq!(&buf[..], &[b'd', 0, 0, 0, 104]);
        let second = fill_block(&mut buf);
        drop(held);
        // The first block is free again: read into it, not into fresh pages.
        reserve_for_next_read(&mut buf, &mut blocks);
        assert_eq!(buf.as_ptr(), first);
        assert_eq!(&buf[..], &[b'd', 0, 0, 0, 104]);
        assert!(buf.capacity() - buf.len() >= 100);
        assert!(
            second[5..].iter().all(|b| *b == 7),
            "slices keep their bytes"
        );
    }

    #[test]
    fn retired_blocks_are_bounded() {
        let mut blocks = RecvBlocks::default();
        let mut buf = BytesMut::new();
        let mut held = Vec::new();
        for _ in 0..MAX_RETIRED_BLOCKS + 10 {
            reserve_for_next_read(&mut buf, &mut blocks);
            held.push(fill_block(&mut buf));
        }
        assert!(blocks.retired.len() <= MAX_RETIRED_BLOCKS);
    }

    /// Counts the reads that returned bytes, to see how many `recv` calls a stream needs.
    struct CountingIo {
        inner: Box<dyn Io>,
        reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncRead for CountingIo {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
            if buf.filled().len() > before {
                self.reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        }
    }

    impl AsyncWrite for CountingIo {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    type Reads = std::sync::Arc<std::sync::atomic::AtomicUsize>;

    /// A connection over `io`, as if logged in and streaming, and the count of its reads
    /// that returned bytes.
    fn test_conn(io: Box<dyn Io>, lowat: Option<std::os::fd::OwnedFd>) -> (PgConnection, Reads) {
        let reads = Reads::default();
        let io: Box<dyn Io> = Box::new(CountingIo {
            inner: io,
            reads: reads.clone(),
        });
        let info = ConnInfo::parse("postgres://replicator@127.0.0.1/postgres").unwrap();
        let conn = PgConnection::over(io, lowat, &info, "test server".into());
        (conn, reads)
    }

    /// A connection over an in-memory pipe.
    fn piped(io: tokio::io::DuplexStream) -> (PgConnection, Reads) {
        test_conn(Box::new(io), None)
    }

    /// A connection over a real TCP socket on 127.0.0.1 with its low-water mark handle, as
    /// `connect` makes it; the other end; and a handle to read the mark. Fails (rather than
    /// passing untested) on a kernel without a usable SO_RCVLOWAT (before Linux 4.18),
    /// where production reads without the mark.
    async fn over_tcp() -> (PgConnection, Reads, TcpStream, std::os::fd::OwnedFd) {
        assert!(
            crate::pg::rcvlowat::usable(),
            "this kernel has no usable SO_RCVLOWAT (Linux 4.18 or later): these tests need one"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let fd = |s: &TcpStream| std::os::fd::AsFd::as_fd(s).try_clone_to_owned().unwrap();
        let (lowat, probe) = (fd(&client), fd(&client));
        let (conn, reads) = test_conn(Box::new(client), Some(lowat));
        (conn, reads, server, probe)
    }

    fn mark(probe: &std::os::fd::OwnedFd) -> usize {
        crate::pg::rcvlowat::get(probe).unwrap()
    }

    #[tokio::test]
    async fn over_tcp_a_nap_raises_the_mark_and_ends_with_the_waiting_wal_read() {
        // The last small message before a quiet spell must arrive once the nap ends, not
        // when more data comes.
        let (mut conn, reads, mut server, probe) = over_tcp().await;
        conn.coalesce_reads(std::time::Duration::from_millis(50));
        let mut dest = BytesMut::with_capacity(1 << 20);
        let limit = std::time::Duration::from_secs(5);
        for i in 0..4u64 {
            // The first message is read at once; each later one is sent 10 ms into the
            // nap that begins when the reader finds the socket empty, so it waits under
            // the raised mark until the nap ends.
            let message = xlog_data(0x4000_0000 + i * 100, &[i as u8; 100]);
            let started = std::time::Instant::now();
            let header = {
                let recv = tokio::time::timeout(limit, conn.recv_wal(&mut dest, 0));
                tokio::pin!(recv);
                if i > 0 {
                    // One poll starts the nap: the mark stays raised until the next.
                    assert!(futures::poll!(&mut recv).is_pending());
                    assert_eq!(mark(&probe), READ_AHEAD, "mark during the nap");
                }
                let send = async {
                    if i > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    server.write_all(&message).await.unwrap();
                };
                let (header, ()) = tokio::join!(recv, send);
                header
            };
            let header = header.expect("header in time").unwrap();
            assert!(
                matches!(header, WalRecv::Header { len: 100, .. }),
                "{header:?}"
            );
            assert_eq!(mark(&probe), 1, "mark after the nap");
            let data = tokio::time::timeout(limit, conn.recv_wal(&mut dest, 1 << 20))
                .await
                .expect("WAL in time")
                .unwrap();
            assert!(matches!(data, WalRecv::Data(100)), "{data:?}");
            let took = started.elapsed();
            assert!(took < std::time::Duration::from_secs(2), "{took:?}");
            if i > 0 {
                assert!(
                    took >= std::time::Duration::from_millis(45),
                    "no nap: {took:?}"
                );
            }
        }
        assert_eq!(dest.len(), 400);

        // A call cancelled in the middle of a nap lowers the mark, and the next call still
        // delivers a message sent after it, within the same nap's end.
        let cancelled = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            conn.recv_wal(&mut dest, 0),
        )
        .await;
        assert!(cancelled.is_err(), "{cancelled:?}");
        assert_eq!(mark(&probe), 1, "mark after a cancelled nap");
        server
            .write_all(&xlog_data(0x4000_0190, &[9; 100]))
            .await
            .unwrap();
        let header = tokio::time::timeout(limit, conn.recv_wal(&mut dest, 0))
            .await
            .expect("header after a cancelled nap")
            .unwrap();
        assert!(matches!(header, WalRecv::Header { len: 100, .. }));
        let data = tokio::time::timeout(limit, conn.recv_wal(&mut dest, 1 << 20))
            .await
            .expect("WAL after a cancelled nap")
            .unwrap();
        assert!(matches!(data, WalRecv::Data(100)), "{data:?}");

        // Small messages arriving 2 ms apart are read a nap's worth at a time: without
        // naps each would take a read of its own.
        let before = reads.load(std::sync::atomic::Ordering::Relaxed);
        let messages: Vec<Vec<u8>> = (0..40u64)
            .map(|i| xlog_data(0x5000_0000 + i * 512, &[i as u8; 512]))
            .collect();
        let writer = tokio::spawn(async move {
            for m in messages {
                server.write_all(&m).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            server.write_all(&[b'c', 0, 0, 0, 4]).await.unwrap();
            server
        });
        let (got, headers, _) = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            receive_all(&mut conn, 1 << 20),
        )
        .await
        .expect("every message in time");
        assert_eq!((got.len(), headers.len()), (40 * 512, 40));
        let reads = reads.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(reads <= 30, "{reads} reads for 40 messages 2 ms apart");
        drop(writer.await.unwrap());
    }

    fn xlog_data(start: u64, wal: &[u8]) -> Vec<u8> {
        let mut m = vec![b'd'];
        m.extend_from_slice(&((4 + 25 + wal.len()) as u32).to_be_bytes());
        m.push(b'w');
        m.extend_from_slice(&start.to_be_bytes());
        m.extend_from_slice(&(start + wal.len() as u64).to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(wal);
        m
    }

    fn keepalive(end: u64) -> Vec<u8> {
        let mut m = vec![b'd'];
        m.extend_from_slice(&(4u32 + 18).to_be_bytes());
        m.push(b'k');
        m.extend_from_slice(&end.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.push(0);
        m
    }

    /// Receives until CopyDone: (every WAL byte in order, the headers' (start, len), the
    /// keepalives seen).
    async fn receive_all(
        conn: &mut PgConnection,
        room: usize,
    ) -> (Vec<u8>, Vec<(u64, usize)>, usize) {
        let mut dest = BytesMut::with_capacity(4 << 20);
        let (mut headers, mut keepalives) = (Vec::new(), 0);
        loop {
            let room = if conn.wal_pending() > 0 { room } else { 0 };
            match conn.recv_wal(&mut dest, room).await.unwrap() {
                WalRecv::Header { start, len, .. } => headers.push((start.0, len)),
                WalRecv::Data(n) => assert!(n > 0 && n <= room),
                WalRecv::Other(CopyMessage::Data(d)) => {
                    assert_eq!(d[0], b'k');
                    keepalives += 1;
                }
                WalRecv::Other(CopyMessage::Done) => return (dest.to_vec(), headers, keepalives),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wal_of_small_and_full_messages_arrives_whole_and_in_order() {
        // Sizes around the read-ahead threshold and the server's 128 KiB maximum, with
        // keepalives between them, written in pieces that cut headers and WAL anywhere.
        let sizes = [
            1usize, 30, 100, 6_000, 16_383, 16_384, 16_385, 70_000, 131_072, 2, 131_072, 9_000, 3,
            65_536, 65_537, 500, 131_072, 1,
        ];
        let (mut stream, mut wire_bytes, mut wal, mut expect_headers) =
            (Vec::new(), 0usize, Vec::new(), Vec::new());
        let mut at = 0x1_0000_0000u64;
        for (i, &n) in sizes.iter().enumerate() {
            let chunk: Vec<u8> = (0..n).map(|j| (j * 31 + i * 7) as u8).collect();
            stream.extend(xlog_data(at, &chunk));
            expect_headers.push((at, n));
            wal.extend_from_slice(&chunk);
            at += n as u64;
            if i % 3 == 0 {
                stream.extend(keepalive(at));
            }
        }
        stream.extend_from_slice(&[b'c', 0, 0, 0, 4]);
        wire_bytes += stream.len();
        for (piece, room) in [
            (7usize, 4096usize),
            (1000, 1 << 20),
            (70_001, 333),
            (1 << 20, 1 << 20),
        ] {
            let (client, mut server) = tokio::io::duplex(256 << 10);
            let (mut conn, _) = piped(client);
            // Naps (on the paused clock) when the pipe is found empty, with a partial
            // header or keepalive in the buffer, for half the cases.
            if piece % 2 == 1 {
                conn.coalesce_reads(std::time::Duration::from_millis(5));
            }
            let data = stream.clone();
            let writer = tokio::spawn(async move {
                for p in data.chunks(piece) {
                    server.write_all(p).await.unwrap();
                }
                server
            });
            let (got, headers, keepalives) = receive_all(&mut conn, room).await;
            assert!(got == wal, "WAL differs (pieces of {piece}, room {room})");
            assert_eq!(headers, expect_headers, "pieces of {piece}, room {room}");
            assert_eq!(keepalives, sizes.len().div_ceil(3));
            drop(writer.await.unwrap());
        }
        assert!(wire_bytes > wal.len());
    }

    #[tokio::test]
    async fn small_messages_share_reads() {
        // 400 messages of 2 KiB already waiting (an OLTP server flushing per commit):
        // reading each header on its own took at least two reads per message.
        let messages = 400usize;
        let mut stream = Vec::new();
        let mut wal = Vec::new();
        for i in 0..messages {
            let chunk = vec![i as u8; 2048];
            stream.extend(xlog_data(0x1000_0000 + (i * 2048) as u64, &chunk));
            wal.extend_from_slice(&chunk);
        }
        stream.extend_from_slice(&[b'c', 0, 0, 0, 4]);
        let (client, mut server) = tokio::io::duplex(4 << 20);
        server.write_all(&stream).await.unwrap();
        let (mut conn, reads) = piped(client);
        let (got, headers, _) = receive_all(&mut conn, 1 << 20).await;
        assert!(got == wal);
        assert_eq!(headers.len(), messages);
        let reads = reads.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            reads <= messages / 10,
            "{reads} reads for {messages} messages of 2 KiB"
        );
    }

    /// Writes `messages` to the pipe one at a time, `gap` apart, then CopyDone.
    fn trickle(
        mut server: tokio::io::DuplexStream,
        messages: Vec<Vec<u8>>,
        gap: std::time::Duration,
    ) -> tokio::task::JoinHandle<tokio::io::DuplexStream> {
        tokio::spawn(async move {
            for m in messages {
                server.write_all(&m).await.unwrap();
                tokio::time::sleep(gap).await;
            }
            server.write_all(&[b'c', 0, 0, 0, 4]).await.unwrap();
            server
        })
    }

    #[tokio::test(start_paused = true)]
    async fn coalescing_reads_small_messages_arriving_one_by_one_together() {
        // 100 commits of 1 KiB, 2 ms apart: read as they come, then with 50 ms naps.
        let messages: Vec<Vec<u8>> = (0..100u64)
            .map(|i| xlog_data(0x2000_0000 + i * 1024, &[i as u8; 1024]))
            .collect();
        let gap = std::time::Duration::from_millis(2);
        let mut reads_seen = Vec::new();
        for nap in [0, 50] {
            let (client, server) = tokio::io::duplex(1 << 20);
            let (mut conn, reads) = piped(client);
            conn.coalesce_reads(std::time::Duration::from_millis(nap));
            let writer = trickle(server, messages.clone(), gap);
            let (got, headers, _) = receive_all(&mut conn, 1 << 20).await;
            assert_eq!(headers.len(), 100);
            assert!(got
                .chunks(1024)
                .enumerate()
                .all(|(i, c)| c == [i as u8; 1024]));
            drop(writer.await.unwrap());
            reads_seen.push(reads.load(std::sync::atomic::Ordering::Relaxed));
        }
        assert!(
            reads_seen[0] >= 100,
            "reads without coalescing: {reads_seen:?}"
        );
        assert!(reads_seen[1] <= 10, "reads with 50 ms naps: {reads_seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn coalescing_never_delays_full_messages() {
        // A server sending as fast as it can sends 128 KiB messages: no nap after them,
        // however long the naps are.
        let messages: Vec<Vec<u8>> = (0..4u64)
            .map(|i| xlog_data(0x3000_0000 + i * 131_072, &vec![i as u8; 131_072]))
            .collect();
        let (client, server) = tokio::io::duplex(1 << 20);
        let (mut conn, _) = piped(client);
        conn.coalesce_reads(std::time::Duration::from_secs(10));
        let started = tokio::time::Instant::now();
        let writer = trickle(server, messages, std::time::Duration::from_millis(5));
        let (got, headers, _) = receive_all(&mut conn, 1 << 20).await;
        assert_eq!((got.len(), headers.len()), (4 * 131_072, 4));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_nap_cut_short_by_cancellation_is_not_taken_twice() {
        // A call cancelled after its nap ended, while waiting for data, keeps the nap's
        // end: the next call waits for data at once instead of napping again.
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let (mut conn, _) = piped(client);
        let nap = std::time::Duration::from_millis(50);
        conn.coalesce_reads(nap);
        let mut dest = BytesMut::with_capacity(1 << 20);
        server
            .write_all(&xlog_data(0x6000_0000, &[1; 100]))
            .await
            .unwrap();
        assert!(matches!(
            conn.recv_wal(&mut dest, 0).await.unwrap(),
            WalRecv::Header { len: 100, .. }
        ));
        assert!(matches!(
            conn.recv_wal(&mut dest, 1 << 20).await.unwrap(),
            WalRecv::Data(100)
        ));
        // Nothing waiting: the nap (50 ms) ends, then the call waits for data until cut.
        let cut = tokio::time::timeout(
            std::time::Duration::from_millis(70),
            conn.recv_wal(&mut dest, 0),
        )
        .await;
        assert!(cut.is_err());
        let called = tokio::time::Instant::now();
        let send = async {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            server
                .write_all(&xlog_data(0x6000_0064, &[2; 100]))
                .await
                .unwrap();
        };
        let (header, ()) = tokio::join!(conn.recv_wal(&mut dest, 0), send);
        assert!(matches!(header.unwrap(), WalRecv::Header { len: 100, .. }));
        assert!(
            called.elapsed() < std::time::Duration::from_millis(20),
            "napped again: {:?}",
            called.elapsed()
        );
    }

    #[tokio::test]
    async fn over_tcp_a_nap_ends_once_64_kib_are_waiting() {
        // Naps of two seconds, but a burst of small messages (about 100 KiB) arriving
        // during one must end it: the raised mark makes the socket readable at 64 KiB.
        let (mut conn, _, mut server, _probe) = over_tcp().await;
        conn.coalesce_reads(std::time::Duration::from_secs(2));
        let mut dest = BytesMut::with_capacity(4 << 20);
        server
            .write_all(&xlog_data(0x7000_0000, &[1; 100]))
            .await
            .unwrap();
        assert!(matches!(
            conn.recv_wal(&mut dest, 0).await.unwrap(),
            WalRecv::Header { len: 100, .. }
        ));
        assert!(matches!(
            conn.recv_wal(&mut dest, 1 << 20).await.unwrap(),
            WalRecv::Data(100)
        ));
        let burst: Vec<u8> = (0..200u64)
            .flat_map(|i| xlog_data(0x7000_0064 + i * 512, &[i as u8; 512]))
            .collect();
        let started = std::time::Instant::now();
        let send = async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            server.write_all(&burst).await.unwrap();
        };
        let (header, ()) = tokio::join!(conn.recv_wal(&mut dest, 0), send);
        assert!(matches!(header.unwrap(), WalRecv::Header { len: 512, .. }));
        assert!(
            started.elapsed() < std::time::Duration::from_millis(1500),
            "the nap ran its two seconds: {:?}",
            started.elapsed()
        );
    }
}
