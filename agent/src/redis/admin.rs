//! Clients for plain commands to a local server the agent started (`INFO` after a restore;
//! the cluster assembly of a cluster restore).

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::redis::resp::{decode_reply, encode_command, Reply};

/// Sends one command to 127.0.0.1:`port` and returns a bulk or simple reply as text.
pub async fn command(port: u16, args: &[&[u8]]) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let mut buf = BytesMut::new();
    encode_command(&mut buf, args);
    s.write_all(&buf).await?;
    let mut rbuf = BytesMut::new();
    loop {
        if let Some(reply) = decode_reply(&mut rbuf)? {
            return match reply {
                Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
                Reply::Simple(s) => Ok(s),
                Reply::Error(e) => bail!("{e}"),
                other => bail!("unexpected reply {other:?}"),
            };
        }
        if s.read_buf(&mut rbuf).await? == 0 {
            bail!("127.0.0.1:{port} closed the connection");
        }
    }
}

/// A connection to a local server the agent started, for a series of commands.
pub struct AdminConn {
    stream: TcpStream,
    buf: BytesMut,
    port: u16,
}

impl AdminConn {
    /// Connects to 127.0.0.1:`port`.
    pub async fn connect(port: u16) -> Result<AdminConn> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
        Ok(AdminConn {
            stream,
            buf: BytesMut::new(),
            port,
        })
    }

    /// Sends one command and returns its reply (an error reply included).
    pub async fn cmd(&mut self, args: &[&[u8]]) -> Result<Reply> {
        let mut out = BytesMut::new();
        encode_command(&mut out, args);
        self.stream.write_all(&out).await?;
        loop {
            if let Some(reply) = decode_reply(&mut self.buf)? {
                return Ok(reply);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("127.0.0.1:{} closed the connection", self.port);
            }
        }
    }

    /// Sends one command and fails on an error reply, naming the command.
    pub async fn ok(&mut self, args: &[&[u8]]) -> Result<Reply> {
        match self.cmd(args).await? {
            Reply::Error(e) => bail!(
                "127.0.0.1:{} refused {}: {e}",
                self.port,
                args.iter()
                    .map(|a| String::from_utf8_lossy(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            r => Ok(r),
        }
    }

    /// A bulk or simple reply as text.
    pub async fn text(&mut self, args: &[&[u8]]) -> Result<String> {
        match self.ok(args).await? {
            Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Reply::Simple(s) => Ok(s),
            other => bail!("unexpected reply {other:?}"),
        }
    }
}
