//! Switch <-> controller wire format: one TCP connection per switch, each message a 4-byte
//! big-endian length followed by that many bytes of JSON. The switch sends a
//! [`SwitchReport`](crate::stats::SwitchReport), the controller answers a [`ReportAck`].

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stats::ReportOutcome;
use crate::types::AddressTable;

/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 16 << 20;

/// The controller's answer to a report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportAck {
    /// How the report was taken.
    pub outcome: ReportOutcome,
    /// The domain's address table, when newer than the one the switch said it has.
    pub table: Option<AddressTable>,
}

/// A message that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// Socket error.
    #[error("controller connection i/o")]
    Io(#[from] std::io::Error),
    /// A length prefix beyond [`MAX_MESSAGE`].
    #[error("message of {len} bytes exceeds the limit")]
    TooLarge {
        /// The announced length.
        len: usize,
    },
    /// Not the JSON expected.
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| ProtoError::TooLarge { len: body.len() })?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn check_len(len: u32) -> Result<usize, ProtoError> {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > MAX_MESSAGE {
        return Err(ProtoError::TooLarge { len });
    }
    Ok(len)
}

/// Writes one message (blocking).
pub fn write_msg<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtoError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Reads one message (blocking).
pub fn read_msg<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, ProtoError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let mut body = vec![0u8; check_len(u32::from_be_bytes(len))?];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Writes one message.
pub async fn write_msg_async<T: Serialize>(
    w: &mut (impl AsyncWriteExt + Unpin),
    msg: &T,
) -> Result<(), ProtoError> {
    w.write_all(&encode(msg)?).await?;
    Ok(())
}

/// Reads one message; `Ok(None)` on a clean end of stream before a message starts.
pub async fn read_msg_async<T: DeserializeOwned>(
    r: &mut (impl AsyncReadExt + Unpin),
) -> Result<Option<T>, ProtoError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let mut body = vec![0u8; check_len(u32::from_be_bytes(len))?];
    r.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}
